"""scFoundation / xTrimoGene's continuous-value encoding with read-depth-aware (RDA) down-sampling.

References: Hao et al. 2024, "Large-scale foundation model on single-cell transcriptomics" (scFoundation,
Nature Methods); Gong et al. 2023, "xTrimoGene: an efficient and scalable representation learner for
single-cell RNA-seq data" (NeurIPS). Every cell is laid out over one fixed gene list (scFoundation: 19,264
genes, all kept, zeros included) followed by two depth tokens ``T`` and ``S``.

Per cell, with ``c`` its raw counts over the gene list (0 for genes it does not express):

1. **Down-sampling** (RDA, the hierarchical beta-binomial step): only if the cell's raw total (over *all*
   input genes, the corpus's ``total_counts``) is ``>= downsample_min_total``, and then with probability
   ``downsample_prob``: draw a rate ``γ ~ Beta(beta_a, beta_b)`` and thin every count, ``c'_g ~ Binomial(c_g, γ)``.
   Otherwise ``c' = c`` and the rate is 1.
2. **Input values** ``log1p(c' × (target_sum / Σc'))`` in float64, stored as float32 (``Σ`` over the gene list:
   scFoundation normalises the 19,264-gene vector by its own sum); all zeros if ``Σc' = 0``. ``log1p=False`` drops
   the log.
3. **Depth tokens** (appended last, in this order): ``T = log10(raw total)`` and ``S = log10(total of the
   down-sampled cell)``, both over all input genes. The paper defines S as the total count of the (down-sampled)
   input sample; counts outside the gene list are thinned too, with the same γ: their thinned sum is drawn
   exactly as one ``Binomial(raw total − Σc, γ)`` (a sum of binomials with one rate is a binomial). So
   ``S <= T``, and ``S == T`` when the cell is not down-sampled. A total of 0 gives 0 (``log10`` of max(total, 1)).
4. **Masking** for value regression: each gene with ``c' > 0`` is masked with probability ``mask_nonzero`` and each
   gene with ``c' == 0`` (including genes thinned to 0) with probability ``mask_zero``, all independently (Bernoulli
   per gene, not exact counts). ``T`` and ``S`` are never masked.
5. **Target** ``log1p(c × (target_sum / Σc))`` of the **raw** counts: RDA trains the model to predict the
   high-depth (raw) expression from the down-sampled input; ``T`` tells it which depth to predict at. The target
   depends neither on masking nor on down-sampling.

Outputs, flat per token (``n_cells × max_len``, every cell the same length, genes in gene-list order, then T, S),
each given by its entries that are not zero (``Scattered``; ``np.asarray`` makes the dense array):

- ``values``: float32 input values, 0 where masked (the model puts its learned mask embedding there, from
  ``value_mask``); at T and S their log10 depths;
- ``target_values``: float32, the raw cell (step 5); at T and S both ``log10(raw total)`` (never regressed);
- ``value_mask``: bool, True = masked (regress there);
- ``encoder_mask``: bool, what xTrimoGene's asymmetric encoder sees: genes with ``c' > 0`` that are not masked, plus
  T and S;

The same in every cell, so given once (``rows``, ``[max_len]``; batches hold them as stride-0 views, see
``scfm.data.batching.collate``):

- ``gene_ids``: the gene's token id; ``<pad>`` (0) at T and S: models tell T/S apart by ``token_kind``;
- ``token_kind``: int8, 0 gene, 1 T, 2 S.

Per cell (``cell``): ``raw_total`` and ``input_total`` (float32 counts: T and S before log10), ``downsampled`` (bool),
``rate`` (float32 γ, 1.0 if not down-sampled).

**Randomness** comes only from the cell's seed (``CellStream`` derives it from seed, epoch and global cell index:
the same cell in the same epoch encodes identically, so a resumed run is exact; cells encoded without seeds get
``_FIXED_SEED + position in the block``). Every draw is a counter-based uniform (``scfm.encodings.rng``): for a
purpose ``P`` the cell's key is ``purpose_key(seed, P)`` and ``u_P(i) = uniform(output i of SplitMix64 from that
key)`` (top 53 bits, in [0, 1)), a pure function of (seed, P, i). So a draw depends on nothing else: not on the
other cells of the block, not on the order of the input, not on which other genes the cell or the gene list has.
With ``t`` a gene's token id and ``j`` its column in the gene list (``tests/test_continuous.py`` replays this
cell by cell):

1. ``DOWNSAMPLE`` (11), per cell: the cell is down-sampled iff ``u(0) < downsample_prob`` and raw total >= min;
   then ``γ = betaincinv(beta_a, beta_b, u(1))`` (inversion: exactly Beta), and its counts outside the gene list
   thin to ``Q(u(2); raw total − Σc, γ)``;
2. ``THIN`` (12), per listed gene with ``c > 0`` of a down-sampled cell: ``c' = Q(u(t); c, γ)``;
3. ``MASK`` (13), per listed gene with ``c' > 0``: masked iff ``u(t) < mask_nonzero``;
4. ``ZERO`` (14), per cell: the columns drawn for zero masking are ``x_0 < x_1 < …`` with ``x_i = x_{i−1} + g_i``
   (``x_{−1} = −1``), ``g_i = floor(log(1 − u(i)) / log1p(−mask_zero)) + 1``: geometric gaps, so each column is
   drawn with probability ``mask_zero``, independently; those ``< n_genes`` with ``c' == 0`` are masked
   (``mask_zero = 0``: none; ``1``: every column). A compiled loop (``_zero_picks``) draws each cell's gaps until
   one passes the last column.

``Q(u; c, γ) = min{k : F(k) > u}`` is the inverse of the Binomial(c, γ) CDF ``F`` (so ``c' ~ Binomial(c, γ)``
exactly; ``γ = 0`` gives 0, ``γ = 1`` gives ``c``, ``u = 0`` gives 0). ``F(k) > u`` is evaluated in float64 as
written for ``u < 1/2`` and as ``S(k) < 1 − u`` (``S = 1 − F``; ``1 − u`` is exact) for ``u >= 1/2``, so both tails
are resolved to full relative precision: for ``c <= 16`` from a per-(γ, c) table of ``Σ C(c, i) γ^i (1 − γ)^(c−i)``
over ``i <= k`` (F) or ``i > k`` (S); above, by ``scipy.special.bdtr`` / ``bdtrc`` (searched from a
Cornish-Fisher guess). Rounding can make the two evaluations disagree only for a ``u`` within ~1e-15 (relative)
of a step of ``F``; the tests' reference uses bdtr / bdtrc throughout and matches on every draw they make.

Cost: no Python loop over cells. Per block, a few numpy passes over the sparse entries (hash, compare, an
inversion loop over ``k < 16`` on the still unresolved entries), ~``n_genes × mask_zero`` hashed gaps per cell,
and one compiled pass (``_layout``, numba) that lists each output's entries that are not zero, by a token -> column
map fixed in ``bind``. Nothing dense is made here: ``collate`` writes the entries straight into the batch
(``scfm.encodings.tokens.Scattered``), so a worker writes each of the batch's ~10 bytes per token once.

Defaults are all configurable (``conf/encoding/continuous.yaml``). ``target_sum=1e4`` + ``log1p`` is scFoundation's
normalisation and 30% masking of expressed values its masking ratio (DESIGN.md §1); ``downsample_prob=0.5``,
``downsample_min_total=1000``, ``Beta(2, 2)`` and ``mask_zero=0.03`` are our recollection of the paper's RDA and
masking settings, not checked against its text or code here (its pretraining code is not released): override
them when you know better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numba
import numpy as np
import pandas as pd
from scipy import special

from scfm.encodings.rng import GOLDEN, bits_at, mix64_one, purpose_key, uniform
from scfm.encodings.tokens import Scattered
from scfm.errors import ScfmInputError

_HEADER_NAMES = ("gene_id", "gene_ids", "ensembl_id", "ensembl", "gene_name", "gene_symbol", "symbol", "gene")
_FIXED_SEED = 0x5CF0_C0DE  # cells encoded without seeds get ``_FIXED_SEED + position in the block``
# purposes of the counter-based draws (module docstring, "Randomness"); the bin encoding uses others
DOWNSAMPLE, THIN, MASK, ZERO = 11, 12, 13, 14
_SMALL_COUNT = 16  # counts up to this invert through a per-(γ, c) table of F and S; above, by bdtr / bdtrc
_LOOKUP = 64  # counts below this normalise through a per-cell table of log1p values
_LOOKUP_COUNTS = np.arange(_LOOKUP, dtype=np.float64)
_ZERO_SD, _ZERO_SLACK = 3.0, 8  # zero-mask picks made room for: mean + _ZERO_SD sd + _ZERO_SLACK per cell (tests
# shrink them: the room only changes speed)


def _small_cdf_table(rates: np.ndarray) -> np.ndarray:
    """``F(k)`` then ``−S(k)`` per rate, for ``c <= _SMALL_COUNT`` and ``k < c``: flat ``[2, len(rates), c, k]``,
    each a sum of ``C(c, i) γ^i (1 − γ)^(c − i)`` over ``i <= k`` (F) or ``i > k`` (S: accurate near 1); entries
    with ``k >= c`` are never read (``Q <= c``)."""
    k = np.arange(_SMALL_COUNT + 1)
    gp = rates[:, None] ** k  # γ^i
    hp = (1.0 - rates)[:, None] ** k  # (1 − γ)^j
    pmf = _BINOM_COEF * gp[:, None, :] * hp[:, _C_MINUS_K]  # [rate, c, i]
    out = np.empty((2, len(rates), _SMALL_COUNT + 1, _SMALL_COUNT))
    np.cumsum(pmf[:, :, :-1], axis=2, out=out[0])
    np.cumsum(pmf[:, :, :0:-1], axis=2, out=out[1][:, :, ::-1])  # S(k) = Σ_{i > k}
    np.negative(out[1], out=out[1])
    return out.reshape(-1)


_K = np.arange(_SMALL_COUNT + 1)
_BINOM_COEF = special.comb(_K[:, None], _K[None, :], exact=False) * (_K[None, :] <= _K[:, None])  # C(c, i)
_C_MINUS_K = np.maximum(_K[:, None] - _K[None, :], 0)  # (1 − γ)'s power c − i (0 where i > c: pmf 0 there)


def binomial_quantile(u: np.ndarray, c: np.ndarray, group: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """``Q(u; c, γ) = min{k : F(k) > u}``, ``F`` the Binomial(c, γ) CDF, ``γ = rates[group]``, elementwise; int64.

    ``u`` in [0, 1), ``0 <= c < 2³¹`` integers, ``rates`` in [0, 1] (one per group, e.g. per cell). ``F(k) > u`` is
    evaluated as written for ``u < 1/2`` and as ``S(k) < 1 − u`` (``S = 1 − F``, exact ``1 − u``) above, so both
    tails are resolved to float64's relative precision. Counts <= ``_SMALL_COUNT`` compare with a table of ``F``
    and ``S`` per (rate, c), stepping k up from 0 (a compiled loop; most stop within a few steps); larger
    counts use ``scipy.special.bdtr`` / ``bdtrc`` around a Cornish-Fisher guess (``_large_quantile``)."""
    u = np.asarray(u, dtype=np.float64)
    c = np.asarray(c, dtype=np.int64)
    group = np.asarray(group, dtype=np.int64)
    rates = np.asarray(rates, dtype=np.float64)
    out = np.zeros(len(c), dtype=np.int64)
    small = c <= _SMALL_COUNT
    if small.any():
        _small_quantiles(u, c, group, _small_cdf_table(rates), len(rates), out)
    large = np.flatnonzero(~small)
    if len(large):
        g = rates[group[large]]
        out[large] = np.where(g >= 1.0, c[large], 0)
        large = large[(g > 0.0) & (g < 1.0) & (u[large] > 0.0)]  # u = 0: F(0) > 0, so Q = 0
        out[large] = _large_quantile(u[large], c[large], rates[group[large]])
    return out


@numba.njit(cache=True, nogil=True)
def _small_quantiles(u: np.ndarray, c: np.ndarray, group: np.ndarray, table: np.ndarray, n_rates: int,
                     out: np.ndarray) -> None:
    """``Q`` into ``out`` for the entries with ``c <= _SMALL_COUNT``: the first k whose ``F(k) > u`` in the entry's row
    of ``_small_cdf_table``, at most c."""
    for e in range(len(c)):
        if c[e] > _SMALL_COUNT:
            continue
        upper = u[e] >= 0.5
        w = u[e] - 1.0 if upper else u[e]  # upper tail: F(k) <= u  <=>  −S(k) <= u − 1 (exact)
        at = ((upper * n_rates + group[e]) * (_SMALL_COUNT + 1) + c[e]) * _SMALL_COUNT  # row of (tail, γ, c)
        k = 0
        while k < c[e] and w >= table[at + k]:  # Q <= c: the row holds k < _SMALL_COUNT only
            k += 1
        out[e] = k


def _guess(u: np.ndarray, n: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Cornish-Fisher guess of the Binomial(n, γ) quantile (int64, in [0, n])."""
    mean = n * g
    sd = np.sqrt(mean * (1.0 - g))
    z = special.ndtri(np.clip(u, 2.0**-53, 1.0 - 2.0**-53))
    return np.clip(np.floor(mean + sd * z + (z * z - 1.0) * (1.0 - 2.0 * g) / 6.0 + 0.5), 0, n).astype(np.int64)


