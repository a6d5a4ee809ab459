"""scGPT value binning vs a literal copy of scGPT's code, its invariants, and its path through CellStream."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scfm.data.batching import Batching
from scfm.data.stream import CellStream
from scfm.data.vocab import Vocab
from scfm.encodings.bin import BIN_DRAWS, BinEncoding, _draws, _smallest, bin_bounds
from scfm.encodings.rng import cell_bits, purpose_key, purpose_key_reference, splitmix64_reference
from scfm.errors import ScfmInputError

N_GENES = 60
TINY = SimpleNamespace(vocab=Vocab.build([f"G{i:03d}" for i in range(N_GENES)]))  # gene tokens 4..63, <cls> = 2


def scgpt_reference(gene_ids, counts, total, seed, *, n_bins=51, max_len=1200, target_sum=1e4,
                    normalize_by="vocab", gene_tokens=None, cls_id=2):
    """One cell, following scGPT: normalise + log1p, ``binning()`` / ``_digitize(side="both")``, then
    ``pad_batch``'s sampling, <cls> first. ``np.random`` is replaced by the documented draws: output j of the cell's
    SplitMix64 sequence gives the i = j-th non-zero gene (token order) its tie uniform (high 32 bits / 2³²) and
    candidate j its sampling key (low 32 bits, then j); the sampled genes are kept in token order."""
    order = np.argsort(gene_ids)
    gene_ids, counts = np.asarray(gene_ids)[order], np.asarray(counts)[order]
    gene_ids, counts = gene_ids[counts > 0], counts[counts > 0]
    n_candidates = len(gene_ids) if gene_tokens is None else len(gene_tokens)
    bits = splitmix64_reference(purpose_key_reference(seed, BIN_DRAWS), max(len(gene_ids), n_candidates))
    norm = counts.sum() if normalize_by == "vocab" else total
    row = np.log1p((counts * (target_sum / norm)).astype(np.float32))
    # scgpt.preprocess.binning (non-zero part) and _digitize(side="both")
    bins = np.quantile(row, np.linspace(0, 1, n_bins - 1))
    left_digits = np.digitize(row, bins)
    right_digits = np.digitize(row, bins, right=True)
    rands = np.array([b >> 32 for b in bits[:len(row)]], dtype=np.float64) / 2**32
    digits = np.ceil(rands * (right_digits - left_digits) + left_digits).astype(np.int64)
    genes, values, binned = gene_ids, row, digits
    if gene_tokens is not None:  # include_zero_gene: every gene, zeros 0
        genes = np.asarray(gene_tokens)
        values, binned = np.zeros(len(genes), np.float32), np.zeros(len(genes), np.int64)
        at = np.searchsorted(genes, gene_ids)
        values[at], binned[at] = row, digits
    if len(genes) > max_len - 1:  # scgpt.tokenizer.pad_batch: np.random.choice(len - 1, max_len - 1, replace=False)
        idx = np.sort(sorted(range(len(genes)), key=lambda j: (bits[j] & 0xFFFFFFFF, j))[:max_len - 1])
        genes, values, binned = genes[idx], values[idx], binned[idx]
    return (np.concatenate([[cls_id], genes]), np.concatenate([[0], binned]),
            np.concatenate([[0], values]).astype(np.float32), (left_digits - right_digits).max(initial=0))


def _cells(corpus, n, start=0):
    shard = corpus.shard(0)
    for i in range(start, start + n):
        lo, hi = shard.offsets[i], shard.offsets[i + 1]
        yield np.asarray(shard.gene_ids[lo:hi]), np.asarray(shard.counts[lo:hi]), int(shard.total_counts[i])


def _block(cells):
    offsets = np.concatenate([[0], np.cumsum([len(g) for g, _, _ in cells])])
    return (np.concatenate([g for g, _, _ in cells]), np.concatenate([c for _, c, _ in cells]), offsets,
            np.array([t for _, _, t in cells]))


def _cell(out, i):
    lo, hi = out["offsets"][i], out["offsets"][i + 1]
    return out["gene_ids"][lo:hi], out["values_bin"][lo:hi], out["values"][lo:hi]


# -- (a) equal to scGPT's code on real cells ----------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"max_len": 300}, {"normalize_by": "all_genes", "n_bins": 11, "max_len": 2000},
                                {"include_zero_genes": True, "max_len": 3000}])
def test_matches_scgpt_on_pbmc_cells(pbmc_corpus, kw):
    enc = BinEncoding(**kw).bind(pbmc_corpus)
    cells = list(_cells(pbmc_corpus, 260, start=100))  # > 252: two dense tables for include_zero_genes
    seeds = np.random.default_rng(7).integers(0, 2**63, len(cells)).astype(np.uint64)
    out = enc.encode(*_block(cells), cell_seeds=seeds)
    random_ties = sampled = 0
    for i, (g, c, t) in enumerate(cells):
        genes, bins, values = _cell(out, i)
        ref_genes, ref_bins, ref_values, spread = scgpt_reference(
            g, c, t, int(seeds[i]), n_bins=enc.n_bins, max_len=enc.max_len, normalize_by=enc.normalize_by,
            gene_tokens=enc.gene_tokens if enc.include_zero_genes else None, cls_id=enc.cls_id)
        np.testing.assert_array_equal(genes, ref_genes)
        np.testing.assert_array_equal(bins, ref_bins)
        np.testing.assert_array_equal(values, ref_values)
        random_ties += spread >= 2
        sampled += len(ref_genes) - 1 < (len(enc.gene_tokens) if enc.include_zero_genes else len(g))
    assert random_ties > 200  # most PBMC cells have values on several equal edges: the random draws are exercised
    assert sampled > 0


@pytest.mark.parametrize("include_zero", [False, True])
def test_without_cls_the_cells_are_the_same_minus_their_first_token(pbmc_corpus, include_zero):
    cells = list(_cells(pbmc_corpus, 30, start=5))
    seeds = np.arange(30, dtype=np.uint64)
    with_cls = BinEncoding(max_len=301, include_zero_genes=include_zero).bind(pbmc_corpus)  # both: 300 genes
    without = BinEncoding(max_len=300, include_zero_genes=include_zero, append_cls=False).bind(pbmc_corpus)
    a_out, b_out = (enc.encode(*_block(cells), cell_seeds=seeds) for enc in (with_cls, without))
    for key in ("gene_ids", "values_bin", "values"):
        assert a_out[key].dtype == b_out[key].dtype
    for i in range(len(cells)):
        for a, b in zip(_cell(a_out, i), _cell(b_out, i)):
            np.testing.assert_array_equal(a[1:], b)
        assert _cell(a_out, i)[0][0] == with_cls.cls_id


def test_bin_bounds_repeat_numpys_rounding():
    """(n-1)·q is 4.999… for n=8, q=35/49: numpy's edge lands just below the 6th value, not on it."""
    counts = np.arange(1, 9)
    q = np.linspace(0, 1, 50)
    assert (8 - 1) * q[35] != 5.0  # the artifact is there
    values, left, right = bin_bounds(counts, np.array([0, 8]), np.array([1.0]), 51)
    edges = np.quantile(values, q)
    np.testing.assert_array_equal(left, np.digitize(values, edges))
    np.testing.assert_array_equal(right, np.digitize(values, edges, right=True))
    exact = np.quantile(values.astype(np.float64), [5 / 7])  # where the edge would be with exact arithmetic
    assert edges[35] < values[5] and exact == values[5]


