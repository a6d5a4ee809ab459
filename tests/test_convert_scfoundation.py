"""scFoundation converter: a randomly initialised re-implementation of the original ``MaeAutobin`` layout
(biomap-research/scFoundation ``model/pretrainmodels/{mae_autobin,performer,transformer}.py``, ``model/load.py``;
their module and parameter names, their maths, written here from reading that code), saved as ``models.ckpt``,
converted, and compared output for output with ``XtrimoModel``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scfm.convert.scfoundation import convert_scfoundation, load_converted, load_scfoundation, save_converted
from scfm.errors import ScfmInputError
from scfm.model.xtrimo import XtrimoModel

G = 30  # genes; + T + S
SEQ = G + 2
PAD, MASK = 103.0, 102.0  # their value-coded pad / mask "token ids"


# ------------------------------------------------------------------ the original layout (reference)
class AutoDiscretizationEmbedding2(nn.Module):
    def __init__(self, dim, max_seq_len, bin_num, bin_alpha, mask_token_id, pad_token_id):
        super().__init__()
        self.bin_alpha, self.mask_token_id, self.pad_token_id = bin_alpha, mask_token_id, pad_token_id
        self.mlp = nn.Linear(1, bin_num)
        self.mlp2 = nn.Linear(bin_num, bin_num)
        self.LeakyReLU = nn.LeakyReLU(0.1)
        self.Softmax = nn.Softmax(dim=-1)
        self.emb = nn.Embedding(bin_num, dim)
        self.emb_mask = nn.Embedding(1, dim)
        self.emb_pad = nn.Embedding(1, dim)
        self.bin_num_idx = torch.tensor(range(bin_num))  # a plain attribute, not in the state dict

    def forward(self, x):
        x_mask_idx = (x == self.mask_token_id).nonzero()
        x_pad_idx = (x == self.pad_token_id).nonzero()
        x = self.LeakyReLU(self.mlp(x))
        x = self.bin_alpha * x + self.mlp2(x)
        x = torch.matmul(self.Softmax(x), self.emb(self.bin_num_idx))
        t0 = torch.tensor(0, dtype=torch.long)
        x[x_mask_idx[:, 0], x_mask_idx[:, 1], :] = self.emb_mask(t0).repeat(x_mask_idx.shape[0], 1)
        x[x_pad_idx[:, 0], x_pad_idx[:, 1], :] = self.emb_pad(t0).repeat(x_pad_idx.shape[0], 1)
        return x


class pytorchTransformerModule(nn.Module):  # noqa: N801 - their name
    def __init__(self, max_seq_len, dim, depth, heads, ff_mult=4):
        super().__init__()
        self.transformer_encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model=dim, nhead=heads, dim_feedforward=dim * ff_mult, batch_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, padding_mask):
        for mod in self.transformer_encoder:
            x = mod(x, src_key_padding_mask=padding_mask)
        return self.norm(x)


def softmax_kernel(data, projection_matrix, is_query, eps=1e-4):
    data_normalizer = data.shape[-1] ** -0.25
    ratio = projection_matrix.shape[0] ** -0.5
    data_dash = torch.einsum("...id,jd->...ij", data_normalizer * data, projection_matrix)
    diag = (data**2).sum(-1).unsqueeze(-1) / 2.0 * data_normalizer**2
    if is_query:
        return ratio * (torch.exp(data_dash - diag - data_dash.max(dim=-1, keepdim=True).values) + eps)
    return ratio * (torch.exp(data_dash - diag - data_dash.max()) + eps)  # one max over the whole batch


def linear_attention(q, k, v):
    d_inv = 1.0 / torch.einsum("...nd,...d->...n", q, k.sum(dim=-2))
    context = torch.einsum("...nd,...ne->...de", k, v)
    return torch.einsum("...de,...nd,...n->...ne", context, q, d_inv)


class FastAttention(nn.Module):
    def __init__(self, dim_heads, nb_features):
        super().__init__()
        self.register_buffer("projection_matrix", torch.randn(nb_features, dim_heads))

    def forward(self, q, k, v):
        q = softmax_kernel(q, self.projection_matrix, is_query=True)
        k = softmax_kernel(k, self.projection_matrix, is_query=False)
        return linear_attention(q, k, v)


class SelfAttention(nn.Module):
    def __init__(self, dim, heads, dim_head, nb_features):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.fast_attention = FastAttention(dim_head, nb_features)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=True) for _ in range(3))
        self.to_out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t(x).view(b, n, self.heads, -1).transpose(1, 2) for t in (self.to_q, self.to_k, self.to_v))
        out = self.fast_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.dropout(self.to_out(out))


class PreLayerNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class Chunk(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.w1, self.act, self.dropout, self.w2 = nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(0.0), \
            nn.Linear(dim * mult, dim)

    def forward(self, x):
        return self.w2(self.dropout(self.act(self.w1(x))))


class SequentialSequence(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        for f, g in self.layers:
            x = x + f(x)
            x = x + g(x)
        return x


class Performer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, nb_features):
        super().__init__()
        self.net = SequentialSequence(nn.ModuleList(
            nn.ModuleList([PreLayerNorm(dim, SelfAttention(dim, heads, dim_head, nb_features)),
                           PreLayerNorm(dim, Chunk(FeedForward(dim)))]) for _ in range(depth)))
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    def forward(self, x):
        return self.net(x)


class PerformerModule(nn.Module):
    def __init__(self, max_seq_len, dim, depth, heads, dim_head, nb_features):
        super().__init__()
        self.performer = Performer(dim, depth, heads, dim_head, nb_features)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, **kwargs):  # their decoder ignores its padding mask
        return self.norm(self.performer(x))


class MaeAutobin(nn.Module):
    def __init__(self, max_seq_len, embed_dim, decoder_embed_dim, bin_num, bin_alpha):
        super().__init__()
        self.token_emb = AutoDiscretizationEmbedding2(embed_dim, max_seq_len, bin_num, bin_alpha, MASK, PAD)
        self.pos_emb = nn.Embedding(max_seq_len + 1, embed_dim)
        self.encoder = None
        self.decoder = None
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.norm = nn.LayerNorm(decoder_embed_dim)
        self.to_final = nn.Linear(decoder_embed_dim, 1)

    def forward(self, x, padding_label, encoder_position_gene_ids, encoder_labels, decoder_data,
                decoder_position_gene_ids, decoder_data_padding_labels):
        x = self.token_emb(torch.unsqueeze(x, 2))
        x = x + self.pos_emb(encoder_position_gene_ids)
        x = self.encoder(x, padding_mask=padding_label)
        decoder_data = self.token_emb(torch.unsqueeze(decoder_data, 2))
        position_emb = self.pos_emb(decoder_position_gene_ids)
        batch_idx, gen_idx = (encoder_labels == True).nonzero(as_tuple=True)  # noqa: E712 - their code
        decoder_data[batch_idx, gen_idx] = x[~padding_label].to(decoder_data.dtype)
        decoder_data = decoder_data + position_emb
        decoder_data = self.decoder_embed(decoder_data)
        x = self.decoder(decoder_data, padding_mask=decoder_data_padding_labels)
        return self.to_final(self.norm(x)).squeeze(2)


def gatherData(data, labels, pad_token_id):  # noqa: N802 - their name
    max_num = int(labels.sum(1).max())
    data = torch.hstack([data, torch.full((data.shape[0], max_num), pad_token_id, dtype=data.dtype)])
    none_labels = ~labels
    labels = labels.float()
    labels[none_labels] = -float("inf")
    labels += torch.tensor([(i + 1) * 20000 for i in range(labels.shape[1], 0, -1)], dtype=labels.dtype)
    labels = torch.hstack([labels, torch.ones(labels.shape[0], max_num)])
    new_data = torch.gather(data, 1, labels.topk(max_num).indices)
    return new_data, new_data == pad_token_id


ENC = dict(hidden_dim=32, depth=2, heads=4, dim_head=8, module_type="transformer")
DEC = dict(hidden_dim=24, depth=2, heads=3, dim_head=8, module_type="performer")
NB_FEATURES = int(8 * math.log(8))


def reference_model(seed: int = 0) -> MaeAutobin:
    torch.manual_seed(seed)
    model = MaeAutobin(SEQ, ENC["hidden_dim"], DEC["hidden_dim"], bin_num=20, bin_alpha=0.7)
    model.encoder = pytorchTransformerModule(SEQ, ENC["hidden_dim"], ENC["depth"], ENC["heads"])
    model.decoder = PerformerModule(SEQ, DEC["hidden_dim"], DEC["depth"], DEC["heads"], DEC["dim_head"], NB_FEATURES)
    with torch.no_grad():  # make norms / biases non-trivial so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def models_ckpt(model: MaeAutobin) -> dict:
    """The release layout: {'cell': {'state_dict': {'model.<name>': ...}, 'config': nested training config}}."""
    config = {"model": "mae_autobin",
              "model_config": {"mae_autobin": {"encoder": ENC, "decoder": DEC, "n_class": 104, "pad_token_id": 103,
                                               "mask_token_id": 102, "bin_num": 20, "bin_alpha": 0.7}},
              "dataset_config": {"rnaseq": {"seq_len": SEQ}}}
    return {"cell": {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "config": config}}


def cells(B: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    expressed = torch.rand(B, G, generator=gen) < 0.4
    raw = torch.where(expressed, torch.rand(B, G, generator=gen) * 4 + 0.2, torch.zeros(B, G))
    masked = torch.where(expressed, torch.rand(B, G, generator=gen) < 0.3, torch.rand(B, G, generator=gen) < 0.05)
    depth = torch.rand(B, 2, generator=gen) + 3.0
    return {"values": torch.cat([raw.masked_fill(masked, 0.0), depth], 1),
            "value_mask": torch.cat([masked, torch.zeros(B, 2, dtype=torch.bool)], 1),
            "encoder_mask": torch.cat([expressed & ~masked, torch.ones(B, 2, dtype=torch.bool)], 1),
            "token_kind": torch.cat([torch.zeros(B, G, dtype=torch.long), torch.tensor([[1, 2]]).expand(B, 2)], 1),
            "positions": torch.arange(SEQ).expand(B, SEQ).clone(),
            "padding_mask": torch.ones(B, SEQ, dtype=torch.bool), "lengths": torch.full((B,), SEQ)}


def reference_forward(ref: MaeAutobin, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Their inputs (``getEncoerDecoderData`` with value-coded masks), one cell at a time (their decoder's key
    stabiliser is one max over the whole batch; ours is per cell). -> [B, SEQ]."""
    out = []
    for b in range(batch["values"].shape[0]):
        data = batch["values"][b:b + 1].masked_fill(batch["value_mask"][b:b + 1], MASK)
        labels = batch["encoder_mask"][b:b + 1]
        enc, enc_pad = gatherData(data, labels, PAD)
        ids, _ = gatherData(torch.arange(SEQ)[None].float(), labels, PAD)
        ids = ids.long().masked_fill(enc_pad, SEQ)
        out.append(ref(enc, enc_pad, ids, labels, data, torch.arange(SEQ)[None],
                       torch.zeros(1, SEQ, dtype=torch.bool)))
    return torch.cat(out)


