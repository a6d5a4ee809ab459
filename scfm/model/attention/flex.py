"""``flex``: FlexAttention with a ``BlockMask`` built from the layout (padding, same cell, generative), compiled
where the platform allows; the eager flex_attention (or SDPA on the dense mask of the same rule) otherwise."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from scfm.model.attention.layout import Layout, _zero_padded_queries

__all__ = ["flex_attend"]

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """``warnings.warn`` once per process for ``key`` (a fallback is reported, not repeated every layer)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# torch.compile(flex_attention) per device type, built on first use; "failed" once compiling is known not to work.
_FLEX: dict[str, Any] = {"compiled": {}, "failed": False}


def _flex_mask_mod(layout: Layout) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None:
    """The layout as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``; None when everything may attend.

    Same rule as :attr:`Layout.safe_attention_mask`: key real, same cell, key known (generative), or the key is
    the query itself (which keeps padded rows non-empty; real rows see themselves anyway).
    """
    pm, doc, known = layout.padding_mask, layout.doc_ids, layout.known
    if pm is None and doc is None and known is None:
        return None

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = q_idx == kv_idx
        rule = None
        if pm is not None:
            rule = pm[b, kv_idx]
        if doc is not None:
            same = doc[b, q_idx] == doc[b, kv_idx]
            rule = same if rule is None else rule & same
        if known is not None:
            rule = known[b, kv_idx] if rule is None else rule & known[b, kv_idx]
        return ok | rule

    return mask_mod


def _flex_block_mask(layout: Layout, B: int, L: int, device: torch.device) -> Any:
    """The layout's ``BlockMask`` (cached on the layout); None when everything may attend."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = f"flex_block_{B}_{L}_{device}"
    if key not in layout._cache:
        mask_mod = _flex_mask_mod(layout)
        layout._cache[key] = None if mask_mod is None else create_block_mask(mask_mod, B, None, L, L, device=device)
    return layout._cache[key]


def _compiled_flex(device_type: str) -> Callable[..., Tensor] | None:
    """``torch.compile(flex_attention)``, or None once compiling failed on this platform.

    On the CPU shapes are static (``dynamic=False``): inductor's dynamic-shape CPU flex template fails to build
    in torch 2.13 (``cur_kvSplitSize4 was not declared``); each new length recompiles instead.
    """
    if _FLEX["failed"]:
        return None
    if device_type not in _FLEX["compiled"]:
        try:
            _FLEX["compiled"][device_type] = _compile_flex(device_type)
        except Exception as err:  # any failure means: no compiler here
            _flex_compile_failed(err)
            return None
    return _FLEX["compiled"][device_type]


def _compile_flex(device_type: str) -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


def _flex_compile_failed(err: BaseException) -> None:
    _FLEX["failed"] = True
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    _warn_once(
        "flex-compile",
        f"torch.compile(flex_attention) is unavailable on this platform ({type(err).__name__}: {first}); "
        "attention=flex falls back to the eager (uncompiled) flex_attention, which is exact but materialises "
        "the full score matrix (slow, O(L^2) memory). Use attention=sdpa for speed.",
    )


def _run_flex(q: Tensor, k: Tensor, v: Tensor, block_mask: Any) -> Tensor:
    """Compiled flex_attention, or the eager one (with a one-time warning) when compiling fails."""
    fn = _compiled_flex(q.device.type)
    if fn is not None:
        try:
            return fn(q, k, v, block_mask=block_mask)
        except Exception as err:  # inductor / C++ toolchain errors surface here, at the first call
            out = _eager_flex(q, k, v, block_mask)  # an error of the inputs themselves raises here too
            _flex_compile_failed(err)
            return out
    return _eager_flex(q, k, v, block_mask)


def _eager_flex(q: Tensor, k: Tensor, v: Tensor, block_mask: Any) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():  # torch's own "called without torch.compile" warning: we already said so
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask)


def flex_attend(q: Tensor, k: Tensor, v: Tensor, layout: Layout, dropout_p: float = 0.0) -> Tensor:
    """Attention via FlexAttention with a ``BlockMask`` from the layout (padding, same cell, generative).

    q, k, v: [B, H, L, Dh] -> [B, H, L, Dh]. Padded query rows are 0. The block mask is built once per layout
    and reused by every layer. FlexAttention has no attention dropout and, in torch 2.x, no backward on CPU:
    with ``dropout_p > 0``, or when gradients are needed on a CPU tensor, the same ``mask_mod`` is materialised
    as a dense mask and fed to SDPA (exact; a one-time warning says so).
    """
    B, _, L, _ = q.shape
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    cpu_grad = needs_grad and q.device.type in ("cpu", "mps")
    if cpu_grad or dropout_p > 0.0:
        why = (
            f"FlexAttention has no backward on {q.device.type} (torch {torch.__version__})"
            if cpu_grad
            else "FlexAttention has no attention dropout"
        )
        _warn_once(
            f"flex-dense-{cpu_grad}",
            f"{why}; attention=flex computes these passes with SDPA on the dense mask of the same mask_mod "
            "(exact, but O(L^2) memory)",
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.safe_attention_mask,  # = the mask_mod's rule
                                             dropout_p=dropout_p)
    else:
        if not needs_grad:  # flex refuses CPU inputs that require grad, even under no_grad
            q, k, v = q.detach(), k.detach(), v.detach()
        out = _run_flex(q, k, v, _flex_block_mask(layout, B, L, q.device))
    return _zero_padded_queries(out, layout)  # [B, H, L, Dh]