def test_bin_bounds_merge_counts_with_one_float32_value():
    counts = np.array([10**8, 10**8 + 1, 7, 10**8 + 3, 7, 1, 2, 10**8 + 1])
    values, left, right = bin_bounds(counts, np.array([0, 8]), np.array([1.0]), 11)
    assert values[0] == values[1] == values[3]  # distinct counts, one value: one run
    edges = np.quantile(values, np.linspace(0, 1, 10))
    np.testing.assert_array_equal(left, np.digitize(values, edges))
    np.testing.assert_array_equal(right, np.digitize(values, edges, right=True))


@settings(max_examples=150, deadline=None)
@given(cells=st.lists(st.lists(st.one_of(st.integers(1, 6), st.integers(1, 300), st.integers(1, 10**6)),
                               min_size=0, max_size=80), min_size=1, max_size=5),
       n_bins=st.integers(2, 60), scale=st.sampled_from([1e4 / 3, 1.0, 1e-9, 7e6]))
def test_bin_bounds_equal_numpy_quantile_digitize(cells, n_bins, scale):
    counts = np.concatenate([np.array(c, dtype=np.int64) for c in cells])
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in cells])])
    scales = scale * np.arange(1, len(cells) + 1)
    values, left, right = bin_bounds(counts, offsets, scales, n_bins)
    for i in range(len(cells)):
        x = values[offsets[i]:offsets[i + 1]]
        expected = np.log1p((np.array(cells[i]) * scales[i]).astype(np.float32))
        np.testing.assert_array_equal(x, expected)
        if len(x):
            edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
            np.testing.assert_array_equal(left[offsets[i]:offsets[i + 1]], np.digitize(x, edges))
            np.testing.assert_array_equal(right[offsets[i]:offsets[i + 1]], np.digitize(x, edges, right=True))


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=6), k=st.integers(1, 39),
       spread=st.sampled_from([3, 50, 2**32]), seed=st.integers(0, 2**32))
