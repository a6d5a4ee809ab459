"""Gene vocabulary: special tokens first, then genes keyed by Ensembl id (or by symbol when asked).

Stored as ``vocab.tsv`` (``token_id``, ``gene_id``, ``symbol``), never as a pickle.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scfm.errors import ScfmInputError

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<mask>", "<cls>", "<eos>")
MODALITIES: tuple[str, ...] = ("gene", "protein", "peak")
_FEATURE_TYPES = {"gene expression": "gene", "gene": "gene", "rna": "gene", "antibody capture": "protein",
                  "protein": "protein", "adt": "protein", "peaks": "peak", "peak": "peak", "atac": "peak"}


def modality_of(feature_type: object) -> str:
    """Normalise a feature type (10x ``Gene Expression`` / ``Antibody Capture`` / ``Peaks``, ...) to
    ``gene`` / ``protein`` / ``peak``; anything missing counts as ``gene``."""
    if not isinstance(feature_type, str) or not feature_type:
        return "gene"
    key = feature_type.strip().lower()
    if key not in _FEATURE_TYPES:
        raise ScfmInputError(f"unknown feature type {feature_type!r}",
                             fix=f"use one of {sorted(set(_FEATURE_TYPES))} in var['feature_type'/'modality']")
    return _FEATURE_TYPES[key]
ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def is_ensembl(ids: Iterable[object]) -> np.ndarray:
    """Boolean array: which ids look like Ensembl gene ids (``ENSG…``, ``ENSMUSG…``, optional ``.version``)."""
    return np.array([isinstance(x, str) and bool(ENSEMBL_RE.match(x)) for x in ids], dtype=bool)


def strip_version(gene_id: str) -> str:
    """``ENSG00000123.4`` -> ``ENSG00000123``."""
    return gene_id.split(".", 1)[0] if gene_id.startswith("ENS") else gene_id


@dataclass
class Vocab:
    """Token table. ``specials`` come first (ids 0..k-1); ``gene_ids[i]`` is token ``k+i``."""

    specials: tuple[str, ...]
    gene_ids: list[str]
    symbols: list[str | None] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)  # per gene: gene / protein / peak

    def __post_init__(self) -> None:
        if not self.symbols:
            self.symbols = [None] * len(self.gene_ids)
        if not self.modalities:
            self.modalities = ["gene"] * len(self.gene_ids)
        if len(self.symbols) != len(self.gene_ids):
            raise ValueError("symbols and gene_ids differ in length")
        if "<pad>" not in self.specials or self.specials[0] != "<pad>":
            raise ValueError("the first special token must be <pad> (id 0)")
        dup = pd.Index(self.gene_ids)[pd.Index(self.gene_ids).duplicated()]
        if len(dup):
            raise ScfmInputError(f"vocabulary has duplicated gene ids, e.g. {list(dup[:5])}",
                                 fix="give each gene one token")
        self._index = {g: i + len(self.specials) for i, g in enumerate(self.gene_ids)}

    # -- lookup -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.specials) + len(self.gene_ids)

    @property
    def n_special(self) -> int:
        return len(self.specials)

    def special_id(self, token: str) -> int:
        """Id of a special token such as ``<mask>``; a clear error if this vocabulary lacks it."""
        if token not in self.specials:
            raise ScfmInputError(f"vocabulary has no {token} token (it has {list(self.specials)})",
                                 fix="use a vocabulary with that token (e.g. Geneformer's gc95M for <cls>/<eos>)")
        return self.specials.index(token)

    def lookup(self, gene_ids: Sequence[object]) -> np.ndarray:
        """Token id per gene id (version suffixes ignored); -1 where the gene is not in the vocabulary."""
        return np.array([self._index.get(strip_version(g) if isinstance(g, str) else g, -1)
                         for g in gene_ids], dtype=np.int64)

    def gene_token_ids(self) -> np.ndarray:
        return np.arange(self.n_special, len(self), dtype=np.int64)

    def modality_codes(self) -> np.ndarray:
        """Per token id: index into ``MODALITIES`` (special tokens get 0, ``gene``)."""
        codes = np.zeros(len(self), dtype=np.int64)
        codes[self.n_special:] = [MODALITIES.index(m) for m in self.modalities]
        return codes

    # -- io -----------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        ids = list(self.specials) + list(self.gene_ids)
        symbols = [""] * self.n_special + ["" if s is None else str(s) for s in self.symbols]
        df = pd.DataFrame({"token_id": np.arange(len(ids)), "gene_id": ids, "symbol": symbols})
        if any(m != "gene" for m in self.modalities):  # written only for multi-modal vocabularies
            df["modality"] = [""] * self.n_special + list(self.modalities)
        return df

    def to_dict(self) -> dict[str, list[str]]:
        """Plain lists (``specials``, ``gene_ids``, ``symbols`` with "" for none, ``modalities``) for checkpoints."""
        return {"specials": list(self.specials), "gene_ids": list(self.gene_ids),
                "symbols": ["" if s is None else str(s) for s in self.symbols], "modalities": list(self.modalities)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocab:
        """The vocabulary of :meth:`to_dict`."""
        return cls(tuple(d["specials"]), list(d["gene_ids"]), [s or None for s in d.get("symbols", [])],
                   list(d.get("modalities", [])))

    def save(self, path: str | Path) -> None:
        self.to_frame().to_csv(path, sep="\t", index=False)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_frame().to_csv(sep="\t", index=False).encode()).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read ``vocab.tsv`` (scfm's) or a Geneformer token dictionary ``.json``."""
        path = Path(path)
        if not path.exists():
            raise ScfmInputError("vocabulary file not found", where=str(path),
                                 fix="give the path of a vocab.tsv or a Geneformer token dictionary .json")
        if path.suffix == ".json":
            return cls.from_token_dict(json.loads(path.read_text()), source=str(path))
        df = pd.read_csv(path, sep="\t", dtype={"gene_id": str, "symbol": str}, keep_default_na=False)
        if list(df.columns[:2]) != ["token_id", "gene_id"] or not np.array_equal(df.token_id, np.arange(len(df))):
            raise ScfmInputError("not a scfm vocab.tsv (columns token_id, gene_id, symbol with ids 0..n-1)",
                                 where=str(path), fix="write it with Vocab.save or pass a token dictionary .json")
        is_special = df.gene_id.str.match(r"^<.*>$")
        k = int(is_special.sum())
        if not is_special.iloc[:k].all():
            raise ScfmInputError("special tokens must come first", where=str(path))
        symbols = [s or None for s in df.symbol.iloc[k:]] if "symbol" in df else []
        modalities = [m or "gene" for m in df.modality.iloc[k:]] if "modality" in df else []
        return cls(tuple(df.gene_id.iloc[:k]), list(df.gene_id.iloc[k:]), symbols, modalities)

    @classmethod
    def from_token_dict(cls, token_dict: dict[str, int], source: str = "token dictionary") -> Vocab:
        """From a ``{token: id}`` mapping such as Geneformer's ``token_dictionary_gc*.json``."""
        items = sorted(token_dict.items(), key=lambda kv: kv[1])
        if [i for _, i in items] != list(range(len(items))):
            raise ScfmInputError("token ids are not 0..n-1", where=source)
        names = [t for t, _ in items]
        k = 0
        while k < len(names) and names[k].startswith("<"):
            k += 1
        return cls(tuple(names[:k]), names[k:])

    @classmethod
    def build(cls, gene_ids: Iterable[str], symbols: dict[str, str | None] | None = None,
              specials: Sequence[str] = SPECIAL_TOKENS, modalities: dict[str, str] | None = None) -> Vocab:
        """A vocabulary of the given features in sorted order, after the special tokens."""
        ids = sorted({strip_version(g) for g in gene_ids})
        symbols, modalities = symbols or {}, modalities or {}
        return cls(tuple(specials), ids, [symbols.get(g) for g in ids], [modalities.get(g, "gene") for g in ids])


def load_gene_map(path: str | Path) -> dict[str, str]:
    """Symbol -> Ensembl id table (TSV/CSV with columns ``symbol`` and ``gene_id``).

    A symbol listed with several Ensembl ids is an error: scfm never picks one silently.
    """
    path = Path(path)
    sep = "," if path.suffix == ".csv" else "\t"
    df = pd.read_csv(path, sep=sep, dtype=str)
    missing = {"symbol", "gene_id"} - set(df.columns)
    if missing:
        raise ScfmInputError(f"gene map lacks columns {sorted(missing)}", where=str(path),
                             fix="give a table with columns 'symbol' and 'gene_id'")
    df = df.dropna().drop_duplicates()
    dup = df.symbol[df.symbol.duplicated()].unique()
    if len(dup):
        raise ScfmInputError(f"{len(dup)} symbols map to several Ensembl ids, e.g. {list(dup[:5])}",
                             where=str(path), fix="keep one row per symbol in the gene map")
    return dict(zip(df.symbol, df.gene_id.map(strip_version)))
