"""``flash``: flash-attn varlen over the real tokens of every cell (CUDA and the ``gpu`` extra only)."""

from __future__ import annotations

import torch
from torch import Tensor

from scfm.errors import ScfmInputError
from scfm.model.attention.layout import Layout

__all__ = ["flash_attend", "flash_available"]


def flash_available() -> bool:
    """True when flash-attn is importable and CUDA is present (the ``flash`` kernel can run)."""
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attend(q: Tensor, k: Tensor, v: Tensor, layout: Layout, dropout_p: float = 0.0) -> Tensor:
    """flash-attn varlen: the real tokens of every cell, concatenated, with ``cu_seqlens`` (no padding computed).

    q, k, v: [B, H, L, Dh] on CUDA -> [B, H, L, Dh]; padded queries give 0. Float32 inputs run in bfloat16
    (flash-attn has no float32 path) and come back as float32. scGPT's generative mask cannot be expressed
    (flash-attn has causal and sliding-window masks only): use ``sdpa`` or ``flex`` for it.
    """
    from flash_attn import flash_attn_varlen_func

    if layout.is_generative:
        raise ScfmInputError("attention=flash cannot express scGPT's generative (known/unknown) mask",
                             where="config groups attention + objective", fix="use attention=sdpa or attention=flex")
    B, H, L, Dh = q.shape
    if layout.is_packed:
        real = layout.doc_ids < (layout.cu_seqlens.numel() - 1 if layout.cu_seqlens is not None else L)  # [B, L]
        if layout.padding_mask is not None:
            real = real & layout.padding_mask
        doc = torch.where(real, layout.doc_ids, -1) + (torch.arange(B, device=q.device) * (L + 1))[:, None]
    else:
        real = layout.padding_mask if layout.padding_mask is not None else q.new_ones(B, L, dtype=torch.bool)
        doc = torch.arange(B, device=q.device)[:, None].expand(B, L)
    flat_real = real.reshape(-1)
    ids = doc.reshape(-1)[flat_real]  # [R] one id per sequence, grouped (tokens of a sequence are contiguous)
    _, counts = torch.unique_consecutive(ids, return_counts=True)
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=q.device)
    cu[1:] = counts.cumsum(0)
    max_len = int(counts.max()) if counts.numel() else 0

    def tokens(x: Tensor) -> Tensor:  # [B, H, L, Dh] -> [R, H, Dh]
        x = x.transpose(1, 2).reshape(B * L, H, Dh)[flat_real]
        return x if x.dtype in (torch.float16, torch.bfloat16) else x.to(torch.bfloat16)

    out_tokens = flash_attn_varlen_func(tokens(q), tokens(k), tokens(v), cu, cu, max_len, max_len,
                                        dropout_p=dropout_p)  # [R, H, Dh]
    out = q.new_zeros(B * L, H, Dh)
    out[flat_real] = out_tokens.to(q.dtype)
    return out.view(B, L, H, Dh).transpose(1, 2)