def test_smallest_keeps_the_k_smallest_keys_ties_to_the_lower_index(lengths, k, spread, seed):
    """Cells of at most k candidates keep all of them (empty cells included)."""
    rng = np.random.default_rng(seed)
    high = rng.integers(0, 2**32, sum(lengths), dtype=np.uint64) << np.uint64(32)
    bits = high | rng.integers(0, spread, sum(lengths), dtype=np.uint64)  # small spreads: many tied low halves
    keep = _smallest(bits, np.array(lengths), k)
    start = 0
    for n in lengths:
        cell = bits[start:start + n].tolist()
        expected = np.zeros(n, bool)
        expected[sorted(range(n), key=lambda j: (cell[j] & 0xFFFFFFFF, j))[:k]] = True
        np.testing.assert_array_equal(keep[start:start + n], expected)
        start += n


# -- (b) invariants ------------------------------------------------------------------------------------------
cell_strategy = st.lists(st.tuples(st.integers(0, N_GENES - 1), st.one_of(st.integers(0, 4), st.integers(0, 60))),
                         min_size=0, max_size=N_GENES, unique_by=lambda t: t[0])


def _tiny_block(cells):
    gene_ids = [np.array([g + 4 for g, _ in c], dtype=np.int64) for c in cells]
    counts = [np.array([n for _, n in c], dtype=np.int64) for c in cells]
    offsets = np.concatenate([[0], np.cumsum([len(g) for g in gene_ids])])
    totals = np.array([int(c.sum()) + 5 for c in counts])
    return gene_ids, counts, offsets, totals


def _cat(parts):
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@settings(max_examples=150, deadline=None)
@given(cells=st.lists(cell_strategy, min_size=1, max_size=6), max_len=st.integers(2, 70), n_bins=st.integers(2, 60),
       seed=st.integers(0, 2**32), include_zero=st.booleans())
