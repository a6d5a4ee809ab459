"""Training-step benchmarks: scfm's BERT vs Hugging Face, packed vs padded batches, attention kernels.

Every case prints one JSON line ``{"case", "ours", "baseline", "ratio", ...}`` on stdout (progress on stderr);
``ratio`` = ours / baseline with higher-is-better units, the baseline measured in the same run, the two
interleaved (the order alternates each repeat), and the median of ``--repeats`` taken.

- ``bert_vs_hf`` / ``bert_vs_hf_full_logits``: forward + backward (no optimiser step), real tokens/s.
  Model ``geneformer_v1_6l`` (BertConfig defaults: 6L, 256 hidden, 4 heads, FFN 512, ReLU, dropout 0.02, vocab
  25,426), attention ``sdpa``, train mode, vs ``transformers.BertForMaskedLM`` of the same config with
  ``attn_implementation="sdpa"`` and the *same weights* (HF's weights converted by ``scfm.convert.geneformer``).
  Batches: ``--batch`` (12) cells whose lengths are consecutive cells of PBMC 3k's epoch-0 stream order (rank
  encoding, truncated at 2048), random gene ids, padded to the longest; one batch per repeat, the same batch
  for both models. Loss: MLM cross-entropy over 15% of the real tokens. Ours projects only the masked tokens
  onto the vocabulary (as ``scfm.objectives.mlm``); HF computes logits for every token (``labels`` with -100):
  that is ``bert_vs_hf``. ``bert_vs_hf_full_logits`` has ours compute full logits too (same HF timings).
- ``packed_vs_padded``: end to end (``CellStream`` iteration: read + rank-encode + collate; masking; forward;
  backward), real tokens/s, PBMC 3k rank encoding max_len 2048, model ``bert_tiny`` (2L, 128 hidden, sdpa).
  Packed batching (token budget 12 x 2048) vs random padded batching (batch 12). Each repeat is one full pass
  over a fixed random ``--subset`` of the cells (the ``val`` split of ``val_fraction=subset``, epoch = repeat
  index), so every length is represented (packed batches come longest-first); batches of the two alternate.
- ``kernel_<eager|sdpa|flex>_<512|2048>``: one attention call, forward + backward (``(out * g).sum()``), on
  q, k, v [12, 4, L, 64] (Geneformer V1 heads) with a padding mask: the lengths of a PBMC random batch scaled
  so that its longest cell is L (the batch of 12 consecutive cells whose padding efficiency is closest to the
  epoch mean, 0.6; scaling keeps it). Baseline: ``eager``; ``ours`` and
  ``baseline`` are calls/s. Peak memory: each length runs in a subprocess with ``MALLOC_MMAP_THRESHOLD_`` fixed
  (freed buffers go back to the OS); before one untimed call per kernel the peak RSS is reset
  (``echo 5 > /proc/self/clear_refs``) and ``peak_mb`` = VmHWM after the call - VmRSS before it.
  On the CPU ``flex`` has no backward: it runs SDPA on the dense mask of its ``mask_mod`` (``note`` says so).
- ``xtrimo_flops``: encoder FLOPs of xtrimo vs a dense encoder (``bench/xtrimo_flops.py``).

Environment: ``export SCFM_CACHE=/tmp/bench_cache`` (PBMC 3k is prepared there once).
Quick: python bench/train_step.py --quick
Full:  python bench/train_step.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scfm.model.attention import Layout, get_kernel
from scfm.model.bert import BertConfig, BertForMaskedGeneModeling

CASES = ("bert_vs_hf", "packed_vs_padded", "kernel", "xtrimo_flops")
KERNELS = ("eager", "sdpa", "flex")
KERNEL_LENGTHS = (512, 2048)
GENEFORMER_V1_VOCAB = 25_426
MASK_PROB = 0.15


def log(msg: str) -> None:
    print(f"[train_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    return {"device": "cpu", "torch_threads": torch.get_num_threads(), "nproc": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__}


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def pbmc_corpus():
    from scfm.data.builtin import builtin_corpus

    return builtin_corpus("pbmc3k", progress=False)


def pbmc_lengths(max_len: int = 2048) -> np.ndarray:
    """Rank-encoded lengths of PBMC 3k's cells in the epoch-0 stream order (train split, val_fraction 0)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from padding import epoch_lengths

    from scfm.encodings.rank import RankEncoding

    corpus = pbmc_corpus()
    return epoch_lengths(corpus, RankEncoding(max_len=max_len).bind(corpus), epoch=0, seed=0)


def row(case: str, ours: float, baseline: float, **extra: Any) -> dict[str, Any]:
    return {"case": case, "ours": round(ours, 4), "baseline": round(baseline, 4),
            "ratio": round(ours / baseline, 3) if baseline else None, **extra, **machine()}


