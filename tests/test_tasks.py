"""Downstream tasks through the seam: a backbone from a bundle (or from scratch), frozen layers, task=embed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from scfm.bundle import load_pretrained
from scfm.cli import conf_dir
from scfm.cli.train import train
from scfm.config.validate import validate
from scfm.errors import ScfmInputError
from scfm.model import build_architecture, encoder_layers
from scfm.tasks.base import freeze

FAST = ["experiment=demo", "model.layers=2", "model.hidden=32", "model.ffn=64", "model.heads=2",
        "encoding.max_len=64", "batching.batch_size=8", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.limit_val_batches=2"]


def compose_train(out: Path, *overrides: str):
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    return Path(train(compose_train(out, *FAST, "trainer.max_steps=5"))["bundle"])


def embed_cfg(out: Path, *overrides: str):
    return compose_train(out, "task=embed", "data=pbmc3k", "batching=random", "batching.batch_size=64",
                         "trainer=cpu", "trainer.enable_progress_bar=false", *overrides)


def test_embed_writes_every_cell_in_corpus_order(bundle, tmp_path, pbmc_corpus):
    result = train(embed_cfg(tmp_path, f"pretrained={bundle}"))
    emb = np.load(tmp_path / "embeddings.npy")
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    assert emb.shape == (pbmc_corpus.n_cells, 32) and np.isfinite(emb).all()
    assert result["summary"]["cells"] == pbmc_corpus.n_cells and result["summary"]["dim"] == 32
    obs = pd.concat([pbmc_corpus.obs(i) for i in range(pbmc_corpus.n_shards)], ignore_index=True)
    assert list(cells.cell_id) == list(obs.cell_id) and "cell_type" in cells
    # the same numbers as the backbone of the bundle run by hand on the first cells
    from scfm.data.datamodule import CellDataModule

    model, encoding, vocab = load_pretrained(bundle)
    dm = CellDataModule(encoding, {"strategy": "random", "batch_size": 16}, corpus=str(pbmc_corpus.path),
                        progress=False, vocab=vocab)
    batch = next(iter(dm.predict_dataloader()))
    with torch.no_grad():
        direct = model.cell_embedding(batch, model.encode(batch)).numpy()
    np.testing.assert_allclose(emb[batch["cell_index"].numpy()], direct, rtol=1e-5, atol=1e-6)
    assert np.abs(emb[:5] - emb[5:10]).max() > 1e-3  # cells differ


def test_embed_with_loader_workers(bundle, tmp_path, cache_dir, pbmc_corpus):
    """Workers hand batches over in shared memory, in buffers the main process frees by clearing a flag; predict runs
    in inference mode, where those flags became inference tensors that could not be cleared (the buffers leaked)."""
    from scfm.data.datamodule import CellDataModule

    _, encoding, vocab = load_pretrained(bundle)
    dm = CellDataModule(encoding, {"strategy": "random", "batch_size": 64}, corpus=str(pbmc_corpus.path),
                        progress=False, vocab=vocab, num_workers=1)
    loader = dm.predict_dataloader()
    with torch.inference_mode():
        n = sum(int(b["lengths"].numel()) for b in loader)
    assert n == pbmc_corpus.n_cells and not loader.dataset.in_use.is_inference()
    train(embed_cfg(tmp_path / "w", f"pretrained={bundle}", "data.num_workers=2"))
    train(embed_cfg(tmp_path / "s", f"pretrained={bundle}"))
    workers, single = (np.load(tmp_path / name / "embeddings.npy") for name in ("w", "s"))
    np.testing.assert_array_equal(workers, single)


def test_embed_from_scratch_is_the_architecture_alone(tmp_path, cache_dir):
    train(embed_cfg(tmp_path, "model=bert_tiny", "encoding.max_len=64"))
    emb = np.load(tmp_path / "embeddings.npy")
    assert emb.shape[1] == 128 and np.isfinite(emb).all()


def test_a_corpus_with_another_vocabulary_is_refused(bundle, tmp_path, cache_dir):
    cfg = embed_cfg(tmp_path, f"pretrained={bundle}", "data=synthetic", "data.builtin_params.n_cells=200",
                    "data.builtin_params.n_genes=100")
    with pytest.raises(ScfmInputError, match=r"(?s)not the model's.*vocab=<bundle>/vocab.tsv"):
        train(cfg)


def test_a_missing_bundle_fails_validation(tmp_path):
    with pytest.raises(ScfmInputError, match="no model bundle here"):
        validate(embed_cfg(tmp_path, f"pretrained={tmp_path / 'nothing'}"))


def test_freeze_layers_counts_from_the_embeddings_up():
    model = build_architecture("bert", {"vocab_size": 50, "hidden": 16, "layers": 3, "heads": 2, "ffn": 32})
    assert freeze(model, 0) == 0 and all(p.requires_grad for p in model.parameters())
    freeze(model, 2)
    layers = encoder_layers(model)
    assert not any(p.requires_grad for layer in layers[:2] for p in layer.parameters())
    assert all(p.requires_grad for p in layers[2].parameters())
    assert not model.embeddings.word_embeddings.weight.requires_grad
    total = sum(p.numel() for p in model.parameters())
    assert freeze(model, "all") == total
    with pytest.raises(ScfmInputError, match=r"freeze_layers must be 0\.\.3 or 'all'"):
        freeze(model, 4)


@pytest.mark.parametrize(("kind", "path"), [("bert", "encoder.layer"), ("scgpt", "transformer_encoder.layers"),
                                             ("xtrimo", "encoder.layers")])
def test_every_architecture_exposes_its_layers(kind, path):
    fields = {"vocab_size": 50, "hidden": 16, "layers": 2, "heads": 2, "ffn": 32}
    if kind == "xtrimo":
        fields |= {"decoder_layers": 1, "decoder_hidden": 8, "decoder_heads": 2, "decoder_ffn": 16, "max_seq_len": 40}
    model = build_architecture(kind, fields)
    assert len(encoder_layers(model)) == 2


def test_a_bundle_with_conditions_needs_the_same_conditions_and_labels(tmp_path, cache_dir):
    """A model with a batch embedding reads only data whose batch labels are its own (or it indexes out of range)."""
    pre = train(compose_train(tmp_path / "pre", *FAST, "data=synthetic", "data.builtin_params.n_cells=300",
                              "data.builtin_params.n_genes=120", "data.conditions=[batch]", "trainer.max_steps=2"))
    model = pre["bundle"]
    with pytest.raises(ScfmInputError, match=r"(?s)pretrained with data.conditions=\['batch'\].*conditions=\[batch\]"):
        validate(embed_cfg(tmp_path / "a", f"pretrained={model}", "data=synthetic",
                           "data.builtin_params.n_cells=300", "data.builtin_params.n_genes=120"))
    other = embed_cfg(tmp_path / "b", f"pretrained={model}", "data=synthetic", "data.builtin_params.n_cells=300",
                      "data.builtin_params.n_genes=120", "data.builtin_params.n_batches=6", "data.conditions=[batch]")
    with pytest.raises(ScfmInputError, match=r"(?s)the model embeds batch labels.*labels.json"):
        train(other)
    same = embed_cfg(tmp_path / "c", f"pretrained={model}", "data=synthetic", "data.builtin_params.n_cells=300",
                     "data.builtin_params.n_genes=120", "data.conditions=[batch]")
    assert train(same)["summary"]["cells"] == 300
