"""The transformer blocks every architecture is built from: self-attention, a transformer layer, a layer stack.

One set of modules serves BERT / Geneformer (``scfm.model.bert``), scGPT (``scfm.model.scgpt``) and the
xTrimoGene / scFoundation encoder (``scfm.model.xtrimo``); what their recipes differ in is a :class:`BlockSpec`.
Parameter names are PyTorch's own, so converters are renames below each architecture's attribute path:

- :class:`SelfAttention` has ``nn.MultiheadAttention``'s ``in_proj_weight`` [3D, D] (rows q; k; v, each
  head-major), ``in_proj_bias`` [3D] and ``out_proj`` (Linear); the attention itself is the configured kernel
  (``scfm.model.attention.get_kernel``: ``kernel(q, k, v, layout, dropout_p)``, all [B, H, L, Dh]);
- :class:`TransformerLayer` has ``nn.TransformerEncoderLayer``'s ``self_attn``, ``linear1``, ``dropout``,
  ``linear2``, ``norm1``, ``norm2``, ``dropout1``, ``dropout2``;
- :class:`TransformerStack` holds the layers in a ModuleList (named ``layers``, or ``layer`` for BERT) and an
  optional final LayerNorm ``norm``.

With ``norm="post"`` / ``"pre"``, ``activation`` relu or gelu, ``ffn_dropout=True`` and one dropout, a layer
computes exactly what ``nn.TransformerEncoderLayer(norm_first=...)`` computes (tests/test_backbone.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scfm.errors import ScfmInputError
from scfm.model.attention import Layout, get_kernel

__all__ = ["ACTIVATIONS", "NORMS", "QKV_INITS", "BlockSpec", "SelfAttention", "TransformerLayer", "TransformerStack"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # HF's name for the tanh approximation
    "silu": F.silu,
}
"""FFN activations by name (HF BERT's names)."""

NORMS = ("post", "pre", "scgpt-pre")
"""Where a layer normalises: ``post`` (``norm(x + sublayer(x))``: BERT, scGPT's default, scFoundation's encoder),
``pre`` (``x + sublayer(norm(x))``: ``nn.TransformerEncoderLayer(norm_first=True)``), ``scgpt-pre`` (scGPT's
``pre_norm``: ``x = norm(x)``, then ``x + sublayer(x)``)."""

QKV_INITS = ("xavier", "linear")
"""Initialisation of the packed q/k/v projection: ``xavier`` (``nn.MultiheadAttention``'s: xavier-uniform weight,
zero biases of ``in_proj`` and ``out_proj``; drawn after ``out_proj``) or ``linear`` (as one
``nn.Linear(D, 3D)``, drawn before ``out_proj``)."""


@dataclass(frozen=True)
class BlockSpec:
    """What one architecture's transformer layers are.

    ``dropout``: the hidden dropout (after attention's output projection and after the FFN), also inside the FFN
    (between the activation and ``linear2``) when ``ffn_dropout``; ``attention_dropout``: dropout of the
    attention probabilities (None: ``dropout``). ``final_norm_eps``: add a final LayerNorm ``norm`` to the stack
    with this eps (None: none). ``unknown_out_proj=False``: scGPT's quirk, ``out_proj`` is skipped for the tokens
    that ``layout.known`` marks unknown. ``layers_name``: the stack's ModuleList attribute.
    """

    hidden: int
    heads: int
    ffn: int
    layers: int
    attention: str = "sdpa"
    dropout: float = 0.0
    attention_dropout: float | None = None
    activation: str = "relu"
    norm: str = "post"
    ffn_dropout: bool = True
    layer_norm_eps: float = 1e-5
    final_norm_eps: float | None = None
    qkv_init: str = "xavier"
    unknown_out_proj: bool = True
    layers_name: str = "layers"

    def __post_init__(self) -> None:
        for name, value, allowed in (("activation", self.activation, tuple(ACTIVATIONS)),
                                     ("norm", self.norm, NORMS), ("qkv_init", self.qkv_init, QKV_INITS)):
            if value not in allowed:
                raise ScfmInputError(f"unknown {name} {value!r}", where=f"BlockSpec.{name}",
                                     fix=f"use one of: {', '.join(allowed)}")
        if self.hidden % self.heads:
            raise ScfmInputError(f"hidden ({self.hidden}) is not divisible by heads ({self.heads})",
                                 where="BlockSpec.hidden", fix="choose heads that divide hidden")

    @classmethod
    def of(cls, config: Any, **options: Any) -> BlockSpec:
        """The spec of an architecture's config: its ``hidden``, ``heads``, ``ffn``, ``layers``, ``attention``,
        ``dropout`` and ``layer_norm_eps``, plus ``options`` (the other fields)."""
        common = ("hidden", "heads", "ffn", "layers", "attention", "dropout", "layer_norm_eps")
        return cls(**{name: getattr(config, name) for name in common}, **options)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def attention_p(self) -> float:
        """Dropout probability of the attention probabilities."""
        return self.dropout if self.attention_dropout is None else self.attention_dropout


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (packed ``in_proj_weight`` [3D, D] = q; k; v rows, ``in_proj_bias``,
    ``out_proj``) around the configured attention kernel."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        D = spec.hidden
        self.heads, self.head_dim = spec.heads, spec.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * D, D))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * D))
        if spec.qkv_init == "linear":  # nn.Linear(D, 3D).reset_parameters()
            nn.init.kaiming_uniform_(self.in_proj_weight, a=math.sqrt(5))
            nn.init.uniform_(self.in_proj_bias, -1 / math.sqrt(D), 1 / math.sqrt(D))
        self.out_proj = nn.Linear(D, D)
        if spec.qkv_init == "xavier":  # nn.MultiheadAttention._reset_parameters()
            nn.init.xavier_uniform_(self.in_proj_weight)
            nn.init.zeros_(self.out_proj.bias)
        self.dropout = spec.attention_p
        self.kernel_name = spec.attention
        self.kernel = get_kernel(spec.attention)
        self.unknown_out_proj = spec.unknown_out_proj

    def forward(self, x: Tensor, layout: Layout) -> Tensor:
        """x: [B, L, D] -> [B, L, D] (after ``out_proj``)."""
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
        q, k, v = qkv.view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each [B, H, L, Dh]
        ctx = self.kernel(q, k, v, layout, dropout_p=self.dropout if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(B, L, D)  # [B, L, D]
        out = self.out_proj(ctx)
        if not self.unknown_out_proj and layout.known is not None:
            out = torch.where(layout.known[..., None], out, ctx)  # scGPT's identity cross-attention projection
        return out


class TransformerLayer(nn.Module):
    """``nn.TransformerEncoderLayer``'s names and maths with the options of :class:`BlockSpec`."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        D, eps = spec.hidden, spec.layer_norm_eps
        self.self_attn = SelfAttention(spec)
        self.linear1 = nn.Linear(D, spec.ffn)
        self.dropout: nn.Module = nn.Dropout(spec.dropout) if spec.ffn_dropout else nn.Identity()
        self.linear2 = nn.Linear(spec.ffn, D)
        self.norm1 = nn.LayerNorm(D, eps=eps)
        self.norm2 = nn.LayerNorm(D, eps=eps)
        self.dropout1 = nn.Dropout(spec.dropout)
        self.dropout2 = nn.Dropout(spec.dropout)
        self.activation = ACTIVATIONS[spec.activation]
        self.norm_scheme = spec.norm

    def _sa(self, x: Tensor, layout: Layout) -> Tensor:
        return self.dropout1(self.self_attn(x, layout))

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, x: Tensor, layout: Layout) -> Tensor:
        """x: [B, L, D] -> [B, L, D]."""
        if self.norm_scheme == "pre":
            x = x + self._sa(self.norm1(x), layout)
            return x + self._ff(self.norm2(x))
        if self.norm_scheme == "scgpt-pre":
            x = self.norm1(x)
            x = self.norm2(x + self._sa(x, layout))
            return x + self._ff(x)
        x = self.norm1(x + self._sa(x, layout))
        return self.norm2(x + self._ff(x))


class TransformerStack(nn.Module):
    """``spec.layers`` :class:`TransformerLayer` (attribute ``spec.layers_name``) sharing one :class:`Layout`,
    then the final LayerNorm ``norm`` when ``spec.final_norm_eps`` is set."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.layers_name = spec.layers_name
        self.add_module(spec.layers_name, nn.ModuleList(TransformerLayer(spec) for _ in range(spec.layers)))
        self.norm = None if spec.final_norm_eps is None else nn.LayerNorm(spec.hidden, eps=spec.final_norm_eps)

    @property
    def blocks(self) -> nn.ModuleList:
        """The layers, whatever their attribute is called."""
        return getattr(self, self.layers_name)

    def forward(self, x: Tensor, layout: Layout) -> Tensor:
        """x: [B, L, D] -> [B, L, D]."""
        for layer in self.blocks:
            x = layer(x, layout)
        return x if self.norm is None else self.norm(x)
