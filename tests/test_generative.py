"""Generative pretraining (scGPT): known/unknown split, steps on real PBMC batches, the mean baseline, config
checks, and cell / gene-prompt generation."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from scfm.cli import conf_dir
from scfm.cli.generate import main as generate_main
from scfm.cli.train import train
from scfm.config.validate import validate
from scfm.data.datamodule import CellDataModule
from scfm.encodings.bin import BinEncoding
from scfm.errors import ScfmInputError
from scfm.model import build_architecture
from scfm.model.scgpt import ScGPTConfig, ScGPTModel
from scfm.objectives.base import data_facts
from scfm.objectives.generative import (
    GenerativePretraining,
    cell_index,
    generate_cells,
    generate_from_genes,
    random_known_mask,
    rank_within_cell,
    split_known,
)

STEPS = 30


@pytest.fixture(scope="module")
def pbmc_bin(pbmc_corpus):
    """(data facts, STEPS padded batches, 2 packed batches) of bin-encoded PBMC cells (<= 48 tokens)."""
    def datamodule(strategy: str) -> CellDataModule:
        dm = CellDataModule(BinEncoding(max_len=48), {"strategy": strategy, "batch_size": 16},
                            corpus=str(pbmc_corpus.path), progress=False)
        dm.setup("fit")
        return dm

    dm = datamodule("random")
    facts = data_facts(dm.vocab, dm.corpus.labels, dm.encoding)
    padded = [b for _, b in zip(range(STEPS), dm.train_dataloader())]
    packed = [b for _, b in zip(range(2), datamodule("packed").train_dataloader())]
    return facts, padded, packed


def module(facts: dict, **kw) -> GenerativePretraining:
    torch.manual_seed(0)
    arch = dataclasses.asdict(ScGPTConfig(vocab_size=facts["vocab_size"], pad_id=facts["pad_id"], layers=2,
                                          hidden=32, heads=4, ffn=64, dropout=0.0, value_source="values"))
    hp = dict(lr=3e-3, warmup_steps=0, scheduler="constant", total_steps=STEPS)
    hp.update(kw)
    m = GenerativePretraining(build_architecture("scgpt", arch, facts), facts, **hp)
    m.logged = []
    m.log_metrics = lambda stage, metrics, bs, prog_bar=(): m.logged.append(  # capture instead of self.log
        {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in metrics.items()})
    return m


# ---------------------------------------------------------------- the known / unknown split


def test_split_hides_floor_fraction_of_each_cells_genes(pbmc_bin):
    _, padded, packed = pbmc_bin
    for batch in (padded[0], packed[0]):
        real = ScGPTModel.real_tokens(batch)
        genes = real & (batch["gene_ids"] != 2)
        cell, n = cell_index(batch)
        fractions = torch.linspace(0.1, 0.9, n, dtype=torch.float64)
        known = split_known(genes, cell, n, fractions, torch.Generator().manual_seed(0))
        unknown = genes & ~known
        assert known[~genes].all()  # <cls> and padding are always known
        n_genes = torch.bincount(cell[genes], minlength=n + 1)[:n]
        n_unknown = torch.bincount(cell[unknown], minlength=n + 1)[:n]
        assert n_unknown.tolist() == [math.floor(g * f) for g, f in zip(n_genes.tolist(), fractions.tolist())]
        again = split_known(genes, cell, n, fractions, torch.Generator().manual_seed(0))
        other = split_known(genes, cell, n, fractions, torch.Generator().manual_seed(1))
        assert torch.equal(known, again) and not torch.equal(known, other)


def test_rank_within_cell_matches_a_sort_per_cell():
    g = torch.Generator().manual_seed(0)
    score = torch.randn(3, 7, generator=g)
    cell = torch.tensor([[0] * 7, [1] * 7, [2] * 5 + [3] * 2])  # cell 3 = outside any cell
    eligible = torch.rand(3, 7, generator=g) < 0.7
    rank = rank_within_cell(score, cell, eligible, 3)
    for c in range(3):
        sel = (cell == c) & eligible
        expected = torch.argsort(torch.argsort(-score[sel]))
        assert torch.equal(rank[sel], expected)
    assert (rank[~eligible] >= 21).all()


# ---------------------------------------------------------------- training


def test_steps_on_pbmc_learn_and_track_the_mean_baseline(pbmc_bin):
    facts, padded, _ = pbmc_bin
    m = module(facts)
    opt = m.configure_optimizers()["optimizer"]
    for i, batch in enumerate(padded):
        loss = m.step(batch, i, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
    logs = m.logged
    assert {"loss", "gep_mse", "gepc_mse", "mean_mse", "unknown_fraction"} <= set(logs[0])
    first = sum(r["gep_mse"] for r in logs[:5]) / 5
    last = sum(r["gep_mse"] for r in logs[-5:]) / 5
    loss_first = sum(r["loss"] for r in logs[:5]) / 5
    loss_last = sum(r["loss"] for r in logs[-5:]) / 5
    mean_last = sum(r["mean_mse"] for r in logs[-5:]) / 5
    assert last < 0.5 * first and loss_last < 0.5 * loss_first, (first, last, loss_first, loss_last)
    assert last < 4 * mean_last  # within reach of the per-gene mean baseline after 30 tiny steps
    # the running means are the plain means of every gene value seen in training
    ids = torch.cat([b["gene_ids"][ScGPTModel.real_tokens(b) & (b["gene_ids"] >= 4)] for b in padded])
    vals = torch.cat([b["values"][ScGPTModel.real_tokens(b) & (b["gene_ids"] >= 4)] for b in padded])
    gene = int(torch.mode(ids).values)
    assert int(m.gene_value_count[gene]) == int((ids == gene).sum())
    torch.testing.assert_close(m.gene_value_mean[gene], vals[ids == gene].mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.global_value_mean, vals.mean(), atol=1e-5, rtol=1e-5)


def test_packed_step_and_options(pbmc_bin):
    facts, _, packed = pbmc_bin
    m = module(facts, cls_feedback_after=0, fraction_per="cell")
    loss = m.step(packed[0], 0, "train")
    loss.backward()
    assert torch.isfinite(loss) and "feedback_mse" in m.logged[-1]
    val = m.step(packed[1], 0, "val")
    assert torch.isfinite(val) and "feedback_mse" not in m.logged[-1]
    with pytest.raises(ScfmInputError, match="unknown_fractions"):
        module(facts, unknown_fractions=[0.0, 0.5])


# ---------------------------------------------------------------- config checks


def compose_train(*overrides: str):
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("train", overrides=["experiment=scgpt_human", "paths.output_dir=/tmp/x", *overrides])


def test_preset_composes_with_the_paper_values():
    cfg = compose_train()
    validate(cfg)
    assert (cfg.model.layers, cfg.model.hidden, cfg.model.heads, cfg.model.ffn) == (12, 512, 8, 512)
    assert cfg.encoding.max_len == 1200 and cfg.encoding.n_bins == 51 and cfg.objective.lr == 1e-4
    assert list(cfg.objective.unknown_fractions) == [0.25, 0.5, 0.75]
    tiny = compose_train("model=scgpt_tiny")
    assert (tiny.model.layers, tiny.model.hidden, tiny.model.heads) == (2, 64, 4) and tiny.model.mvc


@pytest.mark.parametrize(("overrides", "match"), [
    (["encoding=rank"], r"(?s)objective \+ encoding.*encoding=bin"),
    (["attention=performer"], r"(?s)attention \+ objective.*sdpa"),
    (["model=bert_tiny"], r"(?s)objective \+ model.*scgpt"),
])
def test_check_config_names_the_groups(overrides, match):
    with pytest.raises(ScfmInputError, match=match):
        validate(compose_train(*overrides))


def test_scfm_train_runs_the_preset(tmp_path: Path, cache_dir):
    cfg = compose_train("model=scgpt_tiny", "trainer.max_steps=2", "trainer.limit_val_batches=1",
                        "encoding.max_len=64", "batching.batch_size=8", "trainer.enable_progress_bar=false",
                        "trainer.enable_model_summary=false", f"paths.output_dir={tmp_path}")
    result = train(cfg)
    assert Path(result["checkpoint"]).is_file() and math.isfinite(result["metrics"]["train/loss"])
    loaded = GenerativePretraining.load_from_checkpoint(result["checkpoint"], map_location="cpu")
    assert loaded.config.cls_id == 2 and loaded.config.hidden == 64
    # scfm-generate on the checkpoint: gene prompts, 2 rounds, 8 cells
    out = tmp_path / "generated.npz"
    rc = generate_main([result["checkpoint"], "--out", str(out), "--mode", "gene", "--rounds", "2", "--n-cells", "8",
                        "--batch-size", "8", "--max-len", "32"])
    arrays = np.load(out)
    assert rc == 0 and arrays["generated"].shape == arrays["gene_ids"].shape == (8, int(arrays["lengths"].max()))
    generated = arrays["round"] >= 0
    assert generated.any() and (arrays["prompt"] & generated).sum() == 0
    assert np.array_equal(arrays["generated"][arrays["prompt"]], arrays["true"][arrays["prompt"]])
    # ... and on the run's bundle, with no corpus named: the same cells, the same generation
    out2 = tmp_path / "from_bundle.npz"
    rc = generate_main([result["bundle"], "--out", str(out2), "--mode", "gene", "--rounds", "2", "--n-cells", "8",
                        "--batch-size", "8", "--max-len", "32"])
    again = np.load(out2)
    assert rc == 0 and all(np.array_equal(again[k], arrays[k]) for k in ("gene_ids", "true", "generated", "prompt"))


def test_scfm_generate_names_a_corpus_of_another_vocabulary(tmp_path: Path, cache_dir, capsys):
    cfg = compose_train("model=scgpt_tiny", "trainer.max_steps=1", "trainer.limit_val_batches=0",
                        "encoding.max_len=32", "batching.batch_size=4", "trainer.enable_progress_bar=false",
                        "trainer.enable_model_summary=false", f"paths.output_dir={tmp_path}")
    bundle = train(cfg)["bundle"]
    rc = generate_main([bundle, "--out", str(tmp_path / "x.npz"), "--builtin", "synthetic", "--n-cells", "2"])
    assert rc == 2 and "vocab=<bundle>/vocab.tsv" in capsys.readouterr().err
    rc = generate_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.npz")])
    assert rc == 2 and "no bundle or checkpoint here" in capsys.readouterr().err


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("rounds", [1, 3])
def test_cell_prompt_generation_fixes_every_gene_in_rounds(pbmc_bin, rounds):
    facts, padded, packed = pbmc_bin
    m = module(facts)
    for batch in (padded[0], packed[0]):
        out = m.generate_cells(batch, rounds=rounds)
        real = ScGPTModel.real_tokens(batch)
        genes = real & (batch["gene_ids"] != 2)
        assert out["values"].shape == batch["gene_ids"].shape and out["known"][real].all()
        assert (out["round"][genes] >= 0).all() and (out["round"][~genes] == -1).all()
        cell, n = cell_index(batch)
        for c in range(n):
            per_round = torch.bincount(out["round"][genes & (cell == c)], minlength=rounds)
            size = int((genes & (cell == c)).sum())
            assert per_round.tolist()[0] == math.ceil(size / rounds)  # the 1/K most confident first
        assert m.training  # generation restores the training mode


def test_gene_prompt_keeps_the_prompt_and_is_deterministic(pbmc_bin):
    facts, padded, _ = pbmc_bin
    m = module(facts)
    batch = padded[1]
    prompt = random_known_mask(batch, 0.5, seed=3, cls_id=2)
    out = generate_from_genes(m, batch, prompt, rounds=2)
    assert torch.equal(out["values"][prompt], batch["values"][prompt].float())
    assert (out["round"][prompt] == -1).all()
    unknown = ScGPTModel.real_tokens(batch) & ~prompt & (batch["gene_ids"] != 2)
    assert (out["round"][unknown] >= 0).all()
    again = m.generate_from_genes(batch, prompt, rounds=2)
    assert torch.equal(out["values"], again["values"])
    # the generated values do not depend on the true values of the genes being generated
    hidden = dict(batch.items(), values=torch.where(unknown, 7.0, batch["values"]))
    torch.testing.assert_close(generate_from_genes(m, hidden, prompt, rounds=2)["values"][unknown],
                               out["values"][unknown])
    assert torch.equal(generate_cells(m.model, batch)["round"], m.generate_cells(batch)["round"])
