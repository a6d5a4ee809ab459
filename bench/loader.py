"""Benchmark one epoch of ``CellDataModule`` (random batching, batch 12) against a naive map-style loader.

Corpus: by default prepared once from the synthetic 10x-like ``.h5ad`` of ``--cells`` cells (``bench/synth.py``,
cached under ``$BENCH_WORK``, default /tmp/bench_work); or ``--corpus PATH`` (a prepared corpus; its first
source file is the baseline's input unless ``--h5ad``); or ``--builtin pbmc3k`` (prepared into ``$SCFM_CACHE``).

- scfm: ``CellDataModule(encoding, {"strategy": "random", "batch_size": 12}, val_fraction=0, num_workers=W)``,
  ``setup()`` then one pass over ``train_dataloader()``, counting cells (``len(lengths)``) and tokens
  (``lengths.sum()``). The clock includes worker start-up (``first_batch_s`` is reported apart). ``--read``: the main
  process also reads every batch once (``read_batch``), as the copy to a GPU of a training step would.
- baseline (same run, same machine): a map-style ``Dataset`` over ``anndata.read_h5ad(path, backed="r")`` whose
  ``__getitem__`` reads one row and encodes it (rank: count / total × 10⁴ / corpus gene median, argsort
  descending, first ``max_len``), in a ``DataLoader(batch_size=12, num_workers=0, collate_fn=pad)`` over
  ``--baseline-cells`` random cells in random order.

One JSON line per worker count on stdout; progress on stderr. ``cells_per_s_per_worker`` divides by W (W=0: the
main process is the one worker). ``cpu_s`` is the CPU time of the epoch (main process + loader workers, user +
system) and ``cells_per_cpu_s`` = cells / ``cpu_s``: on a shared machine whose other jobs take cores away, it moves
far less than wall-clock throughput (each process still competes for caches and memory bandwidth). Encodings are
entries of ``ENCODINGS`` (scfm encoding + naive row encoder).

Quick:  python bench/loader.py --cells 20000 --baseline-cells 500
Full:   python bench/loader.py --cells 100000 --baseline-cells 2000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import torch
from synth import WORK, ensure_h5ad, log
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from scfm.data.batching import is_shared_row
from scfm.data.corpus import Corpus, is_corpus
from scfm.data.datamodule import CellDataModule
from scfm.data.prepare import PrepareOptions, prepare
from scfm.encodings.bin import BinEncoding
from scfm.encodings.continuous import ContinuousEncoding
from scfm.encodings.rank import RankEncoding

TARGETS = {"cells_per_s_per_worker": 20_000, "speedup": 10.0}  # rank and bin
CONTINUOUS_GENES = 19_264  # scFoundation's gene list length
PER_WORKER_TARGET = {"rank": 20_000, "bin": 20_000, "continuous": 5_000}


@dataclass
class Tables:
    """What a naive row encoder needs: token id per h5ad column (-1: not in vocab) and gene median per token."""

    token_of_column: np.ndarray
    median: np.ndarray


def naive_rank(cols: np.ndarray, counts: np.ndarray, t: Tables, max_len: int) -> np.ndarray:
    tokens = t.token_of_column[cols]
    med = t.median[np.maximum(tokens, 0)]
    keep = (tokens >= 0) & (med > 0)
    values = counts[keep] / counts.sum() * 1e4 / med[keep]
    return tokens[keep][np.argsort(-values, kind="stable")[:max_len]]


def naive_bin(cols: np.ndarray, counts: np.ndarray, t: Tables, max_len: int, n_bins: int = 51) -> np.ndarray:
    """scGPT, one row: normalise + log1p, quantile bins of the non-zeros, sample max_len - 1 genes, <cls> first."""
    tokens = t.token_of_column[cols]
    keep = tokens >= 0
    tokens, x = tokens[keep], np.log1p(counts[keep] / counts[keep].sum() * 1e4)
    edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
    bins = np.digitize(x, edges)
    if len(tokens) > max_len - 1:
        pick = np.sort(np.random.default_rng(len(tokens)).choice(len(tokens), max_len - 1, replace=False))
        tokens, bins = tokens[pick], bins[pick]
    return np.concatenate([[2], tokens])


def naive_continuous(cols: np.ndarray, counts: np.ndarray, t: Tables, max_len: int) -> np.ndarray:
    """scFoundation, one row: dense counts over the gene list, maybe down-sampled, log1p values + T, S."""
    rng = np.random.default_rng(len(cols))
    dense = np.zeros(CONTINUOUS_GENES, dtype=np.float32)
    pos = t.token_of_column[cols] - 4
    keep = (pos >= 0) & (pos < CONTINUOUS_GENES)
    dense[pos[keep]] = counts[keep]
    raw_total = counts.sum()
    if rng.random() < 0.5 and raw_total >= 1000:
        dense = rng.binomial(dense.astype(np.int64), rng.beta(2, 2)).astype(np.float32)
    values = np.log1p(dense / max(dense.sum(), 1) * 1e4)
    masked = rng.random(CONTINUOUS_GENES) < np.where(dense > 0, 0.3, 0.03)
    values[masked] = 0
    return np.concatenate([values, [np.log10(raw_total), np.log10(max(dense.sum(), 1))]])


@dataclass
class EncodingSpec:
    make: Callable[[int], Any]  # max_len -> scfm encoding
    naive: Callable[[np.ndarray, np.ndarray, Tables, int], np.ndarray]  # (columns, counts, tables, max_len) -> ids


def _continuous(max_len: int) -> ContinuousEncoding:
    """scFoundation's length: the first 19,264 gene tokens of the corpus vocabulary as the fixed gene list."""
    return ContinuousEncoding(gene_list=str(GENE_LIST))