def test_encode_invariants(cells, max_len, n_bins, seed, include_zero):
    enc = BinEncoding(max_len=max_len, n_bins=n_bins, include_zero_genes=include_zero).bind(TINY)
    gene_ids, counts, offsets, totals = _tiny_block(cells)
    seeds = np.random.default_rng(seed).integers(0, 2**63, len(cells)).astype(np.uint64)
    out = enc.encode(_cat(gene_ids), _cat(counts), offsets, totals, cell_seeds=seeds)
    assert out["gene_ids"].dtype == np.int64 and out["values_bin"].dtype == np.int64
    assert out["values"].dtype == np.float32
    rng = np.random.default_rng(seed)
    for i in range(len(cells)):
        genes, bins, values = _cell(out, i)
        order = np.argsort(gene_ids[i])
        g, c = gene_ids[i][order], counts[i][order]
        g, c = g[c > 0], c[c > 0]
        candidates = N_GENES if include_zero else len(g)
        assert len(genes) == min(candidates, max_len - 1) + 1
        assert genes[0] == 2 and bins[0] == 0 and values[0] == 0  # <cls>, value and bin 0
        genes, bins, values = genes[1:], bins[1:], values[1:]
        assert np.all(np.diff(genes) > 0)  # ascending, no duplicates
        assert set(genes.tolist()) <= (set(range(4, 4 + N_GENES)) if include_zero else set(g.tolist()))
        # values are the cell's normalised log1p values; zeros (include_zero_genes) get value 0 and bin 0
        x = np.log1p((c * (1e4 / max(c.sum(), 1))).astype(np.float32))
        expected = dict(zip(g.tolist(), x.tolist()))
        np.testing.assert_array_equal(values, np.array([expected.get(k, 0.0) for k in genes.tolist()], np.float32))
        is_zero = ~np.isin(genes, g)
        assert np.all(bins[is_zero] == 0)
        assert np.all((bins[~is_zero] >= 1) & (bins[~is_zero] <= n_bins - 1))
        if len(g):
            # the random tie rule, exactly: a bin in (right, left] when the value sits on several edges, else left
            edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
            at = np.searchsorted(g, genes[~is_zero])
            left, right = np.digitize(x, edges)[at], np.digitize(x, edges, right=True)[at]
            b = bins[~is_zero]
            assert np.all(np.where(left > right, (b > right) & (b <= left), b == left))
            # monotone: a strictly larger value never gets a smaller bin (ties may be scattered)
            v = x[at]
            smaller = v[:, None] < v[None, :]
            assert not np.any(smaller & (b[:, None] > b[None, :]))
    # permuting the genes within each input cell changes nothing
    perms = [rng.permutation(len(g)) for g in gene_ids]
    shuffled = enc.encode(_cat([g[p] for g, p in zip(gene_ids, perms)]), _cat([c[p] for c, p in zip(counts, perms)]),
                          offsets, totals, cell_seeds=seeds)
    again = enc.encode(_cat(gene_ids), _cat(counts), offsets, totals, cell_seeds=seeds)
    for key in ("gene_ids", "values_bin", "values", "offsets"):
        np.testing.assert_array_equal(shuffled[key], out[key])
        np.testing.assert_array_equal(again[key], out[key])  # same seeds, same output


def test_seeds_drive_sampling_and_ties(pbmc_corpus):
    enc = BinEncoding(max_len=101).bind(pbmc_corpus)
    block = _block(list(_cells(pbmc_corpus, 1)))
    outs = [enc.encode(*block, cell_seeds=np.array([s], np.uint64)) for s in range(5)]
    assert len({tuple(o["gene_ids"].tolist()) for o in outs}) == 5  # different samples of ~100 out of > 1,000
    full = BinEncoding().bind(pbmc_corpus)
    bins = [full.encode(*block, cell_seeds=np.array([s], np.uint64))["values_bin"] for s in range(3)]
    assert not np.array_equal(bins[0], bins[1])  # tied values get other random bins
    np.testing.assert_array_equal(full.encode(*block)["values_bin"],
                                  full.encode(*block, cell_seeds=np.zeros(1, np.uint64))["values_bin"])


def test_a_cell_encodes_the_same_alone_or_in_a_block(pbmc_corpus):
    enc = BinEncoding(max_len=300).bind(pbmc_corpus)
    cells = list(_cells(pbmc_corpus, 20))
    seeds = np.arange(100, 120, dtype=np.uint64)
    out = enc.encode(*_block(cells), cell_seeds=seeds)
    for i in (0, 7, 19):
        alone = enc.encode(*_block(cells[i:i + 1]), cell_seeds=seeds[i:i + 1])
        for a, b in zip(_cell(out, i), _cell(alone, 0)):
            np.testing.assert_array_equal(a, b)


