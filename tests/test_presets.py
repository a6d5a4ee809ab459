"""Every preset in experiments/ composes, validates and trains a few steps under scale=tiny; the scale spec; the
sanity preset's loss falls."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from scfm.cli import conf_dir
from scfm.config.scale import apply_scale, explicit_keys
from scfm.errors import ScfmInputError

ROOT = Path(conf_dir()).parent
PRESETS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))  # discovered: new presets are covered
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def compose_train(*overrides: str) -> DictConfig:
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def tiny(preset: str, out: Path, *extra: str) -> DictConfig:
    """``experiment=<preset> scale=tiny`` composed and scaled, with the test's own overrides kept explicit."""
    overrides = [f"experiment={preset}", "scale=tiny", f"paths.output_dir={out}", *QUIET, *extra]
    return apply_scale(compose_train(*overrides), overrides=overrides)


def require_classes(cfg: DictConfig) -> None:
    """Skip (not fail) while another engineer's objective / model class has not landed."""
    for group in ("objective", "model", "encoding"):
        target = cfg[group].get("_target_")
        try:
            get_class(target)
        except Exception as e:  # ImportError / AttributeError from hydra's locate
            pytest.skip(f"{group}._target_={target} does not exist yet ({type(e).__name__})")


def train_losses(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "metrics.csv")


# -- the scale spec --------------------------------------------------------------------------------------------


def test_experiments_are_discovered():
    assert {"demo", "geneformer_v1", "geneformer_v2_104m", "sanity"} <= set(PRESETS)
    for name in PRESETS:  # each preset is a global package, like demo.yaml
        assert (ROOT / "experiments" / f"{name}.yaml").read_text().startswith("# @package _global_"), name


def test_apply_scale_sets_only_the_fields_a_config_has(tmp_path):
    raw = compose_train("experiment=demo", "scale=tiny", f"paths.output_dir={tmp_path}")
    cfg = apply_scale(raw, overrides=[])
    assert (cfg.model.layers, cfg.model.hidden, cfg.model.heads, cfg.model.ffn) == (2, 64, 4, 128)
    assert cfg.encoding.max_len == 64 and cfg.batching.batch_size == 8 and cfg.trainer.max_steps == 6
    assert cfg.trainer.accelerator == "cpu" and cfg.objective.warmup_steps == 1
    for absent in ("decoder_layers", "decoder_hidden", "max_seq_len"):  # a BERT has none: not added
        assert absent not in cfg.model
    assert "max_genes" not in cfg.encoding and "builtin_params" not in cfg.data
    # the recipe is kept: encoding, architecture, objective, masks
    for group in ("encoding", "model", "objective", "batching"):
        assert cfg[group]._target_ == raw[group]._target_
    assert cfg.encoding.layout == raw.encoding.layout and cfg.objective.mask_prob == raw.objective.mask_prob
    assert cfg.model.max_position == raw.model.max_position  # left alone: >= the shrunk input
    assert cfg.scale.applied and not raw.scale.get("applied", False) and raw.model.hidden == 128  # input unchanged
    assert apply_scale(cfg, overrides=[]) is cfg  # applied once only


def test_apply_scale_reaches_every_architectures_fields():
    cfg = apply_scale(compose_train("model=xtrimo_tiny", "encoding=continuous", "objective=value_regression",
                                    "scale=tiny"), overrides=[])
    assert (cfg.model.decoder_layers, cfg.model.decoder_hidden, cfg.model.decoder_ffn) == (1, 32, 64)
    assert cfg.model.max_seq_len is None and "max_len" not in cfg.encoding  # continuous: a gene list, no max_len
    if "max_genes" in compose_train("encoding=continuous").encoding:  # the max_genes option (patch) is in
        assert cfg.encoding.max_genes == 126
    synthetic = apply_scale(compose_train("data=synthetic", "scale=tiny"), overrides=[])
    assert synthetic.data.builtin_params.n_cells == 1000 and synthetic.data.builtin_params.n_cell_types == 8


def test_explicit_overrides_win_over_the_scale():
    overrides = ["experiment=demo", "scale=tiny", "model.hidden=32", "+trainer.max_time=null", "++encoding.max_len=48"]
    assert explicit_keys(overrides) == {"model.hidden", "trainer.max_time", "encoding.max_len"}  # groups excluded
    cfg = apply_scale(compose_train(*overrides), overrides=overrides)
    assert cfg.model.hidden == 32 and cfg.encoding.max_len == 48 and cfg.model.layers == 2
    longer = apply_scale(compose_train("experiment=demo", "scale=tiny", "trainer.max_steps=9"), ["trainer.max_steps=9"])
    assert longer.trainer.max_steps == longer.trainer.limit_train_batches == longer.checkpoint_every_n_steps == 9
    # from the config's own hydra node when no list is given (what the scfm-train app has)
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        with_hydra = compose("train", overrides=overrides, return_hydra_config=True)
    assert apply_scale(with_hydra).model.hidden == 32


