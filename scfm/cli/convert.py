"""``scfm-convert``: published checkpoints -> scfm models, one sub-command per source layout.

    scfm-convert geneformer <hf_dir> <out.pt | out_dir> [--vocab CORPUS_OR_VOCAB_TSV] [--token-dictionary D]

The output is read back by ``scfm.convert.geneformer.load_converted`` (``torch.load(weights_only=True)``).
Other converters register in :data:`CONVERTERS`: ``CONVERTERS["scgpt"] = Converter(help, add_arguments, run)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from scfm.cli import print_summary
from scfm.errors import ScfmInputError


@dataclass(frozen=True)
class Converter:
    """One sub-command: ``add_arguments(parser)`` declares its options, ``run(args)`` converts and returns a
    summary dict (printed as one JSON line)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]


def _geneformer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="local HF folder: config.json + model.safetensors or pytorch_model.bin")
    p.add_argument("out", help="output: a file ending in .pt/.pth/.ckpt, or a folder (model.pt, config.json, "
                   "vocab.tsv)")
    p.add_argument("--token-dictionary", default=None,
                   help="the checkpoint's token dictionary (.json / .pkl, or geneformer_gc30M / geneformer_gc95M); "
                   "default: the built-in one with the model's vocab size, if any")
    p.add_argument("--vocab", default=None,
                   help="re-index gene rows to this vocabulary (a corpus folder or a vocab.tsv); default: keep "
                   "Geneformer's ids (prepare corpora with vocab=geneformer_gc30M / gc95M)")
    p.add_argument("--attention", default="sdpa", help="attention kernel stored in the config (default sdpa)")


def _geneformer_run(args: argparse.Namespace) -> dict:
    from scfm.convert.geneformer import (
        as_vocab,
        convert_geneformer,
        geneformer_vocab,
        read_hf_folder,
        remap_vocab,
        save_converted,
    )

    hf_config, state = read_hf_folder(args.hf_dir)
    config, ours = convert_geneformer(state, hf_config, args.attention)
    summary: dict = {"converter": "geneformer", "source": str(args.hf_dir), "vocab_size": config.vocab_size,
                     "layers": config.layers, "hidden": config.hidden, "activation": config.activation}
    try:
        vocab = geneformer_vocab(args.token_dictionary, config.vocab_size)
    except ScfmInputError:
        if args.token_dictionary is not None or args.vocab is not None:
            raise
        vocab = None  # unknown dictionary and no remapping asked: write the weights without a vocabulary
    if args.vocab is not None:
        config, ours, counts = remap_vocab(config, ours, vocab, as_vocab(args.vocab))
        vocab = as_vocab(args.vocab)
        summary.update(remapped_to=str(args.vocab), vocab_size=config.vocab_size, **counts)
    summary["out"] = str(save_converted(args.out, config, ours, vocab, source=str(args.hf_dir)))
    summary["vocab"] = None if vocab is None else len(vocab)
    return summary


CONVERTERS: dict[str, Converter] = {
    "geneformer": Converter("Geneformer / HF BertForMaskedLM folder -> scfm BERT", _geneformer_arguments,
                            _geneformer_run),
}
"""Sub-commands of ``scfm-convert``; other converters add themselves here."""


def _register_others() -> None:
    from scfm.convert.scfoundation import register as register_scfoundation
    from scfm.convert.scgpt import register as register_scgpt

    register_scgpt(CONVERTERS)
    register_scfoundation(CONVERTERS)


_register_others()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scfm-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True, metavar="{" + ",".join(CONVERTERS) + "}")
    for name, conv in CONVERTERS.items():
        conv.add_arguments(sub.add_parser(name, help=conv.help, description=conv.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scfm-convert``; prints one JSON summary line, returns the exit status."""
    args = build_parser().parse_args(argv)
    return print_summary("scfm-convert", lambda: CONVERTERS[args.source].run(args))


if __name__ == "__main__":
    sys.exit(main())
