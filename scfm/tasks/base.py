"""What every downstream task shares: an injected backbone (from a bundle or from scratch), frozen layers, declared
needs.

``scfm-train task=<name> pretrained=<bundle>`` builds the backbone once, with the bundle's architecture and weights
(from ``cfg.model``, randomly initialised, when ``pretrained=null``), and instantiates ``cfg.task`` with
``backbone=<model>``, ``data=<data facts>`` and ``pretrained``; the bundle's encoding reads the cells, so they are
encoded as in pretraining. The task then freezes ``freeze_layers`` (:meth:`TaskModule.apply_freeze`). The backbone
is ``self.model``; the optimiser, warm-up schedule, NaN guard and checkpoint reloading are the pretraining
objectives' (:class:`~scfm.objectives.base.PretrainingModule`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from scfm.errors import ScfmInputError
from scfm.model import encoder_layers
from scfm.objectives.base import Needs, PretrainingModule

__all__ = ["TaskModule", "freeze"]


def freeze(model: nn.Module, layers: int | str) -> int:
    """Freeze the embeddings and the first ``layers`` transformer layers (``all``: every parameter; 0: none).

    Returns the number of frozen parameters. As Geneformer's classifier: embeddings are frozen with any layer."""
    stack = encoder_layers(model)
    n = len(stack)
    if layers == "all":
        chosen: list[nn.Module] = [model]
    elif isinstance(layers, int) and not isinstance(layers, bool) and 0 <= layers <= n:
        if layers == 0:
            return 0
        in_layers = {id(p) for layer in stack for p in layer.parameters()}
        rest = [p for p in model.parameters() if id(p) not in in_layers]  # embeddings (and pretraining heads)
        chosen = [*stack[:layers]]
        for p in rest:
            p.requires_grad_(False)
    else:
        raise ScfmInputError(f"freeze_layers must be 0..{n} or 'all', got {layers!r}", where="task.freeze_layers",
                             fix=f"0 = full fine-tune, {n} = every transformer layer, all = a linear probe")
    frozen = 0
    for module in chosen:
        for p in module.parameters():
            p.requires_grad_(False)
    for p in model.parameters():
        frozen += 0 if p.requires_grad else p.numel()
    return frozen


class TaskModule(PretrainingModule):
    """Base of the downstream tasks (see the module docstring).

    Subclasses set ``NAME``, ``NEEDS`` and ``STAGE`` and implement :meth:`step` (``fit``) or ``predict_step``.
    """

    GROUP: ClassVar[str] = "task"
    NAME: ClassVar[str] = "task"
    NEEDS: ClassVar[Needs] = Needs()
    STAGE: ClassVar[str] = "fit"  # fit: trainer.fit; predict: trainer.predict over every cell
    ENCODING_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {}  # per encoding kind: fields set for this task

    def __init__(self, backbone: nn.Module | None = None, data: dict[str, Any] | None = None,
                 pretrained: str | None = None, freeze_layers: int | str = 0, lr: float = 1e-4,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0,
                 scheduler: str = "linear", total_steps: int | None = None, seed: int = 0,
                 architecture: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, data, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         scheduler=scheduler, total_steps=total_steps, seed=seed, architecture=architecture)
        self.output_dir: Path | None = None  # set by scfm-train: where the task writes its outputs

    def apply_freeze(self) -> int:
        """Freeze ``freeze_layers`` of the backbone (see :func:`freeze`)."""
        return freeze(self.model, self.hparams.freeze_layers)

    @torch.no_grad()
    def embed(self, batch: Any, pool: str | None = None) -> torch.Tensor:
        """Cell embeddings [n_cells, D] of a batch (the backbone protocol: encode, then pool)."""
        return self.model.cell_embedding(batch, self.model.encode(batch), pool)
