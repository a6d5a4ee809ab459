"""scGPT checkpoints (``best_model.pt`` + ``args.json`` + ``vocab.json``) -> :class:`~scfm.model.scgpt.ScGPTModel`.

Weights. :mod:`scfm.model.scgpt` keeps scGPT's parameter names, so converting is: drop a DDP ``module.`` prefix;
rename flash-attention's packed projection ``self_attn.Wqkv.{weight,bias}`` (``FlashMHA`` / ``FlashscGPTMHA``;
rows laid out ``(three h d)``: q, k, v, each head-major, exactly ``nn.MultiheadAttention``'s ``in_proj``) to
``self_attn.in_proj_{weight,bias}``; re-order the gene-embedding rows to scfm's token ids (below). The config
comes from ``args.json`` (``embsize``, ``nlayers``, ``nheads``, ``d_hid``, ``dropout``, ``n_bins``,
``input_emb_style``, ``input_style``, ``pad_value``, ``pre_norm``, ...) and from which optional modules the state
dict holds (``mvc_decoder``, ``decoder.zero_logit``, ``dsbn``, ``bn``, ``batch_encoder``,
``grad_reverse_discriminator``, ``cls_decoder``, ``pert_encoder``). Checkpoints trained generatively
(``USE_GENERATIVE_TRAINING`` / ``training_tasks`` gen or both) get ``unknown_out_proj=False``: scGPT's
``FlashscGPTMHA`` leaves unknown genes' attention output without ``out_proj`` (see ``scfm.model.scgpt``).
``flag_encoder`` is absent from checkpoints trained without generative training: it is then freshly initialised
(it only matters for generation) and reported. Any other unexpected or missing key raises
:class:`~scfm.errors.ScfmInputError` naming it.

Token ids. scGPT's ``vocab.json`` maps tokens to ids with its special tokens (``<pad>``, ``<cls>``, ``<eoc>``,
sometimes more) wherever they were appended (the whole-human vocabulary has them last). scfm's :class:`Vocab`
puts special tokens first with ``<pad>`` = 0, so the converted vocabulary is: ``<pad>``, then scGPT's other
``<...>`` tokens in scGPT id order, then the genes (gene symbols, kept as ``gene_ids`` and ``symbols``) in scGPT
id order; ``encoder.embedding.weight`` rows are permuted to match (``scgpt_vocab`` returns the permutation).
To run on a corpus with its own vocabulary (scfm keys genes by Ensembl id, with symbols alongside), pass it to
:func:`remap_vocab` / ``load_scgpt(vocab=...)``: genes are matched by symbol (then by id), genes scGPT never saw
get fresh rows.

"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from scfm.convert import as_vocab, build_model, load_payload, save_payload, vocab_from_dict, vocab_to_dict
from scfm.data.vocab import Vocab
from scfm.encodings.bin import BinEncoding
from scfm.errors import ScfmInputError
from scfm.model.scgpt import ScGPTConfig, ScGPTModel

__all__ = [
    "FORMAT",
    "config_from_args",
    "convert_scgpt",
    "load_converted",
    "load_scgpt",
    "read_scgpt_folder",
    "remap_vocab",
    "save_converted",
    "scgpt_vocab",
]

FORMAT = "scfm.scgpt/1"
"""``format`` field of files written by :func:`save_converted`."""

_GENE_EMB = "encoder.embedding.weight"
_OPTIONAL_MISSING = ("flag_encoder.weight",)


# ---------------------------------------------------------------- vocabulary


def scgpt_vocab(vocab: Mapping[str, int]) -> tuple[Vocab, np.ndarray]:
    """scfm :class:`Vocab` of an scGPT ``vocab.json`` and ``perm`` with ``perm[scfm id] = scGPT id``."""
    items = sorted(((int(i), str(t)) for t, i in vocab.items()), key=lambda x: x[0])
    if [i for i, _ in items] != list(range(len(items))):
        raise ScfmInputError("vocab.json ids are not 0..n-1", where="vocab.json",
                             fix="give the vocab.json saved with the checkpoint")
    if "<pad>" not in vocab:
        raise ScfmInputError("vocab.json has no <pad> token", where="vocab.json")
    special = [(i, t) for i, t in items if re.fullmatch(r"<[^<>]+>", t)]
    special = [(int(vocab["<pad>"]), "<pad>")] + [(i, t) for i, t in special if t != "<pad>"]
    genes = [(i, t) for i, t in items if not re.fullmatch(r"<[^<>]+>", t)]
    perm = np.array([i for i, _ in special] + [i for i, _ in genes], dtype=np.int64)
    symbols = [t for _, t in genes]
    return Vocab(tuple(t for _, t in special), symbols, list(symbols)), perm


def remap_vocab(config: ScGPTConfig, state_dict: Mapping[str, Tensor], source: Vocab, target: Vocab,
                seed: int = 0) -> tuple[ScGPTConfig, dict[str, Tensor], dict[str, int]]:
    """Re-index the gene embedding from ``source`` (the converted scGPT vocabulary, symbols) to ``target``.

    Special tokens match by name; a target gene matches a source gene by its symbol, else by its id. Unmatched
    target tokens get rows drawn from U(-0.1, 0.1) (scGPT's init, seeded). Returns the new config
    (``vocab_size``, ``pad_id``, ``cls_id``), state dict and counts ``{"kept", "new", "dropped"}``.
    """
    if len(source) != config.vocab_size:
        raise ScfmInputError(f"source vocabulary has {len(source)} tokens, the model {config.vocab_size}",
                             where="remap_vocab", fix="pass the vocabulary converted with the checkpoint")
    by_name = {g: i + source.n_special for i, g in enumerate(source.gene_ids)}
    index = np.full(len(target), -1, dtype=np.int64)
    for i, tok in enumerate(target.specials):
        if tok in source.specials:
            index[i] = source.specials.index(tok)
    for j, (gene, symbol) in enumerate(zip(target.gene_ids, target.symbols)):
        hit = by_name.get(symbol) if symbol else None
        index[target.n_special + j] = hit if hit is not None else by_name.get(gene, -1)
    idx = torch.from_numpy(index)
    have = idx >= 0
    emb = state_dict[_GENE_EMB]
    gen = torch.Generator().manual_seed(seed)
    new = (torch.rand(len(target), emb.shape[1], generator=gen) * 0.2 - 0.1).to(emb.dtype)
    new[have] = emb[idx[have]]
    out = dict(state_dict)
    out[_GENE_EMB] = new
    cls_id = target.special_id("<cls>") if "<cls>" in target.specials else None
    new_config = dataclasses.replace(config, vocab_size=len(target), pad_id=target.special_id("<pad>"), cls_id=cls_id)
    kept = int(have.sum())
    return new_config, out, {"kept": kept, "new": len(target) - kept, "dropped": len(source) - kept}


# ---------------------------------------------------------------- config + weights


def _arg(args: Mapping[str, Any], *names: str, default: Any = ...) -> Any:
    for name in names:
        if name in args and args[name] is not None:
            return args[name]
    if default is ...:
        raise ScfmInputError(f"args.json has no {' / '.join(map(repr, names))}", where="args.json",
                             fix="give the args.json saved with the checkpoint")
    return default


def _mlp_depth(state: Mapping[str, Tensor], prefix: str) -> int:
    """Number of Linear layers of an scGPT ``_decoder`` list + its ``out_layer``."""
    linears = {k.split(".")[2] for k in state if k.startswith(prefix + "._decoder.") and k.endswith(".weight")
               and state[k].dim() == 2}
    return len(linears) + 1


def config_from_args(args: Mapping[str, Any], state: Mapping[str, Tensor], vocab: Vocab,
                     attention: str = "sdpa") -> ScGPTConfig:
    """Our :class:`ScGPTConfig` for an scGPT ``args.json`` and (converted-name) state dict."""
    style = _arg(args, "input_emb_style", default="continuous")
    if style not in ("continuous", "category"):
        raise ScfmInputError(f"input_emb_style {style!r} has no scfm equivalent", where="args.json:input_emb_style",
                             fix="scfm supports scGPT's continuous and category value encoders")
    input_style = _arg(args, "input_style", default="binned")
    mvc_style = _arg(args, "mvc_decoder_style", default="inner product")
    if any(k.startswith("mvc_decoder.fc1") for k in state) or mvc_style not in ("inner product",
                                                                               "inner product, detach"):
        raise ScfmInputError(f"MVC decoder style {mvc_style!r} is not supported", where="args.json:mvc_decoder_style",
                             fix="scfm implements scGPT's default 'inner product' MVC decoder")
    n_labels: dict[str, int] = {}
    conditions: list[str] = []
    if "grad_reverse_discriminator.out_layer.weight" in state:
        n_labels["batch"] = int(state["grad_reverse_discriminator.out_layer.weight"].shape[0])
    dsbn = sorted({int(k.split(".")[2]) for k in state if k.startswith("dsbn.bns.")})
    if dsbn:
        n_labels["batch"] = len(dsbn)
    if "batch_encoder.embedding.weight" in state:
        n_labels["batch"] = int(state["batch_encoder.embedding.weight"].shape[0])
    if n_labels:
        conditions.append("batch")
    if "pert_encoder.weight" in state:
        conditions.append("perturbation")
    generative = bool(_arg(args, "USE_GENERATIVE_TRAINING", "use_generative_training", default=False)) or \
        _arg(args, "training_tasks", default="pcpt") in ("gen", "both")
    n_cls = int(state["cls_decoder.out_layer.weight"].shape[0]) if "cls_decoder.out_layer.weight" in state else 0
    return ScGPTConfig(
        vocab_size=len(vocab), pad_id=vocab.special_id("<pad>"), conditions=conditions, n_labels=n_labels,
        layers=int(_arg(args, "nlayers")), hidden=int(_arg(args, "embsize", "d_model", "layer_size")),
        heads=int(_arg(args, "nheads", "nhead")), ffn=int(_arg(args, "d_hid")),
        dropout=float(_arg(args, "dropout", default=0.2)), attention=attention,
        value_embedding="mlp" if style == "continuous" else "bins",
        value_source="values_bin" if input_style == "binned" else "values",
        n_bins=int(_arg(args, "n_bins", default=51)),
        cls_id=vocab.special_id("<cls>") if "<cls>" in vocab.specials else None,
        cls_value=float(_arg(args, "pad_value", default=-2)),
        pre_norm=bool(_arg(args, "pre_norm", default=False)),
        cell_emb_style=_arg(args, "cell_emb_style", default="cls"),
        mvc="mvc_decoder.W.weight" in state, mvc_style=mvc_style,
        explicit_zero_prob="decoder.zero_logit.0.weight" in state,
        ecs_threshold=float(_arg(args, "ecs_thres", "ecs_threshold", default=0.0)) if _arg(
            args, "ECS", default=False) else 0.0,
        dab="grad_reverse_discriminator.out_layer.weight" in state, dsbn=bool(dsbn),
        dsbn_affine="dsbn.bns.0.weight" in state, input_bn="bn.running_mean" in state,
        use_batch_labels="batch_encoder.embedding.weight" in state,
        n_cls=n_cls if n_cls > 1 else 0,
        n_layers_cls=_mlp_depth(state, "cls_decoder") if n_cls > 1 else int(_arg(args, "n_layers_cls", default=3)),
        unknown_out_proj=not generative,
    )


def _rename(key: str) -> str:
    key = key.removeprefix("module.")
    return re.sub(r"(transformer_encoder\.layers\.\d+\.self_attn)\.Wqkv\.(weight|bias)$", r"\1.in_proj_\2", key)


def convert_scgpt(state_dict: Mapping[str, Tensor], args: Mapping[str, Any], vocab: Mapping[str, int],
                  attention: str = "sdpa") -> tuple[ScGPTConfig, dict[str, Tensor]]:
    """(config, state dict) of our :class:`ScGPTModel` for scGPT's ``best_model.pt`` state dict, ``args.json``
    and ``vocab.json`` (see the module docstring). The vocabulary is :func:`scgpt_vocab`'s."""
    ours_vocab, perm = scgpt_vocab(vocab)
    state = {_rename(k): v for k, v in state_dict.items()}
    if _GENE_EMB not in state:
        raise ScfmInputError(f"no {_GENE_EMB} in the checkpoint: not an scGPT model", where="best_model.pt")
    if state[_GENE_EMB].shape[0] != len(perm):
        raise ScfmInputError(f"the gene embedding has {state[_GENE_EMB].shape[0]} rows, vocab.json "
                             f"{len(perm)} tokens", where="vocab.json", fix="give the vocab.json of this checkpoint")
    if any("self_attn.cross_attn" in k for k in state):  # identity projections: nothing to load
        state = {k: v for k, v in state.items() if "self_attn.cross_attn" not in k}
    config = config_from_args(args, state, ours_vocab, attention)
    state[_GENE_EMB] = state[_GENE_EMB][torch.from_numpy(perm)]
    expected = ScGPTModel(config).state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state) - set(_OPTIONAL_MISSING))
    if unexpected or missing:
        raise ScfmInputError(f"checkpoint keys do not match scfm's scGPT: unexpected {unexpected[:8]}, "
                             f"missing {missing[:8]}", where="best_model.pt",
                             fix="convert a TransformerModel / TransformerGenerator checkpoint of bowang-lab/scGPT")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ScfmInputError(f"{key}: shape {tuple(value.shape)}, expected {tuple(expected[key].shape)} from "
                                 "args.json", where="best_model.pt", fix="give the args.json of this checkpoint")
    for key in _OPTIONAL_MISSING:
        if key not in state:
            state[key] = expected[key]  # freshly initialised (only generation reads it)
    return config, state


