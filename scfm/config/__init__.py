"""Config checks and transforms that run before any data is read.

Public API: ``conf_dir()`` (the clone's ``conf/``), ``validate`` (``scfm.config.validate``: every rule over the
declarations of objectives, tasks, encodings, architectures and attention kernels) and ``apply_scale``
(``scfm.config.scale``: ``scale=tiny|small`` shrinks a preset).
"""

from __future__ import annotations

from pathlib import Path

from scfm.errors import ScfmInputError

__all__ = ["conf_dir"]


def conf_dir() -> str:
    """Absolute path of the repository's ``conf/`` (scfm is installed in editable mode, see README)."""
    root = Path(__file__).resolve().parents[2]  # the clone: scfm/config/__init__.py -> ../..
    conf = root / "conf"
    if not (conf / "train.yaml").is_file():
        raise ScfmInputError(f"scfm's config folder is not at {conf}",
                             fix="install scfm from a clone in editable mode: `pip install -e .` (see README)")
    return str(conf)
