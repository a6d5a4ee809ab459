"""xTrimoGene / scFoundation: an asymmetric encoder-decoder over every gene of a fixed gene list.

References: Gong et al. 2023, "xTrimoGene: an efficient and scalable representation learner for single-cell
RNA-seq data" (NeurIPS); Hao et al. 2024, "Large-scale foundation model on single-cell transcriptomics"
(scFoundation, Nature Methods). Code read for fidelity: biomap-research/scFoundation
``model/pretrainmodels/{mae_autobin,performer,transformer,select_model}.py``, ``model/load.py`` (``gatherData``,
``getEncoerDecoderData``) and ``model/get_embedding.py``.

Forward pass (``XtrimoModel.forward``), on ``encoding=continuous`` batches (every cell: its genes in gene-list
order, then the depth tokens T and S; see ``scfm.encodings.continuous``):

1. **Embeddings**: ``token_emb`` (auto-discretisation of the value, :class:`AutoDiscretizationEmbedding`; masked
   values get its ``emb_mask`` vector, padding its ``emb_pad`` vector) + ``pos_emb`` (an ``nn.Embedding`` with
   ``max_seq_len + 1`` rows indexed by the token's *position in the gene list*, batch key ``positions``: gene i
   -> row i, T -> row n_genes, S -> row n_genes + 1, padding -> row ``max_seq_len``). scFoundation does the same:
   its "gene ids" are ``arange(19266)`` over its fixed list, so a model is tied to its gene list and order
   (``encoding.gene_list``), and converted weights need scFoundation's own list.
2. **Encoder** over the gathered ``encoder_mask`` tokens only (non-zero, unmasked genes + T + S, ~10% of the
   length), in their original order, padded per batch to the largest count: post-LN transformer layers
   (``nn.TransformerEncoderLayer`` maths: ReLU FFN, dropout 0.1) with the configured attention kernel, then a
   LayerNorm (``encoder.norm``).
3. **Decoder input** (as ``MaeAutobin.forward``): the full-length token embeddings (zeros: the embedding of value 0;
   masked: ``emb_mask``), with the encoder outputs scattered back at the encoder positions, *then* ``pos_emb``
   added at every position (so encoder positions get it twice, as in scFoundation), then ``decoder_embed``
   (Linear encoder hidden -> decoder hidden).
4. **Decoder**: pre-LN Performer layers over the full length (``x + attn(LN(x))``, ``x + FFN(LN(x))``, GELU FFN,
   q/k/v with bias) and a LayerNorm (``decoder.norm``); attention ``decoder_attention="favor"`` is scFoundation's
   FAVOR+ exactly (per-layer ``projection_matrix`` buffers, features ``m^-1/2 (exp(wx - |x|^2/2 - max) + 1e-4)``,
   redrawn every ``decoder_redraw_interval`` training calls); any scfm kernel name (``performer``, ``sdpa``,
   ...) works instead, as an ablation.
5. ``norm`` (a second LayerNorm, as scFoundation), T/S dropped, ``to_final`` (Linear(decoder hidden, 1)) ->
   one predicted value per gene, ``[B, n_genes]``.

Differences from scFoundation, all deliberate: the FAVOR+ key stabiliser is the max over each *cell's* keys
(scFoundation takes one max over the whole batch, which makes a cell's output depend, through the 1e-4 feature
epsilon, on the other cells of its batch); padded keys are removed from the decoder sums (scFoundation's decoder
ignores its padding mask; continuous batches have no padding, so this never differs in practice).

Cell embedding (``cell_embedding``, scFoundation ``get_embedding.py``, ``pool_type='all'``): the encoder
output concatenated as [S token, T token, max over the encoder's gene tokens, mean over them] -> ``4 × hidden``;
``pool="max"`` is the max over all encoder tokens (their ``pool_type='max'``). Encode cells for embedding with
masking and down-sampling off (``encoding.mask_nonzero=0 mask_zero=0 downsample_prob=0``).

Packed batches are refused (continuous cells all have the same length, so padded batches waste nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scfm.errors import ScfmInputError, require_positive_ints
from scfm.model.attention import Layout, favor_attention, get_kernel, orthogonal_gaussian
from scfm.model.backbone import GeneStates, check_pool, masked_max, mean_over_cells
from scfm.model.blocks import ACTIVATIONS, BlockSpec, TransformerStack
from scfm.model.embeddings import AutoDiscretizationEmbedding

__all__ = ["Encoded", "XtrimoConfig", "XtrimoDecoder", "XtrimoEncoder", "XtrimoModel"]


@dataclass
class XtrimoConfig:
    """Shape of an xTrimoGene / scFoundation model. Defaults: scFoundation 100M.

    Found in biomap-research/scFoundation: encoder ``nn.TransformerEncoderLayer`` stack (post-LN, ReLU, FFN 4 x
    hidden, dropout 0.1) + final LayerNorm; Performer decoder (pre-LN, GELU FFN ``ff_mult=4``, ``dim_head=64``,
    ``qkv_bias=True``, dropouts 0, ``nb_features = int(dim_head · ln dim_head)`` = 266, features redrawn every
    1000 training calls, softmax-kernel epsilon 1e-4); ``bin_num=100``, ``bin_alpha=1.0``, LeakyReLU slope 0.1
    (the config dicts quoted by users of the released code: ``bin_num 100, bin_alpha 1.0, pad_token_id 103,
    mask_token_id 102``); ``seq_len = 19266`` = 19,264 genes + T + S (``get_embedding.py``:
    ``torch.arange(19266)``). Taken from the paper / the design card, not from code: encoder 12 layers, hidden
    768, 12 heads; decoder 6 layers, hidden 512, 8 heads (8 × 64 = 512).

    ``max_seq_len=None`` sizes ``pos_emb`` from the data (the encoding's length, set by
    ``scfm.model.complete_config``).
    """

    vocab_size: int
    pad_id: int = 0
    conditions: list[str] = field(default_factory=list)
    n_labels: dict[str, int] = field(default_factory=dict)
    attention: str = "sdpa"  # encoder kernel: eager / sdpa / flex / flash / performer
    layers: int = 12
    hidden: int = 768
    heads: int = 12
    ffn: int = 3072
    dropout: float = 0.1
    activation: str = "relu"
    norm_first: bool = False
    layer_norm_eps: float = 1e-5
    decoder_layers: int = 6
    decoder_hidden: int = 512
    decoder_heads: int = 8
    decoder_head_dim: int | None = None  # None: decoder_hidden // decoder_heads (scFoundation: 64)
    decoder_ffn: int = 2048
    decoder_dropout: float = 0.0
    decoder_attention: str = "favor"  # scFoundation's FAVOR+ (converter-exact), or any scfm kernel name
    nb_features: int | None = None  # None: int(head_dim · ln head_dim), scFoundation's default
    favor_eps: float = 1e-4
    decoder_redraw_interval: int = 1000  # redraw the FAVOR+ features every N training calls; 0 = never
    feature_seed: int = 0
    value_embedding: str = "autodiscretize"
    n_bins: int = 100
    bin_alpha: float = 1.0
    autobin_version: int = 2
    max_seq_len: int | None = 19266

    def __post_init__(self) -> None:
        where = "XtrimoConfig"
        ints = ["vocab_size", "layers", "hidden", "heads", "ffn", "decoder_layers", "decoder_hidden",
                "decoder_heads", "decoder_ffn", "n_bins"]
        ints += [n for n in ("decoder_head_dim", "nb_features", "max_seq_len") if getattr(self, n) is not None]
        require_positive_ints(self, ints, "model")
        if self.hidden % self.heads:
            raise ScfmInputError(f"hidden ({self.hidden}) is not divisible by heads ({self.heads})",
                                 where="model.hidden", fix="choose heads that divide hidden, e.g. 768 / 12")
        if self.decoder_head_dim is None:
            if self.decoder_hidden % self.decoder_heads:
                raise ScfmInputError(
                    f"decoder_hidden ({self.decoder_hidden}) is not divisible by decoder_heads ({self.decoder_heads})",
                    where="model.decoder_hidden", fix="choose decoder_heads that divide decoder_hidden, or set "
                                                      "model.decoder_head_dim")
            self.decoder_head_dim = self.decoder_hidden // self.decoder_heads
        for name in ("dropout", "decoder_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ScfmInputError(f"{name} must be in [0, 1), got {getattr(self, name)!r}", where=f"model.{name}")
        if self.activation not in ACTIVATIONS:
            raise ScfmInputError(f"unknown activation {self.activation!r}", where="model.activation",
                                 fix=f"use one of: {', '.join(ACTIVATIONS)}")
        if self.value_embedding != "autodiscretize":
            raise ScfmInputError(f"xtrimo embeds values by auto-discretisation only, got {self.value_embedding!r}",
                                 where="model.value_embedding", fix="model.value_embedding=autodiscretize")
        if self.autobin_version not in (1, 2):
            raise ScfmInputError(f"autobin_version must be 1 or 2, got {self.autobin_version}",
                                 where="model.autobin_version")
        if self.conditions:
            raise ScfmInputError(f"xtrimo has no condition embeddings (data.conditions={list(self.conditions)})",
                                 where="config groups model + data", fix="data.conditions=[] with model=xtrimo")
        if self.favor_eps < 0 or self.decoder_redraw_interval < 0:
            raise ScfmInputError("favor_eps and decoder_redraw_interval must be >= 0", where=where)
        get_kernel(self.attention)  # unknown / unavailable kernels raise with the valid names
        if self.decoder_attention != "favor":
            try:
                get_kernel(self.decoder_attention)
            except ScfmInputError as err:
                raise ScfmInputError(f"unknown decoder attention {self.decoder_attention!r}",
                                     where="model.decoder_attention",
                                     fix="favor (scFoundation's FAVOR+), performer, sdpa, eager or flex") from err

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def features(self) -> int:
        """FAVOR+ random features per decoder head."""
        d = self.decoder_head_dim
        return self.nb_features or max(int(d * math.log(d)), 1)


# ------------------------------------------------------------------------------------------- encoder


class XtrimoEncoder(TransformerStack):
    """scFoundation's ``pytorchTransformerModule``: ``layers.{i}``, scfm's
    :class:`~scfm.model.blocks.TransformerLayer` with ``nn.TransformerEncoderLayer``'s maths (post-LN, or
    ``norm_first``; one dropout, also inside the FFN and on the attention probabilities), then the final
    LayerNorm ``norm`` (eps 1e-5, as scFoundation's). The packed q/k/v projection is initialised as one
    ``nn.Linear(hidden, 3 hidden)``."""

    def __init__(self, config: XtrimoConfig) -> None:
        super().__init__(BlockSpec.of(config, activation=config.activation,
                                      norm="pre" if config.norm_first else "post", qkv_init="linear",
                                      final_norm_eps=1e-5))


# ------------------------------------------------------------------------------------------- decoder


class DecoderSelfAttention(nn.Module):
    """Performer self-attention: ``to_q/to_k/to_v`` (with bias), attention, ``to_out``, dropout. The attention is
    scFoundation's FAVOR+ (:func:`scfm.model.attention.favor_attention` with this layer's ``projection_matrix``)
    for ``decoder_attention="favor"``, else the registered kernel of that name."""

    def __init__(self, config: XtrimoConfig, layer: int) -> None:
        super().__init__()
        inner = config.decoder_heads * config.decoder_head_dim
        self.heads, self.head_dim = config.decoder_heads, config.decoder_head_dim
        self.to_q = nn.Linear(config.decoder_hidden, inner)
        self.to_k = nn.Linear(config.decoder_hidden, inner)
        self.to_v = nn.Linear(config.decoder_hidden, inner)
        self.to_out = nn.Linear(inner, config.decoder_hidden)
        self.dropout = nn.Dropout(config.decoder_dropout)
        self.kind, self.eps = config.decoder_attention, config.favor_eps
        self.kernel = None if self.kind == "favor" else get_kernel(self.kind)
        self.nb_features, self.seed = config.features, config.feature_seed + 7919 * layer
        self.register_buffer("projection_matrix", self.draw(0))

    def draw(self, n: int) -> Tensor:
        """The ``n``-th [m, Dh] feature matrix of this layer (deterministic in feature_seed, layer and n)."""
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * n)
        return orthogonal_gaussian(self.nb_features, self.head_dim, g).float()

    def forward(self, x: Tensor, layout: Layout) -> Tensor:
        """x: [B, L, D] -> [B, L, D]."""
        B, L, _ = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(B, L, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, Dh]

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        if self.kernel is None:
            out = favor_attention(q, k, v, self.projection_matrix, layout.padding_mask, eps=self.eps,
                                  key_max="cell")  # scFoundation's FAVOR+, stabilised per cell
        else:
            out = self.kernel(q, k, v, layout, dropout_p=0.0)
        return self.dropout(self.to_out(out.transpose(1, 2).reshape(B, L, -1)))


class FeedForward(nn.Module):
    """``w1`` -> GELU -> dropout -> ``w2`` (the Performer's FFN)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(F.gelu(self.w1(x))))


class DecoderLayer(nn.Module):
    """Pre-LN Performer layer: ``x + attn(attn_norm(x))``, then ``x + ffn(ffn_norm(x))``."""

    def __init__(self, config: XtrimoConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.decoder_hidden)
        self.attn = DecoderSelfAttention(config, layer)
        self.ffn_norm = nn.LayerNorm(config.decoder_hidden)
        self.ffn = FeedForward(config.decoder_hidden, config.decoder_ffn, config.decoder_dropout)

    def forward(self, x: Tensor, layout: Layout) -> Tensor:
        x = x + self.attn(self.attn_norm(x), layout)
        return x + self.ffn(self.ffn_norm(x))


class XtrimoDecoder(nn.Module):
    """``decoder_layers`` Performer layers + a LayerNorm; redraws the FAVOR+ features every
    ``decoder_redraw_interval`` training calls (counted in the ``calls`` buffer, so a resumed run redraws alike)."""

    def __init__(self, config: XtrimoConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.decoder_layers))
        self.norm = nn.LayerNorm(config.decoder_hidden)
        self.redraw_interval = config.decoder_redraw_interval if config.decoder_attention == "favor" else 0
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _maybe_redraw(self) -> None:
        if not (self.training and self.redraw_interval):
            return
        if int(self.calls) > 0 and int(self.calls) % self.redraw_interval == 0:
            n = int(self.calls) // self.redraw_interval
            for layer in self.layers:
                layer.attn.projection_matrix.copy_(layer.attn.draw(n))
        self.calls += 1

    def forward(self, x: Tensor, layout: Layout) -> Tensor:
        self._maybe_redraw()
        for layer in self.layers:
            x = layer(x, layout)
        return self.norm(x)


