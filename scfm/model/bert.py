"""BERT encoder with a masked-gene-modeling head (Geneformer V1 shape).

The transformer layers are scfm's shared blocks (``scfm.model.blocks``, ``nn.TransformerEncoderLayer``'s names)
with HF BERT's maths (post-LN, no dropout inside the FFN). Embedding and head names follow Hugging Face
``BertForMaskedLM`` without the ``bert.`` prefix. The Geneformer converter (``scfm.convert.geneformer``) maps:

- ``bert.embeddings.*`` -> ``embeddings.*`` (HF's ``token_type_embeddings`` row 0 is folded into the position
  embeddings: there are no token-type embeddings here, and no pooler);
- ``bert.encoder.layer.{i}.attention.self.{query,key,value}.{weight,bias}`` -> ``encoder.layer.{i}.self_attn.
  in_proj_{weight,bias}`` (q; k; v concatenated along the output dimension, ``nn.MultiheadAttention``'s layout);
  ``attention.output.dense`` -> ``self_attn.out_proj``; ``attention.output.LayerNorm`` -> ``norm1``;
  ``intermediate.dense`` -> ``linear1``; ``output.dense`` -> ``linear2``; ``output.LayerNorm`` -> ``norm2``;
- ``cls.predictions.transform.dense`` -> ``mlm_head.dense``, ``cls.predictions.transform.LayerNorm`` ->
  ``mlm_head.LayerNorm``, ``cls.predictions.decoder.weight`` -> tied to ``embeddings.word_embeddings.weight``,
  ``cls.predictions.bias`` -> ``mlm_head.decoder.bias``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from scfm.errors import ScfmInputError, require_positive_ints
from scfm.model.attention import Layout, get_kernel
from scfm.model.backbone import GeneStates, check_pool, first_tokens, mean_over_cells
from scfm.model.blocks import ACTIVATIONS, BlockSpec, SelfAttention, TransformerStack
from scfm.model.embeddings import ConditionEmbedding, check_value_embedding, embed_values, value_embedding

__all__ = [
    "BertConfig",
    "BertEmbeddings",
    "BertEncoder",
    "BertForMaskedGeneModeling",
    "MLMHead",
]


@dataclass
class BertConfig:
    """Shape and regularisation of a BERT encoder.

    Defaults are Geneformer V1 (Theodoris et al., Nature 2023; HF ``ctheodoris/Geneformer`` 6-layer
    ``config.json``): 6 layers, hidden 256, 4 heads, intermediate 512, ReLU, hidden and attention dropout
    0.02, 2048 max positions, layer-norm eps 1e-12, pad token 0 (vocab 25,426 in that release).
    """

    vocab_size: int
    hidden: int = 256
    layers: int = 6
    heads: int = 4
    ffn: int = 512
    activation: str = "relu"
    max_position: int = 2048
    dropout: float = 0.02
    attention_dropout: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_id: int = 0
    first_gene_id: int | None = None  # ids below are specials (<cls>, <eos>); complete_config fills it in
    attention: str = "sdpa"
    initializer_range: float = 0.02
    value_embedding: str = "none"  # none (rank: positions) / bins / mlp / autodiscretize (scfm.model.embeddings)
    n_bins: int = 51
    conditions: list[str] = field(default_factory=list)  # batch / modality / perturbation vectors summed in
    n_labels: dict[str, int] = field(default_factory=dict)  # labels per condition role (from the corpus)

    def __post_init__(self) -> None:
        require_positive_ints(self, ("vocab_size", "hidden", "layers", "heads", "ffn", "max_position"), "BertConfig")
        if self.hidden % self.heads:
            raise ScfmInputError(
                f"hidden ({self.hidden}) is not divisible by heads ({self.heads})",
                where="BertConfig.hidden",
                fix="choose heads that divide hidden, e.g. hidden=256, heads=4",
            )
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ScfmInputError(f"{name} must be in [0, 1), got {value!r}", where=f"BertConfig.{name}")
        if self.layer_norm_eps <= 0 or self.initializer_range <= 0:
            raise ScfmInputError("layer_norm_eps and initializer_range must be positive", where="BertConfig")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ScfmInputError(
                f"pad_id {self.pad_id} is outside the vocabulary [0, {self.vocab_size})",
                where="BertConfig.pad_id",
            )
        if self.first_gene_id is not None and not 0 <= self.first_gene_id <= self.vocab_size:
            raise ScfmInputError(f"first_gene_id {self.first_gene_id} is outside [0, {self.vocab_size}]",
                                 where="BertConfig.first_gene_id")
        if self.activation not in ACTIVATIONS:
            raise ScfmInputError(
                f"unknown activation {self.activation!r}",
                where="BertConfig.activation",
                fix=f"use one of: {', '.join(sorted(ACTIVATIONS))}",
            )
        check_value_embedding(self.value_embedding, "BertConfig.value_embedding")
        get_kernel(self.attention)  # unknown or unavailable kernels raise with the valid names and the fix

    @property
    def head_dim(self) -> int:
        """Per-head width, ``hidden // heads``."""
        return self.hidden // self.heads


