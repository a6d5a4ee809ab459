"""scGPT's value binning (Cui et al. 2024; ``scgpt/preprocess.py`` ``binning`` / ``_digitize``,
``scgpt/tokenizer/gene_tokenizer.py`` ``tokenize_and_pad_batch``).

Per cell, in this order:

1. **Normalise**: ``value = log1p(count × target_sum / normaliser)``; the product is formed in float64 and
   rounded once to float32 (scGPT's AnnData is float32), ``log1p`` is float32. ``normaliser`` is the cell's
   in-vocabulary count sum (``normalize_by='vocab'``: scGPT normalises the genes it kept) or the corpus's
   total over all input genes (``'all_genes'``).
2. **Bin the whole cell** (scGPT bins in preprocessing, *before* genes are sampled): edges =
   ``np.quantile(non-zero values, np.linspace(0, 1, n_bins - 1))``; ``left = np.digitize(x, edges)``,
   ``right = np.digitize(x, edges, right=True)``; ``bin = ceil(u × (right − left) + left)`` with ``u`` uniform
   in [0, 1) (``_digitize(side="both")``). A value that sits on k ≥ 2 equal edges (ties: most non-zeros of
   low-count cells) gets a uniform bin among k; otherwise ``bin = left``. Non-zeros land in 1 … n_bins−1,
   zeros in 0. For two values a < b of one cell, bin(a) ≤ bin(b) always: only *equal* values can be
   scattered over several bins.
3. **Candidates**: the cell's non-zero genes, or (``include_zero_genes``) every gene token of the vocabulary
   (zeros: value 0, bin 0). When there are more than ``max_len − 1`` (the ``<cls>`` slot), that many are
   sampled without replacement. scfm keeps them in **ascending token order** (scGPT keeps
   ``np.random.choice``'s random order; its model has no positions, so only the set matters).
4. ``<cls>`` first, with value ``cls_value`` and bin 0 (scGPT inserts value 0).

Randomness (exact resume): a counter-based hash, no generator state (``scfm.encodings.rng``). Per cell,
``bits_j`` = output j of SplitMix64 started at ``purpose_key(cell_seed, BIN_DRAWS)``:

- the i-th non-zero gene (ascending token order) gets the tie uniform ``u = (bits_i >> 32) / 2³²``, so its bin is
  ``ceil(u·(right − left) + left)`` = ``left − ((bits_i >> 32)·(left − right) >> 32)`` (exact integer arithmetic);
- when sampling, candidate j (position among the candidates in ascending token order) has the key
  ``(bits_j & 0xFFFFFFFF, j)``: the ``max_len − 1`` candidates with the smallest keys are kept (a uniform random
  subset; ties of the 32-bit part go to the lower position).

The two halves of one output feed different decisions, so a gene's bin and whether it is kept are independent.
Without ``cell_seeds`` every cell uses seed 0. ``tests/test_bin.py`` replays the draws in plain Python.

Input genes may come in any order within a cell (they are sorted by token id first); explicit zero counts
are dropped; a duplicated gene in a cell or a negative count is an error.

Implementation, vectorised over the block: counts are integers and the value is monotone in the count, so
runs of equal values come from a (cell, count) table — a dense range of small counts per cell (run = arithmetic
on the count), ``np.unique`` for the few larger ones — and tokens are never sorted. numpy's
``quantile`` is repeated for each cell's n_bins − 1 edges with the same float64 operations (its rounding
artifacts included); an edge lies between two neighbouring order statistics a <= edge <= b and is compared
with those two only; ``left`` / ``right`` of a run are counts of the edges below it. The draws, the sampling and
the output are one compiled (numba) pass per cell, ``_encode_kept``: the cell's outputs are made, their low halves
go to an exact radix select of the ``max_len − 1`` smallest keys, and the kept tokens are written with the bin their
high half picks (ascending token order, no sort).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numba
import numpy as np

from scfm.encodings.rng import GOLDEN, mix64_one, purpose_key
from scfm.errors import ScfmInputError

NORMALIZE_BY = ("vocab", "all_genes")
log = logging.getLogger(__name__)
BIN_DRAWS = 1  # the purpose of bin's draws in ``scfm.encodings.rng``


def canonical_cells(gene_ids: np.ndarray, counts: np.ndarray,
                    offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop zero counts and put each cell's genes in ascending token order (no copy if already so)."""
    gene_ids, counts = np.asarray(gene_ids), np.asarray(counts)
    offsets = np.asarray(offsets).astype(np.int64, copy=False)
    n_cells = len(offsets) - 1
    if len(gene_ids) != len(counts) or offsets[0] != 0 or offsets[-1] != len(gene_ids):
        raise ValueError("gene_ids, counts and offsets do not describe the same cells")
    if not np.issubdtype(counts.dtype, np.integer):
        if not (np.isfinite(counts).all() and (counts == np.round(counts)).all()):
            raise ScfmInputError("encoding=bin needs raw integer counts (got NaN, infinite or fractional values)",
                                 fix="prepare the corpus from raw counts (a scfm corpus holds them)")
        counts = counts.astype(np.int64)
    if len(counts) and counts.min() <= 0:
        if counts.min() < 0:
            raise ScfmInputError("negative counts given to encoding=bin",
                                 fix="encode raw, non-negative counts (a scfm corpus holds them)")
        cell = np.repeat(np.arange(n_cells), np.diff(offsets))
        keep = counts > 0
        gene_ids, counts, cell = gene_ids[keep], counts[keep], cell[keep]
        offsets = np.zeros(n_cells + 1, dtype=np.int64)
        np.cumsum(np.bincount(cell, minlength=n_cells), out=offsets[1:])
    total = len(gene_ids)
    if total > 1:
        unordered = np.diff(gene_ids) <= 0
        cuts = offsets[1:-1]
        unordered[cuts[(cuts > 0) & (cuts < total)] - 1] = False  # cell boundaries may step down
        if unordered.any():
            cell = np.repeat(np.arange(n_cells), np.diff(offsets))
            order = np.lexsort((gene_ids, cell))
            gene_ids, counts = gene_ids[order], counts[order]
            dup = (np.diff(gene_ids) == 0) & (cell[1:] == cell[:-1])
            if dup.any():
                c = int(cell[1:][dup][0])
                raise ScfmInputError(f"cell {c} of the block lists gene token {int(gene_ids[1:][dup][0])} twice",
                                     fix="give each gene once per cell (sum duplicated columns when preparing)")
    return gene_ids, counts, offsets


