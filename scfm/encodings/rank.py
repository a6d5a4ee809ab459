"""Geneformer's rank-value encoding.

A cell's value for gene g is ``count_g / cell_total × 10,000 / median_g`` (float32, as Geneformer's
tokenizer), where ``cell_total`` counts *all* input genes and ``median_g`` is the gene's non-zero median
over the corpus (or Geneformer's published medians). Genes without a median are dropped. Genes are
sorted by value, descending; **exact ties are broken by ascending token id** (Geneformer's numpy sort is
not stable, so its tie order is arbitrary). The first ``max_len`` genes are kept; the V2 layout wraps
them in ``<cls>`` … ``<eos>`` within the same ``max_len``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from scfm.errors import ScfmInputError

TARGET_SUM = np.float32(10_000.0)
_TOKEN_BITS = 17  # token ids < 131,072
_VALUE_BITS = 31  # positive float32 without its sign bit
_MAX_BLOCK_CELLS = 1 << (64 - _TOKEN_BITS - _VALUE_BITS)


def rank_values(counts: np.ndarray, total: float | np.ndarray, median: np.ndarray) -> np.ndarray:
    """Geneformer's normalised value, float32, in its order of operations."""
    return counts.astype(np.float32) / np.asarray(total, dtype=np.float32) * TARGET_SUM / median.astype(np.float32)


