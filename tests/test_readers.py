"""Readers: 10x mtx / h5 fixtures (vendored from scanpy), small h5ad files built here, pbmc3k if present."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfm.data.readers import Source, open_source
from scfm.errors import ScfmInputError

TENX = Path(__file__).parent / "assets" / "10x"
V2_MTX = TENX / "1.2.0" / "filtered_gene_bc_matrices" / "hg19_chr21"
V2_H5 = TENX / "1.2.0" / "filtered_gene_bc_matrices_h5.h5"
MULTI_H5 = TENX / "1.2.0" / "multiple_genomes.h5"
V3_MTX = TENX / "3.0.0" / "filtered_feature_bc_matrix"
V3_H5 = TENX / "3.0.0" / "filtered_feature_bc_matrix.h5"
INT_IDS = TENX / "int-ids"
PBMC = Path("/work/shared/data/pbmc3k")
needs_pbmc = pytest.mark.skipif(not PBMC.exists(), reason="pbmc3k not available (/work/shared/data)")


def read_all(source: Source, chunk_size: int = 8192) -> sp.csr_matrix:
    chunks = list(source.iter_chunks(chunk_size))
    assert [c.start for c in chunks] == list(range(0, source.n_cells, chunk_size))
    cell_ids = source.read_obs().index
    for c in chunks:
        assert c.counts.dtype == np.int32 and c.counts.shape[1] == source.n_genes
        assert c.counts.has_canonical_format
        assert c.obs.index.equals(cell_ids[c.start : c.start + c.counts.shape[0]])
    return sp.vstack([c.counts for c in chunks], format="csr")


def assert_same(a: sp.spmatrix, b: sp.spmatrix | np.ndarray) -> None:
    """Same shape and values (sparse comparison, so large matrices stay cheap)."""
    b = sp.csr_matrix(b)
    assert a.shape == b.shape
    assert (a != b).nnz == 0


def raises(*parts: str):
    """Context: ScfmInputError whose message contains every part."""

    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(ScfmInputError)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.cm.__exit__(*exc)
            msg = str(self.info.value)
            for part in parts:
                assert part in msg, f"{part!r} not in message:\n{msg}"
            return handled

    return _Ctx()


# ---------------------------------------------------------------------------------------------------------
# 10x
# ---------------------------------------------------------------------------------------------------------
def test_v2_mtx_and_h5_agree():
    mtx, h5 = open_source(V2_MTX), open_source(V2_H5)
    assert (mtx.format, h5.format) == ("10x_mtx", "10x_h5")
    assert (mtx.n_cells, mtx.n_genes) == (12, 343)
    a, b = read_all(mtx), read_all(h5)
    assert_same(a, b)
    pd.testing.assert_frame_equal(mtx.var, h5.var)
    pd.testing.assert_frame_equal(mtx.read_obs(), h5.read_obs())
    # matrix.mtx line "201 1 1": gene 201 of cell 1 (1-based); 12 cells with one count each
    assert a.nnz == 12 and a[0, 200] == 1 and a.sum() == 12
    assert mtx.read_obs().index[0] == "AACACGTGTACGCTGC-1"
    # this fixture's genes.tsv has symbols in its id column: no Ensembl ids to report
    assert mtx.var["gene_id"].isna().all() and mtx.var["symbol"].iloc[0] == "DSCAM"
    assert list(mtx.var.columns) == ["gene_id", "symbol"]


def test_v3_mtx_and_h5_agree():
    mtx, h5 = open_source(V3_MTX), open_source(V3_H5)
    a, b = read_all(mtx), read_all(h5)
    assert a.shape == (1107, 507) and a.nnz == 23866
    assert_same(a, b)
    pd.testing.assert_frame_equal(mtx.var, h5.var)
    assert list(mtx.read_obs().index) == list(h5.read_obs().index)
    assert a[0, 457] == 3  # first entry of matrix.mtx.gz: "458 1 3"
    assert mtx.var.iloc[0].to_dict() == {
        "gene_id": "ENSG00000279493",
        "symbol": "CH507-9B2.2",
        "feature_type": "Gene Expression",
    }
    assert (mtx.var["feature_type"] == "Gene Expression").all()


def test_chunks_of_7_concatenate_to_the_whole_matrix():
    for path in (V3_MTX, V3_H5):
        source = open_source(path)
        assert_same(read_all(source, chunk_size=7), read_all(source))
        obs = pd.concat([c.obs for c in source.iter_chunks(7)])
        pd.testing.assert_frame_equal(obs, source.read_obs())


def test_multiple_genomes_need_a_choice():
    with raises("multiple_genomes.h5", "another_genome", "hg19_chr21", "genome="):
        open_source(MULTI_H5)
    other = open_source(MULTI_H5, genome="another_genome")
    m = read_all(other)
    assert m.sum() == 13 and m[2, 282] == 2
    assert other.var["symbol"].iloc[0] == "gene_0"
    assert_same(read_all(open_source(MULTI_H5, genome="hg19_chr21")), read_all(open_source(V2_H5)))
    with raises("multiple_genomes.h5", "mm10"):
        open_source(MULTI_H5, genome="mm10")


def test_v3_h5_genome_filter():
    assert_same(read_all(open_source(V3_H5, genome="GRCh38_chr21")), read_all(open_source(V3_H5)))
    with raises("filtered_feature_bc_matrix.h5", "GRCh38_chr21"):
        open_source(V3_H5, genome="mm10")


def test_integer_ids_and_real_field():
    source = open_source(INT_IDS / "matrix.mtx")  # the matrix file itself names its folder
    m = read_all(source)
    assert source.var["gene_id"].isna().all()  # Entrez ids are not Ensembl ids
    assert list(source.var["symbol"][:2]) == ["Pwwp4b", "Pwwp4a"]
    expected = np.zeros((5, 6), int)
    expected[2, 3:6] = [6, 1, 1]
    assert_same(m, expected)


def test_sha256():
    assert open_source(V3_H5).sha256() == hashlib.sha256(V3_H5.read_bytes()).hexdigest()
    files = sorted(V3_MTX.iterdir())
    expected = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    assert open_source(V3_MTX).sha256() == expected


def test_bad_10x_folders(tmp_path):
    folder = tmp_path / "mtx"
    shutil.copytree(V3_MTX, folder)
    data = (folder / "matrix.mtx.gz").read_bytes()
    (folder / "matrix.mtx.gz").write_bytes(data[: len(data) // 2])
    source = open_source(folder)  # the header is still readable
    with raises("matrix.mtx.gz", "truncated"):
        read_all(source)

    shutil.copy(V3_MTX / "matrix.mtx.gz", folder)
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.write("AAAC-1\n")
    with raises("matrix.mtx.gz", "1 barcodes"):
        open_source(folder)

    (folder / "barcodes.tsv.gz").unlink()
    with raises(str(folder), "barcodes.tsv"):
        open_source(folder)

    with raises(str(V3_MTX), "layer"):
        open_source(V3_MTX, layer="counts")


def test_incomplete_10x_h5(tmp_path):
    path = tmp_path / "v3.h5"
    shutil.copy(V3_H5, path)
    with h5py.File(path, "r+") as f:
        del f["matrix/barcodes"]
    with raises("v3.h5", "missing", "barcodes"):
        open_source(path)


def test_non_integer_mtx(tmp_path):
    folder = tmp_path / "mtx"
    shutil.copytree(INT_IDS, folder)
    text = (folder / "matrix.mtx").read_text().replace("4 3 6", "4 3 0.5")
    (folder / "matrix.mtx").write_text(text)
    with raises(str(folder), "0.5", "AAACCCATCGGACCAC-1", "Gpr17", "raw counts"):
        read_all(open_source(folder))


# ---------------------------------------------------------------------------------------------------------
# h5ad
# ---------------------------------------------------------------------------------------------------------
N_CELLS, N_GENES = 30, 40


def counts_matrix(seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).poisson(0.7, size=(N_CELLS, N_GENES)).astype(np.float32)
    x[4] = 0  # an empty cell: passed through
    return x


def write_h5ad(path: Path, x, var: pd.DataFrame | None = None, obs_names=None, **kw) -> Path:
    n_cells, n_genes = x.shape
    if var is None:
        var = pd.DataFrame(
            {"gene_symbols": [f"GENE{j}" for j in range(n_genes)]},
            index=[f"ENSG{j:011d}.{j % 3 + 1}" for j in range(n_genes)],
        )
    obs = pd.DataFrame(
        {"batch": pd.Categorical(np.array(["a", "b", "c"])[np.arange(n_cells) % 3])},
        index=obs_names if obs_names is not None else [f"cell_{i}" for i in range(n_cells)],
    )
    anndata.AnnData(X=x, obs=obs, var=var, **kw).write_h5ad(path)
    return path


def lognorm(x: np.ndarray) -> np.ndarray:
    total = np.maximum(x.sum(1, keepdims=True), 1)
    return np.log1p(x / total * 1e4).astype(np.float32)


@pytest.mark.parametrize("layout", ["csr", "dense"])
def test_h5ad_counts_obs_var(tmp_path, layout):
    x = counts_matrix()
    path = write_h5ad(tmp_path / "cells.h5ad", sp.csr_matrix(x) if layout == "csr" else x)
    source = open_source(path)
    assert source.format == "h5ad" and (source.n_cells, source.n_genes) == (N_CELLS, N_GENES)
    assert_same(read_all(source, chunk_size=7), x)
    assert_same(read_all(source), x)
    obs = source.read_obs()
    assert obs.index[0] == "cell_0" and list(obs.columns) == ["batch"] and obs["batch"].iloc[1] == "b"
    first = next(source.iter_chunks(7))
    assert list(first.obs["batch"]) == list(obs["batch"][:7])
    assert source.var["gene_id"].iloc[2] == "ENSG00000000002"  # version ".3" stripped
    assert source.var["symbol"].iloc[2] == "GENE2"
    assert first.counts[4].sum() == 0  # empty cell kept


def test_h5ad_dense_reads_in_small_blocks(tmp_path, monkeypatch):
    import scfm.data.readers

    monkeypatch.setattr(scfm.data.readers, "_DENSE_BLOCK", 3 * N_GENES)  # three rows per h5py read
    x = counts_matrix(1)
    assert_same(read_all(open_source(write_h5ad(tmp_path / "d.h5ad", x)), chunk_size=8), x)


def test_h5ad_layer_and_raw(tmp_path):
    x = counts_matrix()
    path = write_h5ad(tmp_path / "layers.h5ad", lognorm(x), layers={"counts": sp.csr_matrix(x)})
    assert_same(read_all(open_source(path, layer="counts")), x)
    with raises("layers.h5ad", "cell_0", "layer=counts", "raw counts"):
        read_all(open_source(path))
    with raises("layers.h5ad", "no layer 'spliced'", "counts"):
        open_source(path, layer="spliced")
    with raises("layers.h5ad", "no .raw"):
        open_source(path, use_raw=True)

    full = anndata.AnnData(X=sp.csr_matrix(x), var=pd.DataFrame(index=[f"G{j}" for j in range(N_GENES)]))
    full.raw = full
    ad = full[:, :10].copy()
    ad.X = sp.csr_matrix(lognorm(x)[:, :10])
    ad.write_h5ad(tmp_path / "raw.h5ad")
    raw = open_source(tmp_path / "raw.h5ad", use_raw=True)
    assert raw.n_genes == N_GENES and list(raw.var["symbol"][:2]) == ["G0", "G1"]
    assert_same(read_all(raw), x)
    with raises("raw.h5ad", "use_raw=true"):
        read_all(open_source(tmp_path / "raw.h5ad"))


def test_h5ad_first_offending_cell_and_gene(tmp_path):
    x = counts_matrix()
    x[13, 5], x[20, 1] = 0.5, 0.25
    path = write_h5ad(tmp_path / "half.h5ad", sp.csr_matrix(x))
    with raises("half.h5ad", "0.5", "'cell_13' (row 13)", "'GENE5' (column 5)", "layer=counts"):
        read_all(open_source(path), chunk_size=4)  # found in the fourth chunk


@pytest.mark.parametrize(
    ("value", "words"), [(-1.0, "negative"), (np.nan, "not finite"), (np.inf, "not finite")]
)
def test_h5ad_bad_values(tmp_path, value, words):
    x = counts_matrix()
    x[3, 7] = value
    path = write_h5ad(tmp_path / "bad.h5ad", sp.csr_matrix(x))
    with raises("bad.h5ad", words, "cell_3", "GENE7", "raw counts"):
        read_all(open_source(path))


def test_h5ad_negative_integers(tmp_path):
    x = counts_matrix().astype(np.int64)
    x[0, 0] = -2
    with raises("neg.h5ad", "-2", "negative"):
        read_all(open_source(write_h5ad(tmp_path / "neg.h5ad", x)))


def test_h5ad_duplicate_cell_ids(tmp_path):
    names = [f"cell_{i}" for i in range(N_CELLS)]
    names[9] = names[11] = "cell_2"
    with pytest.warns(UserWarning, match="not unique"):
        path = write_h5ad(tmp_path / "dup.h5ad", counts_matrix(), obs_names=names)
    with raises("dup.h5ad", "1 cell ids occur more than once", "cell_2", "obs_names_make_unique"):
        open_source(path)


def test_h5ad_symbol_index(tmp_path):
    var = pd.DataFrame(
        {"gene_ids": [f"ENSG{j:011d}" for j in range(N_GENES)]}, index=[f"SYM{j}" for j in range(N_GENES)]
    )
    source = open_source(write_h5ad(tmp_path / "sym.h5ad", counts_matrix(), var=var))
    assert list(source.var["symbol"][:2]) == ["SYM0", "SYM1"]
    assert source.var["gene_id"].iloc[1] == "ENSG00000000001"

    # uniquified index ("TBCE-1") with a symbol column: the column gives the symbol
    var = pd.DataFrame({"gene_symbols": ["TBCE"] * 2 + ["CD3E"] * (N_GENES - 2)})
    var.index = anndata.utils.make_index_unique(pd.Index(var["gene_symbols"].to_numpy()))
    source = open_source(write_h5ad(tmp_path / "uniq.h5ad", counts_matrix(), var=var))
    assert list(source.var["symbol"][:3]) == ["TBCE", "TBCE", "CD3E"]
    assert source.var["gene_id"].isna().all()


def test_h5ad_mixed_ids(tmp_path):
    ids = [f"ENSG{j:011d}" for j in range(N_GENES)]
    syms = [f"SYM{j}" for j in range(N_GENES)]
    var = pd.DataFrame({"ensembl": ids, "name": syms}, index=ids[:20] + syms[20:])
    path = write_h5ad(tmp_path / "mixed.h5ad", counts_matrix(), var=var)
    with raises("mixed.h5ad", "mixes Ensembl ids", "ENSG00000000000", "SYM20", "gene_id_column="):
        open_source(path)
    source = open_source(path, gene_id_column="ensembl", symbol_column="name")
    assert list(source.var["gene_id"]) == ids and list(source.var["symbol"]) == syms
    with raises("mixed.h5ad", "no column 'nope'", "ensembl"):
        open_source(path, gene_id_column="nope")
    with raises("mixed.h5ad", "holds no Ensembl ids"):
        open_source(path, gene_id_column="name")


def test_h5ad_csc_is_rejected(tmp_path):
    path = write_h5ad(tmp_path / "csc.h5ad", sp.csc_matrix(counts_matrix()))
    with raises("csc.h5ad", "CSC", "tocsr()"):
        open_source(path)


def test_unreadable_files(tmp_path):
    with raises("missing.h5ad", "no such file"):
        open_source(tmp_path / "missing.h5ad")
    (tmp_path / "text.h5ad").write_text("cell,gene\n")
    with raises("text.h5ad", "not an HDF5 file"):
        open_source(tmp_path / "text.h5ad")
    x = np.random.default_rng(0).poisson(3, size=(500, 400)).astype(np.float32)
    data = write_h5ad(
        tmp_path / "whole.h5ad",
        x,
        var=pd.DataFrame(index=[f"G{j}" for j in range(400)]),
        obs_names=[f"c{i}" for i in range(500)],
    ).read_bytes()
    for fraction in (0.5, 0.9):
        (tmp_path / "cut.h5ad").write_bytes(data[: int(len(data) * fraction)])
        with raises("cut.h5ad", "truncated"):
            read_all(open_source(tmp_path / "cut.h5ad"))


# ---------------------------------------------------------------------------------------------------------
# pbmc3k (real data, when /work/shared is mounted)
# ---------------------------------------------------------------------------------------------------------
@needs_pbmc
def test_pbmc3k_h5ad_equals_anndata_and_mtx():
    path = PBMC / "pbmc3k_raw_with_celltypes.h5ad"
    source = open_source(path)
    m = read_all(source, chunk_size=1000)
    ad = anndata.read_h5ad(path)
    assert_same(m, ad.X)
    pd.testing.assert_frame_equal(source.read_obs(), ad.obs)
    assert list(source.var["gene_id"]) == list(ad.var["gene_ids"])
    assert list(source.var["symbol"]) == list(ad.var["gene_symbols"])  # not the uniquified index

    mtx = open_source(PBMC / "filtered_gene_bc_matrices" / "hg19")
    assert_same(read_all(mtx, chunk_size=1000), m)
    assert list(mtx.read_obs().index) == list(ad.obs_names)
    pd.testing.assert_frame_equal(mtx.var, source.var)


@needs_pbmc
def test_pbmc3k_truncated_copy(tmp_path):
    data = (PBMC / "pbmc3k_raw_with_celltypes.h5ad").read_bytes()
    (tmp_path / "pbmc3k.h5ad").write_bytes(data[: len(data) // 2])
    with raises("pbmc3k.h5ad", "truncated"):
        read_all(open_source(tmp_path / "pbmc3k.h5ad"))