# ---------------------------------------------------------------- bert_vs_hf


def padded_batch(lengths: np.ndarray, vocab: int, gen: torch.Generator, first_gene: int = 2) -> dict[str, Any]:
    B, L = len(lengths), int(lengths.max())
    mask = torch.arange(L)[None] < torch.from_numpy(lengths)[:, None]  # [B, L]
    ids = torch.randint(first_gene, vocab, (B, L), generator=gen).masked_fill(~mask, 0)
    positions = torch.where(mask, torch.arange(L)[None], 0)
    picked = (torch.rand(B, L, generator=gen) < MASK_PROB) & mask
    inputs = torch.where(picked, torch.ones_like(ids), ids)  # <mask> = 1 (Geneformer ids)
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    return {"gene_ids": inputs, "positions": positions, "padding_mask": mask, "picked": picked, "labels": labels,
            "real": int(lengths.sum()), "padded": B * L}


def geneformer_pair(seed: int = 0) -> tuple[BertForMaskedGeneModeling, Any]:
    """Our geneformer_v1_6l (sdpa) and HF's BertForMaskedLM (sdpa) with identical weights, train mode."""
    import transformers

    from scfm.convert.geneformer import convert_geneformer

    c = BertConfig(vocab_size=GENEFORMER_V1_VOCAB)
    hf_cfg = transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        intermediate_size=c.ffn, hidden_act=c.activation, hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.attention_dropout, max_position_embeddings=c.max_position,
        layer_norm_eps=c.layer_norm_eps, pad_token_id=c.pad_id)
    torch.manual_seed(seed)
    hf = transformers.BertForMaskedLM._from_config(hf_cfg, attn_implementation="sdpa")
    config, state = convert_geneformer(hf.state_dict(), hf_cfg.to_dict(), attention="sdpa")
    ours = BertForMaskedGeneModeling(config)
    ours.load_state_dict(state)
    return ours.train(), hf.train()


def step_ours(model: BertForMaskedGeneModeling, b: dict[str, Any], full_logits: bool) -> float:
    hidden = model.encode(b)  # [B, L, H]
    if full_logits:
        logits = model.mlm_head(hidden)  # [B, L, V]
        loss = F.cross_entropy(logits[b["picked"]], b["labels"][b["picked"]])
    else:
        loss = F.cross_entropy(model.mlm_head(hidden[b["picked"]]), b["labels"][b["picked"]])  # [n_masked, V]
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


def step_hf(model: Any, b: dict[str, Any]) -> float:
    loss = model(input_ids=b["gene_ids"], attention_mask=b["padding_mask"].long(), labels=b["labels"]).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


def case_bert_vs_hf(args: argparse.Namespace) -> list[dict[str, Any]]:
    import transformers

    lengths = pbmc_lengths(2048)
    ours, hf = geneformer_pair()
    gen = torch.Generator().manual_seed(0)
    warm = padded_batch(np.array([64, 40]), GENEFORMER_V1_VOCAB, gen)
    step_ours(ours, warm, False), step_ours(ours, warm, True), step_hf(hf, warm)
    runs: dict[str, list[float]] = {"ours": [], "ours_full": [], "hf": []}
    losses: dict[str, list[float]] = {k: [] for k in runs}
    batches = []
    fns = {"ours": lambda b: step_ours(ours, b, False), "ours_full": lambda b: step_ours(ours, b, True),
           "hf": lambda b: step_hf(hf, b)}
    for r in range(args.repeats):
        lens = lengths[r * args.batch:(r + 1) * args.batch]
        b = padded_batch(lens, GENEFORMER_V1_VOCAB, gen)
        batches.append({"real": b["real"], "padded": b["padded"], "max": int(lens.max())})
        order = list(runs)[r % 3:] + list(runs)[:r % 3]
        for name in order:
            t = time.perf_counter()
            losses[name].append(fns[name](b))
            runs[name].append(b["real"] / (time.perf_counter() - t))
            log(f"bert_vs_hf repeat {r} {name}: {runs[name][-1]:.0f} tokens/s")
    med = {k: statistics.median(v) for k, v in runs.items()}
    common = {"unit": "real tokens/s, forward+backward", "model": "geneformer_v1_6l", "vocab_size": GENEFORMER_V1_VOCAB,
              "batch": args.batch, "batches": batches, "repeats": args.repeats, "ours_attention": "sdpa",
              "baseline_impl": f"transformers {transformers.__version__} BertForMaskedLM, attn sdpa",
              "loss_first_repeat": {k: round(v[0], 4) for k, v in losses.items()},
              "per_repeat": {k: [round(x, 1) for x in v] for k, v in runs.items()}}
    return [row("bert_vs_hf", med["ours"], med["hf"], logits="ours: masked tokens only; HF: all tokens", **common),
            row("bert_vs_hf_full_logits", med["ours_full"], med["hf"], logits="both: all tokens", **common)]


