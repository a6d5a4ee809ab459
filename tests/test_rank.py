"""Rank-value encoding vs a plain reference, Geneformer's definition, and its invariants."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scfm.encodings.rank import RankEncoding, rank_encode_block, rank_values


def reference_rank(gene_ids, counts, total, median, max_genes):
    """One cell, plain Python: value = count/total*1e4/median in float32; descending, ties by token id."""
    f = np.float32
    scored = [((f(c) / f(total)) * f(10_000.0) / f(median[g]), int(g))
              for g, c in zip(gene_ids, counts) if median[g] > 0]
    scored.sort(key=lambda t: (-t[0], t[1]))
    return [g for _, g in scored[:max_genes]]


def _cells(corpus, n):
    shard = corpus.shard(0)
    for i in range(n):
        lo, hi = shard.offsets[i], shard.offsets[i + 1]
        yield np.asarray(shard.gene_ids[lo:hi]), np.asarray(shard.counts[lo:hi]), int(shard.total_counts[i])


@pytest.mark.parametrize("max_len", [2048, 100])
def test_matches_reference_on_real_cells(pbmc_corpus, max_len):
    enc = RankEncoding(max_len=max_len).bind(pbmc_corpus)
    cells = list(_cells(pbmc_corpus, 300))
    offsets = np.concatenate([[0], np.cumsum([len(g) for g, _, _ in cells])])
    out = enc.encode(np.concatenate([g for g, _, _ in cells]), np.concatenate([c for _, c, _ in cells]), offsets,
                     np.array([t for _, _, t in cells]))
    ties = 0
    for i, (g, c, t) in enumerate(cells):
        got = out["gene_ids"][out["offsets"][i]:out["offsets"][i + 1]].tolist()
        assert got == reference_rank(g, c, t, enc.median, max_len)
        ties += len(g) - len(np.unique(c))
    assert ties > 0  # PBMC cells are full of tied counts: the tie rule is exercised


def test_matches_geneformer_argsort_where_untied(pbmc_corpus):
    """Geneformer: X / n_counts * 10000 / medians, np.argsort(-x); equal to ours wherever values are distinct."""
    enc = RankEncoding(max_len=2048, gene_medians="geneformer_gc30M").bind(pbmc_corpus)
    checked = 0
    for g, c, t in _cells(pbmc_corpus, 200):
        keep = enc.median[g] > 0
        g, c = g[keep], c[keep]
        values = c.astype(np.float32) / np.float32(t) * np.float32(10_000) / enc.median[g]
        if len(np.unique(values)) != len(values):
            values_top = np.sort(values)[::-1][:50]
            if len(np.unique(values_top)) != 50:
                continue
            expected = g[np.argsort(-values)][:50]
            got = enc.encode(g, c, np.array([0, len(g)]), np.array([t]))["gene_ids"][:50]
        else:
            expected = g[np.argsort(-values)]
            got = enc.encode(g, c, np.array([0, len(g)]), np.array([t]))["gene_ids"]
        np.testing.assert_array_equal(got, expected)
        checked += 1
    assert checked > 50


def test_geneformer_medians_cover_pbmc(pbmc_corpus):
    import json

    from scfm.resources import geneformer_dictionary

    enc = RankEncoding(gene_medians="geneformer_gc30M").bind(pbmc_corpus)
    table = json.loads(geneformer_dictionary("geneformer_gc30M").read_text())
    assert np.isfinite(enc.median).sum() > 10_000  # most PBMC genes are in Genecorpus-30M
    token = int(pbmc_corpus.vocab.lookup(["ENSG00000075624"])[0])  # ACTB
    assert enc.median[token] == pytest.approx(table["ENSG00000075624"], rel=1e-6)


def test_v2_layout_wraps_with_cls_eos(pbmc_corpus):
    enc = RankEncoding(max_len=10, layout="v2").bind(pbmc_corpus)
    g, c, t = next(_cells(pbmc_corpus, 1))
    out = enc.encode(g, c, np.array([0, len(g)]), np.array([t]))["gene_ids"]
    v1 = RankEncoding(max_len=8).bind(pbmc_corpus).encode(g, c, np.array([0, len(g)]), np.array([t]))["gene_ids"]
    vocab = pbmc_corpus.vocab
    assert out[0] == vocab.special_id("<cls>") and out[-1] == vocab.special_id("<eos>")
    np.testing.assert_array_equal(out[1:-1], v1)
    assert len(out) == 10


def test_lengths_match_encoding(pbmc_corpus):
    enc = RankEncoding(max_len=700).bind(pbmc_corpus)
    shard = pbmc_corpus.shard(0)
    lengths = enc.lengths(shard)
    out = enc.encode(np.asarray(shard.gene_ids), np.asarray(shard.counts), np.asarray(shard.offsets),
                     shard.total_counts)
    np.testing.assert_array_equal(np.diff(out["offsets"]), lengths)
    assert lengths.max() == 700 and lengths.min() < 700


cell_strategy = st.lists(st.tuples(st.integers(0, 59), st.integers(1, 40)), min_size=1, max_size=60,
                         unique_by=lambda t: t[0])


@settings(max_examples=200, deadline=None)
@given(cells=st.lists(cell_strategy, min_size=1, max_size=6), max_genes=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_block_invariants(cells, max_genes, seed):
    rng = np.random.default_rng(seed)
    median = rng.choice([np.nan, 0.5, 1.0, 2.0, 3.7], size=60).astype(np.float32)
    median[:2] = np.nan
    gene_ids = [np.array([g for g, _ in c]) for c in cells]
    counts = [np.array([n for _, n in c]) for c in cells]
    totals = np.array([int(c.sum()) + int(rng.integers(0, 50)) for c in counts])
    offsets = np.concatenate([[0], np.cumsum([len(g) for g in gene_ids])])
    ranked, out_off = rank_encode_block(np.concatenate(gene_ids), np.concatenate(counts), offsets, totals, median,
                                        max_genes)
    for i in range(len(cells)):
        got = ranked[out_off[i]:out_off[i + 1]]
        expected = reference_rank(gene_ids[i], counts[i], totals[i], median, max_genes)
        assert got.tolist() == expected
        # invariants, stated directly
        assert len(got) == min(int((median[gene_ids[i]] > 0).sum()), max_genes)
        assert len(set(got.tolist())) == len(got)
        # ordered by the float32 values Geneformer computes (exact ties in real arithmetic may differ in float32)
        values = dict(zip(gene_ids[i], rank_values(counts[i], totals[i], median[gene_ids[i]])))
        assert all(values[a] >= values[b] for a, b in itertools.pairwise(got))
        # permuting the input order of a cell changes nothing
        perm = rng.permutation(len(gene_ids[i]))
        alone, _ = rank_encode_block(gene_ids[i][perm], counts[i][perm], np.array([0, len(perm)]), totals[i:i + 1],
                                     median, max_genes)
        np.testing.assert_array_equal(alone, got)
