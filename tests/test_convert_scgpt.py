"""scGPT converter: a minimal re-implementation of the ORIGINAL scGPT layouts (torch ``nn.TransformerEncoder``
with ``in_proj`` names; flash-attention ``Wqkv`` layers with scGPT's generative pcpt/gen split), randomly
initialised and saved as best_model.pt + args.json + vocab.json, must give the same outputs after conversion."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scfm.convert.scgpt import (
    convert_scgpt,
    load_converted,
    load_scgpt,
    remap_vocab,
    save_converted,
    scgpt_vocab,
)
from scfm.data.vocab import Vocab
from scfm.errors import ScfmInputError
from scfm.model.scgpt import ScGPTModel

N_GENES, D, H, D_HID, LAYERS, PAD_VALUE = 30, 32, 4, 48, 2, -2.0
TOL = 1e-5


# ---------------------------------------------------------------- the original layout, re-implemented


class GeneEncoder(nn.Module):
    def __init__(self, n: int, d: int, padding_idx: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, d, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(x))


class ContinuousValueEncoder(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.2)
        self.linear1, self.activation, self.linear2 = nn.Linear(1, d), nn.ReLU(), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.clamp(x.unsqueeze(-1), max=512)
        return self.dropout(self.norm(self.linear2(self.activation(self.linear1(x)))))


class ExprDecoder(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x).squeeze(-1)


class MVCDecoder(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gene2query, self.query_activation, self.W = nn.Linear(d, d), nn.Sigmoid(), nn.Linear(d, d, bias=False)

    def forward(self, cell_emb: Tensor, gene_embs: Tensor) -> Tensor:
        query = self.query_activation(self.gene2query(gene_embs))
        return torch.bmm(self.W(query), cell_emb.unsqueeze(2)).squeeze(2)


def _attend(q: Tensor, k: Tensor, v: Tensor, key_ok: Tensor) -> Tensor:
    """q [B, H, Lq, Dh], k/v [B, H, Lk, Dh], key_ok [B, Lk] -> [B, H, Lq, Dh]."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return s.masked_fill(~key_ok[:, None, None, :], -math.inf).softmax(-1) @ v


