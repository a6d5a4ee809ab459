"""Faults: a run killed with SIGKILL resumes with bitwise the same losses; checkpoint writes survive a kill; a NaN
stops training with a clear message and leaves the last good checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from scfm.cli import conf_dir
from scfm.cli.train import train
from scfm.errors import ScfmInputError
from scfm.objectives.base import NonFiniteLossError, PretrainingModule
from scfm.training import AtomicCheckpointIO, stale_checkpoint_parts

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=demo", "model.layers=1", "model.hidden=32", "model.ffn=64", "model.heads=2",
        "encoding.max_len=64", "batching.batch_size=8", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0",
        "logger=csv"]


def config(out: Path, *overrides: str):
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("train", overrides=[*TINY, f"paths.output_dir={out}", *overrides])


def losses(run_dir: Path) -> pd.Series:
    df = pd.read_csv(run_dir / "metrics.csv")
    return df.dropna(subset=["train/loss"]).groupby("step")["train/loss"].last()


def cli(*overrides: str, code: str = "") -> list[str]:
    """Command line of ``scfm-train <overrides>`` in a fresh interpreter, after running ``code`` (a patch)."""
    script = f"{code}\nimport sys\nsys.argv = ['scfm-train', *{list(overrides)!r}]\n" \
             "from scfm.cli.train import main\nmain()\n"
    return [sys.executable, "-c", script]


@pytest.mark.slow  # three training launches, one a subprocess: ~45 s on 2 cores (test_train covers resume in-process)
def test_sigkilled_run_resumes_with_bitwise_equal_losses(tmp_path, pbmc_corpus):
    steps = 24
    common = [f"trainer.max_steps={steps}", "checkpoint_every_n_steps=2"]
    killed = tmp_path / "killed"
    # the same intra-op thread count as this process (conftest sets 1): sums in another order differ in the last bit
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cli(*TINY, *common, f"hydra.run.dir={killed}"), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"run ended before the kill:\n{err[-3000:]}"
    saved = torch.load(last, weights_only=False)  # whole, even if the kill landed in a later save
    assert 2 <= saved["global_step"] < steps and saved["global_step"] % 2 == 0

    train(config(killed, *common, "resume=last"))  # same output dir: resume=last finds checkpoints/last.ckpt
    full = tmp_path / "full"
    train(config(full, *common))

    resumed, reference = losses(killed), losses(full)
    assert list(resumed.index) == list(range(saved["global_step"], steps))
    assert resumed.to_numpy().tobytes() == reference.loc[resumed.index].to_numpy().tobytes()  # bitwise
    final = torch.load(last, weights_only=False)["state_dict"]
    for name, weight in torch.load(full / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"].items():
        assert torch.equal(final[name], weight), name


def test_resume_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(ScfmInputError, match=r"no checkpoint at .*last\.ckpt(.|\n)*paths\.output_dir"):
        train(config(tmp_path, "resume=last"))
    with pytest.raises(ScfmInputError, match="no checkpoint at"):
        train(config(tmp_path, f"resume={tmp_path / 'nope.ckpt'}"))


def test_checkpoint_write_interrupted_before_the_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died after writing the bytes, before renaming them

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert not stale_checkpoint_parts(path.parent)  # the partial file was removed
    io.save_checkpoint({"global_step": 3, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3


_SAVE_FOREVER = """
import sys, torch
from scfm.training import AtomicCheckpointIO
io, path, step = AtomicCheckpointIO(), sys.argv[1], 0
big = torch.arange(4_000_000, dtype=torch.float32)  # 16 MB: a save takes long enough to be killed inside one
while True:
    step += 1
    io.save_checkpoint({"global_step": step, "w": big + step}, path)
    print(step, flush=True)
"""


def test_sigkill_during_checkpoint_writes_never_leaves_a_corrupt_file(tmp_path):
    path = tmp_path / "last.ckpt"
    for delay in (0.4,):  # more delays = more chances to land inside a write (each costs a fresh interpreter)
        proc = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(path)], stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # one save completed
        assert first.strip(), "the writer died"
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        ckpt = torch.load(path, weights_only=True)  # never a truncated file
        assert torch.equal(ckpt["w"], torch.arange(4_000_000, dtype=torch.float32) + ckpt["global_step"])
        for part in stale_checkpoint_parts(tmp_path):  # what scfm-train removes at its next start
            part.unlink()


_NAN_AT_STEP_3 = textwrap.dedent("""
    from scfm.objectives.mlm import MaskedGeneModeling
    _step = MaskedGeneModeling.step
    def step(self, batch, batch_idx, stage):
        loss = _step(self, batch, batch_idx, stage)
        return loss * float("nan") if stage == "train" and self.global_step == 3 else loss
    MaskedGeneModeling.step = step
