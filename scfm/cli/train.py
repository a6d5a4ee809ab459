"""``scfm-train``: pretrain with any combination of the config groups (a Hydra app)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scfm.cli import conf_dir
from scfm.errors import ScfmInputError
from scfm.scale import apply_scale

PRECISIONS = ("32", "32-true", "64", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")


@dataclass
class StrategyNode:
    """Schema of the ``strategy`` group (``conf/strategy/*.yaml``)."""

    name: str = "single"
    devices: Any = 1  # default of trainer.devices: an int, "auto", or a list of device ids
    num_nodes: int = 1  # default of trainer.num_nodes
    needs_cuda: bool = False
    needs_packages: list[str] = field(default_factory=list)
    lightning: Any = "auto"  # Trainer(strategy=...): a Lightning strategy name or a `_target_` node


@dataclass
class PrecisionNode:
    """Schema of the ``precision`` group (``conf/precision/*.yaml``)."""

    value: str = "32-true"  # default of trainer.precision


# objective kind -> (encoding kind it needs, what it predicts, the encoding options that fit)
_OBJECTIVE_NEEDS = {
    "mlm": ("rank", "predicts gene ids from rank-ordered genes", "encoding=rank or rank_v2"),
    "generative": ("bin", "predicts binned expression values (scGPT)", "encoding=bin"),
    "value_regression": ("continuous", "regresses continuous expression values (scFoundation)",
                         "encoding=continuous"),
}


def validate(cfg: DictConfig) -> None:
    """Check combinations of config groups before any data is read; errors name the groups in conflict.

    Hardware (CUDA, bf16, optional packages) is checked against the machine this runs on; each message gives a
    valid alternative. The objective class's own ``check_config(cfg)`` runs last.
    """
    if cfg.get("scale") is not None and not cfg.scale.get("applied", False):
        raise ScfmInputError(f"scale={cfg.scale.get('name')} is in the config but was not applied", where="scale",
                             fix="call scfm.scale.apply_scale(cfg) first (scfm-train and train() do)")
    strategy = _typed(cfg.get("strategy") or {}, StrategyNode, "strategy")
    _typed(cfg.get("precision") or {}, PrecisionNode, "precision")
    _check_hardware(cfg, strategy)
    _check_attention(cfg)
    _check_objective_encoding(cfg)
    max_len, positions = cfg.encoding.get("max_len"), cfg.model.get("max_position")
    if max_len is not None and positions is not None and max_len > positions:
        raise ScfmInputError(f"encoding.max_len={max_len} exceeds model.max_position={positions}",
                             where="config groups encoding + model",
                             fix=f"set encoding.max_len<={positions} or model.max_position>={max_len}")
    _check_conditions(cfg)
    _objective_checks(cfg)


def _check_conditions(cfg: DictConfig) -> None:
    """``data.conditions`` names known roles (whether the corpus has their labels is checked when it is opened)."""
    from scfm.data.stream import CONDITIONS

    conditions = cfg.get("data", {}).get("conditions") or []
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ScfmInputError(f"data.conditions has unknown role(s) {unknown}", where="config group data",
                             fix=f"choose from {list(CONDITIONS)}; declare the obs columns at prepare time "
                             "(columns.batch=<column>, ...)")


def _typed(node: Any, schema: type, group: str) -> DictConfig:
    """``node`` merged onto its dataclass schema: unknown keys and wrong types fail with the group named."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as e:
        fields = ", ".join(f.name for f in dataclasses.fields(schema))
        raise ScfmInputError(str(e).splitlines()[0], where=f"config group {group}",
                             fix=f"{group} nodes have the fields {fields} (see conf/{group}/*.yaml)") from None


def _n_devices(devices: Any) -> int | None:
    """Number of devices a trainer.devices value asks for; None for "auto" / -1 (all there are)."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return None if devices < 0 else devices
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return _n_devices(int(text)) if text.lstrip("-").isdigit() else None


def _device_type(cfg: DictConfig) -> str:
    """``cuda`` or ``cpu`` (or another accelerator name) that trainer.accelerator resolves to on this machine."""
    import torch

    accelerator = str(cfg.trainer.get("accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ScfmInputError(f"trainer.accelerator={accelerator} but no CUDA device is visible",
                                 where="config group trainer", fix="use trainer.accelerator=cpu (or trainer=cpu)")
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return accelerator


def _missing_packages(names: Any) -> list[str]:
    return [n for n in names or [] if importlib.util.find_spec(n) is None]


def _check_hardware(cfg: DictConfig, strategy: DictConfig) -> None:
    """Strategy and precision against the machine: CUDA, bf16 support, optional packages, device counts."""
    import torch

    device = _device_type(cfg)
    name = strategy.name
    if strategy.needs_cuda and device != "cuda":
        why = "this machine has no CUDA device" if not torch.cuda.is_available() else f"trainer.accelerator={device}"
        raise ScfmInputError(f"strategy={name} needs CUDA GPUs, but {why}", where="config groups strategy + trainer",
                             fix="use strategy=ddp (CPU processes with gloo, e.g. trainer.accelerator=cpu "
                                 f"trainer.devices=2) or strategy=single here; run strategy={name} on a CUDA machine")
    missing = _missing_packages(strategy.needs_packages)
    if missing:
        raise ScfmInputError(f"strategy={name} needs the package(s) {', '.join(missing)}, which are not installed",
                             where="config group strategy",
                             fix="pip install 'scfm[gpu]' on a CUDA machine, or use strategy=fsdp (sharding in "
                                 "PyTorch itself) or strategy=ddp")
    n_devices, nodes = _n_devices(cfg.trainer.get("devices", 1)), int(cfg.trainer.get("num_nodes", 1) or 1)
    if name == "single" and ((n_devices is not None and n_devices > 1) or nodes > 1):
        raise ScfmInputError(f"strategy=single runs one process on one device, but trainer.devices="
                             f"{cfg.trainer.get('devices')} and trainer.num_nodes={nodes}",
                             where="config groups strategy + trainer",
                             fix="use strategy=ddp (or fsdp / deepspeed_stage_* on GPUs) for several devices, or "
                                 "trainer.devices=1 trainer.num_nodes=1")
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in PRECISIONS:
        raise ScfmInputError(f"unknown precision {precision!r}", where="config groups precision + trainer",
                             fix="use precision=32-true, bf16-mixed or 16-mixed "
                                 "(trainer.precision follows precision.value)")
    if precision == "16-mixed" and device != "cuda":
        raise ScfmInputError(f"precision={precision} (float16 with loss scaling) needs CUDA; this run is on the "
                             f"{device}", where="config groups precision + trainer",
                             fix="use precision=bf16-mixed (CPU autocast) or precision=32-true here")
    if precision.startswith("bf16") and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ScfmInputError(f"precision={precision} but this GPU ({torch.cuda.get_device_name()}) has no bfloat16",
                             where="config groups precision + trainer",
                             fix="use precision=16-mixed (float16 with loss scaling) or precision=32-true")


def _check_attention(cfg: DictConfig) -> None:
    """Attention kernels the machine or the objective's mask rules out."""
    import torch

    kernel = cfg.model.get("attention") or (cfg.get("attention") or {}).get("kernel")
    kind = _objective_kind(cfg)
    if kernel == "flash":
        device = _device_type(cfg)
        missing = _missing_packages(["flash_attn"])
        if device != "cuda" or missing:
            why = ("this machine has no CUDA device" if not torch.cuda.is_available() else
                   f"trainer.accelerator={device}" if device != "cuda" else "flash-attn is not installed")
            raise ScfmInputError(f"attention=flash (flash-attn varlen) needs CUDA and flash-attn, but {why}",
                                 where="config groups attention + trainer",
                                 fix="use attention=sdpa (or flex) here; on a CUDA machine pip install 'scfm[gpu]'")
    if kind == "generative" and kernel in ("performer", "flash"):
        raise ScfmInputError(f"attention={kernel} cannot express scGPT's generative attention mask (unknown genes "
                             "see the known genes and themselves)", where="config groups attention + objective",
                             fix="use attention=flex, sdpa or eager with objective=generative")


def _objective_kind(cfg: DictConfig) -> str | None:
    """``mlm`` / ``generative`` / ``value_regression`` from objective._target_ (module or class name)."""
    target = str((cfg.get("objective") or {}).get("_target_") or "")
    module, _, cls = target.rpartition(".")
    if cls == "MaskedGeneModeling" or module.endswith(".mlm"):
        return "mlm"
    if "Generative" in cls or module.endswith(".generative"):
        return "generative"
    if "ValueRegression" in cls or module.endswith(".value_regression"):
        return "value_regression"
    return None


def _encoding_kind(cfg: DictConfig) -> str | None:
    """``rank`` / ``bin`` / ``continuous`` from encoding._target_'s class name."""
    cls = str(cfg.encoding.get("_target_") or "").rpartition(".")[2]
    return {"RankEncoding": "rank", "BinEncoding": "bin", "ContinuousEncoding": "continuous"}.get(cls)


def _check_objective_encoding(cfg: DictConfig) -> None:
    """Each pretraining objective reads one encoding's batches (generic: holds even where the class is absent)."""
    kind, encoding = _objective_kind(cfg), _encoding_kind(cfg)
    if kind is None or encoding is None:
        return
    need, what, options = _OBJECTIVE_NEEDS[kind]
    if encoding != need:
        raise ScfmInputError(f"objective={kind} {what} and needs encoding={need}, not encoding={encoding}",
                             where="config groups objective + encoding", fix=f"use {options} with objective={kind}")


def _objective_checks(cfg: DictConfig) -> None:
    """Run the objective class's own ``check_config(cfg)`` (a staticmethod), if it has one."""
    target = cfg.objective.get("_target_")
    if not target:
        return
    from hydra.utils import get_class

    try:
        objective = get_class(target)
    except (ImportError, AttributeError, ValueError) as e:
        reason = " ".join(str(e).split()[-12:])
        raise ScfmInputError(f"objective._target_={target} cannot be imported (... {reason})",
                             where="config group objective",
                             fix="pick an objective from conf/objective/*.yaml (objective=mlm, ...)") from None
    check = getattr(objective, "check_config", None)
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

    validate(cfg)
    return _build(cfg)


def _build(cfg: DictConfig) -> tuple[Any, Any]:
    """:func:`build` for a config that was validated already."""
    from hydra.utils import instantiate

    from scfm.objectives.base import data_facts

    datamodule = build_datamodule(cfg)
    vocab = datamodule.vocab
    facts = data_facts(vocab, datamodule.corpus.labels, datamodule.encoding)
    model_cfg = instantiate(cfg.model, vocab_size=len(vocab), pad_id=vocab.special_id("<pad>"),
                            conditions=list(cfg.data.get("conditions") or []), n_labels=facts["n_labels"])
    module = instantiate(cfg.objective, _convert_="all", model=dataclasses.asdict(model_cfg), data=facts)
    return datamodule, module


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

    _quiet_known_warnings()
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
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result = {"metrics": metrics, "checkpoint": str(out / "checkpoints" / "last.ckpt"), "loss_plot": str(plot.path),
              "metrics_csv": next((str(Path(lg.log_dir) / "metrics.csv") for lg in trainer.loggers
                                   if isinstance(lg, CSVLogger)), None),
              "output_dir": str(out)}
    if trainer.is_global_zero:
        _report(result)
    return result


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


def _quiet_known_warnings() -> None:
    """Silence third-party deprecation chatter that says nothing about the user's run."""
    import warnings

    warnings.filterwarnings("ignore", message=".*set_vital.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")  # ours is exact
    # our configure_gradient_clipping hands DeepSpeed runs to Lightning's default, so DeepSpeed clips as configured
    warnings.filterwarnings("ignore", message=".*Since DeepSpeed handles gradient clipping internally.*")


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
