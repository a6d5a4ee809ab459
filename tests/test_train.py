"""scfm-train end to end on the built-in PBMC data: outputs, configs, and exact mid-epoch resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from scfm.cli import conf_dir
from scfm.cli.train import build, train
from scfm.config.scale import apply_scale
from scfm.config.validate import validate
from scfm.errors import ScfmInputError

FAST = ["experiment=demo", "model.layers=1", "model.hidden=32", "model.ffn=64", "model.heads=2",
        "encoding.max_len=64", "batching.batch_size=8", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=3"]


def config(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("train", overrides=[*FAST, f"paths.output_dir={tmp_path}", *overrides])


def losses(run_dir: Path) -> pd.Series:
    df = pd.read_csv(run_dir / "metrics.csv")
    return df.dropna(subset=["train/loss"]).set_index("step")["train/loss"]


def test_demo_config_composes_with_the_paper_parts():
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", "paths.output_dir=/tmp/x"])
    assert cfg.data.builtin == "pbmc3k" and cfg.encoding.layout == "v1" and cfg.batching.strategy == "length_grouped"
    assert cfg.objective.mask_prob == 0.15 and cfg.trainer.accelerator == "cpu"
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        default = compose("train", overrides=["paths.output_dir=/tmp/x"])
    assert (default.model.layers, default.model.hidden, default.model.heads, default.model.ffn) == (6, 256, 4, 512)
    assert default.encoding.max_len == 2048


def test_validation_names_the_groups_in_conflict(tmp_path):
    cfg = config(tmp_path, "encoding.max_len=4096", "model.max_position=2048")
    with pytest.raises(ScfmInputError, match=r"encoding.*model"):
        validate(cfg)


def test_train_writes_checkpoint_metrics_and_plot(tmp_path, cache_dir):
    result = train(config(tmp_path, "trainer.max_steps=6"))
    assert Path(result["checkpoint"]).is_file() and Path(result["loss_plot"]).stat().st_size > 5_000
    assert len(losses(tmp_path)) == 6
    ckpt = torch.load(result["checkpoint"], weights_only=False)
    loader_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state  # the DataLoader's (and CellStream's) state is in the checkpoint
    assert "val/masked_acc" in result["metrics"] or "train/masked_acc" in result["metrics"]


@pytest.mark.parametrize(("batching", "workers"), [("length_grouped", 0), ("packed", 0), ("length_grouped", 2)])
def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path, cache_dir, batching, workers):
    """With loader workers, step 4 falls inside a worker's message (~25 batches): the resumed run serves the rest of
    it first."""
    full, part = tmp_path / "full", tmp_path / "part"
    common = (f"batching={batching}", f"data.num_workers={workers}")
    train(config(full, "trainer.max_steps=8", *common, "logger=csv"))
    train(config(part, "trainer.max_steps=4", *common, "checkpoint_every_n_steps=4"))
    shutil.copy(part / "checkpoints" / "last.ckpt", tmp_path / "step4.ckpt")
    if workers:
        ckpt = torch.load(tmp_path / "step4.ckpt", weights_only=False)
        assert "scfm_unserved" in ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    resumed = tmp_path / "resumed"
    train(config(resumed, "trainer.max_steps=8", *common, f"resume={tmp_path / 'step4.ckpt'}"))
    a, b = losses(full), losses(resumed)
    assert list(b.index) == [4, 5, 6, 7]
    torch.testing.assert_close(torch.tensor(b.values), torch.tensor(a.loc[b.index].values), rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ["scgpt_human", "scfoundation_100m"])
def test_value_objectives_resume_mid_epoch_exactly(tmp_path, cache_dir, preset):
    """generative and value_regression resume like mlm: same losses after a mid-epoch checkpoint."""
    def run(out: Path, *extra: str) -> None:
        overrides = [f"experiment={preset}", "scale=tiny", f"paths.output_dir={out}",
                     "trainer.limit_train_batches=1000", "objective.total_steps=8",  # one schedule for all three
                     "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *extra]
        with initialize_config_dir(conf_dir(), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        train(apply_scale(cfg, overrides))  # compose() has no Hydra runtime: name the explicit overrides

    run(tmp_path / "full", "trainer.max_steps=8")
    run(tmp_path / "part", "trainer.max_steps=4", "checkpoint_every_n_steps=4")
    run(tmp_path / "resumed", "trainer.max_steps=8", f"resume={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}")
    a, b = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert list(b.index) == [4, 5, 6, 7]
    torch.testing.assert_close(torch.tensor(b.values), torch.tensor(a.loc[b.index].values), rtol=0, atol=1e-6)


def test_build_derives_vocab_size_from_the_corpus(tmp_path, cache_dir, pbmc_corpus):
    _dm, module = build(config(tmp_path))
    assert module.config.vocab_size == len(pbmc_corpus.vocab)
    assert module.hparams.data["mask_id"] == pbmc_corpus.vocab.special_id("<mask>")
    assert module.hparams.data["first_gene_id"] == pbmc_corpus.vocab.n_special


def test_wandb_logger_runs_offline_without_an_account(tmp_path, cache_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train(config(tmp_path, "logger=wandb", "trainer.max_steps=2"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].rglob("*.wandb"))


def test_tensorboard_logger_writes_events(tmp_path, cache_dir):
    pytest.importorskip("tensorboard")
    train(config(tmp_path, "logger=tensorboard", "trainer.max_steps=2", "trainer.limit_val_batches=0"))
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))


def test_synthetic_data_trains_with_packed_batches(tmp_path, cache_dir):
    result = train(config(tmp_path, "data=synthetic", "data.builtin_params.n_cells=600",
                          "data.builtin_params.n_genes=300", "batching=packed", "trainer.max_steps=3"))
    assert result["metrics"]["train/loss"] > 0
    assert len(losses(tmp_path)) == 3


@pytest.mark.parametrize("encoding", ["rank", "rank_v2", "continuous", "bin"])
@pytest.mark.parametrize("batching", ["random", "packed"])
def test_every_encoding_composes_into_batches(tmp_path, encoding, batching):
    from scfm.cli.train import build_datamodule

    with initialize_config_dir(conf_dir(), version_base="1.3"):  # the default config: no demo max_len override
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", f"encoding={encoding}",
                                          f"batching={batching}", "batching.batch_size=4",
                                          "data.conditions=[cell_type]"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["gene_ids"].dtype == torch.int64 and b["cell_type"].shape == b["lengths"].shape
    if encoding == "continuous":
        assert {"values", "target_values", "value_mask", "encoder_mask", "token_kind"} <= set(b.keys())
    if encoding == "bin":
        assert {"values", "values_bin"} <= set(b.keys()) and int(b["values_bin"].max()) <= 50
