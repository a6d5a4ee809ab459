"""Training throughput and MFU of the paper presets on one GPU, attention kernels against a baseline in the same run.

Each case is one preset (``experiment=<name>``, PBMC 3k, the preset's encoding, batching, model and objective) with
one attention kernel, trained by Lightning's own loop (loader workers, objective, backward, optimiser step, gradient
clipping) for ``--warmup`` + ``--steps`` steps in ``--precision``. A callback times every step after the warm-up
(CUDA synchronised) and counts its real tokens (``lengths``).

- ``tokens_per_s``: real (unpadded) tokens per second over the timed steps; ``step_ms``: median step time.
- ``flops_per_token``: model FLOPs of a training step (forward + backward: matmuls and attention, dense, by
  ``torch.utils.flop_counter.FlopCounterMode``) per real token, counted over ``--flop-batches`` batches of the same
  stream after the fit, once per preset with its first kernel other than flex (a compiled kernel hides its ops
  from the counter; the maths is the same). ``tflops`` = flops_per_token x tokens_per_s; ``mfu`` = tflops / the
  card's dense bf16 peak (table below; other cards and the CPU: none). Padding's FLOPs count as waste.
- ``ratio``: tokens_per_s / the ``--baseline`` kernel's (default ``eager``) for the same preset, same run.
- ``peak_gb``: peak CUDA memory allocated during the fit.

    python bench/gpu_step.py --quick          # CPU, scale=tiny, 2 presets: checks the script in ~1 minute
    python bench/gpu_step.py                  # GPU: geneformer_v2_104m, scgpt_human, scfoundation_100m; sdpa, flex
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import lightning as L
import torch

PRESETS = ("geneformer_v2_104m", "scgpt_human", "scfoundation_100m")
# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; matched as substrings of the device name
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
             "A100": 312e12}


def log(msg: str) -> None:
    print(f"[gpu_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class StepTimer(L.Callback):
    """Lightning callback: wall time and real tokens of each training step after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.tokens, self._t = warmup, [], [], 0.0

    def _sync(self, module: Any) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self._sync(module)
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._sync(module)
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t)
            self.tokens.append(int(batch["lengths"].sum()))


def compose_case(preset: str, kernel: str, args: argparse.Namespace) -> Any:
    from hydra import compose, initialize_config_dir

    from scfm.cli import conf_dir
    from scfm.config.scale import apply_scale

    overrides = [f"experiment={preset}", f"attention={kernel}", f"precision={args.precision}",
                 f"trainer.accelerator={args.accelerator}", "trainer.devices=1", "strategy=single",
                 f"trainer.max_steps={args.warmup + args.steps}", "trainer.max_epochs=1000",
                 "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", "paths.output_dir=/tmp/scfm_gpu_step", *args.override]
    if args.quick:
        overrides.append("scale=tiny")
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return apply_scale(compose("train", overrides=overrides))


def flops_per_token(module: Any, datamodule: Any, batches: int, precision: str) -> float:
    """Training FLOPs per real token over ``batches`` batches (forward + backward, the objective's own step)."""
    from torch.utils.flop_counter import FlopCounterMode

    device, total_flops, total_tokens = module.device, 0, 0
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
    loader = datamodule.train_dataloader()
    for i, batch in enumerate(loader):
        if i == batches:
            break
        batch = datamodule.transfer_batch_to_device(batch, device, 0)
        with FlopCounterMode(display=False) as counter, torch.autocast(device.type, dtype=dtype,
                                                                       enabled=dtype is not None):
            module.step(batch, i, "train").backward()
        module.zero_grad(set_to_none=True)
        total_flops += counter.get_total_flops()
        total_tokens += int(batch["lengths"].sum())
    return total_flops / max(total_tokens, 1)


def run_case(preset: str, kernel: str, args: argparse.Namespace, fpt: float | None = None) -> dict[str, Any]:
    import warnings

    from hydra.utils import instantiate

    from scfm.cli.train import build, build_strategy

    cfg = compose_case(preset, kernel, args)
    datamodule, module = build(cfg)  # validates first
    timer = StepTimer(args.warmup)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[timer], enable_checkpointing=False,
                          strategy=build_strategy(cfg))
    if torch.cuda.is_available() and args.accelerator != "cpu":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=datamodule)
    fit_s = time.perf_counter() - t
    device = module.device
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if fpt is None or kernel != "flex":
        module.train()
        module._trainer = None  # the objective's self.log calls then return (Lightning: a step without a trainer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fpt = flops_per_token(module, datamodule, args.flop_batches, str(cfg.trainer.precision))
    tokens_per_s = sum(timer.tokens) / sum(timer.times) if timer.times else float("nan")
    peak = peak_flops(device)
    tflops = fpt * tokens_per_s / 1e12
    return {"preset": preset, "attention": kernel, "precision": str(cfg.trainer.precision), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "model_config": str(cfg.model.get("_target_", "")).rsplit(".", 1)[-1], "layers": cfg.model.get("layers"),
            "hidden": cfg.model.get("hidden"), "batch_size": cfg.batching.get("batch_size"),
            "max_len": cfg.encoding.get("max_len"), "timed_steps": len(timer.times),
            "tokens_per_s": round(tokens_per_s, 1), "step_ms": round(1e3 * statistics.median(timer.times), 2),
            "flops_per_token": round(fpt), "tflops": round(tflops, 3),
            "mfu": round(tflops * 1e12 / peak, 4) if peak else None,
            "peak_gb": round(peak_gb, 2) if peak_gb is not None else None, "fit_s": round(fit_s, 1),
            "torch": torch.__version__, "quick": args.quick}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated experiment presets")
    ap.add_argument("--attention", default="sdpa,flex", help="kernels to measure (comma-separated)")
    ap.add_argument("--baseline", default="eager", help="kernel every ratio is taken against ('' = none)")
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--flop-batches", type=int, default=4, help="batches whose FLOPs are counted")
    ap.add_argument("--quick", action="store_true", help="CPU, scale=tiny, 2 presets, 2 + 4 steps")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    args = ap.parse_args()
    args.accelerator = "cpu" if args.quick or not torch.cuda.is_available() else "gpu"
    if args.quick:
        args.presets = args.presets if "--presets" in sys.argv else "geneformer_v2_104m,scfoundation_100m"
        args.warmup, args.steps, args.flop_batches = 2, 4, 1
    kernels = [k for k in args.attention.split(",") if k]
    for preset in [p for p in args.presets.split(",") if p]:
        base = run_case(preset, args.baseline, args) if args.baseline else None
        fpt = base["flops_per_token"] if base else None
        if base is not None:
            log(f"{preset} {args.baseline}: {base['tokens_per_s']:,.0f} tokens/s")
            print(json.dumps({**base, "ratio": 1.0, "baseline": args.baseline}), flush=True)
        for kernel in kernels:
            r = run_case(preset, kernel, args, fpt)
            fpt = r["flops_per_token"]
            r["baseline"] = args.baseline or None
            r["ratio"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3) if base else None
            log(f"{preset} {kernel}: {r['tokens_per_s']:,.0f} tokens/s, mfu {r['mfu']}, ratio {r['ratio']}")
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
