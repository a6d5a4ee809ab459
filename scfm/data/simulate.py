"""Seeded synthetic single-cell count simulator with known ground truth.

Generative model (per cell ``c``, gene ``g``):

1. Base log-abundance ``base_g`` ~ Gumbel (right-skewed, so exp(base) is heavy-tailed: a few genes very
   high, most low, roughly Zipf-like as in real UMI data).
2. ``n_programs`` gene programs: each a sparse set of genes with log-fold weights ``W[p, g]`` (mostly
   positive). Cell types are sparse mixtures of programs (one primary program plus 1-3 secondary ones)
   with type-specific gene-wise noise ``T[t, g]``. A cell's program activity is its type's mixture times
   log-normal jitter, plus occasional random "state" activations shared across types.
3. Biological log-mean ``bio[c, g] = base_g + sum_p a[c, p] W[p, g] + T[type(c), g]``.
4. GRN, one propagation step: each TF ``f`` has a deviation ``d_f = bio[c, f] - base_f + log(m_f)`` (``m``
   the ``perturb`` multiplier, 1 if not perturbed), saturated as ``s_f = S tanh(d_f / S)`` with
   ``S = 3`` (so a knock-out, ``log 0 = -inf``, gives ``s_f = -S``). Targets get ``sum_f w[f, g] s_f``
   added to their log-mean. TF inputs are the pre-GRN values (no chains, no cycles).
5. Batch: gene-wise log scaling ``B[b, g] ~ N(0, batch_effect)``; batches also shift log-depth by a
   ``N(0, batch_effect)`` offset (centred: cell-weighted mean 0).
6. ``mu_rel = exp(log-mean) * m_g`` (the perturbed gene itself scaled by its multiplier), normalised to
   proportions per cell, times a per-cell depth ``mean_depth * exp(depth_sigma * N(0, 1) + shift_b)``.
7. Counts ~ negative binomial with mean ``mu`` and variance ``mu + dispersion * mu**2`` (gamma-Poisson with
   gamma shape ``1 / dispersion``; ``dispersion = 0`` gives Poisson). Sampled by vectorised
   inverse-CDF for small means and exact gamma-Poisson for large means.

Ground truth is kept in ``uns``: ``grn`` (edges), ``truth`` (programs, type mixtures, batch effects) and
``simulation`` (the parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm.errors import ScfmInputError

__all__ = ["simulate"]

_MODALITIES = (None, "protein", "atac")
_CHUNK_ENTRIES = 1 << 21  # cells x genes per sampling chunk: bounds memory, keeps temporaries cache-friendly
_HIGH_MEAN = 32.0  # non-zero NB draws with larger means use gamma-Poisson, smaller ones inverse-CDF
_WALK_STEPS = 128  # float32 inverse-CDF steps at most; longer walks are redone in float64
_WALK_MIN_LIVE = 512  # below this many live entries the walk hands over to the float64 blocked walk
_BLOCK = 16  # pmf steps per vectorised pass of the float64 walk
_GRN_SATURATION = 3.0  # S in s_f = S tanh(d_f / S)
_BASE_SCALE = 0.6  # Gumbel scale of base log-abundance
_PROGRAM_FRACTION = 0.05  # fraction of genes in a program
_W_MIN, _W_SCALE = 0.2, 0.35
_PRIMARY = (1.0, 2.0)
_ID_DIGITS = 11
_EXTRA_PREFIX = {"protein": ("ENSSIMP", "ADT"), "atac": ("ENSSIMR", "peak")}
_INT_PARAMS = ("n_cells", "n_genes", "n_cell_types", "n_batches", "n_programs", "seed", "grn_edges_per_tf", "n_tfs")
_FLOAT_PARAMS = ("mean_depth", "depth_sigma", "dispersion", "batch_effect")


def simulate(
    n_cells: int = 10_000,
    n_genes: int = 2_000,
    n_cell_types: int = 8,
    n_batches: int = 3,
    n_programs: int = 20,
    seed: int = 0,
    mean_depth: float = 3_000.0,
    depth_sigma: float = 0.6,
    dispersion: float = 0.4,
    batch_effect: float = 0.3,
    grn_edges_per_tf: int = 10,
    n_tfs: int = 50,
    perturb: dict[str, float] | None = None,
    modality: str | None = None,
    n_extra_features: int = 50,
) -> ad.AnnData:
    """Simulate a raw UMI count matrix with cell types, batches, gene programs and a GRN.

    Args:
        n_cells, n_genes: matrix size (genes only; ``modality`` adds ``n_extra_features`` columns).
        n_cell_types, n_batches, n_programs: numbers of cell types, batches and gene programs.
        seed: seeds ``numpy.random.default_rng``-style streams; same seed gives bitwise-identical output.
            Perturbed and unperturbed runs with one seed share all parameters and uniform draws.
        mean_depth: median of the per-cell depth (about the median UMIs per cell).
        depth_sigma: sd of log depth.
        dispersion: NB dispersion ``phi`` (variance ``mu + phi * mu**2``, i.e. inverse dispersion
            ``theta = 1 / phi``); 0 gives Poisson counts.
        batch_effect: sd of per-batch gene-wise log scaling and of the per-batch log-depth shift.
        grn_edges_per_tf, n_tfs: GRN size; each TF regulates that many distinct random targets.
        perturb: gene symbol (or id) -> expression multiplier applied to every cell (0 = knock-out);
            acts on the gene itself and, for TFs, on their targets through the GRN.
        modality: None, ``"protein"`` (CITE-seq-like ADT counts) or ``"atac"`` (peak counts, at most 4);
            each extra feature is linked to a type-variable gene (``uns["truth"]["extra_feature_gene"]``)
            and follows its biological expression. Gene counts are the same as without ``modality``.
        n_extra_features: number of extra features when ``modality`` is set.

    Returns:
        AnnData with CSR float32 integer counts in ``X`` (no explicit zeros); ``obs`` (cells grouped by
        batch; ``cell_type``, ``batch``, ``total_counts`` = row sum of ``X``), ``var`` (``gene_symbol``,
        ``modality``, ``is_tf``) and ``uns``: ``grn`` (``tf``/``target`` var indices, ``weight``),
        ``truth`` (programs, type mixtures, batch effects) and ``simulation`` (JSON-able parameters).
    """
    params: dict[str, Any] = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_cell_types": n_cell_types,
        "n_batches": n_batches,
        "n_programs": n_programs,
        "seed": seed,
        "mean_depth": mean_depth,
        "depth_sigma": depth_sigma,
        "dispersion": dispersion,
        "batch_effect": batch_effect,
        "grn_edges_per_tf": grn_edges_per_tf,
        "n_tfs": n_tfs,
        "modality": modality,
        "n_extra_features": n_extra_features,
    }
    _check_args(params)
    n_extra = n_extra_features if modality is not None else 0
    symbols = np.array([f"SIMG{i + 1}" for i in range(n_genes)], dtype=object)
    gene_ids = np.array([f"ENSSIMG{i + 1:0{_ID_DIGITS}d}" for i in range(n_genes)], dtype=object)
    mult = _perturb_vector(perturb, symbols, gene_ids)

    # Independent streams (parameters, cells, count uniforms, gamma-Poisson, extra modality x3), so that
    # e.g. a perturbation or an extra modality leaves every other draw unchanged.
    rng_gene, rng_cell, rng_unif, rng_gp, rng_extra, rng_extra_unif, rng_extra_gp = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(7)
    )
    truth = _gene_parameters(rng_gene, n_genes, n_cell_types, n_batches, n_programs, batch_effect)
    tfs, grn_tf, grn_target, grn_weight = _grn(rng_gene, truth["program_weights"], n_tfs, grn_edges_per_tf)
    cell_type, batch, activity, depth = _cell_parameters(rng_cell, n_cells, truth, mean_depth, depth_sigma)
    extra = _extra_parameters(rng_extra, modality, n_extra, truth, n_cells, batch_effect)

    model = _Model.build(truth, tfs, grn_tf, grn_target, grn_weight, mult)
    phi = float(dispersion) if dispersion >= 1e-6 else 0.0  # below that NB is Poisson to float precision
    x = _counts(model, activity, cell_type, batch, depth, phi, rng_unif, rng_gp)
    if extra is not None:
        x_extra = _extra_counts(model, extra, activity, cell_type, batch, rng_extra_unif, rng_extra_gp)
        x = sp.hstack([x, x_extra], format="csr")
    x.data = x.data.astype(np.float32, copy=False)
    total = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel().astype(np.int64)
    n_features = n_genes + n_extra

    width = max(6, len(str(n_cells - 1)))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(cell_type, [f"type_{i}" for i in range(n_cell_types)]),
            "batch": pd.Categorical.from_codes(batch, [f"batch_{i}" for i in range(n_batches)]),
            "total_counts": total,
        },
        index=pd.Index([f"sim-b{b}-c{i:0{width}d}" for i, b in enumerate(batch)], name="cell_id"),
    )
    is_tf = np.zeros(n_features, dtype=bool)
    is_tf[tfs] = True
    var_ids, var_symbols, var_modality = list(gene_ids), list(symbols), ["gene"] * n_genes
    if extra is not None:
        assert modality is not None
        prefix, suffix = _EXTRA_PREFIX[modality]
        var_ids += [f"{prefix}{i + 1:0{_ID_DIGITS}d}" for i in range(n_extra)]
        var_symbols += [f"{symbols[g]}-{suffix}{i + 1}" for i, g in enumerate(extra["gene"])]
        var_modality += [modality] * n_extra
    var = pd.DataFrame(
        {"gene_symbol": var_symbols, "modality": var_modality, "is_tf": is_tf},
        index=pd.Index(var_ids, name="feature_id"),
    )

    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.uns["grn"] = {"tf": grn_tf, "target": grn_target, "weight": grn_weight}
    prog, gene = np.nonzero(truth["program_weights"])
    adata.uns["truth"] = {
        "base_log_abundance": truth["base_log_abundance"].astype(np.float32),
        "program": prog.astype(np.int64),
        "program_gene": gene.astype(np.int64),
        "program_weight": truth["program_weights"][prog, gene].astype(np.float32),
        "type_program_activity": truth["type_activity"].astype(np.float32),
        "batch_log_scale": truth["batch_log_scale"].astype(np.float32),
        "batch_depth_shift": truth["batch_depth_shift"].astype(np.float32),
        "grn_saturation": _GRN_SATURATION,
    }
    if extra is not None:
        adata.uns["truth"]["extra_feature_gene"] = extra["gene"].astype(np.int64)
    adata.uns["simulation"] = {
        **{k: int(v) for k, v in params.items() if k in _INT_PARAMS},
        **{k: float(v) for k, v in params.items() if k in _FLOAT_PARAMS},
        "modality": modality,
        "n_extra_features": int(n_extra),
        "perturb": {str(k): float(v) for k, v in (perturb or {}).items()},
        "dispersion_parametrisation": "var = mu + dispersion * mu^2 (gamma shape 1/dispersion)",
    }
    return adata


def _check_args(params: dict[str, Any]) -> None:
    """Raise ScfmInputError naming the first bad argument."""
    for name in ("n_cells", "n_genes", "n_cell_types", "n_batches"):
        value = params[name]
        if not isinstance(value, int | np.integer) or value < 1:
            raise ScfmInputError(f"must be a positive integer, got {value!r}", where=name)
    for name in ("n_programs", "seed", "grn_edges_per_tf", "n_tfs"):
        value = params[name]
        if not isinstance(value, int | np.integer) or value < 0:
            raise ScfmInputError(f"must be a non-negative integer, got {value!r}", where=name)
    for name in ("depth_sigma", "dispersion", "batch_effect"):
        value = params[name]
        if not math.isfinite(value) or value < 0:
            raise ScfmInputError(f"must be finite and >= 0, got {value!r}", where=name)
    if not math.isfinite(params["mean_depth"]) or params["mean_depth"] <= 0:
        raise ScfmInputError(f"must be finite and > 0, got {params['mean_depth']!r}", where="mean_depth")
    n_genes, n_tfs, edges = params["n_genes"], params["n_tfs"], params["grn_edges_per_tf"]
    if n_tfs > n_genes:
        raise ScfmInputError(f"{n_tfs} TFs but only {n_genes} genes", where="n_tfs", fix="lower n_tfs")
    if n_tfs and edges > n_genes - 1:
        raise ScfmInputError(
            f"{edges} targets per TF but only {n_genes - 1} other genes",
            where="grn_edges_per_tf",
            fix="lower grn_edges_per_tf",
        )
    modality = params["modality"]
    if modality not in _MODALITIES:
        raise ScfmInputError(f"unknown modality {modality!r}", where="modality", fix="use None, 'protein' or 'atac'")
    n_extra = params["n_extra_features"]
    if modality is not None and (not isinstance(n_extra, int | np.integer) or n_extra < 1):
        raise ScfmInputError(f"must be a positive integer, got {n_extra!r}", where="n_extra_features")


def _perturb_vector(perturb: dict[str, float] | None, symbols: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-gene expression multipliers (1 where not perturbed)."""
    mult = np.ones(len(symbols), dtype=np.float64)
    if not perturb:
        return mult
    lookup = {s: i for i, s in enumerate(symbols)} | {s: i for i, s in enumerate(ids)}
    for key, value in perturb.items():
        if key not in lookup:
            raise ScfmInputError(
                f"unknown gene {key!r}",
                where="perturb",
                fix=f"use a symbol SIMG1..SIMG{len(symbols)} or its id",
            )
        if not math.isfinite(value) or value < 0:
            raise ScfmInputError(f"multiplier for {key!r} must be finite and >= 0, got {value!r}", where="perturb")
        mult[lookup[key]] = value
    return mult