def test_bins_are_computed_before_sampling(pbmc_corpus):
    """Bins come from the whole cell: the genes kept by sampling (or padded with zeros) keep their bins."""
    cells = list(_cells(pbmc_corpus, 30))
    seeds = np.arange(30, dtype=np.uint64)
    reference = BinEncoding(max_len=5000).bind(pbmc_corpus).encode(*_block(cells), cell_seeds=seeds)
    for kw in ({"max_len": 200}, {"include_zero_genes": True}):
        out = BinEncoding(**kw).bind(pbmc_corpus).encode(*_block(cells), cell_seeds=seeds)
        for i in range(len(cells)):
            g_all, b_all, _ = _cell(reference, i)
            genes, bins, _ = _cell(out, i)
            present = np.isin(genes, g_all[1:])
            assert present.sum() > 10
            np.testing.assert_array_equal(bins[present], b_all[np.searchsorted(g_all[1:], genes[present]) + 1])


@pytest.mark.parametrize("kw", [{}, {"max_len": 300}, {"include_zero_genes": True}, {"append_cls": False}])
def test_lengths_match_encoding(pbmc_corpus, kw):
    enc = BinEncoding(**kw).bind(pbmc_corpus)
    shard = pbmc_corpus.shard(0)
    lengths = enc.lengths(shard)
    out = enc.encode(np.asarray(shard.gene_ids), np.asarray(shard.counts), np.asarray(shard.offsets),
                     shard.total_counts)
    np.testing.assert_array_equal(np.diff(out["offsets"]), lengths)
    if kw.get("include_zero_genes"):  # 16k vocabulary genes > 1,199: every cell is full
        assert (lengths == 1200).all()
        assert (out["values_bin"] == 0).mean() > 0.4 and (out["values"][out["values_bin"] == 0] == 0).all()
    else:
        assert lengths.max() == enc.max_len and lengths.min() < enc.max_len
    if not enc.append_cls:
        assert not np.isin(2, out["gene_ids"])


def test_lengths_count_only_nonzero_counts():
    """A corpus holds non-zero counts only (lengths = cell sizes); explicit zeros elsewhere are not counted."""
    enc = BinEncoding(max_len=3).bind(TINY)
    offsets = np.array([0, 0, 2, 5])
    nonzero = SimpleNamespace(counts=np.array([1, 4, 2, 2, 9]), offsets=offsets)
    np.testing.assert_array_equal(enc.lengths(nonzero), [1, 3, 3])  # <cls> + min(n, 2)
    zeros = SimpleNamespace(counts=np.array([0, 4, 0, 0, 9]), offsets=offsets)
    np.testing.assert_array_equal(enc.lengths(zeros), [1, 2, 2])
    out = enc.encode(np.array([5, 6, 5, 6, 7]), zeros.counts, offsets, np.array([0, 4, 9]))
    np.testing.assert_array_equal(np.diff(out["offsets"]), enc.lengths(zeros))


def test_empty_cells_and_empty_blocks():
    enc = BinEncoding(max_len=10, n_bins=2).bind(TINY)
    out = enc.encode(np.array([5, 6, 9]), np.array([0, 0, 3]), np.array([0, 0, 2, 3]), np.array([0, 4, 3]))
    np.testing.assert_array_equal(out["offsets"], [0, 1, 2, 4])  # zeros dropped: <cls> alone
    np.testing.assert_array_equal(out["gene_ids"], [2, 2, 2, 9])
    np.testing.assert_array_equal(out["values_bin"], [0, 0, 0, 1])
    none = enc.encode(np.zeros(0, np.int64), np.zeros(0, np.int64), np.array([0]), np.zeros(0))
    assert none["offsets"].tolist() == [0] and len(none["gene_ids"]) == 0