class BertEmbeddings(nn.Module):
    """Gene-id embedding + learned absolute position embedding (from ``positions``) [+ value embedding]
    [+ condition embeddings], LayerNorm, dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden, padding_idx=config.pad_id)
        self.position_embeddings = nn.Embedding(config.max_position, config.hidden)
        self.value_kind = config.value_embedding
        self.value_embeddings = value_embedding(config.value_embedding, config.hidden, n_bins=config.n_bins,
                                                dropout=config.dropout)
        self.condition_embeddings = (ConditionEmbedding(config.hidden, config.conditions, config.n_labels)
                                     if config.conditions else None)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, gene_ids: Tensor, positions: Tensor, batch: Mapping[str, Any] | Any = None) -> Tensor:
        """gene_ids, positions: [B, L] -> [B, L, H]; ``batch`` supplies value / condition inputs when configured."""
        x = self.word_embeddings(gene_ids) + self.position_embeddings(positions)  # [B, L, H]
        if batch is not None:
            values = embed_values(self.value_embeddings, self.value_kind, batch)
            if values is not None:
                x = x + values
            if self.condition_embeddings is not None:
                cond = self.condition_embeddings(batch, gene_ids.shape)
                if cond is not None:
                    x = x + cond
        return self.dropout(self.LayerNorm(x))


class BertEncoder(TransformerStack):
    """``layer.{i}``: ``config.layers`` post-LN :class:`~scfm.model.blocks.TransformerLayer` with HF BERT's maths
    (hidden dropout ``dropout`` after the attention output and the FFN, none inside the FFN; attention-probability
    dropout ``attention_dropout``), sharing one :class:`Layout`."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(BlockSpec.of(config, attention_dropout=config.attention_dropout,
                                      activation=config.activation, ffn_dropout=False, qkv_init="linear",
                                      layers_name="layer"))


class MLMHead(nn.Module):
    """HF BERT's prediction head: dense -> activation -> LayerNorm -> decoder to the vocabulary.

    The decoder weight is tied to the gene embedding by :class:`BertForMaskedGeneModeling`;
    its bias is its own.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden, config.hidden)
        self.act = ACTIVATIONS[config.activation]
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden, config.vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden: [B, L, hidden] -> logits [B, L, vocab]."""
        return self.decoder(self.LayerNorm(self.act(self.dense(hidden))))


