"""What encodings return beside plain arrays: ``Scattered``, a per-token array given by its non-zero entries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Scattered"]


@dataclass(frozen=True)
class Scattered:
    """A flat per-token array given by the entries that are not zero: ``values`` at token positions ``index``, zero
    elsewhere, ``size`` tokens in all. ``index`` is grouped by cell, in cell order (any order within a cell).

    Encodings whose cells are mostly zeros give these (``encoding=continuous``): ``collate`` writes the entries
    straight into the batch, with no dense array in between. For ``len``, ``dtype``, slices at cell boundaries
    (``offsets``) and ``np.asarray`` it behaves as the dense array."""

    index: np.ndarray  # int64
    values: np.ndarray
    size: int

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, cells: slice) -> Scattered:
        """Tokens ``a:b``, ``a`` and ``b`` at cell boundaries (so a binary search finds them: the index is grouped
        by cell)."""
        a, b, _ = cells.indices(self.size)
        lo, hi = np.searchsorted(self.index, [a, b])
        return Scattered(self.index[lo:hi] - a, self.values[lo:hi], b - a)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.size, dtype=dtype or self.dtype)
        self.put(out)
        return out

    def put(self, out: np.ndarray) -> None:
        """Write into ``out`` (flat, ``size`` long): zeros, then the entries."""
        out.fill(0)
        out[self.index] = self.values
