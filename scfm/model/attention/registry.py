"""Which attention kernels exist and what each can do.

:data:`SPECS` holds one :class:`KernelSpec` per kernel (all five, whether or not this machine can run them):
configuration checks read its capability flags (:func:`kernel_problem`) instead of testing kernel names.
:data:`KERNELS` holds the callables of the kernels that can run here (``flash`` only with CUDA and flash-attn);
:func:`get_kernel` looks one up. Both come from one table, so a new kernel touches its module, one row of
that table, ``conf/attention/<name>.yaml`` and its parity test.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from scfm.errors import ScfmInputError
from scfm.model.attention.eager import eager_attend
from scfm.model.attention.flash import flash_attend
from scfm.model.attention.flex import flex_attend
from scfm.model.attention.layout import AttentionKernel
from scfm.model.attention.performer import PerformerAttention
from scfm.model.attention.sdpa import sdpa_attend

__all__ = ["EXACT_KERNELS", "KERNELS", "MASKS", "SPECS", "KernelSpec", "get_kernel", "kernel_problem", "kernel_spec"]

MASKS: frozenset[str] = frozenset({"padding", "packed", "generative"})
"""Layouts a kernel may express: padded rows, packed cells (same-cell blocks), scGPT's generative mask."""


@dataclass(frozen=True)
class KernelSpec:
    """What one attention kernel can do: validation reads these flags, never the kernel's name."""

    name: str
    exact: bool  # softmax attention exactly (equal to eager within rounding), or an approximation
    masks: frozenset[str]  # the layouts it can express, a subset of MASKS
    needs_cuda: bool = False
    packages: tuple[str, ...] = ()  # importable modules it needs beyond torch
    description: str = ""


# The one table of kernels: (spec, callable). A new kernel adds one row here.
_REGISTRY: tuple[tuple[KernelSpec, AttentionKernel], ...] = (
    (KernelSpec("eager", exact=True, masks=MASKS,
                description="reference maths, softmax(q k^T / sqrt(Dh) + mask) v in plain torch"), eager_attend),
    (KernelSpec("sdpa", exact=True, masks=MASKS,
                description="torch scaled_dot_product_attention; packed rows run per cell"), sdpa_attend),
    (KernelSpec("flex", exact=True, masks=MASKS,
                description="FlexAttention block masks, compiled where the platform allows"), flex_attend),
    (KernelSpec("flash", exact=True, masks=frozenset({"padding", "packed"}), needs_cuda=True, packages=("flash_attn",),
                description="flash-attn varlen over the real tokens of every cell"), flash_attend),
    (KernelSpec("performer", exact=False, masks=frozenset({"padding", "packed"}),
                description="FAVOR+ linear attention (random features), approximate"), PerformerAttention()),
)

SPECS: dict[str, KernelSpec] = {spec.name: spec for spec, _ in _REGISTRY}
"""Every kernel's spec, runnable on this machine or not."""

EXACT_KERNELS: tuple[str, ...] = tuple(n for n, s in SPECS.items() if s.exact)
"""Kernels that compute softmax attention exactly (equal to ``eager`` within rounding)."""


def _runnable(spec: KernelSpec) -> bool:
    """CUDA present if the kernel needs it, and its packages import (``flash``: :func:`flash_available`)."""
    if spec.needs_cuda and not torch.cuda.is_available():
        return False
    try:
        for package in spec.packages:
            importlib.import_module(package)
    except ImportError:
        return False
    return True


KERNELS: dict[str, AttentionKernel] = {spec.name: kernel for spec, kernel in _REGISTRY if _runnable(spec)}
"""The kernels that can run here, by name (``flash`` only with CUDA and the ``gpu`` extra)."""


def _unknown(name: str) -> ScfmInputError:
    exact = [n for n in EXACT_KERNELS if n in KERNELS]
    approx = sorted(n for n in KERNELS if n not in EXACT_KERNELS)
    return ScfmInputError(
        f"unknown attention kernel {name!r}",
        where="attention",
        fix=f"use one of the exact kernels {', '.join(exact)}"
        + (f" or the approximate {', '.join(approx)}" if approx else ""),
    )


def get_kernel(name: str) -> AttentionKernel:
    """The attention kernel registered under ``name``; raises listing the valid names otherwise."""
    if name == "flash" and name not in KERNELS:
        raise ScfmInputError(
            "attention kernel 'flash' (flash-attn varlen) is not available",
            where="attention",
            fix="flash-attn needs CUDA and the `gpu` extra (pip install 'scfm[gpu]'); "
            "use attention=sdpa or attention=flex meanwhile",
        )
    try:
        return KERNELS[name]
    except KeyError:
        raise _unknown(name) from None


def kernel_spec(name: str) -> KernelSpec:
    """The :class:`KernelSpec` of ``name`` (any kernel, runnable here or not); raises as :func:`get_kernel`."""
    try:
        return SPECS[name]
    except KeyError:
        raise _unknown(name) from None


def kernel_problem(name: str, *, needs: set[str], device_type: str) -> str | None:
    """One line on why kernel ``name`` cannot serve a run needing the masks ``needs`` (a subset of :data:`MASKS`)
    on ``device_type`` ("cpu", "cuda", ...), or None when it can. Reads the spec, and ``importlib`` for its
    packages; raises for an unknown kernel or mask name."""
    spec = kernel_spec(name)
    if not needs <= MASKS:
        raise ValueError(f"unknown mask kinds {sorted(needs - MASKS)}; known: {sorted(MASKS)}")
    lacking = sorted(needs - spec.masks)
    if lacking:
        return f"attention={name} cannot express the {' and '.join(lacking)} mask"
    if spec.needs_cuda and device_type != "cuda":
        return f"attention={name} needs CUDA, not {device_type}"
    missing = [p for p in spec.packages if importlib.util.find_spec(p) is None]
    if missing:
        return f"attention={name} needs the package {', '.join(missing)}, which is not installed"
    return None