def rank_encode_block(gene_ids: np.ndarray, counts: np.ndarray, offsets: np.ndarray, totals: np.ndarray,
                      median: np.ndarray, max_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-encode a block of cells (CSR-like: cell i is ``[offsets[i], offsets[i+1])``).

    ``median`` is indexed by token id (NaN or <= 0 = no median: the gene is dropped). Returns the ranked,
    truncated token ids and their offsets. One sort over the whole block: the key packs
    (cell, descending value bits, token id) into 64 bits, so the order is fully determined.
    """
    n_cells = len(offsets) - 1
    if n_cells > _MAX_BLOCK_CELLS:
        raise ValueError(f"blocks hold at most {_MAX_BLOCK_CELLS} cells")
    if len(median) > 1 << _TOKEN_BITS:
        raise ValueError(f"token ids must be < {1 << _TOKEN_BITS}")
    med = median[gene_ids].astype(np.float32, copy=False)
    keep = med > 0  # NaN compares False
    n_tokens = np.diff(offsets)
    cell = np.repeat(np.arange(n_cells, dtype=np.uint64) << np.uint64(_VALUE_BITS + _TOKEN_BITS), n_tokens)
    totals_tok = np.repeat(np.asarray(totals, dtype=np.float32), n_tokens)
    lengths = n_tokens
    if not keep.all():
        gene_ids, counts, med, cell, totals_tok = (a[keep] for a in (gene_ids, counts, med, cell, totals_tok))
        kept_before = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(keep, out=kept_before[1:])
        lengths = np.diff(kept_before[offsets])
    values = counts.astype(np.float32)  # rank_values, in place: the same float32 operations in the same order
    values /= totals_tok
    values *= TARGET_SUM
    values /= med
    key = values.view(np.uint32).astype(np.uint64)  # in place from here: fewer block-sized temporaries
    np.subtract(np.uint64((1 << _VALUE_BITS) - 1), key, out=key)
    key <<= np.uint64(_TOKEN_BITS)
    key |= cell
    key |= gene_ids.astype(np.uint64)
    key.sort()  # keys are unique, so sorting them gives the order; the token id is in their low bits
    ranked = (key & np.uint64((1 << _TOKEN_BITS) - 1)).astype(gene_ids.dtype)
    starts = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    kept = np.minimum(lengths, max_genes)
    if (kept < lengths).any():
        rank_in_cell = np.arange(len(ranked)) - np.repeat(starts[:-1], lengths)
        ranked = ranked[rank_in_cell < np.repeat(kept, lengths)]
    out_offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(kept, out=out_offsets[1:])
    return ranked, out_offsets


def load_gene_medians(source: str, corpus) -> np.ndarray:
    """Median per token id: from the corpus's gene_stats, or from a Geneformer ``{ensembl: median}`` json."""
    vocab = corpus.vocab
    if source == "corpus":
        stats = corpus.gene_stats
        median = np.full(len(vocab), np.nan)
        median[stats.token_id.to_numpy()] = stats.nonzero_median.to_numpy()
        median[: vocab.n_special] = np.nan
        return median.astype(np.float32)
    path = Path(source)
    if not path.is_file():
        from scfm.resources import geneformer_dictionary

        path = geneformer_dictionary(source)
    return medians_from_table(json.loads(path.read_text()), vocab, str(path))


def medians_from_table(table: dict[str, float], vocab, where: str) -> np.ndarray:
    """Median per token id of ``vocab`` from a ``{gene id: median}`` table (NaN for genes it lacks)."""
    median = np.full(len(vocab), np.nan)
    tokens = vocab.lookup(list(table))
    found = tokens >= 0
    median[tokens[found]] = np.fromiter(table.values(), dtype=np.float64)[found]
    if not found.any():
        raise ScfmInputError("no gene of the median table is in the vocabulary", where=where,
                             fix="use the medians that match the vocabulary (Ensembl ids)")
    median[: vocab.n_special] = np.nan
    return median.astype(np.float32)


@dataclass
class RankEncoding:
    """Encoding ``rank`` (Geneformer). ``layout='v1'``: genes only; ``'v2'``: ``<cls>`` genes ``<eos>``."""

    max_len: int = 2048
    layout: str = "v1"
    gene_medians: str = "corpus"
    kind: ClassVar[str] = "rank"  # what objectives and architectures declare they read

    def __post_init__(self) -> None:
        if self.layout not in ("v1", "v2"):
            raise ScfmInputError(f"encoding.layout must be 'v1' or 'v2', not {self.layout!r}")
        if self.max_len < 1 + 2 * (self.layout == "v2"):
            raise ScfmInputError(f"encoding.max_len={self.max_len} is too small")

    @property
    def n_specials(self) -> int:
        return 2 if self.layout == "v2" else 0

    @property
    def max_genes(self) -> int:
        return self.max_len - self.n_specials

    def bind(self, corpus) -> RankEncoding:
        """Attach the corpus's vocabulary and gene medians (call once, before iterating)."""
        self.bind_arrays(corpus.vocab, {"gene_medians": load_gene_medians(self.gene_medians, corpus)})
        stats = corpus.gene_stats  # every gene of the corpus has a median: lengths need only n_genes
        present = stats.token_id.to_numpy()[stats.n_nonzero.to_numpy() > 0]
        self._all_have_median = bool((self.median[present] > 0).all())
        return self

    def bound_arrays(self) -> dict[str, np.ndarray]:
        """What :meth:`bind` took from the corpus, per token id: ``gene_medians`` (NaN where none)."""
        return {"gene_medians": self.median}

    def bind_arrays(self, vocab, arrays: dict[str, np.ndarray]) -> RankEncoding:
        """Bind to ``vocab`` with the arrays of :meth:`bound_arrays` (a model bundle's, no corpus needed)."""
        self.median = np.asarray(arrays["gene_medians"], dtype=np.float32)
        if len(self.median) != len(vocab):
            raise ScfmInputError(f"gene medians for {len(self.median)} tokens, vocabulary of {len(vocab)}",
                                 where="encoding=rank", fix="use the medians saved with this vocabulary")
        self._all_have_median = False  # lengths() then checks each cell's genes
        if self.layout == "v2":
            self.cls_id = vocab.special_id("<cls>")
            self.eos_id = vocab.special_id("<eos>")
        return self

    def lengths(self, shard) -> np.ndarray:
        """Encoded length of every cell of a shard (cheap: no sorting)."""
        if getattr(self, "_all_have_median", False):
            return np.minimum(shard.n_genes, self.max_genes) + self.n_specials
        has_median = (self.median > 0)[np.asarray(shard.gene_ids)]
        n = np.add.reduceat(has_median.astype(np.int64), np.asarray(shard.offsets[:-1])) if len(has_median) else 0
        n = np.where(shard.n_genes > 0, n, 0)
        return np.minimum(n, self.max_genes) + self.n_specials

    def encode(self, gene_ids: np.ndarray, counts: np.ndarray, offsets: np.ndarray, totals: np.ndarray,
               cell_seeds: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Encode a block of cells; returns flat ``gene_ids`` and their ``offsets``."""
        ranked, out_offsets = rank_encode_block(gene_ids, counts, offsets, totals, self.median, self.max_genes)
        if self.layout == "v2":
            n = len(out_offsets) - 1
            lengths = np.diff(out_offsets) + 2
            offsets2 = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets2[1:])
            tokens = np.empty(offsets2[-1], dtype=ranked.dtype)
            body = np.ones(len(tokens), dtype=bool)
            body[offsets2[:-1]] = False
            body[offsets2[1:] - 1] = False
            tokens[body] = ranked
            tokens[offsets2[:-1]] = self.cls_id
            tokens[offsets2[1:] - 1] = self.eos_id
            ranked, out_offsets = tokens, offsets2
        return {"gene_ids": ranked, "offsets": out_offsets}
