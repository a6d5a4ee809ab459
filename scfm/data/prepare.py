"""``prepare``: raw-count files -> a corpus (the format: ``scfm.data.corpus``).

Writing happens in ``<output>.partial`` and is renamed at the end; a rerun skips sources already in the manifest
with the same checksum, so an interrupted prepare completes to the same bytes as a clean run, and new inputs append
to an existing corpus.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm.data.corpus import FORMAT, FORMAT_VERSION, SHARD_ARRAYS, Corpus, file_meta, is_corpus
from scfm.data.gene_stats import GeneStatsAccumulator, normalised_values
from scfm.data.vocab import Vocab, load_gene_map, modality_of, strip_version
from scfm.errors import ScfmInputError

_STATS_BLOCK = 1 << 20  # tokens per gene-statistics update


@dataclass
class InputSpec:
    """One input: an ``.h5ad`` file, a 10x mtx folder or a 10x ``.h5``."""

    path: str
    layer: str | None = None
    use_raw: bool = False
    gene_id_column: str | None = None
    symbol_column: str | None = None
    name: str | None = None


@dataclass
class PrepareOptions:
    """Everything ``prepare`` needs besides the inputs; the Hydra app's ``conf/prepare.yaml`` mirrors it."""

    vocab: str | None = None  # vocab.tsv or a Geneformer token dictionary .json; None = built from the inputs
    gene_map: str | None = None  # symbol -> Ensembl table for inputs that carry only symbols
    gene_key: str = "ensembl"  # 'ensembl' or 'symbol': what the vocabulary is keyed by
    duplicate_genes: str = "error"  # several input columns for one token: 'error' | 'sum' | 'first'
    columns: dict[str, str] = field(default_factory=dict)  # role (cell_type, batch, ...) -> obs column
    empty_cells: str = "skip"  # cells with no in-vocabulary counts: 'skip' (counted) | 'error'
    shard_cells: int = 65_536
    shard_tokens: int = 1 << 24
    chunk_cells: int = 8_192
    gene_stats: str = "auto"  # 'auto' | 'exact' | 'histogram'
    exact_max_values: int = 20_000_000  # 'auto' uses exact medians up to this many non-zeros
    progress: bool = True


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def cell_hash(cell_ids: Sequence[str] | pd.Index) -> np.ndarray:
    """Deterministic 64-bit hash per cell id (pandas' SipHash with its fixed key)."""
    return pd.util.hash_pandas_object(pd.Index(cell_ids, dtype=object), index=False).to_numpy(np.uint64)