class BertForMaskedGeneModeling(nn.Module):
    """BERT encoder + tied MLM head over gene tokens; takes padded or packed batches (see ``Layout``).

    Batch keys: ``gene_ids`` [B, L], ``positions`` [B, L], and either ``padding_mask`` [B, L] (padded) or
    ``doc_ids`` [1, T] + ``cu_seqlens`` [n+1] (packed; ``padding_mask`` optional).

    A :class:`~scfm.model.backbone.Backbone`: ``encode(batch)`` -> hidden [B, L, hidden]; cell embeddings
    ``mean`` (default, Geneformer's: the mean over each cell's real tokens) or ``cls`` (each cell's first token,
    for Geneformer V2 cells that start with ``<cls>``).
    """

    POOLS: ClassVar[tuple[str, ...]] = ("mean", "cls")

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.mlm_head = MLMHead(config)
        for module in self.modules():  # pre-order: q/k/v before out_proj, as HF's separate Linears
            self._init_weights(module)
        self.mlm_head.decoder.weight = self.embeddings.word_embeddings.weight  # tie

    def _init_weights(self, module: nn.Module) -> None:
        """BERT init: normal(0, initializer_range) weights (q, k and v of the packed projection one after the
        other, as HF's three Linears), zero biases, LayerNorm weight 1 / bias 0."""
        std = self.config.initializer_range
        if isinstance(module, SelfAttention):
            for w in module.in_proj_weight.data.chunk(3):
                nn.init.normal_(w, mean=0.0, std=std)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def hidden_size(self) -> int:
        """Width of ``encode``'s hidden states."""
        return self.config.hidden

    def encode(self, batch: Mapping[str, Any] | Any, layout: Layout | None = None) -> Tensor:
        """Final hidden states [B, L, hidden] (``layout``: the batch's, when already built)."""
        layout = Layout.from_batch(batch) if layout is None else layout
        x = self.embeddings(batch["gene_ids"], batch["positions"], batch)  # [B, L, hidden]
        return self.encoder(x, layout)

    def forward(self, batch: Mapping[str, Any] | Any) -> dict[str, Tensor]:
        """Return ``{"hidden": [B, L, hidden], "logits": [B, L, vocab]}``."""
        hidden = self.encode(batch)
        return {"hidden": hidden, "logits": self.mlm_head(hidden)}

    def cell_embedding_size(self, pool: str | None = None) -> int:
        """``hidden`` for every pool."""
        check_pool(pool or "mean", self.POOLS, type(self).__name__)
        return self.config.hidden

    def cell_embedding(self, batch: Mapping[str, Any] | Any, hidden: Tensor, pool: str | None = None) -> Tensor:
        """[n_cells, hidden] from ``hidden = encode(batch)``: ``mean`` (default) over each cell's real tokens (a
        cell without any gets zeros) or ``cls``, each cell's first token.

        Padded batch -> one cell per row; packed batch (B == 1) -> cell i = ``doc_ids == i``.
        """
        if check_pool(pool or "mean", self.POOLS, type(self).__name__) == "cls":
            return first_tokens(hidden, batch)
        layout = Layout.from_batch(batch)
        return mean_over_cells(hidden, layout.padding_mask, layout.doc_ids, layout.cu_seqlens)

    def gene_embeddings(self, batch: Mapping[str, Any] | Any, hidden: Tensor) -> GeneStates:
        """``GeneStates(hidden [B, L, hidden], is_gene [B, L])``: ``is_gene`` marks real tokens that are not
        ``<pad>`` and, when ``config.first_gene_id`` is known, not a special token (``<cls>``, ``<eos>``)."""
        layout = Layout.from_batch(batch)
        gene_ids = batch["gene_ids"]
        is_gene = gene_ids != self.config.pad_id
        if layout.padding_mask is not None:
            is_gene = is_gene & layout.padding_mask
        if layout.cu_seqlens is not None:
            is_gene = is_gene & (layout.doc_ids < layout.cu_seqlens.numel() - 1)
        if self.config.first_gene_id is not None:
            is_gene = is_gene & (gene_ids >= self.config.first_gene_id)
        return GeneStates(hidden, is_gene)
