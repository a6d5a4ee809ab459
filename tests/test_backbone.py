"""The backbone protocol of the three architectures (encode, cell_embedding over every pool, gene_embeddings,
padded == packed) and the shared transformer blocks against torch's nn.TransformerEncoderLayer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scfm.errors import ScfmInputError
from scfm.model.attention import Layout
from scfm.model.backbone import Backbone, mean_over_cells
from scfm.model.bert import BertConfig, BertForMaskedGeneModeling
from scfm.model.blocks import BlockSpec, TransformerLayer, TransformerStack
from scfm.model.scgpt import ScGPTConfig, ScGPTModel
from scfm.model.xtrimo import XtrimoConfig, XtrimoModel

ARCHS = ("bert", "scgpt", "xtrimo")
VOCAB, CLS, FIRST_GENE, D = 40, 2, 4, 32
LENGTHS = (5, 8, 3)  # <cls> + genes
G = 12  # xtrimo: genes per cell (+ T, S)
TOL = 1e-5


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden=D, layers=2, heads=4, ffn=64)
    if arch == "bert":
        return BertForMaskedGeneModeling(BertConfig(**shape, max_position=16, first_gene_id=FIRST_GENE)).eval()
    if arch == "scgpt":
        return ScGPTModel(ScGPTConfig(**shape, n_bins=11, cls_id=CLS)).eval()
    return XtrimoModel(XtrimoConfig(**shape, decoder_layers=1, decoder_hidden=16, decoder_heads=2, decoder_ffn=32,
                                    max_seq_len=G + 2, attention="eager")).eval()


def token_cells(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Cells as <cls> + distinct genes, with positions, bins and values."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        genes = torch.randperm(VOCAB - FIRST_GENE, generator=g)[: n - 1] + FIRST_GENE
        bins = torch.randint(1, 11, (n - 1,), generator=g)
        out.append({"gene_ids": torch.cat([torch.tensor([CLS]), genes]), "positions": torch.arange(n),
                    "values_bin": torch.cat([torch.tensor([0]), bins])})
    return out


def padded(cells: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    L = max(LENGTHS) + 2  # and two columns of padding everywhere
    batch = {k: torch.zeros(len(cells), L, dtype=v.dtype) for k, v in cells[0].items()}
    batch["padding_mask"] = torch.zeros(len(cells), L, dtype=torch.bool)
    for i, c in enumerate(cells):
        for k, v in c.items():
            batch[k][i, : len(v)] = v
        batch["padding_mask"][i, : len(c["gene_ids"])] = True
    return batch


def packed(cells: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor(LENGTHS)
    batch = {k: torch.cat([c[k] for c in cells])[None] for k in cells[0]}
    batch["doc_ids"] = torch.repeat_interleave(torch.arange(len(cells)), lengths)[None]
    batch["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    return batch


def continuous(B: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """An encoding=continuous-like batch: G genes in list order, then T and S; the encoder sees the expressed
    genes + T + S."""
    gen = torch.Generator().manual_seed(seed)
    expressed = torch.rand(B, G, generator=gen) < 0.5
    expressed[:, 0] = True
    values = torch.cat([torch.where(expressed, torch.rand(B, G, generator=gen) + 0.1, 0.0), torch.full((B, 2), 3.0)], 1)
    return {"values": values, "value_mask": torch.zeros(B, G + 2, dtype=torch.bool),
            "encoder_mask": torch.cat([expressed, torch.ones(B, 2, dtype=torch.bool)], 1),
            "token_kind": torch.cat([torch.zeros(B, G, dtype=torch.long), torch.tensor([[1, 2]]).expand(B, 2)], 1),
            "positions": torch.arange(G + 2).expand(B, G + 2).clone()}


def batches(arch: str) -> list[dict[str, torch.Tensor]]:
    return [continuous()] if arch == "xtrimo" else [padded(token_cells()), packed(token_cells())]


# ---------------------------------------------------------------- the protocol


@pytest.mark.parametrize("arch", ARCHS)
def test_every_pool_gives_n_cells_by_its_size(arch: str) -> None:
    model = build(arch)
    assert isinstance(model, Backbone)
    assert model.hidden_size == D and model.POOLS
    for batch in batches(arch):
        with torch.no_grad():
            hidden = model.encode(batch)
            default = model.cell_embedding(batch, hidden)
            for pool in model.POOLS:
                emb = model.cell_embedding(batch, hidden, pool)
                assert emb.shape == (3, model.cell_embedding_size(pool)), pool
                assert torch.isfinite(emb).all(), pool
        assert default.shape == (3, model.cell_embedding_size())
    default_pool = {"bert": "mean", "scgpt": "cls", "xtrimo": "all"}[arch]
    torch.testing.assert_close(default, model.cell_embedding(batch, hidden, default_pool))
    assert model.cell_embedding_size("all" if arch == "xtrimo" else None) == (4 * D if arch == "xtrimo" else D)


@pytest.mark.parametrize("arch", ["bert", "scgpt"])
def test_padded_and_packed_give_the_same_cell_embeddings(arch: str) -> None:
    model = build(arch)
    pb, pk = batches(arch)
    with torch.no_grad():
        hp, hk = model.encode(pb), model.encode(pk)
        for pool in model.POOLS:
            torch.testing.assert_close(model.cell_embedding(pb, hp, pool), model.cell_embedding(pk, hk, pool),
                                       atol=TOL, rtol=TOL)
    cls = model.cell_embedding(pb, hp, "cls")
    torch.testing.assert_close(cls, hp[:, 0])  # each cell's first token, its <cls>
    mean = model.cell_embedding(pb, hp, "mean")
    for i, n in enumerate(LENGTHS):  # the mean over the cell's real tokens, padding left out
        torch.testing.assert_close(mean[i], hp[i, :n].mean(0), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_unknown_pool_names_the_valid_ones(arch: str) -> None:
    model = build(arch)
    batch = batches(arch)[0]
    with torch.no_grad():
        hidden = model.encode(batch)
    for call in (lambda: model.cell_embedding(batch, hidden, "w-pool"), lambda: model.cell_embedding_size("w-pool")):
        with pytest.raises(ScfmInputError, match="w-pool") as err:
            call()
        assert all(p in str(err.value) for p in model.POOLS)


@pytest.mark.parametrize("arch", ARCHS)
def test_gene_embeddings_are_the_gene_tokens_states(arch: str) -> None:
    model = build(arch)
    for batch in batches(arch):
        with torch.no_grad():
            hidden = model.encode(batch)
            states, is_gene = model.gene_embeddings(batch, hidden)
        assert is_gene.dtype == torch.bool and states.shape == (*is_gene.shape, D)
        if arch == "xtrimo":  # the encoder's genes: the expressed ones, T and S left out
            assert torch.equal(states, hidden.hidden)
            assert is_gene.sum(1).tolist() == batch["encoder_mask"][:, :G].sum(1).tolist()
            positions = hidden.index[is_gene]
            assert (batch["token_kind"].gather(1, hidden.index)[is_gene] == 0).all() and positions.max() < G
        else:  # every token but <cls> and padding
            assert states is hidden
            assert int(is_gene.sum()) == sum(n - 1 for n in LENGTHS)
            assert (batch["gene_ids"][is_gene] >= FIRST_GENE).all()
        assert states[is_gene].shape == (int(is_gene.sum()), D)


def test_mean_over_cells_packed_without_cu_seqlens_and_outside_ids() -> None:
    hidden = torch.arange(12.0).view(1, 6, 2)
    doc = torch.tensor([[0, 0, 1, 1, 1, 2]])
    real = torch.tensor([[True, True, True, False, True, True]])
    got = mean_over_cells(hidden, real, doc)  # 3 cells: inferred from the doc ids
    torch.testing.assert_close(got, torch.tensor([[1.0, 2.0], [6.0, 7.0], [10.0, 11.0]]))
    got = mean_over_cells(hidden, real, doc, torch.tensor([0, 2, 5], dtype=torch.int32))  # doc 2 is not a cell
    assert got.shape == (2, 2)
    with pytest.raises(ScfmInputError, match="one row"):
        mean_over_cells(hidden.expand(2, 6, 2), real.expand(2, 6), doc.expand(2, 6))


# ---------------------------------------------------------------- the blocks against torch


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 16, generator=g)
    real = torch.arange(7)[None] < torch.tensor([[7], [4], [6]])
    return x, real


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_layer_reproduces_torch_transformer_encoder_layer(norm_first: bool, activation: str) -> None:
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, activation=activation, batch_first=True,
                                     norm_first=norm_first).eval()
    ours = TransformerLayer(BlockSpec(hidden=16, heads=4, ffn=32, layers=1, attention="eager", dropout=0.1,
                                      activation=activation, norm="pre" if norm_first else "post")).eval()
    ours.load_state_dict(ref.state_dict())  # strict: the same names
    x, real = _inputs()
    with torch.no_grad():
        want = ref(x, src_key_padding_mask=~real)
        got = ours(x, Layout(padding_mask=real))
    torch.testing.assert_close(got[real], want[real])


def test_stack_with_final_norm_reproduces_torch_transformer_encoder() -> None:
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)
    ref = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False).eval()
    ours = TransformerStack(BlockSpec(hidden=16, heads=4, ffn=32, layers=2, attention="eager", dropout=0.1,
                                      final_norm_eps=1e-5)).eval()
    ours.load_state_dict(ref.state_dict())
    x, real = _inputs(1)
    with torch.no_grad():
        want, got = ref(x, src_key_padding_mask=~real), ours(x, Layout(padding_mask=real))
    torch.testing.assert_close(got[real], want[real])


def test_scgpt_pre_norm_adds_to_the_normalised_input() -> None:
    torch.manual_seed(2)
    ref = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    ours = TransformerLayer(BlockSpec(hidden=16, heads=4, ffn=32, layers=1, attention="eager",
                                      norm="scgpt-pre")).eval()
    ours.load_state_dict(ref.state_dict())
    x, real = _inputs(2)
    with torch.no_grad():
        h = ref.norm1(x)
        h = ref.norm2(h + ref.self_attn(h, h, h, key_padding_mask=~real, need_weights=False)[0])
        want = h + ref.linear2(torch.relu(ref.linear1(h)))
        got = ours(x, Layout(padding_mask=real))
    torch.testing.assert_close(got[real], want[real])


def test_bert_recipe_has_no_dropout_inside_the_ffn() -> None:
    spec = BlockSpec(hidden=16, heads=4, ffn=32, layers=1, dropout=0.1, attention_dropout=0.3, ffn_dropout=False)
    layer = TransformerLayer(spec)
    assert isinstance(layer.dropout, nn.Identity) and layer.dropout1.p == layer.dropout2.p == 0.1
    assert layer.self_attn.dropout == 0.3
    with pytest.raises(ScfmInputError, match="post, pre, scgpt-pre"):
        BlockSpec(hidden=16, heads=4, ffn=32, layers=1, norm="sandwich")
