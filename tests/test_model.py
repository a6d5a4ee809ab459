"""BERT / attention tests: kernel agreement, padded == packed, isolation, NaN safety, config, size."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from scfm.errors import ScfmInputError
from scfm.model.attention import KERNELS, Layout, eager_attend, get_kernel, sdpa_attend
from scfm.model.bert import BertConfig, BertForMaskedGeneModeling

VOCAB = 50
TOL = 1e-5
LENGTHS = (5, 9, 3)


def tiny_config(**overrides) -> BertConfig:
    kw = dict(vocab_size=VOCAB, hidden=32, layers=2, heads=2, ffn=64, max_position=64)
    kw.update(overrides)
    return BertConfig(**kw)


def make_cells(lengths=LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def padded_batch(cells: list[torch.Tensor], length: int | None = None, pad_value: int = 0) -> dict:
    """Padded layout; `pad_value` fills gene ids (and positions) of padding tokens."""
    L = length or max(len(c) for c in cells)
    gene_ids = torch.full((len(cells), L), pad_value, dtype=torch.long)
    positions = torch.full((len(cells), L), pad_value % 64, dtype=torch.long)
    mask = torch.zeros(len(cells), L, dtype=torch.bool)
    for i, c in enumerate(cells):
        gene_ids[i, : len(c)] = c
        positions[i, : len(c)] = torch.arange(len(c))
        mask[i, : len(c)] = True
    return {"gene_ids": gene_ids, "positions": positions, "padding_mask": mask}


def packed_batch(cells: list[torch.Tensor]) -> dict:
    lengths = torch.tensor([len(c) for c in cells])
    return {
        "gene_ids": torch.cat(cells)[None],  # [1, T]
        "positions": torch.cat([torch.arange(n) for n in lengths.tolist()])[None],
        "doc_ids": torch.repeat_interleave(torch.arange(len(cells)), lengths)[None],
        "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32),
    }


def model(seed: int = 0, **overrides) -> BertForMaskedGeneModeling:
    torch.manual_seed(seed)
    return BertForMaskedGeneModeling(tiny_config(**overrides)).eval()


def qkv(B: int, L: int, H: int = 2, Dh: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, Dh, generator=g, requires_grad=True) for _ in range(3)]


def real_rows(layout: Layout, L: int) -> torch.Tensor:
    return layout.padding_mask if layout.padding_mask is not None else torch.ones(1, L, dtype=torch.bool)


# ---------------------------------------------------------------- (a) kernels agree


def _layouts() -> dict[str, Layout]:
    """Layouts covering padded, packed, a fully padded row and a packed row with trailing padding."""
    cells = make_cells()
    pk = packed_batch(cells)
    pk_mask = dict(pk, padding_mask=torch.ones_like(pk["gene_ids"], dtype=torch.bool))
    T, n = sum(LENGTHS), len(LENGTHS)
    pk_tail = {  # 4 trailing padding tokens with doc id n and padding_mask False: their rows are empty
        "doc_ids": torch.cat([pk["doc_ids"], torch.full((1, 4), n)], dim=1),
        "padding_mask": torch.arange(T + 4)[None] < T,
        "cu_seqlens": pk["cu_seqlens"],
    }
    return {
        "padded": Layout.from_batch(padded_batch(cells, length=11)),
        "padded+empty": Layout.from_batch(padded_batch([*cells, cells[0][:0]], length=11)),
        "packed": Layout.from_batch(pk),
        "packed+mask": Layout.from_batch(pk_mask),
        "packed+tail": Layout.from_batch(pk_tail),
        "none": Layout(),
    }


def _shape(name: str) -> tuple[int, int]:
    return {"padded": (3, 11), "padded+empty": (4, 11), "packed+tail": (1, sum(LENGTHS) + 4)}.get(
        name, (1, sum(LENGTHS))
    )


LAYOUTS = ["padded", "padded+empty", "packed", "packed+mask", "packed+tail", "none"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_sdpa_matches_eager_outputs_and_grads(name: str) -> None:
    layout = _layouts()[name]
    B, L = _shape(name)
    q1, k1, v1 = qkv(B, L)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q1, k1, v1))
    out_s = sdpa_attend(q1, k1, v1, layout)
    out_e = eager_attend(q2, k2, v2, layout)
    real = real_rows(layout, L)[:, None, :, None].expand_as(out_s)  # [B, H, L, Dh]
    torch.testing.assert_close(out_s[real], out_e[real], atol=TOL, rtol=TOL)
    # A fixed random cotangent on real rows (padded rows get 0 in both kernels anyway).
    cot = torch.randn(out_s.shape, generator=torch.Generator().manual_seed(1)) * real
    (out_s * cot).sum().backward()
    (out_e * cot).sum().backward()
    for a, b in ((q1, q2), (k1, k2), (v1, v2)):
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
        torch.testing.assert_close(a.grad[real], b.grad[real], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", ["padded", "padded+empty", "packed+tail"])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernels_zero_padded_queries_and_mask_keys(kernel: str, name: str) -> None:
    attend = get_kernel(kernel)
    layout = _layouts()[name]
    q, k, v = qkv(*_shape(name))
    out = attend(q, k, v, layout)
    assert (out[~layout.padding_mask[:, None, :, None].expand_as(out)] == 0).all()
    # Changing padded keys/values must not change real rows.
    k2, v2 = k.detach().clone(), v.detach().clone()
    pad = ~layout.padding_mask[:, None, :, None].expand_as(k2)
    k2[pad], v2[pad] = 100.0, -100.0
    out2 = attend(q, k2, v2, layout)
    torch.testing.assert_close(out2, out, atol=TOL, rtol=TOL)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 7), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_sdpa_matches_eager_property(lengths: list[int], seed: int) -> None:
    cells = make_cells(lengths, seed)
    for batch in (padded_batch(cells), packed_batch(cells)):
        layout = Layout.from_batch(batch)
        q, k, v = qkv(*batch["gene_ids"].shape, seed=seed)
        torch.testing.assert_close(
            sdpa_attend(q, k, v, layout), eager_attend(q, k, v, layout), atol=TOL, rtol=TOL
        )


def test_layout_from_batch_dict_and_tensordict() -> None:
    pk = packed_batch(make_cells())
    a = Layout.from_batch(pk)
    b = Layout.from_batch(TensorDict(pk, batch_size=[]))
    assert a.padding_mask is None and b.padding_mask is None and a.is_packed and b.is_packed
    assert torch.equal(a.attention_mask, b.attention_mask)
    # doc_ids derived from cu_seqlens when absent.
    c = Layout(cu_seqlens=pk["cu_seqlens"])
    assert torch.equal(c.doc_ids, pk["doc_ids"])
    # Block-diagonal: token 0 (cell 0) sees cell 0 only.
    m = a.attention_mask[0, 0]
    assert m.shape == (sum(LENGTHS), sum(LENGTHS))
    assert m[0, : LENGTHS[0]].all() and not m[0, LENGTHS[0] :].any()


@pytest.mark.parametrize("name", LAYOUTS[:-1])
def test_safe_mask_has_no_empty_row_and_keeps_real_rows(name: str) -> None:
    """Fused SDPA kernels (e.g. CUDA mem-efficient) give NaN on fully masked rows; the safe mask has none."""
    layout = _layouts()[name]
    safe, exact = layout.safe_attention_mask, layout.attention_mask  # [B, 1, L, L]
    assert safe.any(dim=-1).all()
    real = real_rows(layout, safe.shape[-1])[:, None, :, None].expand_as(safe)
    assert torch.equal(safe[real], exact[real])


def test_get_kernel_unknown_lists_names() -> None:
    with pytest.raises(ScfmInputError, match="eager, sdpa"):
        get_kernel("flashy")


# ---------------------------------------------------------------- (b) padded == packed


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_padded_and_packed_give_same_hidden_states(kernel: str) -> None:
    m = model(attention=kernel)
    cells = make_cells()
    pb, pk = padded_batch(cells), packed_batch(cells)
    with torch.no_grad():
        out_p, out_k = m(pb), m(TensorDict(pk, batch_size=[]))
    assert out_p["hidden"].shape == (3, max(LENGTHS), 32)
    assert out_p["logits"].shape == (3, max(LENGTHS), VOCAB)
    assert out_k["hidden"].shape == (1, sum(LENGTHS), 32)
    cu = pk["cu_seqlens"].tolist()
    for i, n in enumerate(LENGTHS):
        for key in ("hidden", "logits"):
            torch.testing.assert_close(
                out_p[key][i, :n], out_k[key][0, cu[i] : cu[i + 1]], atol=TOL, rtol=TOL
            )
    with torch.no_grad():
        emb_p, emb_k = m.cell_embedding(pb, m.encode(pb)), m.cell_embedding(pk, m.encode(pk))
    assert emb_p.shape == emb_k.shape == (3, 32)
    torch.testing.assert_close(emb_p, emb_k, atol=TOL, rtol=TOL)
    # And the pooled value is the mean over real tokens.
    torch.testing.assert_close(emb_p[2], out_p["hidden"][2, : LENGTHS[2]].mean(0), atol=TOL, rtol=TOL)


def test_packed_without_block_mask_would_differ() -> None:
    """Sanity: dropping doc_ids (cells see each other) changes outputs, so the test above has teeth."""
    m = model()
    pk = packed_batch(make_cells())
    leaky = {k: v for k, v in pk.items() if k not in ("doc_ids", "cu_seqlens")}
    with torch.no_grad():
        assert not torch.allclose(m(pk)["hidden"], m(leaky)["hidden"], atol=1e-3)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_attention_dropout_active_in_train_only(kernel: str) -> None:
    m = model(attention=kernel, dropout=0.0, attention_dropout=0.5)
    pk = packed_batch(make_cells())
    with torch.no_grad():
        assert torch.equal(m(pk)["hidden"], m(pk)["hidden"])
        m.train()
        assert not torch.allclose(m(pk)["hidden"], m(pk)["hidden"], atol=1e-3)


# ---------------------------------------------------------------- (c) padding is inert


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("pad_value", [0, 7])
def test_extra_padding_does_not_change_real_tokens(kernel: str, pad_value: int) -> None:
    m = model(attention=kernel)
    cells = make_cells()
    with torch.no_grad():
        short = m(padded_batch(cells))["hidden"]
        long = m(padded_batch(cells, length=max(LENGTHS) + 6, pad_value=pad_value))["hidden"]
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(long[i, :n], short[i, :n], atol=TOL, rtol=TOL)


# ---------------------------------------------------------------- (d) no NaN


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_no_nan_in_outputs_or_grads_with_padding(kernel: str) -> None:
    torch.manual_seed(0)
    m = BertForMaskedGeneModeling(tiny_config(attention=kernel, dropout=0.1, attention_dropout=0.1)).train()
    cells = make_cells()
    batch = padded_batch([*cells, torch.empty(0, dtype=torch.long)], length=12)  # one row is all padding
    out = m(batch)
    assert torch.isfinite(out["hidden"]).all() and torch.isfinite(out["logits"]).all()
    (out["logits"].square().mean() + out["hidden"].sum() + m.cell_embedding(batch, out["hidden"]).sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.equal(m.eval().cell_embedding(batch, m.encode(batch))[-1], torch.zeros(32))


# ---------------------------------------------------------------- (e) packed cells are isolated


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_packed_cells_do_not_affect_each_other(kernel: str) -> None:
    m = model(attention=kernel)
    cells = make_cells()
    pk = packed_batch(cells)
    perturbed = make_cells()
    perturbed[1] = (perturbed[1] % (VOCAB - 2)) + 2  # every gene id of cell 2 changes
    assert (perturbed[1] != cells[1]).all()
    pk2 = packed_batch(perturbed)
    with torch.no_grad():
        a, b = m(pk)["hidden"][0], m(pk2)["hidden"][0]
    cu = pk["cu_seqlens"].tolist()
    for i in (0, 2):
        torch.testing.assert_close(b[cu[i] : cu[i + 1]], a[cu[i] : cu[i + 1]], atol=TOL, rtol=TOL)
    assert not torch.allclose(b[cu[1] : cu[2]], a[cu[1] : cu[2]], atol=1e-3)  # cell 2 itself did change


# ---------------------------------------------------------------- (f) config validation


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"hidden": 30, "heads": 4}, "divisible"),
        ({"layers": 0}, "layers"),
        ({"hidden": -8}, "hidden"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"attention": "flashy"}, "eager, sdpa, flex"),
        ({"activation": "swish9"}, "relu"),
        ({"dropout": 1.5}, "dropout"),
        ({"pad_id": 99}, "pad_id"),
    ],
)
def test_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_default_config_is_geneformer_v1() -> None:
    c = BertConfig(vocab_size=25_426)
    assert (c.hidden, c.layers, c.heads, c.ffn, c.max_position) == (256, 6, 4, 512, 2048)
    assert c.activation == "relu"
    assert (c.dropout, c.attention_dropout, c.layer_norm_eps, c.pad_id) == (0.02, 0.02, 1e-12, 0)


# ---------------------------------------------------------------- (g) size, tying, init


def expected_params(c: BertConfig) -> int:
    H, F_, V = c.hidden, c.ffn, c.vocab_size
    ln = 2 * H
    embeddings = V * H + c.max_position * H + ln
    layer = 4 * (H * H + H) + ln + (H * F_ + F_) + (F_ * H + H) + ln  # q,k,v,out + LN + FFN + LN
    head = (H * H + H) + ln + V  # transform dense + LN + decoder bias (decoder weight tied)
    return embeddings + c.layers * layer + head


def test_parameter_count_geneformer_v1_6l() -> None:
    c = BertConfig(vocab_size=25_426)
    m = BertForMaskedGeneModeling(c)
    n = sum(p.numel() for p in m.parameters())
    print(f"Geneformer V1 6L (vocab 25,426): {n:,} parameters")
    assert n == expected_params(c)
    assert 9_000_000 < n < 12_000_000


def test_decoder_tied_and_bert_init() -> None:
    m = model()
    assert m.mlm_head.decoder.weight is m.embeddings.word_embeddings.weight
    assert m.mlm_head.decoder.bias is not None and (m.mlm_head.decoder.bias == 0).all()
    assert (m.embeddings.word_embeddings.weight[0] == 0).all()  # pad row
    names = dict(m.named_parameters())
    assert "encoder.layer.1.self_attn.in_proj_weight" in names  # nn.TransformerEncoderLayer's names
    assert "embeddings.position_embeddings.weight" in names
    for name, p in names.items():
        if "LayerNorm.weight" in name:
            assert (p == 1).all(), name
        elif name.endswith("bias"):
            assert (p == 0).all(), name
    big = BertForMaskedGeneModeling(BertConfig(vocab_size=2000)).encoder.layer[0]
    for w in (big.linear1.weight, big.self_attn.in_proj_weight):  # normal(0, 0.02), the packed q/k/v too
        assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3


# ---------------------------------------------------------------- GPU (run with -m gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sdpa_padded_equals_packed_and_no_nan(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    m = BertForMaskedGeneModeling(tiny_config()).to("cuda", dtype)
    cells = make_cells()
    pb = {k: v.cuda() for k, v in padded_batch([*cells, torch.empty(0, dtype=torch.long)], length=16).items()}
    pk = {k: v.cuda() for k, v in packed_batch(cells).items()}
    out = m.train()(pb)
    (out["logits"].float().square().mean() + out["hidden"].float().sum()).backward()
    assert torch.isfinite(out["hidden"]).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with torch.no_grad():
        hp, hk = m(pb)["hidden"].float(), m(pk)["hidden"].float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    cu = pk["cu_seqlens"].tolist()
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(hp[i, :n], hk[0, cu[i] : cu[i + 1]], atol=tol, rtol=tol)
