"""Model bundles: a folder with everything needed to use a trained model on new cells, with no corpus at hand.

    model/
      config.yaml          format + version, architecture (kind + every config field), encoding (class + every
                           parameter), data facts (special-token ids, label counts), where it came from, and the
                           size + sha256 of every other file
      vocab.tsv            token id, gene id, symbol (special tokens first), as a corpus's
      labels.json          label vocabularies per role (batch, cell_type, ...), when the corpus had labels
      gene_medians.tsv     encoding=rank: gene id -> the median the encoding divided by
      gene_list.tsv        encoding=continuous: the gene list in layout order
      weights.safetensors  the architecture's parameters and buffers (``safetensors``; no pickle)

``scfm-train`` writes ``<output_dir>/model/`` at the end of every run (:func:`bundle_from_module`), and the
converters (``scfm-convert``) write the same. :func:`load_pretrained` reads a bundle, or a ``last.ckpt`` that
carries its vocabulary and encoding (checkpoints written by ``scfm-train`` do), and returns
``(backbone, encoding, vocab)``; the encoding is bound to the bundle's vocabulary and arrays, so new cells are
encoded exactly as in training.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from scfm.data.corpus import file_meta, sha256_file
from scfm.data.vocab import Vocab
from scfm.errors import ScfmInputError
from scfm.model import architecture_kind, build_architecture

__all__ = ["FORMAT", "VERSION", "Bundle", "bundle_from_module", "checkpoint_context", "load_pretrained",
           "read_bundle", "write_bundle"]

FORMAT = "scfm-bundle"
VERSION = 1
WEIGHTS = "weights.safetensors"
_ARRAY_FILES = {"gene_medians": "gene_medians.tsv", "gene_list": "gene_list.tsv"}
CHECKPOINT_KEY = "scfm_bundle"
"""Key of a Lightning checkpoint under which ``scfm-train`` stores the vocabulary and encoding."""


@dataclass
class Bundle:
    """A bundle read from disk: its ``config`` (config.yaml as a dict), vocabulary, labels and encoding arrays."""

    path: Path
    config: dict[str, Any]
    vocab: Vocab
    labels: dict[str, list[str]]
    arrays: dict[str, np.ndarray]

    @property
    def architecture(self) -> str:
        return self.config["architecture"]["kind"]

    def encoding(self, **fields: Any) -> Any:
        """The encoding of the bundle (``fields`` replaced, e.g. masking off for inference), bound to its vocabulary
        and arrays."""
        return encoding_from_spec({**self.config["encoding"], **fields}, self.vocab, self.arrays)

    def backbone(self, device: str | torch.device = "cpu", **fields: Any) -> nn.Module:
        """The architecture with the bundle's weights, in eval mode; ``fields``: config fields replaced (e.g. the
        attention kernel, the data facts ``scfm.model.complete_config`` fills in), the weights must still fit."""
        from safetensors.torch import load_model

        arch = self.config["architecture"]
        model = build_architecture(arch["kind"], {**arch["config"], **fields})
        try:
            load_model(model, str(self.path / WEIGHTS), strict=True, device=str(device))
        except Exception as err:  # names do not match the architecture: a bundle of another scfm version
            raise ScfmInputError(f"the weights do not fit the {arch['kind']} architecture of config.yaml: "
                                 f"{str(err).splitlines()[0][:300]}", where=str(self.path / WEIGHTS),
                                 fix="re-export the bundle with this scfm (scfm-train / scfm-convert)") from None
        return model.to(device).eval()


# ---------------------------------------------------------------- encodings


def encoding_spec(encoding: Any) -> dict[str, Any]:
    """``{"_target_": class path, **every init field}`` of an encoding dataclass."""
    cls = type(encoding)
    fields = {f.name: getattr(encoding, f.name) for f in dataclasses.fields(encoding) if f.init}
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **fields}


def encoding_from_spec(spec: dict[str, Any], vocab: Vocab, arrays: dict[str, np.ndarray]) -> Any:
    """The encoding of :func:`encoding_spec`, bound to ``vocab`` with ``arrays`` (no corpus)."""
    target = str(spec.get("_target_", ""))
    module, _, name = target.rpartition(".")
    if not module.startswith("scfm.encodings."):
        raise ScfmInputError(f"unknown encoding {target!r}", where="config.yaml: encoding",
                             fix="a bundle written by scfm-train / scfm-convert names an scfm.encodings class")
    cls = getattr(importlib.import_module(module), name)
    encoding = cls(**{k: v for k, v in spec.items() if k != "_target_"})
    return encoding.bind_arrays(vocab, arrays)


# ---------------------------------------------------------------- writing


def _write_arrays(folder: Path, arrays: dict[str, np.ndarray], vocab: Vocab) -> None:
    genes = np.asarray(list(vocab.specials) + list(vocab.gene_ids), dtype=object)
    for name, values in arrays.items():
        if name not in _ARRAY_FILES:
            raise ScfmInputError(f"the encoding's array {name!r} has no bundle file", where="write_bundle")
        values = np.asarray(values)
        path = folder / _ARRAY_FILES[name]
        if np.issubdtype(values.dtype, np.floating):  # a value per token id
            keep = np.flatnonzero(np.isfinite(values))
            lines = [f"{genes[i]}\t{float(values[i])!r}" for i in keep]
            path.write_text("gene_id\tvalue\n" + "".join(f"{line}\n" for line in lines))
        else:  # an ordered list of token ids
            path.write_text("gene_id\n" + "".join(f"{genes[i]}\n" for i in values))


def _read_arrays(folder: Path, config: dict[str, Any], vocab: Vocab) -> dict[str, np.ndarray]:
    arrays = {}
    for name in config.get("encoding_arrays", []):
        path = folder / _ARRAY_FILES[name]
        rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line]
        ids = vocab.lookup([r[0] for r in rows])
        if (ids < 0).any():
            missing = [r[0] for r, i in zip(rows, ids) if i < 0][:5]
            raise ScfmInputError(f"{path.name} names genes the bundle's vocabulary lacks: {missing}",
                                 where=str(path), fix="the bundle's files do not belong together; re-export it")
        if len(rows) and len(rows[0]) == 2:
            values = np.full(len(vocab), np.nan, dtype=np.float32)
            values[ids] = np.asarray([float(r[1]) for r in rows], dtype=np.float32)
            arrays[name] = values
        else:
            arrays[name] = ids
    return arrays


def write_bundle(folder: str | Path, model: nn.Module, encoding: Any, vocab: Vocab, data: dict[str, Any],
                 source: dict[str, Any], labels: dict[str, list[str]] | None = None) -> Path:
    """Write a bundle of ``model`` (an scfm architecture) and the bound ``encoding`` to ``folder``.

    The files go to ``<folder>.partial`` first, which replaces ``folder`` at the end (an existing bundle is kept
    whole until then)."""
    from safetensors.torch import save_model

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vocab.save(tmp / "vocab.tsv")
    arrays = encoding.bound_arrays()
    _write_arrays(tmp, arrays, vocab)
    if labels:
        (tmp / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    save_model(model, str(tmp / WEIGHTS), metadata={"format": FORMAT, "version": str(VERSION)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp / WEIGHTS, 0o666 & ~umask)  # safetensors writes 0600; the bundle's files share one mode
    from importlib.metadata import version

    config = {"format": FORMAT, "version": VERSION, "scfm_version": version("scfm"),
              "architecture": {"kind": architecture_kind(model), "config": dataclasses.asdict(model.config)},
              "encoding": encoding_spec(encoding), "encoding_arrays": sorted(arrays),
              "data": _plain(data), "source": _plain(source),
              "files": {p.name: file_meta(p) for p in sorted(tmp.iterdir())}}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _plain(obj: Any) -> Any:
    """``obj`` as YAML-safe plain types (tuples -> lists, numpy scalars -> Python)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# ---------------------------------------------------------------- reading


