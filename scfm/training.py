"""Callbacks and helpers shared by every training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
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
