"""scFoundation continuous encoding: a gene-by-gene reference on real cells, its invariants, its statistics
(seeded, so they cannot flake) and its run through ``CellStream``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from scfm.data.batching import Batching
from scfm.data.datamodule import CellDataModule
from scfm.data.stream import CellStream
from scfm.data.vocab import SPECIAL_TOKENS, Vocab
from scfm.encodings import continuous
from scfm.encodings.continuous import DOWNSAMPLE, MASK, THIN, ZERO, ContinuousEncoding, binomial_quantile
from scfm.encodings.rng import GOLDEN, mix64_reference, purpose_key_reference, splitmix64_reference
from scfm.errors import ScfmInputError

CONF = Path(__file__).resolve().parents[1] / "conf" / "encoding" / "continuous.yaml"


# ----------------------------------------------------------------------------------------------
# helpers: the plain per-cell reference of the module docstring's draws
# ----------------------------------------------------------------------------------------------
def u_at(seed: int, purpose: int, i: int) -> float:
    """``u_P(i)``: output ``i`` of SplitMix64 from ``purpose_key(seed, P)``, top 53 bits as a float in [0, 1)."""
    key = purpose_key_reference(seed, purpose)
    return (mix64_reference((key + (i + 1) * GOLDEN) % 2**64) >> 11) * 2.0**-53


def quantile_ref(u: float, c: int, rate: float) -> int:
    """``min{k : F(k) > u}``, F the Binomial(c, rate) CDF, by bisection; ``F(k) > u`` is scipy's
    ``bdtr(k) > u`` for u < 1/2 and ``bdtrc(k) < 1 − u`` above (the upper tail to full precision)."""
    if c == 0 or rate <= 0.0 or u == 0.0:
        return c if rate >= 1.0 else 0
    if rate >= 1.0:
        return c
    lo, hi = -1, c  # F(lo) <= u < F(hi) (F(−1) = 0, F(c) = 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cdf_above(mid, c, rate, u) else (mid, hi)
    return hi


def cdf_above(k: int, c: int, rate: float, u: float) -> bool:
    """``F(k) > u``: ``bdtr(k) > u`` for u < 1/2, ``bdtrc(k) < 1 − u`` above."""
    return special.bdtr(k, c, rate) > u if u < 0.5 else special.bdtrc(k, c, rate) < 1.0 - u


def zero_columns_ref(seed: int, n_genes: int, p: float) -> list[int]:
    """Columns drawn for zero masking: geometric gaps, one per output of ``ZERO``, until past the last column."""
    if p <= 0.0:
        return []
    if p >= 1.0:
        return list(range(n_genes))
    cols, x, i = [], -1, 0
    while True:
        x += math.floor(math.log(1.0 - u_at(seed, ZERO, i)) / math.log1p(-p)) + 1
        i += 1
        if x >= n_genes:
            return cols
        cols.append(x)


def reference(enc: ContinuousEncoding, gene_ids, counts, total: int, seed: int) -> dict:
    """One cell, gene by gene, with scalar draws (plain Python + scipy), from the documented definition."""
    tokens = enc.gene_tokens.tolist()
    G = len(tokens)
    column = {t: j for j, t in enumerate(tokens)}
    c = np.zeros(G, dtype=np.int64)
    for g, n in zip(np.asarray(gene_ids).tolist(), np.asarray(counts).tolist()):
        if g in column and n > 0:
            c[column[g]] = n
    thin, outside, rate = c.copy(), total - int(c.sum()), 1.0
    down = u_at(seed, DOWNSAMPLE, 0) < enc.downsample_prob and total >= enc.downsample_min_total
    if down:
        rate = float(special.betaincinv(enc.beta_a, enc.beta_b, u_at(seed, DOWNSAMPLE, 1)))
        for j in np.flatnonzero(c):
            thin[j] = quantile_ref(u_at(seed, THIN, tokens[j]), int(c[j]), rate)
        outside = quantile_ref(u_at(seed, DOWNSAMPLE, 2), outside, rate)
    masked = np.zeros(G + 2, dtype=bool)
    for j in np.flatnonzero(thin):
        masked[j] = u_at(seed, MASK, tokens[j]) < enc.mask_nonzero
    for j in zero_columns_ref(seed, G, enc.mask_zero):
        if thin[j] == 0:
            masked[j] = True
    values = np.zeros(G + 2, dtype=np.float32)
    target = np.zeros(G + 2, dtype=np.float32)
    for j in np.flatnonzero(thin):
        values[j] = 0.0 if masked[j] else math.log1p(thin[j] * (enc.target_sum / thin.sum()))
    for j in np.flatnonzero(c):
        target[j] = math.log1p(c[j] * (enc.target_sum / c.sum()))
    input_total = int(thin.sum()) + outside
    values[G] = target[G] = target[G + 1] = math.log10(max(total, 1))
    values[G + 1] = math.log10(max(input_total, 1))
    encoder = np.concatenate([thin > 0, [True, True]]) & ~masked
    return {"gene_ids": np.array([*tokens, 0, 0]), "values": values, "target_values": target, "value_mask": masked,
            "encoder_mask": encoder, "token_kind": np.array([0] * G + [1, 2]),
            "cell": {"raw_total": total, "input_total": input_total, "downsampled": down, "rate": rate}}


def assert_matches_reference(enc, gene_ids, counts, offsets, totals, cell_seeds) -> list[dict]:
    """Encode the block and compare every cell with ``reference``; returns the references."""
    out = enc.encode(gene_ids, counts, offsets, totals, cell_seeds=cell_seeds)
    assert set(out) == {"values", "target_values", "value_mask", "encoder_mask", "rows", "offsets", "cell"}
    assert set(out["rows"]) == {"gene_ids", "token_kind"}
    refs = []
    for i in range(len(offsets) - 1):
        lo, hi = offsets[i], offsets[i + 1]
        ref = reference(enc, gene_ids[lo:hi], counts[lo:hi], int(totals[i]), int(cell_seeds[i]))
        for key in ("gene_ids", "value_mask", "encoder_mask", "token_kind"):
            np.testing.assert_array_equal(row(out, i, key), ref[key], err_msg=f"cell {i} {key}")
        for key in ("values", "target_values"):
            np.testing.assert_allclose(row(out, i, key), ref[key], rtol=1e-6, atol=0, err_msg=f"cell {i} {key}")
        cell = ref["cell"]
        assert out["cell"]["raw_total"][i] == np.float32(cell["raw_total"])
        assert out["cell"]["input_total"][i] == np.float32(cell["input_total"]), i
        assert out["cell"]["downsampled"][i] == cell["downsampled"]
        assert out["cell"]["rate"][i] == np.float32(cell["rate"])
        refs.append(ref)
    return refs


def block(corpus, cells):
    """CSR block of the given cells of shard 0."""
    shard = corpus.shard(0)
    parts = [(np.asarray(shard.gene_ids[shard.offsets[i]:shard.offsets[i + 1]]),
              np.asarray(shard.counts[shard.offsets[i]:shard.offsets[i + 1]])) for i in cells]
    offsets = np.concatenate([[0], np.cumsum([len(g) for g, _ in parts])])
    return (np.concatenate([g for g, _ in parts]), np.concatenate([c for _, c in parts]), offsets,
            np.asarray(shard.total_counts)[list(cells)])


def dense(out, key):
    """A per-token output flat over the block's tokens (a row every cell shares, ``rows``, repeated per cell)."""
    if key in out.get("rows", {}):
        return np.tile(out["rows"][key], len(out["offsets"]) - 1)
    return np.asarray(out[key])  # Scattered -> dense


