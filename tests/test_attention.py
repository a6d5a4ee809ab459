"""Attention kernels: generative (scGPT) mask, flex and performer kernels, registry.

Exact kernels (sdpa, flex) must equal the eager reference in outputs and in gradients w.r.t. q, k, v on padded,
packed, generative and packed + generative layouts; performer approximates softmax attention with an error that
falls as the number of random features grows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention.flex_attention import flex_attention as eager_flex_attention

import scfm.model.attention as attention
import scfm.model.attention.flex as flex_module
import scfm.model.attention.sdpa as sdpa_module
from scfm.errors import ScfmInputError
from scfm.model.attention import (
    EXACT_KERNELS,
    KERNELS,
    SPECS,
    Layout,
    PerformerAttention,
    eager_attend,
    flex_attend,
    get_kernel,
    kernel_problem,
    kernel_spec,
    sdpa_attend,
)

LENGTHS = (5, 9, 3)
H, DH = 2, 8
TOLS = {torch.float64: 1e-6, torch.float32: 1e-5}


# ---------------------------------------------------------------- helpers


def _known(lengths, seed: int = 0) -> list[torch.Tensor]:
    """Per cell: <cls> (position 0) known, then a random ~half of the genes known."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        k = torch.rand(n, generator=g) < 0.5
        k[:1] = True
        out.append(k)
    return out


def padded_layout(lengths=LENGTHS, length: int = 11, generative: bool = False) -> Layout:
    mask = torch.zeros(len(lengths), length, dtype=torch.bool)
    known = torch.zeros(len(lengths), length, dtype=torch.bool)
    for i, (n, kn) in enumerate(zip(lengths, _known(lengths), strict=True)):
        mask[i, :n] = True
        known[i, :n] = kn
    return Layout.from_batch({"padding_mask": mask, **({"known": known} if generative else {})})


def packed_layout(lengths=LENGTHS, tail: int = 0, generative: bool = False, cu: bool = True) -> Layout:
    """One packed row; ``tail`` trailing padding tokens; ``cu=False`` drops cu_seqlens (dense mask path)."""
    lt = torch.tensor(lengths)
    T, n = int(lt.sum()), len(lengths)
    doc = torch.cat([torch.repeat_interleave(torch.arange(n), lt), torch.full((tail,), n)])[None]
    batch = {"doc_ids": doc}
    if cu:
        batch["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.long), lt.cumsum(0)]).to(torch.int32)
    if tail:
        batch["padding_mask"] = torch.arange(T + tail)[None] < T
    if generative:
        batch["known"] = torch.cat([*_known(lengths), torch.zeros(tail, dtype=torch.bool)])[None]
    return Layout.from_batch(batch)


LAYOUTS = {
    "padded": lambda: padded_layout(),
    "padded+empty": lambda: padded_layout((*LENGTHS, 0)),
    "packed": lambda: packed_layout(),
    "packed+tail": lambda: packed_layout(tail=4),
    "generative": lambda: Layout(known=torch.stack(_known((12, 12, 12)))),
    "padded+generative": lambda: padded_layout(generative=True),
    "packed+generative": lambda: packed_layout(generative=True),
    "packed+tail+generative": lambda: packed_layout(tail=4, generative=True),
    "packed+generative(dense)": lambda: packed_layout(tail=4, generative=True, cu=False),
    "none": lambda: Layout(),
}


def shape_of(layout: Layout) -> tuple[int, int]:
    for t in (layout.padding_mask, layout.doc_ids, layout.known):
        if t is not None:
            return tuple(t.shape)
    return (3, 12)


def qkv(B: int, L: int, dtype=torch.float64, seed: int = 0, scale: float = 1.0, dh: int = DH) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, L, dh, generator=g, dtype=dtype) * scale).requires_grad_() for _ in range(3)]


def real_rows(layout: Layout, B: int, L: int) -> torch.Tensor:
    """[B, 1, L, 1] bool: True for real query rows."""
    pm = layout.padding_mask if layout.padding_mask is not None else torch.ones(B, L, dtype=torch.bool)
    return pm[:, None, :, None]


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """Route flex through the uncompiled flex_attention (same maths, no inductor build) to keep tests fast."""
    monkeypatch.setattr(flex_module, "_FLEX", {"compiled": {"cpu": eager_flex_attention}, "failed": False})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
        yield


