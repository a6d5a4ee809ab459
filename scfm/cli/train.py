"""``scfm-train``: pretrain with any combination of the config groups (a Hydra app)."""

from __future__ import annotations

import dataclasses
import os
import sys
from datetime import UTC
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from scfm.cli import conf_dir, quiet_known_warnings
from scfm.config.scale import apply_scale
from scfm.config.validate import validate
from scfm.errors import ScfmInputError


def build_datamodule(cfg: DictConfig, encoding: Any = None, vocab: Any = None) -> Any:
    """The DataModule of a composed config (groups data + encoding + batching), its corpus opened.

    ``encoding`` + ``vocab``: an encoding already bound to a model's vocabulary (a bundle's) instead of
    ``cfg.encoding`` bound to the corpus."""
    from hydra.utils import instantiate

    encoding = instantiate(cfg.encoding) if encoding is None else encoding
    batching = instantiate(cfg.batching)
    datamodule = instantiate(cfg.data, _partial_=True)(encoding=encoding, batching=batching, vocab=vocab)
    datamodule.open()
    return datamodule


def build(cfg: DictConfig) -> tuple[Any, Any]:
    """Instantiate (datamodule, lightning module) from a composed config; prepares built-in data if needed.

    The backbone is built once, here: ``cfg.model`` sized to the corpus's vocabulary and labels, or the bundle's
    architecture with its weights under ``pretrained=<bundle>`` (whose encoding then reads the data), its config
    completed from the data facts (:func:`scfm.model.complete_config`). The objective (or the task, when ``task=``
    is set) gets it as ``backbone`` with ``data`` (:func:`scfm.objectives.base.data_facts`: special-token ids,
    label counts, encoding facts); a task also gets ``pretrained`` and freezes its layers.
    """

    validate(cfg)
    return _build(cfg)


def module_node(cfg: DictConfig) -> tuple[str, DictConfig]:
    """(``task`` or ``objective``, its node): a run trains an objective unless a task is chosen."""
    task = cfg.get("task")
    return ("task", task) if task else ("objective", cfg.objective)


def _build(cfg: DictConfig) -> tuple[Any, Any]:
    """:func:`build` for a config that was validated already."""
    from hydra.utils import get_class, instantiate

    from scfm.bundle import checkpoint_context, read_bundle
    from scfm.model import architecture_kind, build_architecture, complete_config
    from scfm.objectives.base import data_facts

    group, node = module_node(cfg)
    cls = get_class(node._target_)
    overrides = getattr(cls, "ENCODING_OVERRIDES", {})
    bundle = read_bundle(cfg.pretrained) if cfg.get("pretrained") else None
    if bundle is not None:
        encoding = bundle.encoding(**overrides.get(get_class(bundle.config["encoding"]["_target_"]).kind, {}))
        datamodule = build_datamodule(cfg, encoding, bundle.vocab)
        kind = bundle.architecture
        fields = dict(bundle.config["architecture"]["config"])
        fields["attention"] = str(cfg.model.get("attention", fields["attention"]))  # the kernel is the user's choice
    else:
        encoding = instantiate(cfg.encoding)
        for key, value in overrides.get(type(encoding).kind, {}).items():
            setattr(encoding, key, value)
        datamodule = build_datamodule(cfg, encoding)
        kind = architecture_kind(str(cfg.model._target_))
    vocab = datamodule.vocab if bundle is None else bundle.vocab
    if bundle is not None:
        _check_bundle_labels(bundle, datamodule.corpus)
    facts = data_facts(vocab, datamodule.corpus.labels, datamodule.encoding)
    if bundle is None:
        model_cfg = instantiate(cfg.model, _convert_="all", vocab_size=len(vocab), pad_id=vocab.special_id("<pad>"),
                                conditions=list(cfg.data.get("conditions") or []), n_labels=facts["n_labels"])
        backbone = build_architecture(kind, complete_config(kind, dataclasses.asdict(model_cfg), facts))
    else:  # the bundle's weights, in training mode (Lightning does not switch an eval-mode model back)
        backbone = bundle.backbone(**complete_config(kind, fields, facts)).train()
    extra = {"pretrained": None if bundle is None else str(bundle.path)} if group == "task" else {}
    module = instantiate(node, _convert_="all", backbone=backbone, data=facts, **extra)
    if group == "task":
        module.apply_freeze()
    module.bundle_context = checkpoint_context(datamodule.encoding, vocab, datamodule.corpus.labels,
                                               {"corpus": str(Path(datamodule.corpus.path).resolve())})
    return datamodule, module


