"""sweeps/: every grid and wandb sweep combination composes and validates; a real Hydra multirun gathered by
scfm-report into a table and a plot."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from scfm.cli import conf_dir
from scfm.cli.report import cli as report_main
from scfm.config.scale import apply_scale
from scfm.errors import ScfmInputError

ROOT = Path(conf_dir()).parent
SWEEPS = ROOT / "sweeps"
GRIDS = sorted(p.stem for p in SWEEPS.glob("*.yaml") if not p.name.endswith(".wandb.yaml"))
WANDB = sorted(p.name for p in SWEEPS.glob("*.wandb.yaml"))


def grid_jobs(name: str) -> list[list[str]]:
    """The override list of every job of a Hydra grid file (expanded with Hydra's own override parser)."""
    with initialize_config_dir(str(SWEEPS), version_base="1.3"):
        cfg = compose(name, overrides=[f"hydra.searchpath=[file://{conf_dir()}]"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in (o.sweep_string_iterator() if o.is_sweep_override()
                                                    else [o.get_value_element_as_str()])] for o in parsed]
    return [list(job) for job in itertools.product(*axes)]


def wandb_jobs(name: str) -> list[list[str]]:
    """The command-line overrides of a wandb sweep's runs: a grid's every combination; a distribution's bounds."""
    spec = yaml.safe_load((SWEEPS / name).read_text())
    command = spec["command"]
    assert command[:2] == ["${env}", "scfm-train"] and command[-1] == "${args_no_hyphens}", command
    fixed = [c for c in command[2:-1] if not c.startswith("${")]
    axes = []
    for key, p in spec["parameters"].items():
        values = p["values"] if "values" in p else [p["value"]] if "value" in p else [p["min"], p["max"]]
        axes.append([f"{key}={v}" for v in values])  # wandb formats `${args_no_hyphens}` items as f"{key}={value}"
    return [fixed + list(job) for job in itertools.product(*axes)]


def compose_job(name: str, job: list[str], tmp_path: Path) -> DictConfig:
    with initialize_config_dir(str(SWEEPS) if name in GRIDS else conf_dir(), version_base="1.3"):
        overrides = [*job, f"paths.output_dir={tmp_path}"]
        if name in GRIDS:
            return compose(name, overrides=[f"hydra.searchpath=[file://{conf_dir()}]", *overrides])
        return compose("train", overrides=overrides)


def missing_class(cfg: DictConfig) -> str | None:
    for group in ("objective", "model"):
        try:
            get_class(cfg[group]._target_)
        except Exception:
            return f"{group}._target_={cfg[group]._target_}"
    return None


# -- (b) every combination of every sweep file composes and validates -----------------------------------------


def test_sweep_files_are_there():
    assert {"ablation_mlm", "ablation_generative", "ablation_value_regression"} <= set(GRIDS)
    assert WANDB and all(yaml.safe_load((SWEEPS / w).read_text())["metric"]["name"] == "val/loss" for w in WANDB)


@pytest.mark.parametrize("name", GRIDS + WANDB)
def test_every_sweep_combination_validates(name, tmp_path):
    from scfm.config.validate import validate

    jobs = grid_jobs(name) if name in GRIDS else wandb_jobs(name)
    assert len(jobs) >= 2
    checked, skipped = 0, set()
    for job in jobs:
        cfg = compose_job(name, job, tmp_path)
        if (why := missing_class(cfg)) is not None:
            skipped.add(why)
            continue
        validate(cfg)  # raises ScfmInputError naming the groups in conflict
        checked += 1
    if not checked:
        pytest.skip(f"{name}: classes not there yet: {sorted(skipped)}")


def test_grid_jobs_really_vary_the_groups(tmp_path):
    jobs = grid_jobs("ablation_mlm")
    assert len(jobs) == 2 * 4 * 3 * 2
    seen = set()
    for job in jobs[::7]:  # 7 is prime to every axis length: all models, attentions, ... are visited
        cfg = compose_job("ablation_mlm", job, tmp_path)
        choice = dict(j.split("=", 1) for j in job)
        assert cfg.encoding.layout == {"rank": "v1", "rank_v2": "v2"}[choice["encoding"]]
        assert cfg.attention.kernel == choice["attention"] and cfg.batching.strategy == choice["batching"]
        seen.add((cfg.model.layers, cfg.model.hidden))
        assert cfg.encoding.max_len <= cfg.model.max_position
    assert seen == {(2, 128), (6, 256)}


def test_an_incompatible_combination_fails_validation(tmp_path):
    from scfm.config.validate import validate

    cfg = compose_job("ablation_mlm", ["experiment=geneformer_v1", "encoding=bin"], tmp_path)
    with pytest.raises(ScfmInputError, match="encoding"):
        validate(cfg)


# -- scfm-report on made-up runs (no training) ------------------------------------------------------------------


def fake_job(root: Path, num: int, overrides: list[str], losses: list[float] | None) -> Path:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if losses is not None:
        rows = [{"epoch": 0, "step": 10 * (i + 1), "val/loss": v} for i, v in enumerate(losses)]
        rows.insert(1, {"epoch": 0, "step": 5, "train/loss": 9.0})  # other metrics' rows: NaN in val/loss
        pd.DataFrame(rows).to_csv(job / "metrics.csv", index=False)
    return job


def test_report_tables_the_varying_overrides_best_first(tmp_path):
    fake_job(tmp_path, 0, ["experiment=sanity", "model.hidden=32", "objective.lr=0.001"], [3.0, 2.5, 2.7])
    fake_job(tmp_path, 1, ["experiment=sanity", "model.hidden=64", "objective.lr=0.001"], [3.0, 2.0, 2.2])
    fake_job(tmp_path, 2, ["experiment=sanity", "model.hidden=64", "objective.lr=0.003"], None)  # failed job
    result = report_main([str(tmp_path), "metric=val/loss"])
    df = result["table"]
    assert list(df["model.hidden"]) == ["64", "32", "64"] and result["fixed"] == {"experiment": "sanity"}
    assert df.loc[0, "best"] == 2.0 and df.loc[0, "final"] == 2.2 and df.loc[0, "best_step"] == 20
    assert math.isnan(df.loc[2, "best"])
    md = Path(result["markdown"]).read_text()
    assert "`experiment=sanity`" in md and "| 64 | 0.001 | 2.2 | 2 | 20 | 1 |" in md and "without `val/loss`" in md
    assert pd.read_csv(result["csv"]).shape[0] == 3 and Path(result["png"]).stat().st_size > 5_000
    best = report_main([f"dir={tmp_path}", "mode=max", f"out={tmp_path / 'r' / 'max'}"])["table"]
    assert list(best["best"][:2]) == [3.0, 3.0] and list(best["best_step"][:2]) == [10, 10]
    assert (tmp_path / "r" / "max.png").is_file()


def test_report_errors_name_the_fix(tmp_path):
    fake_job(tmp_path, 0, ["a.b=1"], [1.0])
    fake_job(tmp_path, 1, ["a.b=2"], [2.0])
    with pytest.raises(SystemExit, match="val/loss"):  # lists the metrics that are there
        report_main([str(tmp_path), "metric=val/nope"])
    with pytest.raises(SystemExit, match="mode=min or mode=max"):
        report_main([str(tmp_path), "mode=lowest"])
    with pytest.raises(SystemExit, match="no runs found"):
        report_main([str(tmp_path / "0" / ".hydra")])
    with pytest.raises(SystemExit, match="dir"):
        report_main(["metric=val/loss"])


def test_report_reads_offline_wandb_runs(tmp_path):
    for i, (lr, loss) in enumerate([(1e-3, 2.5), (3e-3, 2.1)]):
        files = tmp_path / "wandb" / f"offline-run-2025010{i}_000000-abc{i}" / "files"
        files.mkdir(parents=True)
        (files / "wandb-summary.json").write_text(json.dumps({"val/loss": loss, "_step": 6}))
        (files / "wandb-metadata.json").write_text(json.dumps({"args": ["experiment=sanity", f"objective.lr={lr}"]}))
    df = report_main([str(tmp_path)])["table"]
    assert list(df["objective.lr"]) == ["0.003", "0.001"] and list(df["best"]) == [2.1, 2.5]
    assert set(df["source"]) == {"wandb"}


# -- (a) a real 2x2 Hydra multirun of the sanity preset ---------------------------------------------------------


def test_multirun_of_sanity_preset_reports_four_configurations(tmp_path, cache_dir, pbmc_corpus):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "scfm.cli.train", "-m", "experiment=sanity", "scale=tiny", "model.hidden=32,64",
           "objective.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}", "trainer.enable_progress_bar=false",
           "trainer.enable_model_summary=false"]
    env = {**os.environ, "SCFM_CACHE": str(cache_dir), "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 4
    for job in jobs:  # what ran: the scale applied, the explicit multirun values kept
        applied = OmegaConf.load(job / "config_applied.yaml")
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        assert applied.model.hidden == int(overrides["model.hidden"]) and applied.trainer.max_steps == 6
        assert applied.model.layers == 2 and applied.scale.applied
    result = report_main([str(sweep), "metric=val/loss", "mode=min"])
    df = result["table"]
    assert len(df) == 4 and {"model.hidden", "objective.lr"} <= set(df.columns)
    configs = sorted((int(h), float(lr)) for h, lr in zip(df["model.hidden"], df["objective.lr"]))
    assert configs == [(32, 1e-3), (32, 3e-3), (64, 1e-3), (64, 3e-3)]
    assert df["best"].map(math.isfinite).all() and df["final"].map(math.isfinite).all()
    assert list(df["best"]) == sorted(df["best"])
    assert {k: v.lower() for k, v in result["fixed"].items()} == {  # Hydra's multirun writes false as False
        "experiment": "sanity", "scale": "tiny", "trainer.enable_model_summary": "false",
        "trainer.enable_progress_bar": "false"}
    assert Path(result["png"]).stat().st_size > 5_000 and Path(result["markdown"]).read_text().count("\n| ") == 1 + 4


# -- slow: every grid combination trains (tiny) ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", GRIDS)
def test_every_grid_combination_trains_at_scale_tiny(name, tmp_path, cache_dir):
    from scfm.cli.train import train

    for i, job in enumerate(grid_jobs(name)):
        overrides = [*job, "scale=tiny", "trainer.max_steps=2", "trainer.limit_train_batches=2",
                     "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
        cfg = compose_job(name, overrides, tmp_path / str(i))
        if (why := missing_class(cfg)) is not None:
            pytest.skip(f"{why} does not exist yet")
        result = train(apply_scale(cfg, overrides=overrides))
        assert math.isfinite(result["metrics"]["train/loss"]), job
