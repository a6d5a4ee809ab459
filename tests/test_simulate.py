"""Synthetic count simulator: determinism, AnnData layout, biology (types, batches, depth, GRN,
perturbations), extra modalities and the exactness of the negative binomial sampler."""

from __future__ import annotations

import json
import re
import time

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from scfm.data.simulate import _sample_nb, simulate
from scfm.errors import ScfmInputError

SMALL = {"n_cells": 1500, "n_genes": 400, "n_tfs": 20}


def _lognorm(x: sp.csr_matrix) -> np.ndarray:
    """log1p of counts per 10k, dense."""
    dense = x.toarray().astype(np.float64)
    return np.log1p(dense / dense.sum(axis=1, keepdims=True).clip(min=1) * 1e4)


@pytest.fixture(scope="module")
def small() -> anndata.AnnData:
    return simulate(**SMALL, seed=7)


# --------------------------------------------------------------------------------------------- determinism


def test_same_seed_is_bitwise_identical_and_other_seed_differs(small: anndata.AnnData) -> None:
    again = simulate(**SMALL, seed=7)
    for name in ("data", "indices", "indptr"):
        a, b = getattr(small.X, name), getattr(again.X, name)
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert small.obs.equals(again.obs) and small.var.equals(again.var)
    for key in ("tf", "target", "weight"):
        assert np.array_equal(small.uns["grn"][key], again.uns["grn"][key])
    other = simulate(**SMALL, seed=8)
    assert other.X.nnz != small.X.nnz or (other.X != small.X).nnz > 0
    assert not np.array_equal(other.uns["grn"]["target"], small.uns["grn"]["target"])


# ------------------------------------------------------------------------------------------------ layout


def test_counts_are_csr_float32_non_negative_integers(small: anndata.AnnData) -> None:
    x = small.X
    assert isinstance(x, sp.csr_matrix) and x.dtype == np.float32
    assert x.shape == (SMALL["n_cells"], SMALL["n_genes"])
    x.check_format(full_check=True)
    assert x.has_sorted_indices
    assert x.data.min() >= 1 and np.array_equal(x.data, np.round(x.data))  # no explicit zeros, integers
    row_sums = np.asarray(x.sum(axis=1)).ravel()
    assert np.array_equal(small.obs["total_counts"].to_numpy(), row_sums.astype(np.int64))
    assert small.obs["total_counts"].dtype == np.int64


def test_obs_var_columns_ids_and_uns(small: anndata.AnnData) -> None:
    obs, var = small.obs, small.var
    assert list(obs.columns) == ["cell_type", "batch", "total_counts"]
    assert obs["cell_type"].dtype == "category" and obs["batch"].dtype == "category"
    assert set(obs["cell_type"].cat.categories) == {f"type_{i}" for i in range(8)}
    assert set(obs["batch"].cat.categories) == {f"batch_{i}" for i in range(3)}
    assert obs.index.is_unique and all(re.fullmatch(r"sim-b\d+-c\d{6}", c) for c in obs.index)
    assert [c.split("-")[1] for c in obs.index] == [b.replace("batch_", "b") for b in obs["batch"]]
    assert list(var.columns) == ["gene_symbol", "modality", "is_tf"]
    assert var.index.is_unique and all(re.fullmatch(r"ENSSIMG\d{11}", g) for g in var.index)
    assert var["gene_symbol"].is_unique and all(re.fullmatch(r"SIMG\d+", s) for s in var["gene_symbol"])
    assert (var["modality"] == "gene").all()
    assert var["is_tf"].dtype == bool and var["is_tf"].sum() == SMALL["n_tfs"]

    grn = small.uns["grn"]
    assert len(grn["tf"]) == len(grn["target"]) == len(grn["weight"]) == SMALL["n_tfs"] * 10
    assert var["is_tf"].to_numpy()[grn["tf"]].all()
    assert (grn["tf"] != grn["target"]).all() and (np.abs(grn["weight"]) > 0).all()
    assert len(set(zip(grn["tf"].tolist(), grn["target"].tolist(), strict=True))) == len(grn["tf"])
    params = json.loads(json.dumps(small.uns["simulation"]))
    assert params["n_cells"] == SMALL["n_cells"] and params["seed"] == 7 and params["modality"] is None