def read_scgpt_folder(model_dir: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, int]]:
    """(state dict, args, vocab) from ``best_model.pt`` (``weights_only=True``), ``args.json``, ``vocab.json``."""
    model_dir = Path(model_dir)
    files = {name: model_dir / name for name in ("best_model.pt", "args.json", "vocab.json")}
    for name, path in files.items():
        if not path.is_file():
            raise ScfmInputError(f"{name} not found", where=str(model_dir),
                                 fix="give an scGPT model folder (best_model.pt, args.json, vocab.json)")
    try:
        state = torch.load(files["best_model.pt"], map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, or a pickle with code in it
        raise ScfmInputError(f"cannot read the weights: {str(err).splitlines()[0][:200]}",
                             where=str(files["best_model.pt"]), fix="give a state dict saved with torch.save") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    args = json.loads(files["args.json"].read_text())
    vocab = json.loads(files["vocab.json"].read_text())
    return state, args, vocab


def load_scgpt(model_dir: str | Path, attention: str = "sdpa",
               vocab: Vocab | str | Path | None = None) -> tuple[ScGPTModel, Vocab]:
    """An :class:`ScGPTModel` (eval mode) with the weights of a local scGPT folder, and its vocabulary.

    ``vocab`` (a :class:`Vocab`, a ``vocab.tsv`` or a corpus folder): re-index the gene rows to it by symbol."""
    state, args, raw_vocab = read_scgpt_folder(model_dir)
    config, ours = convert_scgpt(state, args, raw_vocab, attention)
    out_vocab, _ = scgpt_vocab(raw_vocab)
    if vocab is not None:
        target = as_vocab(vocab)
        config, ours, _ = remap_vocab(config, ours, out_vocab, target)
        out_vocab = target
    model = ScGPTModel(config)
    model.load_state_dict(ours, strict=True)
    return model.eval(), out_vocab


# ---------------------------------------------------------------- scfm's converted-model file


def save_converted(path: str | Path, config: ScGPTConfig, state_dict: Mapping[str, Tensor], vocab: Vocab,
                   source: str = "") -> Path:
    """Write ``{"format", "arch", "config", "state_dict", "vocab", "source"}`` for ``torch.load(weights_only=True)``:
    to ``path`` if it ends in ``.pt`` / ``.pth``, else to ``path/model.pt`` with ``config.json`` and ``vocab.tsv``."""
    return save_payload(path, FORMAT, config, state_dict, source,
                        {"arch": "scgpt", "vocab": vocab_to_dict(vocab, symbols=True)}, vocab)


def load_converted(path: str | Path, attention: str | None = None) -> tuple[ScGPTModel, Vocab]:
    """Model (eval mode) and vocabulary from :func:`save_converted`'s file or folder."""
    payload = load_payload(path, FORMAT, "scfm-convert scgpt")
    return build_model(payload, ScGPTConfig, ScGPTModel, attention=attention), vocab_from_dict(payload["vocab"])


def scgpt_encoding(config: ScGPTConfig, args: Mapping[str, Any], vocab: Vocab) -> BinEncoding:
    """scGPT's bin encoding for a converted model, bound to ``vocab``: ``n_bins`` of the model, ``max_seq_len``
    of ``args.json`` (1,200 when absent), ``<cls>`` first, non-zero genes only (pretraining's setting)."""
    max_len = int(_arg(args, "max_seq_len", default=1200))
    return BinEncoding(n_bins=config.n_bins, max_len=max_len).bind_arrays(vocab, {})
