"""What every pretraining objective shares: an injected backbone, data facts, seeded masking draws, AdamW +
warm-up, a NaN guard.

An objective is a LightningModule that trains a backbone it is given (lightning-hydra-template's ``net``):
``scfm-train`` builds the architecture once (``scfm.model.build_architecture``, its config completed from the data
facts, with a bundle's weights under ``pretrained=``) and instantiates ``cfg.objective`` with ``backbone=<model>``
and ``data=<data facts>`` (:func:`data_facts`: plain values from the corpus and encoding: token ids of the
specials, vocabulary size, label-vocabulary sizes). The hyper-parameters record the data facts and the backbone's
architecture (``{"kind", "config"}``), so ``Objective.load_from_checkpoint(path)`` rebuilds the module without the
corpus.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn

from scfm.errors import ScfmInputError
from scfm.model import ARCHITECTURES, architecture_kind, build_architecture, complete_config

__all__ = ["Needs", "NonFiniteLossError", "PretrainingModule", "data_facts", "warmup_schedule"]


@dataclass(frozen=True)
class Needs:
    """What an objective or task needs of the other config groups; ``scfm.config.validate`` checks these before
    any data is read (an empty tuple: anything goes)."""

    encodings: tuple[str, ...] = ()  # encoding kinds it reads (``encoding.kind``)
    architectures: tuple[str, ...] = ()  # architectures it trains (``scfm.model.ARCHITECTURES``)
    masks: frozenset[str] = field(default_factory=frozenset)  # attention layouts it uses beyond padding: generative
    what: str = ""  # what it does, for messages: "predicts gene ids from rank-ordered genes"

    def check_encoding(self, who: str, kind: str | None, where: str, fix: str) -> None:
        """Raise naming ``who`` (``objective=mlm``) unless it reads encodings of ``kind`` (None: not known)."""
        if self.encodings and kind is not None and kind not in self.encodings:
            raise ScfmInputError(f"{who} {self.what} and needs encoding={' or '.join(self.encodings)}, not "
                                 f"encoding={kind}", where=where, fix=fix)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient; the optimiser step was not taken."""


def data_facts(vocab: Any, labels: dict[str, list[str]] | None = None, encoding: Any = None) -> dict[str, Any]:
    """Plain facts about the data an objective needs to size and feed its model.

    Keys: ``vocab_size``, ``pad_id``, ``mask_id``, ``cls_id``, ``eos_id`` (-1 where the vocabulary lacks the
    token), ``first_gene_id``, ``n_labels`` ({role: number of labels}), ``n_modalities``, ``encoding`` (the
    encoding's ``kind``: rank / bin / continuous) and, when the encoding has them, ``n_bins`` and ``max_len``.
    """
    from scfm.data.vocab import MODALITIES

    def special(token: str) -> int:
        return vocab.specials.index(token) if token in vocab.specials else -1

    facts: dict[str, Any] = {
        "vocab_size": len(vocab), "pad_id": special("<pad>"), "mask_id": special("<mask>"),
        "cls_id": special("<cls>"), "eos_id": special("<eos>"), "first_gene_id": vocab.n_special,
        "n_labels": {role: len(values) for role, values in (labels or {}).items()},
        "n_modalities": len(MODALITIES),
        "encoding": getattr(encoding, "kind", None),
    }
    for key in ("n_bins", "max_len"):
        value = getattr(encoding, key, None)
        if isinstance(value, int):
            facts[key] = value
    return facts


