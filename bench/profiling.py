"""cProfile of one ``prepare`` run or one loader epoch (how ``bench/results/profiles/*.txt`` were made).

  python bench/profiling.py prepare /tmp/bench_work/synth-200000c-33538g-1600nnz-s0.h5ad --sort cumtime
  python bench/profiling.py loader /tmp/bench_work/corpus-synth-100000c-33538g-1600nnz-s0 --workers 0
  python bench/profiling.py loader /tmp/bench_work/corpus-synth-20000c-33538g-1600nnz-s0 --encoding bin

``prepare`` also samples RSS every 5 ms and reports the peak and the phase it fell in (write / gene stats).
With ``--workers`` > 0 only the main process is profiled (where batches are received). Set ``PYTHONPATH`` to a
patched copy of scfm to profile a patch.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import threading
import time
from pathlib import Path

import tensordict  # noqa: F401  (imported up front, as in bench/prepare.py)
import torch  # noqa: F401
from synth import WORK, log

import scfm.data.prepare as corpus_module


def _rss_mb() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def profile_prepare(path: str, profiler: cProfile.Profile) -> None:
    out = WORK / "corpus-profile"
    shutil.rmtree(out, ignore_errors=True)
    peak = {"mb": 0.0, "phase": "start"}
    phase = ["start"]

    def sample() -> None:
        while True:
            rss = _rss_mb()
            if rss > peak["mb"]:
                peak.update(mb=rss, phase=phase[0])
            time.sleep(0.005)

    def tagged(name: str, fn):  # mark the phase the RSS sampler attributes its peak to
        def run(*args, **kwargs):
            phase[0] = name
            return fn(*args, **kwargs)
        return run

    corpus_module._write_source = tagged("write shards", corpus_module._write_source)
    corpus_module._write_gene_stats = tagged("gene stats", corpus_module._write_gene_stats)
    threading.Thread(target=sample, daemon=True).start()
    profiler.enable()
    corpus_module.prepare([path], out, corpus_module.PrepareOptions(progress=False), log=lambda _msg: None)
    profiler.disable()
    log(f"peak RSS {peak['mb']:.0f} MB during {peak['phase']}")
    shutil.rmtree(out, ignore_errors=True)


def _encoding(name: str, path: str):
    """The encodings at their papers' lengths, as ``bench/loader.py`` builds them (continuous: the first 19,264
    gene tokens of the vocabulary as the gene list)."""
    from scfm.data.corpus import Corpus
    from scfm.encodings.bin import BinEncoding
    from scfm.encodings.continuous import ContinuousEncoding
    from scfm.encodings.rank import RankEncoding

    if name == "rank":
        return RankEncoding(max_len=2048)
    if name == "bin":
        return BinEncoding(max_len=1200)
    genes = WORK / "gene_list_19264.txt"
    genes.parent.mkdir(parents=True, exist_ok=True)
    genes.write_text("\n".join(Corpus(path).vocab.gene_ids[:19_264]) + "\n")
    return ContinuousEncoding(gene_list=str(genes))


def profile_loader(path: str, workers: int, profiler: cProfile.Profile, encoding: str = "rank") -> None:
    from scfm.data.datamodule import CellDataModule

    dm = CellDataModule(_encoding(encoding, path), {"strategy": "random", "batch_size": 12}, corpus=path,
                        val_fraction=0.0, num_workers=workers, progress=False)
    dm.setup()
    cells = 0
    profiler.enable()
    for batch in dm.train_dataloader():
        cells += len(batch["lengths"])
    profiler.disable()
    log(f"{cells:,} cells")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["prepare", "loader"])
    ap.add_argument("path", help="prepare: an .h5ad file; loader: a prepared corpus")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--encoding", choices=["rank", "bin", "continuous"], default="rank", help="loader only")
    ap.add_argument("--sort", default="tottime")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    profiler = cProfile.Profile()
    t = time.perf_counter()
    if args.what == "prepare":
        profile_prepare(args.path, profiler)
    else:
        profile_loader(args.path, args.workers, profiler, args.encoding)
    log(f"{args.what}: {time.perf_counter() - t:.2f} s (under cProfile)")
    pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
