"""xTrimoGene / scFoundation architecture: encoder over the encoder tokens only, dense per-cell reference, T/S
dropped, kernels, config errors, cell embedding, FAVOR+."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scfm.errors import ScfmInputError
from scfm.model.attention import Layout, favor_attention, orthogonal_gaussian
from scfm.model.xtrimo import XtrimoConfig, XtrimoModel

G = 40  # genes per cell; + T, S


def tiny(**kw) -> XtrimoConfig:
    base = dict(vocab_size=G + 10, layers=2, hidden=32, heads=4, ffn=64, dropout=0.0, decoder_layers=2,
                decoder_hidden=16, decoder_heads=2, decoder_ffn=32, max_seq_len=G + 2, attention="eager")
    return XtrimoConfig(**{**base, **kw})


def make_batch(B: int = 4, seed: int = 0, g: int = G) -> dict[str, torch.Tensor]:
    """A continuous-encoding-like batch: genes in list order, then T and S; ~30% expressed, 30% of those and 3% of
    the zeros masked; the encoder sees expressed unmasked genes + T + S."""
    gen = torch.Generator().manual_seed(seed)
    L = g + 2
    expressed = torch.rand(B, g, generator=gen) < 0.3
    vals = torch.where(expressed, torch.rand(B, g, generator=gen) * 4 + 0.1, torch.zeros(B, g))
    masked = torch.where(expressed, torch.rand(B, g, generator=gen) < 0.3, torch.rand(B, g, generator=gen) < 0.03)
    depth = torch.rand(B, 2, generator=gen) + 3.0
    values = torch.cat([vals.masked_fill(masked, 0.0), depth], 1)
    target = torch.cat([vals, depth[:, :1].expand(B, 2)], 1)
    value_mask = torch.cat([masked, torch.zeros(B, 2, dtype=torch.bool)], 1)
    encoder_mask = torch.cat([expressed & ~masked, torch.ones(B, 2, dtype=torch.bool)], 1)
    token_kind = torch.cat([torch.zeros(B, g, dtype=torch.long), torch.tensor([[1, 2]]).expand(B, 2)], 1)
    return {"gene_ids": torch.arange(L).expand(B, L) + 4, "values": values, "target_values": target,
            "value_mask": value_mask, "encoder_mask": encoder_mask, "token_kind": token_kind,
            "positions": torch.arange(L).expand(B, L).clone(), "padding_mask": torch.ones(B, L, dtype=torch.bool),
            "lengths": torch.full((B,), L)}


@pytest.fixture(scope="module")
def model() -> XtrimoModel:
    torch.manual_seed(0)
    return XtrimoModel(tiny()).eval()


def test_encoder_sees_only_encoder_tokens(model):
    batch = make_batch()
    g = model.encode(batch)
    enc = g.hidden
    other = ~batch["encoder_mask"]
    changed = dict(batch)
    changed["values"] = torch.where(other, torch.rand_like(batch["values"]) * 5, batch["values"])
    changed["value_mask"] = batch["value_mask"] ^ other  # flip the mask everywhere the encoder does not look
    g2 = model.encode(changed)
    enc2 = g2.hidden
    assert torch.equal(g.index, g2.index) and torch.equal(enc, enc2)
    # ... while the decoder does see them
    assert not torch.allclose(model(batch)["pred"], model(changed)["pred"])
    # and changing one encoder token changes the encoder output
    b, pos = torch.nonzero(batch["encoder_mask"])[0].tolist()
    poked = dict(batch)
    poked["values"] = batch["values"].clone()
    poked["values"][b, pos] += 1.0
    assert not torch.allclose(model.encode(poked).hidden[b], enc[b])


def reference(model: XtrimoModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per cell: the encoder as torch's nn.TransformerEncoderLayer on the gathered tokens, the full-length decoder
    input with the auto-discretisation run at every position, our decoder on that one cell, T/S dropped."""
    cfg = model.config
    layers = []
    for ours in model.encoder.layers:
        ref = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, cfg.ffn, dropout=0.0, batch_first=True).eval()
        ref.load_state_dict(ours.state_dict())  # the same names: nn.TransformerEncoderLayer's
        layers.append(ref)
    preds = []
    for b in range(batch["values"].shape[0]):
        values, pos = batch["values"][b], batch["positions"][b]
        sel = batch["encoder_mask"][b]
        x = model.token_emb(values[sel][None]) + model.pos_emb(pos[sel][None])  # [1, n, D]
        for layer in layers:
            x = layer(x)
        x = model.encoder.norm(x)[0]
        full = model.token_emb(values[None], batch["value_mask"][b][None])[0]  # [L, D]
        full[sel] = x
        full = full + model.pos_emb(pos)
        h = model.norm(model.decoder(model.decoder_embed(full[None]), Layout()))[0]
        genes = batch["token_kind"][b] == 0
        preds.append(model.to_final(h[genes]).squeeze(-1))
    return torch.stack(preds)


@pytest.mark.parametrize("decoder_attention", ["favor", "sdpa"])
def test_matches_dense_per_cell_reference(decoder_attention):
    torch.manual_seed(1)
    m = XtrimoModel(tiny(decoder_attention=decoder_attention)).eval()
    batch = make_batch(B=5, seed=3)
    with torch.no_grad():
        out = m(batch)
        ref = reference(m, batch)
    assert out["pred"].shape == (5, G)  # T and S dropped before the head
    torch.testing.assert_close(out["pred"], ref, rtol=1e-5, atol=1e-5)


