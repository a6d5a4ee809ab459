"""BERT encoder with a masked-gene-modeling head (Geneformer V1 shape).

Parameter names follow Hugging Face ``BertForMaskedLM`` without the ``bert.`` prefix, so a converter maps
``bert.embeddings.*`` -> ``embeddings.*``, ``bert.encoder.layer.{i}.*`` -> ``encoder.layer.{i}.*`` (same
sub-names: ``attention.self.query``, ``attention.output.dense``, ``intermediate.dense``, ``output.LayerNorm``,
...), ``cls.predictions.transform.dense`` -> ``mlm_head.dense``, ``cls.predictions.transform.LayerNorm`` ->
``mlm_head.LayerNorm``, ``cls.predictions.decoder.weight`` -> tied to ``embeddings.word_embeddings.weight``,
``cls.predictions.bias`` -> ``mlm_head.decoder.bias``. There are no token-type embeddings and no pooler
(HF's ``token_type_embeddings`` row 0 can be folded into the position embeddings when converting).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scfm.errors import ScfmInputError, require_positive_ints
from scfm.model.attention import Layout, get_kernel
from scfm.model.embeddings import ConditionEmbedding, check_value_embedding, embed_values, value_embedding

__all__ = [
    "ACTIVATIONS",
    "BertConfig",
    "BertEmbeddings",
    "BertEncoder",
    "BertForMaskedGeneModeling",
    "BertLayer",
    "BertSelfAttention",
    "MLMHead",
]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # HF's name for the tanh approximation
    "silu": F.silu,
}


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
    max_position: int = 2048
    dropout: float = 0.02
    attention_dropout: float = 0.02
    activation: str = "relu"
    layer_norm_eps: float = 1e-12
    pad_id: int = 0
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


class BertSelfAttention(nn.Module):
    """Separate q/k/v projections; the attention itself is the configured kernel (``attention.KERNELS``)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden, config.hidden)
        self.key = nn.Linear(config.hidden, config.hidden)
        self.value = nn.Linear(config.hidden, config.hidden)
        self.attention_dropout = config.attention_dropout
        self.kernel_name = config.attention
        self.kernel = get_kernel(config.attention)

    def _split(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, Dh]

    def forward(self, x: Tensor, layout: Layout) -> Tensor:
        """x: [B, L, hidden] -> [B, L, hidden] (context vectors before the output projection)."""
        B, L, D = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        p = self.attention_dropout if self.training else 0.0
        ctx = self.kernel(q, k, v, layout, dropout_p=p)  # [B, H, L, Dh]
        return ctx.transpose(1, 2).reshape(B, L, D)  # [B, L, hidden]


class BertSelfOutput(nn.Module):
    """Output projection + dropout + residual + LayerNorm (post-LN)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """x, residual: [B, L, hidden] -> [B, L, hidden]."""
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    """Self-attention block: ``self`` (q/k/v + kernel) then ``output`` (dense + residual + LayerNorm)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: Tensor, layout: Layout) -> Tensor:
        """x: [B, L, hidden] -> [B, L, hidden]."""
        return self.output(self.self(x, layout), x)


class BertIntermediate(nn.Module):
    """FFN up-projection + activation."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden, config.ffn)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, L, hidden] -> [B, L, ffn]."""
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    """FFN down-projection + dropout + residual + LayerNorm (post-LN)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.ffn, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """x: [B, L, ffn], residual: [B, L, hidden] -> [B, L, hidden]."""
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nn.Module):
    """One post-LN transformer layer as in HF BERT: attention block, then FFN block."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: Tensor, layout: Layout) -> Tensor:
        """x: [B, L, hidden] -> [B, L, hidden]."""
        x = self.attention(x, layout)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    """A stack of ``config.layers`` :class:`BertLayer` sharing one :class:`Layout`."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.layers))

    def forward(self, x: Tensor, layout: Layout) -> Tensor:
        """x: [B, L, hidden] -> [B, L, hidden]."""
        for layer in self.layer:
            x = layer(x, layout)
        return x


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
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.mlm_head = MLMHead(config)
        self.apply(self._init_weights)
        self.mlm_head.decoder.weight = self.embeddings.word_embeddings.weight  # tie

    def _init_weights(self, module: nn.Module) -> None:
        """BERT init: normal(0, initializer_range) weights, zero biases, LayerNorm weight 1 / bias 0."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
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

    def encode(self, batch: Mapping[str, Any] | Any, layout: Layout | None = None) -> Tensor:
        """Final hidden states [B, L, hidden]."""
        layout = Layout.from_batch(batch) if layout is None else layout
        x = self.embeddings(batch["gene_ids"], batch["positions"], batch)  # [B, L, hidden]
        return self.encoder(x, layout)

    def forward(self, batch: Mapping[str, Any] | Any) -> dict[str, Tensor]:
        """Return ``{"hidden": [B, L, hidden], "logits": [B, L, vocab]}``."""
        hidden = self.encode(batch)
        return {"hidden": hidden, "logits": self.mlm_head(hidden)}

    def cell_embedding(self, batch: Mapping[str, Any] | Any, hidden: Tensor | None = None) -> Tensor:
        """Mean of final hidden states over each cell's real tokens.

        Padded batch -> [B, hidden]; packed batch (B == 1) -> [n_cells, hidden], cell i = ``doc_ids == i``.
        A cell with no real token gets zeros. Pass ``hidden`` to reuse a forward pass.
        """
        layout = Layout.from_batch(batch)
        hidden = self.encode(batch, layout) if hidden is None else hidden  # [B, L, D]
        B, L, D = hidden.shape
        real = layout.padding_mask
        if real is None:
            real = hidden.new_ones(B, L, dtype=torch.bool)  # [B, L]
        if not layout.is_packed:
            w = real.to(hidden.dtype)  # [B, L]
            summed = torch.einsum("bl,bld->bd", w, hidden)  # [B, D]
            return summed / w.sum(dim=1, keepdim=True).clamp_min(1.0)
        if B != 1:
            raise ScfmInputError(
                f"packed batches must have one row, got {B}",
                where="batch['doc_ids']",
                fix="pack all cells into a single [1, T] row",
            )
        doc = layout.doc_ids[0]  # [T]
        if layout.cu_seqlens is not None:
            n_cells = layout.cu_seqlens.numel() - 1
        else:
            n_cells = int(doc[real[0]].max()) + 1 if bool(real.any()) else 0
        valid = real[0] & (doc >= 0) & (doc < n_cells)  # [T]
        idx = torch.where(valid, doc, 0)  # [T]
        w = valid.to(hidden.dtype)  # [T]
        summed = hidden.new_zeros(n_cells, D).index_add_(0, idx, hidden[0] * w[:, None])  # [n, D]
        counts = hidden.new_zeros(n_cells).index_add_(0, idx, w)  # [n]
        return summed / counts.clamp_min(1.0)[:, None]