def assert_matches_eager(kernel, layout: Layout, dtype=torch.float64, grads: bool = True) -> None:
    B, L = shape_of(layout)
    tol = TOLS[dtype]
    q1, k1, v1 = qkv(B, L, dtype)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q1, k1, v1))
    with torch.set_grad_enabled(grads):
        out = kernel(q1, k1, v1, layout)
        ref = eager_attend(q2, k2, v2, layout)
    real = real_rows(layout, B, L).expand_as(out)
    assert torch.isfinite(out).all()
    assert (out[~real] == 0).all(), "padded query rows must be exactly zero"
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    if not grads:
        return
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype) * real
    (out * cot).sum().backward()
    (ref * cot).sum().backward()
    for a, b in ((q1, q2), (k1, k2), (v1, v2)):
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
        torch.testing.assert_close(a.grad, b.grad, atol=tol, rtol=tol)


# ---------------------------------------------------------------- generative layout


def test_generative_mask_rule_by_hand() -> None:
    """rows = queries: known -> known keys only; unknown -> known keys and itself."""
    known = torch.tensor([[True, True, False, True, False]])
    m = Layout(known=known).attention_mask[0, 0]
    expected = torch.tensor(
        [
            [1, 1, 0, 1, 0],
            [1, 1, 0, 1, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 0, 1, 0],
            [1, 1, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)
    # Combined with padding (last token padded) and packing (cells [0, 1, 2] and [3, 4]).
    pm, doc = torch.tensor([[True] * 4 + [False]]), torch.tensor([[0, 0, 0, 1, 1]])
    lay = Layout(padding_mask=pm, doc_ids=doc, known=known)
    m = lay.attention_mask[0, 0]
    assert torch.equal(m[2], torch.tensor([1, 1, 1, 0, 0], dtype=torch.bool))  # unknown, cell 0
    assert torch.equal(m[3], torch.tensor([0, 0, 0, 1, 0], dtype=torch.bool))  # known, cell 1
    assert not m[:, 4].any()  # the padded key is seen by nobody
    assert lay.safe_attention_mask.any(-1).all()


@pytest.mark.parametrize("kernel", ["eager", "sdpa", "flex"])
def test_generative_rule_on_outputs(kernel: str, uncompiled_flex) -> None:
    attend = get_kernel(kernel)
    known = torch.tensor([[True, False, True, True, False, False, True]])
    layout = Layout(known=known)
    q, k, v = (t.detach() for t in qkv(1, 7))
    out = attend(q, k, v, layout)
    unknown = ~known[0]
    # Known tokens' outputs ignore unknown tokens' keys / values.
    k2, v2 = k.clone(), v.clone()
    k2[:, :, unknown], v2[:, :, unknown] = 3.0, -5.0
    out2 = attend(q, k2, v2, layout)
    torch.testing.assert_close(out2[:, :, known[0]], out[:, :, known[0]], atol=1e-12, rtol=0)
    assert not torch.allclose(out2[:, :, unknown], out[:, :, unknown])  # ... but unknown tokens see themselves
    # Token 4 (unknown) ignores tokens 1 and 5 (other unknowns), and depends on itself.
    k3, v3 = k.clone(), v.clone()
    k3[:, :, [1, 5]], v3[:, :, [1, 5]] = 2.0, 7.0
    torch.testing.assert_close(attend(q, k3, v3, layout)[:, :, 4], out[:, :, 4], atol=1e-12, rtol=0)
    k4, v4 = k.clone(), v.clone()
    v4[:, :, 4] += 1.0
    assert not torch.allclose(attend(q, k4, v4, layout)[:, :, 4], out[:, :, 4])
    # Matches softmax over {known keys} + itself, computed by hand.
    i = 4
    cols = known[0].clone()
    cols[i] = True
    s = (q[0, :, i, None] @ k[0][:, cols].transpose(-1, -2))[:, 0] / DH**0.5  # [H, n]
    ref = (s.softmax(-1)[:, None] @ v[0][:, cols])[:, 0]
    torch.testing.assert_close(out[0, :, i], ref, atol=1e-10, rtol=1e-10)


def test_layout_known_from_batch_and_validation() -> None:
    known = torch.tensor([[True, False, True]])
    lay = Layout.from_batch({"known": known, "padding_mask": torch.ones(1, 3, dtype=torch.bool)})
    assert lay.is_generative and torch.equal(lay.known, known)
    assert not Layout().is_generative
    with pytest.raises(ScfmInputError, match="known must be bool"):
        Layout(known=known.long())
    with pytest.raises(ScfmInputError, match="disagree in shape"):
        Layout(padding_mask=torch.ones(1, 4, dtype=torch.bool), known=known)


def test_sdpa_packed_generative_uses_per_cell_path_and_matches_dense(monkeypatch) -> None:
    calls = []
    real = sdpa_module._sdpa_per_cell
    monkeypatch.setattr(sdpa_module, "_sdpa_per_cell", lambda *a: calls.append(1) or real(*a))
    fast, dense = packed_layout(tail=4, generative=True), packed_layout(tail=4, generative=True, cu=False)
    q, k, v = (t.detach() for t in qkv(*shape_of(fast)))
    out_fast, out_dense = sdpa_attend(q, k, v, fast), sdpa_attend(q, k, v, dense)
    assert calls == [1]
    torch.testing.assert_close(out_fast, out_dense, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- exact kernels == eager


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_matches_eager(name: str, dtype: torch.dtype) -> None:
    assert_matches_eager(sdpa_attend, LAYOUTS[name](), dtype)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flex_matches_eager_forward(name: str, dtype: torch.dtype, uncompiled_flex) -> None:
    """The real FlexAttention path (BlockMask from the mask_mod), no autograd."""
    assert_matches_eager(flex_attend, LAYOUTS[name](), dtype, grads=False)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_flex_matches_eager_with_grads(name: str, uncompiled_flex) -> None:
    """On the CPU FlexAttention has no backward: grads go through SDPA on the dense mask of the same mask_mod."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert_matches_eager(flex_attend, LAYOUTS[name](), torch.float64)


@pytest.mark.slow
def test_flex_compiled_on_cpu_matches_eager(monkeypatch) -> None:
    """One real torch.compile(flex_attention) build (float32, no grad) that must not fall back.

    Slow: a cold inductor build takes 8-17 s on the CPU. (tests/test_model.py's no-grad flex cases also run the
    compiled kernel in the default suite.)
    """
    monkeypatch.setattr(flex_module, "_FLEX", {"compiled": {}, "failed": False})
    assert_matches_eager(flex_attend, LAYOUTS["packed+tail+generative"](), torch.float32, grads=False)
    assert "cpu" in flex_module._FLEX["compiled"] and not flex_module._FLEX["failed"]


def test_flex_falls_back_when_compile_raises(monkeypatch) -> None:
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(flex_module, "_FLEX", {"compiled": {}, "failed": False})
    monkeypatch.setattr(flex_module, "_WARNED", set())
    monkeypatch.setattr(flex_module, "_compile_flex", broken_compile)  # torch.compile itself: eager flex uses it
    layout = LAYOUTS["packed+tail+generative"]()
    with pytest.warns(RuntimeWarning, match=r"torch.compile\(flex_attention\) is unavailable.*no C\+\+ compiler"):
        assert_matches_eager(flex_attend, layout, grads=False)
    assert flex_module._FLEX["failed"]
    with warnings.catch_warnings():  # one-time: the next call is quiet
        warnings.simplefilter("error", RuntimeWarning)
        assert_matches_eager(flex_attend, layout, grads=False)


def test_flex_falls_back_when_compiled_call_fails(monkeypatch) -> None:
    """Inductor errors surface at the first call of the compiled function, not at torch.compile."""

    def failing(*args, **kwargs):
        raise RuntimeError("InductorError: CppCompileError")

    monkeypatch.setattr(flex_module, "_FLEX", {"compiled": {"cpu": failing}, "failed": False})
    monkeypatch.setattr(flex_module, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="falls back to the eager"):
        assert_matches_eager(flex_attend, LAYOUTS["padded+generative"](), grads=False)
    assert flex_module._FLEX["failed"]


def assert_matches_eager_on_gpu(kernel, name: str, out_tol: float, grad_tol: float) -> None:
    """``kernel`` vs ``eager`` on CUDA (float32 inputs), outputs and gradients at the real rows. Head size 16:
    compiled flex needs at least 16 on CUDA, and with 8 it fell back to the eager flex_attention."""
    layout = LAYOUTS[name]()
    dev = torch.device("cuda")
    for f in ("padding_mask", "doc_ids", "cu_seqlens", "known"):
        if getattr(layout, f) is not None:
            setattr(layout, f, getattr(layout, f).to(dev))
    B, L = shape_of(layout)
    q1, k1, v1 = (t.detach().to(dev).requires_grad_() for t in qkv(B, L, torch.float32, dh=16))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q1, k1, v1))
    out, ref = kernel(q1, k1, v1, layout), eager_attend(q2, k2, v2, layout)
    torch.testing.assert_close(out, ref, atol=out_tol, rtol=out_tol)
    real = real_rows(layout, B, L).to(dev)
    (out * real).sum().backward()
    (ref * real).sum().backward()
    for a, b in ((q1, q2), (k1, k2), (v1, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=grad_tol, rtol=grad_tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_flex_matches_eager_on_gpu(name: str, monkeypatch) -> None:
    monkeypatch.setattr(flex_module, "_FLEX", {"compiled": {}, "failed": False})  # compiled, as in training
    # past dynamo's recompile limit torch runs flex_attention uncompiled without raising: make that an error
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    assert_matches_eager_on_gpu(flex_attend, name, 1e-4, 1e-4)
    assert not flex_module._FLEX["failed"], "compiled flex_attention fell back to the eager one"


@pytest.mark.gpu
@pytest.mark.skipif(not attention.flash_available(), reason="needs CUDA and flash-attn (pip install 'scfm[gpu]')")
@pytest.mark.parametrize("name", [n for n in LAYOUTS if "generative" not in n])
def test_flash_matches_eager_on_gpu(name: str) -> None:
    """flash runs in bfloat16: compared with eager in float32 at bf16 tolerance."""
    assert_matches_eager_on_gpu(attention.flash_attend, name, 2e-2, 3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not attention.flash_available(), reason="needs CUDA and flash-attn (pip install 'scfm[gpu]')")
def test_flash_refuses_the_generative_mask() -> None:
    layout = LAYOUTS["padded+generative"]()
    q, k, v = (t.cuda() for t in qkv(*shape_of(layout), torch.float32))
    layout.padding_mask, layout.known = layout.padding_mask.cuda(), layout.known.cuda()
    with pytest.raises(ScfmInputError, match="generative"):
        attention.flash_attend(q, k, v, layout)


# ---------------------------------------------------------------- performer


def _rel_err(nb: int, seeds=range(4), L: int = 24) -> float:
    errs = []
    for seed in seeds:
        q, k, v = (t.detach() for t in qkv(3, L, seed=100 + seed, scale=0.5))
        layout = Layout()
        approx = PerformerAttention(nb_features=nb, seed=seed)(q, k, v, layout)
        exact = eager_attend(q, k, v, layout)
        errs.append(float((approx - exact).norm() / exact.norm()))
    return sum(errs) / len(errs)


def test_performer_error_falls_with_features() -> None:
    errs = {m: _rel_err(m) for m in (16, 256, 1024)}
    print("performer relative Frobenius error:", errs)
    assert errs[16] > errs[256] > errs[1024]
    assert errs[1024] < 0.1


def test_performer_features_are_seeded_and_fixed_unless_redraw() -> None:
    a, b = PerformerAttention(32, seed=3), PerformerAttention(32, seed=3)
    pa = a.projection(DH, torch.device("cpu"), torch.float64)
    assert torch.equal(pa, b.projection(DH, torch.device("cpu"), torch.float64))
    assert torch.equal(pa, a.projection(DH, torch.device("cpu"), torch.float64))
    assert not torch.equal(pa, PerformerAttention(32, seed=4).projection(DH, torch.device("cpu"), torch.float64))
    r = PerformerAttention(32, seed=3, redraw=True)
    assert not torch.equal(r.projection(DH, torch.device("cpu"), torch.float64), r.projection(DH, "cpu", torch.float64))
    # Orthogonal blocks: within a block of DH rows, directions are orthogonal.
    w = pa[:DH] / pa[:DH].norm(dim=1, keepdim=True)
    torch.testing.assert_close(w @ w.T, torch.eye(DH, dtype=torch.float64), atol=1e-10, rtol=0)
    with pytest.raises(ScfmInputError, match="nb_features"):
        PerformerAttention(0)


def test_performer_padded_equals_packed_and_cells_are_isolated() -> None:
    perf = PerformerAttention(64, seed=0)
    padded, packed = padded_layout(length=11), packed_layout(tail=4)
    q, k, v = (t.detach() for t in qkv(3, 11))
    out_p = perf(q, k, v, padded)
    # Same tokens, packed into one row (plus 4 tail padding tokens).
    cat = [torch.cat([*(x[i, :, :n] for i, n in enumerate(LENGTHS)), x.new_full((H, 4, DH), 9.0)], 1)[None] for x in
           (q, k, v)]
    out_k = perf(*cat, packed)
    cu = [0, 5, 14, 17]
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(out_k[0, :, cu[i] : cu[i + 1]], out_p[i, :, :n], atol=1e-10, rtol=1e-10)
    assert (out_k[0, :, 17:] == 0).all() and (out_p[~padded.padding_mask[:, None, :, None].expand_as(out_p)] == 0).all()
    # Changing cell 1 (and padding) changes nothing in cells 0 and 2.
    k2, v2 = cat[1].clone(), cat[2].clone()
    k2[:, :, 5:14], v2[:, :, 5:14] = 4.0, -4.0
    k2[:, :, 17:], v2[:, :, 17:] = 100.0, 100.0
    out_k2 = perf(cat[0], k2, v2, packed)
    keep = torch.tensor([True] * 5 + [False] * 9 + [True] * 3 + [False] * 4)
    torch.testing.assert_close(out_k2[:, :, keep], out_k[:, :, keep], atol=1e-12, rtol=0)


def test_performer_grads_finite_with_empty_row() -> None:
    layout = padded_layout((*LENGTHS, 0))
    q, k, v = qkv(4, 11)
    out = KERNELS["performer"](q, k, v, layout)
    (out * torch.randn_like(out)).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (out[3] == 0).all()


def test_performer_rejects_generative_mask() -> None:
    q, k, v = qkv(3, 11)
    msg = r"(?s)performer cannot express scGPT's generative mask.*flex\|sdpa\|eager"
    with pytest.raises(ScfmInputError, match=msg):
        get_kernel("performer")(q, k, v, padded_layout(generative=True))


def test_performer_key_dropout_is_unbiased_on_average() -> None:
    torch.manual_seed(0)
    perf = PerformerAttention(16, seed=0)
    q, k, v = (t.detach() for t in qkv(1, 12))
    layout = Layout()
    base = perf(q, k, v, layout)
    runs = perf(*(x.expand(400, -1, -1, -1) for x in (q, k, v)), layout, dropout_p=0.3)  # 400 draws at once
    one, avg = (runs[0] - base).abs().mean(), (runs.mean(0) - base).abs().mean()
    assert one > 0.05 and avg < one / 8, (one, avg)  # noise shrinks ~ 1/sqrt(400) around the dropout-free output


# ---------------------------------------------------------------- registry


def test_registry() -> None:
    assert set(KERNELS) - {"flash"} == {"eager", "sdpa", "flex", "performer"}
    assert set(EXACT_KERNELS) == {"eager", "sdpa", "flex", "flash"}
    assert ("flash" in KERNELS) == attention.flash_available()
    if not attention.flash_available():
        with pytest.raises(ScfmInputError, match="flash-attn needs CUDA and the `gpu` extra"):
            get_kernel("flash")
    with pytest.raises(ScfmInputError, match="exact kernels eager, sdpa, flex or the approximate performer"):
        get_kernel("nope")


def test_kernel_specs_flags_and_problems() -> None:
    """Every conf/attention kernel has a spec; the flags validation reads; kernel_problem's reasons."""
    conf = Path(__file__).resolve().parents[1] / "conf" / "attention"
    configured = {OmegaConf.load(f).kernel for f in conf.glob("*.yaml")}
    assert configured == set(SPECS) == {"eager", "sdpa", "flex", "flash", "performer"}
    for name, spec in SPECS.items():
        assert spec.name == name and spec.masks <= {"padding", "packed", "generative"} and spec.description
        assert kernel_spec(name) is spec
    everything = frozenset({"padding", "packed", "generative"})
    assert [SPECS[n].masks for n in ("eager", "sdpa", "flex")] == [everything] * 3
    assert SPECS["performer"].masks == SPECS["flash"].masks == frozenset({"padding", "packed"})
    assert [n for n, s in SPECS.items() if s.exact] == ["eager", "sdpa", "flex", "flash"]
    assert EXACT_KERNELS == ("eager", "sdpa", "flex", "flash")
    assert [n for n, s in SPECS.items() if s.needs_cuda] == ["flash"]
    assert SPECS["flash"].packages == ("flash_attn",) and all(not SPECS[n].packages for n in SPECS if n != "flash")
    with pytest.raises(dataclasses.FrozenInstanceError):
        SPECS["sdpa"].exact = False
    with pytest.raises(ScfmInputError, match="exact kernels eager, sdpa, flex or the approximate performer"):
        kernel_spec("nope")

    assert "generative" in kernel_problem("performer", needs={"padding", "generative"}, device_type="cuda")
    assert kernel_problem("performer", needs={"padding", "packed"}, device_type="cpu") is None
    assert kernel_problem("sdpa", needs={"padding", "packed", "generative"}, device_type="cpu") is None
    assert "generative" in kernel_problem("flash", needs={"generative"}, device_type="cuda")
    assert "CUDA" in kernel_problem("flash", needs={"padding"}, device_type="cpu")
    if attention.flash_available():
        assert kernel_problem("flash", needs={"padding", "packed"}, device_type="cuda") is None
    elif importlib.util.find_spec("flash_attn") is None:
        assert "flash_attn" in kernel_problem("flash", needs={"padding"}, device_type="cuda")
