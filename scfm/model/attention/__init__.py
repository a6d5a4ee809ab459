"""Attention kernels behind one seam: ``attend(q, k, v, layout, dropout_p) -> out``, q, k, v, out ``[B, H, L, Dh]``.

Public API:

* :class:`Layout` -- which tokens of a batch are real, which share a cell, which are known (scGPT); and
  :class:`AttentionKernel`, the kernel protocol (``layout``).
* The kernels: :func:`eager_attend` (reference maths), :func:`sdpa_attend`, :func:`flex_attend` (FlexAttention
  block masks), :func:`flash_attend` (flash-attn varlen; :func:`flash_available` says whether it can run) -- all
  exact -- and :class:`PerformerAttention` (FAVOR+, approximate), whose maths :func:`favor_attention` also serves
  scFoundation's decoder, with :func:`orthogonal_gaussian` random features.
* The registry: :data:`SPECS` (a :class:`KernelSpec` of capability flags per kernel), :func:`kernel_spec`,
  :func:`kernel_problem` (why a kernel cannot serve a run, or None), :data:`KERNELS` (the callables runnable here),
  :func:`get_kernel`, :data:`EXACT_KERNELS`, :data:`MASKS`.

Module state that tests patch lives in the kernel modules: ``flex._FLEX``, ``flex._WARNED``,
``flex._compile_flex``, ``sdpa._sdpa_per_cell``.
"""

from scfm.model.attention.eager import eager_attend
from scfm.model.attention.flash import flash_attend, flash_available
from scfm.model.attention.flex import flex_attend
from scfm.model.attention.layout import AttentionKernel, Layout
from scfm.model.attention.performer import PerformerAttention, favor_attention, orthogonal_gaussian
from scfm.model.attention.registry import (
    EXACT_KERNELS,
    KERNELS,
    MASKS,
    SPECS,
    KernelSpec,
    get_kernel,
    kernel_problem,
    kernel_spec,
)
from scfm.model.attention.sdpa import sdpa_attend

__all__ = [
    "EXACT_KERNELS",
    "KERNELS",
    "MASKS",
    "SPECS",
    "AttentionKernel",
    "KernelSpec",
    "Layout",
    "PerformerAttention",
    "eager_attend",
    "favor_attention",
    "flash_attend",
    "flash_available",
    "flex_attend",
    "get_kernel",
    "kernel_problem",
    "kernel_spec",
    "orthogonal_gaussian",
    "sdpa_attend",
]
