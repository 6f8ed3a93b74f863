"""SecAgg+ masks from the whole shared secret: a version-pinned patch of Flower's mask generator.

Flower 1.42's `pseudo_rand_gen` (unchanged since 1.41) folds each SecAgg+ seed (a 32-byte
ECDH-derived key or a 32-byte random self-mask seed) to 32 bits before seeding numpy's Mersenne
Twister. A pairwise mask is then one of 2^32 streams: a coordinator can search them, strip the
mask from a two-client sum, and read an update that carries only a share of the DP noise. Here the
whole seed keys ChaCha20 (from `cryptography`), whose keystream is the mask: recovering a mask
means recovering the key.

The patch is what an upstream pull request would change (one function, same signature, same
output types, masks still reproducible from the same seed by server and clients), installed into
the three modules that call it. It refuses to install on a Flower whose original function is not
the one it was written for. Every process that masks or unmasks installs it: the node's ClientApp
(client/client_app.py) and the coordinator's ServerApp (coordinator/round/server_app.py).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

FLOWER_VERSION_PREFIX = "1.42."
# SHA-256 of the source of the `pseudo_rand_gen` this patch replaces (flwr 1.41.x and 1.42.x: the
# same function).
ORIGINAL_SOURCE_SHA256 = "19ee2545ed58c0174c0b1a56f4211d635347156163ae76a711613badad4b25e9"
CALLERS = (
    "flwr.common.secure_aggregation.secaggplus_utils",
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
)
DOMAIN = b"fedmoe secagg+ mask v1"


class PatchRefused(RuntimeError):
    """The installed Flower is not the one this patch was written for."""


def mask_key(seed: bytes) -> bytes:
    """The ChaCha20 key of a seed: SHA-256 over the whole seed (no folding), domain-separated."""
    if not isinstance(seed, bytes | bytearray) or len(seed) < 16:
        raise ValueError("a SecAgg+ mask seed must be at least 16 bytes")
    return hashlib.sha256(DOMAIN + bytes(seed)).digest()


def keystream(key: bytes, nbytes: int) -> bytes:
    # A fresh key per seed, so a fixed nonce never repeats under one key.
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return encryptor.update(bytes(nbytes))


def pseudo_rand_gen(
    seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]
) -> list[np.ndarray]:
    """Masks uniform on [0, num_range) for each shape, from ChaCha20 keyed by the whole seed.

    Same contract as Flower's: int64 arrays, one per shape (a 0-d array for `()`)."""
    if not 2 <= num_range <= 1 << 62:
        raise ValueError(f"num_range must be in [2, 2^62], got {num_range}")
    sizes = [int(np.prod(d, dtype=np.int64)) for d in dimensions_list]
    words = np.frombuffer(keystream(mask_key(seed), 8 * sum(sizes)), dtype="<u8")
    # 64 random bits mod num_range: exactly uniform for the power-of-two ranges SecAgg+ uses,
    # within num_range / 2^64 of uniform otherwise.
    values = (words % np.uint64(num_range)).astype(np.int64)
    out, start = [], 0
    for dimension, size in zip(dimensions_list, sizes, strict=True):
        out.append(values[start : start + size].reshape(dimension))
        start += size
    return out


def install() -> None:
    """Replace Flower's SecAgg+ mask generator in every module that calls it (idempotent)."""
    import flwr

    if not flwr.__version__.startswith(FLOWER_VERSION_PREFIX):
        raise PatchRefused(
            f"fedmoe's SecAgg+ mask patch was written for flwr {FLOWER_VERSION_PREFIX}x, found "
            f"{flwr.__version__}: review fedmoe/privacy/secagg_prg.py before upgrading Flower"
        )
    modules = [importlib.import_module(name) for name in CALLERS]
    original = modules[0].pseudo_rand_gen
    if original is not pseudo_rand_gen:
        digest = hashlib.sha256(inspect.getsource(original).encode()).hexdigest()
        if digest != ORIGINAL_SOURCE_SHA256:
            raise PatchRefused(
                "flwr's pseudo_rand_gen is not the function fedmoe's mask patch replaces "
                f"(source SHA-256 {digest[:12]}): review fedmoe/privacy/secagg_prg.py"
            )
    for module in modules:
        if module.pseudo_rand_gen not in (original, pseudo_rand_gen):
            raise PatchRefused(f"{module.__name__} masks with another generator than flwr's")
        module.pseudo_rand_gen = pseudo_rand_gen


def installed() -> bool:
    return all(importlib.import_module(name).pseudo_rand_gen is pseudo_rand_gen for name in CALLERS)