# ------------------------------------------------------------------------------------------- model


def _get(batch: Mapping[str, Any] | Any, key: str) -> Tensor:
    value = batch.get(key, None)
    if value is None:
        raise ScfmInputError(f"model=xtrimo reads batch[{key!r}], which this batch lacks",
                             where="config groups model + encoding", fix="use encoding=continuous with model=xtrimo")
    return value


@dataclass
class Gathered:
    """The encoder's tokens of a batch: ``index`` [B, N] positions in the full row (first ``counts[b]`` real,
    in their original order), ``real`` [B, N] bool."""

    index: Tensor
    real: Tensor


@dataclass
class Encoded(Gathered):
    """``XtrimoModel.encode``'s ``hidden``: the encoder output ``hidden`` [B, N, hidden] over the gathered
    encoder tokens (non-zero, unmasked genes + T + S; the encoder sees no other token), with their positions
    ``index`` [B, N] in the full row and ``real`` [B, N] (False: padding of the gathered batch)."""

    hidden: Tensor


class XtrimoModel(nn.Module):
    """scFoundation's ``MaeAutobin`` (see the module docstring). Batch keys: ``values``, ``value_mask``,
    ``encoder_mask``, ``token_kind``, ``positions`` [B, L], ``padding_mask`` optional.

    A :class:`~scfm.model.backbone.Backbone` whose ``encode(batch)`` is an :class:`Encoded` (the encoder over
    its gathered tokens only); cell embeddings ``all`` (default, scFoundation's: [S, T, max, mean] ->
    4 × hidden), ``max`` (over all encoder tokens) and ``mean`` (over the encoder's gene tokens).
    """

    POOLS: ClassVar[tuple[str, ...]] = ("all", "max", "mean")

    def __init__(self, config: XtrimoConfig) -> None:
        super().__init__()
        if config.max_seq_len is None:
            raise ScfmInputError("model.max_seq_len is null: the gene-list length is not known here",
                                 where="XtrimoModel", fix="set max_seq_len to n_genes + 2 (T, S), or build the "
                                                          "model with build_architecture(kind, fields, data)")
        self.config = config
        self.token_emb = AutoDiscretizationEmbedding(config.hidden, config.n_bins, config.bin_alpha,
                                                     config.autobin_version)
        self.pos_emb = nn.Embedding(config.max_seq_len + 1, config.hidden)  # last row: padding
        self.encoder = XtrimoEncoder(config)
        self.decoder_embed = nn.Linear(config.hidden, config.decoder_hidden)
        self.decoder = XtrimoDecoder(config)
        self.norm = nn.LayerNorm(config.decoder_hidden)
        self.to_final = nn.Linear(config.decoder_hidden, 1)

    # -- pieces ----------------------------------------------------------------------------------
    def _check(self, batch: Mapping[str, Any] | Any) -> Tensor | None:
        """Refuse packed batches and positions beyond ``pos_emb``; return the padding mask (None = all real)."""
        if batch.get("doc_ids", None) is not None or batch.get("cu_seqlens", None) is not None:
            raise ScfmInputError("model=xtrimo takes padded batches, not packed ones",
                                 where="config groups model + batching",
                                 fix="use batching=random (continuous cells all have the same length: nothing is "
                                     "padded)")
        length = _get(batch, "values").shape[1]
        if length > self.config.max_seq_len:
            raise ScfmInputError(f"cells have {length} tokens but model.max_seq_len={self.config.max_seq_len}",
                                 where="config groups model + encoding",
                                 fix=f"set model.max_seq_len>={length} (or null: sized from the data), or a shorter "
                                     "encoding.gene_list")
        pm = batch.get("padding_mask", None)
        return None if pm is None or bool(pm.all()) else pm

    def _positions(self, batch: Mapping[str, Any] | Any, padding_mask: Tensor | None) -> Tensor:
        pos = _get(batch, "positions")
        return pos if padding_mask is None else pos.masked_fill(~padding_mask, self.config.max_seq_len)

    @staticmethod
    def gather(encoder_mask: Tensor) -> Gathered:
        """Positions of the encoder's tokens, in order, padded to the batch's largest count (scFoundation
        ``gatherData``)."""
        counts = encoder_mask.sum(1)  # [B]
        n = max(int(counts.max()), 1) if encoder_mask.numel() else 1
        order = torch.argsort((~encoder_mask).to(torch.int8), dim=1, stable=True)  # selected first, in order
        index = order[:, :n]  # [B, N]
        real = torch.arange(n, device=encoder_mask.device)[None] < counts[:, None]  # [B, N]
        return Gathered(index, real)

    @property
    def hidden_size(self) -> int:
        """Width of the encoder's hidden states (``Encoded.hidden``)."""
        return self.config.hidden

    def encode(self, batch: Mapping[str, Any] | Any) -> Encoded:
        """Encoder output over the ``encoder_mask`` tokens, with their positions (:class:`Encoded`)."""
        padding_mask = self._check(batch)
        enc_mask = _get(batch, "encoder_mask")
        if padding_mask is not None:
            enc_mask = enc_mask & padding_mask
        g = self.gather(enc_mask)
        values = _get(batch, "values").float().gather(1, g.index)
        positions = self._positions(batch, padding_mask).gather(1, g.index).masked_fill(~g.real,
                                                                                       self.config.max_seq_len)
        x = self.token_emb(values, None, g.real) + self.pos_emb(positions)  # [B, N, hidden]
        return Encoded(g.index, g.real, self.encoder(x, Layout(padding_mask=g.real)))

    def decode(self, batch: Mapping[str, Any] | Any, encoded: Tensor, g: Gathered) -> Tensor:
        """Decoder hidden states over the full length, after ``norm``: [B, L, decoder_hidden]."""
        padding_mask = self._check(batch)
        values = _get(batch, "values").float()
        masked = _get(batch, "value_mask")
        real = torch.ones_like(masked) if padding_mask is None else padding_mask
        from_encoder = torch.zeros_like(masked).scatter(1, g.index, g.real)  # [B, L]
        # token embeddings of the other positions: emb_mask, emb_pad, or the embedding of value 0 -- one vector
        # each, so the b-bin auto-discretisation runs only where a non-zero value is not given to the encoder
        # (nowhere, for encoding=continuous batches)
        emb = self.token_emb
        zero = emb(values.new_zeros(1, 1))[0, 0]  # [hidden]
        x = torch.where(masked[..., None], emb.emb_mask.weight[0], zero)
        x = torch.where(real[..., None], x, emb.emb_pad.weight[0])  # [B, L, hidden]
        rest = ~from_encoder & ~masked & real & (values != 0)
        if bool(rest.any()):
            x = x.masked_scatter(rest[..., None], emb(values[rest][None])[0])
        idx = g.index[..., None].expand(-1, -1, x.shape[-1])  # [B, N, hidden]
        placed = torch.zeros_like(x).scatter(1, idx, encoded.to(x.dtype))  # a permutation: no collisions
        x = torch.where(from_encoder[..., None], placed, x) + self.pos_emb(self._positions(batch, padding_mask))
        x = self.decoder(self.decoder_embed(x), Layout(padding_mask=padding_mask))
        return self.norm(x)

    def gene_mask(self, batch: Mapping[str, Any] | Any) -> Tensor:
        """[B, L] True at gene tokens (not T/S, not padding); every row must have the same number."""
        genes = _get(batch, "token_kind") == 0
        pm = batch.get("padding_mask", None)
        if pm is not None:
            genes = genes & pm
        counts = genes.sum(1)
        if bool((counts != counts[0]).any()):
            raise ScfmInputError("cells of one batch have different numbers of genes",
                                 where="batch['token_kind']", fix="use encoding=continuous (one fixed gene list)")
        return genes

    def genes(self, x: Tensor, batch: Mapping[str, Any] | Any) -> Tensor:
        """The gene tokens of a per-token tensor: [B, L, ...] -> [B, n_genes, ...] (T/S and padding dropped)."""
        mask = self.gene_mask(batch)
        return x[mask].view(x.shape[0], -1, *x.shape[2:])

    def forward(self, batch: Mapping[str, Any] | Any) -> dict[str, Tensor]:
        """``pred`` [B, n_genes] (values predicted at every gene), ``encoded`` [B, N, hidden], ``encoder_index``
        and ``encoder_real`` [B, N]."""
        enc = self.encode(batch)
        hidden = self.genes(self.decode(batch, enc.hidden, enc), batch)  # [B, G, decoder_hidden]: T/S dropped
        return {"pred": self.to_final(hidden).squeeze(-1), "encoded": enc.hidden, "encoder_index": enc.index,
                "encoder_real": enc.real}

    def _kinds(self, batch: Mapping[str, Any] | Any, hidden: Encoded) -> Tensor:
        """[B, N] token kind of each encoder token (0 gene, 1 T, 2 S; -1 padding)."""
        return _get(batch, "token_kind").gather(1, hidden.index).masked_fill(~hidden.real, -1)

    def cell_embedding_size(self, pool: str | None = None) -> int:
        """``4 × hidden`` for ``all``, ``hidden`` for ``max`` and ``mean``."""
        pool = check_pool(pool or "all", self.POOLS, type(self).__name__)
        return 4 * self.config.hidden if pool == "all" else self.config.hidden

    def cell_embedding(self, batch: Mapping[str, Any] | Any, hidden: Encoded, pool: str | None = None) -> Tensor:
        """scFoundation's cell embedding (``get_embedding.py``) from ``hidden = encode(batch)``: ``all`` (default)
        -> [B, 4 × hidden] = [S, T, max over genes, mean over genes]; ``max`` -> [B, hidden], the max over all
        encoder tokens (their ``pool_type='max'``); ``mean`` -> [B, hidden], the mean over the encoder's genes."""
        pool = check_pool(pool or "all", self.POOLS, type(self).__name__)
        x = hidden.hidden  # [B, N, D]
        if pool == "max":
            return masked_max(x, hidden.real)
        kind = self._kinds(batch, hidden)  # [B, N]
        gmean = mean_over_cells(x, kind == 0)
        if pool == "mean":
            return gmean

        def pick(k: int) -> Tensor:  # the (single) token of kind k, zeros if absent
            return torch.einsum("bn,bnd->bd", (kind == k).to(x.dtype), x)

        return torch.cat([pick(2), pick(1), masked_max(x, kind == 0), gmean], dim=-1)

    def gene_embeddings(self, batch: Mapping[str, Any] | Any, hidden: Encoded) -> GeneStates:
        """``GeneStates(hidden.hidden [B, N, hidden], is_gene [B, N])``: the encoder's states over its gathered
        tokens; ``is_gene`` marks the gene tokens among them (not T, S, not padding); ``hidden.index`` gives
        each token's position in the full row. Genes the encoder did not see (zeros, masked) have no state."""
        return GeneStates(hidden.hidden, self._kinds(batch, hidden) == 0)
