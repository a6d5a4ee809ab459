"""Counter-based randomness for stochastic encodings: every draw is a hash of (cell seed, purpose, index).

A cell's draws for one purpose are the outputs of SplitMix64 (Steele et al. 2014, Vigna's reference
``splitmix64.c``) started at the state ``purpose_key(seed, purpose)``: output ``i`` (0-based) is
``mix64(key + (i + 1) × 0x9E3779B97F4A7C15)``, arithmetic modulo 2⁶⁴. ``CellStream`` derives the seed from
(run seed, epoch, global cell index), so a cell encodes identically whenever it is seen in the same epoch
(exact resume, whatever the worker count or block) and differently in other epochs.

Because output ``i`` is a function of ``(key, i)`` alone, a whole block of cells is drawn in one vectorised
pass: no generator object per cell, no state to advance, no Python loop (a per-cell numpy ``Generator`` cost
~20–75 µs per cell in the loader; this costs ~6 ns per draw). ``splitmix64_reference`` is the plain-Python
definition the tests replay.
"""

from __future__ import annotations

import numba
import numpy as np

GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment (2⁶⁴ / φ, odd)
_MASK = (1 << 64) - 1
_PURPOSE_STEP = 0xD1B54A32D192ED03  # odd; spreads purposes far apart in the key space
_CHUNK = 1 << 15  # elements per in-place pass: temporaries stay in the L2 cache


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, **in place** on a uint64 array (wrapping arithmetic); returns ``z``."""
    if z.dtype != np.uint64 or not z.flags.c_contiguous:
        raise TypeError(f"mix64 needs a C-contiguous uint64 array, got {z.dtype}")
    flat = z.reshape(-1)
    tmp = np.empty(min(len(flat), _CHUNK), dtype=np.uint64)
    for a in range(0, len(flat), _CHUNK):
        c = flat[a:a + _CHUNK]
        t = tmp[:len(c)]
        np.right_shift(c, np.uint64(30), out=t)
        c ^= t
        c *= np.uint64(0xBF58476D1CE4E5B9)
        np.right_shift(c, np.uint64(27), out=t)
        c ^= t
        c *= np.uint64(0x94D049BB133111EB)
        np.right_shift(c, np.uint64(31), out=t)
        c ^= t
    return z


@numba.njit(cache=True, nogil=True, inline="always")
def mix64_one(z: np.uint64) -> np.uint64:
    """``mix64`` of one uint64, inside compiled kernels (inlined into them: numba's cache of a kernel does not see a
    change made here, so this must never change; the tests check every kernel's draws against the reference)."""
    x = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def purpose_key(seeds: np.ndarray | int, purpose: int) -> np.ndarray:
    """Per-cell SplitMix64 state for one purpose: ``mix64(seed + purpose × 0xD1B54A32D192ED03)``."""
    keys = np.asarray(seeds, dtype=np.uint64) + np.uint64((purpose * _PURPOSE_STEP) & _MASK)
    return mix64(np.atleast_1d(keys).copy())


def bits_at(keys: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Output ``index`` of each key's SplitMix64 sequence (uint64; ``keys`` and ``index`` broadcast)."""
    z = np.array(index, dtype=np.uint64, ndmin=1) + np.uint64(1)
    z *= np.uint64(GOLDEN)
    return mix64(np.ascontiguousarray(z + np.asarray(keys, dtype=np.uint64)))


def cell_bits(keys: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Outputs ``0 … lengths[c] − 1`` of every cell's sequence, concatenated (uint64, ``lengths.sum()`` long).
    ``encoding=bin`` makes the same outputs inside its compiled ``_draws``; the tests hold one against the other."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    # key_c + (i + 1)·G with i = t − start_c: one repeat of (key_c − start_c·G) plus (t + 1)·G
    z = np.arange(1, total + 1, dtype=np.uint64)
    z *= np.uint64(GOLDEN)
    z += np.repeat(np.asarray(keys, dtype=np.uint64) - starts.astype(np.uint64) * np.uint64(GOLDEN), lengths)
    return mix64(z)


def uniform(bits: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) from the top 53 bits."""
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def mix64_reference(z: int) -> int:
    """``mix64`` of one integer, in plain Python."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def splitmix64_reference(key: int, n: int) -> list[int]:
    """The first ``n`` outputs of SplitMix64 from state ``key``, in plain Python (the definition tests replay)."""
    return [mix64_reference((key + (i + 1) * GOLDEN) & _MASK) for i in range(n)]


def purpose_key_reference(seed: int, purpose: int) -> int:
    """``purpose_key`` in plain Python."""
    return mix64_reference((seed + purpose * _PURPOSE_STEP) & _MASK)