def _large_quantile(u: np.ndarray, n: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``Q`` for ``0 < u < 1``, ``0 < γ < 1``: the smallest k with ``F(k) > u`` by bdtr / bdtrc. ``F`` at four points
    around the guess settles almost every entry with one call per tail; the rest bracket and bisect."""
    upper = u >= 0.5
    v = np.where(upper, 1.0 - u, u)
    k = _guess(u, n, g)
    ks = k + np.array([[-2], [-1], [0], [1]])
    kk = np.clip(ks, 0, n)
    above = np.empty(ks.shape, dtype=bool)  # F(k − 2), …, F(k + 1) > u
    lo, hi = np.flatnonzero(~upper), np.flatnonzero(upper)
    above[:, lo] = special.bdtr(kk[:, lo], n[lo], g[lo]) > v[lo]
    above[:, hi] = special.bdtrc(kk[:, hi], n[hi], g[hi]) < v[hi]
    above = (above | (ks >= n)) & (ks >= 0)
    out = k - 1 + (~above[1:]).sum(0)  # Q = k − 1 + #{j in k − 1 … k + 1 : F(j) <= u} when F(k − 2) <= u < F(k + 1)
    rest = np.flatnonzero(above[0] | ~above[3])  # Q < k − 1 or Q > k + 1
    if len(rest):
        out[rest] = _search_quantile(u[rest], n[rest], g[rest])
    return out


def _search_quantile(u: np.ndarray, n: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``_large_quantile`` by galloping from the guess until ``F(lo) <= u < F(hi)``, then bisection."""
    upper = u >= 0.5
    v = np.where(upper, 1.0 - u, u)

    def above(k: np.ndarray, sel: np.ndarray) -> np.ndarray:  # F(k) > u, for entries sel (F(−1) = 0, F(n) = 1)
        ns, gs, vs = n[sel], g[sel], v[sel]
        kk = np.clip(k, 0, ns)
        res = np.where(upper[sel], special.bdtrc(kk, ns, gs) < vs, special.bdtr(kk, ns, gs) > vs)
        return (res | (k >= ns)) & (k >= 0)

    k = _guess(u, n, g)
    everyone = np.arange(len(u))
    a = above(k, everyone)
    lo, hi = np.where(a, k - 1, k), np.where(a, k, k + 1)  # to verify: F(lo) <= u if a, else F(hi) > u
    todo, step = everyone, 1
    while len(todo):  # gallop outwards until the bracket F(lo) <= u < F(hi) holds
        at = a[todo]
        probe = np.where(at, lo[todo], hi[todo])
        ok = np.where(at, probe < 0, False)
        check = np.flatnonzero(~ok)
        r = above(probe[check], todo[check])
        ok[check] = np.where(at[check], ~r, r)
        bad = todo[~ok]
        step *= 2
        down = bad[a[bad]]
        hi[down], lo[down] = lo[down], np.maximum(lo[down] - step, -1)
        upw = bad[~a[bad]]
        lo[upw], hi[upw] = hi[upw], np.minimum(hi[upw] + step, n[upw])
        todo = bad
    todo = np.flatnonzero(hi - lo > 1)
    while len(todo):  # bisect
        mid = (lo[todo] + hi[todo]) // 2
        r = above(mid, todo)
        hi[todo[r]], lo[todo[~r]] = mid[r], mid[~r]
        todo = todo[hi[todo] - lo[todo] > 1]
    return hi


def _zero_draws(n_genes: int, p: float) -> int:
    """Zero-mask picks per cell to make room for at first (the count only changes speed, never the draws)."""
    mean = n_genes * p
    return max(1, int(mean + _ZERO_SD * np.sqrt(mean * (1.0 - p)) + _ZERO_SLACK))


def zero_mask_columns(keys: np.ndarray, n_genes: int, p: float) -> np.ndarray:
    """Columns drawn for zero masking, as ``cell × n_genes + column`` sorted (module docstring, ``ZERO``);
    ``keys`` are the cells' ``ZERO`` purpose keys."""
    n = len(keys)
    if p <= 0.0 or n == 0 or n_genes == 0:
        return np.zeros(0, dtype=np.int64)
    if p >= 1.0:
        return np.arange(n * n_genes, dtype=np.int64)
    return _zero_picks(np.asarray(keys, dtype=np.uint64), n_genes, math.log1p(-p), n * _zero_draws(n_genes, p))


@numba.njit(cache=True, nogil=True)
def _zero_picks(keys: np.ndarray, n_genes: int, denom: float, room: int) -> np.ndarray:
    """``zero_mask_columns`` for ``0 < p < 1`` (``denom = log1p(−p)``; ``room``: first guess of the count)."""
    out = np.empty(max(room, 16), dtype=np.int64)
    m = 0
    for c in range(len(keys)):
        z = keys[c]
        x = -1.0
        while True:  # x_i = x_{i−1} + floor(log(1 − u(i)) / log1p(−p)) + 1, u(i) from output i
            z += np.uint64(GOLDEN)
            u = np.float64(mix64_one(z) >> np.uint64(11)) * 2.0**-53
            x += np.floor(math.log(1.0 - u) / denom) + 1.0  # float: a tiny p gives a gap past every column, or inf
            if x >= n_genes:
                break
            if m == len(out):
                out = np.concatenate((out, np.empty(len(out), dtype=np.int64)))
            out[m] = c * n_genes + np.int64(x)
            m += 1
    return out[:m]


def read_gene_list(path: str | Path) -> list[str]:
    """Gene ids from a text file (one per line) or a TSV/CSV whose header names the column (gene_id, symbol …;
    else the first column is used)."""
    path = Path(path)
    if not path.is_file():
        raise ScfmInputError("gene list file not found", where=str(path),
                             fix="give encoding.gene_list=<text/TSV file of gene ids>, or null for the whole "
                                 "corpus vocabulary")
    sep = "," if path.suffix == ".csv" else "\t"
    df = pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False, comment="#")
    if df.empty:
        raise ScfmInputError("gene list is empty", where=str(path))
    first = [str(x).strip().lower() for x in df.iloc[0]]
    col = 0
    if any(x in _HEADER_NAMES or x == "index" for x in first):
        named = [i for i, x in enumerate(first) if x in _HEADER_NAMES]
        col = named[0] if named else 0
        df = df.iloc[1:]
    genes = [str(g).strip() for g in df.iloc[:, col] if str(g).strip()]
    dup = pd.Index(genes)[pd.Index(genes).duplicated()]
    if len(dup):
        raise ScfmInputError(f"gene list has {len(dup)} duplicated genes, e.g. {list(dup[:5])}", where=str(path),
                             fix="list each gene once")
    return genes