def _check_bundle_labels(bundle: Any, corpus: Any) -> None:
    """The model's condition embeddings are indexed by its own label vocabularies: the corpus must have the same."""
    for role in bundle.config["architecture"]["config"].get("conditions") or []:
        if role == "modality":
            continue
        ours, theirs = list(corpus.labels.get(role, [])), list(bundle.labels.get(role, []))
        if ours != theirs:
            raise ScfmInputError(f"the model embeds {role} labels {theirs[:5]}{' ...' if len(theirs) > 5 else ''} "
                                 f"({len(theirs)}), the corpus has {ours[:5]}{' ...' if len(ours) > 5 else ''} "
                                 f"({len(ours)})", where=str(corpus.path),
                                 fix=f"use a corpus with the model's {role} labels (its labels.json), or a model "
                                     f"pretrained without data.conditions=[{role}]")


def build_strategy(cfg: DictConfig) -> Any:
    """The ``strategy`` group as ``Trainer(strategy=...)``: a Lightning name, or the instantiated ``_target_``."""
    from hydra.utils import instantiate

    node = (cfg.get("strategy") or {}).get("lightning", "auto")
    if isinstance(node, DictConfig) and node.get("_target_"):
        return instantiate(node)
    return "auto" if node is None else node


def resume_path(cfg: DictConfig, out: Path) -> str | None:
    """The checkpoint ``resume`` names (``last`` = ``<output_dir>/checkpoints/last.ckpt``); it must exist."""
    resume = cfg.get("resume")
    if resume is None:
        return None
    path = out / "checkpoints" / "last.ckpt" if str(resume) == "last" else Path(str(resume))
    if not path.exists():
        raise ScfmInputError(f"no checkpoint at {path}", where=f"resume={resume}",
                             fix="resume=last resumes <paths.output_dir>/checkpoints/last.ckpt: pass the interrupted "
                                 "run's paths.output_dir (or hydra.run.dir); or resume=<path of a .ckpt>; or drop "
                                 "resume to start afresh")
    return str(path)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run training; returns the final metrics and the paths of checkpoint, metrics CSV and loss plot."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from scfm.training import AtomicCheckpointIO, DataEpoch, LossPlot, RNGState, stale_checkpoint_parts

    quiet_known_warnings()
    cfg = apply_scale(cfg)  # scale=<name> shrinks the preset (explicit command-line values win); no-op without it
    validate(cfg)
    out = Path(cfg.paths.output_dir)
    ckpt = resume_path(cfg, out)
    L.seed_everything(cfg.seed, workers=True)
    out.mkdir(parents=True, exist_ok=True)
    if _launch_rank() == 0:
        for part in stale_checkpoint_parts(out / "checkpoints"):  # left by a run killed mid-save
            part.unlink(missing_ok=True)
        if ckpt is not None and (out / "metrics.csv").is_file():  # Lightning's CSVLogger would delete it
            _keep_previous_metrics(out / "metrics.csv")
        applied = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # what runs (.hydra/: the input)
        OmegaConf.save(applied, out / "config_applied.yaml", resolve=True)
    datamodule, module = _build(cfg)  # validated above
    if getattr(module, "STAGE", "fit") == "predict":
        return _predict(cfg, datamodule, module, out)
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
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(out),
                          strategy=build_strategy(cfg), plugins=[AtomicCheckpointIO()], **extra)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    last = out / "checkpoints" / "last.ckpt"
    bundle = _finish(trainer, module, cfg, out, last)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result = {"metrics": metrics, "checkpoint": str(last), "bundle": bundle, "loss_plot": str(plot.path),
              "metrics_csv": next((str(Path(lg.log_dir) / "metrics.csv") for lg in trainer.loggers
                                   if isinstance(lg, CSVLogger)), None),
              "output_dir": str(out)}
    if trainer.is_global_zero:
        _report(result)
    return result


