"""Console entry points (Hydra apps). ``conf/`` and ``experiments/`` are found next to the package."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from scfm.config import conf_dir
from scfm.errors import ScfmInputError

__all__ = ["conf_dir", "print_summary", "quiet_known_warnings"]


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


def quiet_known_warnings() -> None:
    """Silence third-party deprecation chatter that says nothing about the user's run."""
    import warnings

    warnings.filterwarnings("ignore", message=".*set_vital.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")  # ours is exact
    # our configure_gradient_clipping hands DeepSpeed runs to Lightning's default, so DeepSpeed clips as configured
    warnings.filterwarnings("ignore", message=".*Since DeepSpeed handles gradient clipping internally.*")
