"""The backbone protocol of the three architectures, and the pooling helpers they share.

:class:`~scfm.model.bert.BertForMaskedGeneModeling`, :class:`~scfm.model.scgpt.ScGPTModel` and
:class:`~scfm.model.xtrimo.XtrimoModel` each implement :class:`Backbone`::

    hidden = model.encode(batch)                        # what the encoder computed (per architecture, below)
    cells = model.cell_embedding(batch, hidden)         # [n_cells, model.cell_embedding_size()]
    cells = model.cell_embedding(batch, hidden, "mean") # any name in model.POOLS
    genes = model.gene_embeddings(batch, hidden)        # GeneStates(states [B, N, D], is_gene [B, N])

``hidden`` is [B, L, hidden_size] over the batch's tokens for bert and scgpt (padded or packed batches); for
xtrimo it is an :class:`~scfm.model.xtrimo.Encoded` (the encoder output [B, N, hidden_size] over the gathered
encoder tokens, their positions ``index`` [B, N] in the full row and ``real`` [B, N]), because its encoder sees
only the non-zero, unmasked genes and the depth tokens T, S.

Cells: padded batches -> one per row; packed batches (one row, ``doc_ids`` / ``cu_seqlens``) -> one per
``cu_seqlens`` segment, cell i = the tokens with ``doc_ids == i``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from scfm.errors import ScfmInputError

__all__ = ["Backbone", "GeneStates", "cell_starts", "check_pool", "first_tokens", "masked_max", "mean_over_cells"]


class GeneStates(NamedTuple):
    """Contextual hidden states of a batch's tokens and which of them are genes.

    ``states`` [B, N, D]: the encoder's final hidden states, one per token (bert / scgpt: ``hidden`` itself,
    N = L, every token of the grid; xtrimo: the encoder output over its gathered tokens). ``is_gene`` [B, N]
    bool: True at real gene tokens (not padding, not ``<cls>`` / ``<eos>`` / the depth tokens T, S), so
    ``states[is_gene]`` are the gene embeddings of every cell in token order.
    """

    states: Tensor
    is_gene: Tensor


@runtime_checkable
class Backbone(Protocol):
    """What every scfm architecture offers a downstream task (see the module docstring)."""

    POOLS: ClassVar[tuple[str, ...]]
    """The pools :meth:`cell_embedding` accepts."""

    @property
    def hidden_size(self) -> int:
        """Width D of ``hidden`` (the encoder's)."""
        ...

    def encode(self, batch: Mapping[str, Any] | Any) -> Any:
        """The encoder's final hidden states of ``batch`` (see the module docstring for the type)."""
        ...

    def cell_embedding(self, batch: Mapping[str, Any] | Any, hidden: Any, pool: str | None = None) -> Tensor:
        """[n_cells, cell_embedding_size(pool)] from ``hidden = encode(batch)``; ``pool`` one of ``POOLS``, None
        for the architecture's default; an unknown pool raises :class:`~scfm.errors.ScfmInputError`."""
        ...

    def cell_embedding_size(self, pool: str | None = None) -> int:
        """Width of :meth:`cell_embedding` with ``pool``."""
        ...

    def gene_embeddings(self, batch: Mapping[str, Any] | Any, hidden: Any) -> GeneStates:
        """Per-token contextual states and the gene-token mask (:class:`GeneStates`)."""
        ...


def check_pool(pool: str, pools: tuple[str, ...], owner: str) -> str:
    """``pool`` if it is one of ``pools``, else :class:`ScfmInputError` naming the valid ones."""
    if pool not in pools:
        raise ScfmInputError(f"unknown pool {pool!r} for {owner}", where=f"{owner}.cell_embedding(pool=...)",
                             fix=f"use one of: {', '.join(pools)}")
    return pool


def _get(batch: Mapping[str, Any] | Any, key: str) -> Tensor | None:
    return batch.get(key, None)


def cell_starts(batch: Mapping[str, Any] | Any) -> tuple[Tensor, Tensor]:
    """(row, column) of each cell's first token: padded -> (arange(B), 0), packed -> (0, cu_seqlens[:-1])."""
    gene_ids = batch["gene_ids"]
    if _get(batch, "doc_ids") is not None:
        cu = _get(batch, "cu_seqlens")
        if cu is None:
            raise ScfmInputError("a packed batch needs cu_seqlens", where="batch['cu_seqlens']")
        cols = cu[:-1].long()
        return torch.zeros_like(cols), cols
    rows = torch.arange(gene_ids.shape[0], device=gene_ids.device)
    return rows, torch.zeros_like(rows)


def first_tokens(hidden: Tensor, batch: Mapping[str, Any] | Any) -> Tensor:
    """[n_cells, D]: the hidden state of each cell's first token (its ``<cls>``, where cells start with one)."""
    rows, cols = cell_starts(batch)
    return hidden[rows, cols]


def mean_over_cells(hidden: Tensor, real: Tensor | None = None, doc_ids: Tensor | None = None,
                    cu_seqlens: Tensor | None = None) -> Tensor:
    """Mean of ``hidden`` [B, L, D] over each cell's real tokens (``real`` [B, L] bool; None: all).

    Padded (``doc_ids`` None) -> [B, D], a cell per row. Packed (``doc_ids`` [1, T]) -> [n_cells, D], cell i =
    the real tokens with ``doc_ids == i``; n_cells = ``len(cu_seqlens) - 1``, or without ``cu_seqlens`` one more
    than the largest doc id of a real token; tokens whose doc id is outside [0, n_cells) are left out. A cell
    without real tokens gets zeros.
    """
    B, L, D = hidden.shape
    if real is None:
        real = torch.ones(B, L, dtype=torch.bool, device=hidden.device)
    if doc_ids is None:
        w = real.to(hidden.dtype)  # [B, L]
        return torch.einsum("bl,bld->bd", w, hidden) / w.sum(1, keepdim=True).clamp_min(1.0)
    if B != 1:
        raise ScfmInputError(f"packed batches must have one row, got {B}", where="batch['doc_ids']",
                             fix="pack all cells into a single [1, T] row")
    doc = doc_ids[0].long()  # [T]
    n = cu_seqlens.numel() - 1 if cu_seqlens is not None else _count_docs(doc, real[0])
    keep = real[0] & (doc >= 0) & (doc < n)  # [T]
    idx = doc[keep]
    summed = hidden.new_zeros(n, D).index_add_(0, idx, hidden[0][keep])  # [n, D]
    return summed / torch.bincount(idx, minlength=n).clamp_min(1)[:, None].to(hidden.dtype)


def _count_docs(doc: Tensor, real: Tensor) -> int:
    return int(doc[real].max()) + 1 if bool(real.any()) else 0


def masked_max(hidden: Tensor, mask: Tensor) -> Tensor:
    """[B, D]: the max of ``hidden`` [B, N, D] over the tokens where ``mask`` [B, N]; zeros for a row without any."""
    out = hidden.masked_fill(~mask[..., None], -torch.inf).amax(1)
    return torch.where(mask.any(1, keepdim=True), out, torch.zeros_like(out))
