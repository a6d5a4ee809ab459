"""Attention kernels behind one seam: ``attend(q, k, v, layout, dropout_p) -> out``.

Every kernel takes q, k, v shaped ``[B, H, L, Dh]`` and a :class:`Layout` that says which tokens are real
(padded batches) and which tokens belong to the same cell (packed batches), and returns ``[B, H, L, Dh]``.

Contract shared by all kernels:

* a query attends only to keys that are real (``padding_mask``) and in the same cell (``doc_ids``);
* with scGPT's generative mask (``known``), a known query attends only to known keys and an unknown query to
  the known keys and itself (exact kernels only; ``performer`` refuses it);
* the output at a padded query position (``padding_mask == False``) is exactly zero, and neither the
  output nor any gradient is ever NaN, even for a row with no real token at all.

Kernels registered in :data:`KERNELS`: ``eager`` (reference maths), ``sdpa``, ``flex`` (FlexAttention block
masks), ``flash`` (flash-attn varlen; registered only with CUDA and the ``gpu`` extra) -- all exact -- and
``performer`` (FAVOR+ linear attention, approximate).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from scfm.errors import ScfmInputError

__all__ = [
    "EXACT_KERNELS",
    "KERNELS",
    "AttentionKernel",
    "Layout",
    "PerformerAttention",
    "eager_attend",
    "flash_attend",
    "flash_available",
    "flex_attend",
    "get_kernel",
    "sdpa_attend",
]


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


def sdpa_attend(q: Tensor, k: Tensor, v: Tensor, layout: Layout, dropout_p: float = 0.0) -> Tensor:
    """Attention via ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask.

    q, k, v: [B, H, L, Dh] -> [B, H, L, Dh]. Padded query rows are 0. A single packed row with
    ``cu_seqlens`` is first scattered to one padded row per cell, so the cost is sum(len_i^2), not T^2
    (a [T, T] block-diagonal mask at T = 12 x 2048 would cost ~13x more on PBMC lengths); ``known`` is
    scattered into the same per-cell grid, so the generative mask keeps that fast path.
    """
    if layout.is_packed and layout.cu_seqlens is not None and q.shape[0] == 1:
        return _sdpa_per_cell(q, k, v, layout, dropout_p)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.safe_attention_mask, dropout_p=dropout_p)
    return _zero_padded_queries(out, layout)  # [B, H, L, Dh]


_BUCKETS_PER_OCTAVE = 4  # cells of a pack are grouped by length within a factor 2^(1/4): PBMC 3k packs then cost
# 1.08x the ideal sum(len^2) of attention instead of 1.18x with one grid padded to the pack's longest cell


def _cell_buckets(layout: Layout, T: int) -> list[tuple[Tensor, Tensor, Tensor, int, Tensor, Tensor]]:
    """Per length bucket of a packed row's cells: (packed token positions, cell slot in the bucket, position in
    the cell, longest length, key mask [nb, 1, 1, Lb], diagonal [Lb, Lb]). Built once per layout (cached)."""
    if "cell_buckets" in layout._cache:
        return layout._cache["cell_buckets"]
    cu = layout.cu_seqlens.long()
    n = cu.numel() - 1
    doc = layout.doc_ids[0]  # [T]
    real = doc < n
    if layout.padding_mask is not None:
        real = real & layout.padding_mask[0]
    tok = torch.nonzero(real).squeeze(-1)  # [R] packed positions of real tokens
    d = doc[tok]
    pos = tok - cu[d]  # position within its cell
    lengths = (cu[1:] - cu[:-1]).clamp_min(1)  # [n]
    key = torch.ceil(torch.log2(lengths.double()) * _BUCKETS_PER_OCTAVE).long()  # [n]
    buckets = []
    for b in torch.unique(key).tolist():
        cells = torch.nonzero(key == b).squeeze(-1)  # [nb]
        slot = torch.full((n,), -1, dtype=torch.long, device=cu.device)
        slot[cells] = torch.arange(cells.numel(), device=cu.device)
        mine = slot[d] >= 0
        t_b, s_b, p_b = tok[mine], slot[d[mine]], pos[mine]
        lmax = int(lengths[cells].max())
        key_real = torch.zeros(cells.numel(), lmax, dtype=torch.bool, device=cu.device)  # [nb, Lb]
        key_real[s_b, p_b] = True  # real tokens only: a padded token inside a cell's span is not a key either
        if layout.known is not None:
            known = torch.zeros_like(key_real)
            known[s_b, p_b] = layout.known[0, t_b]
            key_real = key_real & known  # unknown keys are seen only by themselves (the diagonal)
        eye = torch.eye(lmax, dtype=torch.bool, device=cu.device)  # [Lb, Lb]
        buckets.append((t_b, s_b, p_b, lmax, key_real[:, None, None, :], eye))
    layout._cache["cell_buckets"] = buckets
    return buckets


def _sdpa_per_cell(q: Tensor, k: Tensor, v: Tensor, layout: Layout, dropout_p: float) -> Tensor:
    """Packed [1, H, T, Dh] -> per length bucket, cells padded to the bucket's longest [nb, H, Lb, Dh] -> SDPA
    with key padding (and the generative rule) -> packed again."""
    T, H, Dh = q.shape[2], q.shape[1], q.shape[3]
    out = q.new_zeros(T, H, Dh)  # [T, H, Dh]
    for tok, slot, pos, lmax, keys, eye in _cell_buckets(layout, T):
        def to_cells(x: Tensor, tok=tok, slot=slot, pos=pos, lmax=lmax, nb=keys.shape[0]) -> Tensor:
            grid = x.new_zeros(nb, lmax, H, Dh)  # [nb, Lb, H, Dh]
            grid[slot, pos] = x[0, :, tok].transpose(0, 1)  # [R_b, H, Dh]
            return grid.transpose(1, 2)

        mask = keys | eye  # [nb, 1, Lb, Lb]; the diagonal also keeps padded slots' rows non-empty
        cells = F.scaled_dot_product_attention(to_cells(q), to_cells(k), to_cells(v), attn_mask=mask,
                                               dropout_p=dropout_p)  # [nb, H, Lb, Dh]
        out[tok] = cells.transpose(1, 2)[slot, pos]
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


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """``warnings.warn`` once per process for ``key`` (a fallback is reported, not repeated every layer)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------- flex

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


