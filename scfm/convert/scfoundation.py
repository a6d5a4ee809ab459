"""scFoundation (xTrimoGene ``MaeAutobin``) checkpoints -> :class:`scfm.model.xtrimo.XtrimoModel`.

Layouts read (biomap-research/scFoundation ``model/load.py``):

- ``models.ckpt`` (the release): ``{"gene" | "cell" | "rde": {"state_dict": {"model.<name>": tensor}, "config":
  {"model": "mae_autobin", "model_config": {"mae_autobin": {...}}, "dataset_config": {"rnaseq": {...}}}}}``; pick
  one with ``key`` (their ``get_embedding.py``: ``cell`` for cell embeddings, ``rde`` for read-depth enhancement,
  ``gene`` for gene embeddings / expression);
- one entry of it (``{"state_dict", "config"}``), their ``load_model`` layout (``{"config": flat dict,
  "model_state_dict": ...}``), or a plain state dict (``model.`` prefix optional).

Shapes come from the tensors (hidden, bins, positions, layers, FFN, decoder heads and random features); the
encoder's head count from the config (``encoder.heads``), else ``encoder_heads`` (default 12, scFoundation 100M).
Names: ``token_emb.*``, ``pos_emb``, ``decoder_embed``, ``norm``, ``to_final`` are the same;
``encoder.transformer_encoder.{i}.*`` (``nn.TransformerEncoderLayer``) -> ``encoder.layers.{i}.*`` (scfm's shared
blocks have the same sub-names: ``self_attn.{in_proj_weight,in_proj_bias,out_proj}``, ``linear1``, ``linear2``,
``norm1``, ``norm2``); the Performer's
``decoder.performer.net.layers.{i}.0.{norm, fn.to_*, fn.fast_attention.projection_matrix}`` ->
``decoder.layers.{i}.{attn_norm, attn.to_*, attn.projection_matrix}``, ``....{i}.1.{norm, fn.fn.w1, fn.fn.w2}`` ->
``decoder.layers.{i}.{ffn_norm, ffn.w1, ffn.w2}``, ``decoder.performer.calls_since_last_redraw`` ->
``decoder.calls``. The converted model computes what ``MaeAutobin.forward`` computes (tests/
test_convert_scfoundation.py), cell by cell (see ``scfm.model.xtrimo`` on the per-cell FAVOR+ stabiliser).

Inputs must be laid out over scFoundation's 19,264 genes (their ``OS_scRNA_gene_index.19264.tsv``, in its order):
``load_scfoundation(path, gene_list_path)`` returns them; pass the file as ``encoding.gene_list`` (the corpus
vocabulary must contain every listed symbol).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scfm.convert import load_payload, save_payload
from scfm.data.vocab import SPECIAL_TOKENS, Vocab
from scfm.encodings.continuous import ContinuousEncoding
from scfm.errors import ScfmInputError
from scfm.model.xtrimo import XtrimoConfig, XtrimoModel

__all__ = ["ScFoundationWeights", "convert_scfoundation", "load_converted", "load_scfoundation",
           "save_converted", "state_dict_and_config"]

_LAYOUT_KEYS = ("cell", "gene", "rde")
FORMAT = "scfm-xtrimo"


@dataclass
class ScFoundationWeights:
    """A converted checkpoint: the config, our state dict, and the gene list its positions follow (or None)."""

    config: XtrimoConfig
    state_dict: dict[str, Tensor]
    genes: list[str] | None = None


def _flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Their nested training config -> the flat dict ``select_model`` reads (``convertconfig``); flat ones as is."""
    if "model_config" not in config:
        return dict(config)
    model_type = config.get("model", "mae_autobin")
    flat = dict(config["model_config"].get(model_type, {}))
    flat.update(config.get("dataset_config", {}).get("rnaseq", {}))
    flat["model"] = model_type
    return flat


