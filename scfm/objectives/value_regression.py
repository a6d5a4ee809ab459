"""scFoundation / xTrimoGene's masked value regression as a LightningModule (objective ``value_regression``).

The masking, read-depth-aware down-sampling and the T/S depth tokens all come from ``encoding=continuous``
(``value_mask``, ``values``, ``target_values``); this module runs its :class:`scfm.model.xtrimo.XtrimoModel` and
takes the mean squared error between its predicted values and the raw cell's log-normalised values at the masked
genes (masked non-zero genes and the few masked zero genes together, as scFoundation).

Logged per stage: ``loss`` (= ``masked_mse``), ``masked_mse_nonzero`` / ``masked_mse_zero`` (masked genes whose
target is > 0 / == 0), and two baselines from running per-gene sums kept as buffers (in the checkpoint; updated
by training batches only, after their metrics are taken):

- ``mean_mse``: predict each gene's mean target over all training cells seen so far (its average expression,
  zeros included; ``gene_sum`` / ``gene_count``);
- ``masked_mean_mse``: predict each gene's mean target over the positions where it was masked (``masked_sum`` /
  ``masked_count``). Masking picks expressed genes ten times more often than zeros, so this is the stronger
  baseline: the best constant per gene for this loss. A model below it has learned from the cell's context.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from scfm.objectives.base import Needs, PretrainingModule

__all__ = ["ValueRegression"]


class ValueRegression(PretrainingModule):
    """An injected xTrimoGene encoder-decoder (:class:`~scfm.model.xtrimo.XtrimoModel`) trained to regress masked
    gene values of continuous-encoded cells."""

    NAME: ClassVar[str] = "value_regression"
    NEEDS: ClassVar[Needs] = Needs(encodings=("continuous",), architectures=("xtrimo",),
                                   what="regresses continuous expression values (scFoundation)")

    def __init__(self, backbone: nn.Module | None = None, data: dict[str, Any] | None = None, lr: float = 1e-4,
                 weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 10_000,
                 scheduler: str = "cosine", total_steps: int | None = None, seed: int = 0,
                 architecture: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, data, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         scheduler=scheduler, total_steps=total_steps, seed=seed, architecture=architecture)
        n = self.config.max_seq_len  # running sums per layout position (= per gene of the fixed list)
        for name in ("gene_sum", "gene_count", "masked_sum", "masked_count"):
            self.register_buffer(name, torch.zeros(n, dtype=torch.float64))

    def forward(self, batch: Any) -> dict[str, Tensor]:
        return self.model(batch)

    def step(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        pred = self.model(batch)["pred"]  # [B, G]
        target = self.model.genes(batch["target_values"], batch).to(pred.dtype)  # [B, G]
        masked = self.model.genes(batch["value_mask"], batch)  # [B, G]
        column = self.model.genes(batch["positions"], batch)  # [B, G]: the gene's row in gene_sum
        err = (pred - target).square()
        n = masked.sum()
        if int(n) == 0:  # nothing masked in this batch: a zero loss that keeps the graph
            loss = pred.sum() * 0.0
            self.log_metrics(stage, {"loss": loss}, self.batch_size_of(batch))
            return loss
        loss = err[masked].mean()
        nonzero = masked & (target > 0)
        zero = masked & (target <= 0)
        cols, tgt = column[masked], target[masked]

        def running_mean(total: Tensor, count: Tensor) -> Tensor:
            return (total[cols] / count[cols].clamp_min(1)).to(pred.dtype)

        metrics: dict[str, Tensor] = {
            "loss": loss, "masked_mse": loss.detach(),
            "mean_mse": (running_mean(self.gene_sum, self.gene_count) - tgt).square().mean(),
            "masked_mean_mse": (running_mean(self.masked_sum, self.masked_count) - tgt).square().mean()}
        if bool(nonzero.any()):
            metrics["masked_mse_nonzero"] = err[nonzero].mean().detach()
        if bool(zero.any()):
            metrics["masked_mse_zero"] = err[zero].mean().detach()
        if stage == "train":  # the baselines see each batch only after predicting it
            flat, ones = column.flatten(), torch.ones_like(self.gene_count[column.flatten()])
            stats = torch.stack([  # [4, n_genes]: this batch's sums and counts, over every rank (DDP)
                torch.zeros_like(self.gene_sum).index_add_(0, flat, target.detach().flatten().double()),
                torch.zeros_like(self.gene_count).index_add_(0, flat, ones),
                torch.zeros_like(self.masked_sum).index_add_(0, cols, tgt.detach().double()),
                torch.zeros_like(self.masked_count).index_add_(0, cols, torch.ones_like(self.masked_count[cols]))])
            self.sum_across_ranks(stats)
            for buffer, update in zip((self.gene_sum, self.gene_count, self.masked_sum, self.masked_count), stats):
                buffer += update
        self.log_metrics(stage, metrics, self.batch_size_of(batch))
        return loss
