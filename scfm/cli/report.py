"""``scfm-report``: gather a sweep's runs into one table (markdown + CSV) and a plot of a metric per configuration.

Every option is a ``key=value`` override, as in the other scfm commands::

    scfm-report dir=multirun/2025-01-31/12-00-00                     # a Hydra multirun folder (scfm-train -m ...)
    scfm-report dir=outputs/wandb metric=val/masked_acc mode=max     # offline wandb runs (wandb/offline-run-*)
    scfm-report multirun/2025-01-31/12-00-00 out=reports/ablation    # the folder may come first, without dir=

Runs found under ``dir``:

- Hydra jobs: each folder with ``.hydra/overrides.yaml`` (the job's command-line overrides); the metric comes from
  the job's CSV log (``<job>/metrics.csv``, scfm-train's CSVLogger; ``metrics.<n>.csv`` of interrupted-then-resumed
  runs are read too), else from a wandb run inside the job folder.
- wandb runs: each ``wandb/offline-run-*/files/wandb-summary.json`` (or ``run-*``), with the overrides from its
  ``wandb-metadata.json`` ``args`` (the command line), else the values of its ``config.yaml`` that differ between runs.

One row per run: the overrides that vary between runs (those shared by all are listed once above the table), the
final and best value of ``metric`` (best = min or max as ``mode`` says) and the step of the best. Rows are sorted
best first. Writes ``<out>.md``, ``<out>.csv`` and ``<out>.png`` (``out`` defaults to ``<dir>/report``).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scfm.errors import ScfmInputError

__all__ = ["ReportConfig", "Run", "cli", "collect_runs", "main", "report", "summarise"]


@dataclass
class ReportConfig:
    """Options of ``scfm-report`` (``key=value`` on the command line)."""

    dir: str = MISSING  # a Hydra multirun folder, or a folder holding wandb/offline-run-* runs
    metric: str = "val/loss"
    mode: str = "min"  # min | max: which value is best
    out: str | None = None  # path prefix of the .md / .csv / .png; default <dir>/report
    title: str | None = None


@dataclass
class Run:
    """One finished (or failed) run: where it is, its overrides, and the metric's history (step -> value)."""

    name: str
    source: str  # hydra | wandb
    overrides: dict[str, str]
    history: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))
    summary: float | None = None  # a wandb summary's value, when there is no history
    metrics: list[str] = field(default_factory=list)  # every metric the run logged (for error messages)


# -- reading runs ----------------------------------------------------------------------------------------------


def _parse_overrides(items: list[Any]) -> dict[str, str]:
    """``key=value`` command-line items as a dict (``+``/``++`` prefixes dropped; other items ignored)."""
    out: dict[str, str] = {}
    for item in items:
        text = str(item)
        if text.startswith("-") or "=" not in text:
            continue
        key, value = text.split("=", 1)
        out[key.lstrip("+~")] = value
    return out


def _csv_history(job: Path, metric: str) -> tuple[pd.Series, list[str]]:
    """The metric per step from a job's CSV logs (resumed runs: older ``metrics.<n>.csv`` first)."""
    files = sorted(job.glob("metrics.*.csv"), key=lambda p: int(p.suffixes[0][1:]) if p.suffixes[0][1:].isdigit()
                   else 0)
    if (job / "metrics.csv").is_file():
        files.append(job / "metrics.csv")
    if not files:
        files = sorted(job.rglob("metrics.csv"))[-1:]  # e.g. a logger save_dir below the job folder
    frames = [pd.read_csv(f) for f in files]
    if not frames:
        return pd.Series(dtype=float), []
    df = pd.concat(frames, ignore_index=True)
    names = [c for c in df.columns if c not in ("epoch", "step")]
    if metric not in df.columns:
        return pd.Series(dtype=float), names
    rows = df.dropna(subset=[metric])
    steps = rows["step"] if "step" in rows else pd.Series(range(len(rows)))
    history = pd.Series(rows[metric].to_numpy(dtype=float), index=steps.to_numpy())
    return history[~history.index.duplicated(keep="last")], names


def _wandb_runs(root: Path) -> list[Path]:
    """``files`` folders of the wandb runs under ``root`` (offline or synced)."""
    return sorted(p.parent for p in root.rglob("wandb-summary.json")
                  if p.parent.name == "files" and p.parent.parent.name.startswith(("offline-run-", "run-")))


def _wandb_config(files: Path) -> dict[str, Any]:
    """A wandb run's config.yaml flattened to dotted keys (``{key: {value: ...}}`` entries; ``_wandb`` dropped)."""
    path = files / "config.yaml"
    if not path.is_file():
        return {}
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            flat[prefix] = node

    for key, entry in raw.items():
        if str(key).startswith("_wandb"):
            continue
        walk(entry.get("value") if isinstance(entry, dict) and "value" in entry else entry, str(key))
    return flat