def row(out, i, key):
    lo, hi = out["offsets"][i], out["offsets"][i + 1]
    return dense(out, key)[lo:hi]


def seeds(n, seed=0):
    return np.random.default_rng(seed).integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)


class FakeCorpus:
    """Just a vocabulary: ``n`` genes after the special tokens."""

    def __init__(self, n: int) -> None:
        self.vocab = Vocab(SPECIAL_TOKENS, [f"ENSG{i:011d}" for i in range(n)], [f"GENE{i}" for i in range(n)])


def write_list(path: Path, genes, header: str | None = None) -> str:
    path.write_text((f"{header}\n" if header else "") + "\n".join(genes) + "\n")
    return str(path)


# ----------------------------------------------------------------------------------------------
# reference on real cells
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pbmc_cells(pbmc_corpus):
    """100 cells plus every cell under 1,000 counts among the first 1,000 (never down-sampled by default)."""
    totals = np.asarray(pbmc_corpus.shard(0).total_counts)
    low = [int(i) for i in np.flatnonzero(totals[:1000] < 1000)]
    return sorted(set(range(100)) | set(low))


@pytest.mark.parametrize("variant", ["default", "gene_list"])
def test_matches_reference_on_real_cells(pbmc_corpus, pbmc_cells, tmp_path, variant):
    if variant == "default":
        enc = ContinuousEncoding().bind(pbmc_corpus)
    else:  # a shuffled subset (genes outside the list count in T and S), more down-sampling and zero masking
        vocab = pbmc_corpus.vocab
        genes = list(np.random.default_rng(3).permutation(vocab.gene_ids)[:4000])
        enc = ContinuousEncoding(gene_list=write_list(tmp_path / "genes.txt", genes), downsample_prob=0.8,
                                 downsample_min_total=800, mask_nonzero=0.5, mask_zero=0.2).bind(pbmc_corpus)
        np.testing.assert_array_equal(enc.gene_tokens, vocab.lookup(genes))
    gene_ids, counts, offsets, totals = block(pbmc_corpus, pbmc_cells)
    cell_seeds = seeds(len(pbmc_cells))
    refs = assert_matches_reference(enc, gene_ids, counts, offsets, totals, cell_seeds)
    branches = {(r["cell"]["downsampled"], t >= enc.downsample_min_total) for r, t in zip(refs, totals)}
    assert branches == {(True, True), (False, True), (False, False)}  # all three paths were compared
    if variant == "gene_list":  # counts outside the list were thinned into S
        assert (enc.sample(gene_ids, counts, offsets, totals, cell_seeds).raw_in < totals).all()
    thinned = [r["cell"]["input_total"] for r, t in zip(refs, totals) if r["cell"]["downsampled"]]
    assert len(thinned) > 10 and sum(v["value_mask"].sum() for v in refs) > 0


