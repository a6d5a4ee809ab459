"""Geneformer converter: a random HF BertForMaskedLM of Geneformer's shape, converted, gives the same logits."""

from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF reference model needs `transformers` (dev extra)")

from scfm.cli.convert import CONVERTERS, main  # noqa: E402
from scfm.convert.geneformer import (  # noqa: E402
    convert_geneformer,
    geneformer_vocab,
    load_converted,
    load_geneformer,
    read_hf_folder,
    read_token_dictionary,
    remap_vocab,
    vocab_index,
)
from scfm.data.vocab import Vocab  # noqa: E402
from scfm.errors import ScfmInputError  # noqa: E402
from scfm.model.bert import BertForMaskedGeneModeling  # noqa: E402

VOCAB = 100
TOL = 1e-5
LENGTHS = (7, 23, 1, 15)


def hf_config(**overrides) -> transformers.BertConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              hidden_act="relu", hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02,
              max_position_embeddings=64, pad_token_id=0, layer_norm_eps=1e-12)
    kw.update(overrides)
    return transformers.BertConfig(**kw)


def hf_model(seed: int = 0, **overrides) -> transformers.BertForMaskedLM:
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(hf_config(**overrides)).eval()
    with torch.no_grad():  # non-trivial token-type row 0, LayerNorm and bias values, so folding is tested
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias") or "token_type" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved HF model folder (model.safetensors + config.json), as save_pretrained writes it."""
    path = tmp_path_factory.mktemp("hf_geneformer")
    hf_model().save_pretrained(path)
    return path


def cells(lengths=LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def padded(cs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    L = max(len(c) for c in cs)
    gene_ids = torch.zeros(len(cs), L, dtype=torch.long)
    positions = torch.zeros(len(cs), L, dtype=torch.long)
    mask = torch.zeros(len(cs), L, dtype=torch.bool)
    for i, c in enumerate(cs):
        gene_ids[i, : len(c)], positions[i, : len(c)], mask[i, : len(c)] = c, torch.arange(len(c)), True
    return {"gene_ids": gene_ids, "positions": positions, "padding_mask": mask}


def packed(cs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(c) for c in cs])
    return {"gene_ids": torch.cat(cs)[None], "positions": torch.cat([torch.arange(n) for n in lengths.tolist()])[None],
            "doc_ids": torch.repeat_interleave(torch.arange(len(cs)), lengths)[None],
            "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)}


@torch.no_grad()
def hf_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["gene_ids"], attention_mask=batch["padding_mask"].long()).logits


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("hf_attention", ["eager", "sdpa"])
def test_padded_logits_match_hf(hf_dir: Path, attention: str, hf_attention: str) -> None:
    ref = transformers.BertForMaskedLM.from_pretrained(hf_dir, attn_implementation=hf_attention).eval()
    ours = load_geneformer(hf_dir, attention=attention)
    assert not ours.training
    batch = padded(cells())
    with torch.no_grad():
        got = ours(batch)["logits"]
    want = hf_logits(ref, batch)
    real = batch["padding_mask"]  # HF computes padded rows too; only real tokens are comparable
    torch.testing.assert_close(got[real], want[real], atol=TOL, rtol=TOL)


def test_packed_logits_match_hf_per_cell(hf_dir: Path) -> None:
    ref = transformers.BertForMaskedLM.from_pretrained(hf_dir).eval()
    ours = load_geneformer(hf_dir, attention="sdpa")
    cs = cells()
    with torch.no_grad():
        got = ours(packed(cs))["logits"][0]  # [T, V]
        want = torch.cat([ref(input_ids=c[None]).logits[0] for c in cs])  # each cell alone, no padding
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_old_style_checkpoint(tmp_path: Path) -> None:
    """A transformers-4.x pytorch_model.bin: explicit tied decoder weight and bias, position_ids buffer, pooler."""
    torch.manual_seed(1)
    ref = transformers.BertForMaskedLM(hf_config()).eval()
    state = dict(ref.state_dict())
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]
    state["bert.pooler.dense.weight"], state["bert.pooler.dense.bias"] = torch.randn(64, 64), torch.randn(64)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config().to_dict()))
    ours = load_geneformer(tmp_path)
    batch = padded(cells())
    with torch.no_grad():
        got = ours(batch)["logits"]
    real = batch["padding_mask"]
    torch.testing.assert_close(got[real], hf_logits(ref, batch)[real], atol=TOL, rtol=TOL)
    assert ours.mlm_head.decoder.weight is ours.embeddings.word_embeddings.weight  # still tied