def state_dict_and_config(checkpoint: Mapping[str, Any], key: str | None = "cell") -> tuple[dict[str, Tensor],
                                                                                           dict[str, Any]]:
    """Find the state dict (``model.`` prefixes removed) and the flat config in any supported layout."""
    ckpt: Mapping[str, Any] = checkpoint
    present = [k for k in _LAYOUT_KEYS if isinstance(ckpt.get(k), Mapping) and "state_dict" in ckpt[k]]
    if present:
        if key not in present:
            raise ScfmInputError(f"checkpoint has no {key!r} model", where="scFoundation checkpoint",
                                 fix=f"choose key= one of {present}")
        ckpt = ckpt[key]
    if "model_state_dict" in ckpt:
        state, config = ckpt["model_state_dict"], ckpt.get("config", {})
    elif isinstance(ckpt.get("state_dict"), Mapping):
        state, config = ckpt["state_dict"], ckpt.get("config", {})
    else:
        state, config = ckpt, {}
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors or "token_emb.mlp.weight" not in {k.split("model.", 1)[-1] for k in tensors}:
        raise ScfmInputError("not an scFoundation MaeAutobin checkpoint (no token_emb.mlp.weight)",
                             where="scFoundation checkpoint",
                             fix="give models.ckpt from the scFoundation release, or a MaeAutobin state dict")
    state = {(k.split("model.", 1)[1] if k.startswith("model.") else k): v for k, v in tensors.items()}
    return state, _flat_config(config or {})


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def config_from_state(state: Mapping[str, Tensor], flat: Mapping[str, Any], attention: str = "sdpa",
                      encoder_heads: int = 12) -> XtrimoConfig:
    """An :class:`XtrimoConfig` from the tensors' shapes (+ the config's encoder heads and bin alpha)."""
    for part, want in (("encoder", "transformer"), ("decoder", "performer")):
        kind = (flat.get(part) or {}).get("module_type", want)
        if kind != want:
            raise ScfmInputError(f"scFoundation {part} module_type={kind!r}; only a {want} {part} converts",
                                 where="scFoundation checkpoint config", fix="use the released mae_autobin model")
    enc_pre, dec_pre = r"encoder\.transformer_encoder\.(\d+)\.", r"decoder\.performer\.net\.layers\.(\d+)\."
    layers, dec_layers = _count(state, enc_pre), _count(state, dec_pre)
    if not layers or not dec_layers:
        raise ScfmInputError(f"found {layers} encoder and {dec_layers} decoder layers",
                             where="scFoundation checkpoint", fix="a MaeAutobin with a transformer encoder and a "
                                                                   "Performer decoder is expected")
    proj = state["decoder.performer.net.layers.0.0.fn.fast_attention.projection_matrix"]  # [m, Dh]
    heads = int((flat.get("encoder") or {}).get("heads") or encoder_heads)
    return XtrimoConfig(
        vocab_size=int(flat.get("n_class") or state["pos_emb.weight"].shape[0]),
        attention=attention,
        layers=layers,
        hidden=int(state["token_emb.emb.weight"].shape[1]),
        heads=heads,
        ffn=int(state["encoder.transformer_encoder.0.linear1.weight"].shape[0]),
        dropout=0.0,
        decoder_layers=dec_layers,
        decoder_hidden=int(state["decoder_embed.weight"].shape[0]),
        decoder_heads=int(state["decoder.performer.net.layers.0.0.fn.to_q.weight"].shape[0]) // int(proj.shape[1]),
        decoder_head_dim=int(proj.shape[1]),
        decoder_ffn=int(state["decoder.performer.net.layers.0.1.fn.fn.w1.weight"].shape[0]),
        nb_features=int(proj.shape[0]),
        n_bins=int(state["token_emb.emb.weight"].shape[0]),
        bin_alpha=float(flat.get("bin_alpha", 1.0)),
        max_seq_len=int(state["pos_emb.weight"].shape[0]) - 1,
    )


_RENAMES = [
    (r"^encoder\.transformer_encoder\.(\d+)\.", r"encoder.layers.\1."),
    (r"^decoder\.performer\.net\.layers\.(\d+)\.0\.norm\.", r"decoder.layers.\1.attn_norm."),
    (r"^decoder\.performer\.net\.layers\.(\d+)\.0\.fn\.fast_attention\.projection_matrix$",
     r"decoder.layers.\1.attn.projection_matrix"),
    (r"^decoder\.performer\.net\.layers\.(\d+)\.0\.fn\.", r"decoder.layers.\1.attn."),
    (r"^decoder\.performer\.net\.layers\.(\d+)\.1\.norm\.", r"decoder.layers.\1.ffn_norm."),
    (r"^decoder\.performer\.net\.layers\.(\d+)\.1\.fn\.fn\.", r"decoder.layers.\1.ffn."),
    (r"^decoder\.performer\.calls_since_last_redraw$", "decoder.calls"),
]