def _gene_parameters(
    rng: np.random.Generator, n_genes: int, n_types: int, n_batches: int, n_programs: int, batch_effect: float
) -> dict[str, np.ndarray]:
    """Base abundance, programs, cell-type mixtures, type noise and batch effects."""
    base = rng.gumbel(0.0, _BASE_SCALE, n_genes)
    weights = np.zeros((n_programs, n_genes))
    size = max(1, round(_PROGRAM_FRACTION * n_genes))
    for p in range(n_programs):
        genes = rng.choice(n_genes, size=min(size, n_genes), replace=False)
        sign = np.where(rng.random(len(genes)) < 0.85, 1.0, -1.0)
        weights[p, genes] = sign * (_W_MIN + rng.gamma(2.0, _W_SCALE, len(genes)))
    activity = np.zeros((n_types, n_programs))
    if n_programs:
        primary = rng.permutation(n_programs)
        for t in range(n_types):
            activity[t, primary[t % n_programs]] = rng.uniform(*_PRIMARY)
            others = np.setdiff1d(np.arange(n_programs), primary[t % n_programs])
            k = min(len(others), int(rng.integers(1, 4)))
            chosen = rng.choice(others, size=k, replace=False)
            activity[t, chosen] = rng.uniform(0.3, 1.0, k)
    type_noise = rng.normal(0.0, 0.25, (n_types, n_genes))
    batch_scale = (
        rng.normal(0.0, batch_effect, (n_batches, n_genes)) if batch_effect else np.zeros((n_batches, n_genes))
    )
    depth_shift = rng.normal(0.0, batch_effect, n_batches) if batch_effect else np.zeros(n_batches)
    return {
        "base_log_abundance": base,
        "program_weights": weights,
        "type_activity": activity,
        "type_noise": type_noise.astype(np.float32),
        "batch_log_scale": batch_scale.astype(np.float32),
        "batch_depth_shift": depth_shift,
    }


