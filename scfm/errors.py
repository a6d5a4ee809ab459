"""Errors raised on bad input: each names the file, cell or gene at fault and the fix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ScfmInputError(ValueError):
    """Bad user input (a file, a cell, a gene, a config value).

    The message always says *where* (file / cell / gene / column) and *what to do*.
    """

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        parts = [f"{where}: {what}" if where else what]
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__("\n".join(parts))
        self.where = where
        self.fix = fix


class CorruptCorpusError(ScfmInputError):
    """A corpus on disk does not match its manifest (truncated or altered shard)."""


def require_positive_ints(config: Any, names: Iterable[str], where: str) -> None:
    """Raise ``ScfmInputError`` (at ``<where>.<name>``) unless each named field of ``config`` is an int > 0."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ScfmInputError(f"{name} must be a positive integer, got {value!r}", where=f"{where}.{name}")
