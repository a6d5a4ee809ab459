"""The ``scale`` config group: shrink any preset to a seconds-long run, keeping its recipe.

``conf/scale/<name>.yaml`` holds a *spec*, not overrides: a tree that mirrors the training config
(``model.layers``, ``encoding.max_len``, ``trainer.max_steps`` ...). :func:`apply_scale` copies each leaf of the
spec into the composed config **only where the config already has that field**. Architectures and encodings have
different fields (BERT has no ``decoder_layers``; the continuous encoding has no ``max_len``), and Hydra / the
``_target_`` classes refuse keys they do not know, so one spec fits every preset: what a preset lacks is skipped.

A value may interpolate the result (``limit_train_batches: ${trainer.max_steps}`` follows an explicit
``trainer.max_steps=20``). Reserved keys of a spec: ``name``; ``replace`` (``{dotted.path: {old: new}}``: a value
substituted only when the config holds ``old``, e.g. ``attention.kernel: {flash: sdpa}``: flash needs CUDA);
``applied`` (set by :func:`apply_scale`, so applying twice changes nothing).

Values the user gave explicitly on the command line win over the spec: ``scfm-train experiment=x scale=tiny
model.hidden=32`` keeps ``hidden=32`` (and a Hydra multirun over ``model.hidden=32,64`` really varies it).
The explicit overrides come from the ``overrides`` argument, else from the config's own ``hydra`` node
(``compose(..., return_hydra_config=True)``), else from the running Hydra app.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from scfm.errors import ScfmInputError

__all__ = ["RESERVED", "apply_scale", "explicit_keys"]

log = logging.getLogger(__name__)

RESERVED = ("name", "replace", "applied")


def explicit_keys(overrides: Sequence[str]) -> set[str]:
    """Dotted config keys set by value overrides (``model.hidden=32``, ``+a.b=1``, ``++a.b=1``, ``~a.b``).

    Group overrides (``model=bert_tiny``) name a group, not a value: they do not protect the group's fields.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys: set[str] = set()
    for override in OverridesParser.create().parse_overrides([str(o) for o in overrides]):
        key = override.key_or_group
        if "." in key:  # a group name has no dot; a value path into a group node has one
            keys.add(key.split("@", 1)[0])
    return keys


def _task_overrides(cfg: DictConfig) -> list[str]:
    """The command-line overrides of this run: the config's ``hydra`` node, else the running Hydra app."""
    hydra_node = cfg.get("hydra") if isinstance(cfg, DictConfig) else None
    if hydra_node is not None and OmegaConf.select(hydra_node, "overrides.task") is not None:
        return list(hydra_node.overrides.task)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return []


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf of a spec; lists are leaves."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _has_field(cfg: DictConfig, path: str) -> bool:
    """True if ``path``'s parent node exists in ``cfg`` and holds the key (its value may be null or missing)."""
    parent, _, key = path.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    return isinstance(node, DictConfig) and key in node


def apply_scale(cfg: DictConfig, overrides: Sequence[str] | None = None) -> DictConfig:
    """A copy of ``cfg`` with its ``scale`` spec applied (see the module docstring); ``cfg`` itself is unchanged.

    Without a ``scale`` node, or when it was applied already, returns ``cfg`` as is. ``overrides``: the run's
    command-line overrides (explicit values are kept); None = read them from the config's ``hydra`` node or the
    running Hydra app.
    """
    spec = cfg.get("scale") if isinstance(cfg, DictConfig) else None
    if spec is None:
        return cfg
    if not isinstance(spec, DictConfig):
        raise ScfmInputError(f"scale must be a mapping (a conf/scale/<name>.yaml), not {spec!r}", where="scale",
                             fix="use scale=tiny (or another file of conf/scale/), or leave scale out")
    if spec.get("applied", False):
        return cfg
    keep = explicit_keys(_task_overrides(cfg) if overrides is None else overrides)
    out = copy.deepcopy(cfg)
    changed: dict[str, tuple[Any, Any]] = {}
    with open_dict(out):
        raw_spec = OmegaConf.to_container(spec, resolve=False)  # "${trainer.max_steps}" stays an interpolation
        body = {k: v for k, v in raw_spec.items() if k not in RESERVED}
        for path, value in _leaves(body):
            if path in keep or not _has_field(out, path):
                continue
            old = OmegaConf.select(out, path, throw_on_missing=False)
            OmegaConf.update(out, path, value, merge=False)
            if old != value:
                changed[path] = (old, value)
        for path, mapping in (raw_spec.get("replace") or {}).items():
            if path in keep or not _has_field(out, path):
                continue
            node = OmegaConf.select(out, path.rpartition(".")[0]) if "." in path else out
            key = path.rpartition(".")[2]
            raw = node._get_node(key)._value()  # unresolved: leave interpolations such as ${attention.kernel} alone
            if isinstance(raw, str) and raw in mapping:
                OmegaConf.update(out, path, mapping[raw], merge=False)
                changed[path] = (raw, mapping[raw])
        out.scale.applied = True
    name = spec.get("name", "?")
    log.info("scale=%s: %s", name, ", ".join(f"{p}: {a} -> {b}" for p, (a, b) in changed.items()) or "no change")
    if keep:
        log.info("scale=%s kept the explicit overrides of %s", name, ", ".join(sorted(keep)))
    return out