def test_depth_tokens_are_dropped_wherever_they_sit(model):
    """T/S are found by token_kind, not by position: put them first and the genes after."""
    batch = make_batch(B=3, seed=5)
    perm = torch.cat([torch.tensor([G, G + 1]), torch.arange(G)])
    moved = {k: (v[:, perm] if v.dim() == 2 else v) for k, v in batch.items()}
    moved["positions"] = batch["positions"][:, perm]  # the same gene keeps its embedding row
    with torch.no_grad():
        torch.testing.assert_close(model(moved)["pred"], model(batch)["pred"], rtol=1e-5, atol=1e-5)


def test_eager_and_sdpa_encoders_agree():
    torch.manual_seed(2)
    eager = XtrimoModel(tiny(attention="eager")).eval()
    sdpa = XtrimoModel(tiny(attention="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    batch = make_batch(B=6, seed=7)  # cells with different numbers of encoder tokens: padded encoder batch
    assert len(set(batch["encoder_mask"].sum(1).tolist())) > 1
    with torch.no_grad():
        a, b = eager(batch), sdpa(batch)
    real = a["encoder_real"]
    torch.testing.assert_close(a["encoded"][real], b["encoded"][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a["pred"], b["pred"], rtol=1e-5, atol=1e-5)


def test_backward_reaches_every_parameter():
    torch.manual_seed(3)
    m = XtrimoModel(tiny(attention="sdpa")).train()
    m(make_batch())["pred"].square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    # emb_pad is used only at padding; the encoder batch above has padding, the decoder none
    assert missing == [], missing


def test_cell_embedding_is_scfoundations_pooling(model):
    batch = make_batch(B=3, seed=11)
    with torch.no_grad():
        hidden = model.encode(batch)
        emb = model.cell_embedding(batch, hidden)
        emb_max = model.cell_embedding(batch, hidden, pool="max")
        emb_mean = model.cell_embedding(batch, hidden, pool="mean")
    D = model.config.hidden
    assert emb.shape == (3, 4 * D) and emb_max.shape == emb_mean.shape == (3, D)
    torch.testing.assert_close(emb_mean, emb[:, 3 * D:])
    for b in range(3):  # per cell, no padding: scFoundation's get_embedding.py on the encoder output
        one = {k: v[b:b + 1] for k, v in batch.items()}
        with torch.no_grad():
            x = model.encode(one).hidden[0]  # [n, D]: genes in order, then T, S
        expected = torch.cat([x[-1], x[-2], x[:-2].max(0).values, x[:-2].mean(0)])
        torch.testing.assert_close(emb[b], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(emb_max[b], x.max(0).values, rtol=1e-5, atol=1e-5)


def test_favor_approximates_softmax_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen) * 0.5 for _ in range(3))
    w = orthogonal_gaussian(4096, 16, gen).float()
    approx = favor_attention(q, k, v, w, eps=0.0)
    exact = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), -1) @ v
    assert (approx - exact).abs().mean() < 0.02 * exact.abs().mean() + 0.01
    # padded keys are ignored
    key_mask = torch.ones(1, 64, dtype=torch.bool)
    key_mask[0, 40:] = False
    masked = favor_attention(q, k, v, w, key_mask, eps=1e-4)
    alone = favor_attention(q[:, :, :40], k[:, :, :40], v[:, :, :40], w, eps=1e-4)
    torch.testing.assert_close(masked[:, :, :40], alone, rtol=1e-5, atol=1e-6)


def test_features_redraw_every_interval_in_training_only():
    m = XtrimoModel(tiny(decoder_redraw_interval=2))
    batch = make_batch(B=2)
    first = m.decoder.layers[0].attn.projection_matrix.clone()
    m.eval()
    for _ in range(3):
        m(batch)
    assert torch.equal(m.decoder.layers[0].attn.projection_matrix, first)
    m.train()
    m(batch), m(batch)
    assert torch.equal(m.decoder.layers[0].attn.projection_matrix, first)
    m(batch)  # the third training call redraws
    redrawn = m.decoder.layers[0].attn.projection_matrix.clone()
    assert not torch.equal(redrawn, first)
    again = XtrimoModel(tiny(decoder_redraw_interval=2)).train()
    for _ in range(3):
        again(batch)
    assert torch.equal(again.decoder.layers[0].attn.projection_matrix, redrawn)  # deterministic


@pytest.mark.parametrize(("kw", "match"), [
    (dict(hidden=30), "divisible by heads"),
    (dict(decoder_hidden=18, decoder_heads=4), "decoder_heads"),
    (dict(value_embedding="bins"), "autodiscretize"),
    (dict(conditions=["batch"]), "condition"),
    (dict(attention="nope"), "unknown attention kernel"),
    (dict(decoder_attention="nope"), "decoder attention"),
    (dict(layers=0), "positive integer"),
])
def test_config_errors(kw, match):
    with pytest.raises(ScfmInputError, match=match):
        tiny(**kw)


def test_batch_errors(model):
    batch = make_batch(B=2)
    packed = {**batch, "doc_ids": torch.zeros(2, G + 2, dtype=torch.long)}
    with pytest.raises(ScfmInputError, match="batching=random"):
        model(packed)
    with pytest.raises(ScfmInputError, match="max_seq_len"):
        model(make_batch(B=2, g=G + 5))
    with pytest.raises(ScfmInputError, match="encoding=continuous"):
        model({k: v for k, v in batch.items() if k != "encoder_mask"})
    with pytest.raises(ScfmInputError, match="max_seq_len"):
        XtrimoModel(tiny(max_seq_len=None))
