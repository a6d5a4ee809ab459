"""scFoundation continuous encoding: a gene-by-gene reference on real cells, its invariants, its statistics
(seeded, so they cannot flake) and its run through ``CellStream``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from scfm.data.batching import Batching
from scfm.data.stream import CellStream
from scfm.encodings.continuous import ContinuousEncoding
from scfm.encodings.rng import cell_rng
from scfm.errors import ScfmInputError
from scfm.vocab import SPECIAL_TOKENS, Vocab

CONF = Path(__file__).resolve().parents[1] / "conf" / "encoding" / "continuous.yaml"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def reference(enc: ContinuousEncoding, gene_ids, counts, total: int, seed: int) -> dict:
    """One cell, gene by gene, replaying the documented draw order with scalar draws."""
    tokens = enc.gene_tokens.tolist()
    G = len(tokens)
    column = {t: j for j, t in enumerate(tokens)}
    c = np.zeros(G, dtype=np.int64)
    for g, n in zip(np.asarray(gene_ids).tolist(), np.asarray(counts).tolist()):
        if g in column and n > 0:
            c[column[g]] = n
    by_token = sorted(np.flatnonzero(c), key=lambda j: tokens[j])  # per-gene draws go in token-id order
    rng = cell_rng(seed)
    thin, outside, rate, down = c.copy(), total - int(c.sum()), 1.0, False
    if rng.random() < enc.downsample_prob and total >= enc.downsample_min_total:
        down, rate = True, rng.beta(enc.beta_a, enc.beta_b)
        for j in by_token:
            thin[j] = rng.binomial(int(c[j]), rate)
        outside = int(rng.binomial(outside, rate))
    masked = np.zeros(G + 2, dtype=bool)
    for j in by_token:
        if thin[j] > 0:
            masked[j] = rng.random() < enc.mask_nonzero
    for j in rng.choice(G, rng.binomial(G, enc.mask_zero), replace=False, shuffle=False):
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


def block(corpus, cells):
    """CSR block of the given cells of shard 0."""
    shard = corpus.shard(0)
    parts = [(np.asarray(shard.gene_ids[shard.offsets[i]:shard.offsets[i + 1]]),
              np.asarray(shard.counts[shard.offsets[i]:shard.offsets[i + 1]])) for i in cells]
    offsets = np.concatenate([[0], np.cumsum([len(g) for g, _ in parts])])
    return (np.concatenate([g for g, _ in parts]), np.concatenate([c for _, c in parts]), offsets,
            np.asarray(shard.total_counts)[list(cells)])


def row(out, i, key):
    lo, hi = out["offsets"][i], out["offsets"][i + 1]
    return out[key][lo:hi]


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
    out = enc.encode(gene_ids, counts, offsets, totals, cell_seeds=cell_seeds)
    assert set(out) == {"gene_ids", "values", "target_values", "value_mask", "encoder_mask", "token_kind", "offsets",
                        "cell"}
    branches = set()
    for i in range(len(pbmc_cells)):
        lo, hi = offsets[i], offsets[i + 1]
        ref = reference(enc, gene_ids[lo:hi], counts[lo:hi], int(totals[i]), int(cell_seeds[i]))
        for key in ("gene_ids", "value_mask", "encoder_mask", "token_kind"):
            np.testing.assert_array_equal(row(out, i, key), ref[key], err_msg=f"cell {i} {key}")
        for key in ("values", "target_values"):
            np.testing.assert_allclose(row(out, i, key), ref[key], rtol=1e-6, atol=0, err_msg=f"cell {i} {key}")
        cell = ref["cell"]
        assert out["cell"]["raw_total"][i] == cell["raw_total"]
        assert out["cell"]["input_total"][i] == cell["input_total"]
        assert out["cell"]["downsampled"][i] == cell["downsampled"]
        assert out["cell"]["rate"][i] == np.float32(cell["rate"])
        branches.add((cell["downsampled"], totals[i] >= enc.downsample_min_total))
    if variant == "gene_list":  # counts outside the list were thinned into S
        assert (enc.sample(gene_ids, counts, offsets, totals, cell_seeds).raw_in < totals).all()
    assert branches == {(True, True), (False, True), (False, False)}  # all three paths were compared
    assert out["value_mask"].sum() > 0 and (out["encoder_mask"] & (out["token_kind"] == 0)).sum() > 0


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
    kind = out["token_kind"].reshape(n, L)
    assert (kind[:, :G] == 0).all() and (kind[:, G] == 1).all() and (kind[:, G + 1] == 2).all()
    ids = out["gene_ids"].reshape(n, L)
    assert (ids[:, :G] == enc.gene_tokens).all() and (ids[:, G:] == 0).all()

    # depth tokens: T = log10 raw total >= S = log10 down-sampled total, equal when not down-sampled
    values, target = out["values"].reshape(n, L), out["target_values"].reshape(n, L)
    T, S = values[:, G], values[:, G + 1]
    np.testing.assert_allclose(T, np.log10(np.maximum(totals, 1)), rtol=1e-6)
    np.testing.assert_allclose(S, np.log10(np.maximum(smp.input_total, 1)), rtol=1e-6)
    assert (T >= S).all()
    assert (T[~smp.downsampled] == S[~smp.downsampled]).all()
    np.testing.assert_array_equal(out["cell"]["downsampled"], smp.downsampled)

    # masks: T/S never masked and always seen; encoder = c' > 0 and not masked; masked values are 0
    vmask, emask = out["value_mask"].reshape(n, L), out["encoder_mask"].reshape(n, L)
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
            np.testing.assert_array_equal(other[key], out[key])
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


def test_cell_generators_are_independent_streams():
    """Stream seeds are ``epoch_key ^ cell_index``: neighbouring seeds must give unrelated streams."""
    base = 0x1234_5678_9ABC_DEF0
    first = np.array([cell_rng(base ^ i).random(2) for i in range(4000)])
    assert stats.kstest(first[:, 0], "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(first[:-1, 0], first[1:, 0])[0, 1]) < 4 / np.sqrt(len(first))
    assert abs(np.corrcoef(first[:, 0], first[:, 1])[0, 1]) < 4 / np.sqrt(len(first))
    np.testing.assert_array_equal(cell_rng(7).random(5), cell_rng(7).random(5))
    assert not np.array_equal(cell_rng(7).random(5), cell_rng(6).random(5))


def test_lengths_equal_encoded_lengths(pbmc_corpus):
    enc = ContinuousEncoding().bind(pbmc_corpus)
    shard = pbmc_corpus.shard(0)
    lengths = enc.lengths(shard)
    assert len(lengths) == shard.n_cells and (lengths == 16_634 + 2).all() and enc.max_len == 16_636
    out = enc.encode(*block(pbmc_corpus, range(25)))
    np.testing.assert_array_equal(np.diff(out["offsets"]), lengths[:25])
    assert all(len(v) == out["offsets"][-1] for k, v in out.items() if k not in ("offsets", "cell"))
    no_depth = ContinuousEncoding(depth_tokens=False).bind(pbmc_corpus)
    assert no_depth.max_len == 16_634 and (no_depth.lengths(shard) == 16_634).all()
    assert not (no_depth.encode(*block(pbmc_corpus, range(3)))["token_kind"]).any()


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
    vmask = out["value_mask"].reshape(n, L)[:, :G]
    smp = enc.sample(*block(pbmc_corpus, range(150)), cell_seeds=seeds(150, 7))
    nonzero = np.zeros((n, G), dtype=bool)
    nonzero[smp.cell[smp.thinned > 0], smp.column[smp.thinned > 0]] = True
    for group, p in [(nonzero, p_nz), (~nonzero, p_z)]:
        k, m = int(vmask[group].sum()), int(group.sum())
        assert abs(_z(k, p * m, p * (1 - p) * m)) < 4, (k / m, p)
    assert not out["value_mask"][out["token_kind"] != 0].any()


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
    packed = CellStream(pbmc_corpus, enc, Batching(strategy="packed", batch_size=2), split="val")
    p = next(iter(packed))
    assert p["values"].shape == (1, 2 * L) and torch.equal(p["cu_seqlens"], torch.tensor([0, L, 2 * L],
                                                                                         dtype=torch.int32))


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
