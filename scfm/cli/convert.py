"""``scfm-convert``: published checkpoints -> scfm models, one sub-command per source layout.

    scfm-convert geneformer <hf_dir> <out.pt | out_dir> [--vocab CORPUS_OR_VOCAB_TSV] [--token-dictionary D]

The output is read back by ``scfm.convert.geneformer.load_converted`` (``torch.load(weights_only=True)``).
Each sub-command is a :class:`Converter` in :data:`CONVERTERS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    p.add_argument("out", help="output: a folder = a model bundle (config.yaml, vocab.tsv, gene_medians.tsv, "
                   "weights.safetensors), or a file ending in .pt/.pth/.ckpt")
    p.add_argument("--token-dictionary", default=None,
                   help="the checkpoint's token dictionary (.json / .pkl, or geneformer_gc30M / geneformer_gc95M); "
                   "default: the built-in one with the model's vocab size, if any")
    p.add_argument("--vocab", default=None,
                   help="re-index gene rows to this vocabulary (a corpus folder or a vocab.tsv); default: keep "
                   "Geneformer's ids (prepare corpora with vocab=geneformer_gc30M / gc95M)")
    p.add_argument("--gene-medians", default=None,
                   help="the model's gene median dictionary (.json / .pkl, or geneformer_gc30M / geneformer_gc95M) "
                   "for the bundle's rank encoding; default: the built-in one of the model's vocabulary")
    p.add_argument("--attention", default="sdpa", help="attention kernel stored in the config (default sdpa)")


def _is_bundle(out: str) -> bool:
    """A folder output (no file suffix) is written as a model bundle."""
    return Path(out).suffix not in (".pt", ".pth", ".ckpt")


def _geneformer_run(args: argparse.Namespace) -> dict:
    from scfm.convert import write_converted_bundle
    from scfm.convert.geneformer import (
        as_vocab,
        build_model,
        convert_geneformer,
        default_medians,
        geneformer_encoding,
        geneformer_vocab,
        read_hf_folder,
        remap_vocab,
        save_converted,
    )
    from scfm.model.bert import BertConfig, BertForMaskedGeneModeling

    hf_config, state = read_hf_folder(args.hf_dir)
    config, ours = convert_geneformer(state, hf_config, args.attention)
    medians = args.gene_medians or default_medians(config.vocab_size)
    summary: dict = {"converter": "geneformer", "source": str(args.hf_dir), "vocab_size": config.vocab_size,
                     "layers": config.layers, "hidden": config.hidden, "activation": config.activation}
    try:
        vocab = geneformer_vocab(args.token_dictionary, config.vocab_size)
    except ScfmInputError:
        if args.token_dictionary is not None or args.vocab is not None:
            raise
        vocab = None  # unknown dictionary and no remapping asked: write the weights without a vocabulary
    layout = "v2" if vocab is not None and {"<cls>", "<eos>"} <= set(vocab.specials) else "v1"  # the model's own
    if args.vocab is not None:
        config, ours, counts = remap_vocab(config, ours, vocab, as_vocab(args.vocab))
        vocab = as_vocab(args.vocab)
        summary.update(remapped_to=str(args.vocab), vocab_size=config.vocab_size, **counts)
    summary["vocab"] = None if vocab is None else len(vocab)
    if not _is_bundle(args.out):
        summary["out"] = str(save_converted(args.out, config, ours, vocab, source=str(args.hf_dir)))
        return summary
    if vocab is None or medians is None:
        raise ScfmInputError("a bundle needs the model's token dictionary and gene medians", where=str(args.hf_dir),
                             fix="pass --token-dictionary and --gene-medians (Geneformer's .pkl / .json), or write "
                                 "a .pt file instead")
    model = build_model({"config": dataclasses.asdict(config), "state_dict": ours}, BertConfig,
                        BertForMaskedGeneModeling)
    encoding = geneformer_encoding(config, vocab, medians, layout)
    summary["out"] = str(write_converted_bundle(args.out, model, encoding, vocab, {"converter": "geneformer",
                                                "checkpoint": str(Path(args.hf_dir).resolve())}))
    summary["encoding"] = f"rank {encoding.layout}, input {encoding.max_len}"
    return summary



def _scgpt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="scGPT folder: best_model.pt, args.json, vocab.json")
    p.add_argument("out", help="output: a folder = a model bundle (config.yaml, vocab.tsv, weights.safetensors), "
                   "or a .pt file")
    p.add_argument("--vocab", default=None, help="re-index gene rows to this vocabulary by symbol (a corpus folder "
                   "or a vocab.tsv); default: scGPT's own genes (symbols)")
    p.add_argument("--attention", default="sdpa", help="attention kernel stored in the config (default sdpa)")


def _scgpt_run(args: argparse.Namespace) -> dict:
    from scfm.convert import write_converted_bundle
    from scfm.convert.scgpt import (
        as_vocab,
        build_model,
        convert_scgpt,
        read_scgpt_folder,
        remap_vocab,
        save_converted,
        scgpt_encoding,
        scgpt_vocab,
    )
    from scfm.model.scgpt import ScGPTConfig, ScGPTModel

    state, scgpt_args, raw_vocab = read_scgpt_folder(args.model_dir)
    config, ours = convert_scgpt(state, scgpt_args, raw_vocab, args.attention)
    vocab, _ = scgpt_vocab(raw_vocab)
    summary: dict[str, Any] = {"converter": "scgpt", "source": str(args.model_dir), "layers": config.layers,
                               "hidden": config.hidden, "heads": config.heads, "vocab_size": config.vocab_size,
                               "value_embedding": config.value_embedding, "mvc": config.mvc,
                               "flag_encoder_initialised": not any(k.endswith("flag_encoder.weight") for k in state)}
    if args.vocab is not None:
        target = as_vocab(args.vocab)
        config, ours, counts = remap_vocab(config, ours, vocab, target)
        vocab = target
        summary.update(remapped_to=str(args.vocab), vocab_size=config.vocab_size, **counts)
    if not _is_bundle(args.out):
        summary["out"] = str(save_converted(args.out, config, ours, vocab, source=str(args.model_dir)))
        return summary
    model = build_model({"config": dataclasses.asdict(config), "state_dict": ours}, ScGPTConfig, ScGPTModel)
    summary["out"] = str(write_converted_bundle(args.out, model, scgpt_encoding(config, scgpt_args, vocab), vocab,
                                                {"converter": "scgpt",
                                                 "checkpoint": str(Path(args.model_dir).resolve())}))
    return summary


def _scfoundation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="scFoundation models.ckpt (or a MaeAutobin state dict)")
    p.add_argument("out", help="output: a folder = a model bundle (needs --gene-list), or a .pt file (+ "
                   "<out>.genes.txt with the gene list)")
    p.add_argument("--gene-list", default=None, help="OS_scRNA_gene_index.19264.tsv (gene_name column)")
    p.add_argument("--key", default="cell", help="model inside models.ckpt: cell (default), gene or rde")
    p.add_argument("--attention", default="sdpa", help="encoder attention kernel stored in the config")
    p.add_argument("--encoder-heads", type=int, default=12, help="encoder heads when the checkpoint has no config")


def _scfoundation_run(args: argparse.Namespace) -> dict:
    from scfm.convert import write_converted_bundle
    from scfm.convert.scfoundation import load_scfoundation, save_converted, scfoundation_bundle_parts
    from scfm.model.xtrimo import XtrimoModel

    weights = load_scfoundation(args.checkpoint, args.gene_list, args.key, args.attention, args.encoder_heads)
    if _is_bundle(args.out):
        vocab, encoding = scfoundation_bundle_parts(weights)
        model = XtrimoModel(weights.config)
        model.load_state_dict(weights.state_dict, strict=True)
        out = write_converted_bundle(args.out, model, encoding, vocab, {
            "converter": "scfoundation", "checkpoint": str(Path(args.checkpoint).resolve()), "key": args.key})
    else:
        out = save_converted(args.out, weights, source=str(args.checkpoint))
    c = weights.config
    return {"converter": "scfoundation", "source": str(args.checkpoint), "out": str(out), "key": args.key,
            "layers": c.layers, "hidden": c.hidden, "decoder_layers": c.decoder_layers,
            "decoder_hidden": c.decoder_hidden, "max_seq_len": c.max_seq_len,
            "genes": None if weights.genes is None else len(weights.genes),
            "gene_list": None if weights.genes is None or _is_bundle(args.out) else str(out.with_suffix(".genes.txt"))}


CONVERTERS: dict[str, Converter] = {
    "geneformer": Converter("Geneformer / HF BertForMaskedLM folder -> scfm BERT", _geneformer_arguments,
                            _geneformer_run),
    "scgpt": Converter("scGPT folder (best_model.pt, args.json, vocab.json) -> scfm scGPT", _scgpt_arguments,
                       _scgpt_run),
    "scfoundation": Converter("scFoundation models.ckpt (MaeAutobin) -> scfm xtrimo", _scfoundation_arguments,
                              _scfoundation_run),
}
"""Sub-commands of ``scfm-convert``; the converters themselves (``scfm.convert.*``) know no command line."""


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
