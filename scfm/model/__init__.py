"""Model parts: attention kernels (``attention``), shared blocks, embeddings, and the three architectures.

Public API: the architectures ``bert`` (:class:`~scfm.model.bert.BertForMaskedGeneModeling`), ``scgpt``
(:class:`~scfm.model.scgpt.ScGPTModel`) and ``xtrimo`` (:class:`~scfm.model.xtrimo.XtrimoModel`), each built from
its config dataclass; :data:`ARCHITECTURES` names them, :func:`build_architecture` builds one from plain fields and
:func:`architecture_kind` says which a config or model is. The model package knows no data and no command line.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from torch import nn

from scfm.errors import ScfmInputError

__all__ = ["ARCHITECTURES", "architecture_kind", "build_architecture"]

ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "bert": ("scfm.model.bert", "BertConfig", "BertForMaskedGeneModeling"),
    "scgpt": ("scfm.model.scgpt", "ScGPTConfig", "ScGPTModel"),
    "xtrimo": ("scfm.model.xtrimo", "XtrimoConfig", "XtrimoModel"),
}
"""Architecture name -> (module, config class, model class)."""


def _classes(kind: str) -> tuple[type, type]:
    if kind not in ARCHITECTURES:
        raise ScfmInputError(f"unknown architecture {kind!r}", where="model",
                             fix=f"use one of: {', '.join(ARCHITECTURES)}")
    module, config, model = ARCHITECTURES[kind]
    mod = importlib.import_module(module)
    return getattr(mod, config), getattr(mod, model)


def architecture_kind(obj: Any) -> str:
    """``bert`` / ``scgpt`` / ``xtrimo`` of a config dataclass, a model, or a config class path (``_target_``)."""
    names = {obj} if isinstance(obj, str) else {type(obj).__name__, type(getattr(obj, "config", None)).__name__}
    for kind, (module, config, model) in ARCHITECTURES.items():
        if names & {config, model, f"{module}.{config}", f"{module}.{model}"}:
            return kind
    raise ScfmInputError(f"not an scfm architecture: {obj if isinstance(obj, str) else type(obj).__name__}",
                         where="model", fix=f"use one of: {', '.join(ARCHITECTURES)}")


def build_architecture(kind: str, fields: dict[str, Any]) -> nn.Module:
    """The ``kind`` model built from its config's fields (randomly initialised)."""
    config_cls, model_cls = _classes(kind)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ScfmInputError(f"{kind} has no config field(s) {unknown}", where="model",
                             fix="the bundle or checkpoint comes from another scfm version; re-export it")
    return model_cls(config_cls(**fields))