class PretrainingModule(L.LightningModule):
    """Base of the pretraining objectives.

    ``backbone``: the architecture to train (an ``scfm.model`` model), kept as ``self.model`` (its config as
    ``self.config``); it must be one of ``NEEDS.architectures`` and fit the data facts. None: rebuilt (randomly
    initialised) from ``architecture``, the ``{"kind", "config"}`` the hyper-parameters recorded, as
    ``load_from_checkpoint`` does. Subclasses add their heads and buffers and implement :meth:`step`
    (``batch, batch_idx, stage -> loss``), logging through :meth:`log_metrics`.
    Provides: :meth:`generator` (masking draws seeded by seed, epoch, batch index, rank and stage, so a
    resumed run masks exactly as the uninterrupted one), AdamW with weight decay on matrices only and a
    warm-up schedule, and a guard that stops training with :class:`NonFiniteLossError` before an optimiser
    step would apply a NaN/inf gradient (so parameters and the last checkpoint stay good).

    ``NAME`` (the ``objective=`` option) and ``NEEDS`` (:class:`Needs`) declare what the objective fits.
    """

    GROUP: ClassVar[str] = "objective"  # the config group of NAME, for messages
    NAME: ClassVar[str] = ""
    NEEDS: ClassVar[Needs] = Needs()

    def __init__(self, backbone: nn.Module | None, data: dict[str, Any] | None, lr: float = 1e-3,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0,
                 scheduler: str = "linear", total_steps: int | None = None, seed: int = 0,
                 architecture: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])  # also collects the subclass's __init__ arguments
        who = f"{self.GROUP}={self.NAME}"
        if data is None:
            raise ScfmInputError(f"{who} needs the data facts", where=f"{self.GROUP}(data=...)",
                                 fix="pass data=scfm.objectives.base.data_facts(vocab, labels, encoding)")
        if self.NAME:  # a module built by hand (not by scfm-train) gets the same rule as validate()
            self.NEEDS.check_encoding(who, data.get("encoding"), where="data facts",
                                      fix=f"encode cells with encoding={' or '.join(self.NEEDS.encodings)}")
        if scheduler not in _Schedule.KINDS:
            raise ScfmInputError(f"unknown scheduler {scheduler!r}", where="objective.scheduler",
                                 fix=f"use one of: {', '.join(_Schedule.KINDS)}")
        if backbone is None and architecture is not None:  # load_from_checkpoint: the weights follow
            backbone = build_architecture(architecture["kind"], architecture["config"])
        if backbone is not None:
            kind = architecture_kind(backbone)
            needs = self.NEEDS.architectures
            if needs and kind not in needs:
                names = " / ".join(f"{a} ({ARCHITECTURES[a].description})" for a in needs)
                raise ScfmInputError(f"{who} trains the {names} architecture, not the injected {kind} backbone",
                                     where=f"{self.GROUP}(backbone=...)", fix=f"inject a {' or '.join(needs)} model")
            config = dataclasses.asdict(backbone.config)
            complete_config(kind, config, data)  # raises where the backbone does not fit the data (xtrimo's length)
            # recorded after the arguments were collected (a subclass's own architecture=None would win there)
            self.save_hyperparameters({"architecture": {"kind": kind, "config": config}})
            self.model = backbone
            self.config = backbone.config
        elif self.NAME:
            raise ScfmInputError(f"{who} needs a backbone", where=f"{self.GROUP}(backbone=...)",
                                 fix="pass backbone=scfm.model.build_architecture(kind, fields, data)")
        self._last_loss: float | None = None
        self.bundle_context: dict[str, Any] | None = None  # vocabulary + encoding, set by scfm-train

    # -- checkpoints carry what a bundle needs -----------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the vocabulary, encoding and architecture (``scfm.bundle.load_pretrained`` reads a checkpoint)."""
        if self.bundle_context is not None:
            from scfm.bundle import CHECKPOINT_KEY

            checkpoint[CHECKPOINT_KEY] = {**self.bundle_context, "prefix": "model.", "architecture": {
                "kind": architecture_kind(self.model), "config": dataclasses.asdict(self.model.config)}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from scfm.bundle import CHECKPOINT_KEY

        context = checkpoint.get(CHECKPOINT_KEY)
        if context and self.bundle_context is None:
            self.bundle_context = {k: context[k] for k in ("vocab", "encoding", "arrays", "labels", "source")
                                   if k in context}

    # -- what subclasses implement -----------------------------------------------------------------
    def step(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        """Loss of one batch; ``stage`` is ``train``, ``val`` or ``test``."""
        raise NotImplementedError

    # -- shared machinery --------------------------------------------------------------------------
    def generator(self, batch_idx: int, stage: str) -> torch.Generator:
        """A generator seeded by (seed, epoch, batch index, rank, stage) on the module's device."""
        g = torch.Generator(device=self.device)
        salt = {"train": 0, "val": 1, "test": 2, "predict": 3}[stage]
        g.manual_seed(hash((self.hparams.seed, self.current_epoch, batch_idx, self.global_rank, salt)) & (2**62 - 1))
        return g

    def log_metrics(self, stage: str, metrics: dict[str, Tensor | float], batch_size: int,
                    prog_bar: tuple[str, ...] = ("loss",)) -> None:
        """Log ``{stage}/{name}`` for each metric (synchronised across processes outside training)."""
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, prog_bar=name in prog_bar, batch_size=batch_size,
                     sync_dist=stage != "train")

    @staticmethod
    def sum_across_ranks(t: Tensor) -> Tensor:
        """``t`` summed over all processes (in place; unchanged in a single process). Running statistics kept in
        buffers must be updated with global sums: DDP broadcasts rank 0's buffers at every forward."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        return t

    @staticmethod
    def batch_size_of(batch: Any) -> int:
        """Number of cells in a batch (padded or packed)."""
        return int(batch["lengths"].numel())

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.step(batch, batch_idx, "train")
        self._last_loss = float(loss.detach())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.step(batch, batch_idx, "test")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop before a non-finite gradient reaches the parameters (gradients are synchronised here).

        Under float16 loss scaling (``precision=16-mixed``) an overflow is the scaler's to handle while the scale is
        above 1: it skips the step and halves the scale. At a scale of 1 or below, gradients that overflow would
        overflow even unscaled, so the run stops there, before the scaler would lower the scale further (a
        checkpoint never holds a scale below 1 from this rule; from the initial 2^16 that is 17 overflows in a row).
        """
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scaled = scaler is not None and scaler.is_enabled()
        if scaled and scaler.get_scale() > 1.0:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            ok = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        else:  # DeepSpeed keeps gradients in its own buffers: judge by the loss
            ok = self._last_loss is None or math.isfinite(self._last_loss)
        # every rank decides alike (FSDP's gradient shards and DeepSpeed's losses differ between ranks); a rank that
        # stopped alone would leave the others waiting in their next collective
        if self.trainer.strategy.reduce_boolean_decision(ok, all=True):
            return
        loss = self._last_loss
        what = ("a non-finite loss or gradient on another rank" if ok else
                "non-finite loss" if loss is None or not math.isfinite(loss) else "non-finite gradient")
        where = f"at step {self.global_step} (epoch {self.current_epoch}; last loss {loss})"
        if scaled:
            raise NonFiniteLossError(
                f"precision=16-mixed: {what} {where} with the loss scale at {scaler.get_scale():g}: the scaler "
                "skips overflowing steps and halves the scale, and at 1 or below float16 overflows even unscaled. "
                "Training stopped before the optimiser step. Fix: use precision=bf16-mixed (or 32-true), lower "
                "objective.lr, or check the data for extreme values; then resume=last.")
        raise NonFiniteLossError(
            f"{what} {where}. Training stopped before the "
            "optimiser step; parameters are unchanged and the last checkpoint was written before this step. "
            "Fix: lower objective.lr or raise objective.warmup_steps, keep trainer.gradient_clip_val, use "
            "precision=bf16-mixed instead of 16-mixed, or check the data for extreme values; then resume=last.")

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """``trainer.gradient_clip_val`` as usual, except under FSDP: there the norm spans every rank's shard, so the
        root module's ``clip_grad_norm_`` computes it (Lightning's FSDP precision plugin refuses to clip by norm)."""
        from lightning.pytorch.strategies import FSDPStrategy

        if (gradient_clip_val and gradient_clip_algorithm in (None, "norm")
                and isinstance(self.trainer.strategy, FSDPStrategy)):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if _offloads_optimizer(self._trainer):  # DeepSpeed refuses a torch optimiser on offloaded state
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=hp.lr, betas=tuple(hp.betas), adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = hp.total_steps
        if total is None and self._trainer is not None:
            total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(hp.scheduler, hp.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _offloads_optimizer(trainer: L.Trainer | None) -> bool:
    """Whether the trainer's strategy is DeepSpeed with the optimiser state offloaded (to CPU memory or NVMe) and
    DeepSpeed insisting on its own CPU optimiser there (``zero_force_ds_cpu_optimizer``, default true)."""
    config = getattr(trainer.strategy, "config", None) if trainer is not None else None
    if not isinstance(config, dict) or config.get("zero_force_ds_cpu_optimizer", True) is False:
        return False
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer")
    return isinstance(offload, dict) and offload.get("device", "cpu") not in (None, "none")


class _Schedule:
    """Linear warm-up, then ``linear`` / ``cosine`` decay to 0 at ``total`` steps, or ``constant``."""

    KINDS = ("linear", "cosine", "constant")

    def __init__(self, kind: str, warmup: int, total: float | None) -> None:
        if kind not in self.KINDS:
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