class FlashMHA(nn.Module):
    """flash-attn's FlashMHA / scGPT's FlashscGPTMHA parameters: Wqkv ('b s (three h d)') and out_proj; unknown
    ("gen") queries see the pcpt keys and their own key, and get no out_proj (identity cross_attn)."""

    def __init__(self) -> None:
        super().__init__()
        self.Wqkv, self.out_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, S, _ = x.shape
        q, k, v = self.Wqkv(x).view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, pcpt: Tensor, gen: Tensor | None, pcpt_ok: Tensor, gen_ok: Tensor | None):
        q, k, v = self._qkv(pcpt)
        B, P = pcpt.shape[:2]
        pcpt_out = self.out_proj(_attend(q, k, v, pcpt_ok).transpose(1, 2).reshape(B, P, D))
        if gen is None:
            return pcpt_out, None
        gq, gk, gv = self._qkv(gen)
        G = gen.shape[1]
        s_p = (gq @ k.transpose(-1, -2) / math.sqrt(D // H)).masked_fill(~pcpt_ok[:, None, None, :], -math.inf)
        s_self = (gq * gk).sum(-1, keepdim=True) / math.sqrt(D // H)  # [B, H, G, 1]
        p = torch.cat([s_p, s_self], -1).softmax(-1)
        ctx = p[..., :P] @ v + p[..., P:] * gv
        return pcpt_out, ctx.transpose(1, 2).reshape(B, G, D)


class FlashLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = FlashMHA()
        self.linear1, self.dropout, self.linear2 = nn.Linear(D, D_HID), nn.Dropout(0.2), nn.Linear(D_HID, D)
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.dropout1, self.dropout2 = nn.Dropout(0.2), nn.Dropout(0.2)

    def _block(self, x: Tensor, a: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout1(a))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))

    def forward(self, pcpt, gen, pcpt_ok, gen_ok):
        a_p, a_g = self.self_attn(pcpt, gen, pcpt_ok, gen_ok)
        return self._block(pcpt, a_p), (None if gen is None else self._block(gen, a_g))


class FlashStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(FlashLayer() for _ in range(LAYERS))


class TransformerModel(nn.Module):
    """scGPT's TransformerModel (continuous values, MVC), torch or flash (generative) transformer."""

    def __init__(self, flash: bool, pad_id: int) -> None:
        super().__init__()
        self.encoder = GeneEncoder(N_GENES + 3, D, pad_id)
        self.flag_encoder = nn.Embedding(2, D)
        self.value_encoder = ContinuousValueEncoder(D)
        self.flash = flash
        if flash:
            self.transformer_encoder = FlashStack()
        else:
            layer = nn.TransformerEncoderLayer(D, H, D_HID, 0.2, batch_first=True)
            self.transformer_encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.decoder = ExprDecoder(D)
        self.mvc_decoder = MVCDecoder(D)

    def perceptual(self, src: Tensor, values: Tensor, pad: Tensor) -> dict[str, Tensor]:
        """pad: [B, L] True = padding (torch convention)."""
        gene = self.encoder(src)
        x = gene + self.value_encoder(values)
        if self.flash:
            for layer in self.transformer_encoder.layers:
                x, _ = layer(x, None, ~pad, None)
            out = x
        else:
            out = self.transformer_encoder(x, src_key_padding_mask=pad)
        cell = out[:, 0]
        return {"pred": self.decoder(out), "cell_emb": cell, "mvc": self.mvc_decoder(cell, gene)}

    def generative(self, pg: Tensor, pv: Tensor, p_pad: Tensor, gg: Tensor, g_pad: Tensor) -> dict[str, Tensor]:
        p_gene, g_gene = self.encoder(pg), self.encoder(gg)
        p = p_gene + self.value_encoder(pv)
        g = g_gene + self.flag_encoder(torch.tensor(1))
        for layer in self.transformer_encoder.layers:
            p, g = layer(p, g, ~p_pad, ~g_pad)
        cell = p[:, 0]
        return {"gen_pred": self.decoder(g), "cell_emb": cell, "gen_mvc": self.mvc_decoder(cell, g_gene)}


def reference(flash: bool, seed: int = 0) -> tuple[TransformerModel, dict[str, int]]:
    """A randomly initialised original-layout model (every parameter perturbed, LayerNorms included) and its
    vocab.json: genes first, then <pad>, <cls>, <eoc> appended (as scGPT's whole-human vocabulary)."""
    vocab = {f"G{i}": i for i in range(N_GENES)} | {"<pad>": N_GENES, "<cls>": N_GENES + 1, "<eoc>": N_GENES + 2}
    torch.manual_seed(seed)
    ref = TransformerModel(flash, vocab["<pad>"])
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref.eval(), vocab


ARGS = {"embsize": D, "nheads": H, "d_hid": D_HID, "nlayers": LAYERS, "dropout": 0.2, "n_bins": 51,
        "input_style": "binned", "input_emb_style": "continuous", "pad_value": PAD_VALUE, "pad_token": "<pad>",
        "mask_value": -1, "n_layers_cls": 3}


def save_folder(path: Path, ref: nn.Module, vocab: dict, args: dict, flash: bool) -> Path:
    state = dict(ref.state_dict())
    if flash:  # flash-attn checkpoints name the packed projection Wqkv; DDP adds module.
        state = {"module." + k: v for k, v in state.items()}
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "best_model.pt")
    (path / "args.json").write_text(json.dumps(args))
    (path / "vocab.json").write_text(json.dumps(vocab))
    return path


