"""Geneformer (Hugging Face ``BertForMaskedLM``) checkpoints -> :class:`~scfm.model.bert.BertForMaskedGeneModeling`.

Weights. HF names lose their ``bert.`` prefix (see ``scfm.model.bert``); below ``encoder.layer.{i}.`` HF's
``attention.self.{query,key,value}`` are concatenated (q; k; v rows) into ``self_attn.in_proj_{weight,bias}``,
``attention.output.dense`` -> ``self_attn.out_proj``, ``attention.output.LayerNorm`` -> ``norm1``,
``intermediate.dense`` -> ``linear1``, ``output.dense`` -> ``linear2``, ``output.LayerNorm`` -> ``norm2``
(``nn.TransformerEncoderLayer``'s names, scfm's shared blocks); ``cls.predictions.transform.*`` becomes
``mlm_head.*`` and ``cls.predictions.bias`` ``mlm_head.decoder.bias``. Geneformer never passes
``token_type_ids``, so HF adds row 0 of ``token_type_embeddings`` to every token: that row is folded into the
position embeddings (``position' = position + token_type[0]``, exact up to float rounding). The decoder weight
is tied to the gene embedding, as in HF; a checkpoint whose decoder differs from its embedding is refused.
``position_ids`` / ``token_type_ids`` buffers and the pooler are dropped. Anything else unexpected or missing
raises :class:`~scfm.errors.ScfmInputError` naming the HF key.

Token ids. Geneformer's token dictionaries map ``<pad>`` -> 0, ``<mask>`` -> 1 (V1, ``gc30M``; V2 ``gc95M`` adds
``<cls>`` -> 2, ``<eos>`` -> 3), then the Ensembl ids in sorted order. :meth:`scfm.data.vocab.Vocab.from_token_dict`
keeps that order (leading ``<...>`` tokens become the specials, in id order), so a corpus prepared with
``vocab=geneformer_gc30M`` / ``geneformer_gc95M`` has exactly Geneformer's ids and the weights load as they are
(objective ``mlm``: ``mask_id=1``, ``first_gene_id`` = 2 for gc30M, 4 for gc95M). A corpus with its own
vocabulary (scfm's default specials ``<pad> <mask> <cls> <eos>``, then its genes sorted) does not line up:
pass ``vocab=`` to :func:`load_geneformer` and the gene-embedding rows and decoder biases are re-indexed by
Ensembl id (:func:`remap_vocab`); genes Geneformer never saw get fresh rows.

Vocabularies are read from JSON; Geneformer's own ``.pkl`` dictionaries are read with an unpickler that refuses
every class, so only plain dicts of strings and ints load (no code runs).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from scfm.convert import as_vocab, build_model, load_payload, save_payload, vocab_from_dict, vocab_to_dict
from scfm.data.vocab import Vocab
from scfm.encodings.rank import RankEncoding
from scfm.errors import ScfmInputError
from scfm.model.bert import BertConfig, BertForMaskedGeneModeling

__all__ = [
    "FORMAT",
    "HF_ACTIVATIONS",
    "as_vocab",
    "config_from_hf",
    "convert_geneformer",
    "geneformer_vocab",
    "load_converted",
    "load_geneformer",
    "read_hf_folder",
    "read_token_dictionary",
    "remap_vocab",
    "save_converted",
    "vocab_index",
]

FORMAT = "scfm.bert/1"
"""``format`` field of files written by :func:`save_converted`."""

HF_ACTIVATIONS: dict[str, str] = {
    "relu": "relu",
    "gelu": "gelu",  # HF "gelu" is the exact (erf) GELU, as F.gelu
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
    "silu": "silu",
    "swish": "silu",
}
"""HF ``hidden_act`` -> scfm ``BertConfig.activation``."""

_BUILTIN_BY_VOCAB_SIZE = {25_426: "geneformer_gc30M", 20_275: "geneformer_gc95M"}
_DROPPED = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
_DROPPED_PREFIXES = ("bert.pooler.",)
_TOKEN_TYPE = "bert.embeddings.token_type_embeddings.weight"
_DECODER_W, _DECODER_B, _PRED_BIAS = "cls.predictions.decoder.weight", "cls.predictions.decoder.bias", \
    "cls.predictions.bias"
_WORD = "embeddings.word_embeddings.weight"
_LAYER_NAMES = (("attention.output.dense.", "self_attn.out_proj."), ("attention.output.LayerNorm.", "norm1."),
                ("intermediate.dense.", "linear1."), ("output.dense.", "linear2."), ("output.LayerNorm.", "norm2."))
"""HF ``BertLayer`` sub-names -> ours (``nn.TransformerEncoderLayer``'s), below ``encoder.layer.{i}.``."""
_QKV = ("query", "key", "value")
_HF_QKV = re.compile(r"^(encoder\.layer\.\d+\.)attention\.self\.(query|key|value)\.(weight|bias)$")
_IN_PROJ = re.compile(r"^(encoder\.layer\.\d+\.)self_attn\.in_proj_(weight|bias)$")
_LAYER_KEY = re.compile(r"^(encoder\.layer\.\d+\.)(.+)$")


# ---------------------------------------------------------------- config + weights


def _field(hf_config: Mapping[str, Any], name: str, default: Any = ...) -> Any:
    value = hf_config.get(name, default)
    if value is ...:
        raise ScfmInputError(f"HF config has no {name!r}", where="config.json",
                             fix="give the config.json saved with the checkpoint (BertConfig.to_dict())")
    return value


def config_from_hf(hf_config: Mapping[str, Any], attention: str = "sdpa") -> BertConfig:
    """Our :class:`BertConfig` for an HF ``BertConfig`` dict (a ``config.json``); refuses what we cannot express."""
    model_type = hf_config.get("model_type", "bert")
    if model_type != "bert":
        raise ScfmInputError(f"model_type {model_type!r} is not a BERT checkpoint", where="config.json:model_type",
                             fix="convert a Geneformer (HF BertForMaskedLM) checkpoint")
    pos_type = hf_config.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ScfmInputError(f"position_embedding_type {pos_type!r} is not supported (learned absolute only)",
                             where="config.json:position_embedding_type")
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
        raise ScfmInputError("decoder / cross-attention BERT checkpoints are not supported",
                             where="config.json:is_decoder")
    act = _field(hf_config, "hidden_act", "gelu")  # HF BertConfig's default
    if not isinstance(act, str) or act not in HF_ACTIVATIONS:
        raise ScfmInputError(f"hidden_act {act!r} has no scfm equivalent", where="config.json:hidden_act",
                             fix=f"scfm's BERT supports {', '.join(sorted(HF_ACTIVATIONS))}")
    pad = hf_config.get("pad_token_id", 0)
    return BertConfig(
        vocab_size=_field(hf_config, "vocab_size"),
        hidden=_field(hf_config, "hidden_size"),
        layers=_field(hf_config, "num_hidden_layers"),
        heads=_field(hf_config, "num_attention_heads"),
        ffn=_field(hf_config, "intermediate_size"),
        max_position=_field(hf_config, "max_position_embeddings"),
        dropout=float(hf_config.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(hf_config.get("attention_probs_dropout_prob", 0.1)),
        activation=HF_ACTIVATIONS[act],
        layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
        pad_id=0 if pad is None else int(pad),
        attention=attention,
        initializer_range=float(hf_config.get("initializer_range", 0.02)),
    )


def _rename_layer(key: str, to_ours: bool = True) -> str:
    """A layer key with HF's sub-name renamed to ours (``to_ours``) or back; other keys unchanged."""
    m = _LAYER_KEY.match(key)
    if m is None:
        return key
    prefix, rest = m.groups()
    for hf, ours in _LAYER_NAMES:
        old, new = (hf, ours) if to_ours else (ours, hf)
        if rest.startswith(old):
            return prefix + new + rest[len(old):]
    return key


def _our_name(hf_key: str) -> str | None:
    """scfm parameter name of an HF key; None when the key is handled apart (folded, tied, dropped)."""
    if hf_key in (_TOKEN_TYPE, _DECODER_W, _DECODER_B) or hf_key in _DROPPED or hf_key.startswith(_DROPPED_PREFIXES):
        return None
    if hf_key == _PRED_BIAS:
        return "mlm_head.decoder.bias"
    key = hf_key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if key.startswith("bert."):
        return _rename_layer(key[len("bert."):])
    if key.startswith("cls.predictions.transform."):
        return "mlm_head." + key[len("cls.predictions.transform."):]
    return "?" + hf_key  # unexpected: reported by the shape/name check below


def _hf_name(ours: str) -> str:
    """HF key that provides our parameter ``ours`` (for error messages)."""
    if ours == "mlm_head.decoder.bias":
        return _PRED_BIAS
    if ours == "mlm_head.decoder.weight":
        return f"{_DECODER_W} (tied to bert.{_WORD})"
    if ours.startswith("mlm_head."):
        return "cls.predictions.transform." + ours[len("mlm_head."):]
    m = _IN_PROJ.match(ours)
    if m is not None:
        return f"bert.{m[1]}attention.self.{{query,key,value}}.{m[2]}"
    return "bert." + _rename_layer(ours, to_ours=False)


def _expected_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        ref = BertForMaskedGeneModeling(config)
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def convert_geneformer(state_dict: Mapping[str, Tensor], hf_config: Mapping[str, Any],
                       attention: str = "sdpa") -> tuple[BertConfig, dict[str, Tensor]]:
    """Map an HF ``BertForMaskedLM`` state dict (+ its ``config.json`` dict) to our config and state dict.

    The result loads with ``BertForMaskedGeneModeling(config).load_state_dict(state, strict=True)``.
    """
    config = config_from_hf(hf_config, attention)
    expected = _expected_shapes(config)
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for hf_key, value in state_dict.items():
        ours = _our_name(hf_key)
        if ours is None:
            continue
        m = _HF_QKV.match(ours)
        if m is not None:  # packed below, q; k; v
            qkv.setdefault(f"{m[1]}self_attn.in_proj_{m[3]}", {})[m[2]] = value
            continue
        if ours not in expected or ours == "mlm_head.decoder.weight":
            raise ScfmInputError(f"unexpected key {hf_key!r} in the checkpoint", where="state dict",
                                 fix="convert a plain HF BertForMaskedLM (Geneformer pretrained) checkpoint; "
                                 "fine-tuned classifiers and other heads are not supported")
        out[ours] = value
    for ours, parts in qkv.items():
        hf = _hf_name(ours)
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise ScfmInputError(f"checkpoint lacks {hf.replace('{query,key,value}', missing[0])!r}",
                                 where="state dict", fix="give the complete BertForMaskedLM weights")
        if len({tuple(parts[p].shape) for p in _QKV}) > 1:
            raise ScfmInputError(f"{hf!r}: query, key and value differ in shape", where="state dict")
        out[ours] = torch.cat([parts[p] for p in _QKV])
    if _PRED_BIAS not in state_dict and _DECODER_B in state_dict:  # some exports keep only the decoder's copy
        out["mlm_head.decoder.bias"] = state_dict[_DECODER_B]
    elif _DECODER_B in state_dict and not torch.equal(state_dict[_DECODER_B], state_dict[_PRED_BIAS]):
        raise ScfmInputError(f"{_DECODER_B} differs from {_PRED_BIAS} (HF ties them)", where="state dict")
    if _DECODER_W in state_dict and _WORD in out and not torch.equal(state_dict[_DECODER_W], out[_WORD]):
        raise ScfmInputError(f"{_DECODER_W} is not tied to bert.{_WORD}", where="state dict",
                             fix="scfm's MLM decoder shares the gene embedding; untied checkpoints are not supported")
    if _TOKEN_TYPE in state_dict and "embeddings.position_embeddings.weight" in out:
        tt = state_dict[_TOKEN_TYPE]
        pos = out["embeddings.position_embeddings.weight"]
        if tt.ndim != 2 or tt.shape[1:] != pos.shape[1:]:
            raise ScfmInputError(f"{_TOKEN_TYPE} has shape {tuple(tt.shape)}, expected [n, {pos.shape[1]}]",
                                 where="state dict")
        out["embeddings.position_embeddings.weight"] = pos + tt[0]  # fold token type 0 into every position
    if _WORD in out:
        out["mlm_head.decoder.weight"] = out[_WORD]  # tied
    missing = [k for k in expected if k not in out]
    if missing:
        raise ScfmInputError(f"checkpoint lacks {_hf_name(missing[0])!r}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                             where="state dict", fix="give the complete BertForMaskedLM weights of this config.json")
    for k, shape in expected.items():
        if tuple(out[k].shape) != shape:
            raise ScfmInputError(f"{_hf_name(k)!r} has shape {tuple(out[k].shape)}, config.json implies {shape}",
                                 where="state dict", fix="use the config.json saved with these weights")
    return config, out


# ---------------------------------------------------------------- reading a folder


def _load_weights_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ScfmInputError("reading .safetensors needs the `safetensors` package", where=str(path),
                                 fix="pip install safetensors") from None
        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated / foreign files fail with many types inside the unpickler
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ScfmInputError(f"not loadable with weights_only=True: {first}", where=str(path),
                             fix="re-save the weights as a plain state dict or as model.safetensors") from None


def read_hf_folder(model_dir: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json dict, state dict)`` of a local HF model folder.

    Weights: ``model.safetensors`` (needs ``safetensors``), else ``pytorch_model.bin`` (``weights_only=True``),
    or their sharded ``*.index.json`` forms.
    """
    folder = Path(model_dir)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ScfmInputError("no config.json", where=str(folder),
                             fix="give a folder saved by HF save_pretrained (config.json + weights)")
    hf_config = json.loads(cfg_path.read_text())
    try:
        import safetensors  # noqa: F401

        have_st = True
    except ImportError:
        have_st = False
    candidates = (["model.safetensors", "model.safetensors.index.json"] if have_st else []) + [
        "pytorch_model.bin", "pytorch_model.bin.index.json"]
    for name in candidates:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(_load_weights_file(folder / shard))
            return hf_config, state
        return hf_config, _load_weights_file(path)
    found = sorted(p.name for p in folder.iterdir())
    raise ScfmInputError(f"no weights file (looked for {', '.join(candidates)}; found {found})", where=str(folder),
                         fix="pip install safetensors for model.safetensors" if not have_st
                         and (folder / "model.safetensors").exists() else None)


# ---------------------------------------------------------------- token dictionaries


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: only built-in containers, strings and numbers load."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_token_dictionary(source: str | Path) -> dict[str, int]:
    """Geneformer token dictionary ``{token: id}``: a built-in name (``geneformer_gc30M`` / ``geneformer_gc95M``),
    a ``.json`` file or Geneformer's ``.pkl`` (plain dict only; no code runs)."""
    from scfm.resources import GENEFORMER_NAMES, geneformer_dictionary

    if str(source) in GENEFORMER_NAMES:
        source = geneformer_dictionary(str(source), kind="tokens")
    path = Path(source)
    if not path.is_file():
        raise ScfmInputError("token dictionary not found", where=str(path),
                             fix="give geneformer_gc30M, geneformer_gc95M or the path of a token dictionary")
    data = _read_plain_dict(path)
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in data.items()):
        raise ScfmInputError("a token dictionary maps token strings to integer ids", where=str(path))
    return data


def geneformer_vocab(token_dictionary: str | Path | None = None, vocab_size: int | None = None) -> Vocab:
    """The :class:`Vocab` of a Geneformer token dictionary (token id == Geneformer id).

    Without ``token_dictionary`` the built-in one matching ``vocab_size`` is used (25,426 -> gc30M, V1;
    20,275 -> gc95M, V2).
    """
    if token_dictionary is None:
        if vocab_size not in _BUILTIN_BY_VOCAB_SIZE:
            raise ScfmInputError(f"no built-in Geneformer token dictionary has {vocab_size} tokens",
                                 where="token_dictionary",
                                 fix="pass the token dictionary the model was trained with (.json or .pkl)")
        token_dictionary = _BUILTIN_BY_VOCAB_SIZE[vocab_size]
    vocab = Vocab.from_token_dict(read_token_dictionary(token_dictionary), source=str(token_dictionary))
    if vocab_size is not None and len(vocab) != vocab_size:
        raise ScfmInputError(f"token dictionary has {len(vocab)} tokens, the model {vocab_size}",
                             where=str(token_dictionary), fix="pass the dictionary the model was trained with")
    return vocab


def vocab_index(source: Vocab, target: Vocab) -> np.ndarray:
    """For each target token id, the source token id of the same special token / gene (version-less
    Ensembl id), or -1 when the source vocabulary lacks it."""
    index = np.full(len(target), -1, dtype=np.int64)
    for i, tok in enumerate(target.specials):
        if tok in source.specials:
            index[i] = source.specials.index(tok)
    index[target.n_special:] = source.lookup(target.gene_ids)
    return index


def remap_vocab(config: BertConfig, state_dict: Mapping[str, Tensor], source: Vocab, target: Vocab,
                seed: int = 0) -> tuple[BertConfig, dict[str, Tensor], dict[str, int]]:
    """Re-index the gene embedding (and the tied decoder) and the decoder bias from ``source`` to ``target`` ids.

    Tokens missing from ``source`` get embedding rows drawn from N(0, initializer_range) (seeded) and bias 0,
    as a freshly initialised model; the target's ``<pad>`` row is copied from the source's. Returns the new
    config (``vocab_size``, ``pad_id``), state dict and counts ``{"kept", "new", "dropped"}``.
    """
    if len(source) != config.vocab_size:
        raise ScfmInputError(f"source vocabulary has {len(source)} tokens, the model {config.vocab_size}",
                             where="remap_vocab", fix="pass the token dictionary the model was trained with")
    index = torch.from_numpy(vocab_index(source, target))
    have = index >= 0
    word, bias = state_dict[_WORD], state_dict["mlm_head.decoder.bias"]
    gen = torch.Generator().manual_seed(seed)
    new_word = torch.randn(len(target), word.shape[1], generator=gen, dtype=torch.float32).to(word.dtype)
    new_word *= config.initializer_range
    new_word[have] = word[index[have]]
    new_bias = torch.zeros(len(target), dtype=bias.dtype)
    new_bias[have] = bias[index[have]]
    out = dict(state_dict)
    out[_WORD] = out["mlm_head.decoder.weight"] = new_word
    out["mlm_head.decoder.bias"] = new_bias
    new_config = dataclasses.replace(config, vocab_size=len(target), pad_id=target.special_id("<pad>"))
    kept = int(have.sum())
    return new_config, out, {"kept": kept, "new": len(target) - kept, "dropped": len(source) - kept}


def load_geneformer(model_dir: str | Path, attention: str = "sdpa", vocab: Vocab | str | Path | None = None,
                    token_dictionary: str | Path | None = None) -> BertForMaskedGeneModeling:
    """A :class:`BertForMaskedGeneModeling` with the weights of a local Geneformer (HF) folder, in eval mode.

    ``vocab`` (a :class:`Vocab`, a ``vocab.tsv`` or a corpus folder): re-index the gene rows to that vocabulary
    (see the module docstring); ``token_dictionary`` names the checkpoint's own (default: the built-in one of
    the same size).
    """
    hf_config, state = read_hf_folder(model_dir)
    config, ours = convert_geneformer(state, hf_config, attention)
    if vocab is not None:
        source = geneformer_vocab(token_dictionary, config.vocab_size)
        config, ours, _ = remap_vocab(config, ours, source, as_vocab(vocab))
    model = BertForMaskedGeneModeling(config)
    model.load_state_dict(ours, strict=True)
    return model.eval()


# ---------------------------------------------------------------- scfm's converted-model file


def save_converted(path: str | Path, config: BertConfig, state_dict: Mapping[str, Tensor],
                   vocab: Vocab | None = None, source: str = "") -> Path:
    """Write a converted model that ``torch.load(weights_only=True)`` reads.

    ``path`` ending in ``.pt`` / ``.pth`` / ``.ckpt``: one file ``{"format", "arch", "config", "state_dict",
    "vocab", "source"}`` (not a Lightning checkpoint). Otherwise a folder with ``model.pt`` (the same dict),
    ``config.json`` (our ``BertConfig``) and ``vocab.tsv`` (when ``vocab`` is known). Returns the ``.pt`` path.
    """
    return save_payload(path, FORMAT, config, state_dict, source, {"arch": "bert", "vocab": vocab_to_dict(vocab)},
                        vocab, suffixes=(".pt", ".pth", ".ckpt"))


def load_converted(path: str | Path, attention: str | None = None) -> tuple[BertForMaskedGeneModeling, Vocab | None]:
    """Model (eval mode) and vocabulary from :func:`save_converted`'s file or folder."""
    payload = load_payload(path, FORMAT, "scfm-convert")
    model = build_model(payload, BertConfig, BertForMaskedGeneModeling, attention=attention)
    return model, vocab_from_dict(payload.get("vocab"))


def geneformer_encoding(config: BertConfig, vocab: Vocab, medians: str | Path | dict[str, float],
                        layout: str) -> RankEncoding:
    """Geneformer's rank encoding for a converted model, bound to ``vocab``: ``layout`` v2 (``<cls>`` genes ``<eos>``,
    models whose own dictionary has those tokens) or v1; input ``config.max_position``; the gene medians of
    ``medians`` (a built-in name ``geneformer_gc30M`` / ``geneformer_gc95M``, a ``.json`` or ``.pkl`` file, or the
    table itself)."""
    from scfm.encodings.rank import medians_from_table
    from scfm.resources import GENEFORMER_NAMES, geneformer_dictionary

    where = str(medians) if not isinstance(medians, dict) else "gene medians"
    if not isinstance(medians, dict):
        path = geneformer_dictionary(str(medians)) if str(medians) in GENEFORMER_NAMES else Path(medians)
        if not path.is_file():
            raise ScfmInputError("gene median dictionary not found", where=str(path),
                                 fix="give geneformer_gc30M, geneformer_gc95M or Geneformer's "
                                     "gene_median_dictionary (.json / .pkl)")
        medians = _read_plain_dict(path)
    encoding = RankEncoding(max_len=config.max_position, layout=layout, gene_medians=where)
    return encoding.bind_arrays(vocab, {"gene_medians": medians_from_table(dict(medians), vocab, where)})


def _read_plain_dict(path: Path) -> dict[str, Any]:
    """A ``.json`` or plain-pickle ``.pkl`` dict (no code runs)."""
    if path.suffix in (".pkl", ".pickle"):
        try:
            return _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise ScfmInputError(f"not a plain pickled dict: {err}", where=str(path),
                                 fix="convert it to JSON: json.dump({k: v for k, v in d.items()}, f)") from None
    return json.loads(path.read_text())


def default_medians(vocab_size: int) -> str | None:
    """The built-in median dictionary of a Geneformer model with ``vocab_size`` tokens (its own dictionary)."""
    return _BUILTIN_BY_VOCAB_SIZE.get(vocab_size)