def read_bundle(path: str | Path) -> Bundle:
    """Read and check a bundle folder: every file present, whole and from a format this scfm reads."""
    folder = Path(path)
    fix = "give a folder written by scfm-train (<output_dir>/model) or scfm-convert"
    if not folder.is_dir():
        raise ScfmInputError("no model bundle here (not a folder)", where=str(folder), fix=fix)
    cfg_path = folder / "config.yaml"
    if not cfg_path.is_file():
        raise ScfmInputError("not a model bundle: config.yaml is missing", where=str(folder), fix=fix)
    try:
        config = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as err:
        raise ScfmInputError(f"config.yaml is not valid YAML ({str(err).splitlines()[0]})", where=str(cfg_path),
                             fix="the bundle is damaged; re-export it") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ScfmInputError(f"config.yaml is not an {FORMAT} config", where=str(cfg_path), fix=fix)
    version = config.get("version")
    if not isinstance(version, int) or version < 1:
        raise ScfmInputError(f"config.yaml has no valid format version ({version!r})", where=str(cfg_path), fix=fix)
    if version > VERSION:
        raise ScfmInputError(f"bundle format version {version} is newer than this scfm reads (version {VERSION})",
                             where=str(cfg_path), fix="upgrade scfm (pip install -U scfm) to read this bundle")
    files = config.get("files")
    missing = [k for k in ("architecture", "encoding", "files") if not isinstance(config.get(k), dict)]
    bad = [n for n, m in (files or {}).items() if not isinstance(m, dict) or not {"bytes", "sha256"} <= set(m)]
    unlisted = [_ARRAY_FILES.get(a, a) for a in config.get("encoding_arrays", []) if _ARRAY_FILES.get(a) not in
                (files or {})]
    if missing or bad or unlisted:
        what = "; ".join(p for p in (missing and f"no {', '.join(missing)} section",
                                     bad and f"no size / sha256 for {', '.join(bad)}",
                                     unlisted and f"{', '.join(unlisted)} not listed") if p)
        raise ScfmInputError(f"config.yaml is incomplete: {what}", where=str(cfg_path),
                             fix="the bundle was edited or damaged; re-export it")
    for name, meta in files.items():
        file = folder / name
        if not file.is_file():
            raise ScfmInputError(f"the bundle's {name} is missing", where=str(file),
                                 fix="copy the whole bundle folder, or re-export it")
        if file.stat().st_size != meta["bytes"]:
            raise ScfmInputError(f"{name} is truncated or changed: {file.stat().st_size:,} bytes, config.yaml says "
                                 f"{meta['bytes']:,}", where=str(file), fix="copy the bundle again, or re-export it")
        if sha256_file(file) != meta["sha256"]:
            raise ScfmInputError(f"{name} is corrupted: its sha256 differs from config.yaml's", where=str(file),
                                 fix="copy the bundle again, or re-export it")
    for name in ("vocab.tsv", WEIGHTS):
        if name not in (config.get("files") or {}):
            raise ScfmInputError(f"config.yaml lists no {name}", where=str(cfg_path), fix=fix)
    vocab = Vocab.load(folder / "vocab.tsv")
    labels = json.loads((folder / "labels.json").read_text()) if (folder / "labels.json").is_file() else {}
    return Bundle(folder, config, vocab, labels, _read_arrays(folder, config, vocab))


