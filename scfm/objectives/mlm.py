"""Geneformer's masked gene modelling as a LightningModule (objective ``mlm``)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from scfm.model.bert import BertConfig, BertForMaskedGeneModeling

IGNORE = -100


def mask_genes(gene_ids: Tensor, maskable: Tensor, generator: torch.Generator, mask_id: int,
               first_gene_id: int, vocab_size: int, mask_prob: float = 0.15, mask_ratio: float = 0.8,
               random_ratio: float = 0.1) -> tuple[Tensor, Tensor]:
    """BERT masking of gene tokens: pick ``mask_prob`` of the maskable tokens; of those, ``mask_ratio``
    become ``<mask>``, ``random_ratio`` a random gene, the rest stay. Returns (inputs, labels)."""
    u = torch.rand(gene_ids.shape, generator=generator, device=gene_ids.device)
    picked = (u < mask_prob) & maskable
    labels = torch.where(picked, gene_ids, torch.full_like(gene_ids, IGNORE))
    how = torch.rand(gene_ids.shape, generator=generator, device=gene_ids.device)
    inputs = torch.where(picked & (how < mask_ratio), torch.full_like(gene_ids, mask_id), gene_ids)
    rand = torch.randint(first_gene_id, vocab_size, gene_ids.shape, generator=generator, device=gene_ids.device)
    swap = picked & (how >= mask_ratio) & (how < mask_ratio + random_ratio)
    return torch.where(swap, rand, inputs), labels


class MaskedGeneModeling(L.LightningModule):
    """BERT encoder + MLM head trained to recover masked genes of rank-encoded cells.

    Masking is drawn from a generator seeded by (seed, epoch, batch index, rank), so a resumed run masks
    exactly as the uninterrupted one. Logs loss, masked-gene accuracy and the accuracy of always
    predicting the most frequent masked gene seen so far (``freq_baseline_acc``).
    """

    def __init__(self, model: dict[str, Any], mask_prob: float = 0.15, mask_ratio: float = 0.8,
                 random_ratio: float = 0.1, mask_id: int = 1, first_gene_id: int = 2, lr: float = 1e-3,
                 weight_decay: float = 0.001, betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 10_000,
                 scheduler: str = "linear", total_steps: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = BertConfig(**model)
        self.model = BertForMaskedGeneModeling(self.config)
        self.register_buffer("label_counts", torch.zeros(self.config.vocab_size, dtype=torch.long))

    def forward(self, batch: Any) -> dict[str, Tensor]:
        return self.model(batch)

    def _generator(self, batch_idx: int, stage: str) -> torch.Generator:
        g = torch.Generator(device=self.device)
        salt = {"train": 0, "val": 1, "test": 2}[stage]
        g.manual_seed(hash((self.hparams.seed, self.current_epoch, batch_idx, self.global_rank, salt)) & (2**62 - 1))
        return g

    def _step(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        hp = self.hparams
        gene_ids = batch["gene_ids"]
        maskable = gene_ids >= hp.first_gene_id
        padding_mask = batch.get("padding_mask", None)
        if padding_mask is not None:
            maskable &= padding_mask
        inputs, labels = mask_genes(gene_ids, maskable, self._generator(batch_idx, stage), hp.mask_id,
                                    hp.first_gene_id, self.config.vocab_size, hp.mask_prob, hp.mask_ratio,
                                    hp.random_ratio)
        hidden = self.model.encode({**dict(batch.items()), "gene_ids": inputs})
        picked = labels != IGNORE
        logits = self.model.mlm_head(hidden[picked])  # only masked tokens go through the vocabulary projection
        target = labels[picked]
        n = max(int(target.numel()), 1)
        loss = F.cross_entropy(logits, target) if target.numel() else logits.sum() * 0.0
        acc = (logits.argmax(-1) == target).float().sum() / n
        if stage == "train":
            self.label_counts += torch.bincount(target, minlength=self.config.vocab_size)
        baseline = (target == self.label_counts.argmax()).float().sum() / n
        bs = int(batch["lengths"].numel())
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=stage != "train")
        self.log(f"{stage}/masked_acc", acc, prog_bar=stage == "val", batch_size=bs, sync_dist=stage != "train")
        self.log(f"{stage}/freq_baseline_acc", baseline, batch_size=bs, sync_dist=stage != "train")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, batch_idx, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, batch_idx, "val")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=tuple(hp.betas))
        total = hp.total_steps
        if total is None and self.trainer is not None:
            total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        schedule = warmup_schedule(hp.scheduler, hp.warmup_steps, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _Schedule:
    """Linear warm-up, then ``linear`` / ``cosine`` decay to 0 at ``total`` steps, or ``constant``."""

    def __init__(self, kind: str, warmup: int, total: float | None) -> None:
        if kind not in ("linear", "cosine", "constant"):
            raise ValueError(f"objective.scheduler must be linear, cosine or constant, not {kind!r}")
        self.kind, self.warmup = kind, max(int(warmup), 0)
        self.total = total if total is not None and math.isfinite(total) and total > 0 else None

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant" or self.total is None:
            return 1.0
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return 1.0 - progress if self.kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


def warmup_schedule(kind: str, warmup: int, total: float | None) -> _Schedule:
    """Multiplier of the learning rate per optimiser step (for ``LambdaLR``)."""
    return _Schedule(kind, warmup, total)
