"""The corpus format on disk and its reader, ``Corpus``; ``scfm.data.prepare`` writes it.

Layout (DESIGN.md §2)::

    corpus/
      manifest.json             format, vocab hash, sources (path, sha256), shards (cells, tokens, files + sha256)
      vocab.tsv                 token id, gene id, symbol; special tokens first
      gene_stats.parquet        per token: n_nonzero, nonzero_median (count/total×1e4), mean
      shards/NNNNN/             memory-mapped TensorDict: gene_ids [T] int32, counts [T] int32, offsets [N+1] int64
      shards/NNNNN.obs.parquet  cell_id, source, total_counts, n_genes, split_key, + declared label columns

A tokenized cell is its non-zero in-vocabulary genes in ascending token order with raw counts, plus its
total count over *all* input genes. Writing happens in ``<output>.partial`` and is renamed at the end;
a rerun skips sources already in the manifest with the same checksum, so an interrupted prepare
completes to the same bytes as a clean run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scfm.data.vocab import Vocab
from scfm.errors import CorruptCorpusError, ScfmInputError

FORMAT = "scfm-corpus"
FORMAT_VERSION = 1
LABEL_ROLES = ("cell_type", "batch", "perturbation", "modality", "split")
SHARD_ARRAYS = {"gene_ids": np.int32, "counts": np.int32, "offsets": np.int64}


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_meta(path: Path) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of a file, as manifests record them."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def is_corpus(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


@dataclass
class Shard:
    """Numpy views of one shard: cell ``i`` is ``gene_ids[offsets[i]:offsets[i+1]]``."""

    gene_ids: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    total_counts: np.ndarray

    @property
    def n_cells(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_genes(self) -> np.ndarray:
        return np.diff(self.offsets)


class Corpus:
    """A prepared corpus. Opening checks every file's size against the manifest; ``verify()`` checks sha256."""

    def __init__(self, path: str | Path, verify: bool = False) -> None:
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise ScfmInputError("not a scfm corpus (no manifest.json)", where=str(self.path),
                                 fix="build one with `scfm-prepare input=<file> output=<folder>`")
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != FORMAT_VERSION:
            raise ScfmInputError(f"unsupported corpus format {self.manifest.get('format')!r} "
                                 f"v{self.manifest.get('version')}", where=str(manifest),
                                 fix=f"re-run scfm-prepare with this scfm (format {FORMAT} v{FORMAT_VERSION})")
        if not self.manifest.get("complete"):
            raise ScfmInputError("corpus is incomplete (an interrupted scfm-prepare)", where=str(self.path),
                                 fix="re-run the same scfm-prepare command; it resumes where it stopped")
        self._check_sizes()
        if verify:
            self.verify()
        self._shards: dict[int, Shard] = {}

    # -- integrity ---------------------------------------------------------------------------
    def _files(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        yield self.path / "vocab.tsv", self.manifest["vocab"]
        yield self.path / "gene_stats.parquet", self.manifest["gene_stats"]
        if "labels" in self.manifest:
            yield self.path / "labels.json", self.manifest["labels"]
        for shard in self.manifest["shards"]:
            for name, meta in shard["files"].items():
                yield self.path / "shards" / name, meta

    def _check_sizes(self) -> None:
        for file, meta in self._files():
            if not file.is_file():
                raise CorruptCorpusError("file listed in the manifest is missing", where=str(file),
                                         fix="re-run scfm-prepare into a new folder (sources: manifest.json)")
            size = file.stat().st_size
            if size != meta["bytes"]:
                raise CorruptCorpusError(f"size {size} bytes, manifest says {meta['bytes']} (truncated or altered)",
                                         where=str(file),
                                         fix="re-run scfm-prepare into a new folder, or restore this file")

    def verify(self) -> None:
        """Recompute the sha256 of every file and compare with the manifest."""
        for file, meta in self._files():
            if sha256_file(file) != meta["sha256"]:
                raise CorruptCorpusError("checksum differs from the manifest (corrupted shard)", where=str(file),
                                         fix="re-run scfm-prepare into a new folder, or restore this file")

    # -- content -----------------------------------------------------------------------------
    @cached_property
    def vocab(self) -> Vocab:
        return Vocab.load(self.path / "vocab.tsv")

    @cached_property
    def gene_stats(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "gene_stats.parquet")

    @cached_property
    def labels(self) -> dict[str, list[str]]:
        """Per label role (cell_type, batch, ...): its values; a batch's label id indexes this list."""
        return json.loads((self.path / "labels.json").read_text())

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    @cached_property
    def shard_sizes(self) -> np.ndarray:
        return np.array([s["n_cells"] for s in self.manifest["shards"]], dtype=np.int64)

    @property
    def n_cells(self) -> int:
        return int(self.shard_sizes.sum())

    @property
    def n_tokens(self) -> int:
        return int(sum(s["n_tokens"] for s in self.manifest["shards"]))

    @property
    def columns(self) -> dict[str, str]:
        """Label roles present in the obs tables (role -> original column)."""
        return dict(self.manifest.get("columns", {}))

    def shard(self, i: int) -> Shard:
        """Memory-mapped numpy views of shard ``i`` (opened once per process)."""
        if i not in self._shards:
            meta = self.manifest["shards"][i]
            folder = self.path / "shards" / meta["name"]
            arrays = {}
            for key, dtype in SHARD_ARRAYS.items():
                n = meta["n_cells"] + 1 if key == "offsets" else meta["n_tokens"]
                # a plain ndarray view of the map: slicing a np.memmap subclass costs ~5 µs per call
                arrays[key] = np.memmap(folder / f"{key}.memmap", dtype=dtype, mode="r", shape=(n,)).view(np.ndarray)
            totals = self.obs(i, columns=["total_counts"])["total_counts"].to_numpy(np.int64)
            self._shards[i] = Shard(total_counts=totals, **arrays)
        return self._shards[i]

    def shard_tensordict(self, i: int):
        """Shard ``i`` as the memory-mapped ``TensorDict`` it was written as."""
        from tensordict import TensorDict

        return TensorDict.load_memmap(self.path / "shards" / self.manifest["shards"][i]["name"])

    def obs(self, i: int, columns: Sequence[str] | None = None) -> pd.DataFrame:
        name = self.manifest["shards"][i]["name"]
        return pd.read_parquet(self.path / "shards" / f"{name}.obs.parquet", columns=columns)

    def cell(self, shard: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Gene token ids and raw counts of one cell."""
        s = self.shard(shard)
        lo, hi = s.offsets[index], s.offsets[index + 1]
        return np.asarray(s.gene_ids[lo:hi]), np.asarray(s.counts[lo:hi])

    def __getstate__(self) -> dict[str, Any]:  # memmaps are reopened in each worker
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state

    def __repr__(self) -> str:
        return (f"Corpus({str(self.path)!r}: {self.n_cells:,} cells, {self.n_tokens:,} tokens, "
                f"{self.n_shards} shards, vocab {len(self.vocab):,})")