# ---------------------------------------------------------------- packed_vs_padded


def case_packed_vs_padded(args: argparse.Namespace) -> list[dict[str, Any]]:
    from scfm.data.batching import Batching
    from scfm.data.stream import CellStream
    from scfm.encodings.rank import RankEncoding
    from scfm.objectives.mlm import IGNORE, mask_genes

    corpus = pbmc_corpus()
    encoding = RankEncoding(max_len=2048).bind(corpus)
    vocab = corpus.vocab
    mask_id, first_gene = vocab.special_id("<mask>"), vocab.n_special
    torch.manual_seed(0)
    model = BertForMaskedGeneModeling(BertConfig(vocab_size=len(vocab), hidden=128, layers=2, heads=4, ffn=256,
                                                 attention="sdpa")).train()
    streams = {s: CellStream(corpus, encoding, Batching(strategy=s, batch_size=12), split="val",
                             val_fraction=args.subset, seed=0) for s in ("packed", "random")}
    gen = torch.Generator().manual_seed(0)

    def train_step(batch: Any) -> int:
        gene_ids = batch["gene_ids"]
        maskable = gene_ids >= first_gene
        padding_mask = batch.get("padding_mask", None)
        if padding_mask is not None:
            maskable &= padding_mask
        inputs, labels = mask_genes(gene_ids, maskable, gen, mask_id, first_gene, len(vocab))
        hidden = model.encode({**dict(batch.items()), "gene_ids": inputs})
        picked = labels != IGNORE
        F.cross_entropy(model.mlm_head(hidden[picked]), labels[picked]).backward()
        model.zero_grad(set_to_none=True)
        return int(batch["lengths"].sum())

    for s in streams.values():  # warm-up: lengths cached, first batch of each layout through the model
        s.set_epoch(99)
        train_step(next(iter(s)))
    per_repeat: dict[str, list[float]] = {"packed": [], "random": []}
    detail: list[dict[str, Any]] = []
    for r in range(args.repeats):
        its, tokens, secs, n = {}, dict.fromkeys(streams, 0), dict.fromkeys(streams, 0.0), dict.fromkeys(streams, 0)
        for name, s in streams.items():
            s.set_epoch(r)
            its[name] = iter(s)
        live = list(streams) if r % 2 == 0 else list(streams)[::-1]
        while live:
            for name in list(live):
                t = time.perf_counter()
                batch = next(its[name], None)
                if batch is None:
                    live.remove(name)
                    continue
                tokens[name] += train_step(batch)
                secs[name] += time.perf_counter() - t
                n[name] += 1
        for name in streams:
            per_repeat[name].append(tokens[name] / secs[name])
        detail.append({"real_tokens": tokens["packed"], "batches": n, "seconds": {k: round(v, 1) for k, v in
                                                                                   secs.items()}})
        log(f"packed_vs_padded repeat {r}: packed {per_repeat['packed'][-1]:.0f}, "
            f"random {per_repeat['random'][-1]:.0f} tokens/s")
    med = {k: statistics.median(v) for k, v in per_repeat.items()}
    return [row("packed_vs_padded", med["packed"], med["random"], target=2.0, meets_target=med["packed"]
                >= 2.0 * med["random"], unit="real tokens/s, loader+mask+forward+backward", model="bert_tiny (sdpa)",
                data=f"PBMC 3k, rank max_len 2048, fixed random {args.subset:.0%} of cells per pass",
                packed="token budget 24,576, first-fit decreasing", baseline_batching="random, batch 12",
                repeats=args.repeats, per_repeat={k: [round(x, 1) for x in v] for k, v in per_repeat.items()},
                detail=detail)]


