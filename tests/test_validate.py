"""scfm-train's config validation: every rule fails before any data is read, naming the groups in conflict and a
valid alternative; strategy and precision groups compose (the CUDA-only ones validate to a clear error on the CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from scfm.cli import conf_dir
from scfm.cli.train import build_strategy
from scfm.config.validate import validate
from scfm.errors import ScfmInputError

STRATEGIES = sorted(p.stem for p in (Path(conf_dir()) / "strategy").glob("*.yaml"))
CUDA_ONLY = ["fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload"]
GENERATIVE = "objective._target_=scfm.objectives.generative.GenerativePretraining"
VALUE_REGRESSION = "objective._target_=scfm.objectives.value_regression.ValueRegression"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's errors")


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    """A corpus cache that must stay empty: validation reads no data (built-in corpora are prepared there)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SCFM_CACHE", str(cache))
    yield cache
    assert not any(cache.iterdir()), "validation read or prepared data"


def config(*overrides: str) -> DictConfig:
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp/unused", *overrides])


def fails(cfg: DictConfig, *patterns: str) -> str:
    """Validation fails with a message matching every pattern; returns the message."""
    with pytest.raises(ScfmInputError) as info:
        validate(cfg)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in: {message}"
    assert "Fix:" in message
    return message


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend a CUDA GPU is visible (with bf16 unless told otherwise), to check the rules that need one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    return monkeypatch


def test_defaults_and_demo_validate():
    validate(config())
    validate(config("experiment=demo"))


# ------------------------------------------------------------------------------------------ strategy groups
def test_the_strategy_and_precision_groups_exist():
    assert set(STRATEGIES) == {"single", "ddp", *CUDA_ONLY}
    assert {p.stem for p in (Path(conf_dir()) / "precision").glob("*.yaml")} == {"32-true", "bf16-mixed", "16-mixed"}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_composes_and_builds_its_lightning_strategy(strategy):
    cfg = config(f"strategy={strategy}")
    assert cfg.strategy.name == strategy
    if strategy in ("single", "ddp"):
        validate(cfg)
    if strategy.startswith("deepspeed"):
        assert cfg.strategy.lightning.stage == int(strategy.split("_")[2])
        assert cfg.strategy.lightning.offload_optimizer == strategy.endswith("offload")
        # Lightning would read DeepSpeed's micro-batch from the DataLoader's batch_sampler: ours has none (it crashed)
        seven = config(f"strategy={strategy}", "batching.batch_size=7")
        assert seven.strategy.lightning.logging_batch_size_per_gpu == 7
        if _missing("deepspeed"):
            return  # Lightning's DeepSpeedStrategy refuses to exist without deepspeed: validation says so first
    built = build_strategy(cfg)
    if strategy == "single":
        assert built == "auto"
    else:
        assert type(built).__name__ == {"ddp": "DDPStrategy", "fsdp": "FSDPStrategy"}.get(strategy, "DeepSpeedStrategy")