# ---------------------------------------------------------------- checkpoints and runs


def checkpoint_context(encoding: Any, vocab: Vocab, labels: dict[str, list[str]] | None = None,
                       source: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a Lightning checkpoint carries so that it can be used without its corpus (plain types, tensors):
    vocabulary, encoding (class, fields, bound arrays), label vocabularies and ``source`` (e.g. the corpus path)."""
    return {"vocab": vocab.to_dict(),
            "encoding": encoding_spec(encoding),
            "arrays": {k: torch.from_numpy(np.array(v)) for k, v in encoding.bound_arrays().items()},
            "labels": dict(labels or {}), "source": dict(source or {})}


def _context_encoding(context: dict[str, Any]) -> tuple[Any, Vocab]:
    """(the bound encoding, the vocabulary) a checkpoint context carries (:func:`checkpoint_context`)."""
    vocab = Vocab.from_dict(context["vocab"])
    arrays = {k: t.numpy() for k, t in context["arrays"].items()}
    return encoding_from_spec(context["encoding"], vocab, arrays), vocab


def _from_checkpoint(path: Path, device: str | torch.device) -> tuple[nn.Module, Any, Vocab]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or a pickle with code in it
        raise ScfmInputError(f"cannot read the checkpoint: {str(err).splitlines()[0][:200]}", where=str(path),
                             fix="give a last.ckpt written by scfm-train, or a bundle folder") from None
    context = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if not context:
        raise ScfmInputError("this checkpoint carries no vocabulary (written before model bundles, or not by "
                             "scfm-train)", where=str(path),
                             fix="use the run's bundle (<output_dir>/model), or train again with this scfm")
    encoding, vocab = _context_encoding(context)
    arch = context["architecture"]
    model = build_architecture(arch["kind"], arch["config"])
    prefix = context.get("prefix", "model.")
    state = {k[len(prefix):]: t for k, t in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), encoding, vocab


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, Vocab]:
    """``(backbone, encoding, vocab)`` from a bundle folder or an ``scfm-train`` checkpoint (``.ckpt``).

    The backbone is in eval mode on ``device``; the encoding is bound to the vocabulary, as in training.
    """
    path = Path(path)
    if path.is_file():
        return _from_checkpoint(path, device)
    bundle = read_bundle(path)
    return bundle.backbone(device), bundle.encoding(), bundle.vocab


def bundle_from_module(folder: str | Path, module: Any, source: dict[str, Any]) -> Path:
    """Write the bundle of a trained objective or task (its ``model`` and the context ``scfm-train`` gave it)."""
    context = module.bundle_context
    encoding, vocab = _context_encoding(context)
    source = {**context.get("source", {}), **source}
    return write_bundle(folder, module.model, encoding, vocab, dict(module.hparams.data), source, context["labels"])
