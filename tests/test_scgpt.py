"""scGPT architecture: padded == packed per cell, the generative mask, kernel agreement, options, config errors."""

from __future__ import annotations

import pytest
import torch

from scfm.errors import ScfmInputError
from scfm.model.scgpt import ScGPTConfig, ScGPTModel, ecs_loss, grad_reverse

VOCAB, CLS, N_BINS = 40, 2, 11
LENGTHS = (6, 9, 4)
TOL = 1e-5
OUTPUTS = ("hidden", "pred", "mvc_pred")


def config(**overrides) -> ScGPTConfig:
    kw = dict(vocab_size=VOCAB, layers=2, hidden=32, heads=4, ffn=48, dropout=0.1, n_bins=N_BINS, cls_id=CLS)
    kw.update(overrides)
    return ScGPTConfig(**kw)


def model(seed: int = 0, **overrides) -> ScGPTModel:
    torch.manual_seed(seed)
    return ScGPTModel(config(**overrides)).eval()


def cells(lengths=LENGTHS, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Cells as <cls> + distinct genes (ids 4..), with bins and log1p-like values."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        genes = torch.randperm(VOCAB - 4, generator=g)[: n - 1] + 4
        bins = torch.randint(1, N_BINS, (n - 1,), generator=g)
        out.append({"gene_ids": torch.cat([torch.tensor([CLS]), genes]),
                    "values_bin": torch.cat([torch.tensor([0]), bins]),
                    "values": torch.cat([torch.tensor([0.0]), bins.float() / 3])})
    return out


def padded(cs: list[dict], known: list[torch.Tensor] | None = None) -> tuple[dict, torch.Tensor | None]:
    L = max(len(c["gene_ids"]) for c in cs) + 2  # extra padding columns
    batch = {k: torch.zeros(len(cs), L, dtype=cs[0][k].dtype) for k in cs[0]}
    batch["padding_mask"] = torch.zeros(len(cs), L, dtype=torch.bool)
    kn = torch.ones(len(cs), L, dtype=torch.bool) if known is not None else None
    for i, c in enumerate(cs):
        n = len(c["gene_ids"])
        for k in c:
            batch[k][i, :n] = c[k]
        batch["padding_mask"][i, :n] = True
        if known is not None:
            kn[i, :n] = known[i]
    batch["positions"] = torch.arange(L).expand(len(cs), L).clone()
    batch["lengths"] = torch.tensor([len(c["gene_ids"]) for c in cs])
    return batch, kn


def packed(cs: list[dict], known: list[torch.Tensor] | None = None) -> tuple[dict, torch.Tensor | None]:
    lengths = torch.tensor([len(c["gene_ids"]) for c in cs])
    batch = {k: torch.cat([c[k] for c in cs])[None] for k in cs[0]}
    batch["positions"] = torch.cat([torch.arange(n) for n in lengths.tolist()])[None]
    batch["doc_ids"] = torch.repeat_interleave(torch.arange(len(cs)), lengths)[None]
    batch["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    batch["lengths"] = lengths
    return batch, (torch.cat(known)[None] if known is not None else None)


def known_masks(cs: list[dict], seed: int = 1) -> list[torch.Tensor]:
    """<cls> known, then each gene known with probability 1/2 (at least one gene unknown)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in cs:
        k = torch.rand(len(c["gene_ids"]), generator=g) < 0.5
        k[0], k[-1] = True, False
        out.append(k)
    return out


def per_cell_tokens(x: torch.Tensor, batch: dict, i: int) -> torch.Tensor:
    if "doc_ids" in batch:
        return x[0, batch["doc_ids"][0] == i]
    return x[i, : int(batch["lengths"][i])]


@pytest.mark.parametrize("generative", [False, True])
@pytest.mark.parametrize("value_embedding", ["mlp", "bins"])
def test_padded_and_packed_agree_per_cell(generative: bool, value_embedding: str) -> None:
    net = model(value_embedding=value_embedding)
    cs = cells()
    known = known_masks(cs) if generative else None
    (pb, pk), (qb, qk) = padded(cs, known), packed(cs, known)
    with torch.no_grad():
        a, b = net(pb, known=pk), net(qb, known=qk)
    torch.testing.assert_close(a["cell_emb"], b["cell_emb"], atol=TOL, rtol=TOL)
    assert a["cell_emb"].shape == (len(cs), 32)
    for key in OUTPUTS:
        for i in range(len(cs)):
            torch.testing.assert_close(per_cell_tokens(a[key], pb, i), per_cell_tokens(b[key], qb, i),
                                       atol=TOL, rtol=TOL)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_generative_mask_hides_unknown_inputs(layout: str) -> None:
    """Changing an unknown gene's id and value changes nothing at known tokens (nor at other unknown tokens);
    changing a known gene's value changes the unknown tokens' outputs."""
    net = model()
    cs = cells()
    known = known_masks(cs)
    make = padded if layout == "padded" else packed
    batch, kn = make(cs, known)
    with torch.no_grad():
        base = net(batch, known=kn)
    flat_known = kn.clone()
    real = ScGPTModel.real_tokens(batch)
    unknown = real & ~flat_known
    target = unknown.nonzero()[0].tolist()  # one unknown token (row, col)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["gene_ids"][tuple(target)] = 39
    changed["values_bin"][tuple(target)] = N_BINS - 1
    changed["values"][tuple(target)] = 123.0
    with torch.no_grad():
        out = net(changed, known=kn)
    others = real.clone()
    others[tuple(target)] = False
    for key in OUTPUTS:
        torch.testing.assert_close(out[key][others], base[key][others], atol=TOL, rtol=TOL)
    torch.testing.assert_close(out["cell_emb"], base["cell_emb"], atol=TOL, rtol=TOL)
    assert not torch.allclose(out["hidden"][tuple(target)], base["hidden"][tuple(target)])
    # the converse: a known gene's value reaches the unknown genes
    known_gene = (real & flat_known & (batch["gene_ids"] != CLS)).nonzero()[0].tolist()
    changed = {k: v.clone() for k, v in batch.items()}
    changed["values_bin"][tuple(known_gene)] += 3
    changed["values"][tuple(known_gene)] += 3.0
    with torch.no_grad():
        out = net(changed, known=kn)
    assert not torch.allclose(out["pred"][unknown], base["pred"][unknown], atol=1e-4)


def test_unknown_tokens_get_no_value_input() -> None:
    """Unknown genes' values are never read: the whole output is unchanged when only they change."""
    net = model()
    cs = cells()
    known = known_masks(cs)
    batch, kn = padded(cs, known)
    unknown = ScGPTModel.real_tokens(batch) & ~kn
    changed = dict(batch, values_bin=torch.where(unknown, N_BINS - 1, batch["values_bin"]),
                   values=torch.where(unknown, 99.0, batch["values"]))
    with torch.no_grad():
        a, b = net(batch, known=kn), net(changed, known=kn)
    real = ScGPTModel.real_tokens(batch)
    torch.testing.assert_close(a["hidden"][real], b["hidden"][real], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("generative", [False, True])
def test_eager_and_sdpa_kernels_agree(generative: bool) -> None:
    cs = cells()
    known = known_masks(cs) if generative else None
    for make in (padded, packed):
        batch, kn = make(cs, known)
        real = ScGPTModel.real_tokens(batch)
        with torch.no_grad():
            a = model(attention="eager")(batch, known=kn)
            b = model(attention="sdpa")(batch, known=kn)
        for key in OUTPUTS:
            torch.testing.assert_close(a[key][real], b[key][real], atol=TOL, rtol=TOL)
        torch.testing.assert_close(a["cell_emb"], b["cell_emb"], atol=TOL, rtol=TOL)


def test_cls_value_and_cell_embedding_styles() -> None:
    cs = cells()
    batch, _ = padded(cs)
    net = model()
    assert (net.value_input(batch)[:, 0] == -2.0).all()  # scGPT's pad_value as <cls>'s value
    assert (model(value_embedding="bins").value_input(batch)[:, 0] == N_BINS).all()
    assert (model(value_source="values").value_input(batch)[0, 1:6] == batch["values"][0, 1:6]).all()
    with torch.no_grad():
        out = net(batch)
    torch.testing.assert_close(out["cell_emb"], out["hidden"][:, 0])
    avg = model(cell_emb_style="avg-pool")
    with torch.no_grad():
        out = avg(batch)
    for i, c in enumerate(cs):
        torch.testing.assert_close(out["cell_emb"][i], out["hidden"][i, : len(c["gene_ids"])].mean(0))


def test_options_build_and_run_with_original_names() -> None:
    labels = {"batch": 3}
    net = model(dab=True, dsbn=True, use_batch_labels=True, explicit_zero_prob=True, n_cls=5, input_bn=True,
                conditions=["batch"], n_labels=labels, pre_norm=True)
    names = set(net.state_dict())
    for key in ("encoder.embedding.weight", "encoder.enc_norm.weight", "flag_encoder.weight",
                "value_encoder.linear1.weight", "value_encoder.linear2.weight", "value_encoder.norm.weight",
                "batch_encoder.embedding.weight", "dsbn.bns.2.running_mean", "bn.running_var",
                "transformer_encoder.layers.1.self_attn.in_proj_weight",
                "transformer_encoder.layers.1.self_attn.in_proj_bias",
                "transformer_encoder.layers.1.self_attn.out_proj.weight", "transformer_encoder.layers.0.linear1.weight",
                "transformer_encoder.layers.0.norm2.bias", "decoder.fc.0.weight", "decoder.fc.4.bias",
                "decoder.zero_logit.2.weight", "mvc_decoder.gene2query.weight", "mvc_decoder.W.weight",
                "mvc_decoder.W_zero_logit.weight", "grad_reverse_discriminator._decoder.0.weight",
                "grad_reverse_discriminator._decoder.5.weight", "grad_reverse_discriminator.out_layer.weight",
                "cls_decoder._decoder.3.weight", "cls_decoder.out_layer.bias"):
        assert key in names, key
    assert net.decoder.fc[0].in_features == 64 and net.mvc_decoder.W.out_features == 64  # batch emb concatenated
    batch, _ = padded(cells())
    batch["batch"] = torch.tensor([0, 2, 1])
    net.train()
    out = net(batch)
    assert out["cls_logits"].shape == (3, 5) and out["dab_logits"].shape == (3, 3)
    assert out["zero_probs"].shape == out["pred"].shape and out["mvc_zero_probs"].shape == out["pred"].shape
    (out["pred"].sum() + out["dab_logits"].sum()).backward()
    assert net.dsbn.bns[2].num_batches_tracked == 1 and net.dsbn.bns[0].num_batches_tracked == 1


def test_perturbation_flags_use_the_generator_embedding() -> None:
    net = model(conditions=["perturbation"])
    assert net.pert_encoder.num_embeddings == 3 and net.pert_encoder.padding_idx == 2
    batch, _ = padded(cells())
    batch["perturbed"] = torch.zeros_like(batch["gene_ids"], dtype=torch.bool)
    with torch.no_grad():
        a = net(batch)["hidden"]
        batch["perturbed"][0, 3] = True
        b = net(batch)["hidden"]
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:])


def test_grad_reverse_and_ecs() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    grad_reverse(x, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.full((4, 3), -0.5))
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # cos: (0,1) = 1, others 0; relu; mean over 9 entries of 1 - (cos - 0.3)^2
    expected = (2 * (1 - 0.7**2) + 7 * (1 - 0.09)) / 9
    assert abs(float(ecs_loss(e, 0.3)) - expected) < 1e-6


def test_unknown_out_proj_quirk_changes_only_unknown_tokens() -> None:
    cs = cells()
    batch, kn = padded(cs, known_masks(cs))
    with torch.no_grad():
        a = model()(batch, known=kn)
        b = model(unknown_out_proj=False)(batch, known=kn)
    real = ScGPTModel.real_tokens(batch)
    torch.testing.assert_close(a["hidden"][real & kn], b["hidden"][real & kn], atol=TOL, rtol=TOL)
    assert not torch.allclose(a["hidden"][real & ~kn], b["hidden"][real & ~kn])


@pytest.mark.parametrize(("overrides", "match"), [
    ({"hidden": 30, "heads": 4}, "divisible"),
    ({"value_embedding": "autodiscretize"}, "value_embedding"),
    ({"value_source": "counts"}, "value_source"),
    ({"cell_emb_style": "w-pool"}, "cell_emb_style"),
    ({"dab": True}, "batch labels"),
    ({"dsbn": True, "n_labels": {"batch": 0}}, "batch labels"),
    ({"attention": "nope"}, "unknown attention kernel"),
    ({"ecs_threshold": 1.5}, "ecs_threshold"),
    ({"conditions": ["tissue"]}, "condition"),
    ({"layers": 0}, "layers"),
])
def test_config_errors(overrides: dict, match: str) -> None:
    with pytest.raises(ScfmInputError, match=match):
        config(**overrides)


def test_performer_refuses_the_generative_mask() -> None:
    cs = cells()
    batch, kn = padded(cs, known_masks(cs))
    net = model(attention="performer")
    with torch.no_grad():
        net(batch)  # the perceptual forward works
        with pytest.raises(ScfmInputError, match="generative mask"):
            net(batch, known=kn)
