"""Objectives and tasks train the backbone they are given: built once (``scfm.model.build_architecture``, its config
completed from the data facts), injected as ``backbone=``, rebuilt from the recorded architecture by
``load_from_checkpoint``; a backbone an objective cannot train is refused with the objective named."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from scfm.bundle import read_bundle
from scfm.cli import conf_dir
from scfm.cli.train import build, train
from scfm.data.datamodule import CellDataModule
from scfm.encodings.rank import RankEncoding
from scfm.errors import ScfmInputError
from scfm.model import build_architecture, complete_config
from scfm.objectives.base import data_facts
from scfm.objectives.generative import GenerativePretraining
from scfm.objectives.mlm import MaskedGeneModeling
from scfm.objectives.value_regression import ValueRegression

SHAPE = {"hidden": 16, "layers": 1, "heads": 2, "ffn": 32}
FAST = ["experiment=demo", "model.layers=1", "model.hidden=32", "model.ffn=64", "model.heads=2",
        "encoding.max_len=64", "batching.batch_size=8", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.limit_val_batches=0"]


def backbone(kind: str, facts: dict) -> torch.nn.Module:
    fields = {"vocab_size": facts["vocab_size"], "pad_id": facts["pad_id"], **SHAPE}
    if kind == "xtrimo":
        fields |= {"decoder_layers": 1, "decoder_hidden": 8, "decoder_heads": 2, "decoder_ffn": 16}
    return build_architecture(kind, fields, facts)


def test_config_completion_fills_in_the_data_facts_only_where_unset():
    facts = {"first_gene_id": 4, "cls_id": 2, "max_len": 130}
    assert complete_config("bert", {"vocab_size": 9}, facts) == {"vocab_size": 9, "first_gene_id": 4}
    assert complete_config("bert", {"first_gene_id": 3}, facts) == {"first_gene_id": 3}
    assert complete_config("scgpt", {}, facts) == {"cls_id": 2}
    assert complete_config("scgpt", {}, {"cls_id": -1}) == {}  # the vocabulary has no <cls>
    assert complete_config("xtrimo", {"max_seq_len": None}, facts) == {"max_seq_len": 130}
    with pytest.raises(ScfmInputError, match=r"cells have 130 tokens .* model.max_seq_len=100"):
        complete_config("xtrimo", {"max_seq_len": 100}, facts)


def test_an_objective_trains_the_injected_backbone_and_reloads_without_arguments(tmp_path, pbmc_corpus):
    torch.manual_seed(0)
    dm = CellDataModule(RankEncoding(max_len=32), {"strategy": "random", "batch_size": 8},
                        corpus=str(pbmc_corpus.path), progress=False)
    dm.open()
    facts = data_facts(dm.vocab, dm.corpus.labels, dm.encoding)
    net = backbone("bert", facts)
    assert net.config.first_gene_id == facts["first_gene_id"] == dm.vocab.n_special  # completed from the data
    start = {k: v.clone() for k, v in net.state_dict().items()}
    module = MaskedGeneModeling(net, facts, lr=1e-2, warmup_steps=0, scheduler="constant")
    assert module.model is net and module.config is net.config
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    moved = [k for k, p in net.named_parameters() if not torch.equal(p.detach(), start[k])]
    assert len(moved) > len(start) // 2  # the injected model itself was trained
    path = tmp_path / "mlm.ckpt"
    trainer.save_checkpoint(path)
    arch = torch.load(path, weights_only=True)["hyper_parameters"]["architecture"]
    assert arch["kind"] == "bert" and arch["config"]["first_gene_id"] == facts["first_gene_id"]
    loaded = MaskedGeneModeling.load_from_checkpoint(path)  # no backbone: rebuilt from the recorded architecture
    assert type(loaded.model) is type(net) and loaded.config == net.config and loaded.model is not net
    saved = module.state_dict()
    assert list(loaded.state_dict()) == list(saved)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("objective", "name", "wrong"), [(MaskedGeneModeling, "mlm", "scgpt"),
                                                          (GenerativePretraining, "generative", "bert"),
                                                          (ValueRegression, "value_regression", "scgpt")])
def test_a_backbone_the_objective_cannot_train_is_refused(objective, name, wrong, pbmc_corpus):
    facts = data_facts(pbmc_corpus.vocab, pbmc_corpus.labels)  # no encoding named: only the architecture is checked
    with pytest.raises(ScfmInputError, match=rf"objective={name} trains the .* not the injected {wrong} backbone"):
        objective(backbone(wrong, facts), facts)
    with pytest.raises(ScfmInputError, match=rf"objective={name} needs a backbone"):
        objective(data=facts)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*FAST, "trainer.max_steps=2", f"paths.output_dir={out}"])
    return Path(train(cfg)["bundle"])


@pytest.mark.parametrize("task", [None, "embed"])
def test_build_injects_the_bundles_backbone(bundle, tmp_path, task):
    """Continued pretraining (objective) and a task both get the bundle's weights, as one backbone built in build();
    the objective's in training mode (Lightning does not switch an eval-mode model back), the task's frozen."""
    overrides = [*FAST, f"pretrained={bundle}", f"paths.output_dir={tmp_path}", *([f"task={task}"] if task else [])]
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        _, module = build(compose("train", overrides=overrides))
    weights = read_bundle(bundle).backbone().state_dict()
    state = module.model.state_dict()
    assert list(state) == list(weights)
    for name, tensor in weights.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    assert module.hparams.architecture["kind"] == "bert"
    if task:
        assert module.hparams.pretrained == str(bundle)
        assert not any(p.requires_grad for p in module.model.parameters())  # task.freeze_layers=all
    else:
        assert module.model.training and all(p.requires_grad for p in module.model.parameters())