def test_gelu_checkpoint(tmp_path: Path) -> None:
    ref = hf_model(seed=2, hidden_act="gelu")
    ref.save_pretrained(tmp_path)
    ours = load_geneformer(tmp_path)
    assert ours.config.activation == "gelu"
    batch = padded(cells())
    with torch.no_grad():
        got = ours(batch)["logits"]
    real = batch["padding_mask"]
    torch.testing.assert_close(got[real], hf_logits(ref, batch)[real], atol=TOL, rtol=TOL)


def test_config_fields(hf_dir: Path) -> None:
    hf_config_dict, state = read_hf_folder(hf_dir)
    config, ours = convert_geneformer(state, hf_config_dict)
    assert (config.vocab_size, config.hidden, config.layers, config.heads, config.ffn, config.max_position) == (
        VOCAB, 64, 2, 4, 128, 64)
    assert (config.activation, config.dropout, config.attention_dropout, config.pad_id) == ("relu", 0.02, 0.02, 0)
    assert not any(k.startswith(("bert.", "cls.")) for k in ours)
    BertForMaskedGeneModeling(config).load_state_dict(ours, strict=True)
    # HF's BertLayer names -> nn.TransformerEncoderLayer's: q; k; v packed, the rest renamed
    hf = "bert.encoder.layer.1."
    for t in ("weight", "bias"):
        packed = torch.cat([state[f"{hf}attention.self.{n}.{t}"] for n in ("query", "key", "value")])
        assert torch.equal(ours[f"encoder.layer.1.self_attn.in_proj_{t}"], packed)
    for theirs, mine in (("attention.output.dense", "self_attn.out_proj"), ("attention.output.LayerNorm", "norm1"),
                         ("intermediate.dense", "linear1"), ("output.dense", "linear2"), ("output.LayerNorm", "norm2")):
        assert torch.equal(ours[f"encoder.layer.1.{mine}.weight"], state[f"{hf}{theirs}.weight"])


# ---------------------------------------------------------------- errors


def _converted_inputs(hf_dir: Path) -> tuple[dict, dict]:
    cfg, state = read_hf_folder(hf_dir)
    return cfg, dict(state)


def test_missing_key_is_named(hf_dir: Path) -> None:
    cfg, state = _converted_inputs(hf_dir)
    del state["bert.encoder.layer.1.output.dense.bias"]
    with pytest.raises(ScfmInputError, match=r"bert\.encoder\.layer\.1\.output\.dense\.bias"):
        convert_geneformer(state, cfg)


def test_missing_query_key_or_value_is_named(hf_dir: Path) -> None:
    cfg, state = _converted_inputs(hf_dir)
    del state["bert.encoder.layer.0.attention.self.key.weight"]
    with pytest.raises(ScfmInputError, match=r"bert\.encoder\.layer\.0\.attention\.self\.key\.weight"):
        convert_geneformer(state, cfg)
    cfg, state = _converted_inputs(hf_dir)
    for n in ("query", "key", "value"):
        del state[f"bert.encoder.layer.1.attention.self.{n}.bias"]
    with pytest.raises(ScfmInputError, match=r"bert\.encoder\.layer\.1\.attention\.self\.\{query,key,value\}\.bias"):
        convert_geneformer(state, cfg)


def test_unexpected_key_is_named(hf_dir: Path) -> None:
    cfg, state = _converted_inputs(hf_dir)
    state["classifier.weight"] = torch.zeros(3, 64)
    with pytest.raises(ScfmInputError, match=r"unexpected key 'classifier\.weight'"):
        convert_geneformer(state, cfg)


