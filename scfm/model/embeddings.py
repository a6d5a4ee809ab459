"""Embedding parts shared by the architectures: token tables, value embeddings and condition embeddings.

Value embeddings, selected by an architecture config's ``value_embedding``:

- ``none``: no value input; the rank is carried by learned positions (Geneformer).
- ``bins``: a learned vector per bin id (``values_bin``), + LayerNorm (scGPT ``CategoryValueEncoder``).
- ``mlp``: a continuous value through Linear(1, d) -> ReLU -> Linear(d, d) -> LayerNorm -> dropout, values clamped
  at ``max_value`` first (scGPT ``ContinuousValueEncoder``).
- ``autodiscretize``: scFoundation's auto-discretisation (``AutoDiscretizationEmbedding2``): for a value x,
  ``v1 = LeakyReLU(x·w1 + b1)`` ([b]), ``v2 = v1·W2 + b2 + α·v1``, weights ``softmax(v2)`` over b bins, output
  ``Σ_i weight_i · T_i`` with T a learned b×d table; masked positions get a learned mask vector and padded
  positions a learned pad vector instead.

Condition embeddings (:class:`ConditionEmbedding`) add a learned vector per batch label (per cell), per
feature modality (per token: gene / protein / peak) and per perturbation flag (per token: is this the
perturbed gene), to every token of the cell. Parameter names follow the original code where one exists, so
weight converters are renames.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from scfm.errors import ScfmInputError

__all__ = [
    "CONDITION_ROLES",
    "VALUE_EMBEDDINGS",
    "AutoDiscretizationEmbedding",
    "ConditionEmbedding",
    "ContinuousValueEncoder",
    "TokenEncoder",
    "check_value_embedding",
    "embed_values",
    "value_embedding",
    "value_input_key",
]

VALUE_EMBEDDINGS: tuple[str, ...] = ("none", "bins", "mlp", "autodiscretize")
CONDITION_ROLES: tuple[str, ...] = ("batch", "modality", "perturbation")
_INPUT_KEY = {"bins": "values_bin", "mlp": "values", "autodiscretize": "values"}


def check_value_embedding(kind: str, where: str) -> None:
    """Raise a clear error unless ``kind`` is a known value embedding."""
    if kind not in VALUE_EMBEDDINGS:
        raise ScfmInputError(f"unknown value embedding {kind!r}", where=where,
                             fix=f"use one of: {', '.join(VALUE_EMBEDDINGS)}")


def value_input_key(kind: str) -> str | None:
    """The batch key a value embedding reads: ``values_bin`` for bins, ``values`` otherwise, None for ``none``."""
    return _INPUT_KEY.get(kind)


class TokenEncoder(nn.Module):
    """A lookup table + LayerNorm (scGPT's ``GeneEncoder`` / ``CategoryValueEncoder`` / ``BatchLabelEncoder``)."""

    def __init__(self, num_embeddings: int, dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> Tensor:
        """ids: [...] long -> [..., dim]."""
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """scGPT's continuous value embedding: clamp, Linear(1, d), ReLU, Linear(d, d), LayerNorm, dropout."""

    def __init__(self, dim: int, dropout: float = 0.1, max_value: float = 512.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, dim)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.max_value = max_value

    def forward(self, values: Tensor) -> Tensor:
        """values: [...] float -> [..., dim]."""
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class AutoDiscretizationEmbedding(nn.Module):
    """scFoundation's auto-discretisation of continuous values into a soft mix of ``n_bins`` learned vectors.

    ``version=1`` uses ``v1`` directly as the bin logits; ``version=2`` (scFoundation's default,
    ``AutoDiscretizationEmbedding2``) adds the cross-layer ``v1·W2 + b2 + α·v1``.
    """

    def __init__(self, dim: int, n_bins: int = 100, alpha: float = 1.0, version: int = 2,
                 negative_slope: float = 0.1) -> None:
        super().__init__()
        if version not in (1, 2):
            raise ScfmInputError(f"autodiscretize version must be 1 or 2, got {version}",
                                 where="model.autobin_version")
        self.version, self.bin_alpha = version, alpha
        self.mlp = nn.Linear(1, n_bins)
        self.LeakyReLU = nn.LeakyReLU(negative_slope)
        self.mlp2 = nn.Linear(n_bins, n_bins)
        self.Softmax = nn.Softmax(dim=-1)
        self.emb = nn.Embedding(n_bins, dim)
        self.emb_mask = nn.Embedding(1, dim)
        self.emb_pad = nn.Embedding(1, dim)

    def forward(self, values: Tensor, value_mask: Tensor | None = None, padding_mask: Tensor | None = None) -> Tensor:
        """values: [B, L] float; value_mask: [B, L] True = masked; padding_mask: [B, L] True = real. -> [B, L, dim]."""
        v1 = self.LeakyReLU(self.mlp(values.unsqueeze(-1)))  # [B, L, b]
        logits = self.mlp2(v1) + self.bin_alpha * v1 if self.version == 2 else v1
        out = self.Softmax(logits) @ self.emb.weight  # [B, L, dim]
        if value_mask is not None:
            out = torch.where(value_mask.unsqueeze(-1), self.emb_mask.weight[0].to(out.dtype), out)
        if padding_mask is not None:
            out = torch.where(padding_mask.unsqueeze(-1), out, self.emb_pad.weight[0].to(out.dtype))
        return out


def value_embedding(kind: str, dim: int, n_bins: int = 51, dropout: float = 0.1, max_value: float = 512.0,
                    autobin_bins: int = 100, autobin_alpha: float = 1.0, autobin_version: int = 2) -> nn.Module | None:
    """The value-embedding module for ``kind`` (None for ``none``); see the module docstring."""
    check_value_embedding(kind, "model.value_embedding")
    if kind == "bins":
        return TokenEncoder(n_bins, dim)
    if kind == "mlp":
        return ContinuousValueEncoder(dim, dropout, max_value)
    if kind == "autodiscretize":
        return AutoDiscretizationEmbedding(dim, autobin_bins, autobin_alpha, autobin_version)
    return None


def embed_values(module: nn.Module | None, kind: str, batch: Mapping[str, Any] | Any) -> Tensor | None:
    """Run a value embedding on the batch key it reads (see :func:`value_input_key`); None for ``none``."""
    if module is None:
        return None
    key = value_input_key(kind)
    values = batch.get(key, None)
    if values is None:
        raise ScfmInputError(f"model.value_embedding={kind} reads batch[{key!r}], which this batch lacks",
                             where="config groups model + encoding",
                             fix="use encoding=bin for bins, encoding=bin or continuous for mlp / autodiscretize, "
                             "or model.value_embedding=none for rank")
    if kind == "autodiscretize":
        return module(values.float(), batch.get("value_mask", None), batch.get("padding_mask", None))
    return module(values if kind == "bins" else values.float())


class ConditionEmbedding(nn.Module):
    """Sum of learned condition vectors added to every token: ``batch`` (per cell, from ``batch['batch']``),
    ``modality`` (per token, ``batch['modality']``) and ``perturbation`` (per token flag, ``batch['perturbed']``).

    Cells with a missing label (code -1) get no batch vector. Packed batches map per-cell labels to tokens
    through ``doc_ids``.
    """

    def __init__(self, dim: int, conditions: list[str] | tuple[str, ...], n_labels: Mapping[str, int],
                 n_modalities: int = 3) -> None:
        super().__init__()
        unknown = sorted(set(conditions) - set(CONDITION_ROLES) - {"cell_type"})
        if unknown:
            raise ScfmInputError(f"unknown condition(s) {unknown}", where="data.conditions",
                                 fix=f"use any of: {', '.join(CONDITION_ROLES)} (cell_type is a label, not an input)")
        self.roles = [r for r in CONDITION_ROLES if r in conditions]
        if "batch" in self.roles:
            n = int(n_labels.get("batch", 0))
            if n <= 0:
                raise ScfmInputError("data.conditions has batch but the corpus has no batch labels",
                                     where="data.conditions",
                                     fix="prepare the corpus with columns.batch=<obs column>, or drop batch")
            self.batch = nn.Embedding(n, dim)
        if "modality" in self.roles:
            self.modality = nn.Embedding(n_modalities, dim)
        if "perturbation" in self.roles:
            self.perturbed = nn.Embedding(2, dim)

    def forward(self, batch: Mapping[str, Any] | Any, shape: torch.Size) -> Tensor | None:
        """Condition vectors [B, L, dim] for a batch whose tokens are laid out as ``shape`` ([B, L]); None if none."""
        out: Tensor | None = None

        def add(x: Tensor) -> None:
            nonlocal out
            out = x if out is None else out + x

        if "batch" in self.roles:
            codes = batch["batch"]  # [n_cells]
            doc_ids = batch.get("doc_ids", None)
            per_token = codes[doc_ids.clamp_min(0)] if doc_ids is not None else codes[:, None].expand(shape)
            add(self.batch(per_token.clamp_min(0)) * (per_token >= 0).unsqueeze(-1))
        if "modality" in self.roles:
            add(self.modality(batch["modality"].long()))
        if "perturbation" in self.roles:
            add(self.perturbed(batch["perturbed"].long()))
        return out