def gene_list_tokens(genes: list[str], vocab, where: str) -> np.ndarray:
    """Token id of each listed gene: by the vocabulary's key (Ensembl id), else by unique symbol. Every gene
    must be in the vocabulary (see ``ContinuousEncoding``)."""
    tokens = vocab.lookup(genes)
    missing = tokens < 0
    if missing.any():  # scFoundation's list is keyed by symbol; try the vocabulary's symbols
        symbols = pd.Series(vocab.gene_token_ids(), index=pd.Index([str(s) for s in vocab.symbols]))
        symbols = symbols[~symbols.index.duplicated(keep=False) & (symbols.index != "None")]
        by_symbol = symbols.reindex([genes[i] for i in np.flatnonzero(missing)]).to_numpy()
        found = ~np.isnan(by_symbol)
        tokens[np.flatnonzero(missing)[found]] = by_symbol[found].astype(np.int64)
        missing = tokens < 0
    if missing.any():
        examples = [genes[i] for i in np.flatnonzero(missing)[:5]]
        raise ScfmInputError(
            f"{int(missing.sum()):,} of {len(genes):,} genes of the gene list are not in the corpus vocabulary "
            f"(e.g. {examples}); every listed gene needs a token id, even genes the data never measures",
            where=where,
            fix="prepare the corpus with a vocabulary that contains the whole list (scfm-prepare vocab=<vocab.tsv "
                "built from the list>): genes absent from the data then stay at value 0; or remove them from the list")
    if len(np.unique(tokens)) != len(tokens):
        raise ScfmInputError("several genes of the gene list map to the same token", where=where,
                             fix="list each gene once (Ensembl ids without version suffixes)")
    return tokens


