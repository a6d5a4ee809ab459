"""Benchmark ``scfm.data.corpus.prepare`` against the floor of merely reading the input, at two input sizes.

For each size a 10x-like synthetic ``.h5ad`` is generated once (``bench/synth.py``, cached under
``$BENCH_WORK``, default /tmp/bench_work). Every measurement runs in a fresh child process (this script with
``--child``; the synthetic file is made in one too), so the parent never holds the data:

- ``read_only_s``: ``open_source(path)`` + stream X through ``iter_chunks(8192)``, summing the data (the
  reader floor, validation included); ``h5py_read_s`` (context): raw h5py reads of the same row ranges;
- ``prepare_s``: ``prepare([path], out, PrepareOptions(progress=False))`` into a new folder. torch and
  tensordict (imported lazily by the shard writer) are imported before the clock starts: a one-off cost
  (~2–4 s here), reported apart as ``import_s``, that a throughput figure should not include;
- ``peak_rss_mb``: the prepare child's ``VmHWM`` (``ru_maxrss`` inherits the parent's high-water mark across
  fork + exec on Linux, so it is only context); ``*_cpu_s``: user + system CPU time of the child.

Each is repeated ``--repeats`` times and the fastest kept (the machine is shared and noisy). Prepare is one
single-threaded process, so ``cells_per_s_per_core`` equals ``cells_per_s``. One JSON line per size on stdout,
then a ``summary`` line (RSS flatness across sizes); progress on stderr. Set ``PYTHONPATH`` to a patched copy
of scfm to measure a patch (the ``scfm`` field says which package ran).

Quick:  python bench/prepare.py --cells 20000 40000 --repeats 1
Full:   python bench/prepare.py --cells 100000 200000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from synth import WORK, describe, ensure_h5ad, log

TARGETS = {"cells_per_s_per_core": 50_000, "ratio_to_read": 2.0, "peak_rss_mb": 1_500}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_mb() -> dict[str, float]:
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return {"vmhwm_mb": int(hwm.split()[1]) / 1024,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB


def child_read(path: str) -> dict[str, Any]:
    import h5py
    import numpy as np

    from scfm.data.readers import open_source

    t, cpu = time.perf_counter(), _cpu_s()
    total, cells = 0.0, 0
    for chunk in open_source(path).iter_chunks(8192):
        total += float(chunk.counts.data.sum(dtype=np.float64))
        cells += chunk.counts.shape[0]
    read_s, read_cpu_s = time.perf_counter() - t, _cpu_s() - cpu
    t = time.perf_counter()
    with h5py.File(path, "r") as f:  # the raw floor: the same row ranges, no validation, no obs
        g = f["X"]
        indptr = g["indptr"][:]
        for lo in range(0, len(indptr) - 1, 8192):
            a, b = int(indptr[lo]), int(indptr[min(lo + 8192, len(indptr) - 1)])
            g["indices"][a:b]
            total -= float(g["data"][a:b].sum(dtype=np.float64))
    return {"read_only_s": read_s, "read_cpu_s": read_cpu_s, "h5py_read_s": time.perf_counter() - t,
            "cells": cells, "checksum_ok": abs(total) < 1e-6, "read_peak_rss_mb": _peak_rss_mb()["vmhwm_mb"]}


def child_prepare(path: str, out: str) -> dict[str, Any]:
    t = time.perf_counter()
    import tensordict  # noqa: F401  (imported lazily by prepare: a one-off cost, timed apart as import_s)
    import torch  # noqa: F401

    import scfm
    from scfm.data.prepare import PrepareOptions, prepare

    import_s = time.perf_counter() - t
    t, cpu = time.perf_counter(), _cpu_s()
    corpus = prepare([path], out, PrepareOptions(progress=False), log=lambda _msg: None)
    return {"prepare_s": time.perf_counter() - t, "prepare_cpu_s": _cpu_s() - cpu, "import_s": import_s,
            "corpus_cells": corpus.n_cells, "n_shards": corpus.n_shards, "scfm": str(Path(scfm.__file__).parent),
            "gene_stats_method": corpus.manifest["gene_stats"]["method"], **_peak_rss_mb()}


def run_child(*args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_size(n_cells: int, n_genes: int, mean_nnz: float, repeats: int) -> dict[str, Any]:
    path = Path(run_child("synth", str(n_cells), str(n_genes), str(mean_nnz))["path"])
    out = WORK / f"corpus-prepare-bench-{n_cells}"
    reads, preps = [], []
    for r in range(repeats):
        reads.append(run_child("read", str(path)))
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
        preps.append(run_child("prepare", str(path), str(out)))
        log(f"{n_cells:,} cells, repeat {r + 1}/{repeats}: read {reads[-1]['read_only_s']:.2f} s, "
            f"prepare {preps[-1]['prepare_s']:.2f} s (cpu {preps[-1]['prepare_cpu_s']:.2f} s), "
            f"prepare peak RSS {preps[-1]['vmhwm_mb']:.0f} MB")
    shutil.rmtree(out, ignore_errors=True)
    assert all(p["corpus_cells"] == n_cells for p in preps)
    assert all(d["checksum_ok"] and d["cells"] == n_cells for d in reads)
    read = min(reads, key=lambda d: d["read_only_s"])
    prep = min(preps, key=lambda d: d["prepare_s"])
    cps = n_cells / prep["prepare_s"]
    row = {"case": f"{n_cells}_cells", **describe(path), "input_gib": round(path.stat().st_size / 2**30, 3),
           "read_only_s": round(read["read_only_s"], 3), "prepare_s": round(prep["prepare_s"], 3),
           "cells_per_s": round(cps), "cells_per_s_per_core": round(cps), "processes": 1,
           "ratio_to_read": round(prep["prepare_s"] / read["read_only_s"], 3),
           "peak_rss_mb": round(max(d["vmhwm_mb"] for d in preps), 1),
           "h5py_read_s": round(min(d["h5py_read_s"] for d in reads), 3),
           "read_cpu_s": round(read["read_cpu_s"], 3), "prepare_cpu_s": round(prep["prepare_cpu_s"], 3),
           "ru_maxrss_mb": round(max(d["ru_maxrss_mb"] for d in preps), 1),
           "read_peak_rss_mb": round(max(d["read_peak_rss_mb"] for d in reads), 1),
           "import_s": round(prep["import_s"], 3), "n_shards": prep["n_shards"],
           "gene_stats_method": prep["gene_stats_method"], "repeats": repeats,
           "all_prepare_s": [round(d["prepare_s"], 3) for d in preps],
           "all_read_only_s": [round(d["read_only_s"], 3) for d in reads], "scfm": prep["scfm"],
           "loadavg_1m": round(os.getloadavg()[0], 2)}
    row["pass"] = {"cells_per_s_per_core": cps >= TARGETS["cells_per_s_per_core"],
                   "ratio_to_read": row["ratio_to_read"] <= TARGETS["ratio_to_read"],
                   "peak_rss_mb": row["peak_rss_mb"] <= TARGETS["peak_rss_mb"]}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[100_000, 200_000], help="input sizes (cells)")
    ap.add_argument("--genes", type=int, default=33_538)
    ap.add_argument("--nnz", type=float, default=1_600.0, help="target median non-zeros per cell")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "synth":
            print(json.dumps({"path": str(ensure_h5ad(int(rest[0]), int(rest[1]), float(rest[2])))}))
        else:
            print(json.dumps(child_read(*rest) if kind == "read" else child_prepare(*rest)))
        return
    rows = []
    for n in args.cells:
        rows.append(bench_size(n, args.genes, args.nnz, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) > 1:
        small, large = rows[0], rows[-1]
        growth = large["peak_rss_mb"] - small["peak_rss_mb"]
        print(json.dumps({"case": "summary", "sizes": [r["n_cells"] for r in rows],
                          "peak_rss_mb": [r["peak_rss_mb"] for r in rows], "rss_growth_mb": round(growth, 1),
                          "rss_flat": growth <= 0.1 * small["peak_rss_mb"],
                          "cells_per_s": [r["cells_per_s"] for r in rows], "scfm": large["scfm"]}), flush=True)


if __name__ == "__main__":
    main()
