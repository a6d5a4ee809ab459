"""Files that ship with the package (a leaf: imports nothing of scfm but its errors).

- ``RESOURCES``: the folder itself (``pbmc3k/``, ``geneformer/``).
- ``default_cache_dir()``: where built-in corpora and decompressed dictionaries go (``$SCFM_CACHE``).
- ``geneformer_dictionary(name, kind)``: Geneformer's published token dictionaries and gene medians.
"""

from __future__ import annotations

import lzma
import os
from pathlib import Path

from scfm.errors import ScfmInputError

__all__ = ["GENEFORMER_NAMES", "RESOURCES", "default_cache_dir", "geneformer_dictionary"]

RESOURCES = Path(__file__).parent
GENEFORMER_NAMES = {
    "geneformer_gc30M": ("token_dictionary_gc30M", "gene_median_dictionary_gc30M"),
    "geneformer_gc95M": ("token_dictionary_gc95M", "gene_median_dictionary_gc95M"),
}


def default_cache_dir() -> Path:
    """``$SCFM_CACHE`` or ``~/.cache/scfm``."""
    return Path(os.environ.get("SCFM_CACHE", Path.home() / ".cache" / "scfm")).expanduser()


def geneformer_dictionary(name: str, kind: str = "medians") -> Path:
    """Path of a Geneformer dictionary decompressed into the cache; ``kind`` is 'medians' or 'tokens'."""
    if name not in GENEFORMER_NAMES:
        raise ScfmInputError(f"unknown Geneformer dictionary {name!r}",
                             fix=f"use one of {sorted(GENEFORMER_NAMES)} or the path of a .json file")
    stem = GENEFORMER_NAMES[name][0 if kind == "tokens" else 1]
    out = default_cache_dir() / "geneformer" / f"{stem}.json"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.write_bytes(lzma.decompress((RESOURCES / "geneformer" / f"{stem}.json.xz").read_bytes()))
        os.replace(tmp, out)
    return out