@dataclass
class Sample:
    """The random draws of a block (``ContinuousEncoding.sample``). Sparse entries are the block's non-zero raw
    counts over the gene list, sorted by (cell, token id); per-cell arrays have one value per cell."""

    cell: np.ndarray  # per entry: the cell
    column: np.ndarray  # per entry: position in the gene list
    counts: np.ndarray  # per entry: raw count c (> 0)
    thinned: np.ndarray  # per entry: down-sampled count c' (<= c; == c when the cell is not down-sampled)
    masked: np.ndarray  # per entry: masked, for entries with c' > 0 (False where c' == 0)
    zero_draws: np.ndarray  # cell * n_genes + column drawn for zero masking (masked where c' == 0)
    bounds: np.ndarray  # [n + 1]: cell i's entries are [bounds[i], bounds[i + 1])
    raw_in: np.ndarray  # per cell: Σc over the gene list
    thinned_in: np.ndarray  # per cell: Σc' over the gene list
    raw_total: np.ndarray  # per cell: raw total over all input genes (T = log10)
    input_total: np.ndarray  # per cell: down-sampled total over all input genes (S = log10)
    downsampled: np.ndarray  # per cell: bool
    rate: np.ndarray  # per cell: γ (1.0 when not down-sampled)


@dataclass
class ContinuousEncoding:
    """Encoding ``continuous`` (scFoundation / xTrimoGene); see the module docstring for every definition.

    ``gene_list``: None = every gene token of the corpus vocabulary, in token order; else a text/TSV file of
    gene ids (Ensembl ids, or symbols matched to the vocabulary's symbols), e.g. scFoundation's 19,264 genes.
    Every listed gene must be in the corpus vocabulary (else ``ScfmInputError`` with the fix): a gene the data
    never measures is a position whose value is always 0, and it still needs a token id for its embedding.
    ``max_genes``: None = the whole list; else keep the ``max_genes`` genes of the list expressed in the most cells
    (the corpus's ``gene_stats`` ``n_nonzero``; ties by token id), in list order (``scale=tiny`` uses it).
    """

    gene_list: str | None = None
    target_sum: float = 1e4  # scFoundation: log1p(count / total × 10^4)
    log1p: bool = True
    downsample_prob: float = 0.5  # RDA: fraction of eligible cells that are down-sampled
    downsample_min_total: int = 1000  # RDA: cells with fewer raw counts are never down-sampled
    beta_a: float = 2.0  # RDA: γ ~ Beta(beta_a, beta_b)
    beta_b: float = 2.0
    mask_nonzero: float = 0.3  # value-regression masking of expressed genes (scFoundation: 30%)
    mask_zero: float = 0.03  # masking of zero genes
    depth_tokens: bool = True  # append T and S
    max_genes: int | None = None  # keep the N most often expressed genes of the list (small runs); None = all
    kind: ClassVar[str] = "continuous"  # what objectives and architectures declare they read

    def __post_init__(self) -> None:
        for key in ("downsample_prob", "mask_nonzero", "mask_zero"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ScfmInputError(f"encoding.{key}={getattr(self, key)} must be in [0, 1]")
        if not (self.beta_a > 0 and self.beta_b > 0):
            raise ScfmInputError(f"encoding.beta_a={self.beta_a}, beta_b={self.beta_b} must be > 0")
        if not self.target_sum > 0:
            raise ScfmInputError(f"encoding.target_sum={self.target_sum} must be > 0")
        if self.max_genes is not None and self.max_genes < 1:
            raise ScfmInputError(f"encoding.max_genes={self.max_genes} must be >= 1 or null (every listed gene)")
        if self.downsample_min_total < 0:
            raise ScfmInputError(f"encoding.downsample_min_total={self.downsample_min_total} must be >= 0")
        self._tokens: np.ndarray | None = None

    # -- shape -----------------------------------------------------------------------------------
    @property
    def n_genes(self) -> int:
        if self._tokens is None:
            raise RuntimeError("ContinuousEncoding: call bind(corpus) first (the gene list sets the length)")
        return len(self._tokens)

    @property
    def n_specials(self) -> int:
        return 2 if self.depth_tokens else 0

    @property
    def max_len(self) -> int:
        """Every cell's length: the number of genes, + 2 depth tokens."""
        return self.n_genes + self.n_specials

    @property
    def gene_tokens(self) -> np.ndarray:
        """Token ids of the gene list, in layout order."""
        self.n_genes  # noqa: B018 - raises if unbound
        return self._tokens

    def bind(self, corpus) -> ContinuousEncoding:
        """Fix the gene list (token ids, layout order) and the token -> column map (call once, before iterating)."""
        vocab = corpus.vocab
        if self.gene_list is None:
            tokens = vocab.gene_token_ids()
        else:
            tokens = gene_list_tokens(read_gene_list(self.gene_list), vocab, where=str(self.gene_list))
        tokens = tokens.astype(np.int64)
        if self.max_genes is not None and len(tokens) > self.max_genes:
            stats = corpus.gene_stats.set_index("token_id")["n_nonzero"]
            n_nonzero = stats.reindex(tokens).fillna(0).to_numpy()
            top = np.lexsort((tokens, -n_nonzero))[: self.max_genes]  # most often expressed first, ties by token id
            tokens = tokens[np.sort(top)]  # kept in list order
        return self.bind_arrays(vocab, {"gene_list": tokens})

    def bound_arrays(self) -> dict[str, np.ndarray]:
        """What :meth:`bind` took from the corpus: ``gene_list``, the token ids of the genes in layout order."""
        return {"gene_list": self.gene_tokens}

    def bind_arrays(self, vocab, arrays: dict[str, np.ndarray]) -> ContinuousEncoding:
        """Bind to ``vocab`` with the gene list of :meth:`bound_arrays` (a model bundle's, no corpus needed)."""
        self._tokens = np.asarray(arrays["gene_list"]).astype(np.int64)
        self._column = np.full(len(vocab), -1, dtype=np.int32 if len(self._tokens) < 2**31 else np.int64)
        self._column[self._tokens] = np.arange(len(self._tokens))
        self._row_ids = np.concatenate([self._tokens, np.zeros(self.n_specials, np.int64)]).astype(np.int32)
        self._row_kind = np.concatenate([np.zeros(len(self._tokens), np.int8),
                                         np.arange(1, self.n_specials + 1, dtype=np.int8)])
        self._compile()
        return self

    def _compile(self) -> None:
        """Compile the kernels (or load them from numba's cache) here, in the process that forks the loader workers,
        which then inherit the machine code."""
        self.encode(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(2, np.int64), np.zeros(1, np.int64))
        binomial_quantile(np.zeros(1), np.ones(1, np.int64), np.zeros(1, np.int64), np.full(1, 0.5))

    def lengths(self, shard) -> np.ndarray:
        """Encoded length of every cell of a shard: always ``max_len``."""
        return np.full(len(shard.offsets) - 1, self.max_len, dtype=np.int64)

    # -- encoding --------------------------------------------------------------------------------
    def sample(self, gene_ids: np.ndarray, counts: np.ndarray, offsets: np.ndarray, totals: np.ndarray,
               cell_seeds: np.ndarray | None = None) -> Sample:
        """The random part of ``encode``, on the block's sparse entries (down-sampling and masks); see ``Sample``."""
        G = self.n_genes
        offsets = np.asarray(offsets, dtype=np.int64)
        n = len(offsets) - 1
        totals = np.asarray(totals, dtype=np.int64)
        if cell_seeds is None:
            cell_seeds = np.uint64(_FIXED_SEED) + np.arange(n, dtype=np.uint64)
        cell_seeds = np.asarray(cell_seeds, dtype=np.uint64)
        if len(totals) != n or len(cell_seeds) != n:
            raise ValueError(f"{n} cells but {len(totals)} totals and {len(cell_seeds)} seeds")

        # sparse entries over the gene list, sorted by (cell, token id) (the draws do not depend on the order)
        gene_ids, counts = np.asarray(gene_ids), np.asarray(counts)
        if len(counts) and counts.min() < 0:
            raise ScfmInputError("negative counts passed to the continuous encoding", fix="encode raw counts")
        col = self._column[gene_ids]
        keep = np.flatnonzero((col >= 0) & (counts > 0))  # (integer takes: boolean indexing is ~5x slower)
        c, col, tok = counts[keep].astype(np.int64), col[keep].astype(np.int64), gene_ids[keep].astype(np.int64)
        cell_k = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))[keep]
        key = cell_k * len(self._column) + tok
        if not (np.diff(key) > 0).all():  # corpus cells are in token order already: sort only other input
            order = np.argsort(key)
            key, c, cell_k, col, tok = key[order], c[order], cell_k[order], col[order], tok[order]
            if (np.diff(key) == 0).any():
                raise ScfmInputError("a gene appears twice in one cell", fix="give each cell's genes once (sum first)")
        bounds = np.searchsorted(cell_k, np.arange(n + 1, dtype=np.int64))
        raw_in = _cell_sums(c, bounds)  # Σc over the gene list
        if (totals < raw_in).any():
            i = int(np.argmax(totals < raw_in))
            raise ScfmInputError(f"cell {i}: total_counts {totals[i]} < its counts over the gene list {raw_in[i]}",
                                 fix="totals must count all input genes (the corpus's total_counts)")

        # the draws of the module docstring, all cells at once
        per_cell = uniform(bits_at(purpose_key(cell_seeds, DOWNSAMPLE)[:, None], np.arange(3, dtype=np.uint64)))
        down = (per_cell[:, 0] < self.downsample_prob) & (totals >= self.downsample_min_total)
        rate = np.ones(n)
        thin = c.copy()  # c'
        outside = totals - raw_in  # counts outside the gene list, thinned with the same rate
        input_total = outside.copy()
        if down.any():
            cells = np.flatnonzero(down)
            rate[cells] = special.betaincinv(self.beta_a, self.beta_b, per_cell[cells, 1])
            sel = np.flatnonzero(down[cell_k])
            keys = np.repeat(purpose_key(cell_seeds[cells], THIN), np.diff(bounds)[cells])  # entries sorted by cell
            u = np.concatenate([uniform(bits_at(keys, tok[sel])), per_cell[cells, 2]])
            group = np.cumsum(down) - 1  # cell -> its rank among the down-sampled cells
            q = binomial_quantile(u, np.concatenate([c[sel], outside[cells]]),
                                  np.concatenate([group[cell_k[sel]], np.arange(len(cells))]), rate[cells])
            thin[sel] = q[:len(sel)]
            input_total[cells] = q[len(sel):]
        p_nz = self.mask_nonzero
        if 0.0 < p_nz < 1.0:  # u < p  <=>  bits < ceil(p·2⁵³)·2¹¹ (u = (bits >> 11)·2⁻⁵³): no float conversion
            bits = bits_at(np.repeat(purpose_key(cell_seeds, MASK), np.diff(bounds)), tok)
            limit = math.ceil(p_nz * 2.0**53)
            mask_nz = bits < np.uint64(limit << 11) if limit < 2**53 else np.ones(len(c), dtype=bool)
            mask_nz &= thin > 0
        else:
            mask_nz = (thin > 0) if p_nz >= 1.0 else np.zeros(len(c), dtype=bool)
        thin_in = _cell_sums(thin, bounds) if down.any() else raw_in.copy()  # Σc' over the gene list
        input_total += thin_in
        picks = zero_mask_columns(purpose_key(cell_seeds, ZERO), G, self.mask_zero)
        return Sample(cell=cell_k, column=col, counts=c, thinned=thin, masked=mask_nz, zero_draws=picks,
                      bounds=bounds, raw_in=raw_in, thinned_in=thin_in, raw_total=totals, input_total=input_total,
                      downsampled=down, rate=rate)

    def encode(self, gene_ids: np.ndarray, counts: np.ndarray, offsets: np.ndarray, totals: np.ndarray,
               cell_seeds: np.ndarray | None = None) -> dict:
        """Encode a block of cells (CSR: cell ``i`` is ``[offsets[i], offsets[i+1])``); see the module docstring.
        The per-token outputs are ``Scattered`` (their entries that are not zero; ``np.asarray`` makes them dense)."""
        smp = self.sample(gene_ids, counts, offsets, totals, cell_seeds)
        G, L = self.n_genes, self.max_len
        n = len(smp.raw_total)
        depth_t = np.log10(np.maximum(smp.raw_total, 1)).astype(np.float32)
        depth_s = np.log10(np.maximum(smp.input_total, 1)).astype(np.float32)
        picks = smp.zero_draws
        t_idx, t_val, v_idx, v_val, m_idx = _layout(
            smp.bounds, smp.column, smp.thinned, smp.masked, self._normalise(smp.thinned, smp.thinned_in, smp.cell),
            self._normalise(smp.counts, smp.raw_in, smp.cell), picks,
            np.searchsorted(picks, np.arange(n + 1, dtype=np.int64) * G), G, L, depth_t, depth_s)
        size = n * L
        return {
            "values": Scattered(v_idx, v_val, size),
            "target_values": Scattered(t_idx, t_val, size),
            "value_mask": Scattered(m_idx, np.ones(len(m_idx), dtype=bool), size),
            "encoder_mask": Scattered(v_idx, np.ones(len(v_idx), dtype=bool), size),
            "rows": {"gene_ids": self._row_ids, "token_kind": self._row_kind},
            "offsets": np.arange(n + 1, dtype=np.int64) * L,
            "cell": {"raw_total": smp.raw_total.astype(np.float32), "input_total": smp.input_total.astype(np.float32),
                     "downsampled": smp.downsampled, "rate": smp.rate.astype(np.float32)},
        }

    def _normalise(self, counts: np.ndarray, totals: np.ndarray, cell: np.ndarray) -> np.ndarray:
        """``log1p(count × (target_sum / total))`` (``totals`` per cell, ``cell`` per entry) in float64, as float32.

        Counts below ``_LOOKUP`` are looked up in a per-cell table of the same expression (one ``log1p`` per
        (cell, count) instead of per entry: identical values, ~3x faster on typical cells)."""
        scale = float(self.target_sum) / np.maximum(totals, 1).astype(np.float64)
        if not self.log1p:
            return (counts * scale[cell]).astype(np.float32)
        table = np.log1p(scale[:, None] * _LOOKUP_COUNTS).astype(np.float32)  # [cell, count]
        small = counts < _LOOKUP
        at = cell * _LOOKUP + np.where(small, counts, 0)
        x = table.reshape(-1)[at]
        big = np.flatnonzero(~small)
        if len(big):
            x[big] = np.log1p(counts[big] * scale[cell[big]]).astype(np.float32)
        return x