def test_converted_model_matches_the_original_layout(tmp_path):
    ref = reference_model()
    path = tmp_path / "models.ckpt"
    torch.save(models_ckpt(ref), path)
    genes = tmp_path / "OS_scRNA_gene_index.tsv"
    genes.write_text("gene_name\n" + "\n".join(f"GENE{i}" for i in range(G)) + "\n")
    weights = load_scfoundation(path, genes, key="cell")
    cfg = weights.config
    assert (cfg.layers, cfg.hidden, cfg.heads, cfg.ffn) == (2, 32, 4, 128)
    assert (cfg.decoder_layers, cfg.decoder_hidden, cfg.decoder_heads, cfg.decoder_head_dim) == (2, 24, 3, 8)
    assert (cfg.nb_features, cfg.n_bins, cfg.bin_alpha, cfg.max_seq_len) == (NB_FEATURES, 20, 0.7, SEQ)
    assert weights.genes == [f"GENE{i}" for i in range(G)]
    ours = XtrimoModel(cfg)
    ours.load_state_dict(weights.state_dict)  # strict: every name maps
    ours.eval()
    batch = cells()
    with torch.no_grad():
        expected = reference_forward(ref, batch)
        got = ours(batch)["pred"]
    torch.testing.assert_close(got, expected[:, :G], rtol=1e-5, atol=1e-5)
    # the encoder path exactly, and scFoundation's cell embedding (get_embedding.py, pool_type='all')
    with torch.no_grad():
        for b in range(2):
            labels = batch["encoder_mask"][b:b + 1]
            x, pad = gatherData(batch["values"][b:b + 1], labels, PAD)
            ids, _ = gatherData(torch.arange(SEQ)[None].float(), labels, PAD)
            emb = ref.encoder(ref.token_emb(x[..., None]) + ref.pos_emb(ids.long()), pad)
            pooled = torch.cat([emb[:, -1], emb[:, -2], emb[:, :-2].max(1).values, emb[:, :-2].mean(1)], 1)
            one = {k: v[b:b + 1] for k, v in batch.items()}
            torch.testing.assert_close(ours.cell_embedding(one, ours.encode(one)), pooled, rtol=1e-5, atol=1e-5)
    # a saved conversion reads back
    save_converted(tmp_path / "xtrimo.pt", weights)
    again = load_converted(tmp_path / "xtrimo.pt")
    assert again.config == cfg and (tmp_path / "xtrimo.genes.txt").read_text().split() == weights.genes
    assert all(torch.equal(again.state_dict[k], v) for k, v in weights.state_dict.items())


