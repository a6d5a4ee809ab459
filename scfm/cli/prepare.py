"""``scfm-prepare``: raw counts (.h5ad / 10x mtx folder / 10x .h5) -> corpus (a Hydra app).

    scfm-prepare input=a.h5ad output=corpus/
    scfm-prepare 'input=[a.h5ad,b_10x_folder]' output=corpus/ columns.cell_type=celltype
    scfm-prepare output=corpus/ verify=true          # check every file's sha256
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from scfm.cli import conf_dir
from scfm.errors import ScfmInputError


def run(cfg: DictConfig) -> Any:
    from scfm.data.corpus import Corpus
    from scfm.data.prepare import InputSpec, PrepareOptions, prepare

    if cfg.output is None:
        raise ScfmInputError("no output folder given", fix="pass output=<folder>")
    if cfg.input is None:
        if not cfg.verify:
            raise ScfmInputError("no input given", fix="pass input=<file> (or 'input=[a,b]'), or verify=true "
                                                       "to check an existing corpus")
        corpus = Corpus(cfg.output, verify=True)
        print(f"verified: {corpus} — every checksum matches the manifest")
        return corpus
    inputs = list(cfg.input) if isinstance(cfg.input, ListConfig) else [cfg.input]
    specs = [InputSpec(path=str(p), layer=cfg.layer, use_raw=cfg.use_raw, gene_id_column=cfg.gene_id_column,
                       symbol_column=cfg.symbol_column) for p in inputs]
    fields = {f for f in PrepareOptions.__dataclass_fields__}
    opts = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k in fields}
    opts["columns"] = {role: col for role, col in (opts.get("columns") or {}).items() if col is not None}
    corpus = prepare(specs, cfg.output, PrepareOptions(**opts))
    if cfg.verify:
        corpus.verify()
    print(f"wrote {corpus}")
    return corpus


@hydra.main(config_path=conf_dir(), config_name="prepare", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ScfmInputError as e:  # Hydra's job runner reports any Exception with a traceback; SystemExit passes
        raise SystemExit(f"scfm-prepare: {e}") from None


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
