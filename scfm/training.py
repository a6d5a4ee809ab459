"""Callbacks and helpers shared by every training run."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback


class DataEpoch(Callback):
    """Tells the DataModule which epoch starts, so each epoch gets its own deterministic shuffle."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(trainer.current_epoch)


class LossPlot(Callback):
    """Records train/val losses and writes a loss-curve PNG when training ends (or is interrupted)."""

    def __init__(self, path: str | Path, every_n_steps: int = 1) -> None:
        self.path, self.every = Path(path), every_n_steps
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and trainer.global_step % self.every == 0:
            self.train.append((trainer.global_step, float(loss)))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self.val.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train, self.val = list(state["train"]), list(state["val"])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.write()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero and self.train:
            self.write()

    def write(self) -> Path | None:
        if not self.train:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        steps, losses = map(np.asarray, zip(*self.train))
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        ax.plot(steps, losses, color="0.75", lw=0.8, label="train (per step)")
        k = max(len(losses) // 20, 1)
        if k > 1:
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, color="C0", lw=1.6, label=f"train ({k}-step mean)")
        if self.val:
            vs, vl = zip(*self.val)
            ax.plot(vs, vl, "o-", color="C3", lw=1.6, label="validation")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        fig.tight_layout()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.path)
        plt.close(fig)
        return self.path


class RNGState(Callback):
    """Saves the torch / numpy / Python RNG states in checkpoints and restores them at the first batch after
    a resume, so dropout and any other draw continue exactly as in the uninterrupted run."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        import random

        import numpy as np
        import torch

        np_state = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is None:
            return
        import random

        import numpy as np
        import torch

        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        random.setstate((*tuple(state["python"][:1]), tuple(state["python"][1]), *tuple(state["python"][2:])))
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, keys.numpy(), *rest))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that a kill cannot corrupt: the bytes go to a hidden temporary file in the checkpoint's own
    folder, are fsynced, then ``os.replace`` d over the target (atomic on POSIX), and the folder is fsynced.

    Lightning's own writer stages the file in the system temp folder and ``shutil.move`` s it, which is a copy --
    not atomic -- when that folder is on another file system than the checkpoints (a cluster's scratch disk), and
    never fsyncs. A run killed at any point leaves either the previous or the new ``last.ckpt``, whole.
    Remote paths (``s3://`` ...) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return None


def stale_checkpoint_parts(folder: str | Path) -> list[Path]:
    """Temporary files an :class:`AtomicCheckpointIO` write left behind when its process was killed mid-save."""
    folder = Path(folder)
    return sorted(folder.glob(".*.ckpt.*.tmp")) if folder.is_dir() else []