def _cell_sums(x: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Per-cell sums of per-entry integers (cell ``i``'s entries are ``[bounds[i], bounds[i + 1])``)."""
    csum = np.zeros(len(x) + 1, dtype=np.int64)
    np.cumsum(x, out=csum[1:])
    return csum[bounds[1:]] - csum[bounds[:-1]]


@numba.njit(cache=True, nogil=True)
def _layout(bounds: np.ndarray, column: np.ndarray, thinned: np.ndarray, masked: np.ndarray, x: np.ndarray,
            y: np.ndarray, picks: np.ndarray, pick_bounds: np.ndarray, n_genes: int, length: int,
            depth_t: np.ndarray, depth_s: np.ndarray) -> tuple[np.ndarray, ...]:
    """A block's outputs as their entries that are not zero, grouped by cell (``Scattered``): token positions and
    values of ``target_values``, of ``values`` (``encoder_mask`` is True at the same positions), and the positions of
    ``value_mask``. Cell ``i``'s entries are ``bounds[i]:bounds[i + 1]`` (raw count > 0; ``x`` / ``y`` their input
    / target values), its tokens ``i·length + column``, then T and S at ``i·length + n_genes`` and ``+ 1``; its
    zero-mask picks are ``picks[pick_bounds[i]:pick_bounds[i + 1]]`` (``i·n_genes + column``)."""
    n = len(bounds) - 1
    specials = 2 if length > n_genes else 0
    t_idx = np.empty(bounds[n] + specials * n, dtype=np.int64)
    t_val = np.empty(len(t_idx), dtype=np.float32)
    v_idx = np.empty(len(t_idx), dtype=np.int64)
    v_val = np.empty(len(t_idx), dtype=np.float32)
    m_idx = np.empty(bounds[n] + len(picks), dtype=np.int64)
    expressed = np.zeros(n_genes, dtype=np.bool_)  # columns of the cell with c' > 0
    a = b = m = 0
    for i in range(n):
        first = i * length
        for e in range(bounds[i], bounds[i + 1]):
            at = first + column[e]
            t_idx[a], t_val[a] = at, y[e]
            a += 1
            if thinned[e] > 0:
                expressed[column[e]] = True
                if masked[e]:
                    m_idx[m] = at
                    m += 1
                else:
                    v_idx[b], v_val[b] = at, x[e]
                    b += 1
        if specials:  # T and S: the target row is the raw cell, so its S is T
            for k in range(2):
                t_idx[a + k] = v_idx[b + k] = first + n_genes + k
                t_val[a + k] = depth_t[i]
            v_val[b], v_val[b + 1] = depth_t[i], depth_s[i]
            a, b = a + 2, b + 2
        for j in range(pick_bounds[i], pick_bounds[i + 1]):  # zero masking: drawn columns with c' == 0
            col = picks[j] - i * n_genes
            if not expressed[col]:
                m_idx[m] = first + col
                m += 1
        for e in range(bounds[i], bounds[i + 1]):
            expressed[column[e]] = False
    return t_idx[:a], t_val[:a], v_idx[:b], v_val[:b], m_idx[:m]
