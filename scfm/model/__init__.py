"""Model parts: attention kernels (``attention``), shared blocks, embeddings, and the three architectures.

Public API: the architectures ``bert`` (:class:`~scfm.model.bert.BertForMaskedGeneModeling`), ``scgpt``
(:class:`~scfm.model.scgpt.ScGPTModel`) and ``xtrimo`` (:class:`~scfm.model.xtrimo.XtrimoModel`), each built from
its config dataclass; :data:`ARCHITECTURES` names them, :func:`complete_config` fills in the fields that come from
the data (from a plain dict of data facts), :func:`build_architecture` builds one from plain fields and
:func:`architecture_kind` says which a config or model is. The model package knows no data and no command line.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from scfm.errors import ScfmInputError

__all__ = ["ARCHITECTURES", "Architecture", "architecture_kind", "build_architecture", "complete_config",
           "encoder_layers"]


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


def complete_config(kind: str, fields: Mapping[str, Any], data: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``fields`` (a ``kind`` config's) with what comes from the data filled in, where unset.

    ``data``: plain facts about the corpus and encoding (``scfm.objectives.base.data_facts``; None: nothing to
    fill). bert: ``first_gene_id`` (tells genes from specials); scgpt: ``cls_id`` (where the vocabulary has
    ``<cls>``); xtrimo: ``max_seq_len`` from the cells' length ``max_len``, which must fit a set ``max_seq_len``.
    """
    out, data = dict(fields), dict(data or {})
    if kind == "bert" and out.get("first_gene_id") is None and data.get("first_gene_id") is not None:
        out["first_gene_id"] = int(data["first_gene_id"])
    elif kind == "scgpt" and out.get("cls_id") is None and int(data.get("cls_id", -1)) >= 0:
        out["cls_id"] = int(data["cls_id"])
    elif kind == "xtrimo":
        max_len = data.get("max_len")
        if out.get("max_seq_len") is None:
            if max_len is None:
                raise ScfmInputError("model.max_seq_len is null and the data does not say the cells' length",
                                     where="model.max_seq_len", fix="set model.max_seq_len to n_genes + 2")
            out["max_seq_len"] = int(max_len)
        elif max_len is not None and max_len > out["max_seq_len"]:
            raise ScfmInputError(f"cells have {max_len} tokens (the gene list + T, S) but model.max_seq_len="
                                 f"{out['max_seq_len']}", where="config groups model + encoding",
                                 fix=f"set model.max_seq_len>={max_len} or null (sized from the data), or a shorter "
                                     "encoding.gene_list")
    return out


def build_architecture(kind: str, fields: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> nn.Module:
    """The ``kind`` model built from its config's fields (randomly initialised); with ``data`` (data facts), the
    fields are first completed from them (:func:`complete_config`)."""
    if data is not None:
        fields = complete_config(kind, fields, data)
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