def _missing(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is None


def test_ddp_on_two_cpu_processes_builds_a_gloo_trainer():
    from hydra.utils import instantiate

    cfg = config("experiment=demo", "strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    validate(cfg)
    trainer = instantiate(cfg.trainer, strategy=build_strategy(cfg), logger=False, enable_checkpointing=False)
    assert trainer.num_devices == 2 and trainer.world_size == 2
    assert trainer.strategy._get_process_group_backend() == "gloo"
    assert trainer.precision == "32-true"


@no_cuda
@pytest.mark.parametrize("strategy", CUDA_ONLY)
def test_sharded_strategies_need_cuda(strategy):
    fails(config(f"strategy={strategy}"), f"strategy={strategy} needs CUDA", "config groups strategy + trainer",
          "strategy=ddp")


@pytest.mark.skipif(not _missing("deepspeed"), reason="deepspeed is installed")
def test_deepspeed_needs_the_gpu_extra_even_with_cuda(fake_cuda):
    fails(config("strategy=deepspeed_stage_2"), "needs the package(s) deepspeed", "scfm[gpu]", "strategy=fsdp")
    validate(config("strategy=fsdp"))  # FSDP is PyTorch's own: fine with CUDA


def test_cpu_accelerator_rules_out_cuda_strategies_even_on_a_gpu_machine(fake_cuda):
    fails(config("strategy=fsdp", "trainer.accelerator=cpu"), "trainer.accelerator=cpu", "strategy=ddp")


def test_single_strategy_refuses_several_devices():
    fails(config("trainer.devices=2"), "strategy=single", "trainer.devices=2", "strategy=ddp")
    fails(config("trainer.num_nodes=2"), "strategy=single", "strategy=ddp")


@pytest.mark.parametrize("choice", ["32-true", "bf16-mixed", "16-mixed"])
def test_every_precision_choice_composes_from_an_override(choice):
    assert config(f"precision={choice}").trainer.precision == choice


def test_a_numeric_precision_on_the_command_line_is_refused_with_the_names_that_work():
    """Hydra parses ``precision=32`` as the number 32, which names no config; its own error says neither."""
    from scfm.cli.train import numeric_group_choice

    assert numeric_group_choice(["experiment=demo", "precision=bf16-mixed", "precision=32-true"]) is None
    assert numeric_group_choice(["trainer.precision=32"]) is None  # a plain value, not the group
    assert "reads 16 as a number" in numeric_group_choice(["precision=32-true,16"])
    proc = subprocess.run([sys.executable, "-m", "scfm.cli.train", "experiment=demo", "precision=32"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "scfm-train: precision=32: Hydra reads 32 as a number" in proc.stderr
    assert "Fix: use precision=32-true, bf16-mixed or 16-mixed" in proc.stderr


def test_strategy_and_precision_nodes_are_typed():
    fails(config("strategy.num_nodes=two"), "config group strategy", "num_nodes")
    fails(config("+strategy.nodes=2"), "config group strategy", "'nodes'")
    fails(config("+precision.bits=16"), "config group precision")
    fails(config("precision.value=17"), "unknown precision '17'", "precision=32-true, bf16-mixed or 16-mixed")


@no_cuda
def test_gpu_accelerator_without_cuda():
    fails(config("trainer.accelerator=gpu"), "no CUDA device", "trainer.accelerator=cpu")


# ------------------------------------------------------------------------------------------ precision
@no_cuda
def test_float16_mixed_precision_needs_cuda():
    fails(config("precision=16-mixed"), "precision=16-mixed", "needs CUDA", "config groups precision + trainer",
          "precision=bf16-mixed")


def test_precision_group_sets_the_trainer_precision(fake_cuda):
    assert config("precision=bf16-mixed").trainer.precision == "bf16-mixed"
    validate(config("precision=bf16-mixed"))  # CUDA with bf16
    validate(config("precision=16-mixed"))
    validate(config("experiment=demo", "precision=bf16-mixed"))  # CPU autocast in bf16 is supported


def test_bf16_needs_a_gpu_with_bfloat16(fake_cuda):
    fake_cuda.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    fails(config("precision=bf16-mixed"), "Tesla V100", "has no bfloat16", "precision=16-mixed")


# ------------------------------------------------------------------------------------------ attention
@no_cuda
def test_flash_attention_needs_cuda():
    fails(config("attention=flash"), "attention=flash", "needs CUDA", "config groups attention + trainer",
          "attention=sdpa")


@pytest.mark.skipif(not _missing("flash_attn"), reason="flash-attn is installed")
def test_flash_attention_needs_flash_attn_even_with_cuda(fake_cuda):
    fails(config("attention=flash"), "needs the package flash_attn, which is not installed", "attention=sdpa",
          "scfm[gpu]")


@pytest.mark.parametrize("kernel", ["performer", "flash"])
def test_generative_mask_rules_out_performer_and_flash(kernel, fake_cuda, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec  # flash-attn "installed"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name))
    fails(config(GENERATIVE, "encoding=bin", f"attention={kernel}"), f"attention={kernel} cannot express",
          "config groups attention + objective", "attention=flex")


def test_performer_runs_packed_batches():  # FAVOR+ sums per cell (doc_ids): no rule against packed batching
    validate(config("experiment=demo", "attention=performer", "batching=packed"))


# ------------------------------------------------------------------------------------------ objective + encoding
@pytest.mark.parametrize(("objective", "encoding", "needs"), [
    ("objective=mlm", "encoding=bin", "encoding=rank"),
    ("objective=mlm", "encoding=continuous", "encoding=rank"),
    (GENERATIVE, "encoding=rank", "encoding=bin"),
    (GENERATIVE, "encoding=continuous", "encoding=bin"),
    (VALUE_REGRESSION, "encoding=rank", "encoding=continuous"),
    (VALUE_REGRESSION, "encoding=bin", "encoding=continuous"),
])
def test_each_objective_needs_its_encoding(objective, encoding, needs):
    fails(config(objective, encoding), "config groups objective + encoding", f"not {encoding}", f"use {needs}")


def test_an_objective_that_cannot_be_imported_is_named():
    fails(config("objective._target_=scfm.objectives.nope.Nope"), "objective._target_=scfm.objectives.nope.Nope",
          "cannot be imported", "config group objective")


def test_objective_check_config_hook_runs(monkeypatch):
    from scfm.objectives.mlm import MaskedGeneModeling

    def check(cfg):
        raise ScfmInputError("own rule", where="config groups objective + model", fix="something valid")

    monkeypatch.setattr(MaskedGeneModeling, "check_config", staticmethod(check), raising=False)
    fails(config(), "own rule")


# ------------------------------------------------------------------------------------------ sizes
def test_max_len_above_the_model_positions():
    fails(config("encoding.max_len=4096", "model.max_position=2048"), "encoding.max_len=4096",
          "model.max_position=2048", "config groups encoding + model")


def test_unknown_condition_roles_fail_before_data():
    fails(config("data.conditions=[batch,donor]"), "data.conditions", "donor", "cell_type")
    validate(config("data.conditions=[batch,modality]"))  # known roles pass (labels are checked at open)


# ------------------------------------------------------------------------------------------ declared needs
def test_the_model_config_is_checked_before_any_data():
    fails(config("experiment=demo", "model.heads=3"), "hidden (128) is not divisible by heads (3)")


def test_rules_come_from_declarations_not_class_names():
    """Every objective and task declares NAME and NEEDS; validation reads nothing else of them."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from scfm.objectives.base import Needs

    for group in ("objective", "task"):
        for path in sorted((Path(conf_dir()) / group).glob("*.yaml")):
            cls = get_class(str(OmegaConf.load(path)["_target_"]))
            assert path.stem == cls.NAME, path
            assert isinstance(cls.NEEDS, Needs), path


def test_a_task_and_the_encoding_kind_of_a_bundle_are_checked(tmp_path):
    fails(config("task=embed", f"pretrained={tmp_path}"), "config.yaml is missing")
