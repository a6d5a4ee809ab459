"""Encoder FLOPs of xTrimoGene's asymmetric encoder vs a dense encoder over the full 19,266-token input.

Cells: real PBMC 3k cells (the built-in corpus, prepared into ``$SCFM_CACHE``) through ``encoding=continuous``
with its defaults (30% of the expressed values masked, read-depth-aware down-sampling), over the corpus's whole
vocabulary; the encoder sees each cell's non-zero unmasked genes + T + S (``encoder_mask``). The cells' genes
outside scFoundation's 19,264 are not removed: PBMC 3k has 16,634 genes, so the counts are an upper bound for
those cells laid out over the 19,264-gene list.

``ours``: FLOPs per cell of the scFoundation 100M encoder (``conf/model/xtrimo.yaml``: 12 layers, hidden 768,
12 heads, FFN 3072) on padded batches of ``--batch`` cells, each padded to its batch's largest encoder count,
as the model runs them. ``baseline``: FLOPs of the same encoder over all 19,266 tokens of one cell (a dense
transformer encoder, what a model without the asymmetric design computes in its encoder). Both counted by
``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no memory, no time; matmuls and attention,
forward only). Embeddings, layer norms and element-wise ops are not counted (small next to the matmuls).

    python bench/xtrimo_flops.py            # one JSON line
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from scfm.data.batching import Batching
from scfm.data.stream import CellStream
from scfm.encodings.continuous import ContinuousEncoding
from scfm.model.attention import Layout
from scfm.model.xtrimo import XtrimoConfig, XtrimoEncoder

FULL_LENGTH = 19_264 + 2  # scFoundation's genes + T + S


def encoder_flops(config: XtrimoConfig, batch: int, length: int) -> int:
    """Forward FLOPs of ``XtrimoEncoder(config)`` on a [batch, length] padded batch (meta tensors)."""
    with torch.device("meta"):
        encoder = XtrimoEncoder(config).eval()
        x = torch.zeros(batch, length, config.hidden)
        real = torch.ones(batch, length, dtype=torch.bool)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encoder(x, Layout(padding_mask=real))
    return int(counter.get_total_flops())


def pbmc_encoder_counts(n_cells: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Encoder token counts (non-zero unmasked genes + T + S) of PBMC 3k cells, grouped as served in batches."""
    from scfm.data.builtin import builtin_corpus

    corpus = builtin_corpus("pbmc3k", None, progress=False)
    enc = ContinuousEncoding().bind(corpus)
    stream = CellStream(corpus, enc, Batching(strategy="random", batch_size=batch), split="train",
                        val_fraction=0.0, seed=seed)
    out, seen = [], 0
    for b in stream:
        out.append(b["encoder_mask"].sum(1).numpy())
        seen += len(out[-1])
        if seen >= n_cells:
            break
    return out


def xtrimo_flops_case(n_cells: int = 512, batch: int = 8) -> dict[str, Any]:
    """The benchmark case: per-cell encoder FLOPs, ours (padded gathered batches) vs dense over 19,266 tokens."""
    config = XtrimoConfig(vocab_size=FULL_LENGTH, attention="sdpa")  # scFoundation 100M encoder
    batches = pbmc_encoder_counts(n_cells, batch)
    counts = np.concatenate(batches)
    cache: dict[tuple[int, int], int] = {}
    total = 0
    for b in batches:
        key = (len(b), int(b.max()))
        if key not in cache:
            cache[key] = encoder_flops(config, *key)
        total += cache[key]
    ours = total / len(counts)
    baseline = encoder_flops(config, 1, FULL_LENGTH)
    return {"case": "xtrimo_flops", "ours": ours, "baseline": baseline, "ratio": baseline / ours,
            "unit": "FLOPs per cell, encoder forward", "cells": len(counts), "batch": batch,
            "encoder_tokens_median": float(np.median(counts)), "encoder_tokens_mean": float(counts.mean()),
            "encoder_tokens_max": int(counts.max()),
            "padding_efficiency": float(counts.sum() / sum(len(b) * b.max() for b in batches)),
            "full_length": FULL_LENGTH, "layers": config.layers, "hidden": config.hidden, "heads": config.heads,
            "ffn": config.ffn, "target_ratio": 10.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(xtrimo_flops_case(args.cells, args.batch)), flush=True)


if __name__ == "__main__":
    main()
