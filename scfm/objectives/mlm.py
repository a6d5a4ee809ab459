"""Geneformer's masked gene modelling as a LightningModule (objective ``mlm``)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scfm.objectives.base import Needs, PretrainingModule, warmup_schedule

__all__ = ["IGNORE", "MaskedGeneModeling", "mask_genes", "warmup_schedule"]

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


class MaskedGeneModeling(PretrainingModule):
    """BERT encoder + MLM head (an injected :class:`~scfm.model.bert.BertForMaskedGeneModeling`) trained to recover
    masked genes of rank-encoded cells.

    Logs loss, masked-gene accuracy and the accuracy of always predicting the most frequent masked gene
    seen so far in training (``freq_baseline_acc``).
    """

    NAME: ClassVar[str] = "mlm"
    NEEDS: ClassVar[Needs] = Needs(encodings=("rank",), architectures=("bert",),
                                   what="predicts gene ids from rank-ordered genes")

    def __init__(self, backbone: nn.Module | None = None, data: dict[str, Any] | None = None, mask_prob: float = 0.15,
                 mask_ratio: float = 0.8, random_ratio: float = 0.1, lr: float = 1e-3, weight_decay: float = 0.001,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 10_000, scheduler: str = "linear",
                 total_steps: int | None = None, seed: int = 0, architecture: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, data, lr=lr, weight_decay=weight_decay, betas=betas,
                         warmup_steps=warmup_steps, scheduler=scheduler, total_steps=total_steps, seed=seed,
                         architecture=architecture)
        self.register_buffer("label_counts", torch.zeros(self.config.vocab_size, dtype=torch.long))

    def forward(self, batch: Any) -> dict[str, Tensor]:
        return self.model(batch)

    def step(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        hp, data = self.hparams, self.hparams.data
        gene_ids = batch["gene_ids"]
        maskable = gene_ids >= data["first_gene_id"]
        padding_mask = batch.get("padding_mask", None)
        if padding_mask is not None:
            maskable &= padding_mask
        inputs, labels = mask_genes(gene_ids, maskable, self.generator(batch_idx, stage), data["mask_id"],
                                    data["first_gene_id"], self.config.vocab_size, hp.mask_prob, hp.mask_ratio,
                                    hp.random_ratio)
        hidden = self.model.encode({**dict(batch.items()), "gene_ids": inputs})
        picked = labels != IGNORE
        logits = self.model.mlm_head(hidden[picked])  # only masked tokens go through the vocabulary projection
        target = labels[picked]
        n = max(int(target.numel()), 1)
        loss = F.cross_entropy(logits, target) if target.numel() else logits.sum() * 0.0
        acc = (logits.argmax(-1) == target).float().sum() / n
        if stage == "train":
            self.label_counts += self.sum_across_ranks(torch.bincount(target, minlength=self.config.vocab_size))
        baseline = (target == self.label_counts.argmax()).float().sum() / n
        self.log_metrics(stage, {"loss": loss, "masked_acc": acc, "freq_baseline_acc": baseline},
                         self.batch_size_of(batch), prog_bar=("loss", "masked_acc") if stage == "val" else ("loss",))
        return loss