def test_plain_state_dict_and_load_model_layouts():
    ref = reference_model(seed=3)
    plain = ref.state_dict()
    cfg, state = convert_scfoundation(plain, encoder_heads=4)  # no config: heads given
    cfg2, state2 = convert_scfoundation({"config": {"encoder": ENC, "decoder": DEC}, "model_state_dict": plain})
    assert cfg == cfg2 and state.keys() == state2.keys()
    model = XtrimoModel(cfg)
    model.load_state_dict(state)
    torch.testing.assert_close(model.decoder.layers[1].attn.projection_matrix,
                               plain["decoder.performer.net.layers.1.0.fn.fast_attention.projection_matrix"])


def test_bad_checkpoints_are_clear_errors(tmp_path):
    ref = reference_model()
    with pytest.raises(ScfmInputError, match="choose key"):
        convert_scfoundation(models_ckpt(ref), key="rde")
    with pytest.raises(ScfmInputError, match="not an scFoundation"):
        convert_scfoundation({"weight": torch.zeros(2)})
    sd = ref.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ScfmInputError, match="unknown"):
        convert_scfoundation(sd, encoder_heads=4)
    with pytest.raises(ScfmInputError, match=r"shape|divisible"):
        convert_scfoundation(ref.state_dict(), encoder_heads=5)
    torch.save(models_ckpt(ref), tmp_path / "m.ckpt")
    bad_list = tmp_path / "genes.tsv"
    bad_list.write_text("gene_name\nA\nB\n")
    with pytest.raises(ScfmInputError, match="positions"):
        load_scfoundation(tmp_path / "m.ckpt", bad_list)
    with pytest.raises(ScfmInputError, match="not found"):
        load_scfoundation(tmp_path / "missing.ckpt")