def normalised_value(counts: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``log1p(float32(count × scale))`` (float32); ``scale = target_sum / normaliser`` (float64)."""
    return np.log1p((counts * scale).astype(np.float32))


@lru_cache(maxsize=8)
def _quantiles(n_bins: int) -> np.ndarray:
    return np.linspace(0, 1, n_bins - 1)


_U = np.uint64  # hot loops index through an unsigned integer: numba then skips its negative-index wraparound (the
# (cell, count) histogram of _runs_kernel: 7.3 -> 5.8 µs per cell; the output loop of _encode_kept gains most)
_DENSE_CAP = 64  # counts below this go through the dense (cell, count) table: most counts of a cell are small


def _runs(counts: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, ...]:
    """The (cell, count) runs of a block: (run_cell, run_count, run_size, token_run), cell-major and counts
    ascending. Each cell owns a dense range of ``cap`` runs (counts 0 … cap − 1, most of them empty: size 0),
    followed by one run per distinct count >= cap (sorted: those are few). No token is sorted and the run of a
    small count is found by arithmetic, not by a lookup."""
    n_cells = len(offsets) - 1
    top = int(counts.max()) + 1
    cap = min(top, _DENSE_CAP)
    if np.count_nonzero(counts >= cap) * 8 > len(counts):  # deep cells: a wider table is cheaper than sorting
        cap = min(top, max(_DENSE_CAP, (2 * len(counts) + 4096) // max(n_cells, 1)))
    return _runs_kernel(counts, offsets, cap)


@numba.njit(cache=True, nogil=True)
def _runs_kernel(counts: np.ndarray, offsets: np.ndarray, cap: int) -> tuple[np.ndarray, ...]:
    n_cells = len(offsets) - 1
    big = np.empty(len(counts), dtype=np.int64)  # each cell's distinct counts >= cap, ascending, cell after cell
    big_start = np.zeros(n_cells + 1, dtype=np.int64)
    m = 0
    for c in range(n_cells):
        first = m
        for t in range(offsets[c], offsets[c + 1]):
            if counts[_U(t)] >= cap:
                big[m] = counts[_U(t)]
                m += 1
        if m - first > 1:
            big[first:m] = np.sort(big[first:m])
            u = first + 1
            for j in range(first + 1, m):
                if big[j] != big[u - 1]:
                    big[u] = big[j]
                    u += 1
            m = u
        big_start[c + 1] = m
    n_runs = n_cells * cap + m
    run_cell, run_count = np.empty(n_runs, np.int64), np.empty(n_runs, np.int64)
    run_size, token_run = np.zeros(n_runs, np.int64), np.empty(len(counts), np.int64)
    for c in range(n_cells):
        first = c * cap + big_start[c]  # the cell's first run
        bigs = big[big_start[c]:big_start[c + 1]]
        for j in range(cap + len(bigs)):
            run_cell[first + j] = c
            run_count[first + j] = j if j < cap else bigs[j - cap]
        for t in range(offsets[c], offsets[c + 1]):
            x = counts[_U(t)]
            r = first + x if x < cap else first + cap + np.searchsorted(bigs, x)
            token_run[_U(t)] = r
            run_size[_U(r)] += 1
    return run_cell, run_count, run_size, token_run


def bin_runs(counts: np.ndarray, offsets: np.ndarray, scale: np.ndarray, n_bins: int):
    """scGPT's binning of a block of cells, per run of equal values (see ``bin_bounds``).

    Returns ``token_run`` (the run of each token) and, per run (cell-major, values ascending), ``run_cell``,
    ``run_value``, ``left`` and ``right``.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lens = np.diff(offsets)
    if offsets[-1] == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32), empty, empty
    counts = np.asarray(counts)
    if counts.dtype not in (np.int32, np.int64):
        counts = counts.astype(np.int64)
    run_cell, run_count, run_size, token_run = _runs(counts, offsets)
    run_value = normalised_value(run_count, np.asarray(scale, dtype=np.float64)[run_cell])
    same = (run_cell[1:] == run_cell[:-1]) & (run_value[1:] == run_value[:-1])
    if same.any():  # distinct counts, one float32 value (only at absurd depths): merge the runs
        first = np.concatenate([[True], ~same])
        token_run = (np.cumsum(first) - 1)[token_run]
        run_size = np.add.reduceat(run_size, np.flatnonzero(first))
        run_cell, run_value = run_cell[first], run_value[first]
    left, right = _bounds_kernel(run_cell, run_size, run_value, lens, _quantiles(n_bins))
    return token_run, run_cell, run_value, left, right