def _predict(cfg: DictConfig, datamodule: Any, module: Any, out: Path) -> dict[str, Any]:
    """Run a predict-stage task (``task=embed``) over every cell; the task writes its outputs to ``out``."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import RichProgressBar

    callbacks = [RichProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []
    trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks, default_root_dir=str(out),
                          strategy=build_strategy(cfg), enable_checkpointing=False)
    module.output_dir = out
    trainer.predict(module, dataloaders=datamodule.predict_dataloader(), return_predictions=False)
    summary = module.write_outputs(datamodule.corpus) if trainer.is_global_zero else {}
    if trainer.is_global_zero:
        from rich.console import Console

        Console().print_json(data=summary)
    return {"summary": summary, "output_dir": str(out), "metrics": {}}


def _finish(trainer: Any, module: Any, cfg: DictConfig, out: Path, last: Path) -> str | None:
    """After a completed fit: ``last.ckpt`` holds the final state (the periodic one may be older), and rank 0
    writes the model bundle ``<output_dir>/model`` from the same state. Returns the bundle's path, or None when
    training was interrupted or the strategy shards the parameters (fsdp, deepspeed: not written yet)."""
    if trainer.interrupted:
        return None
    stale = trainer.global_step != _checkpoint_step(last) if trainer.is_global_zero else None
    if trainer.strategy.broadcast(stale, src=0):  # rank 0 decides: saving is collective (it ends in a barrier)
        trainer.save_checkpoint(last, weights_only=False)  # the full state: resume=last continues from it
    sharded = str((cfg.get("strategy") or {}).get("name", "single")).startswith(("fsdp", "deepspeed"))
    if sharded or not trainer.is_global_zero:
        return None
    from datetime import datetime

    from scfm.bundle import bundle_from_module

    source = {"kind": "scfm-train", "run": str(out.resolve()), "checkpoint": str(last.resolve()),
              "global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
              "module": str(module_node(cfg)[1].get("_target_")),
              "created": datetime.now(UTC).isoformat(timespec="seconds")}
    return str(bundle_from_module(out / "model", module, source))


def _checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint holds, or None when there is none."""
    import torch

    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step", -1))


def _launch_rank() -> int:
    """Global rank from the launcher's environment (torchrun, SLURM, Lightning's own launcher), before Lightning
    sets up; 0 for a plain single process."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _keep_previous_metrics(path: Path) -> Path:
    """Move an interrupted run's metrics.csv to metrics.<n>.csv (its rows are not in the resumed run's CSV)."""
    n = 1
    while (target := path.with_name(f"metrics.{n}.csv")).exists():
        n += 1
    path.rename(target)
    return target


def _report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="scfm-train finished", show_header=False)
    for key in sorted(result["metrics"]):
        if key.startswith(("val/", "train/loss")):
            table.add_row(key, f"{result['metrics'][key]:.4f}")
    console = Console()
    console.print(table)
    for key in ("checkpoint", "bundle", "metrics_csv", "loss_plot"):  # full paths, never truncated
        if result.get(key):
            console.print(f"{key:>12}: {result[key]}", soft_wrap=True)


@hydra.main(config_path=conf_dir(), config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> Any:
    from scfm.objectives.base import NonFiniteLossError

    try:
        return train(cfg)["metrics"].get("val/loss")
    except (ScfmInputError, NonFiniteLossError) as e:  # Hydra's job runner would print a traceback
        raise SystemExit(f"scfm-train: {e}") from None


def numeric_group_choice(argv: list[str]) -> str | None:
    """Why an override like ``precision=32`` cannot work, or None: Hydra parses ``32`` as a number, and a number
    names no config file (Hydra's own error, "Config group override must be a string or a list", says neither)."""
    for arg in argv:
        key, _, value = arg.partition("=")
        numbers = [v.strip() for v in value.strip("[]").split(",") if v.strip().isdigit()]
        if key.lstrip("+~") == "precision" and numbers:
            return (f"{arg}: Hydra reads {numbers[0]} as a number, which names no config of the precision group. "
                    "Fix: use precision=32-true, bf16-mixed or 16-mixed (Lightning's names).")
    return None


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    if problem := numeric_group_choice(sys.argv[1:]):
        raise SystemExit(f"scfm-train: {problem}")
    _main()


if __name__ == "__main__":
    main()