def test_cli_writes_a_bundle_over_the_gene_list(tmp_path):
    """scfm-convert scfoundation <ckpt> <folder> --gene-list: a bundle with the continuous encoding over scFoundation's
    gene list (in list order) and the converted weights."""
    from scfm.bundle import load_pretrained
    from scfm.cli.convert import main

    ref = reference_model()
    torch.save(models_ckpt(ref), tmp_path / "models.ckpt")
    genes = tmp_path / "genes.tsv"
    genes.write_text("gene_name\n" + "\n".join(f"GENE{i}" for i in range(G)) + "\n")
    assert main(["scfoundation", str(tmp_path / "models.ckpt"), str(tmp_path / "bundle"), "--gene-list",
                 str(genes)]) == 0
    model, encoding, vocab = load_pretrained(tmp_path / "bundle")
    assert encoding.kind == "continuous" and encoding.n_genes == G and encoding.max_len == model.config.max_seq_len
    assert [vocab.gene_ids[t - vocab.n_special] for t in encoding.gene_tokens] == [f"GENE{i}" for i in range(G)]
    weights = load_scfoundation(tmp_path / "models.ckpt", genes, key="cell")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.state_dict.items())
    assert main(["scfoundation", str(tmp_path / "models.ckpt"), str(tmp_path / "no_genes")]) == 2  # needs the list
