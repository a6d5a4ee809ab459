"""``scfm-train``: pretrain with any combination of the config groups (a Hydra app)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from scfm.cli import conf_dir
from scfm.errors import ScfmInputError


def validate(cfg: DictConfig) -> None:
    """Check combinations of config groups before any data is read; errors name the groups in conflict."""
    max_len, positions = cfg.encoding.get("max_len"), cfg.model.get("max_position")
    if max_len is not None and positions is not None and max_len > positions:
        raise ScfmInputError(f"encoding.max_len={max_len} exceeds model.max_position={positions}",
                             where="config groups encoding + model",
                             fix=f"set encoding.max_len<={positions} or model.max_position>={max_len}")
    if cfg.objective.get("_target_", "").endswith("MaskedGeneModeling") and not cfg.encoding.get(
            "_target_", "").endswith("RankEncoding"):
        raise ScfmInputError("objective=mlm predicts gene ids and needs encoding=rank",
                             where="config groups objective + encoding", fix="use encoding=rank or rank_v2")
    _objective_checks(cfg)


def _objective_checks(cfg: DictConfig) -> None:
    """Run the objective class's own ``check_config(cfg)`` (a staticmethod), if it has one."""
    target = cfg.objective.get("_target_")
    if not target:
        return
    from hydra.utils import get_class

    check = getattr(get_class(target), "check_config", None)
    if check is not None:
        check(cfg)


def build_datamodule(cfg: DictConfig) -> Any:
    """The DataModule of a composed config (groups data + encoding + batching), its corpus opened."""
    from hydra.utils import instantiate

    encoding = instantiate(cfg.encoding)
    batching = instantiate(cfg.batching)
    datamodule = instantiate(cfg.data, _partial_=True)(encoding=encoding, batching=batching)  # objects as-is
    datamodule.open()
    return datamodule


def build(cfg: DictConfig) -> tuple[Any, Any]:
    """Instantiate (datamodule, lightning module) from a composed config; prepares built-in data if needed.

    The objective gets ``model`` (the architecture config as a dict, sized to the corpus's vocabulary) and
    ``data`` (:func:`scfm.objectives.base.data_facts`: special-token ids, label counts, encoding facts).
    """
    from hydra.utils import instantiate

    from scfm.objectives.base import data_facts

    validate(cfg)
    datamodule = build_datamodule(cfg)
    vocab = datamodule.vocab
    facts = data_facts(vocab, datamodule.corpus.labels, datamodule.encoding)
    model_cfg = instantiate(cfg.model, vocab_size=len(vocab), pad_id=vocab.special_id("<pad>"),
                            conditions=list(cfg.data.get("conditions") or []), n_labels=facts["n_labels"])
    module = instantiate(cfg.objective, _convert_="all", model=dataclasses.asdict(model_cfg), data=facts)
    return datamodule, module


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run training; returns the final metrics and the paths of checkpoint, metrics CSV and loss plot."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from scfm.training import DataEpoch, LossPlot, RNGState

    _quiet_known_warnings()
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    datamodule, module = build(cfg)
    logger = instantiate(cfg.logger) if cfg.get("logger") and cfg.logger.get("_target_") else False
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0,
                                 every_n_train_steps=cfg.checkpoint_every_n_steps, save_on_train_epoch_end=True)
    plot = LossPlot(out / "loss.png")
    callbacks = [DataEpoch(), RNGState(), checkpoint, plot]
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar())
    extra = {}
    if datamodule.batching.strategy == "packed":  # the number of packs changes with each epoch's shuffle
        extra["reload_dataloaders_every_n_epochs"] = 1
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(out), **extra)
    ckpt = cfg.get("resume")
    if ckpt == "last":
        ckpt = str(out / "checkpoints" / "last.ckpt")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result = {"metrics": metrics, "checkpoint": str(out / "checkpoints" / "last.ckpt"), "loss_plot": str(plot.path),
              "metrics_csv": next((str(Path(lg.log_dir) / "metrics.csv") for lg in trainer.loggers
                                   if isinstance(lg, CSVLogger)), None),
              "output_dir": str(out)}
    if trainer.is_global_zero:
        _report(result)
    return result


def _quiet_known_warnings() -> None:
    """Silence third-party deprecation chatter that says nothing about the user's run."""
    import warnings

    warnings.filterwarnings("ignore", message=".*set_vital.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")  # ours is exact


def _report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="scfm-train finished", show_header=False)
    for key in sorted(result["metrics"]):
        if key.startswith(("val/", "train/loss")):
            table.add_row(key, f"{result['metrics'][key]:.4f}")
    console = Console()
    console.print(table)
    for key in ("checkpoint", "metrics_csv", "loss_plot"):  # full paths, never truncated
        if result.get(key):
            console.print(f"{key:>12}: {result[key]}", soft_wrap=True)


@hydra.main(config_path=conf_dir(), config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> Any:
    try:
        return train(cfg)["metrics"].get("val/loss")
    except ScfmInputError as e:  # Hydra's job runner would print a traceback; a clear message is enough
        raise SystemExit(f"scfm-train: {e}") from None


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    _main()


if __name__ == "__main__":
    main()
