"""scfm: single-cell foundation models with one corpus format, one backbone of parts, one experiment system.

The pipeline, one package per stage (imports run down this list, never up it)::

    scfm.data        corpus format (corpus, vocab, gene_stats), prepare, readers, built-in data, simulator,
                     and the loader (stream, batching, datamodule)
    scfm.encodings   rank (Geneformer), bin (scGPT), continuous (scFoundation): cells -> tokens
    scfm.model       attention kernels, blocks, embeddings, architectures bert / scgpt / xtrimo (no data, no CLI)
    scfm.objectives  pretraining LightningModules; scfm.tasks: downstream ones; scfm.convert: published weights
    scfm.bundle      model bundles: write at the end of a run, ``load_pretrained`` anywhere
    scfm.config      validation and scale, before any data is read
    scfm.cli         the console commands

``scfm.load_pretrained(path) -> (backbone, encoding, vocab)`` reads a bundle (or an ``scfm-train`` checkpoint).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_pretrained"]


def __getattr__(name: str) -> Any:  # lazy: ``import scfm`` stays free of torch
    if name == "load_pretrained":
        from scfm.bundle import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'scfm' has no attribute {name!r}")