def test_shape_mismatch_is_named(hf_dir: Path) -> None:
    cfg, state = _converted_inputs(hf_dir)
    cfg["intermediate_size"] = 256
    with pytest.raises(ScfmInputError, match=r"bert\.encoder\.layer\.0\.intermediate\.dense\.weight.*\(128, 64\)"):
        convert_geneformer(state, cfg)


@pytest.mark.parametrize("act", ["tanh", "quick_gelu", None])
def test_unsupported_activation(hf_dir: Path, act: str | None) -> None:
    cfg, state = _converted_inputs(hf_dir)
    cfg["hidden_act"] = act
    with pytest.raises(ScfmInputError, match="hidden_act"):
        convert_geneformer(state, cfg)


def test_untied_decoder_and_relative_positions_refused(hf_dir: Path) -> None:
    cfg, state = _converted_inputs(hf_dir)
    state["cls.predictions.decoder.weight"] = torch.randn(VOCAB, 64)
    with pytest.raises(ScfmInputError, match="not tied"):
        convert_geneformer(state, cfg)
    cfg2, state2 = _converted_inputs(hf_dir)
    cfg2["position_embedding_type"] = "relative_key"
    with pytest.raises(ScfmInputError, match="position_embedding_type"):
        convert_geneformer(state2, cfg2)


def test_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(ScfmInputError, match=r"config\.json"):
        read_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config().to_dict()))
    with pytest.raises(ScfmInputError, match="no weights file"):
        read_hf_folder(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"truncated")
    with pytest.raises(ScfmInputError, match="weights_only"):
        read_hf_folder(tmp_path)


# ---------------------------------------------------------------- token dictionaries and vocab remapping


def _token_dict(n_genes: int = VOCAB - 2) -> dict[str, int]:
    return {"<pad>": 0, "<mask>": 1, **{f"ENSG{i:011d}": i + 2 for i in range(n_genes)}}


def test_token_dictionary_json_and_plain_pickle(tmp_path: Path) -> None:
    d = _token_dict()
    (tmp_path / "t.json").write_text(json.dumps(d))
    (tmp_path / "t.pkl").write_bytes(pickle.dumps(d))
    assert read_token_dictionary(tmp_path / "t.json") == d == read_token_dictionary(tmp_path / "t.pkl")
    vocab = geneformer_vocab(tmp_path / "t.pkl", VOCAB)
    assert vocab.specials == ("<pad>", "<mask>") and vocab.lookup(["ENSG00000000000"])[0] == 2  # ids unchanged
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(OrderedDict(d)))  # needs a class: refused, nothing runs
    with pytest.raises(ScfmInputError, match="plain pickled dict"):
        read_token_dictionary(tmp_path / "evil.pkl")
    with pytest.raises(ScfmInputError, match="has 100 tokens, the model 105"):
        geneformer_vocab(tmp_path / "t.json", VOCAB + 5)


def test_builtin_dictionaries_line_up() -> None:
    v1 = geneformer_vocab(vocab_size=25_426)
    v2 = geneformer_vocab(vocab_size=20_275)
    assert v1.specials == ("<pad>", "<mask>") and v2.specials == ("<pad>", "<mask>", "<cls>", "<eos>")
    with pytest.raises(ScfmInputError, match="no built-in"):
        geneformer_vocab(vocab_size=123)


