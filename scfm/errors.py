"""Errors raised on bad input: each names the file, cell or gene at fault and the fix."""

from __future__ import annotations


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