def test_h5ad_round_trip(small: anndata.AnnData, tmp_path) -> None:
    path = tmp_path / "sim.h5ad"
    small.write_h5ad(path)
    back = anndata.read_h5ad(path)
    assert (back.X != small.X).nnz == 0 and back.obs.equals(small.obs)
    assert back.uns["simulation"]["n_genes"] == SMALL["n_genes"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_cells=st.integers(1, 60),
    n_genes=st.integers(2, 80),
    n_cell_types=st.integers(1, 4),
    n_batches=st.integers(1, 3),
    n_programs=st.integers(0, 5),
    n_tfs=st.integers(0, 5),
    dispersion=st.sampled_from([0.0, 0.05, 0.4, 3.0]),
    seed=st.integers(0, 2**32),
)
def test_edge_case_parameters(
    n_cells: int,
    n_genes: int,
    n_cell_types: int,
    n_batches: int,
    n_programs: int,
    n_tfs: int,
    dispersion: float,
    seed: int,
) -> None:
    kw = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_cell_types": n_cell_types,
        "n_batches": n_batches,
        "n_programs": n_programs,
        "n_tfs": min(n_tfs, n_genes),
        "grn_edges_per_tf": min(3, n_genes - 1),
        "dispersion": dispersion,
        "seed": seed,
        "mean_depth": 500.0,
    }
    a, b = simulate(**kw), simulate(**kw)
    assert a.shape == (n_cells, n_genes) and (a.X != b.X).nnz == 0
    a.X.check_format(full_check=True)
    assert a.obs.index.is_unique and a.var.index.is_unique
    assert a.X.nnz == 0 or (a.X.data.min() >= 1 and np.array_equal(a.X.data, np.round(a.X.data)))


# -------------------------------------------------------------------------------------------------- biology


def test_default_sparsity_is_realistic() -> None:
    adata = simulate(n_cells=2000, seed=1)
    nnz = np.diff(adata.X.indptr)
    assert 500 <= np.median(nnz) <= 1500
    assert np.quantile(nnz, 0.99) - np.median(nnz) > 300  # long right tail
    gene_totals = np.sort(np.asarray(adata.X.sum(axis=0)).ravel())[::-1]
    assert gene_totals[:20].sum() / gene_totals.sum() > 0.1  # a few genes are very high (heavy tail)


def test_cell_types_are_distinguishable() -> None:
    adata = simulate(n_cells=4000, n_genes=600, n_cell_types=6, seed=2)
    expr = _lognorm(adata.X)
    types = adata.obs["cell_type"].cat.codes.to_numpy()
    truth = adata.uns["truth"]
    weights = np.zeros((adata.uns["simulation"]["n_programs"], adata.n_vars))
    weights[truth["program"], truth["program_gene"]] = truth["program_weight"]
    type_means = np.stack([expr[types == t].mean(axis=0) for t in range(6)])
    for t in range(6):
        primary = int(np.argmax(truth["type_program_activity"][t]))
        top = np.argsort(weights[primary])[-15:]  # the primary program's strongest up-regulated genes
        score = type_means[:, top].mean(axis=1)
        others = np.delete(score, t)
        assert score[t] > others.mean() + 0.3, (t, score)
    # Nearest-centroid classification on held-out cells.
    train = np.arange(adata.n_obs) % 2 == 0
    centroids = np.stack([expr[train & (types == t)].mean(axis=0) for t in range(6)])
    test = expr[~train]
    pred = np.argmin(((test[:, None, :] - centroids[None]) ** 2).sum(axis=2), axis=1)
    assert (pred == types[~train]).mean() > 0.9


def test_batch_effect_changes_gene_wise_means() -> None:
    def batch_log_ratio(batch_effect: float) -> tuple[np.ndarray, np.ndarray, anndata.AnnData]:
        adata = simulate(n_cells=6000, n_genes=300, n_batches=2, batch_effect=batch_effect, seed=3)
        x = adata.X.toarray().astype(np.float64)
        props = x / x.sum(axis=1, keepdims=True)
        b = adata.obs["batch"].cat.codes.to_numpy()
        m0, m1 = props[b == 0].mean(axis=0), props[b == 1].mean(axis=0)
        keep = (m0 > 2e-4) & (m1 > 2e-4)
        scale = adata.uns["truth"]["batch_log_scale"]
        return np.log(m0 / m1)[keep], (scale[0] - scale[1])[keep], adata

    observed, expected, with_batch = batch_log_ratio(0.5)
    observed_none, expected_none, _ = batch_log_ratio(0.0)
    assert np.all(expected_none == 0)
    assert np.std(observed) > 0.4 and np.std(observed_none) < 0.15
    assert np.corrcoef(observed, expected)[0, 1] > 0.8
    # Batches also shift depth, in the direction of the recorded shift.
    shift = with_batch.uns["truth"]["batch_depth_shift"]
    depth = with_batch.obs.groupby("batch", observed=True)["total_counts"].median().to_numpy()
    assert np.sign(np.log(depth[0] / depth[1])) == np.sign(shift[0] - shift[1])
    assert abs(np.log(depth[0] / depth[1]) - (shift[0] - shift[1])) < 0.15