def test_cells_encode_the_same_alone_as_in_a_block(pbmc_corpus):
    enc = ContinuousEncoding(mask_zero=0.1).bind(pbmc_corpus)
    gene_ids, counts, offsets, totals = block(pbmc_corpus, range(30))
    cell_seeds = seeds(30, 5)
    out = enc.encode(gene_ids, counts, offsets, totals, cell_seeds=cell_seeds)
    for i in [0, 7, 13, 29]:
        lo, hi = offsets[i], offsets[i + 1]
        alone = enc.encode(gene_ids[lo:hi], counts[lo:hi], np.array([0, hi - lo]), totals[i:i + 1], cell_seeds[i:i + 1])
        for key in ("values", "target_values", "value_mask", "encoder_mask", "gene_ids", "token_kind"):
            np.testing.assert_array_equal(dense(alone, key), row(out, i, key), err_msg=f"cell {i} {key}")
        for key, v in out["cell"].items():
            assert alone["cell"][key][0] == v[i]


def test_draws_are_the_documented_splitmix64_outputs():
    """``u_at`` (the tests' reading of the docstring) is output i of ``splitmix64_reference``."""
    for seed, purpose in [(0, DOWNSAMPLE), (2**64 - 1, THIN), (12345, ZERO)]:
        outs = splitmix64_reference(purpose_key_reference(seed, purpose), 40)
        assert [u_at(seed, purpose, i) for i in range(40)] == [(o >> 11) * 2.0**-53 for o in outs]


@pytest.mark.parametrize("params", [
    {},  # defaults
    {"downsample_prob": 1.0, "downsample_min_total": 0, "beta_a": 0.05, "beta_b": 20.0},  # γ near 0
    {"downsample_prob": 1.0, "downsample_min_total": 0, "beta_a": 20.0, "beta_b": 0.05},  # γ near 1
    {"downsample_prob": 1.0, "downsample_min_total": 0, "mask_nonzero": 1.0, "mask_zero": 1.0},
    {"downsample_prob": 1.0, "downsample_min_total": 0, "mask_nonzero": 0.0, "mask_zero": 0.0},
    {"downsample_prob": 1.0, "downsample_min_total": 0, "mask_nonzero": 0.5, "mask_zero": 0.002},
])
def test_matches_reference_on_edge_cases(small_encodings, params):
    """Empty cells, total 0, counts only outside the list, counts around the inversion's 16 and huge counts."""
    enc = small_encodings(True, **params)
    listed = enc.gene_tokens - len(SPECIAL_TOKENS)
    other = np.setdiff1d(np.arange(N_VOCAB), listed)
    cells = [[], [(int(listed[0]), 1)], [(int(other[0]), 5)],
             [(int(g), n) for g, n in zip(listed[:8], [1, 2, 15, 16, 17, 18, 64, 65])],
             [(int(listed[3]), 1_000_000), (int(listed[5]), 123_456), (int(listed[9]), 3)],
             [(int(g), 1 + (k * 37) % 300) for k, g in enumerate(listed)]]
    gid, cnt, offsets, totals = _csr(cells, [0, 0, 0, 40, 2_000_000, 500])
    flat_g, flat_c = np.concatenate(gid), np.concatenate(cnt)
    assert totals[0] == 0 and totals[2] == 5
    for rep in range(8):
        cell_seeds = seeds(len(cells), rep)
        refs = assert_matches_reference(enc, flat_g, flat_c, offsets, totals, cell_seeds)
        if "beta_a" in params:
            rates = np.array([r["cell"]["rate"] for r in refs])
            assert ((rates < 1e-3) | (rates > 1 - 1e-3)).any()


def test_binomial_quantile_is_the_inverse_cdf():
    rng = np.random.default_rng(0)
    rates = np.array([0.0, 1.0, 1e-300, 1e-12, 0.5, 1 - 1e-12, 1 - 2**-53, *rng.random(20)])
    c = np.concatenate([np.arange(0, 40), [64, 100, 1000, 10**6, 2**31 - 1]])
    grid_c, grid_r = np.meshgrid(c, np.arange(len(rates)))
    grid_c, grid_r = grid_c.ravel(), grid_r.ravel()
    for us in [np.zeros(len(grid_c)), np.full(len(grid_c), 1 - 2**-53), rng.random(len(grid_c))]:
        got = binomial_quantile(us, grid_c, grid_r, rates)
        small = grid_c < 2000
        ref = [quantile_ref(u, int(k), rates[g]) for u, k, g in zip(us[small], grid_c[small], grid_r[small])]
        np.testing.assert_array_equal(got[small], ref)
        for u, k, n, r in zip(us[~small], got[~small], grid_c[~small], rates[grid_r[~small]]):
            if 0 < r < 1 and u > 0:  # F(k − 1) <= u < F(k)
                assert cdf_above(k, n, r, u) and (k == 0 or not cdf_above(k - 1, n, r, u)), (u, k, n, r)
            else:
                assert k == (n if r == 1 else 0)
    # and its law: with uniform u, Binomial(c, γ) (a chi-square test per (c, γ))
    for n, r in [(1, 0.3), (5, 0.7), (16, 0.5), (17, 0.5), (300, 0.02)]:
        k = binomial_quantile(rng.random(20_000), np.full(20_000, n), np.zeros(20_000, np.int64), np.array([r]))
        observed = np.bincount(k, minlength=n + 1)
        expected = stats.binom.pmf(np.arange(n + 1), n, r) * 20_000
        keep = expected > 5
        chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
        assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-4, (n, r)


