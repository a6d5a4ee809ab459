"""``validate(cfg)``: check a composed ``scfm-train`` config before any data is read.

Errors name the config groups in conflict and a valid alternative. Hardware (CUDA, bf16, optional packages) is
checked against the machine this runs on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scfm.errors import ScfmInputError

__all__ = ["PRECISIONS", "PrecisionNode", "StrategyNode", "validate"]

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
                             fix="call scfm.config.scale.apply_scale(cfg) first (scfm-train and train() do)")
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
