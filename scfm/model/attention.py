"""Attention kernels behind one seam: ``attend(q, k, v, layout, dropout_p) -> out``.

Every kernel takes q, k, v shaped ``[B, H, L, Dh]`` and a :class:`Layout` that says which tokens are real
(padded batches) and which tokens belong to the same cell (packed batches), and returns ``[B, H, L, Dh]``.

Contract shared by all kernels:

* a query attends only to keys that are real (``padding_mask``) and in the same cell (``doc_ids``);
* the output at a padded query position (``padding_mask == False``) is exactly zero, and neither the
  output nor any gradient is ever NaN, even for a row with no real token at all.

New kernels (flex, flash varlen, performer, ...) register in :data:`KERNELS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from scfm.errors import ScfmInputError

__all__ = ["KERNELS", "AttentionKernel", "Layout", "eager_attend", "get_kernel", "sdpa_attend"]


def _get(batch: Mapping[str, Any] | Any, key: str) -> Tensor | None:
    """``batch[key]`` or None; works for plain dicts and TensorDicts."""
    return batch.get(key, None)


@dataclass(eq=False)
class Layout:
    """Which tokens of a batch are real and which belong to the same cell.

    Padded batch: ``padding_mask`` [B, L] (True = real token), ``doc_ids`` and ``cu_seqlens`` None.
    Packed batch: ``doc_ids`` [B, T] (cell index within the pack), ``cu_seqlens`` [n+1] (int32, cumulative
    lengths as in flash-attn varlen, meaningful for B == 1), ``padding_mask`` None or [B, T].

    Masks derived from the layout are built once and cached, so every layer of a forward pass reuses them.
    """

    padding_mask: Tensor | None = None
    doc_ids: Tensor | None = None
    cu_seqlens: Tensor | None = None
    _cache: dict[str, Tensor | None] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.padding_mask is not None and self.padding_mask.dtype != torch.bool:
            raise ScfmInputError(
                f"padding_mask must be bool, got {self.padding_mask.dtype}",
                where="Layout.padding_mask",
                fix="pass a BoolTensor with True for real tokens",
            )
        if self.doc_ids is None and self.cu_seqlens is not None:
            # Derive doc_ids from cu_seqlens (single pack): token t is in cell i iff cu[i] <= t < cu[i+1];
            # trailing tokens past cu[-1] (padding) get id n.
            total = self.padding_mask.shape[-1] if self.padding_mask is not None else int(self.cu_seqlens[-1])
            t = torch.arange(total, device=self.cu_seqlens.device)
            self.doc_ids = torch.searchsorted(self.cu_seqlens[1:].long(), t, right=True)[None]  # [1, T]
        shapes = {
            n: tuple(x.shape)
            for n, x in (("padding_mask", self.padding_mask), ("doc_ids", self.doc_ids))
            if x is not None
        }
        if len(set(shapes.values())) > 1:
            raise ScfmInputError(
                f"layout tensors disagree in shape: {shapes}",
                where="Layout",
                fix="padding_mask and doc_ids must both be [B, L]",
            )

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any] | Any) -> Layout:
        """Read ``padding_mask``, ``doc_ids`` and ``cu_seqlens`` (each optional) from a dict or TensorDict."""
        return cls(
            padding_mask=_get(batch, "padding_mask"),
            doc_ids=_get(batch, "doc_ids"),
            cu_seqlens=_get(batch, "cu_seqlens"),
        )

    @property
    def is_packed(self) -> bool:
        """True when several cells share one row (``doc_ids`` present)."""
        return self.doc_ids is not None

    @property
    def query_mask(self) -> Tensor | None:
        """[B, L] bool, True for real tokens; None when every token is real."""
        return self.padding_mask

    @property
    def attention_mask(self) -> Tensor | None:
        """[B, 1, L, L] bool, True where query i may attend key j; None when everything may attend.

        Key padding and (packed) same-cell block-diagonal, combined. A padded query row may be all False.
        """
        if "attention_mask" not in self._cache:
            mask = None
            if self.doc_ids is not None:
                mask = self.doc_ids[:, None, :, None] == self.doc_ids[:, None, None, :]  # [B, 1, L, L]
            if self.padding_mask is not None:
                keys = self.padding_mask[:, None, None, :]  # [B, 1, 1, L]
                mask = keys if mask is None else mask & keys
                if mask.shape[-2] == 1:
                    mask = mask.expand(-1, -1, mask.shape[-1], -1)  # [B, 1, L, L]
            self._cache["attention_mask"] = mask
        return self._cache["attention_mask"]

    @property
    def safe_attention_mask(self) -> Tensor | None:
        """:attr:`attention_mask` with the diagonal forced True, so no row is fully masked.

        Fully masked rows make fused kernels return NaN (and NaN gradients); letting each padded query see
        only itself keeps everything finite, and real queries are unaffected (they already see themselves).
        """
        if "safe_attention_mask" not in self._cache:
            mask = self.attention_mask
            if mask is not None:
                eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)  # [L, L]
                mask = mask | eye
            self._cache["safe_attention_mask"] = mask
        return self._cache["safe_attention_mask"]


class AttentionKernel(Protocol):
    """``(q, k, v, layout, dropout_p) -> out``, all of q, k, v, out shaped [B, H, L, Dh]."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, layout: Layout, dropout_p: float = 0.0) -> Tensor: ...


