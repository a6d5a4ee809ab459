"""Per-gene statistics of depth-normalised counts (count / cell total × 10,000).

``nonzero_median`` is Geneformer's normalisation factor. Two estimators share one interface:

- ``exact``: keeps every non-zero value (memory ∝ non-zeros); used for small corpora.
- ``histogram``: a fixed log-spaced histogram per gene (memory = genes × bins, independent of
  the number of cells); each middle order statistic is placed log-linearly inside its bin by rank. With
  the default 1,024 bins over 10^-3..10^6 one bin spans 2.0% in value; on PBMC 3k the relative error
  against the exact medians is 0.29% (median over genes) and 1.48% (max).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

TARGET_SUM = 10_000.0


def normalised_values(counts: np.ndarray, offsets: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """count / cell total × 10,000 for every token of a block of cells (float64)."""
    scale = TARGET_SUM / totals.astype(np.float64)
    return counts.astype(np.float64) * np.repeat(scale, np.diff(offsets))


@dataclass
class GeneStatsAccumulator:
    """Accumulate per-gene statistics over blocks of tokens; ``result()`` gives a DataFrame."""

    vocab_size: int
    method: str = "exact"
    bins: int = 1024
    log_min: float = -3.0
    log_max: float = 6.0

    def __post_init__(self) -> None:
        if self.method not in ("exact", "histogram"):
            raise ValueError(f"gene_stats method must be 'exact' or 'histogram', not {self.method!r}")
        self.n_cells = 0
        self.n_nonzero = np.zeros(self.vocab_size, dtype=np.int64)
        self.sum = np.zeros(self.vocab_size, dtype=np.float64)
        self._genes: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        if self.method == "histogram":
            self._hist = np.zeros(self.vocab_size * self.bins, dtype=np.int64)

    def update(self, gene_ids: np.ndarray, values: np.ndarray, n_cells: int) -> None:
        """Add the tokens of ``n_cells`` cells: their gene ids and normalised values."""
        self.n_cells += n_cells
        self.n_nonzero += np.bincount(gene_ids, minlength=self.vocab_size)
        self.sum += np.bincount(gene_ids, weights=values, minlength=self.vocab_size)
        if self.method == "exact":
            self._genes.append(gene_ids.astype(np.int32))
            self._values.append(values.astype(np.float64))
        else:
            key = gene_ids.astype(np.int64) * self.bins
            key += self._bin(values)
            # add.at touches only the bins that occur; bincount(minlength=vocab × bins) allocates, zeroes and
            # adds a whole vocab × bins array (268 MB for 32k genes) on every update
            np.add.at(self._hist, key, 1)

    def _bin(self, values: np.ndarray) -> np.ndarray:
        pos = np.log10(values.astype(np.float32, copy=False))
        pos -= np.float32(self.log_min)
        pos *= np.float32(self.bins / (self.log_max - self.log_min))
        np.clip(pos, 0, self.bins - 1, out=pos)
        return pos.astype(np.int64)

    def medians(self) -> np.ndarray:
        """Non-zero median per gene (NaN for genes never seen)."""
        out = np.full(self.vocab_size, np.nan)
        if self.method == "exact":
            if not self._genes:
                return out
            genes, values = np.concatenate(self._genes), np.concatenate(self._values)
            order = np.lexsort((values, genes))
            genes, values = genes[order], values[order]
            starts = np.searchsorted(genes, np.arange(self.vocab_size), side="left")
            counts = self.n_nonzero
            seen = counts > 0
            lo = starts[seen] + (counts[seen] - 1) // 2
            hi = starts[seen] + counts[seen] // 2
            out[seen] = (values[lo] + values[hi]) / 2
            return out
        # the median of an even number of values is the mean of the two middle ones (as numpy.median and
        # the exact estimator); each order statistic is placed inside its bin by rank, log-linearly.
        # Blocks of genes: the temporaries (cumsum, row copies) stay ~32 MB instead of several vocab × bins
        hist_all = self._hist.reshape(self.vocab_size, self.bins)
        step = max(1, (1 << 22) // self.bins)
        for start in range(0, self.vocab_size, step):
            hist = hist_all[start:start + step]
            cum = np.cumsum(hist, axis=1)
            n = cum[:, -1]
            rows = np.nonzero(n > 0)[0]
            if len(rows):
                h, c = hist[rows], cum[rows]  # fancy indexing copies: once for both order statistics
                lower = self._order_statistic(h, c, (n[rows] - 1) // 2)
                upper = self._order_statistic(h, c, n[rows] // 2)
                out[start + rows] = (lower + upper) / 2
        return out

    def _order_statistic(self, hist: np.ndarray, cum: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """Estimated value of rank ``rank`` (0-based) per row of a histogram."""
        b = np.argmax(cum > rank[:, None], axis=1)
        rows = np.arange(len(rank))
        below = np.where(b > 0, cum[rows, np.maximum(b - 1, 0)], 0)
        frac = (rank - below + 0.5) / hist[rows, b]
        width = (self.log_max - self.log_min) / self.bins
        return 10 ** (self.log_min + (b + frac) * width)

    def result(self) -> pd.DataFrame:
        """One row per token: ``n_nonzero``, ``nonzero_median``, ``mean`` (over all cells, zeros included)."""
        mean = self.sum / max(self.n_cells, 1)
        return pd.DataFrame({"token_id": np.arange(self.vocab_size), "n_nonzero": self.n_nonzero,
                             "nonzero_median": self.medians(), "mean": mean})