def _wandb_run(files: Path, root: Path, metric: str) -> Run:
    summary = json.loads((files / "wandb-summary.json").read_text() or "{}")
    value = summary.get(metric)
    if isinstance(value, dict):  # define_metric summaries: {"min": ..} / {"max": ..} / {"last": ..}
        value = value.get("last", value.get("min", value.get("max")))
    meta_path = files / "wandb-metadata.json"
    args = json.loads(meta_path.read_text()).get("args", []) if meta_path.is_file() else []
    overrides = _parse_overrides(args)
    if not overrides:
        overrides = {k: str(v) for k, v in _wandb_config(files).items()}
    return Run(name=str(files.parent.relative_to(root)), source="wandb", overrides=overrides,
               summary=float(value) if isinstance(value, int | float) else None,
               metrics=sorted(k for k in summary if not k.startswith("_")))


def collect_runs(root: str | Path, metric: str) -> list[Run]:
    """Every Hydra job and wandb run under ``root`` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise ScfmInputError("not a folder", where=str(root),
                             fix="give dir=<a Hydra multirun folder (multirun/<date>/<time>) or a folder with "
                                 "wandb/offline-run-* runs>")
    runs: list[Run] = []
    jobs = sorted({p.parent.parent for p in root.rglob("overrides.yaml")
                   if p.parent.name == ".hydra" and p.parent.parent.is_relative_to(root)})
    claimed: set[Path] = set()
    for job in jobs:
        overrides = _parse_overrides(OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "overrides.yaml")) or [])
        history, names = _csv_history(job, metric)
        run = Run(name=str(job.relative_to(root)) or ".", source="hydra", overrides=overrides, history=history,
                  metrics=names)
        inner = _wandb_runs(job)
        if history.empty and inner:  # logger=wandb: the job's metrics are in its wandb run
            w = _wandb_run(inner[-1], root, metric)
            run.summary, run.metrics = w.summary, w.metrics
        claimed.update(inner)
        runs.append(run)
    for files in _wandb_runs(root):
        if files not in claimed:
            runs.append(_wandb_run(files, root, metric))
    if not runs:
        raise ScfmInputError("no runs found: no .hydra/overrides.yaml and no wandb/*run-*/files/wandb-summary.json",
                             where=str(root), fix="point dir= at the folder `scfm-train -m` printed (hydra.sweep.dir) "
                                                  "or at the folder that holds wandb/")
    return runs


# -- the table -------------------------------------------------------------------------------------------------


def summarise(runs: list[Run], metric: str, mode: str = "min") -> tuple[pd.DataFrame, dict[str, str]]:
    """(table, fixed overrides): one row per run with the varying overrides, final / best metric and best step."""
    if mode not in ("min", "max"):
        raise ScfmInputError(f"mode={mode!r}", where="scfm-report mode", fix="use mode=min or mode=max")
    keys = sorted({k for r in runs for k in r.overrides})
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    fixed = {k: runs[0].overrides[k] for k in keys if k not in varying}
    rows = []
    for r in runs:
        row: dict[str, Any] = {k: r.overrides.get(k, "") for k in varying}
        if not r.history.empty:
            best_step = r.history.idxmin() if mode == "min" else r.history.idxmax()
            row.update(final=float(r.history.iloc[-1]), best=float(r.history.loc[best_step]),
                       best_step=int(best_step), points=len(r.history))
        else:
            value = r.summary if r.summary is not None else math.nan
            row.update(final=value, best=value, best_step=None, points=0 if r.summary is None else 1)
        row.update(run=r.name, source=r.source)
        rows.append(row)
    df = pd.DataFrame(rows)
    if df["best"].isna().all():
        logged = sorted({m for r in runs for m in r.metrics})
        raise ScfmInputError(f"no run logged the metric {metric!r}", where="scfm-report metric",
                             fix=f"use one of: {', '.join(logged) or '(no metrics found: did the runs finish?)'}")
    df = df.sort_values("best", ascending=mode == "min", na_position="last", kind="stable").reset_index(drop=True)
    return df, fixed


def _label(row: pd.Series, varying: list[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in varying) or str(row["run"])


def _markdown(df: pd.DataFrame, varying: list[str], fixed: dict[str, str], cfg: ReportConfig, n_dirs: str) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.4g}"
        return "–" if v is None else str(v).replace("|", "\\|")

    cols = [*varying, "final", "best", "best_step", "run"]
    heads = [*varying, f"final {cfg.metric}", f"best {cfg.metric} ({cfg.mode})", "best step", "run"]
    lines = [f"# {cfg.title or 'Sweep report: ' + cfg.metric}", "",
             f"{len(df)} runs from `{n_dirs}`; best first ({cfg.mode} of `{cfg.metric}`).", ""]
    if fixed:
        lines += ["Shared by every run: " + ", ".join(f"`{k}={v}`" for k, v in fixed.items()), ""]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(fmt(row[c]) for c in cols) + " |")
    missing = df[df["best"].isna()]
    if len(missing):
        lines += ["", f"{len(missing)} run(s) without `{cfg.metric}` (failed or not finished): "
                  + ", ".join(missing["run"].astype(str))]
    return "\n".join(lines) + "\n"


def _plot(df: pd.DataFrame, runs: list[Run], varying: list[str], cfg: ReportConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["best"].notna()]
    labels = [_label(row, varying) for _, row in ok.iterrows()]
    by_name = {r.name: r for r in runs}
    curves = [(label, by_name[name].history) for label, name in zip(labels, ok["run"])
              if len(by_name[name].history) > 1]
    ncols = 2 if curves else 1
    height = max(2.5, 0.35 * len(ok) + 1.2)
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, height), dpi=120, squeeze=False)
    ax = axes[0, 0]
    y = list(range(len(ok)))[::-1]
    ax.barh(y, ok["best"], color="C0", alpha=0.85, label=f"best ({cfg.mode})")
    ax.plot(ok["final"], y, "o", color="C3", ms=4, label="final")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel(cfg.metric)
    finite = pd.concat([ok["best"], ok["final"]]).dropna()
    if len(finite):
        lo, hi = float(finite.min()), float(finite.max())
        pad = (hi - lo) * 0.15 or abs(hi) * 0.05 or 1.0
        ax.set_xlim(max(lo - pad, 0) if lo >= 0 else lo - pad, hi + pad)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="best")
    ax.set_title(f"{cfg.metric} per configuration", fontsize=10)
    if curves:
        ax2 = axes[0, 1]
        for i, (label, history) in enumerate(curves):
            ax2.plot(history.index, history.to_numpy(), "o-" if len(history) < 20 else "-", ms=3, lw=1.2,
                     color=f"C{i % 10}", label=label)
        ax2.set_xlabel("step")
        ax2.set_ylabel(cfg.metric)
        ax2.grid(alpha=0.3)
        ax2.legend(frameon=False, fontsize=7)
        ax2.set_title(f"{cfg.metric} during training", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def report(cfg: ReportConfig) -> dict[str, Any]:
    """Gather, tabulate and plot; returns the table and the paths written (``markdown``, ``csv``, ``png``)."""
    root = Path(cfg.dir)
    runs = collect_runs(root, cfg.metric)
    df, fixed = summarise(runs, cfg.metric, cfg.mode)
    varying = [c for c in df.columns if c not in ("final", "best", "best_step", "points", "run", "source")]
    prefix = Path(cfg.out) if cfg.out else root / "report"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": prefix.with_name(prefix.name + ".md"), "csv": prefix.with_name(prefix.name + ".csv"),
             "png": prefix.with_name(prefix.name + ".png")}
    paths["markdown"].write_text(_markdown(df, varying, fixed, cfg, str(root)))
    df.to_csv(paths["csv"], index=False)
    _plot(df, runs, varying, cfg, paths["png"])
    return {"table": df, "fixed": fixed, **{k: str(v) for k, v in paths.items()}}


def _config(argv: list[str]) -> ReportConfig:
    items = [a for a in argv if "=" in a]
    positional = [a for a in argv if "=" not in a]
    if len(positional) > 1:
        raise ScfmInputError(f"unexpected arguments {positional[1:]}", where="scfm-report",
                             fix="give options as key=value: dir=<folder> metric=val/loss mode=min out=<prefix>")
    if positional:
        items.insert(0, f"dir={positional[0]}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ReportConfig), OmegaConf.from_dotlist(items))
        cfg: ReportConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ScfmInputError(str(e).splitlines()[0], where="scfm-report options",
                             fix="options: dir=<folder> (required) metric=val/loss mode=min|max out=<prefix> "
                                 "title=<text>") from None
    return cfg


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    """``scfm-report`` with ``argv`` (default: ``sys.argv[1:]``); returns :func:`report`'s result. Bad options or
    folders exit with the message and its fix."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        raise SystemExit(0)
    try:
        result = report(_config(argv))
    except ScfmInputError as e:
        raise SystemExit(f"scfm-report: {e}") from None
    from rich.console import Console

    console = Console()
    df = result["table"]
    console.print(f"{len(df)} runs; best {df.iloc[0]['best']:.4g} ({df.iloc[0]['run']})")
    for key in ("markdown", "csv", "png"):
        console.print(f"{key:>9}: {result[key]}", soft_wrap=True)
    return result


def main() -> None:
    """Console entry point ``scfm-report`` (returns None: a console script's return value is its exit status)."""
    cli()


if __name__ == "__main__":
    main()