@pytest.mark.parametrize("mean_depth", [1000.0, 8000.0])
def test_depth_follows_mean_depth(mean_depth: float) -> None:
    adata = simulate(n_cells=3000, n_genes=500, mean_depth=mean_depth, depth_sigma=0.5, batch_effect=0.0, seed=4)
    total = adata.obs["total_counts"].to_numpy()
    assert abs(np.log(np.median(total) / mean_depth)) < 0.1
    assert abs(np.std(np.log(total)) - 0.5) < 0.07


# -------------------------------------------------------------------------------------------- perturbations

PERTURB = {"n_cells": 6000, "n_genes": 500, "n_tfs": 20, "seed": 5}


@pytest.fixture(scope="module")
def control() -> anndata.AnnData:
    return simulate(**PERTURB)


def _tf_with_both_signs(adata: anndata.AnnData) -> tuple[int, np.ndarray, np.ndarray]:
    """A TF with positive and negative targets, both reasonably expressed."""
    grn = adata.uns["grn"]
    means = np.asarray(adata.X.mean(axis=0)).ravel()
    best = None
    for tf in np.unique(grn["tf"]):
        edges = grn["tf"] == tf
        targets, weights = grn["target"][edges], grn["weight"][edges]
        expressed = means[targets] > 0.05
        pos, neg = targets[(weights > 0) & expressed], targets[(weights < 0) & expressed]
        if len(pos) and len(neg) and (best is None or min(len(pos), len(neg)) > min(len(best[1]), len(best[2]))):
            best = (int(tf), pos, neg)
    assert best is not None
    return best


def _mean_counts(adata: anndata.AnnData) -> np.ndarray:
    return np.asarray(adata.X.mean(axis=0)).ravel()


def test_knockout_tf_moves_targets_in_the_grn_direction(control: anndata.AnnData) -> None:
    tf, pos, neg = _tf_with_both_signs(control)
    symbol = control.var["gene_symbol"].iloc[tf]
    ko = simulate(**PERTURB, perturb={symbol: 0.0})
    before, after = _mean_counts(control), _mean_counts(ko)
    assert after[tf] == 0.0 and before[tf] > 0
    assert np.all(after[pos] < before[pos]), (after[pos], before[pos])
    assert np.all(after[neg] > before[neg]), (after[neg], before[neg])
    # Genes outside the TF's targets barely move (only through renormalisation).
    grn = control.uns["grn"]
    untouched = np.setdiff1d(np.flatnonzero(before > 0.05), np.r_[grn["target"][grn["tf"] == tf], tf])
    assert np.median(np.abs(np.log(after[untouched] / before[untouched]))) < 0.05
    assert ko.uns["simulation"]["perturb"] == {symbol: 0.0}


def test_overexpression_does_the_opposite(control: anndata.AnnData) -> None:
    tf, pos, neg = _tf_with_both_signs(control)
    symbol = control.var["gene_symbol"].iloc[tf]
    up = simulate(**PERTURB, perturb={symbol: 4.0})
    before, after = _mean_counts(control), _mean_counts(up)
    assert 2.5 < after[tf] / before[tf] < 6.0
    assert np.all(after[pos] > before[pos]), (after[pos], before[pos])
    assert np.all(after[neg] < before[neg]), (after[neg], before[neg])


def test_perturbing_a_non_tf_only_moves_that_gene(control: anndata.AnnData) -> None:
    means = _mean_counts(control)
    candidates = np.flatnonzero(~control.var["is_tf"].to_numpy() & (means > 0.5))
    gene = int(candidates[0])
    ko = simulate(**PERTURB, perturb={control.var.index[gene]: 0.0})  # by id works too
    after = _mean_counts(ko)
    assert after[gene] == 0.0
    others = np.setdiff1d(np.flatnonzero(means > 0.05), [gene])
    assert np.max(np.abs(np.log(after[others] / means[others]))) < 0.2


# ---------------------------------------------------------------------------------------- extra modalities


def test_protein_modality_adds_features_and_keeps_genes() -> None:
    genes_only = simulate(**SMALL, seed=9)
    adata = simulate(**SMALL, seed=9, modality="protein", n_extra_features=30)
    protein = (adata.var["modality"] == "protein").to_numpy()
    assert protein.sum() == 30 and adata.n_vars == SMALL["n_genes"] + 30
    assert adata.var.index.is_unique and adata.var["gene_symbol"].is_unique
    assert all(i.startswith("ENSSIMP") for i in adata.var.index[protein])
    assert not adata.var["is_tf"].to_numpy()[protein].any()
    assert (adata.X[:, : SMALL["n_genes"]] != genes_only.X).nnz == 0  # gene counts unchanged
    x_protein = adata.X[:, protein]
    assert x_protein.nnz / np.prod(x_protein.shape) > 0.9  # ADT counts are dense
    assert np.array_equal(adata.obs["total_counts"].to_numpy(), np.asarray(adata.X.sum(axis=1)).ravel())
    # Each protein follows its linked gene across cell types.
    linked = adata.uns["truth"]["extra_feature_gene"]
    types = adata.obs["cell_type"].cat.codes.to_numpy()
    gene_expr, prot_expr = _lognorm(adata.X[:, linked]), _lognorm(x_protein)
    corr = [
        np.corrcoef(
            [gene_expr[types == t, i].mean() for t in range(8)],
            [prot_expr[types == t, i].mean() for t in range(8)],
        )[0, 1]
        for i in range(30)
    ]
    assert np.median(corr) > 0.6


