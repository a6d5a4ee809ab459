"""Console entry points (Hydra apps). ``conf/`` and ``experiments/`` are found next to the package."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scfm.errors import ScfmInputError


def conf_dir() -> str:
    """Absolute path of the repository's ``conf/`` (scfm is installed in editable mode, see README)."""
    root = Path(__file__).resolve().parents[2]
    conf = root / "conf"
    if not (conf / "train.yaml").is_file():
        raise ScfmInputError(f"scfm's config folder is not at {conf}",
                             fix="install scfm from a clone in editable mode: `pip install -e .` (see README)")
    return str(conf)


def print_summary(prog: str, run: Callable[[], dict[str, Any]]) -> int:
    """Call ``run``; print its summary as one JSON line and return 0, or ``prog: <error>`` on stderr and 2 on a
    :class:`ScfmInputError` (a ``main()`` tail for the one-summary-line commands)."""
    try:
        summary = run()
    except ScfmInputError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0
