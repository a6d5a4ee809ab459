"""``eager``: the reference maths in plain torch, the ground truth the other kernels are tested against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from scfm.model.attention.layout import Layout, _zero_padded_queries

__all__ = ["eager_attend"]


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
