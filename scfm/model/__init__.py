"""Model parts: attention kernels (``attention``), shared blocks, embeddings, and the three architectures.

Public API: the architectures ``bert`` (:class:`~scfm.model.bert.BertForMaskedGeneModeling`), ``scgpt``
(:class:`~scfm.model.scgpt.ScGPTModel`) and ``xtrimo`` (:class:`~scfm.model.xtrimo.XtrimoModel`), each built from
its config dataclass; :data:`ARCHITECTURES` names them, :func:`build_architecture` builds one from plain fields and
:func:`architecture_kind` says which a config or model is. The model package knows no data and no command line.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

from torch import nn

from scfm.errors import ScfmInputError

__all__ = ["ARCHITECTURES", "Architecture", "architecture_kind", "build_architecture", "encoder_layers"]


@dataclass(frozen=True)
class Architecture:
    """What an architecture is and offers, for building it and for validation (which reads these flags)."""

    module: str
    config: str  # config dataclass name
    model: str  # model class name
    layers: str  # attribute path of its transformer layers (an nn.ModuleList), for freezing
    packed: bool  # takes packed batches (several cells per row)
    description: str


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("scfm.model.bert", "BertConfig", "BertForMaskedGeneModeling", "encoder.layer", True,
                         "BERT encoder (Geneformer)"),
    "scgpt": Architecture("scfm.model.scgpt", "ScGPTConfig", "ScGPTModel", "transformer_encoder.layers", True,
                          "scGPT transformer with value embeddings"),
    "xtrimo": Architecture("scfm.model.xtrimo", "XtrimoConfig", "XtrimoModel", "encoder.layers", False,
                           "xTrimoGene / scFoundation encoder-decoder"),
}
"""Architecture name -> its :class:`Architecture`."""


def _classes(kind: str) -> tuple[type, type]:
    if kind not in ARCHITECTURES:
        raise ScfmInputError(f"unknown architecture {kind!r}", where="model",
                             fix=f"use one of: {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[kind]
    mod = importlib.import_module(spec.module)
    return getattr(mod, spec.config), getattr(mod, spec.model)


def architecture_kind(obj: Any) -> str:
    """``bert`` / ``scgpt`` / ``xtrimo`` of a config dataclass, a model, or a config class path (``_target_``)."""
    names = {obj} if isinstance(obj, str) else {type(obj).__name__, type(getattr(obj, "config", None)).__name__}
    for kind, a in ARCHITECTURES.items():
        if names & {a.config, a.model, f"{a.module}.{a.config}", f"{a.module}.{a.model}"}:
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


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of an architecture, first to last (what ``freeze_layers`` counts)."""
    layers: Any = model
    for part in ARCHITECTURES[architecture_kind(model)].layers.split("."):
        layers = getattr(layers, part)
    return layers