def test_large_count_search_does_not_depend_on_the_guess(monkeypatch):
    """Far from the guess, the inversion brackets and bisects: a bad guess changes nothing."""
    rng = np.random.default_rng(4)
    n = rng.integers(17, 5000, 300)
    g = np.concatenate([rng.random(297), [1e-9, 0.5, 1 - 1e-9]])
    u = np.concatenate([rng.random(297), [2.0**-53, 0.5, 1 - 2.0**-53]])
    good = continuous._large_quantile(u, n, g)
    for bad in (lambda u, n, g: np.zeros(len(n), np.int64), lambda u, n, g: n.copy(),
                lambda u, n, g: np.clip(n // 2 + rng.integers(-40, 40, len(n)), 0, n)):
        monkeypatch.setattr(continuous, "_guess", bad)
        np.testing.assert_array_equal(continuous._large_quantile(u, n, g), good)
    monkeypatch.undo()
    ref = [quantile_ref(float(a), int(b), float(r)) for a, b, r in zip(u, n, g)]
    np.testing.assert_array_equal(good, ref)


def test_kernels_stay_in_bounds_and_take_tiny_rates(tmp_path):
    """Recompiled with bounds checks and without optimisation (a fresh cache): every count kept (c = 16 = the table's
    width, the last rate's row) reads no entry past its row, and a tiny ``mask_zero`` gives an infinite first gap
    (float, not an int64 overflow) instead of a loop that never ends."""
    code = (
        "import numpy as np\n"
        "from scfm.encodings.continuous import binomial_quantile, zero_mask_columns\n"
        "rng = np.random.default_rng(0)\n"
        "c = rng.integers(0, 17, 5000); rates = np.array([0.3, 0.9999]); group = rng.integers(0, 2, 5000)\n"
        "q = binomial_quantile(rng.random(5000), c, group, rates)\n"
        "assert ((q >= 0) & (q <= c)).all()\n"
        "print(binomial_quantile(np.array([0.99]), np.array([16]), np.array([1]), rates)[0])\n"
        "print(len(zero_mask_columns(np.arange(3, dtype=np.uint64), 1000, 1e-20)))\n")
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_OPT": "0", "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["16", "0"]


def test_zero_mask_draws_do_not_depend_on_the_room_made_for_them(pbmc_corpus, monkeypatch):
    """The kernel makes room for a typical number of picks and grows its output when they are more: making room for
    almost none changes nothing."""
    keys = np.array([3, 99, 2**63 + 5], dtype=np.uint64)
    for p in [0.001, 0.03, 0.5, 0.97]:
        full = continuous.zero_mask_columns(keys, 500, p)
        monkeypatch.setattr(continuous, "_ZERO_SD", 0.0)
        monkeypatch.setattr(continuous, "_ZERO_SLACK", 0)
        assert continuous._zero_draws(500, 0.001) == 1
        np.testing.assert_array_equal(continuous.zero_mask_columns(keys, 500, p), full)
        monkeypatch.undo()
        assert (np.diff(full) > 0).all() and full.min() >= 0 and full.max() < 3 * 500


# ----------------------------------------------------------------------------------------------
# invariants on arbitrary blocks
# ----------------------------------------------------------------------------------------------
N_VOCAB = 40


@pytest.fixture(scope="module")
def small_encodings(tmp_path_factory):
    """Factory of encodings over a 40-gene vocabulary: all genes, or a shuffled 25-gene list."""
    corpus = FakeCorpus(N_VOCAB)
    listed = [corpus.vocab.gene_ids[i] for i in np.random.default_rng(0).permutation(N_VOCAB)[:25]]
    path = write_list(tmp_path_factory.mktemp("lists") / "genes.tsv", listed, header="gene_id")

    def make(subset: bool, **kw) -> ContinuousEncoding:
        return ContinuousEncoding(gene_list=path if subset else None, **kw).bind(corpus)

    return make


cells_st = st.lists(st.lists(st.tuples(st.integers(0, N_VOCAB - 1), st.integers(1, 400)), max_size=N_VOCAB,
                             unique_by=lambda t: t[0]), min_size=1, max_size=6)
params_st = st.fixed_dictionaries({
    "downsample_prob": st.sampled_from([0.0, 0.5, 1.0]), "downsample_min_total": st.integers(0, 3000),
    "beta_a": st.sampled_from([0.5, 2.0, 5.0]), "beta_b": st.sampled_from([0.5, 2.0, 5.0]),
    "mask_nonzero": st.floats(0, 1), "mask_zero": st.floats(0, 1)})


def _csr(cells, extra):
    gene_ids = [np.array([g for g, _ in c], dtype=np.int64) + len(SPECIAL_TOKENS) for c in cells]
    counts = [np.array([n for _, n in c], dtype=np.int64) for c in cells]
    offsets = np.concatenate([[0], np.cumsum([len(g) for g in gene_ids])])
    totals = np.array([int(c.sum()) + e for c, e in zip(counts, extra)])
    return gene_ids, counts, offsets, totals


@settings(max_examples=120, deadline=None)
@given(cells=cells_st, extra=st.lists(st.integers(0, 3000), min_size=6, max_size=6), params=params_st,
       subset=st.booleans(), seed=st.integers(0, 2**32))
def test_block_invariants(small_encodings, cells, extra, params, subset, seed):
    enc = small_encodings(subset, **params)
    G, L = enc.n_genes, enc.max_len
    gid, cnt, offsets, totals = _csr(cells, extra)
    n = len(cells)
    flat_g, flat_c = np.concatenate(gid), np.concatenate(cnt)
    cell_seeds = seeds(n, seed)
    smp = enc.sample(flat_g, flat_c, offsets, totals, cell_seeds)
    out = enc.encode(flat_g, flat_c, offsets, totals, cell_seeds)

    # down-sampling
    assert (smp.thinned <= smp.counts).all() and (smp.thinned >= 0).all()
    eligible = totals >= enc.downsample_min_total
    assert not (smp.downsampled & ~eligible).any()
    if enc.downsample_prob == 0:
        assert not smp.downsampled.any()
    if enc.downsample_prob == 1:
        assert (smp.downsampled == eligible).all()
    kept = ~smp.downsampled[smp.cell]
    np.testing.assert_array_equal(smp.thinned[kept], smp.counts[kept])
    assert (smp.rate[~smp.downsampled] == 1).all() and ((smp.rate > 0) & (smp.rate < 1))[smp.downsampled].all()
    outside = smp.input_total - smp.thinned_in
    assert ((outside >= 0) & (outside <= smp.raw_total - smp.raw_in)).all()

    # layout
    np.testing.assert_array_equal(out["offsets"], np.arange(n + 1) * L)
    assert L == G + 2
    kind = dense(out, "token_kind").reshape(n, L)
    assert (kind[:, :G] == 0).all() and (kind[:, G] == 1).all() and (kind[:, G + 1] == 2).all()
    ids = dense(out, "gene_ids").reshape(n, L)
    assert (ids[:, :G] == enc.gene_tokens).all() and (ids[:, G:] == 0).all()

    # depth tokens: T = log10 raw total >= S = log10 down-sampled total, equal when not down-sampled
    values, target = dense(out, "values").reshape(n, L), dense(out, "target_values").reshape(n, L)
    T, S = values[:, G], values[:, G + 1]
    np.testing.assert_allclose(T, np.log10(np.maximum(totals, 1)), rtol=1e-6)
    np.testing.assert_allclose(S, np.log10(np.maximum(smp.input_total, 1)), rtol=1e-6)
    assert (T >= S).all()
    assert (T[~smp.downsampled] == S[~smp.downsampled]).all()
    np.testing.assert_array_equal(out["cell"]["downsampled"], smp.downsampled)

    # masks: T/S never masked and always seen; encoder = c' > 0 and not masked; masked values are 0
    vmask, emask = dense(out, "value_mask").reshape(n, L), dense(out, "encoder_mask").reshape(n, L)
    assert not vmask[:, G:].any() and emask[:, G:].all()
    thin = np.zeros((n, G), dtype=np.int64)
    thin[smp.cell, smp.column] = smp.thinned
    np.testing.assert_array_equal(emask[:, :G], (thin > 0) & ~vmask[:, :G])
    assert (values[vmask] == 0).all() and (values[:, :G][emask[:, :G]] > 0).all()
    np.testing.assert_array_equal(vmask[smp.cell, smp.column][smp.thinned > 0], smp.masked[smp.thinned > 0])
    drawn = np.zeros(n * G, dtype=bool)
    drawn[smp.zero_draws] = True
    np.testing.assert_array_equal(vmask[:, :G] & (thin == 0), drawn.reshape(n, G) & (thin == 0))
    if enc.mask_nonzero == 0 and enc.mask_zero == 0:
        assert not vmask.any()

    # target: log1p of the raw counts, whatever the masking or the down-sampling
    raw = np.zeros((n, G), dtype=np.int64)
    raw[smp.cell, smp.column] = smp.counts
    expected = np.log1p(raw * (enc.target_sum / np.maximum(raw.sum(1, keepdims=True), 1))).astype(np.float32)
    np.testing.assert_allclose(target[:, :G], expected, rtol=1e-6)
    assert (target[:, G] == T).all() and (target[:, G + 1] == T).all()  # the target row is the raw cell
    plain = small_encodings(subset, downsample_prob=0.0, mask_nonzero=0.0, mask_zero=0.0)
    np.testing.assert_array_equal(plain.encode(flat_g, flat_c, offsets, totals, cell_seeds)["target_values"],
                                  out["target_values"])

    # deterministic, and invariant to the order of a cell's genes
    again = enc.encode(flat_g, flat_c, offsets, totals, cell_seeds)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(len(g)) for g in gid]
    shuffled = enc.encode(np.concatenate([g[p] for g, p in zip(gid, perms)]),
                          np.concatenate([c[p] for c, p in zip(cnt, perms)]), offsets, totals, cell_seeds)
    for other in (again, shuffled):
        for key in ("values", "target_values", "value_mask", "encoder_mask", "gene_ids", "token_kind"):
            np.testing.assert_array_equal(dense(other, key), dense(out, key))
        for key, v in out["cell"].items():
            np.testing.assert_array_equal(other["cell"][key], v)
    # a cell encodes the same alone as in the block
    alone = enc.encode(gid[-1], cnt[-1], np.array([0, len(gid[-1])]), totals[-1:], cell_seeds[-1:])
    np.testing.assert_array_equal(alone["values"], out["values"][(n - 1) * L:])


def test_seeds_drive_all_randomness(pbmc_corpus):
    enc = ContinuousEncoding().bind(pbmc_corpus)
    args = block(pbmc_corpus, range(40))
    a = enc.encode(*args, cell_seeds=seeds(40, 1))
    b = enc.encode(*args, cell_seeds=seeds(40, 1))
    c = enc.encode(*args, cell_seeds=seeds(40, 2))
    for key in ("values", "value_mask", "encoder_mask"):
        np.testing.assert_array_equal(a[key], b[key])
        assert not np.array_equal(a[key], c[key])
    np.testing.assert_array_equal(a["target_values"], c["target_values"])
    fixed = enc.encode(*args)  # no seeds: a fixed seed per position in the block
    np.testing.assert_array_equal(fixed["values"], enc.encode(*args)["values"])


def test_neighbouring_seeds_give_unrelated_draws(small_encodings):
    """Stream seeds are ``epoch_key ^ cell_index``: neighbouring seeds, and the purposes and genes of one seed,
    must give unrelated draws."""
    enc = small_encodings(False, downsample_prob=1.0, downsample_min_total=0, mask_nonzero=0.5)
    n = 4000
    cell_seeds = np.uint64(0x1234_5678_9ABC_DEF0) ^ np.arange(n, dtype=np.uint64)
    gid = np.tile(np.array([4, 5]), n)
    cnt = np.full(2 * n, 1000)
    smp = enc.sample(gid, cnt, np.arange(n + 1) * 2, np.full(n, 2000), cell_seeds)
    rate = smp.rate
    assert stats.kstest(rate, "beta", args=(2.0, 2.0)).pvalue > 1e-3
    thin = smp.thinned.reshape(n, 2)
    z = (thin - 1000 * rate[:, None]) / np.sqrt(1000 * rate * (1 - rate))[:, None]  # ~N(0, 1) given γ
    mask = smp.masked.reshape(n, 2).astype(float)
    bound = 4 / np.sqrt(n)
    for a, b in [(rate[:-1], rate[1:]), (z[:, 0], z[:, 1]), (z[:-1, 0], z[1:, 0]), (rate, z[:, 0]),
                 (mask[:, 0], mask[:, 1]), (mask[:-1, 0], mask[1:, 0]), (mask[:, 0], z[:, 0])]:
        assert abs(np.corrcoef(a, b)[0, 1]) < bound
    assert abs(mask.mean() - 0.5) < 4 * np.sqrt(0.25 / mask.size)


def test_lengths_equal_encoded_lengths(pbmc_corpus):
    enc = ContinuousEncoding().bind(pbmc_corpus)
    shard = pbmc_corpus.shard(0)
    lengths = enc.lengths(shard)
    assert len(lengths) == shard.n_cells and (lengths == 16_634 + 2).all() and enc.max_len == 16_636
    out = enc.encode(*block(pbmc_corpus, range(25)))
    np.testing.assert_array_equal(np.diff(out["offsets"]), lengths[:25])
    assert all(len(v) == out["offsets"][-1] for k, v in out.items() if k not in ("offsets", "cell", "rows"))
    assert all(len(v) == enc.max_len for v in out["rows"].values())
    no_depth = ContinuousEncoding(depth_tokens=False).bind(pbmc_corpus)
    assert no_depth.max_len == 16_634 and (no_depth.lengths(shard) == 16_634).all()
    assert not (no_depth.encode(*block(pbmc_corpus, range(3)))["rows"]["token_kind"]).any()


# ----------------------------------------------------------------------------------------------
# statistics (fixed seeds: deterministic; bounds are ~4 standard errors, so a wrong rate fails)
# ----------------------------------------------------------------------------------------------
def _z(observed_sum: float, expected_sum: float, variance_sum: float) -> float:
    return (observed_sum - expected_sum) / math.sqrt(variance_sum)


@pytest.mark.parametrize(("a", "b"), [(2.0, 2.0), (2.0, 5.0)])
def test_rates_follow_beta_and_thinning_follows_rates(pbmc_corpus, tmp_path, a, b):
    genes = list(np.random.default_rng(1).permutation(pbmc_corpus.vocab.gene_ids)[:8000])
    enc = ContinuousEncoding(gene_list=write_list(tmp_path / "g.txt", genes), downsample_prob=1.0,
                             downsample_min_total=0, beta_a=a, beta_b=b).bind(pbmc_corpus)
    args = block(pbmc_corpus, range(500))
    smp = [enc.sample(*args, cell_seeds=seeds(500, rep)) for rep in range(4)]
    rate = np.concatenate([s.rate for s in smp])
    assert np.concatenate([s.downsampled for s in smp]).all()
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert abs(_z(rate.sum(), len(rate) * mean, len(rate) * var)) < 4
    assert stats.kstest(rate, "beta", args=(a, b)).pvalue > 1e-3
    # Σc' | γ ~ Binomial(Σc, γ), in the list and outside it
    for got, of in [(np.concatenate([s.thinned_in for s in smp]), np.concatenate([s.raw_in for s in smp])),
                    (np.concatenate([s.input_total - s.thinned_in for s in smp]),
                     np.concatenate([s.raw_total - s.raw_in for s in smp]))]:
        assert (of > 0).all()
        assert abs(_z(got.sum(), (of * rate).sum(), (of * rate * (1 - rate)).sum())) < 4
        sd = np.sqrt(of * rate * (1 - rate))
        assert (np.abs(got - of * rate) < 6 * sd + 1).all()
        ratio = got / of
        assert abs(np.mean(ratio - rate)) < 4 * np.sqrt(np.mean(rate * (1 - rate) / of) / len(rate))


def test_downsampling_fraction_and_threshold(pbmc_corpus):
    enc = ContinuousEncoding(downsample_prob=0.5, downsample_min_total=2000).bind(pbmc_corpus)
    args = block(pbmc_corpus, range(1000))
    totals = args[3]
    eligible = totals >= 2000
    assert 200 < eligible.sum() < 800
    down = np.concatenate([enc.sample(*args, cell_seeds=seeds(1000, rep)).downsampled for rep in range(3)])
    elig = np.tile(eligible, 3)
    assert not down[~elig].any()
    k, m = int(down[elig].sum()), int(elig.sum())
    assert abs(_z(k, 0.5 * m, 0.25 * m)) < 4


@pytest.mark.parametrize(("p_nz", "p_z"), [(0.3, 0.03), (0.1, 0.5)])
def test_mask_fractions(pbmc_corpus, p_nz, p_z):
    enc = ContinuousEncoding(mask_nonzero=p_nz, mask_zero=p_z).bind(pbmc_corpus)
    out = enc.encode(*block(pbmc_corpus, range(150)), cell_seeds=seeds(150, 7))
    n, L, G = 150, enc.max_len, enc.n_genes
    vmask = dense(out, "value_mask").reshape(n, L)[:, :G]
    smp = enc.sample(*block(pbmc_corpus, range(150)), cell_seeds=seeds(150, 7))
    nonzero = np.zeros((n, G), dtype=bool)
    nonzero[smp.cell[smp.thinned > 0], smp.column[smp.thinned > 0]] = True
    for group, p in [(nonzero, p_nz), (~nonzero, p_z)]:
        k, m = int(vmask[group].sum()), int(group.sum())
        assert abs(_z(k, p * m, p * (1 - p) * m)) < 4, (k / m, p)
    assert not dense(out, "value_mask")[dense(out, "token_kind") != 0].any()


# ----------------------------------------------------------------------------------------------
# stream, config, errors
# ----------------------------------------------------------------------------------------------
def test_runs_through_cellstream_padded(pbmc_corpus):
    enc = ContinuousEncoding().bind(pbmc_corpus)

    def first_batch(epoch: int, split: str = "val"):
        s = CellStream(pbmc_corpus, enc, Batching(strategy="random", batch_size=3), split=split)
        s.set_epoch(epoch)
        return next(iter(s))

    b = first_batch(0)
    L = enc.max_len
    assert b["gene_ids"].shape == (3, L) and b["padding_mask"].all() and (b["lengths"] == L).all()
    for key in ("raw_total", "input_total", "downsampled", "rate", "cell_index"):
        assert b[key].shape == (3,)
    assert b["values"].dtype == torch.float32 and b["value_mask"].dtype == torch.bool
    assert b["encoder_mask"].dtype == torch.bool and b["token_kind"].dtype == torch.int64
    totals = np.asarray(pbmc_corpus.shard(0).total_counts)[b["cell_index"].numpy()]
    np.testing.assert_array_equal(b["raw_total"].numpy(), totals.astype(np.float32))
    assert (b["token_kind"][:, -2:] == torch.tensor([1, 2])).all()
    # same cells and epoch -> identical (exact resume); another epoch -> other draws, same targets
    again, later = first_batch(0), first_batch(1)
    assert torch.equal(again["cell_index"], b["cell_index"]) and torch.equal(later["cell_index"], b["cell_index"])
    assert torch.equal(again["values"], b["values"]) and torch.equal(again["value_mask"], b["value_mask"])
    assert not torch.equal(later["value_mask"], b["value_mask"])
    assert torch.equal(later["target_values"], b["target_values"])
    # gene_ids, token_kind, positions and padding_mask: one row that every cell's batch row views (stride 0)
    row_keys = {k for k, t in b.items() if t.dim() == 2 and t.stride(0) == 0}
    assert row_keys == {"gene_ids", "token_kind", "positions", "padding_mask"}
    assert (b["gene_ids"][:, :-2] == torch.from_numpy(enc.gene_tokens)).all()
    assert (b["positions"] == torch.arange(L)).all()
    packed = CellStream(pbmc_corpus, enc, Batching(strategy="packed", batch_size=2), split="val")
    p = next(iter(packed))
    assert p["values"].shape == (1, 2 * L) and torch.equal(p["cu_seqlens"], torch.tensor([0, L, 2 * L],
                                                                                         dtype=torch.int32))
    assert torch.equal(p["gene_ids"][0, :L], b["gene_ids"][0]) and torch.equal(p["gene_ids"][0, L:], b["gene_ids"][0])
    assert torch.equal(p["positions"][0, L:], torch.arange(L))


def test_shared_rows_travel_to_the_device_as_one_row(pbmc_corpus):
    """The DataModule's transfer hook moves a row every cell shares once and expands it there ('meta' stands in for a
    GPU); everything else moves as it is."""
    dm = CellDataModule(ContinuousEncoding(max_genes=500), {"batch_size": 4}, corpus=str(pbmc_corpus.path))
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    moved = dm.transfer_batch_to_device(b, torch.device("meta"), 0)
    assert list(moved.keys()) == list(b.keys())
    for k, t in b.items():
        assert moved[k].device.type == "meta" and moved[k].shape == t.shape and moved[k].dtype == t.dtype, k
        assert (moved[k].dim() == 2 and moved[k].stride(0) == 0) == (t.dim() == 2 and t.stride(0) == 0), k
    cpu = dm.transfer_batch_to_device(b, torch.device("cpu"), 0)
    assert all(torch.equal(cpu[k], t) for k, t in b.items())


def test_yaml_instantiates_the_dataclass_defaults():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    enc = instantiate(OmegaConf.load(CONF))
    assert isinstance(enc, ContinuousEncoding)
    assert enc == ContinuousEncoding()  # the yaml documents exactly the defaults


def test_gene_list_missing_from_vocabulary_is_a_clear_error(tmp_path, pbmc_corpus):
    genes = [*pbmc_corpus.vocab.gene_ids[:50], "ENSG99999999991", "ENSG99999999992", "ENSG99999999993"]
    enc = ContinuousEncoding(gene_list=write_list(tmp_path / "g.txt", genes))
    with pytest.raises(ScfmInputError, match=r"3 of 53 genes .* not in the corpus vocabulary") as err:
        enc.bind(pbmc_corpus)
    assert "ENSG99999999991" in str(err.value) and "vocab=" in str(err.value)


def test_gene_list_by_symbol_with_header(tmp_path, pbmc_corpus):
    """scFoundation's gene list is keyed by symbol; a header line names the column."""
    vocab = pbmc_corpus.vocab
    idx = [10, 500, 3, 7000]
    path = tmp_path / "OS_scRNA_gene_index.tsv"
    path.write_text("index\tgene_name\n" + "".join(f"{k}\t{vocab.symbols[i]}\n" for k, i in enumerate(idx)))
    enc = ContinuousEncoding(gene_list=str(path)).bind(pbmc_corpus)
    np.testing.assert_array_equal(enc.gene_tokens, np.array(idx) + vocab.n_special)
    assert enc.max_len == 6


def test_bad_config_and_input(pbmc_corpus, tmp_path):
    with pytest.raises(ScfmInputError, match="mask_zero"):
        ContinuousEncoding(mask_zero=1.5)
    with pytest.raises(ScfmInputError, match="beta"):
        ContinuousEncoding(beta_a=0)
    with pytest.raises(RuntimeError, match="bind"):
        _ = ContinuousEncoding().max_len
    with pytest.raises(ScfmInputError, match="not found"):
        ContinuousEncoding(gene_list=str(tmp_path / "missing.txt")).bind(pbmc_corpus)
    enc = ContinuousEncoding().bind(pbmc_corpus)
    with pytest.raises(ScfmInputError, match="twice"):
        enc.encode(np.array([10, 10]), np.array([1, 2]), np.array([0, 2]), np.array([5]))
    with pytest.raises(ScfmInputError, match="total_counts"):
        enc.encode(np.array([10, 11]), np.array([3, 2]), np.array([0, 2]), np.array([4]))


def test_max_genes_keeps_the_most_often_expressed_in_list_order(pbmc_corpus):
    full = ContinuousEncoding().bind(pbmc_corpus)
    small = ContinuousEncoding(max_genes=100).bind(pbmc_corpus)
    assert small.n_genes == 100 and small.max_len == 102
    stats = pbmc_corpus.gene_stats.set_index("token_id")["n_nonzero"]
    kept = small.gene_tokens
    assert (np.diff(np.searchsorted(full.gene_tokens, kept)) > 0).all()  # list order
    dropped = np.setdiff1d(full.gene_tokens, kept)
    assert stats.reindex(kept).min() >= stats.reindex(dropped).max()
    with pytest.raises(ScfmInputError, match="max_genes"):
        ContinuousEncoding(max_genes=0)