@numba.njit(cache=True, nogil=True)
def _bounds_kernel(run_cell: np.ndarray, run_size: np.ndarray, run_value: np.ndarray, lens: np.ndarray,
                   quantiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per run: ``left`` = #edges <= its value, ``right`` = #edges < its value, where a cell's edges are numpy's
    ``quantile(values, quantiles)`` (method 'linear': virtual index (n−1)·q, neighbours a ≤ b, gamma, ``_lerp`` in
    float64 from float32 a, b and b − a). An edge lies in [a, b], so it is compared with those two only."""
    n_runs = len(run_cell)
    left, right = np.zeros(n_runs, np.int64), np.zeros(n_runs, np.int64)
    r0 = 0
    for c in range(len(lens)):
        r1 = r0
        while r1 < n_runs and run_cell[r1] == c:
            r1 += 1
        n = lens[c]
        if n > 0:
            ends = np.cumsum(run_size[r0:r1])  # positions in the cell's sorted order
            below = np.zeros(r1 - r0 + 1, np.int64)  # per run: edges whose count starts there (left)
            upto = np.zeros(r1 - r0 + 1, np.int64)  # (right)
            last = n - 1
            for q in quantiles:
                virtual = last * q
                above = virtual >= last
                prev = np.floor(virtual)
                gamma = virtual - (-1.0 if above else prev)  # numpy's previous index is -1 there (a == b: no effect)
                lo = last if above else np.int64(prev)
                run_lo = np.searchsorted(ends, lo, side="right")
                run_hi = run_lo if above else np.searchsorted(ends, lo + 1, side="right")
                a, b = run_value[r0 + run_lo], run_value[r0 + run_hi]
                diff = np.float32(b - a)
                edge = np.float64(b) - diff * (1.0 - gamma) if gamma >= 0.5 else np.float64(a) + diff * gamma
                if edge == a:
                    below[run_lo] += 1
                    upto[run_lo + 1] += 1
                else:
                    below[run_hi] += 1
                    upto[run_hi + (edge == b)] += 1
            k_below = k_upto = 0
            for j in range(r1 - r0):
                k_below += below[j]
                k_upto += upto[j]
                left[r0 + j] = k_below
                right[r0 + j] = k_upto if run_size[r0 + j] else k_below  # empty runs (no token): never a tie
        r0 = r1
    return left, right


def bin_bounds(counts: np.ndarray, offsets: np.ndarray, scale: np.ndarray,
               n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scGPT's normalised values and digitize bounds for a block of cells (non-zero integer counts).

    Per token: ``values = normalised_value(count, scale[cell])``, ``left = np.digitize(values, edges)`` and
    ``right = np.digitize(values, edges, right=True)`` where, per cell, ``edges = np.quantile(cell_values,
    np.linspace(0, 1, n_bins - 1))``. numpy's float64 arithmetic is repeated exactly, rounding artifacts
    included (e.g. ``(n-1)·q = 4.999…`` where the exact index is 5 puts the edge just below a value).
    Runs of equal values come from a (cell, count) histogram, so the tokens are never sorted.
    """
    token_run, _, run_value, left, right = bin_runs(counts, offsets, scale, n_bins)
    return run_value[token_run], left[token_run], right[token_run]


@numba.njit(cache=True, nogil=True)
def _kth_of_cell(low: np.ndarray, k: int, hist: np.ndarray) -> tuple[int, int]:
    """For ``len(low) > k`` 32-bit keys: (the k-th smallest, how many keys equal to it are kept), exactly. Radix select:
    a histogram of the top bits (about one bucket per key, at most ``len(hist)``) finds the bucket holding it, which
    is sorted."""
    n = len(low)
    bits = 1
    while (1 << bits) < n and (2 << bits) <= len(hist):
        bits += 1
    shift = np.uint32(32 - bits)
    hist[:1 << bits] = 0
    for i in range(n):
        hist[low[_U(i)] >> shift] += 1
    below, b = 0, 0
    while below + hist[b] < k:
        below += hist[b]
        b += 1
    bucket = np.empty(hist[b], dtype=np.uint32)
    j, b = 0, np.uint32(b)
    for i in range(n):
        v = low[_U(i)]
        if v >> shift == b:
            bucket[j] = v
            j += 1
    bucket.sort()
    kth = bucket[k - below - 1]
    less = below
    for v in bucket:
        if v < kth:
            less += 1
    return kth, k - less


@numba.njit(cache=True, nogil=True)
def _keep_smallest(low: np.ndarray, k: int, hist: np.ndarray, kept: np.ndarray) -> int:
    """The sampling rule on one cell's keys: writes the positions of the ``k`` smallest of ``low`` (ties of equal keys
    to the lower position; all of them when ``len(low) <= k``) to ``kept`` (room for ``len(low)``), ascending, and
    returns how many. The compaction is branch-free: every position is written, at the slot after the last kept."""
    n = len(low)
    if n <= k:
        for i in range(n):
            kept[i] = i
        return n
    kth, ties = _kth_of_cell(low, k, hist)
    m = 0
    for i in range(n):
        v = low[_U(i)]
        tie = v == kth
        keep = (v < kth) | (tie & (ties > 0))
        kept[_U(m)] = i
        m += keep
        ties -= tie & keep
    return m


@numba.njit(cache=True, nogil=True)
def _smallest(bits: np.ndarray, lengths: np.ndarray, k: int) -> np.ndarray:
    """Sampling: whether each candidate is among its cell's ``k`` with the smallest keys, where candidate j's key is
    (low 32 bits of its output, j): ``_keep_smallest`` on given outputs, cell by cell (``bits`` flat). The tests
    check the rule here with tie-heavy outputs."""
    keep = np.zeros(len(bits), dtype=np.bool_)
    _, _, hist, kept = _scratch(lengths)
    start = 0
    for n in lengths:
        low = (bits[start:start + n] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        for j in range(_keep_smallest(low, k, hist, kept)):
            keep[start + kept[j]] = True
        start += n
    return keep


@numba.njit(cache=True, nogil=True)
def _cell_draws(key: np.uint64, n: int, low: np.ndarray, top: np.ndarray) -> None:
    """Outputs ``0 … n − 1`` of a cell's SplitMix64 sequence from state ``key`` (``rng.cell_bits``): output
    i = mix64(key + (i + 1)·GOLDEN), its low half to ``low[i]`` (the sampling key), its high half to ``top[i]``."""
    z = key
    for i in range(n):
        z += np.uint64(GOLDEN)
        x = mix64_one(z)
        low[_U(i)] = np.uint32(x & np.uint64(0xFFFFFFFF))
        top[_U(i)] = np.uint32(x >> np.uint64(32))


@numba.njit(cache=True, nogil=True)
def _scratch(lengths: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-cell work arrays of ``_cell_draws`` / ``_keep_smallest`` for cells of these lengths: low, top, hist, kept."""
    longest = lengths.max() if len(lengths) else 0
    return (np.empty(longest, dtype=np.uint32), np.empty(longest, dtype=np.uint32), np.empty(4096, dtype=np.int64),
            np.empty(longest, dtype=np.int64))


@numba.njit(cache=True, nogil=True)
def _draws(keys: np.ndarray, lengths: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's draws (``_cell_draws`` from ``keys[c]``), sampled by ``_keep_smallest``: the kept candidates (flat
    positions, ascending) and the high 32 bits of their outputs (the tie uniforms)."""
    total = 0
    for n in lengths:
        total += min(n, k)
    index = np.empty(total, dtype=np.int64)
    high = np.empty(total, dtype=np.int64)
    low, top, hist, kept = _scratch(lengths)
    start = out = 0
    for c in range(len(lengths)):
        n = lengths[c]
        _cell_draws(keys[c], n, low, top)
        for j in range(_keep_smallest(low[:n], k, hist, kept)):
            index[out] = start + kept[j]
            high[out] = top[kept[j]]
            out += 1
        start += n
    return index, high


@numba.njit(cache=True, nogil=True)
def _encode_kept(keys: np.ndarray, lengths: np.ndarray, k: int, gene_ids: np.ndarray, token_run: np.ndarray,
                 run_left: np.ndarray, run_right: np.ndarray, run_value: np.ndarray, head: int, cls_id: int,
                 cls_value: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The encoded tokens, flat: each cell's draws (``_draws``, fused: no per-token intermediate arrays), then its
    kept tokens, led by ``<cls>`` (id ``cls_id``, bin 0, ``cls_value``) when ``head``. scGPT's tie rule
    ``ceil(u·(right − left) + left)`` with ``u = high / 2³²`` is ``left − ⌊high · (left − right) / 2³²⌋``."""
    total = 0
    for n in lengths:
        total += min(n, k) + head
    genes, bins, values = np.empty(total, np.int64), np.empty(total, np.int64), np.empty(total, np.float32)
    low, top, hist, kept = _scratch(lengths)
    start = o = 0
    for c in range(len(lengths)):
        n = lengths[c]
        if head:
            genes[o], bins[o], values[o] = cls_id, 0, cls_value
            o += 1
        _cell_draws(keys[c], n, low, top)
        for j in range(_keep_smallest(low[:n], k, hist, kept)):
            i = kept[_U(j)]
            t = _U(start + i)
            r = _U(token_run[t])
            left = run_left[r]
            genes[_U(o)] = gene_ids[t]
            bins[_U(o)] = left - ((np.int64(top[_U(i)]) * (left - run_right[r])) >> 32)  # < 2³² · n_bins: no overflow
            values[_U(o)] = run_value[r]
            o += 1
        start += n
    return genes, bins, values


def _insert_at(body: np.ndarray, at: np.ndarray, value, part: np.ndarray) -> np.ndarray:
    out = np.empty(len(body), dtype=part.dtype)
    out[at] = value
    out[body] = part
    return out


@dataclass
class BinEncoding:
    """Encoding ``bin`` (scGPT): ``<cls>`` + genes with ``values_bin`` (0 … n_bins−1) and ``values`` (log1p)."""

    n_bins: int = 51
    max_len: int = 1200
    target_sum: float = 1e4
    normalize_by: str = "vocab"
    include_zero_genes: bool = False
    append_cls: bool = True
    cls_value: float = 0.0
    kind: ClassVar[str] = "bin"  # what objectives and architectures declare they read

    def __post_init__(self) -> None:
        if self.n_bins < 2:
            raise ScfmInputError(f"encoding.n_bins={self.n_bins}: need >= 2 (bin 0 is for zeros)")
        if self.max_len < 1 + self.append_cls:
            raise ScfmInputError(f"encoding.max_len={self.max_len} is too small")
        if self.normalize_by not in NORMALIZE_BY:
            raise ScfmInputError(f"encoding.normalize_by must be one of {NORMALIZE_BY}, not {self.normalize_by!r}")
        self.target_sum = float(self.target_sum)
        if not self.target_sum > 0:
            raise ScfmInputError(f"encoding.target_sum={self.target_sum} must be > 0")
        self.cls_id: int | None = None
        self.gene_tokens: np.ndarray | None = None
        self.vocab_size = 0

    @property
    def max_genes(self) -> int:
        return self.max_len - int(self.append_cls)

    def bind(self, corpus) -> BinEncoding:
        """Read the vocabulary: the ``<cls>`` id and the gene tokens (the candidates of ``include_zero_genes``)."""
        self.bind_arrays(corpus.vocab, {})
        self._compile(corpus)
        return self

    def bound_arrays(self) -> dict[str, np.ndarray]:
        """What :meth:`bind` took from the corpus beyond its vocabulary: nothing."""
        return {}

    def bind_arrays(self, vocab, arrays: dict[str, np.ndarray]) -> BinEncoding:
        """Bind to ``vocab`` alone (a model bundle's, no corpus needed)."""
        if self.append_cls:
            if "<cls>" not in vocab.specials:
                raise ScfmInputError(f"encoding=bin puts <cls> first but the vocabulary has no <cls> token "
                                     f"(its special tokens: {list(vocab.specials)})",
                                     fix="prepare the corpus with scfm's own vocabulary (it has <cls>) or one "
                                         "with <cls> (e.g. geneformer_gc95M), or set encoding.append_cls=false")
            self.cls_id = vocab.special_id("<cls>")
        self.gene_tokens = vocab.gene_token_ids()
        self.vocab_size = len(vocab)
        return self

    def _compile(self, corpus) -> None:
        """Encode the corpus's first cells once: the kernels are compiled (or loaded from numba's cache) for the
        corpus's dtypes here, in the process that forks the loader workers, which then inherit the machine code.
        The cells are copied out of the shard, as the loader reads them: numba types a read-only memory map apart,
        and each worker would load the kernels again at every epoch (~50 ms)."""
        if not getattr(corpus, "n_shards", 0) or not corpus.shard_sizes[0]:
            return
        shard, start = corpus.shard(0), time.perf_counter()
        offsets = np.array(shard.offsets[:min(3, int(corpus.shard_sizes[0]) + 1)], dtype=np.int64)
        end = int(offsets[-1])
        self.encode(np.array(shard.gene_ids[:end]), np.array(shard.counts[:end]), offsets,
                    np.array(shard.total_counts[:len(offsets) - 1]))
        if time.perf_counter() - start > 2:
            log.info("encoding=bin: compiled its kernels in %.0f s (cached for the next runs)",
                     time.perf_counter() - start)

    def _candidates(self, n_nonzero: np.ndarray) -> np.ndarray:
        if self.include_zero_genes:
            return np.full(len(n_nonzero), len(self.gene_tokens), dtype=np.int64)
        return n_nonzero

    def lengths(self, shard) -> np.ndarray:
        """Encoded length of every cell of a shard (no binning)."""
        self._check_bound()
        offsets = np.asarray(shard.offsets, dtype=np.int64)
        counts = np.asarray(shard.counts)
        if self.include_zero_genes:
            n = np.full(len(offsets) - 1, len(self.gene_tokens), dtype=np.int64)
        elif not len(counts) or counts.min() > 0:  # a corpus holds non-zero counts only: a cell's length is its size
            n = np.diff(offsets)
        else:
            nonzero = np.zeros(len(offsets) - 1, dtype=np.int64)
            filled = offsets[1:] > offsets[:-1]
            nonzero[filled] = np.add.reduceat((counts > 0).view(np.int8), offsets[:-1][filled], dtype=np.int64)
            n = nonzero
        return np.minimum(n, self.max_genes) + int(self.append_cls)

    def _check_bound(self) -> None:
        if self.gene_tokens is None:
            raise RuntimeError("BinEncoding.bind(corpus) must be called before encoding")

    def encode(self, gene_ids: np.ndarray, counts: np.ndarray, offsets: np.ndarray, totals: np.ndarray,
               cell_seeds: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Encode a block of cells; returns flat ``gene_ids``, ``values_bin``, ``values`` and their ``offsets``."""
        self._check_bound()
        gene_ids, counts, offsets = canonical_cells(gene_ids, counts, offsets)
        n_cells = len(offsets) - 1
        lens = np.diff(offsets)
        if self.normalize_by == "vocab":
            normaliser = np.zeros(n_cells, dtype=np.int64)
            if len(counts):
                normaliser[lens > 0] = np.add.reduceat(counts, offsets[:-1][lens > 0], dtype=np.int64)
        else:
            normaliser = np.asarray(totals, dtype=np.float64)
        if ((normaliser <= 0) & (lens > 0)).any():
            raise ScfmInputError("a cell has non-zero counts but a total <= 0",
                                 fix="check the corpus's total_counts, or use encoding.normalize_by=vocab")
        scale = np.divide(self.target_sum, normaliser, out=np.zeros(n_cells), where=lens > 0)
        token_run, _, run_value, run_left, run_right = bin_runs(counts, offsets, scale, self.n_bins)
        candidates = self._candidates(lens)
        room = self.max_genes
        sampled = candidates > room
        keys = purpose_key(np.zeros(n_cells, np.uint64) if cell_seeds is None else cell_seeds, BIN_DRAWS)
        chosen = None  # include_zero_genes: the chosen gene-list positions, cell by cell (None: all of them)
        if sampled.any() and self.include_zero_genes:
            chosen = self._sample_positions(keys, room)
        # output i of the cell's sequence for its i-th non-zero gene; without include_zero_genes, keep the tokens whose
        # keys are among their cell's ``room`` smallest (token order)
        draws = len(gene_ids) if self.include_zero_genes else room  # with zero genes: every non-zero one is kept
        head = 0 if self.include_zero_genes else int(self.append_cls)
        parts = _encode_kept(keys, lens, draws, gene_ids, token_run, run_left, run_right, run_value, head,
                             self.cls_id or 0, self.cls_value)
        kept = np.minimum(candidates, room)
        out_offsets = np.zeros(n_cells + 1, dtype=np.int64)
        np.cumsum(kept + int(self.append_cls), out=out_offsets[1:])
        if self.include_zero_genes:
            parts = self._with_zero_genes(*parts, lens, kept, chosen)
            if self.append_cls:  # <cls> at each cell's start
                body = np.ones(int(out_offsets[-1]), dtype=bool)
                body[out_offsets[:-1]] = False
                parts = [_insert_at(body, out_offsets[:-1], cls, part)
                         for cls, part in zip((self.cls_id, 0, self.cls_value), parts)]
        names, dtypes = ("gene_ids", "values_bin", "values"), (np.int64, np.int64, np.float32)
        return {"offsets": out_offsets} | {k: p.astype(t, copy=False) for k, p, t in zip(names, parts, dtypes)}

    def _sample_positions(self, keys: np.ndarray, room: int) -> np.ndarray:
        """include_zero_genes: each cell's ``room`` gene-list positions j with the smallest sampling keys (output j of
        its sequence), ascending, concatenated cell by cell."""
        n_genes = len(self.gene_tokens)
        index, _ = _draws(keys, np.full(len(keys), n_genes, dtype=np.int64), room)
        return index % n_genes if n_genes else index

    def _with_zero_genes(self, gene_ids, bins, values, lens, kept, chosen):
        """Candidates = every gene token (a contiguous range after the specials); the chosen ones (gene-list
        positions cell by cell; None = all), in order, with the value and bin of the cell's non-zero genes."""
        n_cells, n_genes = len(lens), len(self.gene_tokens)
        if chosen is None:
            chosen = np.tile(np.arange(n_genes), n_cells)
        first = int(self.gene_tokens[0]) if n_genes else 0
        vals, bns = np.zeros(len(chosen), dtype=np.float32), np.zeros(len(chosen), dtype=np.int64)
        index = gene_ids - first
        inside = (index >= 0) & (index < n_genes)
        chosen_at = np.concatenate([[0], np.cumsum(kept)]).tolist()
        token_at = np.concatenate([[0], np.cumsum(lens)]).tolist()
        step = max(1, (1 << 22) // max(n_genes, 1))  # cells per dense (cell, gene) table of <= 4M slots
        for lo in range(0, n_cells if inside.any() else 0, step):
            hi = min(lo + step, n_cells)
            cs, ce, ts, te = chosen_at[lo], chosen_at[hi], token_at[lo], token_at[hi]
            slot = np.full((hi - lo) * n_genes, -1, dtype=np.int32)  # position among the chosen, per (cell, gene)
            slot[np.repeat(np.arange(hi - lo) * n_genes, kept[lo:hi]) + chosen[cs:ce]] = np.arange(ce - cs)
            ins = inside[ts:te]
            at = slot[np.repeat(np.arange(hi - lo) * n_genes, lens[lo:hi])[ins] + index[ts:te][ins]]
            hit = at >= 0
            vals[cs + at[hit]] = values[ts:te][ins][hit]
            bns[cs + at[hit]] = bins[ts:te][ins][hit]
        return self.gene_tokens[chosen], bns, vals
