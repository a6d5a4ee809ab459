"""Console entry points (Hydra apps). ``conf/`` and ``experiments/`` are found next to the package."""

from __future__ import annotations

from pathlib import Path

from scfm.errors import ScfmInputError


def conf_dir() -> str:
    """Absolute path of the repository's ``conf/`` (scfm is installed in editable mode, see README)."""
    root = Path(__file__).resolve().parents[2]
    conf = root / "conf"
    if not (conf / "train.yaml").is_file():
        raise ScfmInputError(f"scfm's config folder is not at {conf}",
                             fix="install scfm from a clone in editable mode: `pip install -e .` (see README)")
    return str(conf)
