"""``scfm-generate``: scGPT cell-prompt / gene-prompt generation from a trained model.

    scfm-generate MODEL --out generated.npz [--corpus PATH | --builtin pbmc3k] [--mode cell|gene]
                  [--known-fraction 0.5] [--rounds 1] [--n-cells 64] [--batch-size 16] [--split val]

MODEL: a model bundle (``<output_dir>/model`` of ``objective=generative``), that run's ``last.ckpt`` (it carries
its vocabulary and encoding), or a converted scGPT file (``scfm-convert scgpt``). Prompts come from the cells of
``--corpus`` (prepared with the model's vocabulary), ``--builtin``, or by default the corpus the model was
trained on; they are bin-encoded exactly as in training (the model's own encoding). ``cell`` mode generates
every gene of each cell from ``<cls>`` alone; ``gene`` mode keeps a random ``--known-fraction`` of each cell's
genes as the prompt. The ``.npz`` holds, per cell (rows padded with 0): ``gene_ids``, ``true`` (the encoded values),
``generated``, ``prompt`` (bool), ``round`` (-1 = prompt / ``<cls>``), ``lengths`` and ``cell_index``. One JSON
line summarises the run (MSE and Pearson r of generated vs true values over the generated genes).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scfm.cli import print_summary, quiet_known_warnings
from scfm.errors import ScfmInputError


def load_generator(path: str | Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(ScGPTModel in eval mode, its bin encoding, its vocabulary, where it was trained) from a bundle folder, a
    checkpoint of ``scfm-train`` or a converted scGPT file (``scfm-convert scgpt``; no encoding: scGPT's defaults)."""
    from scfm.bundle import load_pretrained, read_bundle
    from scfm.encodings.bin import BinEncoding
    from scfm.model.scgpt import ScGPTModel

    path = Path(path)
    if not path.exists():
        raise ScfmInputError("no bundle or checkpoint here", where=str(path),
                             fix="give a run's model folder (<output_dir>/model), its last.ckpt, or a converted .pt")
    source: dict[str, Any] = {}
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # load_pretrained below says what is wrong with it
            payload = None
        if isinstance(payload, dict) and str(payload.get("format", "")).startswith("scfm.scgpt/"):
            from scfm.convert.scgpt import load_converted

            model, vocab = load_converted(path)
            encoding = BinEncoding(n_bins=model.config.n_bins).bind_arrays(vocab, {})
            return model.eval(), encoding, vocab, source
        source = (payload or {}).get("scfm_bundle", {}).get("source", {}) if isinstance(payload, dict) else {}
    else:
        source = read_bundle(path).config.get("source", {})
    model, encoding, vocab = load_pretrained(path)
    if not isinstance(model, ScGPTModel) or not isinstance(encoding, BinEncoding):
        raise ScfmInputError(f"generation needs an scGPT model on bin-encoded cells, this is {type(model).__name__} "
                             f"with encoding={getattr(encoding, 'kind', '?')}", where=str(path),
                             fix="train with objective=generative (e.g. experiment=scgpt_human), or convert scGPT")
    return model, encoding, vocab, source


def _arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scfm-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a model bundle (<output_dir>/model), a last.ckpt of objective=generative, "
                   "or a converted scGPT .pt")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--builtin", default=None, help="built-in corpus (pbmc3k, synthetic) to take prompts from")
    src.add_argument("--corpus", default=None, help="a corpus folder made by scfm-prepare with the model's vocabulary; "
                     "default: the corpus the model was trained on (recorded in its bundle)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--mode", choices=("cell", "gene"), default="cell", help="cell prompt or gene prompt")
    p.add_argument("--known-fraction", type=float, default=0.5, help="gene mode: fraction of genes given")
    p.add_argument("--rounds", type=int, default=1, help="generation rounds K (each fixes 1/K of the genes)")
    p.add_argument("--n-cells", type=int, default=64, help="cells to generate")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=None, help="genes per cell incl. <cls> (default: training's)")
    p.add_argument("--split", choices=("train", "val"), default="val")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate and write the .npz; returns the summary."""
    from scfm.data.datamodule import CellDataModule
    from scfm.objectives.generative import generate_cells, generate_from_genes, random_known_mask

    if not 0.0 < args.known_fraction < 1.0:
        raise ScfmInputError(f"--known-fraction must be in (0, 1), got {args.known_fraction}")
    model, encoding, vocab, source = load_generator(args.checkpoint)
    if args.max_len:
        encoding.max_len = args.max_len
    corpus, builtin = args.corpus, args.builtin
    if corpus is None and builtin is None:
        corpus = source.get("corpus")
        if corpus is None or not Path(corpus).is_dir():
            raise ScfmInputError("no cells to take prompts from: the model does not record its training corpus"
                                 + (f" ({corpus} is gone)" if corpus else ""), where=str(args.checkpoint),
                                 fix="give --corpus <folder prepared with the model's vocabulary> or --builtin pbmc3k")
    dm = CellDataModule(encoding, {"strategy": "random", "batch_size": args.batch_size}, corpus=corpus,
                        builtin=builtin, seed=args.seed, progress=False, vocab=vocab)
    dm.setup("fit")
    key = model.config.value_key
    loader = dm.val_dataloader() if args.split == "val" else dm.train_dataloader()
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("gene_ids", "true", "generated", "prompt", "round")}
    lengths, cells = [], []
    for i, batch in enumerate(loader):
        if sum(lengths) and len(lengths) >= args.n_cells:
            break
        if args.mode == "cell":
            out = generate_cells(model, batch, args.rounds)
            prompt = torch.zeros_like(out["known"])
        else:
            prompt = random_known_mask(batch, args.known_fraction, seed=args.seed + i, cls_id=model.config.cls_id)
            out = generate_from_genes(model, batch, prompt, args.rounds)
        for c in range(int(batch["lengths"].numel())):
            n = int(batch["lengths"][c])
            rows["gene_ids"].append(batch["gene_ids"][c, :n].numpy())
            rows["true"].append(batch[key][c, :n].float().numpy())
            rows["generated"].append(out["values"][c, :n].numpy())
            rows["prompt"].append(prompt[c, :n].numpy())
            rows["round"].append(out["round"][c, :n].numpy())
            lengths.append(n)
            cells.append(int(batch["cell_index"][c]) if "cell_index" in batch else -1)
    n = min(len(lengths), args.n_cells)
    width = max(lengths[:n], default=0)
    arrays = {}
    for k, parts in rows.items():
        grid = np.zeros((n, width), dtype=parts[0].dtype if parts else np.float32)
        for r, part in enumerate(parts[:n]):
            grid[r, : len(part)] = part
        arrays[k] = grid
    arrays["lengths"], arrays["cell_index"] = np.asarray(lengths[:n]), np.asarray(cells[:n])
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **arrays)
    gen = arrays["round"] >= 0
    t, g = arrays["true"][gen], arrays["generated"][gen]
    r = float(np.corrcoef(t, g)[0, 1]) if gen.sum() > 1 and t.std() > 0 and g.std() > 0 else float("nan")
    return {"out": str(out_path), "cells": n, "mode": args.mode, "rounds": args.rounds,
            "generated_genes": int(gen.sum()), "mse": float(np.mean((t - g) ** 2)) if gen.any() else float("nan"),
            "pearson_r": r}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scfm-generate``; prints one JSON summary line, returns the exit status."""
    args = _arguments().parse_args(argv)
    quiet_known_warnings()
    return print_summary("scfm-generate", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