def test_bad_input_and_config():
    enc = BinEncoding().bind(TINY)
    with pytest.raises(ScfmInputError, match="twice"):
        enc.encode(np.array([7, 5, 7]), np.array([1, 2, 3]), np.array([0, 3]), np.array([9]))
    with pytest.raises(ScfmInputError, match="negative"):
        enc.encode(np.array([5, 7]), np.array([1, -2]), np.array([0, 2]), np.array([9]))
    with pytest.raises(ScfmInputError, match="integer"):
        enc.encode(np.array([5, 7]), np.array([1.5, 2.0]), np.array([0, 2]), np.array([9]))
    with pytest.raises(ScfmInputError, match="normalize_by"):
        BinEncoding(normalize_by="total")
    with pytest.raises(ScfmInputError, match="n_bins"):
        BinEncoding(n_bins=1)
    no_cls = SimpleNamespace(vocab=Vocab(("<pad>", "<mask>"), ["A", "B"]))
    with pytest.raises(ScfmInputError, match="<cls>") as err:
        BinEncoding().bind(no_cls)
    assert "append_cls=false" in str(err.value)
    out = BinEncoding(append_cls=False).bind(no_cls).encode(np.array([2, 3]), np.array([4, 1]), np.array([0, 2]),
                                                           np.array([5]))
    np.testing.assert_array_equal(out["gene_ids"], [2, 3])
    np.testing.assert_array_equal(out["values_bin"], [50, 1])


def test_yaml_builds_the_scgpt_defaults():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "encoding" / "bin.yaml")
    enc = instantiate(cfg)
    assert isinstance(enc, BinEncoding) and enc == BinEncoding()
    assert (enc.n_bins, enc.max_len, enc.target_sum, enc.kind) == (51, 1200, 1e4, "bin")


# -- (c) through CellStream ----------------------------------------------------------------------------------
def _stream(corpus, strategy, **kw):
    enc = BinEncoding(max_len=400).bind(corpus)
    return CellStream(corpus, enc, Batching(strategy=strategy, batch_size=12), **kw)


def test_padded_batches_carry_bins_and_values(pbmc_corpus):
    batches = list(_stream(pbmc_corpus, "random"))
    for b in batches[:20]:
        mask = b["padding_mask"]
        assert b["values_bin"].shape == b["values"].shape == b["gene_ids"].shape == mask.shape
        assert b["values_bin"].dtype == torch.int64 and b["values"].dtype == torch.float32
        assert (b["values_bin"][~mask] == 0).all() and (b["values"][~mask] == 0).all()
        assert (b["gene_ids"][:, 0] == 2).all() and (b["values_bin"][:, 0] == 0).all()
        real = mask.clone()
        real[:, 0] = False
        assert (b["values_bin"][real] >= 1).all() and (b["values_bin"][real] <= 50).all()
        assert (b["values"][real] > 0).all()
        assert int(b["lengths"].max()) == mask.shape[1] <= 400
    # the same cell in the same epoch encodes identically, whatever its batch; another epoch differs
    first = {int(c): (g[m], v[m]) for b in batches for c, g, v, m in
             zip(b["cell_index"], b["gene_ids"], b["values_bin"], b["padding_mask"])}
    packed = _stream(pbmc_corpus, "packed")
    other_epoch = _stream(pbmc_corpus, "random")
    other_epoch.set_epoch(1)
    b = next(iter(packed))
    for i, cell in enumerate(b["cell_index"].tolist()):
        lo, hi = int(b["cu_seqlens"][i]), int(b["cu_seqlens"][i + 1])
        assert torch.equal(b["gene_ids"][0, lo:hi], first[cell][0])
        assert torch.equal(b["values_bin"][0, lo:hi], first[cell][1])
    changed = 0
    for b in list(other_epoch)[:5]:
        for c, v, m in zip(b["cell_index"], b["values_bin"], b["padding_mask"]):
            changed += not torch.equal(v[m], first[int(c)][1])
    assert changed > 0


