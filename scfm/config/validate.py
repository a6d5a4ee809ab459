"""``validate(cfg)``: check a composed ``scfm-train`` config before any data is read.

Errors name the config groups in conflict and a valid alternative. Hardware (CUDA, bf16, optional packages) is
checked against the machine this runs on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
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


def validate(cfg: DictConfig) -> None:
    """Check combinations of config groups before any data is read; errors name the groups in conflict.

    The rules are generic, over what the parts declare: the objective's or task's ``NEEDS`` (encoding kinds,
    architectures, attention masks, a bundle), the encoding's ``kind``, the architecture's entry in
    ``scfm.model.ARCHITECTURES`` (packed batches) and the attention kernel's ``KernelSpec`` (masks, CUDA, packages).
    Hardware is checked against the machine this runs on; each message gives a valid alternative. The model config
    is built (with placeholder sizes) so its own checks run here too. A module may add rules of its own in a static
    ``check_config(cfg)``, which runs last.
    """
    if cfg.get("scale") is not None and not cfg.scale.get("applied", False):
        raise ScfmInputError(f"scale={cfg.scale.get('name')} is in the config but was not applied", where="scale",
                             fix="call scfm.scale.apply_scale(cfg) first (scfm-train and train() do)")
    strategy = _typed(cfg.get("strategy") or {}, StrategyNode, "strategy")
    _typed(cfg.get("precision") or {}, PrecisionNode, "precision")
    _check_hardware(cfg, strategy)
    parts = _parts(cfg)
    _check_kernel(cfg, parts)
    _check_needs(cfg, parts)
    _check_model_config(cfg, parts)
    max_len, positions = cfg.encoding.get("max_len"), cfg.model.get("max_position")
    if parts.bundle is None and max_len is not None and positions is not None and max_len > positions:
        raise ScfmInputError(f"encoding.max_len={max_len} exceeds model.max_position={positions}",
                             where="config groups encoding + model",
                             fix=f"set encoding.max_len<={positions} or model.max_position>={max_len}")
    _check_conditions(cfg)
    check = getattr(parts.module, "check_config", None)
    if check is not None:
        check(cfg)


@dataclass
class Parts:
    """The classes and names a config resolves to (nothing built, no data read)."""

    group: str  # objective or task
    module: type  # the LightningModule class
    name: str  # the option name (objective=<name> / task=<name>)
    encoding: str | None  # encoding kind
    architecture: str | None  # architecture kind
    kernel: str | None  # attention kernel name
    bundle: Any = None  # the pretrained bundle, read (config + vocabulary), when pretrained= is set


def _parts(cfg: DictConfig) -> Parts:
    from hydra.utils import get_class

    from scfm.model import architecture_kind

    task = cfg.get("task")
    group, node = ("task", task) if task else ("objective", cfg.objective)
    target = str(node.get("_target_") or "")
    try:
        module = get_class(target)
    except (ImportError, AttributeError, ValueError) as e:
        reason = " ".join(str(e).split()[-12:])
        raise ScfmInputError(f"{group}._target_={target} cannot be imported (... {reason})",
                             where=f"config group {group}",
                             fix=f"pick one of conf/{group}/*.yaml ({_options(group)})") from None
    bundle = None
    if cfg.get("pretrained"):
        from scfm.bundle import read_bundle

        bundle = read_bundle(cfg.pretrained)  # the model's files (no data): clear errors when damaged
        encoding = get_class(bundle.config["encoding"]["_target_"]).kind
        arch = bundle.architecture
    else:
        encoding_target = cfg.encoding.get("_target_")
        encoding = getattr(get_class(str(encoding_target)), "kind", None) if encoding_target else None
        arch = architecture_kind(str(cfg.model._target_)) if cfg.model.get("_target_") else None
    kernel = cfg.model.get("attention") or (cfg.get("attention") or {}).get("kernel")
    return Parts(group, module, getattr(module, "NAME", "") or target.rsplit(".", 1)[-1], encoding, arch,
                 None if kernel is None else str(kernel), bundle)


def _options(group: str, kinds: tuple[str, ...] = ()) -> str:
    """``group=a or group=b``: the files of ``conf/<group>/`` (those whose class is of one of ``kinds``, if given)."""
    from scfm.config import conf_dir

    files = sorted((Path(conf_dir()) / group).glob("*.yaml"))
    names = [p.stem for p in files if not kinds or _kind_of(group, p) in kinds]
    return " or ".join(f"{group}={n}" for n in names)


def _kind_of(group: str, path: Path) -> str | None:
    """The encoding or architecture kind of a config file (one that only extends another: the other's)."""
    from hydra.utils import get_class

    from scfm.model import architecture_kind

    node = OmegaConf.load(path)
    target = node.get("_target_")
    for base in ([] if target else node.get("defaults", []) or []):
        if isinstance(base, str) and base != "_self_" and (path.parent / f"{base}.yaml").is_file():
            target = OmegaConf.load(path.parent / f"{base}.yaml").get("_target_")
    if not target:
        return None
    return architecture_kind(str(target)) if group == "model" else getattr(get_class(str(target)), "kind", None)


def _check_needs(cfg: DictConfig, parts: Parts) -> None:
    """The objective's / task's declared needs against the encoding, the architecture and the bundle."""
    needs = getattr(parts.module, "NEEDS", None)
    if needs is None:
        return
    who = f"{parts.group}={parts.name}"
    bundle = parts.bundle
    if bundle is not None:
        theirs = list(bundle.config["architecture"]["config"].get("conditions") or [])
        ours = list((cfg.get("data") or {}).get("conditions") or [])
        if sorted(theirs) != sorted(ours):
            raise ScfmInputError(f"the model was pretrained with data.conditions={theirs}, this run has {ours}",
                                 where="config groups pretrained + data",
                                 fix=f"set data.conditions=[{','.join(theirs)}] (on a corpus with those labels)")
    if bundle is not None and needs.encodings and parts.encoding not in needs.encodings:
        raise ScfmInputError(f"{who} {needs.what} and needs encoding={' or '.join(needs.encodings)}, but the model "
                             f"in pretrained= reads encoding={parts.encoding}",
                             where=f"config groups {parts.group} + pretrained",
                             fix=f"use a bundle trained on encoding={' or '.join(needs.encodings)}, or an "
                                 f"{parts.group} that fits this one")
    needs.check_encoding(who, parts.encoding, where=f"config groups {parts.group} + encoding",
                         fix=f"use {_options('encoding', needs.encodings)} with {who}")
    if needs.architectures and parts.architecture not in needs.architectures:
        from scfm.model import ARCHITECTURES

        names = " / ".join(ARCHITECTURES[a].description for a in needs.architectures)
        if bundle is not None:
            raise ScfmInputError(f"{who} trains the {names} architecture, the model in pretrained= is "
                                 f"{parts.architecture}", where=f"config groups {parts.group} + pretrained",
                                 fix=f"use a {' or '.join(needs.architectures)} bundle, or an {parts.group} that "
                                     "fits this one")
        raise ScfmInputError(f"{who} trains the {names} architecture, not {parts.architecture}",
                             where=f"config groups {parts.group} + model",
                             fix=f"use {_options('model', needs.architectures)}")
    batching = cfg.get("batching") or {}
    if parts.architecture is not None and batching.get("strategy") == "packed":
        from scfm.model import ARCHITECTURES

        if not ARCHITECTURES[parts.architecture].packed:
            raise ScfmInputError(f"model={parts.architecture} takes padded batches, not packed ones",
                                 where="config groups model + batching",
                                 fix="use batching=random (continuous cells all have the same length: nothing is "
                                     "padded)")


def _check_kernel(cfg: DictConfig, parts: Parts) -> None:
    """The attention kernel's declared capabilities against the machine and the masks the run needs."""
    from scfm.model.attention import SPECS, kernel_problem

    kernel = parts.kernel
    if kernel is None or kernel not in SPECS:
        return  # an unknown name is refused by the model config, with the valid names
    needs = getattr(parts.module, "NEEDS", None)
    masks = set(needs.masks) if needs is not None else set()
    device = _device_type(cfg)
    hardware = kernel_problem(kernel, needs=set(), device_type=device)
    if hardware:
        raise ScfmInputError(f"{hardware} ({SPECS[kernel].description})",
                             where="config groups attention + trainer",
                             fix="use attention=sdpa (or flex) here; on a CUDA machine pip install 'scfm[gpu]'")
    problem = kernel_problem(kernel, needs=masks, device_type=device)
    if problem:
        serve = [k for k in SPECS if not kernel_problem(k, needs=masks, device_type=device)]
        what = " and ".join(sorted(masks))
        raise ScfmInputError(f"attention={kernel} cannot express the {what} attention mask of {parts.group}="
                             f"{parts.name} ({problem})", where=f"config groups attention + {parts.group}",
                             fix=f"use attention={' or attention='.join(serve)} with {parts.group}={parts.name}")


def _check_model_config(cfg: DictConfig, parts: Parts) -> None:
    """Build the model config with placeholder sizes, so its own checks (heads dividing hidden, ...) run now."""
    if parts.bundle is not None or not cfg.model.get("_target_"):
        return
    from hydra.utils import get_class

    conditions = list((cfg.get("data") or {}).get("conditions") or [])
    n_labels = {role: 2 for role in conditions}  # sized from the corpus at build time
    fields = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"}
    fields |= {"vocab_size": 64, "pad_id": 0, "conditions": conditions, "n_labels": n_labels}
    get_class(str(cfg.model._target_))(**fields)  # called directly: Hydra's instantiate would wrap our error


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