GENE_LIST = Path(os.environ.get("BENCH_WORK", "/tmp/bench_work")) / "gene_list_19264.txt"
ENCODINGS: dict[str, EncodingSpec] = {
    "rank": EncodingSpec(lambda max_len: RankEncoding(max_len=max_len), naive_rank),
    "bin": EncodingSpec(lambda max_len: BinEncoding(max_len=max_len), naive_bin),
    "continuous": EncodingSpec(_continuous, naive_continuous),
}
PAPER_MAX_LEN = {"rank": 2048, "bin": 1200, "continuous": CONTINUOUS_GENES + 2}


class NaiveRows(Dataset):
    """One backed-AnnData row per item, encoded on the fly."""

    def __init__(self, h5ad: Path, tables: Tables, naive: Callable, max_len: int) -> None:
        self.adata = ad.read_h5ad(h5ad, backed="r")
        self.tables, self.naive, self.max_len = tables, naive, max_len

    def __len__(self) -> int:
        return self.adata.n_obs

    def __getitem__(self, i: int) -> torch.Tensor:
        row = self.adata.X[i]
        ids = self.naive(row.indices, row.data.astype(np.float64), self.tables, self.max_len)
        return torch.from_numpy(ids)


def pad(batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"gene_ids": pad_sequence(batch, batch_first=True),
            "lengths": torch.tensor([len(b) for b in batch], dtype=torch.int64)}


def baseline(h5ad: Path, corpus: Corpus, spec: EncodingSpec, max_len: int, n_cells: int, seed: int) -> dict:
    var_names = list(ad.read_h5ad(h5ad, backed="r").var_names)
    median = np.full(len(corpus.vocab), np.nan, dtype=np.float64)
    median[corpus.gene_stats.token_id.to_numpy()] = corpus.gene_stats.nonzero_median.to_numpy()
    tables = Tables(corpus.vocab.lookup(var_names), median)
    data = NaiveRows(h5ad, tables, spec.naive, max_len)
    subset = np.random.default_rng(seed).choice(len(data), size=min(n_cells, len(data)), replace=False)
    loader = DataLoader(torch.utils.data.Subset(data, subset.tolist()), batch_size=12, num_workers=0,
                        collate_fn=pad)
    t, cells, tokens = time.perf_counter(), 0, 0
    for batch in loader:
        cells += len(batch["lengths"])
        tokens += int(batch["lengths"].sum())
    dt = time.perf_counter() - t
    return {"cells": cells, "s": dt, "cells_per_s": cells / dt, "tokens_per_cell": tokens / cells}


def read_batch(batch: Any) -> None:
    """What copying a batch to a GPU costs the main process: every byte read once (a row that every cell shares, a
    stride-0 view, once: ``batch_to``)."""
    for t in batch.values():
        (t[:1] if is_shared_row(t) else t).clone()


