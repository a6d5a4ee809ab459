"""objective=value_regression: trains on real PBMC continuous batches below the per-gene-mean baseline; config checks;
the scFoundation preset runs end to end."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from scfm.cli import conf_dir
from scfm.cli.train import train
from scfm.config.validate import validate
from scfm.data.batching import Batching
from scfm.data.stream import CellStream
from scfm.encodings.continuous import ContinuousEncoding
from scfm.errors import ScfmInputError
from scfm.model import build_architecture
from scfm.model.xtrimo import XtrimoConfig
from scfm.objectives.base import data_facts
from scfm.objectives.value_regression import ValueRegression

N_GENES = 128


@pytest.fixture(scope="module")
def gene_list(pbmc_corpus, tmp_path_factory) -> str:
    """The PBMC corpus's most expressed genes (by mean normalised expression), one Ensembl id a line."""
    stats = pbmc_corpus.gene_stats
    genes = stats[stats.token_id >= pbmc_corpus.vocab.n_special].sort_values("mean", ascending=False).gene_id
    path = tmp_path_factory.mktemp("genes") / "top_genes.txt"
    path.write_text("\n".join(genes[:N_GENES]) + "\n")
    return str(path)


def tiny_module(pbmc_corpus, enc: ContinuousEncoding, lr: float = 3e-2) -> ValueRegression:
    cfg = XtrimoConfig(vocab_size=len(pbmc_corpus.vocab), layers=2, hidden=64, heads=4, ffn=128, dropout=0.0,
                       decoder_layers=1, decoder_hidden=32, decoder_heads=4, decoder_ffn=64, max_seq_len=None)
    facts = data_facts(pbmc_corpus.vocab, pbmc_corpus.labels, enc)
    return ValueRegression(build_architecture("xtrimo", dataclasses.asdict(cfg), facts), facts, lr=lr,
                           warmup_steps=0, scheduler="constant")


def recorder(module: ValueRegression) -> dict[str, list[float]]:
    """Capture logged metrics without a Trainer."""
    seen: dict[str, list[float]] = {}

    def log_metrics(stage, metrics, batch_size, prog_bar=("loss",)):
        for name, value in metrics.items():
            seen.setdefault(f"{stage}/{name}", []).append(float(torch.as_tensor(value).detach()))

    module.log_metrics = log_metrics
    return seen


def test_trains_below_the_per_gene_mean_baseline(pbmc_corpus, gene_list):
    torch.manual_seed(0)
    enc = ContinuousEncoding(gene_list=gene_list).bind(pbmc_corpus)
    module = tiny_module(pbmc_corpus, enc)
    assert module.config.max_seq_len == N_GENES + 2  # sized from the encoding
    seen = recorder(module)
    opt = torch.optim.AdamW(module.parameters(), lr=module.hparams.lr)
    train_cells = CellStream(pbmc_corpus, enc, Batching(strategy="random", batch_size=16), split="train")
    batches = list(itertools.islice(train_cells, 50))
    module.train()
    for i, batch in enumerate(batches):
        loss = module.step(batch, i, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses = seen["train/loss"]
    assert sum(losses[-10:]) / 10 < 0.15 * losses[0]
    # the running sums are exactly the per-gene sums over the batches seen
    cols = batches[0]["positions"][0, :N_GENES]
    total = sum(b["target_values"][:, :N_GENES].double().sum(0) for b in batches)
    torch.testing.assert_close(module.gene_sum[cols], total)
    assert (module.gene_count[cols] == sum(len(b["lengths"]) for b in batches)).all()
    masked = sum(b["value_mask"][:, :N_GENES].sum(0) for b in batches)
    torch.testing.assert_close(module.masked_count[cols], masked.double())
    # held-out cells: the model beats predicting each gene's mean expression
    module.eval()
    val = CellStream(pbmc_corpus, enc, Batching(strategy="random", batch_size=64), split="val")
    with torch.no_grad():
        for i, batch in enumerate(itertools.islice(val, 3)):
            module.step(batch, i, "val")
    mse, baseline = sum(seen["val/masked_mse"]), sum(seen["val/mean_mse"])
    assert mse < baseline, (seen["val/masked_mse"], seen["val/mean_mse"], seen["val/masked_mean_mse"])
    assert {"val/masked_mse_nonzero", "val/masked_mse_zero", "val/masked_mean_mse"} <= set(seen)


def test_refuses_other_encodings(pbmc_corpus):
    from scfm.encodings.rank import RankEncoding

    cfg = XtrimoConfig(vocab_size=len(pbmc_corpus.vocab), layers=1, hidden=16, heads=2, ffn=16, decoder_layers=1,
                       decoder_hidden=16, decoder_heads=2, decoder_ffn=16, max_seq_len=None)
    facts = data_facts(pbmc_corpus.vocab, pbmc_corpus.labels, RankEncoding())
    with pytest.raises(ScfmInputError, match="encoding=continuous"):
        ValueRegression(build_architecture("xtrimo", dataclasses.asdict(cfg), {"max_len": 50}), facts)
    facts = {**data_facts(pbmc_corpus.vocab), "encoding": "continuous", "max_len": 50}
    short = build_architecture("xtrimo", {**dataclasses.asdict(cfg), "max_seq_len": 40})
    with pytest.raises(ScfmInputError, match="max_seq_len"):  # the injected backbone is checked against the data
        ValueRegression(short, facts)
    with pytest.raises(ScfmInputError, match="max_seq_len"):  # and so is a config completed from it
        build_architecture("xtrimo", {**dataclasses.asdict(cfg), "max_seq_len": 40}, facts)
    with pytest.raises(ScfmInputError, match="does not say the cells' length"):
        build_architecture("xtrimo", dataclasses.asdict(cfg), {})


def compose_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize(("overrides", "match"), [
    (["encoding=rank"], r"objective \+ encoding[\s\S]*encoding=continuous"),
    (["model=bert_tiny"], r"objective \+ model[\s\S]*model=xtrimo"),
    (["batching=packed"], r"model \+ batching[\s\S]*batching=random"),
])
def test_check_config_names_the_groups(tmp_path, overrides, match):
    cfg = compose_cfg(tmp_path, "experiment=scfoundation_100m", *overrides)
    with pytest.raises(ScfmInputError, match=match):
        validate(cfg)


def test_preset_is_the_paper_recipe(tmp_path):
    cfg = compose_cfg(tmp_path, "experiment=scfoundation_100m")
    validate(cfg)  # also: any encoder kernel is accepted
    assert cfg.encoding.mask_nonzero == 0.3 and cfg.model.value_embedding == "autodiscretize"
    assert (cfg.model.layers, cfg.model.hidden, cfg.model.heads) == (12, 768, 12)
    assert (cfg.model.decoder_layers, cfg.model.decoder_hidden, cfg.model.decoder_heads) == (6, 512, 8)
    assert cfg.model.decoder_attention == "favor" and cfg.model.max_seq_len == 19266
    validate(compose_cfg(tmp_path, "experiment=scfoundation_100m", "attention=performer"))


def test_preset_trains_end_to_end(tmp_path, cache_dir, gene_list):
    cfg = compose_cfg(tmp_path, "experiment=scfoundation_100m", "model=xtrimo_tiny", f"encoding.gene_list={gene_list}",
                      "trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                      "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
                      "trainer.val_check_interval=2")
    result = train(cfg)
    assert Path(result["checkpoint"]).is_file()
    assert "train/loss" in result["metrics"] and "val/mean_mse" in result["metrics"]
