"""Converters from published checkpoint layouts to scfm models: ``geneformer`` (HF BERT), ``scgpt``,
``scfoundation``. They know no command line (``scfm.cli.convert`` holds the sub-commands).

Shared here: scfm's converted-model file (:func:`save_payload` / :func:`load_payload`, a ``torch.save`` of plain
dicts, tensors and strings that ``torch.load(weights_only=True)`` reads) and its vocabulary entry.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from scfm.data.vocab import Vocab
from scfm.errors import ScfmInputError

M = TypeVar("M", bound=nn.Module)


def as_vocab(vocab: Vocab | str | Path) -> Vocab:
    """A :class:`Vocab` from itself, a ``vocab.tsv`` / token-dictionary ``.json`` or a corpus folder."""
    if isinstance(vocab, Vocab):
        return vocab
    path = Path(vocab)
    return Vocab.load(path / "vocab.tsv" if path.is_dir() else path)


def vocab_to_dict(vocab: Vocab | None, symbols: bool = False) -> dict[str, list[str]] | None:
    """``{"specials", "gene_ids"[, "symbols"]}`` (missing symbols as ``""``) of ``vocab``; None for None."""
    if vocab is None:
        return None
    out = {"specials": list(vocab.specials), "gene_ids": list(vocab.gene_ids)}
    if symbols:
        out["symbols"] = [s or "" for s in vocab.symbols]
    return out


def vocab_from_dict(v: Mapping[str, Any] | None) -> Vocab | None:
    """The :class:`Vocab` of :func:`vocab_to_dict`'s dict (symbols ``""`` -> None); None for None."""
    if v is None:
        return None
    return Vocab(tuple(v["specials"]), list(v["gene_ids"]), [s or None for s in v.get("symbols", [])])


def save_payload(path: str | Path, fmt: str, config: Any, state_dict: Mapping[str, Tensor], source: str = "",
                 extra: Mapping[str, Any] | None = None, vocab: Vocab | None = None, *,
                 suffixes: tuple[str, ...] = (".pt", ".pth"), folder: bool = True) -> Path:
    """``torch.save`` ``{"format": fmt, **extra, "config", "state_dict", "source"}`` (``config`` a dataclass).

    ``path`` ending in one of ``suffixes`` (or any ``path`` when not ``folder``): that one file. Otherwise a folder
    with ``model.pt`` (the same dict), ``config.json`` and, when ``vocab`` is given, ``vocab.tsv``. Returns the
    file written by ``torch.save``.
    """
    path = Path(path)
    payload = {"format": fmt, **(extra or {}), "config": dataclasses.asdict(config),
               "state_dict": {k: v.detach().contiguous() for k, v in state_dict.items()}, "source": str(source)}
    file = path if not folder or path.suffix in suffixes else path / "model.pt"
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, file)
    if file != path:
        (path / "config.json").write_text(json.dumps(payload["config"], indent=2) + "\n")
        if vocab is not None:
            vocab.save(path / "vocab.tsv")
    return file


def load_payload(path: str | Path, fmt: str, command: str) -> dict[str, Any]:
    """The dict :func:`save_payload` wrote to ``path`` (a file, or a folder's ``model.pt``), read with
    ``weights_only=True``; a :class:`ScfmInputError` naming ``command`` (the writer) if absent or not ``fmt``."""
    path = Path(path)
    file = path / "model.pt" if path.is_dir() else path
    if not file.is_file():
        raise ScfmInputError("no converted model here", where=str(file), fix=f"run {command} first")
    payload = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ScfmInputError(f"not a {fmt} file", where=str(file), fix=f"write it with {command}")
    return payload


def build_model(payload: Mapping[str, Any], config_cls: type, model_cls: type[M], **overrides: Any) -> M:
    """``model_cls(config_cls(**payload["config"]))`` with the payload's weights (strict), in eval mode; config
    fields in ``overrides`` replace the stored ones unless None."""
    config = config_cls(**{**payload["config"], **{k: v for k, v in overrides.items() if v is not None}})
    model = model_cls(config)
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval()


def write_converted_bundle(folder: str | Path, model: nn.Module, encoding: Any, vocab: Vocab,
                           source: Mapping[str, Any]) -> Path:
    """Write a converted model as a model bundle (``scfm.bundle``), with the encoding its recipe uses; config fields
    that come from the data (``first_gene_id``, ``cls_id``) are filled in from ``vocab`` first."""
    from scfm.bundle import write_bundle
    from scfm.model import architecture_kind, complete_config
    from scfm.objectives.base import data_facts

    facts = data_facts(vocab, None, encoding)
    for key, value in complete_config(architecture_kind(model), dataclasses.asdict(model.config), facts).items():
        setattr(model.config, key, value)
    return write_bundle(folder, model.eval(), encoding, vocab, facts, {"kind": "scfm-convert", **source})