def _our_name(name: str) -> str:
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def convert_scfoundation(checkpoint: Mapping[str, Any], key: str | None = "cell", attention: str = "sdpa",
                         encoder_heads: int = 12) -> tuple[XtrimoConfig, dict[str, Tensor]]:
    """(config, state dict for :class:`XtrimoModel`) from an scFoundation checkpoint in any supported layout.

    Every tensor must map onto one of ours with the same shape, and every one of ours must be filled (else
    :class:`ScfmInputError` lists the names).
    """
    state, flat = state_dict_and_config(checkpoint, key)
    config = config_from_state(state, flat, attention, encoder_heads)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in XtrimoModel(config).state_dict().items()}
    out: dict[str, Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        ours = _our_name(name)
        if ours not in expected:
            unknown.append(name)
            continue
        if ours == "decoder.calls":
            tensor = tensor.reshape(()).long()
        if tuple(tensor.shape) != expected[ours]:
            raise ScfmInputError(f"{name}: shape {tuple(tensor.shape)}, expected {expected[ours]} for {ours}",
                                 where="scFoundation checkpoint", fix="check encoder_heads / the checkpoint layout")
        out[ours] = tensor.detach().clone().contiguous()
    missing = sorted(set(expected) - set(out) - {"decoder.calls"})
    if unknown or missing:
        raise ScfmInputError(f"names that do not convert: unknown {unknown[:8]}, missing {missing[:8]}",
                             where="scFoundation checkpoint", fix="a MaeAutobin (transformer encoder + Performer "
                                                                   "decoder, auto-bin embedding) is expected")
    out.setdefault("decoder.calls", torch.zeros((), dtype=torch.long))
    return config, out


def load_scfoundation(path: str | Path, gene_list_path: str | Path | None = None, key: str | None = "cell",
                      attention: str = "sdpa", encoder_heads: int = 12) -> ScFoundationWeights:
    """Read an scFoundation checkpoint (``torch.load(weights_only=True)``) and its gene list (a TSV with a
    ``gene_name`` column, e.g. ``OS_scRNA_gene_index.19264.tsv``; one gene per position, T and S excluded)."""
    path = Path(path)
    if not path.is_file():
        raise ScfmInputError("checkpoint file not found", where=str(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles with arbitrary objects are refused, never executed
        raise ScfmInputError(f"cannot read the checkpoint with weights_only=True ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200]})", where=str(path),
                             fix="re-save it as plain dicts / tensors / numbers / strings where it is trusted") from err
    config, state = convert_scfoundation(checkpoint, key, attention, encoder_heads)
    genes = None
    if gene_list_path is not None:
        from scfm.encodings.continuous import read_gene_list

        genes = read_gene_list(gene_list_path)
        if len(genes) + 2 != config.max_seq_len:
            raise ScfmInputError(f"{len(genes):,} genes listed, but the checkpoint has {config.max_seq_len:,} "
                                 "positions (genes + T + S)", where=str(gene_list_path),
                                 fix="give the checkpoint's own gene list (scFoundation: 19,264 genes)")
    return ScFoundationWeights(config, state, genes)


def save_converted(out: str | Path, weights: ScFoundationWeights, source: str = "") -> Path:
    """Write ``out`` (``torch.save`` of plain dicts; read back by :func:`load_converted`) and, with a gene list,
    ``<out stem>.genes.txt`` to pass as ``encoding.gene_list``."""
    out = save_payload(out, FORMAT, weights.config, weights.state_dict, source, {"genes": weights.genes}, folder=False)
    if weights.genes is not None:
        out.with_suffix(".genes.txt").write_text("\n".join(weights.genes) + "\n")
    return out


def load_converted(path: str | Path) -> ScFoundationWeights:
    """Read what :func:`save_converted` wrote (``weights_only=True``)."""
    data = load_payload(path, FORMAT, "scfm-convert scfoundation")
    return ScFoundationWeights(XtrimoConfig(**data["config"]), data["state_dict"], data.get("genes"))


def scfoundation_bundle_parts(weights: ScFoundationWeights) -> tuple[Vocab, ContinuousEncoding]:
    """The vocabulary (scfm's special tokens + scFoundation's genes, in list order) and the continuous encoding over
    that gene list of a converted model; needs its gene list."""
    if weights.genes is None:
        raise ScfmInputError("a bundle needs the model's gene list (its positions follow it)", where="--gene-list",
                             fix="pass --gene-list OS_scRNA_gene_index.19264.tsv, or write a .pt file instead")
    vocab = Vocab(SPECIAL_TOKENS, list(weights.genes))
    encoding = ContinuousEncoding(gene_list="gene_list.tsv")
    return vocab, encoding.bind_arrays(vocab, {"gene_list": vocab.lookup(list(weights.genes))})