def test_packed_batches_carry_bins_and_values(pbmc_corpus):
    for b in list(_stream(pbmc_corpus, "packed"))[:10]:
        T = b["gene_ids"].shape[1]
        assert b["values_bin"].shape == b["values"].shape == (1, T)
        starts = b["cu_seqlens"][:-1].long()
        assert (b["gene_ids"][0, starts] == 2).all() and (b["values_bin"][0, starts] == 0).all()
        body = torch.ones(T, dtype=torch.bool)
        body[starts] = False
        assert (b["values_bin"][0, body] >= 1).all() and (b["values"][0, body] > 0).all()


def test_sampling_keeps_shallow_cells_whole_and_samples_a_deep_one():
    lengths = np.array([20] * 10_000 + [20_000])
    bits = np.arange(lengths.sum(), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    keep = _smallest(bits, lengths, 1199)
    assert keep[:200_000].all() and keep[200_000:].sum() == 1199


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 3000), min_size=1, max_size=5), k=st.integers(1, 2000),
       seed=st.integers(0, 2**64 - 1))
def test_draws_are_the_cells_splitmix64_outputs_sampled_by_smallest(lengths, k, seed):
    """The fused kernel = ``rng.cell_bits`` then ``_smallest``: kept positions, and the high halves of their outputs
    (spot-checked against the plain-Python SplitMix64)."""
    lengths = np.array(lengths, dtype=np.int64)
    keys = purpose_key(np.arange(len(lengths), dtype=np.uint64) + np.uint64(seed), BIN_DRAWS)
    index, high = _draws(keys, lengths, k)
    bits = cell_bits(keys, lengths)
    want = np.flatnonzero(_smallest(bits, lengths, k))
    np.testing.assert_array_equal(index, want)
    np.testing.assert_array_equal(high, (bits[want] >> np.uint64(32)).astype(np.int64))
    if len(lengths) and lengths[0]:
        assert int(bits[lengths[0] - 1]) == splitmix64_reference(int(keys[0]), int(lengths[0]))[-1]


def test_kernels_stay_in_bounds(tmp_path):
    """Recompiled with bounds checks (a fresh cache): the branch-free sampling (it writes every position, at the slot
    after the last kept one) on tie-heavy keys, deep, shallow and empty cells, ``<cls>`` and zero genes; the padded
    layout's kernels on ragged cells."""
    code = (
        "import numpy as np\n"
        "from scfm.data.corpus import Corpus\n"
        "from scfm.data.batching import collate_arrays\n"
        "from scfm.encodings.bin import BinEncoding, _smallest\n"
        "from scfm.data.vocab import Vocab\n"
        "rng = np.random.default_rng(0)\n"
        "lengths = np.array([0, 5, 40, 3, 40, 1])\n"
        "bits = rng.integers(0, 2**64, lengths.sum(), dtype=np.uint64, endpoint=False) & np.uint64(0xFFFF00000007)\n"
        "assert _smallest(bits, lengths, 4).sum() == 4 + 4 + 3 + 4 + 1\n"
        "vocab = Vocab.build([f'G{i:03d}' for i in range(60)])\n"
        "corpus = type('C', (), {'vocab': vocab})()\n"
        "offsets = np.concatenate([[0], np.cumsum(lengths)])\n"
        "genes = np.concatenate([4 + np.sort(rng.choice(60, n, replace=False)) for n in lengths])\n"
        "counts = rng.integers(1, 300, len(genes))\n"
        "for zeros in (False, True):\n"
        "    enc = BinEncoding(max_len=7, include_zero_genes=zeros).bind(corpus)\n"
        "    totals = np.full(len(lengths), counts.sum())\n"
        "    out = enc.encode(genes, counts, offsets, totals, np.arange(6, dtype=np.uint64))\n"
        "    batch = collate_arrays(out, 'padded')\n"
        "    assert batch['gene_ids'].shape == (6, 7)\n"
        "print('ok')\n")
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["ok"]