def _zero_padded_queries(out: Tensor, layout: Layout) -> Tensor:
    """Zero the output rows of padded queries. out: [B, H, L, Dh]."""
    qmask = layout.query_mask
    if qmask is None:
        return out
    return out.masked_fill(~qmask[:, None, :, None], 0.0)  # qmask -> [B, 1, L, 1]


def sdpa_attend(q: Tensor, k: Tensor, v: Tensor, layout: Layout, dropout_p: float = 0.0) -> Tensor:
    """Attention via ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask.

    q, k, v: [B, H, L, Dh] -> [B, H, L, Dh]. Padded query rows are 0. A single packed row with
    ``cu_seqlens`` is first scattered to one padded row per cell, so the cost is sum(len_i^2), not T^2
    (a [T, T] block-diagonal mask at T = 12 x 2048 would cost ~13x more on PBMC lengths).
    """
    if layout.is_packed and layout.cu_seqlens is not None and q.shape[0] == 1:
        return _sdpa_per_cell(q, k, v, layout, dropout_p)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.safe_attention_mask, dropout_p=dropout_p)
    return _zero_padded_queries(out, layout)  # [B, H, L, Dh]


def _sdpa_per_cell(q: Tensor, k: Tensor, v: Tensor, layout: Layout, dropout_p: float) -> Tensor:
    """Packed [1, H, T, Dh] -> per-cell padded [n, H, Lmax, Dh] -> SDPA with key padding -> packed again."""
    cu = layout.cu_seqlens.long()
    n, T = cu.numel() - 1, q.shape[2]
    lengths = cu[1:] - cu[:-1]  # [n]
    lmax = int(lengths.max()) if n else 0
    doc = layout.doc_ids[0]  # [T]
    real = doc < n
    if layout.padding_mask is not None:
        real = real & layout.padding_mask[0]
    tok = torch.nonzero(real).squeeze(-1)  # [R] packed positions of real tokens
    d = doc[tok]
    pos = tok - cu[d]  # position within its cell

    def to_cells(x: Tensor) -> Tensor:  # [1, H, T, Dh] -> [n, H, Lmax, Dh]
        grid = x.new_zeros(n, lmax, x.shape[1], x.shape[3])  # [n, Lmax, H, Dh]
        grid[d, pos] = x[0, :, tok].transpose(0, 1)  # [R, H, Dh]
        return grid.transpose(1, 2)

    key_real = torch.arange(lmax, device=q.device)[None, :] < lengths[:, None]  # [n, Lmax]
    mask = key_real[:, None, None, :] | torch.eye(lmax, dtype=torch.bool, device=q.device)  # [n, 1, Lmax, Lmax]
    out_cells = F.scaled_dot_product_attention(to_cells(q), to_cells(k), to_cells(v), attn_mask=mask,
                                               dropout_p=dropout_p)  # [n, H, Lmax, Dh]
    out = q.new_zeros(T, q.shape[1], q.shape[3])  # [T, H, Dh]
    out[tok] = out_cells.transpose(1, 2)[d, pos]
    return out.transpose(0, 1)[None]  # [1, H, T, Dh]


def eager_attend(q: Tensor, k: Tensor, v: Tensor, layout: Layout, dropout_p: float = 0.0) -> Tensor:
    """Reference maths: ``softmax(q k^T / sqrt(Dh) + mask) v``.

    q, k, v: [B, H, L, Dh] -> [B, H, L, Dh]. Padded query rows give zeros, in the output and in the
    gradients, never NaN. (A row with no valid key is always a padded query: a real token sees itself.)
    """
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, H, L, L]
    mask = layout.attention_mask  # [B, 1, L, L] or None
    if mask is not None:
        # A finite fill (not -inf) keeps fully masked (padded) rows finite; they are zeroed below.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)  # [B, H, L, L]
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return _zero_padded_queries(probs @ v, layout)  # [B, H, L, Dh]


KERNELS: dict[str, AttentionKernel] = {"sdpa": sdpa_attend, "eager": eager_attend}


def get_kernel(name: str) -> AttentionKernel:
    """The attention kernel registered under ``name``; raises listing the valid names otherwise."""
    try:
        return KERNELS[name]
    except KeyError:
        raise ScfmInputError(
            f"unknown attention kernel {name!r}",
            where="attention",
            fix=f"use one of: {', '.join(sorted(KERNELS))}",
        ) from None