""")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, pbmc_corpus):
    run = tmp_path / "run"
    proc = subprocess.run(cli(*TINY, "trainer.max_steps=10", "checkpoint_every_n_steps=2", f"hydra.run.dir={run}",
                              code=_NAN_AT_STEP_3), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "scfm-train: non-finite loss at step 3" in proc.stderr
    assert "Fix:" in proc.stderr or "resume=last" in proc.stderr
    assert "Traceback" not in proc.stderr
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2  # the last checkpoint before the NaN, not a later one
    assert all(torch.isfinite(w).all() for w in ckpt["state_dict"].values() if w.is_floating_point())
    assert list(losses(run).index) == [0, 1, 2]  # logged before the guard stopped step 3


class _Overflowing(PretrainingModule):
    """One linear layer whose loss overflows float16 at the steps in ``overflow`` (all steps: ``None``)."""

    def __init__(self, overflow: set[int] | None) -> None:
        super().__init__(None, data={}, lr=0.1)
        self.layer = torch.nn.Linear(4, 4)
        self.overflow, self.weights = overflow, []

    def step(self, batch, batch_idx, stage):
        scale = 1e30 if self.overflow is None or self.global_step in self.overflow else 1.0
        return (self.layer(batch) ** 2).mean() * scale

    def on_train_batch_start(self, batch, batch_idx):
        self.weights.append(self.layer.weight.detach().clone())


def _fit_fp16(module: PretrainingModule, steps: int, init_scale: float) -> None:
    """Lightning's float16 mixed precision with a real GradScaler, on the CPU (the config allows 16-mixed on CUDA
    only; the scaler logic is the same)."""
    import lightning as L
    from lightning.pytorch.plugins import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))
    trainer = L.Trainer(accelerator="cpu", devices=1, plugins=[plugin], max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    g = torch.Generator().manual_seed(0)
    trainer.fit(module, torch.utils.data.DataLoader(torch.randn(4 * steps, 4, generator=g), batch_size=4))


def test_fp16_overflow_is_left_to_the_loss_scaler():
    """A float16 overflow makes the unscaled gradients inf: the scaler skips that step and halves the scale. The
    NaN guard stopped such runs at their first overflow (common in the first steps from a scale of 2^16)."""
    module = _Overflowing(overflow={0, 1, 2})
    _fit_fp16(module, steps=6, init_scale=2.0**16)
    w = [*module.weights, module.layer.weight.detach()]
    assert all(torch.equal(w[0], w[i]) for i in (1, 2, 3))  # the overflowing steps 0-2 were skipped
    assert not torch.equal(w[3], w[4]) and torch.isfinite(w[-1]).all()  # then training went on
    assert module.trainer.precision_plugin.scaler.get_scale() == 2.0**13


def test_fp16_stops_when_gradients_overflow_at_a_loss_scale_of_one():
    module = _Overflowing(overflow=None)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2 .* loss scale at 1: .*bf16-mixed"):
        _fit_fp16(module, steps=10, init_scale=4.0)  # 4, 2: skipped and halved; 1: stop, before it would halve
    assert all(torch.equal(module.weights[0], w) for w in module.weights)


def test_fp16_resumed_at_a_low_loss_scale_trains_on_while_gradients_are_finite():
    """A checkpoint may hold a scale of 1 or below (e.g. written before an older rule stopped the run): a healthy
    model resumed from it must train, not stop at its first step."""
    module = _Overflowing(overflow=set())
    _fit_fp16(module, steps=4, init_scale=0.5)
    assert not torch.equal(module.weights[0], module.weights[-1])


def test_without_gradients_on_the_parameters_the_guard_judges_the_loss():
    """DeepSpeed keeps gradients in its own buffers (every ``p.grad`` is None): the guard looked at nothing."""
    from types import SimpleNamespace

    module = _Overflowing(overflow=set())
    from lightning.pytorch.strategies import SingleDeviceStrategy

    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(), strategy=SingleDeviceStrategy("cpu"),
                                      global_step=7, current_epoch=0)
    module._last_loss = 0.5
    module.on_before_optimizer_step(None)  # finite: goes on
    module._last_loss = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 7"):
        module.on_before_optimizer_step(None)
