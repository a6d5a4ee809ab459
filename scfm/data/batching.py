"""Batching strategies: which cells go together (a plan of indices), and how they are laid out.

Planning uses only cell lengths, so a resumed run can replay an epoch's plan cheaply and skip the batches
already consumed without reading or encoding any cell.

- ``random``: consecutive cells of the shuffled stream; padded to the longest cell of the batch.
- ``length_grouped``: Geneformer's megabatches (HF ``LengthGroupedSampler``): take ``megabatch`` batches'
  worth of cells, sort them by length descending, cut into batches; each megabatch starts with its
  longest batch, and the epoch starts with the megabatch holding the longest cell, so an out-of-memory
  shows at once.
- ``packed``: whole cells concatenated into sequences of at most ``token_budget`` tokens (first-fit
  decreasing within a window of cells), laid out with ``cu_seqlens`` / ``doc_ids`` and no padding.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch
from tensordict import TensorDict

from scfm.encodings.tokens import Scattered
from scfm.errors import ScfmInputError

STRATEGIES = ("random", "length_grouped", "packed")


@dataclass
class Batching:
    """Config group ``batching``: strategy and sizes."""

    strategy: str = "random"
    batch_size: int = 12
    megabatch: int = 50  # length_grouped: batches per megabatch (HF's mega_batch_mult default)
    token_budget: int | None = None  # packed: tokens per sequence (default batch_size × encoding max_len)
    pack_window: int = 4096  # packed: cells considered together by first-fit decreasing
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ScfmInputError(f"batching.strategy must be one of {STRATEGIES}, not {self.strategy!r}")
        if self.batch_size < 1 or self.megabatch < 1:
            raise ScfmInputError("batching.batch_size and batching.megabatch must be >= 1")

    def budget(self, max_len: int) -> int:
        return int(self.token_budget or self.batch_size * max_len)

    def n_batches(self, n_cells: int) -> int:
        """Number of batches ``plan`` yields for ``n_cells`` cells (``random`` and ``length_grouped``)."""
        whole, rest = divmod(n_cells, self.batch_size)
        if self.strategy == "random":
            return whole + (rest > 0 and not self.drop_last)
        mega = self.batch_size * self.megabatch
        full, last = divmod(n_cells, mega)
        tail = last // self.batch_size + (last % self.batch_size > 0 and not self.drop_last)
        return full * self.megabatch + tail

    def plan(self, cells: np.ndarray, lengths: np.ndarray, max_len: int) -> Iterator[np.ndarray]:
        """Yield arrays of positions into ``cells`` (one per batch), in the order they are served."""
        n = len(cells)
        if self.strategy == "random":
            for lo in range(0, n, self.batch_size):
                if self.drop_last and lo + self.batch_size > n:
                    return
                yield np.arange(lo, min(lo + self.batch_size, n))
        elif self.strategy == "length_grouped":
            yield from self._length_grouped(lengths)
        else:
            yield from self._packed(lengths, self.budget(max_len))

    def _length_grouped(self, lengths: np.ndarray) -> Iterator[np.ndarray]:
        size = self.batch_size * self.megabatch
        megas = [np.arange(lo, min(lo + size, len(lengths))) for lo in range(0, len(lengths), size)]
        megas = [m[np.argsort(-lengths[m], kind="stable")] for m in megas]
        if len(megas) > 1:  # serve the megabatch with the longest cell first
            first = int(np.argmax([lengths[m[0]] for m in megas]))
            megas.insert(0, megas.pop(first))
        for m in megas:
            for lo in range(0, len(m), self.batch_size):
                if self.drop_last and lo + self.batch_size > len(m):
                    break
                yield m[lo:lo + self.batch_size]

    def _packed(self, lengths: np.ndarray, budget: int) -> Iterator[np.ndarray]:
        for lo in range(0, len(lengths), self.pack_window):
            window = np.arange(lo, min(lo + self.pack_window, len(lengths)))
            order = window[np.argsort(-lengths[window], kind="stable")]
            room = np.zeros(len(order), dtype=np.int64)  # at most one bin per cell
            assign = np.empty(len(order), dtype=np.int64)
            n_bins = 0
            for j, need in enumerate(np.minimum(lengths[order], budget)):
                b = int(np.argmax(room[:n_bins] >= need)) if n_bins else 0
                if n_bins == 0 or room[b] < need:
                    b, n_bins = n_bins, n_bins + 1
                    room[b] = budget
                room[b] -= need
                assign[j] = b
            by_bin = np.argsort(assign, kind="stable")
            bounds = np.searchsorted(assign[by_bin], np.arange(n_bins + 1))
            for b in range(n_bins):
                yield np.sort(order[by_bin[bounds[b]:bounds[b + 1]]])


def collate(encoded: dict[str, Any], strategy: str, pad_id: int = 0) -> TensorDict:
    """Lay out a block of encoded cells as a padded or packed batch.

    ``encoded`` holds flat per-token arrays (``gene_ids`` and any others, e.g. ``values``), their
    ``offsets`` [B+1], ``cell``: a dict of per-cell arrays (length B: ``cell_index``, labels, ...), and optionally
    ``rows``: per-token arrays the same in every cell, given once ([L]; every cell then has length L, e.g.
    ``encoding=continuous``'s ``gene_ids``).
    Padded: every per-token key becomes [B, L], plus ``positions`` [B, L] and ``padding_mask`` [B, L]
    (True = real token). Rows (and with them ``positions`` and ``padding_mask``) are laid out once, [1, L], and
    the batch holds them as stride-0 [B, L] views (``as_batch``; ``batch_to`` moves them to a device as one row).
    Packed: [1, T] (rows repeated per cell), plus ``positions`` [1, T], ``doc_ids`` [1, T], ``cu_seqlens`` [B+1]
    int32. Per-cell arrays pass through as [B].
    """
    return as_batch(collate_arrays(encoded, strategy, pad_id))


def as_batch(arrays: dict[str, np.ndarray]) -> TensorDict:
    """A batch (``TensorDict``) of the given arrays, sharing their memory. In a padded batch of B != 1 cells, a
    [1, L] array is a row every cell shares (``collate``): it becomes a stride-0 [B, L] view."""
    n = len(arrays["lengths"]) if "padding_mask" in arrays else 1
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    if n != 1:
        tensors = {k: t.expand(n, -1) if t.dim() == 2 and t.shape[0] == 1 else t for k, t in tensors.items()}
    return TensorDict(tensors, batch_size=[])


def batch_to(batch: TensorDict, device: torch.device | str, non_blocking: bool = False) -> TensorDict:
    """``batch.to(device)``, except that a stride-0 [B, L] row (``as_batch``) travels as one row and is expanded
    there: ``Tensor.to`` would first write it out B times in this process (``encoding=continuous``: ~2/3 of a
    batch's bytes)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        if is_shared_row(t):
            return t[:1].to(device, non_blocking=non_blocking).expand_as(t)
        return t.to(device, non_blocking=non_blocking)

    return TensorDict({k: move(t) for k, t in batch.items()}, batch_size=batch.batch_size, device=None)


def is_shared_row(t: torch.Tensor) -> bool:
    """Whether a batch tensor is a row every cell shares: a stride-0 [B, L] view (``as_batch``)."""
    return t.dim() == 2 and t.shape[0] > 1 and t.stride(0) == 0


def batch_layout(encoded: dict[str, Any], strategy: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Key → (shape, dtype) of each array ``collate_arrays`` lays out, in the batch's key order."""
    bounds = np.asarray(encoded["offsets"]).tolist()  # a batch's few cells: Python's ints are the cheapest here
    n, total = len(bounds) - 1, bounds[-1]
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    token_keys = _token_keys(encoded)
    for k in token_keys:
        if len(encoded[k]) != total:
            raise ValueError(f"encoding output {k!r} has {len(encoded[k])} entries for {total} tokens")
    rows = encoded.get("rows", {})
    for k, row in rows.items():
        if any(m != len(row) for m in lengths):
            raise ValueError(f"encoding output rows[{k!r}] has {len(row)} entries but cells have {set(lengths)} tokens")
    grid = (1, total) if strategy == "packed" else (n, max(lengths, default=0))
    row_grid = (1, grid[1]) if strategy != "packed" else grid  # padded: laid out once (``collate``)
    layout = {k: (grid, _batch_dtype(encoded[k].dtype)) for k in token_keys}
    layout |= {k: (row_grid, _batch_dtype(row.dtype)) for k, row in rows.items()}
    layout["positions"] = (row_grid if rows else grid, np.dtype(np.int64))
    if strategy == "packed":
        layout["doc_ids"] = (grid, np.dtype(np.int64))
        layout["cu_seqlens"] = ((n + 1,), np.dtype(np.int32))
    else:
        layout["padding_mask"] = (row_grid if rows else grid, np.dtype(np.bool_))
    layout["lengths"] = ((n,), np.dtype(np.int64))
    for k, v in encoded.get("cell", {}).items():
        v = np.asarray(v)
        layout[k] = (v.shape, v.dtype)
    return layout


def token_bytes(encoded: dict[str, Any], strategy: str) -> int:
    """Bytes ``collate`` lays out per token of a batch of ``encoded`` (rows every cell shares, per-cell arrays and
    ``cu_seqlens`` are not per token)."""
    layout = batch_layout(encoded, strategy)
    rows = set(encoded.get("rows", {})) if strategy != "packed" else set()
    not_per_token = {*encoded.get("cell", {}), "lengths", "cu_seqlens"} | rows
    if rows:
        not_per_token |= {"positions", "padding_mask"}
    return sum(dtype.itemsize for k, (_, dtype) in layout.items() if k not in not_per_token)


def collate_arrays(encoded: dict[str, Any], strategy: str, pad_id: int = 0,
                   out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``collate`` as numpy arrays (the batch's keys, shapes and dtypes, before they become tensors). ``out``: arrays
    of ``batch_layout`` to write into (e.g. views of a shared-memory buffer), instead of new ones."""
    fresh = out is None
    if fresh:
        out = {k: np.empty(shape, dtype) for k, (shape, dtype) in batch_layout(encoded, strategy).items()}
    offsets = np.asarray(encoded["offsets"])
    lengths = offsets[1:] - offsets[:-1]
    n = len(lengths)
    token_keys = _token_keys(encoded)
    rows = encoded.get("rows", {})
    for k, row in rows.items():
        out[k].reshape(-1, len(row))[:] = row  # padded: once; packed: once per cell
    if strategy == "packed":
        for k in token_keys:
            _put(out[k][0], encoded[k])
        positions = out["positions"][0]
        positions[:] = np.arange(len(positions))
        positions -= np.repeat(offsets[:-1], lengths)
        out["doc_ids"][0] = np.repeat(np.arange(n), lengths)
        out["cu_seqlens"][:] = offsets
    else:
        width = out["positions"].shape[1]
        full = n > 0 and bool((lengths == width).all())  # e.g. encoding=continuous: nothing to pad
        for k in token_keys:
            if full and fresh and not isinstance(encoded[k], Scattered):  # no copy when the dtype is the batch's
                out[k] = np.ascontiguousarray(encoded[k], dtype=out[k].dtype).reshape(n, width)
            elif full:
                _put(out[k].reshape(-1), encoded[k])
            else:
                tokens = np.asarray(encoded[k])
                if not (tokens.dtype.kind in "iub" or tokens.dtype in _FLOATS) or not tokens.dtype.isnative:
                    tokens = tokens.astype(out[k].dtype)  # e.g. float16, big-endian: as numpy would cast them
                _pad_rows(out[k], tokens, offsets, pad_id if k == "gene_ids" else 0)
        if full or not n:  # [B, L], or [1, L] with rows
            out["padding_mask"][:] = True
            out["positions"][:] = np.arange(width)
        else:
            _mask_positions(out["padding_mask"], out["positions"], offsets)
    out["lengths"][:] = lengths
    for k, v in encoded.get("cell", {}).items():
        out[k][...] = v
    return out


_U = np.uint64  # kernels index through an unsigned integer: numba then skips its negative-index wraparound


@numba.njit(cache=True, nogil=True)
def _pad_rows(out: np.ndarray, tokens: np.ndarray, offsets: np.ndarray, pad: int) -> None:
    """Row c of ``out`` [B, L] = cell c's tokens (``tokens[offsets[c]:offsets[c + 1]]``), then ``pad``. One pass,
    where numpy's fill and boolean-mask assignment cost ~3x as much (``encoding=bin``: ~9 µs per cell)."""
    if len(offsets) <= out.shape[0]:
        raise ValueError("collate: fewer cell offsets than rows in the batch")
    for c in range(out.shape[0]):
        a, m, row = offsets[c], offsets[c + 1] - offsets[c], out[c]
        if a < 0 or m < 0 or m > len(row) or a + m > len(tokens):
            raise ValueError("collate: cell offsets must ascend from 0 and fit the tokens and the batch's width")
        for j in range(m):
            row[_U(j)] = tokens[_U(a + j)]
        for j in range(m, len(row)):
            row[_U(j)] = pad


@numba.njit(cache=True, nogil=True)
def _mask_positions(mask: np.ndarray, positions: np.ndarray, offsets: np.ndarray) -> None:
    """``padding_mask`` (True: a real token) and ``positions`` (0 on padding) of a padded batch, in one pass."""
    if len(offsets) <= mask.shape[0] or mask.shape != positions.shape:
        raise ValueError("collate: the batch's mask and positions do not match its cells")
    for c in range(mask.shape[0]):
        m, mask_row, position_row = offsets[c + 1] - offsets[c], mask[c], positions[c]
        for j in range(len(mask_row)):
            mask_row[_U(j)] = j < m
            position_row[_U(j)] = j if j < m else 0


def compile_kernels() -> None:
    """Compile (or load from numba's cache) the layout kernels for the usual dtypes, in the process that forks the
    loader workers: they inherit the machine code instead of each loading it at every epoch."""
    offsets = np.array([0, 1], dtype=np.int64)
    for out_dtype, token_dtypes in ((np.int64, (np.int64, np.int32)), (np.float32, (np.float32,)),
                                    (np.bool_, (np.bool_,))):
        for token_dtype in token_dtypes:
            _pad_rows(np.zeros((1, 2), out_dtype), np.zeros(1, token_dtype), offsets, 0)
    _mask_positions(np.zeros((1, 2), np.bool_), np.zeros((1, 2), np.int64), offsets)


def _put(out: np.ndarray, tokens: np.ndarray | Scattered) -> None:
    """Write a flat per-token array into ``out`` (flat)."""
    if isinstance(tokens, Scattered):
        tokens.put(out)
    else:
        out[:] = tokens


def _token_keys(encoded: dict[str, Any]) -> list[str]:
    """The flat per-token arrays of an encoding output (not ``offsets``, ``cell`` or ``rows``)."""
    return [k for k in encoded if k not in ("offsets", "cell", "rows")]


_DTYPES = {"i": np.dtype(np.int64), "u": np.dtype(np.int64), "b": np.dtype(np.bool_)}
_FLOAT32 = np.dtype(np.float32)
_FLOATS = (_FLOAT32, np.dtype(np.float64))  # token dtypes the layout kernels read as they are


def _batch_dtype(dtype: np.dtype) -> np.dtype:
    """The batch dtype of an encoding output: integers int64, booleans bool, everything else float32."""
    return _DTYPES.get(dtype.kind, _FLOAT32)
