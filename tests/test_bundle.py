"""Model bundles: written at the end of scfm-train, read with no corpus, refused when damaged."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from scfm.bundle import load_pretrained, read_bundle, write_bundle
from scfm.cli import conf_dir
from scfm.cli.train import train
from scfm.config.scale import apply_scale
from scfm.data.datamodule import CellDataModule
from scfm.errors import ScfmInputError

FAST = ["experiment=demo", "model.layers=1", "model.hidden=32", "model.ffn=64", "model.heads=2",
        "encoding.max_len=64", "batching.batch_size=8", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.limit_val_batches=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir) -> dict:
    """A 7-step demo run whose periodic checkpoint is at step 4: last.ckpt must still be the final state."""
    out = tmp_path_factory.mktemp("run")
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*FAST, f"paths.output_dir={out}", "trainer.max_steps=7",
                                          "checkpoint_every_n_steps=4"])
    return train(cfg)


def first_batch(encoding, corpus_path: str, n: int = 6):
    dm = CellDataModule(encoding, {"strategy": "random", "batch_size": n}, corpus=corpus_path, progress=False)
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


def test_train_writes_a_bundle_equal_to_its_last_checkpoint(run, pbmc_corpus):
    bundle = Path(run["bundle"])
    names = {p.name for p in bundle.iterdir()}
    assert {"config.yaml", "vocab.tsv", "gene_medians.tsv", "weights.safetensors", "labels.json"} <= names
    config = yaml.safe_load((bundle / "config.yaml").read_text())
    assert config["architecture"]["kind"] == "bert" and config["encoding"]["max_len"] == 64
    assert config["source"]["global_step"] == 7 and config["data"]["mask_id"] == pbmc_corpus.vocab.special_id("<mask>")
    ckpt = torch.load(run["checkpoint"], weights_only=True)
    assert ckpt["global_step"] == 7  # the final state, not the step-4 periodic checkpoint

    model_b, enc_b, vocab_b = load_pretrained(bundle)
    model_c, enc_c, vocab_c = load_pretrained(run["checkpoint"])
    assert vocab_b.gene_ids == vocab_c.gene_ids == pbmc_corpus.vocab.gene_ids
    np.testing.assert_array_equal(enc_b.median, enc_c.median)
    batch = first_batch(enc_b, str(pbmc_corpus.path))
    with torch.no_grad():
        hb, hc = model_b.encode(batch), model_c.encode(batch)
    assert torch.equal(hb, hc) and not model_b.training
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    for name, tensor in model_b.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_bundle_encoding_encodes_new_cells_as_training_did(run, pbmc_corpus):
    """The bundle's encoding, bound without the corpus, gives the training encoding's tokens."""
    from scfm.encodings.rank import RankEncoding

    _, enc, _ = load_pretrained(run["bundle"])
    trained = RankEncoding(max_len=64).bind(pbmc_corpus)
    shard = pbmc_corpus.shard(0)
    cells = slice(0, 50)
    end = int(shard.offsets[cells.stop])
    args = (np.array(shard.gene_ids[:end]), np.array(shard.counts[:end]), np.array(shard.offsets[:51]),
            np.array(shard.total_counts[:50]))
    a, b = enc.encode(*args), trained.encode(*args)
    np.testing.assert_array_equal(a["gene_ids"], b["gene_ids"])
    np.testing.assert_array_equal(a["offsets"], b["offsets"])
    np.testing.assert_array_equal(enc.lengths(shard), trained.lengths(shard))


@pytest.mark.parametrize("preset", ["scgpt_human", "scfoundation_100m"])
def test_bundles_of_the_value_architectures_round_trip(tmp_path, pbmc_corpus, preset):
    """scgpt (bin) and xtrimo (continuous) bundles rebuild the same model and encoding."""
    from scfm.cli.train import build

    overrides = [f"experiment={preset}", "scale=tiny", f"paths.output_dir={tmp_path}"]
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = apply_scale(compose("train", overrides=overrides), overrides)
    dm, module = build(cfg)
    folder = write_bundle(tmp_path / "model", module.model, dm.encoding, dm.vocab, dict(module.hparams.data),
                          {"kind": "test"}, dm.corpus.labels)
    model, enc, vocab = load_pretrained(folder)
    assert dataclasses.asdict(model.config) == dataclasses.asdict(module.model.config)
    assert len(vocab) == len(dm.vocab)
    for key, value in dm.encoding.bound_arrays().items():
        np.testing.assert_array_equal(enc.bound_arrays()[key], value)
    batch = first_batch(enc, str(pbmc_corpus.path), n=4)
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["pred"], module.model(batch)["pred"], rtol=0, atol=0)


@pytest.fixture
def bundle_copy(run, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(run["bundle"], tmp_path / "model"))


def test_damaged_bundles_are_refused_with_the_file_named(bundle_copy, tmp_path):
    weights = bundle_copy / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ScfmInputError, match=r"weights\.safetensors is truncated"):
        read_bundle(bundle_copy)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ScfmInputError, match="corrupted"):
        read_bundle(bundle_copy)
    weights.unlink()
    with pytest.raises(ScfmInputError, match=r"weights\.safetensors is missing"):
        load_pretrained(bundle_copy)
    with pytest.raises(ScfmInputError, match="not a folder"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(ScfmInputError, match=r"config\.yaml is missing"):
        load_pretrained(tmp_path)


def test_a_newer_format_version_is_refused(bundle_copy):
    cfg_path = bundle_copy / "config.yaml"
    config = yaml.safe_load(cfg_path.read_text())
    cfg_path.write_text(yaml.safe_dump({**config, "version": 99}))
    with pytest.raises(ScfmInputError, match=r"(?s)version 99 is newer.*upgrade scfm"):
        read_bundle(bundle_copy)


def test_a_checkpoint_without_vocabulary_is_refused(run, tmp_path):
    ckpt = torch.load(run["checkpoint"], weights_only=True)
    del ckpt["scfm_bundle"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(ScfmInputError, match="carries no vocabulary"):
        load_pretrained(tmp_path / "old.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ScfmInputError, match="cannot read the checkpoint"):
        load_pretrained(tmp_path / "junk.ckpt")


def test_labels_travel_with_the_bundle(run, pbmc_corpus):
    labels = json.loads((Path(run["bundle"]) / "labels.json").read_text())
    assert labels == pbmc_corpus.labels and read_bundle(run["bundle"]).labels == labels


def test_an_incomplete_config_is_refused(bundle_copy):
    cfg_path = bundle_copy / "config.yaml"
    config = yaml.safe_load(cfg_path.read_text())
    del config["files"]["gene_medians.tsv"]["bytes"]
    cfg_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ScfmInputError, match=r"incomplete: no size / sha256 for gene_medians\.tsv"):
        read_bundle(bundle_copy)
    cfg_path.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "encoding"}))
    with pytest.raises(ScfmInputError, match="no encoding section"):
        read_bundle(bundle_copy)
    cfg_path.write_text(yaml.safe_dump({**config, "version": 0}))
    with pytest.raises(ScfmInputError, match="no valid format version"):
        read_bundle(bundle_copy)
