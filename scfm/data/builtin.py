"""Built-in data that ships with the package, so no run downloads anything.

- ``pbmc3k()``: real 10x PBMC 3k raw counts with Seurat cell-type labels (see resources/pbmc3k/README.md).
- ``synthetic(...)``: the seeded simulator (``scfm.data.simulate``).
- ``builtin_corpus(name, cache_dir)``: the corpus of a built-in dataset, prepared once into a cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import lzma
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm.errors import ScfmInputError
from scfm.resources import RESOURCES, default_cache_dir


def pbmc3k():
    """PBMC 3k as an ``AnnData``: raw counts (CSR, float32 like 10x h5ad), obs ``cell_type``, var ``gene_symbols``."""
    import anndata as ad

    folder = RESOURCES / "pbmc3k"
    with np.load(io.BytesIO(lzma.decompress((folder / "counts.npz.xz").read_bytes()))) as z:
        indptr, delta, counts, shape = z["indptr"], z["index_delta"].astype(np.int64), z["counts"], z["shape"]
    starts = indptr[:-1][np.diff(indptr) > 0]
    # undo the per-row delta coding: cumulative sum restarted at each row start
    csum = np.cumsum(delta)
    row_base = np.zeros_like(delta)
    row_base[starts] = csum[starts] - delta[starts]
    indices = csum - np.maximum.accumulate(row_base)
    X = sp.csr_matrix((counts.astype(np.float32), indices.astype(np.int32), indptr), shape=tuple(shape))
    genes = pd.read_csv(folder / "genes.tsv", sep="\t")
    cells = pd.read_csv(folder / "cells.tsv", sep="\t", keep_default_na=False)
    obs = pd.DataFrame({"cell_type": pd.Categorical(cells.cell_type.replace("", None))},
                       index=pd.Index(cells.barcode.astype(str), name=None))
    var = pd.DataFrame({"gene_symbols": genes.symbol.to_numpy()}, index=pd.Index(genes.gene_id.astype(str)))
    return ad.AnnData(X=X, obs=obs, var=var)


def synthetic(**params: Any):
    """The seeded simulator's AnnData (``scfm.data.simulate.simulate`` parameters)."""
    from scfm.data.simulate import simulate

    return simulate(**params)


def _params_key(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]


def builtin_corpus(name: str, cache_dir: str | Path | None = None, params: dict[str, Any] | None = None,
                   progress: bool = True):
    """The corpus of built-in dataset ``name`` ('pbmc3k' or 'synthetic'), prepared once into the cache.

    The dataset is written as an ``.h5ad`` and goes through ``scfm.data.corpus.prepare`` like any user file.
    """
    from scfm.data.corpus import Corpus, is_corpus
    from scfm.data.prepare import PrepareOptions, prepare

    params = dict(params or {})
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if name == "pbmc3k":
        folder = cache / "corpora" / "pbmc3k"
        make, columns = pbmc3k, {"cell_type": "cell_type"}
    elif name == "synthetic":
        folder = cache / "corpora" / f"synthetic-{_params_key(params)}"
        make, columns = (lambda: synthetic(**params)), {"cell_type": "cell_type", "batch": "batch"}
    else:
        raise ScfmInputError(f"unknown built-in dataset {name!r}", fix="use data=pbmc3k or data=synthetic, "
                             "or data=corpus with data.corpus=<folder made by scfm-prepare>")
    if is_corpus(folder):
        return Corpus(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # one preparer at a time: torchrun / SLURM start every rank at once, and all would write <folder>.partial
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_corpus(folder):  # another process prepared it while this one waited
            return Corpus(folder)
        h5ad = folder.with_name(folder.name + ".h5ad")
        if not h5ad.exists():
            tmp = h5ad.with_name(h5ad.name + f".tmp{os.getpid()}.h5ad")
            adata = make()
            adata.uns = {}
            adata.write_h5ad(tmp)
            os.replace(tmp, h5ad)
        return prepare([str(h5ad)], folder, PrepareOptions(columns=columns, progress=progress))
