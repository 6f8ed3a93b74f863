"""SecAgg+ masked vectors at 4 bytes an element: a version-pinned patch of Flower's wire format.

Flower 1.41's SecAgg+ mod uploads a node's masked vector as int64 `np.save` bytes, though every
element is already reduced mod the coordinator's modulus (2^32 in fedmoe): half of every element
is zero bytes, and a masked upload is twice a plain fp32 update (benchmarks/secagg_scale.py).
Here the node sends the vector as uint32 when every element fits, and the coordinator widens what
it receives back to int64 before Flower's own arithmetic: the sums, the unmasking and the
dropout handling stay Flower's, unchanged. The bytes carry the same values, so nothing about the
masks or what they hide changes.

Every process that masks or unmasks installs it, next to the mask generator of
privacy/secagg_prg.py: the node's ClientApp and the coordinator's ServerApp.
"""

from __future__ import annotations

import importlib

import numpy as np
from flwr.common import bytes_to_ndarray, ndarray_to_bytes

FLOWER_VERSION_PREFIX = "1.41."
NODE_MODULE = "flwr.client.mod.secure_aggregation.secaggplus_mod"
COORDINATOR_MODULE = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
WORD = 1 << 32


class PatchRefused(RuntimeError):
    """The installed Flower is not the one this patch was written for."""


def narrow_to_bytes(array: np.ndarray) -> bytes:
    """`ndarray_to_bytes` of a masked vector, as uint32 when every element fits."""
    if array.dtype == np.int64 and array.size and array.min() >= 0 and array.max() < WORD:
        array = array.astype(np.uint32)
    return ndarray_to_bytes(array)


def widen_from_bytes(data: bytes) -> np.ndarray:
    """`bytes_to_ndarray`, with a uint32 vector widened to the int64 Flower's sums expect."""
    array = bytes_to_ndarray(data)
    return array.astype(np.int64) if array.dtype == np.uint32 else array


def install() -> None:
    """Patch the SecAgg+ mod's upload and the workflow's reader (idempotent)."""
    import flwr

    if not flwr.__version__.startswith(FLOWER_VERSION_PREFIX):
        raise PatchRefused(
            f"fedmoe's SecAgg+ wire patch was written for flwr {FLOWER_VERSION_PREFIX}x, found "
            f"{flwr.__version__}: review fedmoe/support/secagg_wire.py before upgrading Flower"
        )
    node = importlib.import_module(NODE_MODULE)
    coordinator = importlib.import_module(COORDINATOR_MODULE)
    if node.ndarray_to_bytes not in (ndarray_to_bytes, narrow_to_bytes) or (
        coordinator.bytes_to_ndarray not in (bytes_to_ndarray, widen_from_bytes)
    ):
        raise PatchRefused("flwr's SecAgg+ code no longer (de)serializes masked vectors as before")
    node.ndarray_to_bytes = narrow_to_bytes
    coordinator.bytes_to_ndarray = widen_from_bytes
