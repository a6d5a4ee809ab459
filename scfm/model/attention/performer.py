"""``performer``: FAVOR+ linear attention (Choromanski et al., ICLR 2021), and the FAVOR+ maths that
scFoundation's decoder (:class:`scfm.model.xtrimo.DecoderSelfAttention`) shares with it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from scfm.errors import ScfmInputError
from scfm.model.attention.layout import Layout, _zero_padded_queries

__all__ = ["PerformerAttention", "favor_attention", "orthogonal_gaussian"]


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


def favor_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, key_mask: Tensor | None = None,
                    eps: float | None = 1e-4, *, doc_ids: Tensor | None = None, key_max: str = "cell",
                    dropout_p: float = 0.0) -> Tensor:
    """FAVOR+ attention summed per cell: the maths of ``performer`` and of scFoundation's decoder.

    q, k, v: [B, H, L, Dh]; projection: [m, Dh] random features ``w``; key_mask: [B, L], True = real key;
    doc_ids: [B, L] cell of each token of a packed row (None: one cell per row). With ``x' = x Dh^-1/4``,
    ``out_i = phi(q_i) S_g / phi(q_i) z_g``, ``S_g = sum_j phi(k_j) v_j^T``, ``z_g = sum_j phi(k_j)`` over the
    real keys ``j`` of query ``i``'s cell ``g``. Features, with a detached stabiliser ``c``:

    * ``eps`` a float (scFoundation's ``softmax_kernel``): ``phi(x) = m^-1/2 (exp(w x' - |x'|^2 / 2 - c) + eps)``,
      ``c`` the max of ``w x'`` (per query token for queries); the forward equals scFoundation's.
    * ``eps=None`` (``PerformerAttention``): ``phi(x) = exp(w x' - |x'|^2 / 2 - c)``, ``c`` the max of the whole
      exponent, so the largest feature is 1; ``c`` and the ``m^-1/2`` cancel exactly in the ratio.

    ``key_max`` is the key stabiliser's scope: ``"cell"`` one max over all heads, keys and features of each cell
    (scFoundation's, per cell instead of per batch), ``"head"`` one per head and cell. ``dropout_p`` drops
    (head, key) pairs from the numerator only, survivors scaled by 1 / (1 - p). Padded query rows are not zeroed
    (callers do). The stabilisers are detached (scFoundation's are not: same forward, its gradient also flows
    through the maxima). -> [B, H, L, Dh].
    """
    B, H, L, Dh = q.shape
    norm = Dh**-0.25
    w = projection.to(q.dtype)
    qd, kd = (q * norm) @ w.T, (k * norm) @ w.T  # [B, H, L, m]: w x'
    lq = qd - (q * q).sum(-1, keepdim=True) * (norm**2 / 2)  # [B, H, L, m]: w x' - |x'|^2 / 2
    lk = kd - (k * k).sum(-1, keepdim=True) * (norm**2 / 2)
    phi_q = torch.exp(lq - (lq if eps is None else qd).detach().amax(-1, keepdim=True))  # [B, H, L, m]

    key_ok = None if key_mask is None else key_mask.expand(B, L)[:, None, :, None]  # [B, 1, L, 1]
    if key_ok is not None:  # padded keys: phi = 0
        lk = lk.masked_fill(~key_ok, -math.inf)
    src = (lk if eps is None else kd if key_ok is None else kd.masked_fill(~key_ok, -math.inf)).detach()
    tok_max = src.amax(-1)  # [B, H, L]
    if key_max == "cell":
        tok_max = tok_max.amax(1, keepdim=True)  # [B, 1, L]: over all heads
    elif key_max != "head":
        raise ValueError(f"key_max must be 'cell' or 'head', got {key_max!r}")
    doc = None if doc_ids is None else doc_ids.long().expand(B, L)  # [B, L]
    if doc is None:
        stab = tok_max.amax(-1, keepdim=True)  # [B, H | 1, 1]
    else:
        G = int(doc.max()) + 1 if doc.numel() else 1
        idx = doc[:, None, :].expand_as(tok_max)
        group_max = tok_max.new_full((*tok_max.shape[:2], G), -math.inf).scatter_reduce(-1, idx, tok_max, "amax")
        stab = group_max.gather(-1, idx)  # [B, H | 1, L]
    stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))  # a cell without real keys
    phi_k = torch.exp(lk - stab[..., None])  # [B, H, L, m]
    if eps is not None:
        ratio = projection.shape[0] ** -0.5
        phi_q = ratio * (phi_q + eps)
        phi_k = ratio * (phi_k + eps)
        if key_ok is not None:
            phi_k = phi_k * key_ok

    if dropout_p > 0.0:  # key dropout in the numerator only
        keep = torch.rand(B, H, L, 1, device=q.device) >= dropout_p
        v = v * keep / (1.0 - dropout_p)
    phi_kt = phi_k.transpose(-1, -2)  # [B, H, m, L]
    if doc is None:
        num = phi_q @ (phi_kt @ v)  # [B, H, L, Dh]
        den = phi_q @ phi_k.sum(-2)[..., None]  # [B, H, L, 1]
    else:
        # Per-cell sums without a [G, L, m] tensor: spread v over its cell's slot ([L, G * Dh], zeros elsewhere),
        # so one matmul gives every cell's S_g; memory O(L G Dh).
        onehot = F.one_hot(doc, G).to(q.dtype)[:, None]  # [B, 1, L, G]
        vg = v[..., None, :] * onehot[..., None]  # [B, H, L, G, Dh]
        kv = phi_kt @ vg.flatten(-2)  # [B, H, m, G * Dh]
        z = phi_kt @ onehot  # [B, H, m, G]
        num = ((phi_q @ kv).unflatten(-1, (G, Dh)) * onehot[..., None]).sum(-2)  # [B, H, L, Dh]: own cell's S_g
        den = ((phi_q @ z) * onehot).sum(-1, keepdim=True)  # [B, H, L, 1]
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)  # [B, H, L, Dh]


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
        w = self.projection(q.shape[-1], q.device, q.dtype)  # [m, Dh]
        out = favor_attention(q, k, v, w, layout.padding_mask, eps=None, doc_ids=layout.doc_ids, key_max="head",
                              dropout_p=dropout_p)
        return _zero_padded_queries(out, layout)  # [B, H, L, Dh]