def _grn(
    rng: np.random.Generator, program_weights: np.ndarray, n_tfs: int, edges_per_tf: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pick TFs (preferring program genes, so they vary) and their signed target edges."""
    n_genes = program_weights.shape[1]
    in_program = np.flatnonzero((program_weights != 0).any(axis=0))
    pool = rng.permutation(in_program)
    if len(pool) < n_tfs:
        rest = rng.permutation(np.setdiff1d(np.arange(n_genes), in_program))
        pool = np.concatenate([pool, rest])
    tfs = np.sort(pool[:n_tfs]).astype(np.int64)
    if n_tfs == 0 or edges_per_tf == 0:
        empty = np.zeros(0, dtype=np.int64)
        return tfs, empty, empty.copy(), np.zeros(0, dtype=np.float32)
    # Targets: for each TF, edges_per_tf distinct genes other than itself.
    keys = rng.random((n_tfs, n_genes))
    keys[np.arange(n_tfs), tfs] = np.inf
    targets = np.argpartition(keys, edges_per_tf - 1, axis=1)[:, :edges_per_tf]
    targets.sort(axis=1)
    sign = np.where(rng.random(targets.shape) < 0.6, 1.0, -1.0)
    weight = (sign * rng.uniform(0.25, 0.75, targets.shape)).astype(np.float32)
    return tfs, np.repeat(tfs, edges_per_tf), targets.ravel().astype(np.int64), weight.ravel()


def _cell_parameters(
    rng: np.random.Generator,
    n_cells: int,
    truth: dict[str, np.ndarray],
    mean_depth: float,
    depth_sigma: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cell types, batches (cells ordered by batch), program activities and depths.

    Centres ``truth["batch_depth_shift"]`` in place (cell-weighted mean 0).
    """
    n_types, n_programs = truth["type_activity"].shape
    n_batches = truth["batch_log_scale"].shape[0]
    batch_sizes = rng.multinomial(n_cells, rng.dirichlet(np.full(n_batches, 20.0)))
    batch = np.repeat(np.arange(n_batches), batch_sizes).astype(np.int64)
    shift = truth["batch_depth_shift"]
    shift -= shift @ batch_sizes / n_cells  # centred over cells: median depth stays near mean_depth
    cell_type = rng.choice(n_types, size=n_cells, p=rng.dirichlet(np.full(n_types, 3.0))).astype(np.int64)
    jitter = np.exp(rng.normal(0.0, 0.3, (n_cells, n_programs)))
    state = (rng.random((n_cells, n_programs)) < 0.05) * rng.uniform(0.3, 1.0, (n_cells, n_programs))
    activity = (truth["type_activity"][cell_type] * jitter + state).astype(np.float32)
    log_depth = math.log(mean_depth) + depth_sigma * rng.standard_normal(n_cells)
    depth = np.exp(log_depth + truth["batch_depth_shift"][batch])
    return cell_type, batch, activity, depth


def _extra_parameters(
    rng: np.random.Generator,
    modality: str | None,
    n_extra: int,
    truth: dict[str, np.ndarray],
    n_cells: int,
    batch_effect: float,
) -> dict[str, Any] | None:
    """Extra-modality features, each linked to a gene (drawn from the more type-variable half, like an
    antibody panel of markers). ADT: dense and deep; ATAC: sparse, shallow, at most 4 per peak and cell.
    """
    if modality is None:
        return None
    type_logmean = truth["type_activity"] @ truth["program_weights"] + truth["type_noise"]
    variability = type_logmean.std(axis=0)
    pool = np.flatnonzero(variability >= np.median(variability))
    gene = rng.choice(pool, size=n_extra, replace=n_extra > len(pool))
    n_batches = truth["batch_log_scale"].shape[0]
    if modality == "protein":
        median_depth, sigma, background, disp, cap = 40.0 * n_extra, 0.5, 0.1, 0.2, None
    else:
        median_depth, sigma, background, disp, cap = 0.4 * n_extra, 0.7, 0.02, 0.3, 4
    feature_scale = np.exp(rng.normal(0.0, 0.7, n_extra))
    batch_scale = np.exp(rng.normal(0.0, batch_effect, (n_batches, n_extra))) * feature_scale
    depth = median_depth * np.exp(sigma * rng.standard_normal(n_cells))
    return {
        "gene": gene,
        "background": background,
        "scale": batch_scale,
        "depth": depth,
        "dispersion": disp,
        "max_count": cap,
    }


@dataclass
class _Model:
    """Gene-level arrays the per-chunk log-mean computation needs (all small)."""

    n_genes: int
    tfs: np.ndarray  # TF gene indices
    coef_t: sp.csr_matrix  # (genes, programs + tfs): [W; GRN] transposed, float32, sparse
    w_tf_t: sp.csr_matrix  # (tfs, programs): program weights on the TFs
    bio_offset: np.ndarray  # (types, genes) base + type noise
    bio_offset_tf_t: np.ndarray  # (tfs, types)
    full_offset: np.ndarray  # (types * batches, genes) base + type noise + batch scale
    tf_ref: np.ndarray  # (tfs, 1) TF base log-abundance minus log(perturb multiplier)
    mult: np.ndarray  # per-gene multiplier
    perturbed: np.ndarray  # indices with multiplier != 1
    n_batches: int

    @classmethod
    def build(
        cls,
        truth: dict[str, np.ndarray],
        tfs: np.ndarray,
        grn_tf: np.ndarray,
        grn_target: np.ndarray,
        grn_weight: np.ndarray,
        mult: np.ndarray,
    ) -> _Model:
        w = truth["program_weights"].astype(np.float32)
        n_genes = w.shape[1]
        base = truth["base_log_abundance"]
        grn = np.zeros((len(tfs), n_genes), dtype=np.float32)
        grn[np.searchsorted(tfs, grn_tf), grn_target] = grn_weight
        bio_offset = (base[None, :] + truth["type_noise"]).astype(np.float32)
        full_offset = (bio_offset[:, None, :] + truth["batch_log_scale"][None, :, :]).reshape(-1, n_genes)
        with np.errstate(divide="ignore"):
            tf_ref = (base[tfs] - np.log(mult[tfs])).astype(np.float32)  # +inf for a knock-out
        return cls(
            n_genes=n_genes,
            tfs=tfs,
            coef_t=sp.csr_matrix(np.vstack([w, grn]).T),
            w_tf_t=sp.csr_matrix(w[:, tfs].T),
            bio_offset=bio_offset,
            bio_offset_tf_t=np.ascontiguousarray(bio_offset[:, tfs].T),
            full_offset=full_offset,
            tf_ref=tf_ref[:, None],
            mult=mult,
            perturbed=np.flatnonzero(mult != 1.0),
            n_batches=truth["batch_log_scale"].shape[0],
        )

    def bio_deviation(self, act: np.ndarray, types: np.ndarray, coef_t: sp.csr_matrix) -> np.ndarray:
        """Programs + GRN log-effect (no base, type noise or batch), float32 (cells, rows of ``coef_t``).

        ``[programs | saturated TF deviations] @ [W; GRN]`` as a sparse product in gene-major layout,
        then one transpose: [W; GRN] is very sparse, and this keeps BLAS (and its threads) out.
        """
        design_t = np.ascontiguousarray(act.T)  # (programs, cells)
        if self.tfs.size:
            tf_dev = self.w_tf_t @ design_t + self.bio_offset_tf_t[:, types] - self.tf_ref
            sat = np.tanh(tf_dev / np.float32(_GRN_SATURATION)) * np.float32(_GRN_SATURATION)
            design_t = np.vstack([design_t, sat.astype(np.float32)])
        return np.ascontiguousarray((coef_t @ design_t).T)


def _counts(
    model: _Model,
    activity: np.ndarray,
    cell_type: np.ndarray,
    batch: np.ndarray,
    depth: np.ndarray,
    phi: float,
    rng_unif: np.random.Generator,
    rng_gp: np.random.Generator,
) -> sp.csr_matrix:
    """Gene counts, built chunk by chunk straight into CSR arrays."""
    n_cells, n_genes = len(cell_type), model.n_genes
    mult32 = model.mult[model.perturbed].astype(np.float32)
    out = _CsrBuilder(n_cells, n_genes)
    step = max(1, _CHUNK_ENTRIES // n_genes)
    for start in range(0, n_cells, step):
        stop = min(start + step, n_cells)
        types = cell_type[start:stop]
        mu = model.bio_deviation(activity[start:stop], types, model.coef_t)
        mu += model.full_offset[types * model.n_batches + batch[start:stop]]
        np.exp(mu, out=mu)
        if model.perturbed.size:
            mu[:, model.perturbed] *= mult32
        mu *= (depth[start:stop] / np.maximum(mu.sum(axis=1), 1e-30)).astype(np.float32)[:, None]
        flat, values = _sample_nb(mu.ravel(), phi, rng_unif, rng_gp)
        del mu
        out.append(flat, values, start, stop)
    return out.finish()


def _extra_counts(
    model: _Model,
    extra: dict[str, Any],
    activity: np.ndarray,
    cell_type: np.ndarray,
    batch: np.ndarray,
    rng_unif: np.random.Generator,
    rng_gp: np.random.Generator,
) -> sp.csr_matrix:
    """Extra-modality counts: each feature follows its linked gene's biological expression."""
    n_cells, genes = len(cell_type), extra["gene"]
    out = _CsrBuilder(n_cells, len(genes))
    noise = model.bio_offset[:, genes] - model.bio_offset[:, genes].mean(axis=0)
    coef_t = model.coef_t[genes]
    step = max(1, _CHUNK_ENTRIES // model.n_genes)
    for start in range(0, n_cells, step):
        stop = min(start + step, n_cells)
        types = cell_type[start:stop]
        dev = model.bio_deviation(activity[start:stop], types, coef_t) + noise[types]
        rel = np.exp(dev.astype(np.float64)) * model.mult[genes] + extra["background"]
        rel *= extra["scale"][batch[start:stop]]
        rel *= (extra["depth"][start:stop] / rel.sum(axis=1))[:, None]
        flat, values = _sample_nb(rel.astype(np.float32).ravel(), extra["dispersion"], rng_unif, rng_gp)
        if extra["max_count"] is not None:
            np.minimum(values, extra["max_count"], out=values)
        out.append(flat, values, start, stop)
    return out.finish()


class _CsrBuilder:
    """Fills CSR arrays chunk by chunk; capacity is guessed from the first chunk and grown if needed."""

    def __init__(self, n_rows: int, width: int) -> None:
        self.n_rows, self.width = n_rows, width
        self.indptr = np.zeros(n_rows + 1, dtype=np.int64)
        self.data = np.zeros(0, dtype=np.float32)
        self.indices = np.zeros(0, dtype=np.int32)

    def append(self, flat: np.ndarray, values: np.ndarray, start: int, stop: int) -> None:
        """Add rows ``start:stop`` given their sorted flat (row-major) non-zero positions and values."""
        lo = int(self.indptr[start])
        hi = lo + flat.size
        if hi > self.data.size:
            density = flat.size / max(1, (stop - start) * self.width)
            guess = int(1.05 * density * (self.n_rows - start) * self.width) + flat.size + 1024
            capacity = max(hi, lo + guess, 2 * self.data.size if self.data.size else 0)
            capacity = min(capacity, self.n_rows * self.width)
            self.data = np.concatenate([self.data[:lo], np.empty(capacity - lo, dtype=np.float32)])
            self.indices = np.concatenate([self.indices[:lo], np.empty(capacity - lo, dtype=np.int32)])
        ends = np.searchsorted(flat, np.arange(1, stop - start + 1, dtype=np.int64) * self.width)
        self.indptr[start + 1 : stop + 1] = lo + ends
        np.take(_column_lookup(self.width, stop - start), flat, out=self.indices[lo:hi], mode="clip")
        self.data[lo:hi] = values

    def finish(self) -> sp.csr_matrix:
        nnz = int(self.indptr[-1])
        # Shrink in place (no copy) so the matrix owns exactly nnz entries.
        self.data.resize(nnz, refcheck=False)
        self.indices.resize(nnz, refcheck=False)
        indptr = self.indptr.astype(np.int32) if nnz < np.iinfo(np.int32).max else self.indptr
        return sp.csr_matrix((self.data, self.indices, indptr), shape=(self.n_rows, self.width))


@lru_cache(maxsize=4)
def _column_lookup(width: int, rows: int) -> np.ndarray:
    """int32 column index of each flat position in a (rows, width) block."""
    return np.tile(np.arange(width, dtype=np.int32), rows)


def _sample_nb(
    mu: np.ndarray, phi: float, rng_unif: np.random.Generator, rng_gp: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Negative binomial draws (mean ``mu``, variance ``mu + phi mu^2``) for a flat float32 array.

    Returns the sorted flat indices of the non-zero draws and their values (float32 integers). One
    float32 uniform ``u`` per entry (from ``rng_unif``) gives the count by inverse CDF,
    ``min{k: u < F(k)}``: a dense zero test ``u < P(0)``, then a vectorised walk over the non-zero
    entries with the pmf recursion ``P(k+1) = P(k) q (k + r) / (k + 1)`` (``r = 1/phi``,
    ``q = mu / (mu + r)``; Poisson: ``P(k+1) = P(k) mu / (k + 1)``), compacting the live set as it
    shrinks. The walk runs in float32 while many entries are live; the few long walks left are redone
    exactly in float64. Non-zero entries with mean above ``_HIGH_MEAN`` are drawn from the zero-truncated
    law by gamma-Poisson rejection (``rng_gp``). Runs sharing ``rng_unif`` are coupled: with the same
    ``u``, a larger mean (up to ``_HIGH_MEAN``) never gives a smaller count (up to float32 rounding).
    """
    u = rng_unif.random(mu.size, dtype=np.float32)
    p0 = np.empty_like(mu)
    if phi > 0:
        np.multiply(mu, np.float32(phi), out=p0)
        p0 += np.float32(1.0)
        np.log(p0, out=p0)
        p0 *= np.float32(-1.0 / phi)
    else:
        np.negative(mu, out=p0)
    np.exp(p0, out=p0)
    flat = np.flatnonzero(u >= p0)
    m, uu, pk = mu.take(flat), u.take(flat), p0.take(flat)
    del u, p0
    values = np.ones(flat.size, dtype=np.float32)
    high = np.flatnonzero(m > np.float32(_HIGH_MEAN))
    if phi > 0:
        q = m + np.float32(1.0 / phi)
        np.divide(m, q, out=q)
    else:
        q = m.copy()
    # Walk over the live set (count > k): rem = u - F(k) >= 0. Counts are 1 + #{j <= k: u >= F(j)}.
    rem = uu - pk
    rem[high] = -1.0  # high means never walk: drawn by gamma-Poisson below
    pos: np.ndarray | None = None  # None: the identity (no compaction yet)
    vals = values
    size = flat.size
    k = 0
    while size >= _WALK_MIN_LIVE and k < _WALK_STEPS:
        pk *= q
        pk *= np.float32(_pmf_ratio(k, phi))
        rem -= pk
        k += 1
        live = rem >= 0
        vals += live
        n_live = int(np.count_nonzero(live))
        if n_live < size // 2:
            keep = np.flatnonzero(live)
            if pos is None:
                pos = keep
            else:
                values[pos] = vals
                pos = pos.take(keep)
            rem, pk, q = rem.take(keep), pk.take(keep), q.take(keep)
            vals = np.full(n_live, k + 1, dtype=np.float32)
            size = n_live
    if pos is None:
        pos = np.arange(flat.size)
    else:
        values[pos] = vals
    left = pos.take(np.flatnonzero(rem >= 0))
    if left.size:  # long walks: redo exactly in float64
        values[left] = np.maximum(_inverse_cdf64(m.take(left).astype(np.float64), uu.take(left), phi), 1)
    if high.size:
        values[high] = _zero_truncated_gamma_poisson(m.take(high).astype(np.float64), phi, rng_gp)
    return flat, values


def _pmf_ratio(k: int, phi: float) -> float:
    """P(k+1) / (P(k) q) for NB with dispersion phi (Poisson when phi is 0)."""
    return 1.0 / (k + 1) if phi == 0 else (k + 1.0 / phi) / (k + 1)


def _inverse_cdf64(m: np.ndarray, u: np.ndarray, phi: float) -> np.ndarray:
    """Counts ``min{k: u < F(k)}`` in float64, ``_BLOCK`` pmf steps per vectorised pass.

    An entry whose pmf underflows before ``F`` reaches ``u`` stops there, so the loop always ends.
    """
    u = u.astype(np.float64)
    if phi > 0:
        q = m / (m + 1.0 / phi)
        pk = np.exp(-np.log1p(m * phi) / phi)
    else:
        q = m
        pk = np.exp(-m)
    cdf = pk.copy()
    out = np.zeros(m.size, dtype=np.int32)
    live = np.flatnonzero(u >= cdf)
    u, q, pk, cdf = u[live], q[live], pk[live], cdf[live]
    k = 0
    while live.size:
        ratio = np.array([_pmf_ratio(j, phi) for j in range(k, k + _BLOCK)])
        steps = np.cumprod(q[:, None] * ratio[None, :], axis=1) * pk[:, None]  # P(k+1) .. P(k+B)
        cum = np.cumsum(steps, axis=1) + cdf[:, None]  # F(k+1) .. F(k+B)
        below = u[:, None] < cum
        done = below.any(axis=1) | (steps[:, -1] == 0.0)
        first = np.where(below.any(axis=1), below.argmax(axis=1), _BLOCK - 1)
        out[live[done]] = k + 1 + first[done]
        keep = ~done
        live, u, q, pk, cdf = live[keep], u[keep], q[keep], steps[keep, -1], cum[keep, -1]
        k += _BLOCK
    return out


def _zero_truncated_gamma_poisson(m: np.ndarray, phi: float, rng: np.random.Generator) -> np.ndarray:
    """Exact NB(mean m, dispersion phi) draws conditioned on being > 0, by rejection."""
    out = np.zeros(m.size, dtype=np.int64)
    todo = np.arange(m.size)
    while todo.size:
        lam = m[todo]
        if phi > 0:
            lam = lam * rng.standard_gamma(1.0 / phi, size=todo.size) * phi
        out[todo] = rng.poisson(lam)
        todo = todo[out[todo] == 0]
    return out.astype(np.int32)