def split_key(cell_ids: Sequence[str] | pd.Index) -> np.ndarray:
    """A uniform number in [0, 1) per cell id, used for the deterministic train/val split."""
    return (cell_hash(cell_ids) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _vocab_file(vocab: str) -> str | Path:
    """The ``vocab`` option: a file, or a built-in Geneformer name (``geneformer_gc30M`` / ``geneformer_gc95M``)."""
    from scfm.resources import GENEFORMER_NAMES, geneformer_dictionary

    return geneformer_dictionary(vocab, kind="tokens") if vocab in GENEFORMER_NAMES else vocab


def _source_names(sources: Sequence, specs: Sequence[InputSpec], taken: set[str]) -> list[str]:
    """``spec.name``, else the input's file or folder name with as many parent folders as it takes to tell the
    inputs apart (``s1/filtered_feature_bc_matrix`` vs ``s2/filtered_feature_bc_matrix``)."""
    parts = [Path(str(src.path)).resolve().parts for src in sources]
    names = []
    for spec, own in zip(specs, parts):
        if spec.name:
            names.append(spec.name)
            continue
        for k in range(1, len(own) + 1):
            name = "/".join(own[-k:])
            if name not in taken and all("/".join(p[-k:]) != name for p in parts if p != own):
                break
        names.append(name)
    return names


def _check_columns(src, options: PrepareOptions) -> None:
    columns = src.read_obs().columns
    missing = {role: col for role, col in options.columns.items() if col not in columns}
    if missing:
        raise ScfmInputError(f"declared label column(s) {missing} not in obs (obs has {list(columns)[:12]})",
                             where=str(src.path),
                             fix="fix the column names in columns=, or drop the roles this input lacks")


def _source_keys(source, options: PrepareOptions, gene_map: dict[str, str] | None) -> np.ndarray:
    """The vocabulary key (Ensembl id or symbol) of each input column; None where unknown."""
    var = source.var
    label = str(source.path)
    if options.gene_key == "symbol":
        keys = var["symbol"].to_numpy(object)
        if pd.isna(keys).all():
            raise ScfmInputError("gene_key=symbol but the input has no gene symbols", where=label,
                                 fix="use gene_key=ensembl, or pass symbol_column=<var column>")
        return keys
    if options.gene_key != "ensembl":
        raise ScfmInputError(f"gene_key must be 'ensembl' or 'symbol', not {options.gene_key!r}")
    ids = var["gene_id"].to_numpy(object).copy()
    missing = pd.isna(ids)
    if missing.any():
        if gene_map is None:
            raise ScfmInputError(f"{int(missing.sum()):,} of {len(ids):,} genes have no Ensembl id "
                                 f"(e.g. symbols {list(var['symbol'][missing][:3])})", where=label,
                                 fix="pass gene_map=<table with symbol,gene_id columns>, or gene_key=symbol "
                                     "to key the vocabulary by symbol")
        ids[missing] = [gene_map.get(s) for s in var["symbol"][missing]]
    return np.array([strip_version(x) if isinstance(x, str) else None for x in ids], dtype=object)


@dataclass
class _ColumnMap:
    """Maps a source's columns to vocabulary tokens (sum / first / error for duplicates)."""

    matrix: sp.csr_matrix  # n_source_genes x n_used, 0/1
    used_tokens: np.ndarray  # ascending token ids of the used columns
    n_out_of_vocab: int
    oov_examples: list[str]
    n_duplicates: int
    token_of_column: np.ndarray | None = None  # int32 token per source column (-1: dropped); None: not one-to-one
    monotone: bool = False  # kept columns map to ascending tokens: remapped rows need no sort


def _column_map(keys: np.ndarray, vocab: Vocab, policy: str, label: str, symbols: Sequence) -> _ColumnMap:
    tokens = vocab.lookup(list(keys))
    oov = tokens < 0
    keep = np.nonzero(~oov)[0]
    tok = tokens[keep]
    uniq, first_index, counts = np.unique(tok, return_index=True, return_counts=True)
    n_dup = int((counts > 1).sum())
    if n_dup:
        dup_tok = uniq[counts > 1][:3]
        examples = [f"{vocab.gene_ids[t - vocab.n_special]} ← columns "
                    f"{[str(symbols[c]) for c in keep[tok == t]][:3]}" for t in dup_tok]
        if policy == "error":
            raise ScfmInputError(f"{n_dup} genes appear in several input columns, e.g. {examples}",
                                 where=label, fix="pass duplicate_genes=sum (add their counts) or "
                                                  "duplicate_genes=first (keep the first column)")
        if policy == "first":
            keep, tok = keep[first_index], tok[first_index]
        elif policy != "sum":
            raise ScfmInputError(f"duplicate_genes must be error|sum|first, not {policy!r}")
    col = np.searchsorted(uniq, tok)
    matrix = sp.csr_matrix((np.ones(len(keep), np.int32), (keep, col)), shape=(len(keys), len(uniq)))
    oov_examples = [str(k if isinstance(k, str) else s) for k, s in zip(keys[oov][:5], np.asarray(symbols)[oov][:5])]
    cmap = _ColumnMap(matrix, uniq, int(oov.sum()), oov_examples, n_dup)
    if len(keep) == len(uniq):  # each used token has one source column: remap indices, no sparse product
        cmap.token_of_column = np.full(len(keys), -1, dtype=np.int32)
        cmap.token_of_column[keep] = uniq[col]
        kept = cmap.token_of_column[cmap.token_of_column >= 0]
        cmap.monotone = bool(np.all(kept[1:] > kept[:-1]))
    return cmap


def _remap(X: sp.csr_matrix, cmap: _ColumnMap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids, counts, indptr) of a validated chunk (canonical, no zeros): its in-vocabulary entries,
    token ids ascending within each cell."""
    if cmap.token_of_column is None:  # several columns add up into one token
        Y = (X @ cmap.matrix).tocsr()
        Y.eliminate_zeros()
        Y.sort_indices()
        return cmap.used_tokens[Y.indices].astype(np.int32), Y.data.astype(np.int32, copy=False), Y.indptr
    tokens, counts, indptr = cmap.token_of_column[X.indices], X.data, X.indptr
    if (cmap.token_of_column < 0).any():  # out-of-vocabulary (or dropped duplicate) columns
        keep = tokens >= 0
        kept = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(keep, out=kept[1:])
        tokens, counts, indptr = tokens[keep], counts[keep], kept[indptr]
    if not cmap.monotone:
        Y = sp.csr_matrix((counts, tokens, indptr), shape=(X.shape[0], int(tokens.max(initial=0)) + 1), copy=True)
        Y.has_sorted_indices = False
        Y.sort_indices()
        tokens, counts, indptr = Y.indices.astype(np.int32, copy=False), Y.data, Y.indptr
    return tokens, counts.astype(np.int32, copy=False), np.asarray(indptr, dtype=np.int64)


class _ShardWriter:
    """Buffers tokenized cells and writes a shard when it is full (atomically: temp folder, then rename)."""

    def __init__(self, folder: Path, first_index: int, options: PrepareOptions) -> None:
        self.folder, self.next_index, self.options = folder, first_index, options
        self.written: list[dict[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self.gene_ids: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.obs: list[pd.DataFrame] = []
        self.n_cells = self.n_tokens = 0

    def add(self, gene_ids: np.ndarray, counts: np.ndarray, lengths: np.ndarray, obs: pd.DataFrame) -> None:
        """Add a block of cells, splitting it over shards at the configured limits."""
        ends = np.cumsum(lengths)
        starts = ends - lengths
        i, n = 0, len(lengths)
        while i < n:
            room_tokens = self.options.shard_tokens - self.n_tokens
            k = int(np.searchsorted(ends[i:] - starts[i], room_tokens, side="right"))
            k = min(k, self.options.shard_cells - self.n_cells, n - i)
            if k == 0:
                if self.n_cells:  # the next cell does not fit: close this shard
                    self.flush()
                    continue
                k = 1  # a cell longer than the token budget gets a shard of its own
            lo, hi = starts[i], ends[i + k - 1]
            self.gene_ids.append(gene_ids[lo:hi])
            self.counts.append(counts[lo:hi])
            self.lengths.append(lengths[i:i + k])
            self.obs.append(obs.iloc[i:i + k])
            self.n_cells += k
            self.n_tokens += int(hi - lo)
            i += k
            if i < n or self.n_cells >= self.options.shard_cells:
                self.flush()

    def flush(self) -> None:
        if self.n_cells == 0:
            return
        import torch
        from tensordict import TensorDict

        name = f"{self.next_index:05d}"
        lengths = np.concatenate(self.lengths)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        arrays = {"gene_ids": np.concatenate(self.gene_ids).astype(np.int32, copy=False),
                  "counts": np.concatenate(self.counts).astype(np.int32, copy=False), "offsets": offsets}
        tmp = self.folder / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        TensorDict({k: torch.from_numpy(v) for k, v in arrays.items()}, batch_size=[]).memmap(tmp, num_threads=0)
        obs = pd.concat(self.obs, ignore_index=True)
        obs.to_parquet(tmp / "obs.parquet", index=False)
        final = self.folder / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp / "obs.parquet", self.folder / f"{name}.obs.parquet")
        os.replace(tmp, final)
        files = {f"{name}/{k}.memmap": file_meta(final / f"{k}.memmap") for k in SHARD_ARRAYS}
        files[f"{name}/meta.json"] = file_meta(final / "meta.json")
        files[f"{name}.obs.parquet"] = file_meta(self.folder / f"{name}.obs.parquet")
        self.written.append({"name": name, "n_cells": self.n_cells, "n_tokens": self.n_tokens, "files": files})
        self.next_index += 1
        self._reset()


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class CellsPerSecond(TextColumn):
        def __init__(self) -> None:
            super().__init__("")

        def render(self, task):  # type: ignore[override]
            speed = task.completed / task.elapsed if task.elapsed else None
            from rich.text import Text

            return Text(f"{speed:,.0f} cells/s" if speed else "… cells/s", style="cyan")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    CellsPerSecond(), TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
                    transient=False)


def prepare(inputs: Sequence[InputSpec | str], output: str | Path, options: PrepareOptions | None = None,
            log: Callable[[str], None] = print) -> Corpus:
    """Tokenize raw-count inputs into a corpus at ``output`` (see module docstring). Returns it, opened."""
    from scfm.data.readers import open_source

    options = options or PrepareOptions()
    specs = [InputSpec(path=s) if isinstance(s, str | Path) else s for s in inputs]
    if not specs:
        raise ScfmInputError("no inputs given",
                             fix="pass input=<file.h5ad | 10x folder | 10x .h5> (a list for several)")
    output = Path(output)
    append = output.exists()
    if append and not is_corpus(output):
        if output.is_dir() and not any(output.iterdir()):
            append = False
            output.rmdir()
        else:
            raise ScfmInputError("output path exists and is not a scfm corpus", where=str(output),
                                 fix="choose a new output folder; scfm-prepare never overwrites other files")
    staging = output if append else output.with_name(output.name + ".partial")
    # an append keeps its progress in a side manifest: manifest.json describes the complete corpus until the end
    work = staging / (".append-manifest.json" if append else "manifest.json")
    manifest: dict[str, Any] | None = None
    for file in (work, staging / "manifest.json"):
        if file.is_file():
            manifest = json.loads(file.read_text())
            break

    sources = [open_source(s.path, layer=s.layer, use_raw=s.use_raw, gene_id_column=s.gene_id_column,
                           symbol_column=s.symbol_column) for s in specs]
    gene_map = load_gene_map(options.gene_map) if options.gene_map else None
    keys = [_source_keys(src, options, gene_map) for src in sources]
    for src in sources:  # before anything is written, so a typo does not stick to a staging folder
        _check_columns(src, options)
    if manifest is not None and not append and not manifest["sources"]:
        # a failed run that completed no input: start afresh with this run's inputs and options
        shutil.rmtree(staging)
        manifest = None

    if manifest is not None:
        vocab = Vocab.load(staging / "vocab.tsv")
    elif options.vocab:
        vocab = Vocab.load(_vocab_file(options.vocab))
    else:
        symbols: dict[str, str | None] = {}
        modalities: dict[str, str] = {}
        for src, k in zip(sources, keys):
            kinds = next((src.var[c] for c in ("modality", "feature_type") if c in src.var), None)
            kinds = [None] * len(k) if kinds is None else list(kinds)
            for key, sym, kind in zip(k, src.var["symbol"], kinds):
                if isinstance(key, str):
                    symbols.setdefault(key, sym if isinstance(sym, str) else None)
                    modalities.setdefault(key, modality_of(kind))
        vocab = Vocab.build(symbols.keys(), symbols, modalities=modalities)
    if options.vocab and manifest is not None and (Vocab.load(_vocab_file(options.vocab)).sha256()
                                                   != manifest["vocab"]["sha256"]):
        raise ScfmInputError("the given vocabulary differs from the corpus's", where=str(staging),
                             fix="use the vocabulary the corpus was built with, or a new output folder")

    staging.mkdir(parents=True, exist_ok=True)
    (staging / "shards").mkdir(exist_ok=True)
    if manifest is None:
        vocab.save(staging / "vocab.tsv")
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "complete": False, "sources": [], "shards": [],
                    "vocab": {"file": "vocab.tsv", "n_tokens": len(vocab), **file_meta(staging / "vocab.tsv")},
                    "columns": dict(options.columns)}
    elif dict(options.columns) != manifest.get("columns", {}):
        raise ScfmInputError(f"label columns {dict(options.columns)} differ from the corpus's {manifest['columns']}",
                             where=str(staging), fix="use the same columns= as the first run, or a new output folder"
                             + ("" if append else f" (or delete {staging} to start over)"))
    # forget shards of an interrupted source: only the manifest's shards count
    listed = {s["name"] for s in manifest["shards"]}
    for entry in (staging / "shards").iterdir():
        if entry.name.split(".")[0] not in listed:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    manifest["complete"] = False
    _write_json_atomic(work, manifest)

    done = {s["sha256"]: s for s in manifest["sources"]}
    seen_hashes = [np.load(staging / f".cellhash-{s['sha256'][:16]}.npy") for s in manifest["sources"]
                   if (staging / f".cellhash-{s['sha256'][:16]}.npy").exists()]
    names = _source_names(sources, specs, {s["name"] for s in manifest["sources"]})
    with _progress(options.progress) as progress:
        for spec, src, k, name in zip(specs, sources, keys, names):
            digest = src.sha256()
            if digest in done:
                log(f"skip {src.path}: already in the corpus (sha256 {digest[:12]}…)")
                continue
            entry, hashes = _write_source(spec, src, k, digest, vocab, options, staging, manifest, seen_hashes,
                                          progress, name)
            np.save(staging / f".cellhash-{digest[:16]}.npy", hashes)
            seen_hashes.append(hashes)
            manifest["sources"].append(entry)
            _write_json_atomic(work, manifest)
            done[digest] = entry
            log(f"{src.path}: {entry['n_cells']:,} cells kept, {entry['n_empty_cells']:,} empty skipped; "
                f"{entry['n_genes_out_of_vocab']:,} of {entry['n_genes_in']:,} genes not in the vocabulary "
                f"({entry['out_of_vocab_count_fraction']:.2%} of counts)"
                + (f", e.g. {entry['out_of_vocab_examples'][:3]}" if entry["n_genes_out_of_vocab"] else ""))

    if not manifest["shards"]:
        raise ScfmInputError("no cells were written (all inputs empty?)", where=", ".join(s.path for s in specs))
    _write_gene_stats(staging, manifest, vocab, options)
    _write_labels(staging, manifest)
    manifest["n_cells"] = int(sum(s["n_cells"] for s in manifest["shards"]))
    manifest["n_tokens"] = int(sum(s["n_tokens"] for s in manifest["shards"]))
    manifest["complete"] = True
    os.replace(staging / "gene_stats.parquet.tmp", staging / "gene_stats.parquet")
    os.replace(staging / "labels.json.tmp", staging / "labels.json")
    _write_json_atomic(staging / "manifest.json", manifest)
    if work.name != "manifest.json":
        work.unlink()
    if staging != output:
        os.replace(staging, output)
    return Corpus(output)


def _write_source(spec: InputSpec, src, keys: np.ndarray, digest: str, vocab: Vocab, options: PrepareOptions,
                  staging: Path, manifest: dict[str, Any], seen_hashes: list[np.ndarray], progress, name: str
                  ) -> tuple[dict[str, Any], np.ndarray]:
    label = str(src.path)
    cmap = _column_map(keys, vocab, options.duplicate_genes, label, list(src.var["symbol"]))
    all_obs = src.read_obs()  # label columns were checked for every input before anything was written
    hashes = cell_hash(all_obs.index.astype(str))
    for previous in seen_hashes:
        clash = np.intersect1d(previous, hashes)
        if len(clash):
            examples = list(all_obs.index[np.isin(hashes, clash)][:5])
            raise ScfmInputError(f"{len(clash)} cell ids already appear in an earlier input, e.g. {examples}",
                                 where=label, fix="make cell ids unique across inputs (e.g. prefix them with "
                                                  "the sample name in obs_names)")
    writer = _ShardWriter(staging / "shards", len(manifest["shards"]), options)
    n_kept = n_empty = 0
    oov_counts = total_counts_all = 0
    task = progress.add_task(f"{name}", total=src.n_cells)
    for chunk in src.iter_chunks(options.chunk_cells):
        X = chunk.counts
        totals = np.asarray(X.sum(axis=1), dtype=np.int64).ravel()
        tokens, counts, indptr = _remap(X, cmap)
        n_genes = np.diff(indptr)
        total_counts_all += int(totals.sum())
        oov_counts += int(totals.sum() - counts.sum(dtype=np.int64))
        empty = n_genes == 0
        if empty.any():
            if options.empty_cells == "error":
                raise ScfmInputError(f"{int(empty.sum())} cells have no counts in vocabulary genes, e.g. "
                                     f"{list(chunk.obs.index[empty][:5])}", where=label,
                                     fix="filter empty cells first, or pass empty_cells=skip to drop them")
            n_empty += int(empty.sum())  # empty cells have no tokens: only the per-cell arrays shrink
            totals, n_genes = totals[~empty], n_genes[~empty]
        obs_in = chunk.obs.loc[~empty] if empty.any() else chunk.obs
        obs = pd.DataFrame({"cell_id": obs_in.index.astype(str), "source": name,
                            "total_counts": totals, "n_genes": n_genes.astype(np.int32),
                            "split_key": split_key(obs_in.index.astype(str))})
        for role, col in options.columns.items():
            obs[role] = obs_in[col].astype(str).where(obs_in[col].notna(), None).to_numpy()
        writer.add(tokens, counts, n_genes, obs)
        n_kept += len(totals)
        progress.advance(task, len(chunk.obs))
    writer.flush()
    manifest["shards"].extend(writer.written)
    entry = {"path": str(Path(label).resolve()), "name": name, "sha256": digest, "layer": spec.layer,
             "use_raw": spec.use_raw, "n_cells_in": int(src.n_cells), "n_cells": n_kept, "n_empty_cells": n_empty,
             "n_genes_in": len(keys), "n_genes_out_of_vocab": cmap.n_out_of_vocab,
             "out_of_vocab_examples": cmap.oov_examples, "n_duplicate_genes": cmap.n_duplicates,
             "duplicate_genes": options.duplicate_genes if cmap.n_duplicates else None,
             "out_of_vocab_count_fraction": oov_counts / max(total_counts_all, 1),
             "shards": [s["name"] for s in writer.written]}
    return entry, hashes


def _write_gene_stats(staging: Path, manifest: dict[str, Any], vocab: Vocab, options: PrepareOptions) -> None:
    n_values = sum(s["n_tokens"] for s in manifest["shards"])
    method = options.gene_stats
    if method == "auto":
        method = "exact" if n_values <= options.exact_max_values else "histogram"
    acc = GeneStatsAccumulator(len(vocab), method=method)
    for meta in manifest["shards"]:  # one shard in memory at a time, read (not mapped): RSS stays flat
        folder = staging / "shards" / meta["name"]
        gene_ids, counts, offsets = (np.fromfile(folder / f"{k}.memmap", dtype=SHARD_ARRAYS[k]) for k in SHARD_ARRAYS)
        totals = pd.read_parquet(staging / "shards" / f"{meta['name']}.obs.parquet",
                                 columns=["total_counts"])["total_counts"].to_numpy(np.int64)
        # blocks of ~1M tokens: small temporaries, reused by the allocator instead of page-faulted afresh
        cuts = np.unique(np.r_[np.searchsorted(offsets, np.arange(0, offsets[-1], _STATS_BLOCK)), meta["n_cells"]])
        for lo, hi in itertools.pairwise(cuts):
            a, b = offsets[lo], offsets[hi]
            values = normalised_values(counts[a:b], offsets[lo:hi + 1] - a, totals[lo:hi])
            acc.update(gene_ids[a:b], values, int(hi - lo))
        del gene_ids, counts
    stats = acc.result()
    stats.insert(1, "gene_id", list(vocab.specials) + list(vocab.gene_ids))
    stats.to_parquet(staging / "gene_stats.parquet.tmp", index=False)
    manifest["gene_stats"] = {"file": "gene_stats.parquet", "method": method,
                              **file_meta(staging / "gene_stats.parquet.tmp")}


def _write_labels(staging: Path, manifest: dict[str, Any]) -> None:
    """``labels.json``: per label role, its sorted values; label ids in batches index these lists."""
    roles = sorted(manifest.get("columns", {}))
    values: dict[str, set[str]] = {role: set() for role in roles}
    for shard in manifest["shards"]:
        if roles:
            obs = pd.read_parquet(staging / "shards" / f"{shard['name']}.obs.parquet", columns=roles)
            for role in roles:
                values[role].update(v for v in obs[role].dropna().unique())
    (staging / "labels.json.tmp").write_text(json.dumps({r: sorted(v) for r, v in values.items()}, indent=1))
    manifest["labels"] = {"file": "labels.json", **file_meta(staging / "labels.json.tmp")}