def test_remap_to_corpus_vocab(hf_dir: Path) -> None:
    """Target vocab: scfm's 4 specials, half of Geneformer's genes (other order) and 10 unseen genes."""
    source = Vocab.from_token_dict(_token_dict())
    genes = source.gene_ids[::2] + [f"ENSG9{i:010d}" for i in range(10)]
    target = Vocab.build(genes)
    index = vocab_index(source, target)
    assert index[:4].tolist() == [0, 1, -1, -1] and (index[4:] >= 0).sum() == len(source.gene_ids[::2])
    cfg, state = read_hf_folder(hf_dir)
    config, ours = convert_geneformer(state, cfg)
    new_config, new_state, counts = remap_vocab(config, ours, source, target)
    assert counts == {"kept": 2 + 49, "new": 2 + 10, "dropped": VOCAB - 51}
    assert new_config.vocab_size == len(target)
    base = BertForMaskedGeneModeling(config).eval()
    base.load_state_dict(ours)
    moved = BertForMaskedGeneModeling(new_config).eval()
    moved.load_state_dict(new_state)
    # the same cell in both id spaces gives the same logits over the shared tokens
    shared = np.flatnonzero(index >= 0)
    tgt_genes = torch.from_numpy(shared[shared >= 4][:12])
    src_genes = torch.from_numpy(index[tgt_genes.numpy()])
    with torch.no_grad():
        a = base(padded([src_genes]))["logits"][0][:, torch.from_numpy(index[shared])]
        b = moved(padded([tgt_genes]))["logits"][0][:, torch.from_numpy(shared)]
    torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_load_geneformer_with_vocab(hf_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokens.json").write_text(json.dumps(_token_dict()))
    target = Vocab.build(Vocab.from_token_dict(_token_dict()).gene_ids[:30])
    target.save(tmp_path / "vocab.tsv")
    model = load_geneformer(hf_dir, vocab=tmp_path, token_dictionary=tmp_path / "tokens.json")
    assert model.config.vocab_size == len(target) == 34


# ---------------------------------------------------------------- CLI


@pytest.mark.parametrize("out_name", ["gf.pt", "gf_dir"])
def test_cli_round_trip(hf_dir: Path, tmp_path: Path, out_name: str, capsys: pytest.CaptureFixture) -> None:
    tokens = _token_dict()
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    medians = {g: 1.0 + i for i, g in enumerate(t for t in tokens if not t.startswith("<"))}
    (tmp_path / "medians.json").write_text(json.dumps(medians))
    out = tmp_path / out_name
    assert main(["geneformer", str(hf_dir), str(out), "--token-dictionary", str(tmp_path / "tokens.json"),
                 "--gene-medians", str(tmp_path / "medians.json")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["vocab_size"] == VOCAB and summary["vocab"] == VOCAB
    if out_name.endswith(".pt"):
        payload = torch.load(out, weights_only=True)  # plain tensors, dicts, strings: weights_only reads it
        assert payload["format"] == "scfm.bert/1"
        model, vocab = load_converted(out)
    else:  # a model bundle, with Geneformer's rank encoding and the medians given
        from scfm.bundle import load_pretrained

        files = {p.name for p in out.iterdir()}
        assert {"config.yaml", "vocab.tsv", "gene_medians.tsv", "weights.safetensors"} <= files
        model, encoding, vocab = load_pretrained(out)
        assert encoding.kind == "rank" and encoding.max_len == model.config.max_position
        first = vocab.lookup([next(iter(medians))])[0]
        assert encoding.median[first] == 1.0 and np.isnan(encoding.median[0])
    assert vocab is not None and len(vocab) == VOCAB
    batch = padded(cells())
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["logits"], load_geneformer(hf_dir)(batch)["logits"])


def test_cli_errors_and_registry(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "geneformer" in CONVERTERS
    assert main(["geneformer", str(tmp_path), str(tmp_path / "x.pt")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_a_v1_model_keeps_its_layout_when_re_indexed(hf_dir: Path, tmp_path: Path) -> None:
    """The layout is the model's own (its dictionary has no <cls>/<eos>), not the target vocabulary's; the bundle's
    config tells genes from special tokens."""
    from scfm.bundle import load_pretrained

    tokens = _token_dict()
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    genes = [t for t in tokens if not t.startswith("<")]
    (tmp_path / "medians.json").write_text(json.dumps({g: 1.0 for g in genes}))
    target = Vocab.build(genes[:30])  # scfm's own vocabulary: <pad> <mask> <cls> <eos> + genes
    target.save(tmp_path / "vocab.tsv")
    assert main(["geneformer", str(hf_dir), str(tmp_path / "b"), "--token-dictionary", str(tmp_path / "tokens.json"),
                 "--gene-medians", str(tmp_path / "medians.json"), "--vocab", str(tmp_path / "vocab.tsv")]) == 0
    model, encoding, vocab = load_pretrained(tmp_path / "b")
    assert encoding.layout == "v1" and model.config.first_gene_id == vocab.n_special == 4
