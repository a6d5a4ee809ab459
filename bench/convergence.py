"""Convergence evidence on the built-in PBMC 3k: each pretraining objective against its naive baseline.

One JSON line per run: ``{"case", "metric", "ours", "baseline", "ratio" (baseline / ours for errors, ours /
baseline for accuracies: higher is better), "steps", "seconds", "overrides"}``; the loss plot of each run is
copied to ``--plots``. Baselines are measured in the same run by the objectives themselves:

- ``mlm``: validation masked-gene accuracy vs always predicting the most frequent masked gene (``freq_baseline_acc``);
- ``generative`` / ``value_regression``: validation MSE on the hidden values vs predicting each gene's running
  mean value from the training batches (``mean_mse``).

    python bench/convergence.py [--cases mlm,generative_bins,generative_log1p,value_regression] [--plots DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES: dict[str, tuple[str, str, str, list[str]]] = {
    # case: (metric, baseline metric, kind, overrides)
    "mlm": ("val/masked_acc", "val/freq_baseline_acc", "accuracy", ["experiment=demo"]),
    "generative_bins": ("val/gep_mse", "val/mean_mse", "error", [
        "experiment=scgpt_human", "scale=tiny", "encoding.max_len=128", "batching.batch_size=32",
        "objective.lr=1e-3", "objective.warmup_steps=30", "trainer.max_steps=800", "trainer.max_epochs=100",
        "trainer.limit_val_batches=8", "trainer.log_every_n_steps=10"]),
    "generative_log1p": ("val/gep_mse", "val/mean_mse", "error", [
        "experiment=scgpt_human", "scale=tiny", "model.value_source=values", "encoding.max_len=128",
        "batching.batch_size=32", "objective.lr=1e-3", "objective.warmup_steps=30", "trainer.max_steps=800",
        "trainer.max_epochs=100", "trainer.limit_val_batches=8", "trainer.log_every_n_steps=10"]),
    "value_regression": ("val/masked_mse", "val/mean_mse", "error", [
        "experiment=scfoundation_100m", "scale=tiny", "batching.batch_size=16", "objective.lr=3e-3",
        "objective.warmup_steps=30", "trainer.max_steps=800", "trainer.max_epochs=100",
        "trainer.limit_val_batches=8", "trainer.log_every_n_steps=10"]),
}


def last_val(metrics_csv: Path, key: str) -> tuple[float, int]:
    """The last logged value of ``key`` and its step."""
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get(key)]
    if not rows:
        raise SystemExit(f"{metrics_csv}: no {key} logged")
    return float(rows[-1][key]), int(rows[-1]["step"])


def run(case: str, plots: Path) -> dict:
    metric, baseline_key, kind, overrides = CASES[case]
    out = Path(tempfile.mkdtemp(prefix=f"conv_{case}_"))
    cmd = ["scfm-train", *overrides, f"paths.output_dir={out}", "trainer.enable_progress_bar=false",
           "trainer.enable_model_summary=false"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
    ours, step = last_val(out / "metrics.csv", metric)
    base, _ = last_val(out / "metrics.csv", baseline_key)
    plots.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "loss.png", plots / f"{case}.png")
    ratio = ours / base if kind == "accuracy" else base / ours
    return {"case": case, "metric": metric, "ours": ours, "baseline_metric": baseline_key, "baseline": base,
            "ratio": ratio, "steps": step + 1, "seconds": round(seconds, 1), "overrides": overrides}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--plots", default=str(Path(__file__).parent / "results" / "convergence"))
    args = parser.parse_args()
    for case in args.cases.split(","):
        print(json.dumps(run(case, Path(args.plots))), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
