"""The counter-based draws of ``scfm.encodings.rng`` against plain-Python SplitMix64."""

from __future__ import annotations

import numpy as np
import pytest

from scfm.encodings import rng


def test_splitmix64_reference_matches_the_published_sequence():
    # Vigna's splitmix64.c seeded with 1234567 (the test vector of many ports)
    assert rng.splitmix64_reference(1234567, 3) == [6457827717110365317, 3203168211198807973, 9817491932198370423]


def test_vectorised_draws_equal_the_reference():
    seeds = np.array([0, 1, 2**32, 2**64 - 1, 987654321], dtype=np.uint64)
    keys = rng.purpose_key(seeds, 5)
    assert keys.tolist() == [rng.purpose_key_reference(int(s), 5) for s in seeds]
    lengths = np.array([3, 0, 1, (1 << 15) + 7, 40])  # one cell spans two of mix64's in-place chunks
    bits = rng.cell_bits(keys, lengths)
    expected = [b for k, n in zip(keys.tolist(), lengths.tolist()) for b in rng.splitmix64_reference(k, n)]
    assert bits.tolist() == expected
    at = rng.bits_at(keys[:, None], np.arange(3)[None, :])
    assert at.tolist() == [rng.splitmix64_reference(k, 3) for k in keys.tolist()]


def test_purposes_and_seeds_give_independent_looking_streams():
    seeds = np.arange(2000, dtype=np.uint64)  # neighbouring cells: seeds differ in the low bits only
    u = rng.uniform(rng.cell_bits(rng.purpose_key(seeds, 1), np.full(2000, 50)))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    first = u.reshape(2000, 50)[:, 0]
    other = rng.uniform(rng.cell_bits(rng.purpose_key(seeds, 2), np.full(2000, 1)))
    assert abs(np.corrcoef(first, other)[0, 1]) < 0.1  # purposes are not the same stream
    assert abs(np.corrcoef(first[:-1], first[1:])[0, 1]) < 0.1  # neither are neighbouring cells
    assert len(np.unique(first)) == 2000


def test_mix64_rejects_other_dtypes():
    with pytest.raises(TypeError, match="uint64"):
        rng.mix64(np.arange(3))


def test_bits_at_mixes_scalars_and_mix64_refuses_strided_arrays():
    assert rng.bits_at(np.uint64(5), 0).tolist() == rng.splitmix64_reference(5, 1)
    with pytest.raises(TypeError, match="contiguous"):
        rng.mix64(np.zeros((4, 4), dtype=np.uint64)[:, ::2])