def test_atac_modality_is_sparse_and_capped() -> None:
    adata = simulate(**SMALL, seed=9, modality="atac", n_extra_features=40)
    atac = (adata.var["modality"] == "atac").to_numpy()
    assert atac.sum() == 40 and all(i.startswith("ENSSIMR") for i in adata.var.index[atac])
    x_atac = adata.X[:, atac]
    assert 0.02 < x_atac.nnz / np.prod(x_atac.shape) < 0.6 and x_atac.max() <= 4


def test_bad_arguments_raise() -> None:
    with pytest.raises(ScfmInputError, match="perturb"):
        simulate(**SMALL, perturb={"NOT_A_GENE": 0.0})
    with pytest.raises(ScfmInputError, match="perturb"):
        simulate(**SMALL, perturb={"SIMG1": -1.0})
    with pytest.raises(ScfmInputError, match="modality"):
        simulate(**SMALL, modality="rna")
    with pytest.raises(ScfmInputError, match="dispersion"):
        simulate(**SMALL, dispersion=-0.1)
    with pytest.raises(ScfmInputError, match="n_tfs"):
        simulate(n_genes=10, n_tfs=11)


# ------------------------------------------------------------------------------------------------ sampler


@pytest.mark.parametrize("phi", [0.0, 0.4, 3.0])
@pytest.mark.parametrize("mean", [0.02, 0.7, 4.0, 20.0, 60.0])
def test_sampler_matches_negative_binomial(phi: float, mean: float) -> None:
    n = 200_000
    flat, values = _sample_nb(np.full(n, mean, np.float32), phi, np.random.default_rng(1), np.random.default_rng(2))
    assert np.all(np.diff(flat) > 0) and values.min() >= 1
    draws = np.zeros(n, dtype=np.int64)
    draws[flat] = values.astype(np.int64)
    if phi > 0:
        r = 1.0 / phi
        dist = stats.nbinom(r, r / (r + mean))
    else:
        dist = stats.poisson(mean)
    kmax = int(dist.ppf(0.999)) + 1
    observed = np.bincount(np.minimum(draws, kmax), minlength=kmax + 1)
    expected = np.append(dist.pmf(np.arange(kmax)), dist.sf(kmax - 1)) * n
    ok = expected > 5
    chi2 = ((observed[ok] - expected[ok]) ** 2 / expected[ok]).sum()
    assert stats.chi2.sf(chi2, ok.sum() - 1) > 1e-4, (chi2, ok.sum())
    assert abs(draws.mean() - mean) < 5 * np.sqrt(dist.var() / n)


def test_sampler_is_monotone_in_the_mean_for_shared_uniforms() -> None:
    base = np.random.default_rng(0).gamma(0.5, 4.0, 100_000).astype(np.float32)
    low = np.zeros(base.size, dtype=np.int64)
    high = np.zeros(base.size, dtype=np.int64)
    flat, values = _sample_nb(base, 0.4, np.random.default_rng(1), np.random.default_rng(2))
    low[flat] = values
    flat, values = _sample_nb(base * np.float32(1.5), 0.4, np.random.default_rng(1), np.random.default_rng(2))
    high[flat] = values
    small_means = base * 1.5 <= 32
    assert np.all(high[small_means] >= low[small_means])
    assert np.mean(high > low) > 0.1


# -------------------------------------------------------------------------------------------------- scale


def test_100k_cells_smoke() -> None:
    adata = simulate(n_cells=100_000, n_genes=200, mean_depth=1000.0, seed=11)
    assert adata.shape == (100_000, 200) and adata.obs.index.is_unique
    assert adata.X.dtype == np.float32 and adata.X.data.min() >= 1
    assert set(adata.obs["batch"].cat.categories) == {"batch_0", "batch_1", "batch_2"}
    assert abs(np.log(np.median(adata.obs["total_counts"]) / 1000.0)) < 0.2


@pytest.mark.slow
def test_100k_by_2000_is_fast() -> None:
    start = time.perf_counter()
    adata = simulate(n_cells=100_000, n_genes=2_000, seed=0)
    elapsed = time.perf_counter() - start
    nnz = np.diff(adata.X.indptr)
    assert 500 <= np.median(nnz) <= 1500
    assert elapsed < 30.0, elapsed
