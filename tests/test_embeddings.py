"""Embedding parts against their published definitions, and BERT consuming value / condition inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scfm.data.batching import Batching
from scfm.data.stream import CellStream
from scfm.encodings.bin import BinEncoding
from scfm.errors import ScfmInputError
from scfm.model.bert import BertConfig, BertForMaskedGeneModeling
from scfm.model.embeddings import (
    AutoDiscretizationEmbedding,
    ConditionEmbedding,
    ContinuousValueEncoder,
    value_embedding,
)


def test_autodiscretize_matches_the_scfoundation_formula():
    torch.manual_seed(0)
    emb = AutoDiscretizationEmbedding(dim=8, n_bins=5, alpha=0.7).eval()
    x = torch.tensor([[0.0, 0.5, 3.2, 1.0], [2.0, 0.0, 0.1, 9.0]])
    value_mask = torch.tensor([[False, True, False, False], [False, False, False, False]])
    padding = torch.tensor([[True, True, True, True], [True, True, True, False]])
    got = emb(x, value_mask, padding)
    w1, b1 = emb.mlp.weight[:, 0], emb.mlp.bias
    w2, b2 = emb.mlp2.weight, emb.mlp2.bias
    for i in range(2):
        for j in range(4):
            v1 = F.leaky_relu(x[i, j] * w1 + b1, 0.1)
            v2 = w2 @ v1 + b2 + 0.7 * v1
            want = torch.softmax(v2, 0) @ emb.emb.weight
            if value_mask[i, j]:
                want = emb.emb_mask.weight[0]
            if not padding[i, j]:
                want = emb.emb_pad.weight[0]
            torch.testing.assert_close(got[i, j], want, rtol=1e-5, atol=1e-6)


def test_autodiscretize_v1_uses_the_first_layer_only():
    emb = AutoDiscretizationEmbedding(dim=4, n_bins=3, version=1)
    x = torch.tensor([[1.5]])
    v1 = F.leaky_relu(emb.mlp(x.unsqueeze(-1)), 0.1)
    torch.testing.assert_close(emb(x), torch.softmax(v1, -1) @ emb.emb.weight)
    with pytest.raises(ScfmInputError, match="version"):
        AutoDiscretizationEmbedding(dim=4, version=3)


def test_continuous_value_encoder_clamps_and_matches_scgpt():
    torch.manual_seed(0)
    enc = ContinuousValueEncoder(dim=6, dropout=0.0, max_value=4.0).eval()
    x = torch.tensor([[0.0, 2.0, 100.0]])
    h = enc.linear2(torch.relu(enc.linear1(torch.clamp(x, max=4.0).unsqueeze(-1))))
    torch.testing.assert_close(enc(x), F.layer_norm(h, (6,), enc.norm.weight, enc.norm.bias))
    torch.testing.assert_close(enc(x)[0, 2], enc(torch.tensor([[4.0]]))[0, 0])  # above max_value = max_value


def test_unknown_value_embedding_names_the_choices():
    with pytest.raises(ScfmInputError, match="bins"):
        value_embedding("fourier", 8)
    with pytest.raises(ScfmInputError, match="value_embedding"):
        BertConfig(vocab_size=10, value_embedding="fourier")


def test_condition_embedding_is_the_same_padded_and_packed():
    torch.manual_seed(0)
    cond = ConditionEmbedding(4, ["batch", "modality", "perturbation"], {"batch": 3})
    batch_codes = torch.tensor([2, -1])  # the second cell has no batch label: no batch vector
    modality = [torch.tensor([0, 1, 2]), torch.tensor([0, 0])]
    perturbed = [torch.tensor([False, True, False]), torch.tensor([True, False])]
    padded = {"batch": batch_codes, "modality": torch.tensor([[0, 1, 2], [0, 0, 0]]),
              "perturbed": torch.tensor([[False, True, False], [True, False, False]])}
    packed = {"batch": batch_codes, "modality": torch.cat(modality)[None], "perturbed": torch.cat(perturbed)[None],
              "doc_ids": torch.tensor([[0, 0, 0, 1, 1]])}
    a = cond(padded, torch.Size([2, 3]))
    b = cond(packed, torch.Size([1, 5]))[0]
    torch.testing.assert_close(a[0], b[:3])
    torch.testing.assert_close(a[1, :2], b[3:])
    want = cond.modality.weight[0] + cond.perturbed.weight[1]  # cell 2, token 0: no batch vector
    torch.testing.assert_close(a[1, 0], want)
    torch.testing.assert_close(a[0, 1], cond.batch.weight[2] + cond.modality.weight[1] + cond.perturbed.weight[1])


def test_condition_embedding_errors():
    with pytest.raises(ScfmInputError, match="no batch labels"):
        ConditionEmbedding(4, ["batch"], {})
    with pytest.raises(ScfmInputError, match="unknown condition"):
        ConditionEmbedding(4, ["donor"], {})


def test_bert_with_bin_values_and_batch_conditions_on_real_cells(synthetic_corpus):
    """A Geneformer-shaped BERT fed scGPT bins + batch labels: value and condition inputs change the output,
    and a batch missing the value key fails with the groups to fix."""
    enc = BinEncoding(max_len=64).bind(synthetic_corpus)
    stream = CellStream(synthetic_corpus, enc, Batching(strategy="random", batch_size=8), val_fraction=0.0,
                        conditions=["batch"])
    batch = next(iter(stream))
    config = BertConfig(vocab_size=len(synthetic_corpus.vocab), hidden=32, layers=1, heads=2, ffn=64,
                        max_position=64, value_embedding="bins", conditions=["batch"],
                        n_labels={"batch": len(synthetic_corpus.labels["batch"])})
    torch.manual_seed(0)
    model = BertForMaskedGeneModeling(config).eval()
    out = model(batch)["hidden"]
    assert out.shape == (*batch["gene_ids"].shape, 32) and torch.isfinite(out).all()
    shifted = batch.clone()
    shifted["values_bin"] = torch.where(batch["values_bin"] > 0, batch["values_bin"] % 50 + 1, 0)
    assert not torch.allclose(model(shifted)["hidden"], out)
    other = batch.clone()
    other["batch"] = (batch["batch"] + 1) % len(synthetic_corpus.labels["batch"])
    assert not torch.allclose(model(other)["hidden"], out)
    with pytest.raises(ScfmInputError, match="encoding"):
        model({k: v for k, v in batch.items() if k != "values_bin"})
    assert np.isin(batch["values_bin"].numpy(), np.arange(51)).all()