# ---------------------------------------------------------------- performer (FAVOR+)


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> Tensor:
    """[m, d] random features: stacked Haar-orthogonal d x d blocks, rows rescaled to chi(d) norms (float64)."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        a = torch.randn(d, d, generator=generator, dtype=torch.float64)
        qm, r = torch.linalg.qr(a)
        qm = qm * torch.sign(torch.diagonal(r))[None, :]  # sign fix -> Haar distributed
        blocks.append(qm.T)  # rows orthonormal
    w = torch.cat(blocks)[:m]  # [m, d]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)  # [m], as Gaussian rows
    return w * norms[:, None]


class PerformerAttention:
    """FAVOR+ linear attention (Choromanski et al., ICLR 2021), an unbiased estimate of softmax attention.

    Positive orthogonal random features ``phi(x) = exp(w x - |x|^2 / 2) / sqrt(m)`` with ``x`` scaled by
    ``Dh^-1/4``, so ``E[phi(q) phi(k)] = exp(q k / sqrt(Dh))``; ``out_i = phi(q_i) S_g / phi(q_i) z_g`` with
    ``S_g = sum_j phi(k_j) v_j^T`` and ``z_g = sum_j phi(k_j)`` over the real keys ``j`` of query ``i``'s cell
    ``g`` (one group per row when not packed). Cost is linear in L. The features are drawn from ``seed`` once
    (``redraw=False``) or anew each call (``redraw=True``: seed, seed + 1, ...). Exponents are stabilised by a
    detached max (per query; per cell over real keys), which cancels exactly in the ratio.

    Cannot express scGPT's generative mask (raises). There is no attention matrix to drop out, so ``dropout_p``
    drops keys instead: each (head, key) pair is removed from the numerator sum ``S_g`` with probability p and
    the survivors are scaled by 1 / (1 - p), leaving the normaliser ``z_g`` intact -- the expectation equals
    the dropout-free output, as with dropout on softmax probabilities (but shared by all queries).
    """

    def __init__(self, nb_features: int = 256, seed: int = 0, redraw: bool = False) -> None:
        if not isinstance(nb_features, int) or nb_features <= 0:
            raise ScfmInputError(
                f"nb_features must be a positive integer, got {nb_features!r}", where="attention.performer"
            )
        self.nb_features = nb_features
        self.seed = seed
        self.redraw = redraw
        self._draws = 0
        self._proj: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    def projection(self, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """[nb_features, dim] feature matrix (fixed unless ``redraw``)."""
        key = (dim, device, dtype)
        if self.redraw or key not in self._proj:
            g = torch.Generator().manual_seed(self.seed + self._draws)
            if self.redraw:
                self._draws += 1
            self._proj[key] = orthogonal_gaussian(self.nb_features, dim, g).to(device=device, dtype=dtype)
        return self._proj[key]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, layout: Layout, dropout_p: float = 0.0) -> Tensor:
        """q, k, v: [B, H, L, Dh] -> [B, H, L, Dh]; padded query rows are 0."""
        if layout.known is not None:
            raise ScfmInputError(
                "performer cannot express scGPT's generative mask (layout.known is set)",
                where="attention.performer",
                fix="use attention=flex|sdpa|eager",
            )
        B, H, L, Dh = q.shape
        w = self.projection(Dh, q.device, q.dtype)  # [m, Dh]
        scale = Dh**-0.25
        if layout.doc_ids is not None:
            doc = layout.doc_ids.long().expand(B, L)  # [B, L]
            G = int(doc.max()) + 1 if doc.numel() else 1
        else:
            doc = torch.zeros(B, L, dtype=torch.long, device=q.device)
            G = 1
        pm = layout.padding_mask
        key_ok = pm.expand(B, L) if pm is not None else torch.ones_like(doc, dtype=torch.bool)  # [B, L]

        def logits(x: Tensor) -> Tensor:  # [B, H, L, Dh] -> [B, H, L, m]: w x - |x|^2 / 2
            x = x * scale
            return x @ w.T - (x * x).sum(-1, keepdim=True) / 2

        lq = logits(q)
        phi_q = torch.exp(lq - lq.amax(-1, keepdim=True).detach())  # [B, H, L, m]
        lk = logits(k).masked_fill(~key_ok[:, None, :, None], -math.inf)  # padded keys: phi = 0
        tok_max = lk.detach().amax(-1)  # [B, H, L]
        idx = doc[:, None, :].expand(B, H, L)
        group_max = tok_max.new_full((B, H, G), -math.inf).scatter_reduce(-1, idx, tok_max, "amax")  # [B, H, G]
        stab = group_max.gather(-1, idx)  # [B, H, L]
        stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))
        phi_k = torch.exp(lk - stab[..., None])  # [B, H, L, m]; the 1 / sqrt(m) cancels in the ratio

        # Per-cell sums without a [G, L, m] tensor: spread v over its cell's slot ([L, G * Dh], zeros elsewhere),
        # so one matmul gives every cell's S_g; memory O(L G Dh) (G = 1 when not packed).
        onehot = F.one_hot(doc, G).to(q.dtype)[:, None]  # [B, 1, L, G]
        vg = v[..., None, :] * onehot[..., None]  # [B, H, L, G, Dh]
        if dropout_p > 0.0:  # key dropout in the numerator only (see the class docstring)
            keep = torch.rand(B, H, L, 1, 1, device=q.device) >= dropout_p
            vg = vg * keep / (1.0 - dropout_p)
        phi_kt = phi_k.transpose(-1, -2)  # [B, H, m, L]
        kv = phi_kt @ vg.flatten(-2)  # [B, H, m, G * Dh]
        z = phi_kt @ onehot  # [B, H, m, G]
        num = ((phi_q @ kv).unflatten(-1, (G, Dh)) * onehot[..., None]).sum(-2)  # [B, H, L, Dh]: own cell's S_g
        den = ((phi_q @ z) * onehot).sum(-1, keepdim=True)  # [B, H, L, 1]
        out = num / den.clamp_min(torch.finfo(den.dtype).tiny)
        return _zero_padded_queries(out, layout)  # [B, H, L, Dh]


# ---------------------------------------------------------------- flash


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


# ---------------------------------------------------------------- registry

EXACT_KERNELS: tuple[str, ...] = ("eager", "sdpa", "flex", "flash")
"""Kernels that compute softmax attention exactly (equal to ``eager`` within rounding)."""

KERNELS: dict[str, AttentionKernel] = {
    "eager": eager_attend,
    "sdpa": sdpa_attend,
    "flex": flex_attend,
    "performer": PerformerAttention(),
}
if flash_available():  # CUDA + the `gpu` extra
    KERNELS["flash"] = flash_attend


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
        exact = [n for n in EXACT_KERNELS if n in KERNELS]
        approx = sorted(n for n in KERNELS if n not in EXACT_KERNELS)
        raise ScfmInputError(
            f"unknown attention kernel {name!r}",
            where="attention",
            fix=f"use one of the exact kernels {', '.join(exact)}"
            + (f" or the approximate {', '.join(approx)}" if approx else ""),
        ) from None
