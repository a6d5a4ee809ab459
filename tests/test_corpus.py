"""Corpus writer (``prepare``) and reader (``Corpus``): layout, exact content, bad input, faults, resumption.

Everything is built from the vendored PBMC 3k (``scfm.data.builtin.pbmc3k``, small subsets written to tmp as .h5ad)
and the vendored 10x fixtures; nothing touches the network, ``/work/shared`` or the home cache.
Expected tokens are computed here from the scipy matrix and ``vocab.tsv`` (pandas), independently of scfm.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

import scfm.data.corpus as corpus_mod
import scfm.data.prepare as prepare_mod
from scfm.data.corpus import Corpus, is_corpus
from scfm.data.prepare import InputSpec, PrepareOptions, prepare
from scfm.errors import CorruptCorpusError, ScfmInputError
from scfm.resources import geneformer_dictionary

TENX = Path(__file__).parent / "assets" / "10x"
V2_MTX = TENX / "1.2.0" / "filtered_gene_bc_matrices" / "hg19_chr21"  # symbols only
V3_MTX = TENX / "3.0.0" / "filtered_feature_bc_matrix"  # Ensembl ids
V3_H5 = TENX / "3.0.0" / "filtered_feature_bc_matrix.h5"
N_SUB = 300


# ---------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sub(pbmc) -> anndata.AnnData:
    """The first 300 PBMC cells, all 16,634 genes (raw counts, float32 CSR)."""
    return pbmc[:N_SUB].copy()


@pytest.fixture(scope="module")
def files(tmp_path_factory, sub) -> dict[str, Path]:
    """Subsets of PBMC written once as .h5ad: 'all' (300 cells), 'a' (cells 0-150), 'b' (cells 150-300)."""
    folder = tmp_path_factory.mktemp("inputs")
    return {"all": write_h5ad(sub, folder / "all.h5ad"), "a": write_h5ad(sub[:150], folder / "a.h5ad"),
            "b": write_h5ad(sub[150:], folder / "b.h5ad")}


@pytest.fixture(scope="module")
def file_c(tmp_path_factory, pbmc) -> Path:
    return write_h5ad(pbmc[N_SUB:N_SUB + 100], tmp_path_factory.mktemp("inputs_c") / "c.h5ad")


@pytest.fixture(scope="module")
def base(tmp_path_factory, files) -> Corpus:
    """A read-only corpus of the 300-cell subset, with cell-type labels (tests must not modify it)."""
    return prepare([str(files["all"])], tmp_path_factory.mktemp("base") / "corpus",
                   opts(columns={"cell_type": "cell_type"}), log=lambda _: None)


def write_h5ad(adata: anndata.AnnData, path: Path) -> Path:
    adata = adata.copy() if adata.is_view else adata
    adata.uns = {}
    adata.write_h5ad(path)
    return path


def opts(**kw) -> PrepareOptions:
    return PrepareOptions(progress=False, **kw)


def vocab_index(corpus_path: Path) -> dict[str, int]:
    """gene id -> token id, read from vocab.tsv with pandas (not through scfm.data.vocab)."""
    v = pd.read_csv(Path(corpus_path) / "vocab.tsv", sep="\t", dtype={"gene_id": str}, keep_default_na=False)
    return dict(zip(v.gene_id, v.token_id))


def column_tokens(keys, index: dict[str, int]) -> np.ndarray:
    return np.array([index.get(k, -1) if isinstance(k, str) else -1 for k in keys], dtype=np.int64)


def expected_cells(X, tokens: np.ndarray, policy: str = "sum") -> list[tuple[np.ndarray, np.ndarray]]:
    """Per input cell: ascending token ids and counts of its non-zero in-vocabulary genes.

    ``tokens[j]`` is the token of input column ``j`` (-1: out of vocabulary). Several columns on one token:
    'sum' adds their counts, 'first' keeps the lowest column.
    """
    coo = sp.coo_matrix(X)
    tok = tokens[coo.col]
    keep = (tok >= 0) & (coo.data != 0)
    df = pd.DataFrame({"row": coo.row[keep], "tok": tok[keep], "col": coo.col[keep],
                       "v": coo.data[keep].astype(np.int64)})
    if policy == "first":
        valid = tokens >= 0
        first_col = pd.Series(np.nonzero(valid)[0]).groupby(tokens[valid]).min()
        df = df[df.col.to_numpy() == first_col.loc[df.tok].to_numpy()]
    g = df.groupby(["row", "tok"], sort=True).v.sum().reset_index()
    g = g[g.v != 0]
    bounds = np.searchsorted(g.row.to_numpy(), np.arange(X.shape[0] + 1))
    t, v = g.tok.to_numpy(), g.v.to_numpy()
    return [(t[bounds[i]:bounds[i + 1]], v[bounds[i]:bounds[i + 1]]) for i in range(X.shape[0])]


def corpus_cells(corpus: Corpus) -> list[tuple[np.ndarray, np.ndarray]]:
    return [corpus.cell(i, j) for i in range(corpus.n_shards) for j in range(corpus.shard(i).n_cells)]


def corpus_obs(corpus: Corpus) -> pd.DataFrame:
    return pd.concat([corpus.obs(i) for i in range(corpus.n_shards)], ignore_index=True)


def assert_cells_equal(got, want) -> None:
    assert len(got) == len(want)
    for i, ((g_ids, g_counts), (w_ids, w_counts)) in enumerate(zip(got, want)):
        assert np.array_equal(g_ids, w_ids), f"cell {i}: gene ids differ"
        assert np.array_equal(g_counts, w_counts), f"cell {i}: counts differ"


def row_sums(X) -> np.ndarray:
    return np.asarray(sp.csr_matrix(X).sum(axis=1), dtype=np.float64).ravel().astype(np.int64)


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden files included), keyed by relative path."""
    out = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            p = Path(root) / name
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def partial_of(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def assert_nothing_published(out: Path) -> None:
    """No corpus at ``out``; a staging folder may remain, but never one that claims to be complete."""
    assert not out.exists(), f"{out} exists after a failed prepare"
    staging = partial_of(out)
    if staging.exists():
        manifest = staging / "manifest.json"
        if manifest.is_file():
            assert json.loads(manifest.read_text())["complete"] is False
        with pytest.raises(ScfmInputError):
            Corpus(staging)


def assert_message(err: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(err.value)
    for part in parts:
        assert part in msg, f"{part!r} not in message:\n{msg}"
    assert "Fix:" in msg, f"no fix hint in message:\n{msg}"
    return msg


# ---------------------------------------------------------------------------------------------------------
# A. happy path
# ---------------------------------------------------------------------------------------------------------
def test_layout_manifest_and_vocab(base, files, sub):
    root = base.path
    assert not partial_of(root).exists()
    for name in ("manifest.json", "vocab.tsv", "gene_stats.parquet", "shards/00000/gene_ids.memmap",
                 "shards/00000/counts.memmap", "shards/00000/offsets.memmap", "shards/00000.obs.parquet"):
        assert (root / name).is_file(), name
    m = json.loads((root / "manifest.json").read_text())
    assert m["format"] == "scfm-corpus" and m["complete"] is True
    assert m["n_cells"] == N_SUB == base.n_cells
    assert m["n_tokens"] == sub.X.nnz == base.n_tokens  # every PBMC gene is in the built vocabulary
    assert m["vocab"]["sha256"] == hashlib.sha256((root / "vocab.tsv").read_bytes()).hexdigest()
    [src] = m["sources"]
    assert src["sha256"] == hashlib.sha256(files["all"].read_bytes()).hexdigest()
    assert Path(src["path"]) == files["all"].resolve()
    assert (src["n_cells_in"], src["n_cells"], src["n_empty_cells"], src["n_genes_out_of_vocab"]) == (N_SUB, N_SUB,
                                                                                                        0, 0)
    # manifest file entries match the files on disk
    for shard in m["shards"]:
        for rel, meta in shard["files"].items():
            p = root / "shards" / rel
            assert p.stat().st_size == meta["bytes"]
            assert hashlib.sha256(p.read_bytes()).hexdigest() == meta["sha256"]
    # vocab: special tokens first, then the input's Ensembl ids sorted, with their symbols
    v = pd.read_csv(root / "vocab.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(v.columns) == ["token_id", "gene_id", "symbol"]
    assert list(v.gene_id[:4]) == ["<pad>", "<mask>", "<cls>", "<eos>"]
    assert list(v.gene_id[4:]) == sorted(sub.var_names)
    symbols = dict(zip(sub.var_names, sub.var.gene_symbols))
    assert all(symbols[g] == s for g, s in zip(v.gene_id[4:], v.symbol[4:]))
    base.verify()
    Corpus(root, verify=True)


def test_every_cell_reads_back_exactly(base, sub):
    tokens = column_tokens(list(sub.var_names), vocab_index(base.path))
    assert (tokens >= 0).all()
    got = corpus_cells(base)
    assert_cells_equal(got, expected_cells(sub.X, tokens))
    for ids, counts in got:
        assert ids.dtype == np.int32 and counts.dtype == np.int32
        assert np.all(np.diff(ids) > 0), "gene ids within a cell must be strictly ascending"
        assert np.all(counts > 0)


def test_obs_total_counts_labels_and_split_key(base, sub):
    obs = corpus_obs(base)
    assert list(obs.columns[:5]) == ["cell_id", "source", "total_counts", "n_genes", "split_key"]
    assert list(obs.cell_id) == list(sub.obs_names)
    assert (obs.source == "all.h5ad").all()
    assert np.array_equal(obs.total_counts.to_numpy(), row_sums(sub.X))
    assert np.array_equal(obs.n_genes.to_numpy(), np.diff(sp.csr_matrix(sub.X).indptr))
    labels = sub.obs.cell_type.astype(object).where(sub.obs.cell_type.notna(), None).tolist()
    assert obs.cell_type.tolist() == labels
    assert base.columns == {"cell_type": "cell_type"}
    assert ((obs.split_key >= 0) & (obs.split_key < 1)).all() and obs.split_key.nunique() == N_SUB
    assert np.array_equal(base.shard(0).total_counts, obs.total_counts.to_numpy()[: base.shard(0).n_cells])


def test_shard_tensordict_matches_the_memmaps(base):
    td = base.shard_tensordict(0)
    assert set(td.keys()) == {"gene_ids", "counts", "offsets"}
    s = base.shard(0)
    for key in ("gene_ids", "counts", "offsets"):
        assert np.array_equal(td[key].numpy(), np.asarray(getattr(s, key)))
    assert td["offsets"][0] == 0 and td["offsets"][-1] == len(td["gene_ids"]) == base.manifest["shards"][0][
        "n_tokens"]


def test_shards_split_at_cell_and_token_limits(tmp_path, files, sub, base):
    shard_cells, shard_tokens = 70, 60_000
    c = prepare([str(files["all"])], tmp_path / "c",
                opts(shard_cells=shard_cells, shard_tokens=shard_tokens, chunk_cells=64), log=lambda _: None)
    lengths = np.diff(sp.csr_matrix(sub.X).indptr)
    sizes = [s["n_cells"] for s in c.manifest["shards"]]
    tokens = [s["n_tokens"] for s in c.manifest["shards"]]
    assert c.n_shards > 3 and sum(sizes) == N_SUB
    assert [s["name"] for s in c.manifest["shards"]] == [f"{i:05d}" for i in range(c.n_shards)]
    start = 0
    for k, (n, t) in enumerate(zip(sizes, tokens)):
        assert n <= shard_cells and t <= shard_tokens
        assert t == lengths[start:start + n].sum() == c.shard(k).offsets[-1]
        if k < c.n_shards - 1:  # greedy: a shard closes only when the next cell does not fit
            assert n == shard_cells or t + lengths[start + n] > shard_tokens
        start += n
    assert any(n == shard_cells for n in sizes) and any(n < shard_cells for n in sizes[:-1])
    # reading across shards gives every cell, in input order, as the one-shard corpus
    assert_cells_equal(corpus_cells(c), corpus_cells(base))
    assert list(corpus_obs(c).cell_id) == list(sub.obs_names)
    pd.testing.assert_frame_equal(c.gene_stats, base.gene_stats)


def test_a_cell_longer_than_the_token_budget_gets_its_own_shard(tmp_path, sub):
    small = write_h5ad(sub[:40], tmp_path / "small.h5ad")
    lengths = np.diff(sp.csr_matrix(sub[:40].X).indptr)
    budget = int(np.median(lengths))
    c = prepare([str(small)], tmp_path / "c", opts(shard_tokens=budget), log=lambda _: None)
    start = 0
    for s in c.manifest["shards"]:
        assert s["n_tokens"] <= budget or s["n_cells"] == 1
        start += s["n_cells"]
    assert start == 40
    assert sum(s["n_cells"] == 1 and s["n_tokens"] > budget for s in c.manifest["shards"]) == (lengths > budget).sum()
    tokens = column_tokens(list(sub.var_names), vocab_index(c.path))
    assert_cells_equal(corpus_cells(c), expected_cells(sub[:40].X, tokens))


def test_two_inputs_in_one_corpus(tmp_path, files, sub, base):
    c = prepare([str(files["a"]), str(files["b"])], tmp_path / "c", opts(shard_cells=100), log=lambda _: None)
    m = c.manifest
    assert [s["name"] for s in m["sources"]] == ["a.h5ad", "b.h5ad"]
    assert [s["n_cells"] for s in m["sources"]] == [150, 150]
    # shards never mix sources: a 150-cell input at 100 cells per shard gives two shards each
    assert [s["shards"] for s in m["sources"]] == [["00000", "00001"], ["00002", "00003"]]
    obs = corpus_obs(c)
    assert list(obs.source) == ["a.h5ad"] * 150 + ["b.h5ad"] * 150
    assert list(obs.cell_id) == list(sub.obs_names)
    assert_cells_equal(corpus_cells(c), corpus_cells(base))
    assert (c.path / "vocab.tsv").read_bytes() == (base.path / "vocab.tsv").read_bytes()
    pd.testing.assert_frame_equal(c.gene_stats, base.gene_stats)


def test_10x_mtx_folder_and_h5_give_identical_shards(tmp_path):
    log: list[str] = []
    mtx = prepare([str(V3_MTX)], tmp_path / "mtx", opts(shard_cells=500), log=log.append)
    h5 = prepare([str(V3_H5)], tmp_path / "h5", opts(shard_cells=500), log=log.append)
    assert mtx.n_cells == h5.n_cells == 1107 and mtx.n_shards == h5.n_shards == 3
    arrays = [f"shards/{s['name']}/{k}.memmap" for s in mtx.manifest["shards"] for k in corpus_mod.SHARD_ARRAYS]
    for rel in ["vocab.tsv", "gene_stats.parquet", *arrays]:
        assert (mtx.path / rel).read_bytes() == (h5.path / rel).read_bytes(), rel
    a, b = corpus_obs(mtx), corpus_obs(h5)
    assert (a.source == "filtered_feature_bc_matrix").all() and (b.source == "filtered_feature_bc_matrix.h5").all()
    pd.testing.assert_frame_equal(a.drop(columns="source"), b.drop(columns="source"))
    # content checked against scipy's own Matrix Market reader (genes x cells)
    X = sp.csr_matrix(scipy.io.mmread(V3_MTX / "matrix.mtx.gz").T)
    features = pd.read_csv(V3_MTX / "features.tsv.gz", sep="\t", header=None)
    tokens = column_tokens(list(features[0]), vocab_index(mtx.path))
    keep = row_sums(X) > 0
    assert_cells_equal(corpus_cells(mtx), [c for c, k in zip(expected_cells(X, tokens), keep) if k])
    assert np.array_equal(a.total_counts.to_numpy(), row_sums(X)[keep])
    assert list(a.cell_id) == list(pd.read_csv(V3_MTX / "barcodes.tsv.gz", header=None)[0][keep])


def test_geneformer_vocabulary_counts_genes_out_of_vocab(tmp_path, files, sub):
    path = geneformer_dictionary("geneformer_gc30M", kind="tokens")
    assert str(path).startswith(os.environ["SCFM_CACHE"])
    token_dict = json.loads(Path(path).read_text())
    log: list[str] = []
    c = prepare([str(files["all"])], tmp_path / "c", opts(vocab=str(path)), log=log.append)
    # the corpus's vocabulary is Geneformer's, token for token
    v = pd.read_csv(c.path / "vocab.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert dict(zip(v.gene_id, v.token_id.astype(int))) == token_dict
    oov = [g for g in sub.var_names if g not in token_dict]
    assert 0 < len(oov) < len(sub.var_names)
    [src] = c.manifest["sources"]
    assert src["n_genes_out_of_vocab"] == len(oov)
    assert src["n_genes_in"] == sub.n_vars
    assert src["out_of_vocab_examples"] and set(src["out_of_vocab_examples"]) <= set(oov)
    X = sp.csr_matrix(sub.X)
    in_vocab = np.array([g in token_dict for g in sub.var_names])
    assert src["out_of_vocab_count_fraction"] == pytest.approx(X[:, ~in_vocab].sum() / X.sum())
    assert any(f"{len(oov):,} of {sub.n_vars:,} genes not in the vocabulary" in line for line in log)
    # cells hold only in-vocabulary genes, with Geneformer's token ids; the total is still over all genes
    tokens = np.array([token_dict.get(g, -1) for g in sub.var_names])
    want = expected_cells(X, tokens)
    keep = [len(ids) > 0 for ids, _ in want]
    assert src["n_empty_cells"] == len(keep) - sum(keep)
    assert_cells_equal(corpus_cells(c), [w for w, k in zip(want, keep) if k])
    assert np.array_equal(corpus_obs(c).total_counts.to_numpy(), row_sums(X)[keep])


def test_geneformer_vocabulary_by_name(tmp_path, files):
    c = prepare([str(files["a"])], tmp_path / "c", opts(vocab="geneformer_gc30M"), log=lambda _: None)
    path = geneformer_dictionary("geneformer_gc30M", kind="tokens")
    assert len(c.vocab) == len(json.loads(Path(path).read_text()))


def test_symbol_only_h5ad_with_gene_map(tmp_path, sub):
    """A var indexed by symbols (made unique with -1 suffixes) + a symbol -> Ensembl table."""
    sym = sub.copy()
    sym.var_names = pd.Index(sub.var.gene_symbols.astype(str))
    sym.var_names_make_unique()
    sym.var = pd.DataFrame(index=sym.var_names)  # no id column at all
    path = write_h5ad(sym, tmp_path / "symbols.h5ad")
    table = pd.DataFrame({"symbol": sub.var.gene_symbols.to_numpy(), "gene_id": sub.var_names.to_numpy()})
    table = table[~table.symbol.duplicated(keep=False)]  # a symbol with several ids is ambiguous: left out
    table.to_csv(tmp_path / "map.tsv", sep="\t", index=False)
    with pytest.raises(ScfmInputError) as err:
        prepare([str(path)], tmp_path / "nomap", opts(), log=lambda _: None)
    assert_message(err, str(path), "no Ensembl id", "gene_map=", "gene_key=symbol")
    assert_nothing_published(tmp_path / "nomap")

    c = prepare([str(path)], tmp_path / "c", opts(gene_map=str(tmp_path / "map.tsv")), log=lambda _: None)
    v = pd.read_csv(c.path / "vocab.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(v.gene_id[4:]) == sorted(table.gene_id)
    mapping = dict(zip(table.symbol, table.gene_id))
    tokens = column_tokens([mapping.get(s) for s in sym.var_names], vocab_index(c.path))
    [src] = c.manifest["sources"]
    assert src["n_genes_out_of_vocab"] == int((tokens < 0).sum()) == sub.n_vars - len(table)
    assert_cells_equal(corpus_cells(c), expected_cells(sub.X, tokens))


def test_symbol_only_10x_folder_with_gene_map(tmp_path):
    """Cell Ranger 1.2.0 mtx (hg19 symbols only) mapped through the 3.0.0 fixture's symbol -> Ensembl table."""
    features = pd.read_csv(V3_MTX / "features.tsv.gz", sep="\t", header=None, names=["gene_id", "symbol", "type"])
    features[["symbol", "gene_id"]].to_csv(tmp_path / "map.csv", index=False)
    c = prepare([str(V2_MTX)], tmp_path / "c", opts(gene_map=str(tmp_path / "map.csv")), log=lambda _: None)
    genes = pd.read_csv(V2_MTX / "genes.tsv", sep="\t", header=None)
    mapping = dict(zip(features.symbol, features.gene_id))
    tokens = column_tokens([mapping.get(s) for s in genes[1]], vocab_index(c.path))
    assert all(g.startswith("ENSG") for g in c.vocab.gene_ids)
    X = sp.csr_matrix(scipy.io.mmread(V2_MTX / "matrix.mtx").T)
    want = expected_cells(X, tokens)
    keep = [len(ids) > 0 for ids, _ in want]
    [src] = c.manifest["sources"]
    assert src["n_genes_out_of_vocab"] == int((tokens < 0).sum()) == 343 - 274
    assert src["n_empty_cells"] == len(keep) - sum(keep)
    assert_cells_equal(corpus_cells(c), [w for w, k in zip(want, keep) if k])


def _duplicated_symbol_columns(sub) -> tuple[str, list[int]]:
    """A symbol that names several PBMC columns, preferring one with a cell where both are non-zero."""
    symbols = sub.var.gene_symbols.astype(str).to_numpy()
    dup = pd.Series(symbols)[pd.Series(symbols).duplicated(keep=False)]
    X = sp.csc_matrix(sub.X)
    best = None
    for s in dup.unique():
        cols = list(np.nonzero(symbols == s)[0])
        both = (X[:, cols] != 0).sum(axis=1).A.ravel() >= 2
        if best is None or both.any():
            best = (s, cols)
            if both.any():
                break
    return best


def test_gene_key_symbol_and_duplicated_symbols(tmp_path, files, sub):
    symbols = sub.var.gene_symbols.astype(str).to_numpy()
    n_dup = int(pd.Series(symbols).duplicated(keep=False).groupby(symbols).any().sum())
    assert n_dup > 0  # PBMC has symbols shared by several Ensembl ids
    s, cols = _duplicated_symbol_columns(sub)
    # default: an error naming an example and the two ways out
    with pytest.raises(ScfmInputError) as err:
        prepare([str(files["all"])], tmp_path / "err", opts(gene_key="symbol"), log=lambda _: None)
    msg = assert_message(err, str(files["all"]), f"{n_dup} genes appear in several input columns",
                         "duplicate_genes=sum", "duplicate_genes=first")
    assert any(sym in msg for sym in pd.Series(symbols)[pd.Series(symbols).duplicated()])
    assert_nothing_published(tmp_path / "err")

    X = sp.csr_matrix(sub.X)
    for policy in ("sum", "first"):
        c = prepare([str(files["all"])], tmp_path / policy, opts(gene_key="symbol", duplicate_genes=policy),
                    log=lambda _: None)
        v = pd.read_csv(c.path / "vocab.tsv", sep="\t", dtype=str, keep_default_na=False)
        assert list(v.gene_id[4:]) == sorted(set(symbols))
        [src] = c.manifest["sources"]
        assert src["n_duplicate_genes"] == n_dup and src["duplicate_genes"] == policy
        tokens = column_tokens(list(symbols), vocab_index(c.path))
        got = corpus_cells(c)
        assert_cells_equal(got, expected_cells(X, tokens, policy))
        # the chosen duplicated symbol, cell by cell, against the raw columns
        t = vocab_index(c.path)[s]
        raw = X[:, cols].toarray().astype(np.int64)
        want = raw.sum(axis=1) if policy == "sum" else raw[:, 0]
        have = np.array([counts[ids == t].sum() for ids, counts in got])
        assert np.array_equal(have, want), policy
        assert np.array_equal(corpus_obs(c).total_counts.to_numpy(), row_sums(X))  # all columns, always


# ---------------------------------------------------------------------------------------------------------
# B. bad input
# ---------------------------------------------------------------------------------------------------------
def _bad_counts(sub, kind: str) -> tuple[anndata.AnnData, int, int]:
    """A copy of 60 cells whose matrix is broken; returns it with the (row, column) of the first bad value."""
    a = sub[:60].copy()
    X = sp.csr_matrix(a.X, dtype=np.float32)
    X.sort_indices()  # so the first stored value of a row is its first column
    if kind == "log-normalised":
        totals = np.asarray(X.sum(axis=1)).ravel()
        X.data = np.log1p(X.data / np.repeat(totals, np.diff(X.indptr)) * 1e4).astype(np.float32)
        row, k = 0, 0
    else:
        row, k = 17, 3
        X.data[X.indptr[row] + k] = -3.0 if kind == "negative" else np.nan
    col = int(X.indices[X.indptr[row] + k])
    a.X = X
    return a, row, col


@pytest.mark.parametrize("kind", ["log-normalised", "negative", "NaN"])
def test_bad_counts_are_refused(tmp_path, sub, kind):
    bad, row, col = _bad_counts(sub, kind)
    path = write_h5ad(bad, tmp_path / "bad.h5ad")
    out = tmp_path / "corpus"
    with pytest.raises(ScfmInputError) as err:
        prepare([str(path)], out, opts(), log=lambda _: None)
    what = {"log-normalised": "is not an integer", "negative": "is negative", "NaN": "is not finite"}[kind]
    assert_message(err, str(path), what, repr(bad.obs_names[row]), repr(bad.var.gene_symbols.iloc[col]),
                   "raw counts")
    assert_nothing_published(out)
    # the user replaces the file with raw counts and reruns the same command: it completes
    write_h5ad(sub[:60], path)
    c = prepare([str(path)], out, opts(), log=lambda _: None)
    assert c.n_cells == 60 and not partial_of(out).exists()


def test_empty_cells_are_skipped_and_counted(tmp_path, sub):
    a = sub[:50].copy()
    X = sp.lil_matrix(a.X)
    empty = [3, 10, 49]
    for r in empty:
        X[r, :] = 0
    a.X = sp.csr_matrix(X, dtype=np.float32)
    path = write_h5ad(a, tmp_path / "holes.h5ad")
    log: list[str] = []
    c = prepare([str(path)], tmp_path / "c", opts(chunk_cells=8), log=log.append)
    [src] = c.manifest["sources"]
    assert (src["n_cells_in"], src["n_cells"], src["n_empty_cells"]) == (50, 47, 3)
    assert any("3 empty skipped" in line for line in log)
    keep = np.setdiff1d(np.arange(50), empty)
    assert list(corpus_obs(c).cell_id) == list(a.obs_names[keep])
    tokens = column_tokens(list(a.var_names), vocab_index(c.path))
    assert_cells_equal(corpus_cells(c), [expected_cells(a.X, tokens)[i] for i in keep])

    out = tmp_path / "strict"
    with pytest.raises(ScfmInputError) as err:
        prepare([str(path)], out, opts(empty_cells="error", chunk_cells=8), log=lambda _: None)
    assert_message(err, str(path), a.obs_names[3], "empty_cells=skip")
    assert_nothing_published(out)


def test_all_cells_empty_is_an_error(tmp_path, sub):
    a = sub[:5].copy()
    a.X = sp.csr_matrix(a.shape, dtype=np.float32)
    path = write_h5ad(a, tmp_path / "zeros.h5ad")
    with pytest.raises(ScfmInputError, match="no cells were written") as err:
        prepare([str(path)], tmp_path / "c", opts(), log=lambda _: None)
    assert str(path) in str(err.value)
    assert_nothing_published(tmp_path / "c")


def test_duplicate_cell_ids_within_one_input(tmp_path, sub):
    a = sub[:20].copy()
    names = list(a.obs_names)
    names[7] = names[2]
    a.obs_names = names
    path = write_h5ad(a, tmp_path / "dup.h5ad")
    out = tmp_path / "c"
    with pytest.raises(ScfmInputError) as err:
        prepare([str(path)], out, opts(), log=lambda _: None)
    assert_message(err, str(path), names[2], "unique")
    assert not out.exists() and not partial_of(out).exists()


def test_duplicate_cell_ids_across_inputs(tmp_path, files, sub):
    clash = write_h5ad(sub[140:200], tmp_path / "clash.h5ad")  # cells 140-149 are also in a.h5ad
    out = tmp_path / "c"
    with pytest.raises(ScfmInputError) as err:
        prepare([str(files["a"]), str(clash)], out, opts(), log=lambda _: None)
    msg = assert_message(err, str(clash), "10 cell ids already appear in an earlier input", "unique")
    assert sub.obs_names[140] in msg
    assert_nothing_published(out)
    # fix the second input (prefix its ids) and rerun: the first input is not written again
    fixed = sub[140:200].copy()
    fixed.obs_names = ["s2_" + n for n in fixed.obs_names]
    write_h5ad(fixed, clash)
    log: list[str] = []
    c = prepare([str(files["a"]), str(clash)], out, opts(), log=log.append)
    assert any(line.startswith(f"skip {files['a']}") for line in log)
    assert c.n_cells == 210 and list(corpus_obs(c).cell_id[150:152]) == ["s2_" + n for n in sub.obs_names[140:142]]


def test_genes_absent_from_a_given_vocabulary(tmp_path, files, sub):
    from scfm.data.vocab import Vocab

    kept = sorted(sub.var_names)[::3]
    Vocab.build(kept).save(tmp_path / "vocab.tsv")
    log: list[str] = []
    c = prepare([str(files["all"])], tmp_path / "c", opts(vocab=str(tmp_path / "vocab.tsv")), log=log.append)
    [src] = c.manifest["sources"]
    n_oov = sub.n_vars - len(kept)
    assert src["n_genes_out_of_vocab"] == n_oov
    assert set(src["out_of_vocab_examples"]) <= set(sub.var_names) - set(kept)
    assert any(f"{n_oov:,} of {sub.n_vars:,} genes not in the vocabulary" in line for line in log)
    assert (c.path / "vocab.tsv").read_bytes() == (tmp_path / "vocab.tsv").read_bytes()
    tokens = column_tokens(list(sub.var_names), vocab_index(c.path))
    assert_cells_equal(corpus_cells(c), expected_cells(sub.X, tokens))
    assert np.array_equal(corpus_obs(c).total_counts.to_numpy(), row_sums(sub.X))


def test_mixed_symbol_and_ensembl_index(tmp_path, sub):
    a = sub[:10].copy()
    names = list(a.var_names)
    names[::2] = [f"{s}_{i}" for i, s in enumerate(a.var.gene_symbols[::2])]  # unique symbols, half of them
    a.var_names = names
    a.var = pd.DataFrame(index=a.var_names)
    path = write_h5ad(a, tmp_path / "mixed.h5ad")
    out = tmp_path / "c"
    with pytest.raises(ScfmInputError) as err:
        prepare([str(path)], out, opts(), log=lambda _: None)
    assert_message(err, str(path), "mixes Ensembl ids", names[1], names[0], "gene_id_column=")
    assert not out.exists() and not partial_of(out).exists()


def test_missing_label_column(tmp_path, files):
    out = tmp_path / "c"
    with pytest.raises(ScfmInputError) as err:
        prepare([str(files["a"])], out, opts(columns={"cell_type": "nope"}), log=lambda _: None)
    assert_message(err, str(files["a"]), "'nope'", "cell_type", "columns=")
    assert_nothing_published(out)


def test_missing_label_column_then_corrected_command_runs(tmp_path, files):
    out = tmp_path / "c"
    with pytest.raises(ScfmInputError):
        prepare([str(files["a"])], out, opts(columns={"cell_type": "nope"}), log=lambda _: None)
    c = prepare([str(files["a"])], out, opts(columns={"cell_type": "cell_type"}), log=lambda _: None)
    assert "cell_type" in c.obs(0).columns


@pytest.mark.parametrize("kind", ["random bytes", "truncated h5ad"])
def test_unreadable_input(tmp_path, files, kind):
    path = tmp_path / "broken.h5ad"
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(50_000))
    else:
        data = files["a"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "c"
    with pytest.raises(ScfmInputError) as err:
        prepare([str(path)], out, opts(), log=lambda _: None)
    assert_message(err, str(path), "truncated", "re-copy")
    assert not out.exists() and not partial_of(out).exists()


def test_output_that_is_not_a_corpus_is_left_alone(tmp_path, files):
    out = tmp_path / "results"
    out.mkdir()
    keep = out / "notes.txt"
    keep.write_text("precious")
    before = keep.stat()
    with pytest.raises(ScfmInputError) as err:
        prepare([str(files["a"])], out, opts(), log=lambda _: None)
    assert_message(err, str(out), "not a scfm corpus", "new output folder")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert keep.read_text() == "precious" and keep.stat().st_mtime_ns == before.st_mtime_ns
    assert not partial_of(out).exists()
    # an output path that is a file is refused the same way
    with pytest.raises(ScfmInputError, match="not a scfm corpus"):
        prepare([str(files["a"])], keep, opts(), log=lambda _: None)
    assert keep.read_text() == "precious"
    # an existing empty folder is fine
    (tmp_path / "empty").mkdir()
    assert prepare([str(files["a"])], tmp_path / "empty", opts(), log=lambda _: None).n_cells == 150


@pytest.fixture
def corpus_copy(tmp_path, base) -> Path:
    dst = tmp_path / "corpus"
    shutil.copytree(base.path, dst)
    return dst


def test_truncated_shard_is_detected_on_open(corpus_copy):
    f = corpus_copy / "shards" / "00000" / "counts.memmap"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCorpusError) as err:
        Corpus(corpus_copy)
    assert_message(err, str(f), "truncated", "re-run scfm-prepare")


def test_missing_shard_file_is_detected_on_open(corpus_copy):
    f = corpus_copy / "shards" / "00000.obs.parquet"
    f.unlink()
    with pytest.raises(CorruptCorpusError) as err:
        Corpus(corpus_copy)
    assert_message(err, str(f), "missing")


def test_flipped_byte_is_detected_by_verify(corpus_copy):
    f = corpus_copy / "shards" / "00000" / "gene_ids.memmap"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    Corpus(corpus_copy)  # sizes match: opening is cheap and does not notice
    with pytest.raises(CorruptCorpusError) as err:
        Corpus(corpus_copy, verify=True)
    assert_message(err, str(f), "checksum")
    with pytest.raises(CorruptCorpusError):
        Corpus(corpus_copy).verify()


def _cli_cfg_without_hydra(*overrides: str):
    """conf/prepare.yaml as the app sees it, minus the ``hydra:`` block, with ``key=value`` overrides."""
    from omegaconf import OmegaConf

    from scfm.cli import conf_dir

    cfg = OmegaConf.load(Path(conf_dir()) / "prepare.yaml")
    cfg.pop("hydra", None)
    cfg.pop("defaults", None)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))


def _cli_cfg(*overrides: str):
    """The config the ``scfm-prepare`` Hydra app composes."""
    from hydra import compose, initialize_config_dir

    from scfm.cli import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name="prepare", overrides=list(overrides))


def test_cli_run_prepares_and_verify_reports_corruption(tmp_path, files, capsys):
    from scfm.cli.prepare import run

    out = tmp_path / "cli"
    c = run(_cli_cfg_without_hydra(f"input=[{files['a']},{files['b']}]", f"output={out}", "progress=false",
                                   "shard_cells=100", "columns.cell_type=cell_type", "verify=true"))
    assert c.n_cells == 300 and c.n_shards == 4 and "cell_type" in c.obs(0).columns
    run(_cli_cfg_without_hydra(f"output={out}", "verify=true"))
    assert "every checksum matches" in capsys.readouterr().out
    f = out / "shards" / "00003.obs.parquet"
    data = bytearray(f.read_bytes())
    data[100] ^= 0x01
    f.write_bytes(bytes(data))
    Corpus(out)
    with pytest.raises(CorruptCorpusError) as err:
        run(_cli_cfg_without_hydra(f"output={out}", "verify=true"))
    assert_message(err, str(f), "checksum")
    with pytest.raises(ScfmInputError) as err:
        run(_cli_cfg_without_hydra(f"output={tmp_path / 'nothing'}"))
    assert_message(err, "no input given", "verify=true")


def test_cli_config_composes(tmp_path, files):
    from scfm.cli.prepare import run

    cfg = _cli_cfg(f"input={files['a']}", f"output={tmp_path / 'c'}", "progress=false")
    assert run(cfg).n_cells == 150


def test_cli_documented_columns_override(tmp_path, files):
    from scfm.cli.prepare import run

    cfg = _cli_cfg(f"input={files['a']}", f"output={tmp_path / 'c'}", "progress=false", "columns.cell_type=cell_type")
    assert "cell_type" in run(cfg).obs(0).columns


def test_cli_subprocess_reports_corruption(corpus_copy):
    f = corpus_copy / "shards" / "00000" / "offsets.memmap"
    data = bytearray(f.read_bytes())
    data[8] ^= 0x01
    f.write_bytes(bytes(data))
    exe = Path(sys.executable).with_name("scfm-prepare")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "scfm.cli.prepare"]
    r = subprocess.run([*cmd, f"output={corpus_copy}", "verify=true"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "scfm-prepare:" in r.stderr and str(f) in r.stderr and "checksum" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------------------
# C. interruption, resumption, appending
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean_ab(tmp_path_factory, files) -> Corpus:
    """A clean two-input run (a, b; 40 cells per shard), for byte comparisons."""
    return prepare([str(files["a"]), str(files["b"])], tmp_path_factory.mktemp("clean") / "corpus",
                   opts(shard_cells=40), log=lambda _: None)


def test_interrupted_prepare_resumes_to_the_same_bytes(tmp_path, files, clean_ab, monkeypatch):
    flush = prepare_mod._ShardWriter.flush
    written = {"n": 0}

    def failing_flush(self):
        if self.n_cells and written["n"] == 6:  # input a: 4 shards; input b: 2 written, then the "disk" fails
            raise OSError("No space left on device (simulated)")
        if self.n_cells:
            written["n"] += 1
        flush(self)

    out = tmp_path / "corpus"
    inputs = [str(files["a"]), str(files["b"])]
    monkeypatch.setattr(prepare_mod._ShardWriter, "flush", failing_flush)
    with pytest.raises(OSError, match="simulated"):
        prepare(inputs, out, opts(shard_cells=40), log=lambda _: None)
    monkeypatch.undo()

    assert_nothing_published(out)
    staging = partial_of(out)
    manifest = json.loads((staging / "manifest.json").read_text())
    assert [s["name"] for s in manifest["sources"]] == ["a.h5ad"]
    assert (staging / "shards" / "00005").is_dir()  # b's first shards exist on disk, not in the manifest
    assert len(manifest["shards"]) == 4

    log: list[str] = []
    c = prepare(inputs, out, opts(shard_cells=40), log=log.append)
    assert any(line.startswith(f"skip {files['a']}") for line in log)
    assert not staging.exists()
    assert c.n_cells == 300 and c.n_shards == 8
    assert tree_digest(out) == tree_digest(clean_ab.path)


def test_rerun_on_a_complete_corpus_changes_nothing(tmp_path, files, clean_ab):
    out = tmp_path / "corpus"
    shutil.copytree(clean_ab.path, out)
    before = tree_digest(out)
    log: list[str] = []
    c = prepare([str(files["a"]), str(files["b"])], out, opts(shard_cells=40), log=log.append)
    assert [line.split(":")[0] for line in log] == [f"skip {files['a']}", f"skip {files['b']}"]
    assert c.n_cells == 300
    assert tree_digest(out) == before
    assert not partial_of(out).exists()


def test_adding_an_input_appends_shards_and_updates_gene_stats(tmp_path, files, file_c, clean_ab):
    out = tmp_path / "corpus"
    shutil.copytree(clean_ab.path, out)
    old = tree_digest(out)
    log: list[str] = []
    c = prepare([str(files["a"]), str(files["b"]), str(file_c)], out, opts(shard_cells=40), log=log.append)
    assert sum(line.startswith("skip ") for line in log) == 2
    assert c.n_cells == 400 and c.n_shards == 11
    assert c.manifest["sources"][-1]["shards"] == ["00008", "00009", "00010"]
    new = tree_digest(out)
    for rel, digest in old.items():  # the old shards and the vocabulary are untouched
        if rel.startswith("shards/") or rel == "vocab.tsv" or rel.startswith(".cellhash"):
            assert new[rel] == digest, rel
    assert new["gene_stats.parquet"] != old["gene_stats.parquet"]
    assert c.gene_stats.n_nonzero.sum() == c.n_tokens
    # the same bytes as one clean run of the three inputs
    clean = prepare([str(files["a"]), str(files["b"]), str(file_c)], tmp_path / "clean3", opts(shard_cells=40),
                    log=lambda _: None)
    assert new == tree_digest(clean.path)


def test_appending_with_other_label_columns_is_refused(tmp_path, files, file_c, clean_ab):
    out = tmp_path / "corpus"
    shutil.copytree(clean_ab.path, out)
    before = tree_digest(out)
    with pytest.raises(ScfmInputError) as err:
        prepare([str(file_c)], out, opts(shard_cells=40, columns={"cell_type": "cell_type"}), log=lambda _: None)
    assert_message(err, "label columns", "columns=")
    assert tree_digest(out) == before
    Corpus(out)


def test_a_refused_input_does_not_break_an_existing_corpus(tmp_path, sub, clean_ab):
    out = tmp_path / "corpus"
    shutil.copytree(clean_ab.path, out)
    bad, _, _ = _bad_counts(sub, "log-normalised")
    bad.obs_names = ["new_" + n for n in bad.obs_names]
    path = write_h5ad(bad, tmp_path / "bad.h5ad")
    with pytest.raises(ScfmInputError, match="not an integer"):
        prepare([str(path)], out, opts(shard_cells=40), log=lambda _: None)
    c = Corpus(out, verify=True)  # the 300 cells that were there are still readable
    assert c.n_cells == 300


def test_after_a_failed_first_input_another_input_gets_its_own_vocabulary(tmp_path, sub, files, base):
    half = sub[:60, : sub.n_vars // 2].copy()
    bad, _, _ = _bad_counts(half, "log-normalised")
    out = tmp_path / "corpus"
    with pytest.raises(ScfmInputError):
        prepare([str(write_h5ad(bad, tmp_path / "bad.h5ad"))], out, opts(), log=lambda _: None)
    # the user meant another file (all genes); the corpus must be what a clean run of it gives
    c = prepare([str(files["all"])], out, opts(), log=lambda _: None)
    assert (c.path / "vocab.tsv").read_bytes() == (base.path / "vocab.tsv").read_bytes()


def test_inputs_with_the_same_folder_name_get_distinct_sources(tmp_path):
    import gzip

    folders = []
    for sample in ("s1", "s2"):
        dst = tmp_path / sample / "filtered_feature_bc_matrix"
        shutil.copytree(V3_MTX, dst)
        barcodes = gzip.decompress((V3_MTX / "barcodes.tsv.gz").read_bytes()).decode().split()
        (dst / "barcodes.tsv.gz").write_bytes(gzip.compress("".join(f"{sample}_{b}\n" for b in barcodes).encode()))
        folders.append(str(dst))
    c = prepare(folders, tmp_path / "c", opts(), log=lambda _: None)
    names = [s["name"] for s in c.manifest["sources"]]
    assert len(set(names)) == 2
    assert corpus_obs(c).source.nunique() == 2


def test_input_spec_name_and_mixed_spec_types(tmp_path, files):
    c = prepare([InputSpec(path=str(files["a"]), name="donor1"), str(files["b"])], tmp_path / "c", opts(),
                log=lambda _: None)
    assert list(corpus_obs(c).source.unique()) == ["donor1", "b.h5ad"]
    assert is_corpus(c.path)
