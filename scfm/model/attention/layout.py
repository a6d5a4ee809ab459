"""The seam every attention kernel shares: :class:`Layout` (which tokens are real, which share a cell) and the
kernel protocol ``attend(q, k, v, layout, dropout_p) -> out``, with the mask helpers the kernels build on.

Every kernel takes q, k, v shaped ``[B, H, L, Dh]`` and a :class:`Layout` and returns ``[B, H, L, Dh]``.
Contract shared by all kernels:

* a query attends only to keys that are real (``padding_mask``) and in the same cell (``doc_ids``);
* with scGPT's generative mask (``known``), a known query attends only to known keys and an unknown query to
  the known keys and itself (kernels whose spec lists the ``generative`` mask only; ``performer`` refuses it);
* the output at a padded query position (``padding_mask == False``) is exactly zero, and neither the
  output nor any gradient is ever NaN, even for a row with no real token at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from scfm.errors import ScfmInputError

__all__ = ["AttentionKernel", "Layout"]


def _get(batch: Mapping[str, Any] | Any, key: str) -> Tensor | None:
    """``batch[key]`` or None; works for plain dicts and TensorDicts."""
    return batch.get(key, None)


@dataclass(eq=False)
class Layout:
    """Which tokens of a batch are real and which belong to the same cell.

    Padded batch: ``padding_mask`` [B, L] (True = real token), ``doc_ids`` and ``cu_seqlens`` None.
    Packed batch: ``doc_ids`` [B, T] (cell index within the pack), ``cu_seqlens`` [n+1] (int32, cumulative
    lengths as in flash-attn varlen, meaningful for B == 1), ``padding_mask`` None or [B, T].
    Generative (scGPT): ``known`` [B, L] bool, True for ``<cls>`` and known genes, False for the unknown genes
    whose values are predicted; combines with either of the above.

    Masks derived from the layout are built once and cached, so every layer of a forward pass reuses them.
    """

    padding_mask: Tensor | None = None
    doc_ids: Tensor | None = None
    cu_seqlens: Tensor | None = None
    known: Tensor | None = None
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.padding_mask is not None and self.padding_mask.dtype != torch.bool:
            raise ScfmInputError(
                f"padding_mask must be bool, got {self.padding_mask.dtype}",
                where="Layout.padding_mask",
                fix="pass a BoolTensor with True for real tokens",
            )
        if self.known is not None and self.known.dtype != torch.bool:
            raise ScfmInputError(
                f"known must be bool, got {self.known.dtype}",
                where="Layout.known",
                fix="pass a BoolTensor with True for <cls> and known genes, False for unknown genes",
            )
        if self.doc_ids is None and self.cu_seqlens is not None:
            # Derive doc_ids from cu_seqlens (single pack): token t is in cell i iff cu[i] <= t < cu[i+1];
            # trailing tokens past cu[-1] (padding) get id n.
            total = self.padding_mask.shape[-1] if self.padding_mask is not None else int(self.cu_seqlens[-1])
            t = torch.arange(total, device=self.cu_seqlens.device)
            self.doc_ids = torch.searchsorted(self.cu_seqlens[1:].long(), t, right=True)[None]  # [1, T]
        shapes = {
            n: tuple(x.shape)
            for n, x in (("padding_mask", self.padding_mask), ("doc_ids", self.doc_ids), ("known", self.known))
            if x is not None
        }
        if len(set(shapes.values())) > 1:
            raise ScfmInputError(
                f"layout tensors disagree in shape: {shapes}",
                where="Layout",
                fix="padding_mask, doc_ids and known must all be [B, L]",
            )

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any] | Any) -> Layout:
        """Read ``padding_mask``, ``doc_ids``, ``cu_seqlens``, ``known`` (each optional) from a dict / TensorDict."""
        return cls(
            padding_mask=_get(batch, "padding_mask"),
            doc_ids=_get(batch, "doc_ids"),
            cu_seqlens=_get(batch, "cu_seqlens"),
            known=_get(batch, "known"),
        )

    @property
    def is_packed(self) -> bool:
        """True when several cells share one row (``doc_ids`` present)."""
        return self.doc_ids is not None

    @property
    def is_generative(self) -> bool:
        """True when scGPT's generative mask applies (``known`` present)."""
        return self.known is not None

    @property
    def query_mask(self) -> Tensor | None:
        """[B, L] bool, True for real tokens; None when every token is real."""
        return self.padding_mask

    @property
    def attention_mask(self) -> Tensor | None:
        """[B, 1, L, L] bool, True where query i may attend key j; None when everything may attend.

        Key padding, (packed) same-cell block-diagonal and (generative) "known keys, or the query itself",
        combined. A padded query row may be all False.
        """
        if "attention_mask" not in self._cache:
            mask = None
            if self.doc_ids is not None:
                mask = self.doc_ids[:, None, :, None] == self.doc_ids[:, None, None, :]  # [B, 1, L, L]
            if self.known is not None:
                L = self.known.shape[-1]
                eye = torch.eye(L, dtype=torch.bool, device=self.known.device)  # [L, L]
                gen = self.known[:, None, None, :] | eye  # [B, 1, L, L]: key known, or key is the query
                mask = gen if mask is None else mask & gen
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