def test_replace_maps_cuda_only_choices_and_keeps_interpolations():
    cfg = apply_scale(compose_train("experiment=demo", "scale=tiny", "attention=flash", "precision=16-mixed"),
                      overrides=[])
    assert cfg.attention.kernel == "sdpa" and cfg.model.attention == "sdpa"
    assert OmegaConf.to_container(cfg.model)["attention"] == "${attention.kernel}"  # still follows the group
    assert cfg.precision.value == "32-true" and cfg.trainer.precision == "32-true"
    kept = apply_scale(compose_train("experiment=demo", "scale=tiny", "attention=flex"), overrides=[])
    assert kept.attention.kernel == "flex"


def test_scale_node_must_be_a_spec():
    cfg = compose_train("experiment=demo")
    assert apply_scale(cfg) is cfg  # no scale: nothing to do
    OmegaConf.set_struct(cfg, False)
    cfg.scale = "tiny"
    with pytest.raises(ScfmInputError, match="scale"):
        apply_scale(cfg)


def test_every_scale_file_composes_with_every_preset():
    for scale in sorted(p.stem for p in (ROOT / "conf" / "scale").glob("*.yaml")):
        for preset in PRESETS:
            cfg = apply_scale(compose_train(f"experiment={preset}", f"scale={scale}"), overrides=[])
            assert cfg.scale.name == scale and cfg.scale.applied


# -- presets ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_validates_at_full_size(preset, tmp_path):
    from scfm.config.validate import validate

    cfg = compose_train(f"experiment={preset}", f"paths.output_dir={tmp_path}")
    require_classes(cfg)
    validate(cfg)  # before any data is read


def test_geneformer_presets_carry_the_published_recipes():
    v1 = compose_train("experiment=geneformer_v1")
    assert (v1.model.layers, v1.model.hidden, v1.model.heads, v1.model.ffn) == (6, 256, 4, 512)
    assert v1.encoding.max_len == 2048 and v1.encoding.layout == "v1" and v1.batching.strategy == "length_grouped"
    assert (v1.objective.lr, v1.objective.scheduler, v1.objective.warmup_steps) == (1e-3, "linear", 10000)
    assert (v1.objective.weight_decay, v1.batching.batch_size, v1.objective.mask_prob) == (0.001, 12, 0.15)
    v2 = compose_train("experiment=geneformer_v2_104m")
    assert (v2.model.layers, v2.model.hidden, v2.model.heads, v2.model.ffn) == (12, 768, 12, 3072)
    assert v2.encoding.max_len == 4096 and v2.encoding.layout == "v2" and v2.model.max_position >= 4096


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_a_few_steps_at_scale_tiny(preset, tmp_path, cache_dir, pbmc_corpus):
    from scfm.cli.train import train
    from scfm.config.validate import validate

    cfg = tiny(preset, tmp_path)
    require_classes(cfg)
    if cfg.encoding._target_.endswith("ContinuousEncoding") and "max_genes" not in cfg.encoding:
        # without the encoding's max_genes option (patch pending): a gene list of the 126 most expressed genes
        stats = pbmc_corpus.gene_stats.set_index("token_id")["n_nonzero"]
        vocab = pbmc_corpus.vocab
        top = stats.reindex(vocab.gene_token_ids()).fillna(0).nlargest(126).index
        keys = [vocab.gene_ids[t - vocab.n_special] for t in top]
        (tmp_path / "genes.txt").write_text("\n".join(keys))
        cfg.encoding.gene_list = str(tmp_path / "genes.txt")
    validate(cfg)
    result = train(cfg)
    df = train_losses(tmp_path)
    loss = df["train/loss"].dropna()
    assert len(loss) == cfg.trainer.max_steps == 6
    assert np.isfinite(loss).all() and math.isfinite(result["metrics"]["val/loss"])
    assert result["metrics"]["train/loss"] > 0


# -- sanity ----------------------------------------------------------------------------------------------------


def test_sanity_preset_loss_clearly_falls(tmp_path, cache_dir, pbmc_corpus):
    """The model starts at the uniform guess, loss ~ ln(V), and must end > 1 nat below it: on average it gives the
    masked genes e ~ 2.7x the probability of a uniform guess (measured: 9.7 -> ~7.9 in 40 steps), and the last
    steps' mean is < 0.85x the first steps' (a flat or diverging loss fails both)."""
    from scfm.cli.train import train

    overrides = ["experiment=sanity", f"paths.output_dir={tmp_path}", *QUIET]
    cfg = compose_train(*overrides)
    train(cfg)
    loss = train_losses(tmp_path)["train/loss"].dropna().to_numpy()
    assert len(loss) == cfg.trainer.max_steps and np.isfinite(loss).all()
    uniform = math.log(len(pbmc_corpus.vocab))
    first, last = loss[:5].mean(), loss[-5:].mean()
    assert abs(first - uniform) < 0.5, (first, uniform)
    assert last < uniform - 1.0 and last < 0.85 * first, (first, last, uniform)
