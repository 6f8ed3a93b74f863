"""SecAgg+ masks from the whole shared key (privacy/secagg_prg.py), installed into Flower."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_original
from flwr.supercore.primitives.asymmetric import generate_key_pairs

from fedmoe.privacy import secagg_prg

MOD = 1 << 32
SHAPES = [(1,), (3, 5), ()]


def test_installing_replaces_the_generator_everywhere_it_is_called():
    secagg_prg.install()
    secagg_prg.install()  # idempotent
    assert secagg_prg.installed()
    for name in secagg_prg.CALLERS:
        assert importlib.import_module(name).pseudo_rand_gen is secagg_prg.pseudo_rand_gen


def test_the_whole_seed_reaches_the_generator():
    # Flower's generator XOR-folds a seed to 32 bits: swapping two 4-byte words changes nothing.
    seed = os.urandom(32)
    swapped = seed[4:8] + seed[0:4] + seed[8:]
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            flower_original(seed, MOD, SHAPES), flower_original(swapped, MOD, SHAPES), strict=True
        )
    )
    masks = secagg_prg.pseudo_rand_gen(seed, MOD, SHAPES)
    assert not np.array_equal(masks[1], secagg_prg.pseudo_rand_gen(swapped, MOD, SHAPES)[1])
    # Every bit of the seed matters.
    for bit in range(0, 256, 17):
        flipped = bytearray(seed)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert not np.array_equal(
            masks[1], secagg_prg.pseudo_rand_gen(bytes(flipped), MOD, SHAPES)[1]
        )


def test_masks_have_flowers_contract_and_look_uniform():
    seed = os.urandom(32)
    masks = secagg_prg.pseudo_rand_gen(seed, MOD, SHAPES)
    assert [m.shape for m in masks] == SHAPES and all(m.dtype == np.int64 for m in masks)
    again = secagg_prg.pseudo_rand_gen(seed, MOD, SHAPES)
    assert all(np.array_equal(a, b) for a, b in zip(masks, again, strict=True))
    big = secagg_prg.pseudo_rand_gen(seed, MOD, [(200_000,)])[0]
    assert big.min() >= 0 and big.max() < MOD
    assert abs(big.mean() / MOD - 0.5) < 0.005
    small = secagg_prg.pseudo_rand_gen(seed, 7, [(70_000,)])[0]
    counts = np.bincount(small, minlength=7)
    assert len(counts) == 7 and counts.min() > 9_500


def test_pairwise_and_self_masks_cancel_with_a_dropped_client():
    """The SecAgg+ arithmetic with our generator: four clients mask their vectors, one drops after
    masking was set up; the server removes the survivors' self masks and the dropped client's
    pairwise masks (from its key, as SecAgg+ reconstructs it) and gets the survivors' exact sum."""
    secagg_prg.install()
    rng = np.random.default_rng(0)
    shape = [(50,)]
    keys = [generate_key_pairs() for _ in range(4)]
    vectors = [rng.integers(0, 1000, 50) for _ in range(4)]
    self_seeds = [os.urandom(32) for _ in range(4)]

    def pairwise(i: int, j: int) -> np.ndarray:
        return secagg_prg.pseudo_rand_gen(generate_shared_key(keys[i][0], keys[j][1]), MOD, shape)[
            0
        ]

    def masked(i: int) -> np.ndarray:
        out = vectors[i] + secagg_prg.pseudo_rand_gen(self_seeds[i], MOD, shape)[0]
        for j in range(4):
            if j != i:
                out = out + pairwise(i, j) if i > j else out - pairwise(i, j)
        return out % MOD

    survivors, dropped = [0, 1, 3], 2
    total = sum(masked(i) for i in survivors)
    for i in survivors:
        total = total - secagg_prg.pseudo_rand_gen(self_seeds[i], MOD, shape)[0]
    for j in survivors:  # the dropped client's pairwise masks, from its reconstructed key
        mask = secagg_prg.pseudo_rand_gen(
            generate_shared_key(keys[dropped][0], keys[j][1]), MOD, shape
        )[0]
        total = total + mask if dropped > j else total - mask
    np.testing.assert_array_equal(total % MOD, sum(vectors[i] for i in survivors) % MOD)


def test_the_patch_refuses_a_flower_it_was_not_written_for(monkeypatch):
    import flwr
    from flwr.common.secure_aggregation import secaggplus_utils

    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with pytest.raises(secagg_prg.PatchRefused, match="written for flwr 1.42"):
        secagg_prg.install()
    monkeypatch.setattr(flwr, "__version__", "1.42.9")

    def changed(seed, num_range, dimensions_list):
        return []

    for name in secagg_prg.CALLERS:
        monkeypatch.setattr(importlib.import_module(name), "pseudo_rand_gen", changed)
    with pytest.raises(secagg_prg.PatchRefused, match="not the function"):
        secagg_prg.install()
    monkeypatch.setattr(secaggplus_utils, "pseudo_rand_gen", flower_original)
    with pytest.raises(secagg_prg.PatchRefused, match="another generator"):
        secagg_prg.install()


def test_short_seeds_are_refused():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        secagg_prg.pseudo_rand_gen(b"\x00" * 8, MOD, SHAPES)
