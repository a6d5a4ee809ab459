"""Multi-process training: 2-process DDP on the CPU (gloo) equals the same global batch in one process.

Why not "1 process, batch 16" vs "2 processes, batch 8": under DDP each rank streams its own contiguous share of
the epoch's cells with its own shuffle window (``CellStream.cell_order``), masks with a generator seeded by its
rank (``PretrainingModule.generator``), and averages its loss over its own masked tokens; DDP then averages the
two ranks' gradients. A 16-cell batch in one process would hold other cells, other masks and a token-weighted
mean. The single-process computation that *is* the same maths is gradient accumulation over the two ranks'
batches: micro-batch 2k is rank 0's batch k, micro-batch 2k+1 rank 1's (each masked as that rank would), with
Lightning dividing each loss by 2 -- exactly DDP's average of gradients. That is the reference here, so losses and
final weights can be compared closely (up to the order of floating-point sums in gloo's all-reduce).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

import scfm.cli.train as train_cli
from scfm.cli import conf_dir
from scfm.objectives.base import PretrainingModule

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
OVERRIDES = ["experiment=demo", "model.layers=1", "model.hidden=32", "model.ffn=64", "model.heads=2",
             "model.dropout=0", "model.attention_dropout=0", "encoding.max_len=64", "batching.batch_size=8",
             "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
             "trainer.limit_val_batches=0", f"trainer.max_steps={STEPS}", f"checkpoint_every_n_steps={STEPS}",
             "logger=csv"]


def run_cli(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m scfm.cli.train <overrides>`` in a subprocess (same SCFM_CACHE), output captured."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "scfm.cli.train", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def step_losses(run_dir: Path) -> pd.Series:
    df = pd.read_csv(run_dir / "metrics.csv")
    return df.dropna(subset=["train/loss"]).groupby("step")["train/loss"].last()


class _Interleaved:
    """Rank 0's batch k, then rank 1's batch k, for every k: one process seeing what two DDP ranks see."""

    def __init__(self, rank0, rank1) -> None:
        self.loaders = rank0, rank1

    def __len__(self) -> int:
        return 2 * min(len(x) for x in self.loaders)

    def __iter__(self):
        for a, b in zip(*self.loaders):
            yield a
            yield b


def _as_two_ranks(build):
    """Wrap ``scfm.cli.train._build``: the train loader interleaves the 2-rank streams, and micro-batch ``j`` is
    masked as rank ``j % 2`` masks its batch ``j // 2``. Records every micro-batch's loss."""
    losses: dict[int, float] = {}

    def wrapped(cfg):
        datamodule, module = build(cfg)
        wrapped.module = module
        streams = []
        for rank in (0, 1):  # the shares DDP ranks get: CellDataModule.setup reads world size / rank from the trainer
            datamodule.trainer = SimpleNamespace(world_size=2, global_rank=rank)
            datamodule.setup("fit")
            streams.append(datamodule._loader(datamodule.train_set))
        datamodule.trainer = None
        datamodule.train_dataloader = lambda: _Interleaved(*streams)

        def generator(batch_idx: int, stage: str) -> torch.Generator:
            as_rank = SimpleNamespace(hparams=module.hparams, current_epoch=module.current_epoch,
                                      global_rank=batch_idx % 2, device=module.device)
            return PretrainingModule.generator(as_rank, batch_idx // 2, stage)

        step = module.step

        def recorded(batch, batch_idx: int, stage: str):
            loss = step(batch, batch_idx, stage)
            if stage == "train":
                losses[batch_idx] = float(loss.detach())
            return loss

        module.generator, module.step = generator, recorded
        return datamodule, module

    return wrapped, losses


# ~40 s on 2 idle cores (two fresh interpreters: Lightning relaunches the CLI for rank 1; plus the reference run)
def test_two_cpu_processes_with_gloo_match_one_process_with_the_same_global_batch(tmp_path, pbmc_corpus,
                                                                                   monkeypatch):
    ddp_dir = tmp_path / "ddp"
    proc = run_cli(*OVERRIDES, "strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                   f"hydra.run.dir={ddp_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "distributed_backend=gloo" in proc.stdout + proc.stderr
    assert "Starting with 2 processes" in proc.stdout + proc.stderr

    wrapped, micro = _as_two_ranks(train_cli._build)  # what train() builds with, after validating
    monkeypatch.setattr(train_cli, "_build", wrapped)
    ref_dir = tmp_path / "one_process"
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*OVERRIDES, "trainer.accumulate_grad_batches=2",
                                          f"paths.output_dir={ref_dir}"])
    train_cli.train(cfg)

    ddp = step_losses(ddp_dir)  # rank 0's loss at each optimiser step
    assert list(ddp.index) == list(range(STEPS))
    rank0 = torch.tensor([micro[2 * k] for k in range(STEPS)], dtype=torch.float64)
    rank1 = torch.tensor([micro[2 * k + 1] for k in range(STEPS)], dtype=torch.float64)
    assert not torch.allclose(rank0, rank1, atol=1e-3)  # the ranks do see different cells
    torch.testing.assert_close(torch.tensor(ddp.values, dtype=torch.float64), rank0, rtol=0, atol=1e-5)

    a = torch.load(ddp_dir / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(ref_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == STEPS
    params = [name for name, _ in wrapped.module.named_parameters()]  # buffers (metric counters) stay per rank
    assert len(params) > 5
    for name in params:
        torch.testing.assert_close(a["state_dict"][name], b["state_dict"][name], rtol=0, atol=1e-6, msg=name)
    print("max |DDP - reference| over parameters:",
          max(float((a["state_dict"][n] - b["state_dict"][n]).abs().max()) for n in params))


class _Tiny(PretrainingModule):
    """The shared machinery around one linear layer (no corpus needed)."""

    def __init__(self) -> None:
        super().__init__(None, data={}, lr=2e-3, weight_decay=0.1, betas=(0.8, 0.9))
        self.layer = torch.nn.Linear(3, 3)


def test_fsdp_clips_by_norm_through_its_root_module():
    """Lightning's FSDP precision plugin refuses to clip by norm (a run with trainer.gradient_clip_val crashed at its
    first step on a GPU): the norm spans every rank's shard, so the FSDP root module's ``clip_grad_norm_`` computes
    it. Clipping by value, and every other strategy, go to Lightning's default."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    calls = []
    fsdp = FSDPStrategy()
    fsdp.model = SimpleNamespace(clip_grad_norm_=lambda v: calls.append(("root", v)))
    module = SimpleNamespace(trainer=SimpleNamespace(strategy=fsdp),
                             clip_gradients=lambda opt, v, algo: calls.append(("lightning", v, algo)))
    for val, algo in [(1.0, "norm"), (0.5, None), (0.3, "value"), (None, None)]:
        PretrainingModule.configure_gradient_clipping(module, "opt", val, algo)
    module.trainer.strategy = DDPStrategy()
    PretrainingModule.configure_gradient_clipping(module, "opt", 1.0, "norm")
    assert calls == [("root", 1.0), ("root", 0.5), ("lightning", 0.3, "value"), ("lightning", None, None),
                     ("lightning", 1.0, "norm")]


def test_deepspeed_optimizer_offload_gets_deepspeeds_cpu_adam(monkeypatch):
    """DeepSpeed refuses a torch optimiser when the optimiser state is offloaded (ZeRO-Offload): the run with
    strategy=deepspeed_stage_3_offload stopped in deepspeed.initialize. Same groups and hyper-parameters."""
    import types

    made = []

    class FakeCPUAdam(torch.optim.AdamW):
        def __init__(self, groups, adamw_mode, **kw):
            made.append((adamw_mode, kw))
            super().__init__(groups, **kw)

    adam = types.ModuleType("deepspeed.ops.adam")
    adam.DeepSpeedCPUAdam = FakeCPUAdam
    for name, mod in [("deepspeed", types.ModuleType("deepspeed")), ("deepspeed.ops", types.ModuleType("ops")),
                      ("deepspeed.ops.adam", adam)]:
        monkeypatch.setitem(sys.modules, name, mod)
    module = _Tiny()
    for zero, offloaded, more in [({"stage": 3, "offload_optimizer": {"device": "cpu"}}, True, {}),
                                  ({"stage": 2, "offload_optimizer": {"device": "nvme"}}, True, {}),
                                  ({"stage": 2, "offload_optimizer": {"device": "none"}}, False, {}),
                                  ({"stage": 3, "offload_optimizer": {"device": "cpu"}}, False,
                                   {"zero_force_ds_cpu_optimizer": False}),  # the user's choice
                                  ({"stage": 3, "offload_param": {"device": "cpu"}}, False, {}),
                                  ({"stage": 2}, False, {})]:
        config = {"zero_optimization": zero, **more}
        module._trainer = SimpleNamespace(strategy=SimpleNamespace(config=config), max_steps=10)
        optimizer = module.configure_optimizers()["optimizer"]
        assert isinstance(optimizer, FakeCPUAdam) == offloaded, zero
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
        assert [len(g["params"]) for g in optimizer.param_groups] == [1, 1]  # weight decays, bias does not
    assert made == [(True, {"lr": 2e-3, "betas": (0.8, 0.9)})] * 2
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(), max_steps=10)  # a strategy with no DeepSpeed config
    assert type(module.configure_optimizers()["optimizer"]) is torch.optim.AdamW


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("strategy", "precision"), [("single", "bf16-mixed"), ("ddp", "16-mixed"),
                                                     ("fsdp", "bf16-mixed"), ("deepspeed_stage_2", "bf16-mixed"),
                                                     ("deepspeed_stage_3_offload", "32-true")])
def test_gpu_strategies_and_precisions_train_and_checkpoint(tmp_path, pbmc_corpus, strategy, precision):
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="the `gpu` extra is not installed")
    run = tmp_path / "run"
    proc = run_cli(*OVERRIDES, f"strategy={strategy}", f"precision={precision}", "trainer.accelerator=gpu",
                   "trainer.devices=1", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run / "checkpoints" / "last.ckpt").exists()  # a folder for deepspeed
    assert list(step_losses(run).index) == list(range(STEPS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overrides", [("experiment=scgpt_human",), ("experiment=scfoundation_100m",),
                                       ("experiment=geneformer_v2_104m",),
                                       ("experiment=geneformer_v2_104m", "attention=flex")])
def test_gpu_each_objective_trains_its_preset(tmp_path, pbmc_corpus, overrides):
    """Every objective (generative on bins, value regression on continuous values, masked genes on ranks) on a
    GPU in bf16: until session 7 only the masked-gene demo had run on one."""
    run = tmp_path / "run"
    proc = run_cli(*overrides, "scale=tiny", "precision=bf16-mixed", "trainer.accelerator=gpu", "trainer.devices=1",
                   "trainer.max_steps=3", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                   "trainer.log_every_n_steps=1", "logger=csv", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run / "checkpoints" / "last.ckpt").exists()
    losses = step_losses(run)
    assert list(losses.index) == [0, 1, 2] and losses.notna().all() and (losses.abs() < float("inf")).all()
    assert "falls back to the eager" not in proc.stderr  # compiled flex, not its fallback