# ---------------------------------------------------------------- kernels


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def peak_rss_mb(fn: Callable[[], Any]) -> tuple[float, str]:
    """Peak RSS increase of ``fn()`` in MB (reset with clear_refs), or the ru_maxrss fallback."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - base) / 1024, "VmHWM after - VmRSS before (clear_refs 5)"
    except OSError:
        import resource

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, "ru_maxrss increase"


def kernel_inputs(L: int, lengths: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor, np.ndarray]:
    scaled = np.maximum((lengths * (L / lengths.max())).round().astype(np.int64), 1)
    g = torch.Generator().manual_seed(L)
    qkv = [torch.randn(len(scaled), 4, L, 64, generator=g).requires_grad_() for _ in range(3)]
    mask = torch.arange(L)[None] < torch.from_numpy(scaled)[:, None]  # [B, L]
    return qkv, mask, scaled


def kernel_worker(L: int, repeats: int, lengths: np.ndarray) -> list[dict[str, Any]]:
    """One length, all kernels: peak memory of one call each, then interleaved timed repeats."""
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    qkv, mask, scaled = kernel_inputs(L, lengths)
    grad = torch.randn_like(qkv[0])

    def call(name: str) -> None:
        out = get_kernel(name)(*qkv, Layout(padding_mask=mask))  # a fresh layout: mask building is counted
        (out * grad).sum().backward()
        for t in qkv:
            t.grad = None

    small_q, small_mask, _ = kernel_inputs(64, lengths)
    for name in KERNELS:  # warm-up on a small input (lazy init, kernel selection)
        out = get_kernel(name)(*small_q, Layout(padding_mask=small_mask))
        out.sum().backward()
    peaks = {}
    for name in KERNELS:
        peaks[name], method = peak_rss_mb(lambda name=name: call(name))
    times: dict[str, list[float]] = {k: [] for k in KERNELS}
    for r in range(repeats):
        for name in KERNELS[r % 3:] + KERNELS[:r % 3]:
            times[name].append(timed(lambda name=name: call(name)))
    rows = []
    for name in KERNELS:
        ours, base = 1 / statistics.median(times[name]), 1 / statistics.median(times["eager"])
        rows.append(row(f"kernel_{name}_{L}", ours, base, unit="calls/s (attention forward+backward)",
                        seconds_median=round(statistics.median(times[name]), 4),
                        baseline_seconds_median=round(statistics.median(times["eager"]), 4),
                        peak_mb=round(peaks[name], 1), baseline_peak_mb=round(peaks["eager"], 1),
                        peak_method=method, shape=[len(scaled), 4, L, 64], lengths=scaled.tolist(),
                        padding_efficiency=round(float(scaled.sum() / (len(scaled) * L)), 4), repeats=repeats,
                        note="CPU: flex has no backward; computed with SDPA on the dense mask of its mask_mod"
                        if name == "flex" else ""))
    return rows


def typical_batch(lengths: np.ndarray, batch: int) -> np.ndarray:
    """The batch (consecutive cells in stream order) whose padding efficiency is closest to the epoch's mean."""
    groups = [lengths[i:i + batch] for i in range(0, len(lengths) - batch + 1, batch)]
    eff = np.array([g.sum() / (batch * g.max()) for g in groups])
    return groups[int(np.argmin(np.abs(eff - eff.mean())))]


def case_kernel(args: argparse.Namespace) -> list[dict[str, Any]]:
    lengths = typical_batch(pbmc_lengths(2048), 12)
    rows = []
    for L in KERNEL_LENGTHS:
        log(f"kernels at L={L} (subprocess)")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        cmd = [sys.executable, __file__, "--kernel-worker", str(L), "--repeats", str(args.repeats),
               "--lengths", ",".join(map(str, lengths.tolist()))]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        rows += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return rows


# ---------------------------------------------------------------- xtrimo_flops


def case_xtrimo_flops(args: argparse.Namespace) -> list[dict[str, Any]]:
    """scFoundation-100M encoder FLOPs on PBMC-like cells vs a dense encoder over all 19,266 tokens
    (``bench/xtrimo_flops.py``; ratio = dense / ours, target >= 10)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from xtrimo_flops import xtrimo_flops_case

    return [xtrimo_flops_case()]


# ---------------------------------------------------------------- main

RUNNERS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {
    "bert_vs_hf": case_bert_vs_hf,
    "packed_vs_padded": case_packed_vs_padded,
    "kernel": case_kernel,
    "xtrimo_flops": case_xtrimo_flops,
}


def _return_freed_memory() -> None:
    """Re-run this script with glibc returning large freed buffers to the OS: full-vocabulary logits (~1-2.5 GB
    each) of two models otherwise fragment the heap until the kernel's OOM killer stops the run (seen on 23 GB)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    _return_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--quick", action="store_true", help="1 repeat, batch 4 for bert_vs_hf, 10%% subset")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per case (default 3; quick 1)")
    ap.add_argument("--batch", type=int, default=None, help="bert_vs_hf cells per batch (default 12; quick 4)")
    ap.add_argument("--subset", type=float, default=None, help="packed_vs_padded: fraction of PBMC cells per pass "
                    "(default 0.2; quick 0.1)")
    ap.add_argument("--kernel-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--lengths", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.batch = args.batch or (4 if args.quick else 12)
    args.subset = args.subset or (0.1 if args.quick else 0.2)
    if args.kernel_worker is not None:
        lengths = np.array([int(x) for x in args.lengths.split(",")])
        for r in kernel_worker(args.kernel_worker, args.repeats, lengths):
            print(json.dumps(r), flush=True)
        return
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in RUNNERS]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(RUNNERS)}")
    for case in wanted:
        t = time.perf_counter()
        for r in RUNNERS[case](args):
            r.setdefault("case_seconds", round(time.perf_counter() - t, 1))
            print(json.dumps(r), flush=True)
        log(f"{case} done in {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
