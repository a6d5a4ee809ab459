"""Console entry points (Hydra apps). ``conf/`` and ``experiments/`` are found next to the package."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from scfm.config import conf_dir
from scfm.errors import ScfmInputError

__all__ = ["conf_dir", "print_summary"]


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
