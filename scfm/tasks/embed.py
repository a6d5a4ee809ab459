"""``task=embed``: zero-shot cell embeddings of every cell of the data, from a model bundle.

``scfm-train task=embed pretrained=<bundle> data=corpus data.corpus=<corpus>`` encodes each cell as in
pretraining (the bundle's encoding; stochastic parts such as scFoundation's value masking and down-sampling are
switched off), runs the backbone once per cell and pools its hidden states (``task.pool``; null = the
architecture's own: Geneformer's mean, scGPT's ``<cls>``, scFoundation's [S, T, max, mean]). It writes
``<output_dir>/embeddings.npy`` ([n_cells, D] float32, rows in corpus order) and ``<output_dir>/cells.parquet``
(cell id and the corpus's labels, row for row).
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from scfm.objectives.base import Needs
from scfm.tasks.base import TaskModule

__all__ = ["EmbedCells"]


class EmbedCells(TaskModule):
    """Cell embeddings of every cell (see the module docstring); no training."""

    NAME: ClassVar[str] = "embed"
    NEEDS: ClassVar[Needs] = Needs(what="embeds cells with a pretrained model")
    STAGE: ClassVar[str] = "predict"
    ENCODING_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {  # per encoding kind: deterministic for inference
        "continuous": {"mask_nonzero": 0.0, "mask_zero": 0.0, "downsample_prob": 0.0}}

    def __init__(self, backbone: nn.Module | None = None, data: dict[str, Any] | None = None,
                 pretrained: str | None = None, pool: str | None = None, freeze_layers: int | str = "all",
                 seed: int = 0, architecture: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, data, pretrained=pretrained, freeze_layers=freeze_layers, seed=seed,
                         architecture=architecture)
        self._rows: list[np.ndarray] = []
        self._index: list[np.ndarray] = []
        self._started = 0.0

    def on_predict_start(self) -> None:
        self._rows, self._index, self._started = [], [], time.perf_counter()

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        emb = self.embed(batch, self.hparams.pool).float()
        self._rows.append(emb.cpu().numpy())
        self._index.append(batch["cell_index"].cpu().numpy())
        return emb

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [n, D] in corpus order, the cells' corpus indices) of the last predict run."""
        index = np.concatenate(self._index) if self._index else np.zeros(0, np.int64)
        rows = np.concatenate(self._rows) if self._rows else np.zeros((0, 0), np.float32)
        order = np.argsort(index, kind="stable")
        return rows[order], index[order]

    def write_outputs(self, corpus: Any) -> dict[str, Any]:
        """Write embeddings.npy and cells.parquet to ``output_dir``; return a summary."""
        import pandas as pd

        emb, index = self.embeddings()
        seconds = time.perf_counter() - self._started
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "embeddings.npy", emb.astype(np.float32))
        obs = pd.concat([corpus.obs(i) for i in range(corpus.n_shards)], ignore_index=True).iloc[index]
        keep = ["cell_id", *[c for c in corpus.columns if c in obs]]
        obs[keep].reset_index(drop=True).to_parquet(out / "cells.parquet")
        summary = {"task": "embed", "cells": len(index), "dim": int(emb.shape[1]) if emb.ndim == 2 else 0,
                   "pool": self.hparams.pool, "pretrained": self.hparams.pretrained, "seconds": round(seconds, 2),
                   "cells_per_s": round(len(index) / seconds, 1) if seconds > 0 else None,
                   "finite": bool(np.isfinite(emb).all()), "embeddings": str(out / "embeddings.npy"),
                   "cells_table": str(out / "cells.parquet")}
        (out / "embed.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def configure_optimizers(self) -> Any:  # nothing to train
        return None

    def forward(self, batch: Any) -> torch.Tensor:
        return self.embed(batch, self.hparams.pool)