def scfm_epoch(corpus: Path, encoding: Any, workers: int, read: bool = False) -> dict[str, float]:
    dm = CellDataModule(encoding, {"strategy": "random", "batch_size": 12}, corpus=str(corpus),
                        val_fraction=0.0, num_workers=workers, progress=False)
    dm.setup()
    loader = dm.train_dataloader()
    cpu = _cpu_s()
    t = time.perf_counter()
    cells = tokens = batches = 0
    first = None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - t
        lengths = batch["lengths"]
        if read:
            read_batch(batch)
        cells += len(lengths)
        tokens += int(lengths.sum())
        batches += 1
    wall = time.perf_counter() - t
    del batch, loader  # ends the workers: their CPU time is counted once they are reaped
    gc.collect()
    return {"s": wall, "first_batch_s": first or 0.0, "cells": cells, "tokens": tokens,
            "batches": batches, "corpus_cells": dm.corpus.n_cells, "cpu_s": _cpu_s() - cpu}


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its reaped children (the loader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def resolve(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """(corpus folder, baseline .h5ad, label)."""
    if args.builtin:
        from scfm.data.builtin import builtin_corpus

        corpus = builtin_corpus(args.builtin, progress=False).path
        return corpus, Path(args.h5ad or corpus.with_name(corpus.name + ".h5ad")), f"builtin:{args.builtin}"
    if args.corpus:
        corpus = Path(args.corpus)
        src = Corpus(corpus).manifest["sources"][0]["path"]
        return corpus, Path(args.h5ad or src), str(corpus)
    h5ad = ensure_h5ad(args.cells)
    corpus = WORK / f"corpus-{h5ad.stem}"
    if not is_corpus(corpus):
        log(f"preparing {corpus} ...")
        prepare([str(h5ad)], corpus, PrepareOptions(progress=False), log=lambda _msg: None)
    return corpus, h5ad, f"synthetic:{args.cells}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=100_000, help="synthetic corpus size (default corpus)")
    ap.add_argument("--corpus", help="a prepared corpus instead of the synthetic one")
    ap.add_argument("--builtin", choices=["pbmc3k"], help="a built-in corpus instead of the synthetic one")
    ap.add_argument("--h5ad", help="baseline input (default: the corpus's source file)")
    ap.add_argument("--encoding", choices=sorted(ENCODINGS), default="rank")
    ap.add_argument("--max-len", type=int, default=None, help="default: the encoding's paper length")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--baseline-cells", type=int, default=2_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--read", action="store_true", help="the main process reads every batch (as a copy to a GPU would)")
    args = ap.parse_args()
    corpus_path, h5ad, label = resolve(args)
    spec = ENCODINGS[args.encoding]
    args.max_len = args.max_len or PAPER_MAX_LEN[args.encoding]
    corpus = Corpus(corpus_path)
    if args.encoding == "continuous":
        GENE_LIST.parent.mkdir(parents=True, exist_ok=True)
        GENE_LIST.write_text("\n".join(corpus.vocab.gene_ids[:CONTINUOUS_GENES]) + "\n")
    log(f"corpus {corpus}; baseline input {h5ad}")
    base = baseline(h5ad, corpus, spec, args.max_len, args.baseline_cells, args.seed)
    log(f"baseline: {base['cells']:,} cells in {base['s']:.2f} s = {base['cells_per_s']:,.0f} cells/s")
    for w in args.workers:
        r = scfm_epoch(corpus_path, spec.make(args.max_len), w, args.read)
        cps = r["cells"] / r["s"]
        row = {"case": f"{args.encoding}_W{w}", "num_workers": w, "cells_per_s": round(cps),
               "tokens_per_s": round(r["tokens"] / r["s"]), "baseline_cells_per_s": round(base["cells_per_s"]),
               "speedup": round(cps / base["cells_per_s"], 2), "cells_per_s_per_worker": round(cps / max(w, 1)),
               "encoding": args.encoding, "max_len": args.max_len, "batch_size": 12, "corpus": label,
               "n_cells": r["cells"], "corpus_cells": r["corpus_cells"], "n_batches": r["batches"],
               "tokens_per_cell": round(r["tokens"] / r["cells"], 1), "epoch_s": round(r["s"], 3),
               "cpu_s": round(r["cpu_s"], 3), "cells_per_cpu_s": round(r["cells"] / r["cpu_s"]),
               "first_batch_s": round(r["first_batch_s"], 3), "baseline_cells": base["cells"],
               "baseline_s": round(base["s"], 3), "baseline_tokens_per_cell": round(base["tokens_per_cell"], 1),
               "nproc": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2), "read_batches": args.read}
        row["pass"] = {"cells_per_s_per_worker": row["cells_per_s_per_worker"] >= PER_WORKER_TARGET[args.encoding],
                       "speedup": row["speedup"] >= TARGETS["speedup"]}
        log(f"W={w}: {r['cells']:,} cells in {r['s']:.2f} s = {cps:,.0f} cells/s")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
