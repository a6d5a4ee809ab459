"""Shared fixtures: built-in data prepared once per session into a temporary cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session cache for built-in corpora and dictionaries, exported as SCFM_CACHE: tests never write
    to the home cache."""
    path = tmp_path_factory.mktemp("scfm_cache")
    os.environ["SCFM_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread: the tests' models are tiny, and on shared, busy cores torch's thread pool made them
    up to ~8x slower (measured 52 s -> 6 s for a training test)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pbmc():
    """The vendored PBMC 3k as an AnnData (raw counts, cell types)."""
    from scfm.data.builtin import pbmc3k

    return pbmc3k()


@pytest.fixture(scope="session")
def pbmc_corpus(cache_dir: Path):
    """The vendored PBMC 3k prepared into a corpus (real data, 2,700 cells)."""
    from scfm.data.builtin import builtin_corpus

    return builtin_corpus("pbmc3k", cache_dir, progress=False)


@pytest.fixture(scope="session")
def synthetic_corpus(cache_dir: Path):
    """A small simulated corpus (3 shards) with cell types and batches."""
    from scfm.data.builtin import synthetic
    from scfm.data.prepare import PrepareOptions, prepare

    adata = synthetic(n_cells=3000, n_genes=500, seed=1)
    adata.uns = {}
    h5ad = cache_dir / "synthetic_small.h5ad"
    adata.write_h5ad(h5ad)
    opts = PrepareOptions(columns={"cell_type": "cell_type", "batch": "batch"}, shard_cells=1200, progress=False)
    return prepare([str(h5ad)], cache_dir / "synthetic_small", opts)