def cells(vocab: dict, lengths=(7, 4, 10), seed: int = 3) -> list[tuple[list[str], Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        genes = [f"G{i}" for i in torch.randperm(N_GENES, generator=g)[:n].tolist()]
        out.append((genes, torch.randint(1, 51, (n,), generator=g).float()))
    return out


def ref_batch(vocab: dict, cs) -> tuple[Tensor, Tensor, Tensor]:
    """scGPT inputs: <cls> (value pad_value) + genes, padded with <pad> / pad_value; mask True = padding."""
    L = max(len(g) for g, _ in cs) + 1
    src = torch.full((len(cs), L), vocab["<pad>"])
    values = torch.full((len(cs), L), PAD_VALUE)
    for i, (genes, bins) in enumerate(cs):
        src[i, 0] = vocab["<cls>"]
        src[i, 1: len(genes) + 1] = torch.tensor([vocab[x] for x in genes])
        values[i, 1: len(genes) + 1] = bins
    return src, values, src == vocab["<pad>"]


def our_batch(voc: Vocab, cs) -> dict[str, Tensor]:
    """scfm padded bin batch: <cls> first with bin 0 (the model puts scGPT's pad_value there), padding 0."""
    L = max(len(g) for g, _ in cs) + 1
    batch = {"gene_ids": torch.zeros(len(cs), L, dtype=torch.long),
             "values_bin": torch.zeros(len(cs), L, dtype=torch.long),
             "padding_mask": torch.zeros(len(cs), L, dtype=torch.bool)}
    for i, (genes, bins) in enumerate(cs):
        ids = torch.from_numpy(voc.lookup(genes))
        assert (ids >= 0).all()
        batch["gene_ids"][i, 0] = voc.special_id("<cls>")
        batch["gene_ids"][i, 1: len(genes) + 1] = ids
        batch["values_bin"][i, 1: len(genes) + 1] = bins.long()
        batch["padding_mask"][i, : len(genes) + 1] = True
    batch["values"] = batch["values_bin"].float()
    batch["lengths"] = batch["padding_mask"].sum(1)
    return batch


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("flash", [False, True])
def test_converted_model_matches_the_original(tmp_path: Path, flash: bool) -> None:
    ref, vocab = reference(flash)
    args = dict(ARGS, fast_transformer=flash, USE_GENERATIVE_TRAINING=flash)
    folder = save_folder(tmp_path / "scgpt", ref, vocab, args, flash)
    model, voc = load_scgpt(folder)
    assert voc.specials == ("<pad>", "<cls>", "<eoc>") and voc.gene_ids[:2] == ["G0", "G1"]
    assert model.config.unknown_out_proj is (not flash) and model.config.cls_id == 1
    cs = cells(vocab)
    src, values, pad = ref_batch(vocab, cs)
    batch = our_batch(voc, cs)
    with torch.no_grad():
        theirs = ref.perceptual(src, values, pad)
        ours = model(batch)
    real = ~pad
    torch.testing.assert_close(ours["pred"][real], theirs["pred"][real], atol=TOL, rtol=TOL)
    torch.testing.assert_close(ours["mvc_pred"][real], theirs["mvc"][real], atol=TOL, rtol=TOL)
    torch.testing.assert_close(ours["cell_emb"], theirs["cell_emb"], atol=TOL, rtol=TOL)


def test_generative_checkpoint_matches_the_original_pcpt_gen_split(tmp_path: Path) -> None:
    """scGPT's generative forward (known genes as the pcpt segment, unknown genes as the gen segment) equals
    our single pass with the generative mask, unknown_out_proj=False included."""
    ref, vocab = reference(flash=True, seed=1)
    folder = save_folder(tmp_path / "gen", ref, vocab, dict(ARGS, training_tasks="both"), flash=True)
    model, voc = load_scgpt(folder)
    assert model.config.unknown_out_proj is False
    g = torch.Generator().manual_seed(5)
    cs = cells(vocab, lengths=(8, 5, 11))
    splits = [torch.randperm(len(genes), generator=g)[: max(1, len(genes) // 2)] for genes, _ in cs]
    pcpt = [([x for j, x in enumerate(genes) if j not in set(s.tolist())],
             bins[[j for j in range(len(genes)) if j not in set(s.tolist())]]) for (genes, bins), s in zip(cs, splits)]
    gen = [([genes[j] for j in s.tolist()], bins[s]) for (genes, bins), s in zip(cs, splits)]
    pg, pv, p_pad = ref_batch(vocab, pcpt)
    G = max(len(x) for x, _ in gen)
    gg = torch.full((len(gen), G), vocab["<pad>"])
    for i, (genes, _) in enumerate(gen):
        gg[i, : len(genes)] = torch.tensor([vocab[x] for x in genes])
    g_pad = gg == vocab["<pad>"]
    with torch.no_grad():
        theirs = ref.generative(pg, pv, p_pad, gg, g_pad)
    # ours: one sequence per cell, <cls> + known genes + unknown genes, `known` marking the first part
    joint = [(p[0] + q[0], torch.cat([p[1], q[1]])) for p, q in zip(pcpt, gen)]
    batch = our_batch(voc, joint)
    known = torch.zeros_like(batch["padding_mask"])
    for i, (p, _) in enumerate(zip(pcpt, gen)):
        known[i, : len(p[0]) + 1] = True
    with torch.no_grad():
        ours = model(batch, known=known)
    torch.testing.assert_close(ours["cell_emb"], theirs["cell_emb"], atol=TOL, rtol=TOL)
    for i, (p, q) in enumerate(zip(pcpt, gen)):
        lo, n = len(p[0]) + 1, len(q[0])
        torch.testing.assert_close(ours["pred"][i, lo: lo + n], theirs["gen_pred"][i, :n], atol=TOL, rtol=TOL)
        torch.testing.assert_close(ours["mvc_pred"][i, lo: lo + n], theirs["gen_mvc"][i, :n], atol=TOL, rtol=TOL)


def test_vocab_ids_line_up_and_remap_by_symbol(tmp_path: Path) -> None:
    ref, vocab = reference(flash=False)
    voc, perm = scgpt_vocab(vocab)
    assert perm[:3].tolist() == [N_GENES, N_GENES + 1, N_GENES + 2] and perm[3] == 0
    config, state = convert_scgpt(ref.state_dict(), ARGS, vocab)
    emb = ref.state_dict()["encoder.embedding.weight"]
    assert torch.equal(state["encoder.embedding.weight"][voc.lookup(["G5"])[0]], emb[vocab["G5"]])
    # a corpus vocabulary keyed by Ensembl id with symbols: rows follow the symbols; unknown genes get new rows
    target = Vocab(("<pad>", "<mask>", "<cls>", "<eos>"), ["ENSG00000000007", "ENSG00000000999"], ["G7", "NEW"])
    cfg2, state2, counts = remap_vocab(config, state, voc, target)
    assert counts == {"kept": 3, "new": 3, "dropped": len(voc) - 3}
    assert (cfg2.vocab_size, cfg2.pad_id, cfg2.cls_id) == (6, 0, 2)
    new_emb = state2["encoder.embedding.weight"]
    assert torch.equal(new_emb[4], emb[vocab["G7"]]) and torch.equal(new_emb[2], emb[vocab["<cls>"]])
    assert new_emb[5].abs().max() <= 0.1
    ScGPTModel(cfg2).load_state_dict(state2)


def test_save_and_load_converted_and_the_subcommand(tmp_path: Path) -> None:
    ref, vocab = reference(flash=False)
    config, state = convert_scgpt(ref.state_dict(), ARGS, vocab)
    voc, _ = scgpt_vocab(vocab)
    for out in (tmp_path / "m.pt", tmp_path / "folder"):
        file = save_converted(out, config, state, voc)
        model, voc2 = load_converted(out)
        assert file.is_file() and voc2.gene_ids == voc.gene_ids and voc2.specials == voc.specials
        torch.testing.assert_close(model.state_dict()["decoder.fc.4.weight"], state["decoder.fc.4.weight"])
    assert (tmp_path / "folder" / "vocab.tsv").is_file()
    from scfm.cli.convert import CONVERTERS

    assert "scgpt" in CONVERTERS and callable(CONVERTERS["scgpt"].run)


def test_bad_checkpoints_are_named(tmp_path: Path) -> None:
    ref, vocab = reference(flash=False)
    state = dict(ref.state_dict())
    with pytest.raises(ScfmInputError, match=r"shape|missing"):
        convert_scgpt(state, dict(ARGS, nlayers=3), vocab)
    with pytest.raises(ScfmInputError, match=r"unexpected.*surprise"):
        convert_scgpt({**state, "surprise.weight": torch.zeros(1)}, ARGS, vocab)
    with pytest.raises(ScfmInputError, match="rows"):
        convert_scgpt(state, ARGS, vocab | {"EXTRA": N_GENES + 3})
    with pytest.raises(ScfmInputError, match="input_emb_style"):
        convert_scgpt(state, dict(ARGS, input_emb_style="scaling"), vocab)
    with pytest.raises(ScfmInputError, match=r"best_model\.pt not found"):
        load_scgpt(tmp_path)
    no_flag = {k: v for k, v in state.items() if k != "flag_encoder.weight"}  # pre-generative checkpoints
    _, converted = convert_scgpt(no_flag, ARGS, vocab)
    assert converted["flag_encoder.weight"].shape == (2, D)


def test_cli_writes_a_bundle_with_scgpt_encoding(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """scfm-convert scgpt <dir> <folder>: a model bundle whose backbone equals the converted model, bin-encoded as
    scGPT (its n_bins, max_seq_len 1,200 by default, <cls> first)."""
    from scfm.bundle import load_pretrained
    from scfm.cli.convert import main

    ref, vocab = reference(flash=False)
    folder = save_folder(tmp_path / "scgpt", ref, vocab, ARGS, flash=False)
    assert main(["scgpt", str(folder), str(tmp_path / "bundle")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, encoding, voc = load_pretrained(summary["out"])
    assert encoding.kind == "bin" and (encoding.n_bins, encoding.max_len) == (51, 1200)
    assert encoding.cls_id == voc.special_id("<cls>")
    direct, _ = load_scgpt(folder)
    batch = our_batch(voc, cells(vocab))
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["pred"], direct(batch)["pred"], rtol=0, atol=0)
