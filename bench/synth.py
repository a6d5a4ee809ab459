"""A 10x-like synthetic ``.h5ad`` for the benchmarks, generated directly with numpy (fast, chunked).

Layout as a Cell Ranger → anndata file: ``X`` CSR float32 raw counts (cells × genes), ``var`` index
``ENSG…`` ids with a ``gene_symbols`` and a ``feature_types`` column, ``obs`` index barcodes ``ACGT…-1``.

Per cell: a log-normal number of detected genes (median ~1,600, clipped to 400..6,000) drawn with
replacement from Zipf-like gene propensities and de-duplicated; counts ``1 + floor(depth × level_g × Pareto)``
so most values are 1–2 and a few genes reach hundreds or thousands (heavy-tailed, as real UMI data).
``scfm.data.simulate.simulate`` is not used: it samples the dense cells × genes mean matrix (~4·10⁹ entries at
200k × 20k), which takes minutes; this takes seconds per 100k cells.

Written in chunks (``anndata.io.write_elem`` then ``sparse_dataset(...).append``), so memory stays
bounded by one chunk whatever the number of cells. ``ensure_h5ad`` caches files by parameters.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

WORK = Path(os.environ.get("BENCH_WORK", "/tmp/bench_work"))
_BASES = np.array(list("ACGT"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _barcodes(start: int, n: int) -> np.ndarray:
    """Unique 16-base barcodes with the 10x ``-1`` suffix (base-4 digits of the cell index)."""
    idx = np.arange(start, start + n, dtype=np.int64)
    digits = (idx[:, None] // (4 ** np.arange(15, -1, -1, dtype=np.int64))) % 4
    return np.array(["".join(row) + "-1" for row in _BASES[digits]], dtype=object)


def _var(n_genes: int) -> pd.DataFrame:
    ids = [f"ENSG{i:011d}" for i in range(1, n_genes + 1)]
    return pd.DataFrame({"gene_symbols": [f"GENE{i}" for i in range(1, n_genes + 1)],
                         "feature_types": "Gene Expression"}, index=pd.Index(ids))


def _chunk(rng: np.random.Generator, n: int, table: np.ndarray, level: np.ndarray, mean_nnz: float
           ) -> sp.csr_matrix:
    """``n`` cells. Genes come out sorted within each row without any sort: sorted uniforms per row (normalised
    cumulative exponential spacings) mapped through the monotone inverse-CDF ``table``; repeats are dropped."""
    n_genes = len(level)
    want = np.clip(rng.lognormal(np.log(mean_nnz), 0.35, n), 400, 6000).astype(np.int64)
    draws = (want * 1.15).astype(np.int64)  # oversample: repeats are removed below
    lens = draws + 1
    ends = np.cumsum(lens)
    starts = ends - lens
    spacing = rng.standard_exponential(int(ends[-1]))
    cs = np.cumsum(spacing)
    base = cs[starts] - spacing[starts]
    keep_pos = np.ones(len(cs), dtype=bool)
    keep_pos[ends - 1] = False
    rows = np.repeat(np.arange(n, dtype=np.int64), draws)
    u = (cs[keep_pos] - base[rows]) / (cs[ends - 1] - base)[rows]
    genes = table[np.minimum((u * len(table)).astype(np.int64), len(table) - 1)]
    first = np.ones(len(genes), dtype=bool)
    first[1:] = (genes[1:] != genes[:-1]) | (rows[1:] != rows[:-1])
    rows, genes = rows[first], genes[first]
    depth = rng.lognormal(0.0, 0.5, n)
    values = 1.0 + np.floor(depth[rows] * level[genes] * rng.pareto(1.5, len(genes)))
    counts = np.minimum(values, 50_000).astype(np.float32)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return sp.csr_matrix((counts, genes, indptr), shape=(n, n_genes))


def write_h5ad(path: Path, n_cells: int, n_genes: int = 33_538, mean_nnz: float = 1_600.0, seed: int = 0,
               chunk: int = 20_000) -> None:
    """Write the synthetic file at ``path`` (atomically: a temp file renamed at the end)."""
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(n_genes) + 1.0
    p = ranks ** -0.8  # Zipf-like detection propensity
    p /= p.sum()
    level = 0.3 * (p / np.median(p)) ** 0.5  # abundant genes also have larger counts
    grid = (np.arange(1 << 22) + 0.5) / (1 << 22)  # inverse CDF on a fine grid: gene per uniform bucket
    table = np.searchsorted(np.cumsum(p), grid).clip(0, n_genes - 1).astype(np.int32)
    obs = pd.DataFrame(index=pd.Index(np.concatenate([_barcodes(s, min(chunk, n_cells - s))
                                                      for s in range(0, n_cells, chunk)])))
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.h5ad")
    ad.AnnData(obs=obs, var=_var(n_genes)).write_h5ad(tmp)  # obs, var, empty uns/obsm/...; X below
    with h5py.File(tmp, "a") as f:
        for start in range(0, n_cells, chunk):
            m = _chunk(rng, min(chunk, n_cells - start), table, level, mean_nnz)
            if start == 0:
                ad.io.write_elem(f, "X", m)
            else:
                ad.io.sparse_dataset(f["X"]).append(m)
            log(f"  synth: {start + m.shape[0]:,}/{n_cells:,} cells, {m.nnz / m.shape[0]:,.0f} nnz/cell")
    os.replace(tmp, path)


def ensure_h5ad(n_cells: int, n_genes: int = 33_538, mean_nnz: float = 1_600.0, seed: int = 0) -> Path:
    """The cached synthetic file for these parameters (generated on first use)."""
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"synth-{n_cells}c-{n_genes}g-{int(mean_nnz)}nnz-s{seed}.h5ad"
    if not path.exists():
        t = time.perf_counter()
        log(f"generating {path} ...")
        write_h5ad(path, n_cells, n_genes, mean_nnz, seed)
        log(f"generated in {time.perf_counter() - t:.1f} s ({path.stat().st_size / 2**30:.2f} GiB)")
    return path


def describe(path: Path) -> dict[str, float]:
    """nnz per cell and count distribution of the first 10k cells (context for the results)."""
    with h5py.File(path, "r") as f:
        g = f["X"]
        n_cells, n_genes = (int(x) for x in g.attrs["shape"])
        end = int(g["indptr"][min(10_000, n_cells)])
        data = g["data"][:end]
        nnz = int(g["indptr"][-1])
    return {"n_cells": n_cells, "n_genes": n_genes, "nnz_per_cell": round(nnz / n_cells, 1),
            "frac_count_1": round(float((data == 1).mean()), 3), "count_p99": float(np.percentile(data, 99)),
            "count_max": float(data.max())}
