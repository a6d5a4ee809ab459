"""``CellStream``: an ``IterableDataset`` that streams encoded, batched cells from corpus shards.

Order of an epoch, a pure function of (seed, epoch, rank, worker):

1. shards are cut into chunks of ``chunk_cells`` consecutive cells; training shuffles the chunk list;
2. the cells of the split (train / val) are divided into equal contiguous shares, one per rank
   (remainder dropped so every rank serves the same number of cells), then one per loader worker;
3. training permutes cells within windows of ``buffer_cells`` (a shuffle buffer that keeps reads local);
4. the batching strategy groups cells into batches from their encoded lengths alone.

Because the plan needs only lengths, ``state_dict`` is just (epoch, batches served): a resumed run
replays the plan and skips the served batches without reading them, then continues at the exact cell.

Hand-over: consecutive batches are read and encoded as one block. In one process they are yielded one by one;
a loader worker of the DataModule lays a block's batches out in one shared-memory buffer (``SharedBatches``,
from a reused ``BufferPool``) and sends it as one message, which the DataModule's loader serves batch by batch.
Across workers, batches then interleave message by message.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import IterableDataset, get_worker_info

from scfm.data.batching import Batching, as_batch, batch_layout, collate, collate_arrays, compile_kernels, token_bytes
from scfm.data.corpus import Corpus
from scfm.errors import ScfmInputError

_BLOCK_TOKENS = 1 << 18  # consecutive batches up to this many stored (non-zero) tokens are read and encoded together,
_BLOCK_ENCODED = 1 << 22  # and up to this many encoded tokens (encoding=continuous: ~200 cells).
# Encodings are vectorised over a block: ~100 numpy calls of fixed cost per block, amortised over its cells.
MESSAGE_BYTES = 1 << 24  # default: a loader worker sends batches in messages of up to this many bytes (16 MiB);
# batches of batch_size 12 at the papers' lengths: bin 40 per message, rank 40, continuous 7


_POOL = 6  # shared-memory buffers per loader worker, reused once the main process has dropped their batches


class BufferPool:
    """A loader worker's shared-memory buffers, reused rather than allocated per message: a fresh buffer costs a page
    fault per 4 KB page written (~2 µs each; ~0.25 ms per batch of ``encoding=bin``) and a file to create.

    ``in_use[worker, slot]`` lies in memory shared with the main process: the worker sets it when it sends a buffer,
    the main process clears it once every batch cut from that buffer is garbage collected (``SharedBatches.batches``).
    When no slot is free (e.g. the training loop keeps batches), a message gets a buffer of its own."""

    def __init__(self, in_use: torch.Tensor, worker: int) -> None:
        self.flags = in_use[worker].numpy()
        self.buffers: list[torch.Tensor | None] = [None] * len(self.flags)

    def take(self, size: int) -> tuple[torch.Tensor, int]:
        """A buffer of at least ``size`` bytes and its slot (-1: not pooled)."""
        free = np.flatnonzero(~self.flags)
        if not len(free):
            return _shared_buffer(size), -1
        slot = int(free[0])
        if self.buffers[slot] is None or self.buffers[slot].numel() < size:
            self.buffers[slot] = _shared_buffer(size + size // 4)  # room for somewhat bigger messages
        self.flags[slot] = True
        return self.buffers[slot], slot


def _shared_buffer(size: int) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(size, 1)))


def _release(in_use: torch.Tensor, worker: int, slot: int) -> None:
    in_use[worker, slot] = False


class SharedBatches:
    """Consecutive batches of one loader worker, laid out in one shared-memory buffer.

    A worker sends one of these per ``message_bytes`` of batches instead of one batch at a time: one
    file-descriptor hand-over (~0.5 ms) and one round of the loader's per-item bookkeeping (~0.3 ms) serve ~10
    batches, and the main process copies nothing: ``batches()`` cuts tensor views out of the buffer."""

    def __init__(self, parts: list[dict[str, Any]], strategy: str, worker: int, pool: BufferPool | None = None) -> None:
        """Lay out each encoded part (``collate_arrays``) straight into the buffer."""
        self.specs: list[list[tuple[str, str, tuple[int, ...], int]]] = []  # (key, dtype, shape, start)
        size = 0
        for part in parts:
            spec = []
            for key, (shape, dtype) in batch_layout(part, strategy).items():
                spec.append((key, dtype.str, shape, size))
                size += -(-math.prod(shape) * dtype.itemsize // 64) * 64  # 64-byte aligned
            self.specs.append(spec)
        self.buffer, self.slot = pool.take(size) if pool is not None else (_shared_buffer(size), -1)
        for part, views in zip(parts, self._views()):
            collate_arrays(part, strategy, out=views)
        self.worker = worker

    def __len__(self) -> int:
        return len(self.specs)

    def batches(self, in_use: torch.Tensor | None = None) -> Iterator[Any]:
        """The batches (``TensorDict``), as views of the buffer; with ``in_use`` (the pool's flags), the buffer's slot
        is released when the last of them is garbage collected."""
        for views in self._views(in_use):
            yield as_batch(views)

    def _views(self, in_use: torch.Tensor | None = None) -> Iterator[dict[str, np.ndarray]]:
        flat = self.buffer.numpy()
        if in_use is not None and self.slot >= 0:
            weakref.finalize(flat, _release, in_use, self.worker, self.slot)  # every view's base is ``flat``
        for spec in self.specs:
            yield {key: np.ndarray(shape, dtype, flat, start) for key, dtype, shape, start in spec}


CONDITIONS = ("cell_type", "batch", "perturbation", "modality")


class CellStream(IterableDataset):
    """Streams batches (``TensorDict``) of one split of a corpus; see the module docstring.

    ``conditions`` adds condition tokens: per cell ``cell_type`` / ``batch`` / ``perturbation`` label ids
    (indices into ``corpus.labels[role]``, -1 where missing), per token ``modality`` (0 gene, 1 protein,
    2 peak, from the vocabulary) and, with ``perturbation``, per token ``perturbed`` (the cell's target gene).
    """

    def __init__(self, corpus: Corpus, encoding: Any, batching: Batching, split: str = "train",
                 val_fraction: float = 0.1, split_column: str | None = None, seed: int = 0,
                 shuffle: bool | None = None, chunk_cells: int = 256, buffer_cells: int = 8192,
                 world_size: int = 1, rank: int = 0, conditions: Sequence[str] = (),
                 message_bytes: int = MESSAGE_BYTES) -> None:
        if split not in ("train", "val", "test"):
            raise ScfmInputError(f"split must be train, val or test, not {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ScfmInputError(f"val_fraction must be in [0, 1), not {val_fraction}")
        self.corpus, self.encoding, self.batching = corpus, encoding, batching
        self.split, self.val_fraction, self.split_column = split, val_fraction, split_column
        self.seed, self.shuffle = seed, (split == "train") if shuffle is None else shuffle
        self.chunk_cells, self.buffer_cells = chunk_cells, buffer_cells
        self.world_size, self.rank = world_size, rank
        if message_bytes < 1:
            raise ScfmInputError(f"data.message_bytes={message_bytes} must be >= 1")
        self.message_bytes = message_bytes  # per loader-worker message (see ``SharedBatches``)
        self.num_workers = 0  # set by the DataModule; used only by __len__
        self.send_shared = False  # True: loader workers yield ``SharedBatches`` (the DataModule's loader splits them)
        self.unserved: dict[int, int] = {}  # set by that loader on resume: per worker, batches to serve again
        self.in_use: torch.Tensor | None = None  # set by that loader: the flags of the workers' ``BufferPool`` s
        self.epoch = 0
        self._served = 0  # batches served in the current epoch by this consumer
        self._skip = 0  # batches to skip on the next iteration (set by load_state_dict)
        self._member_index: dict[int, np.ndarray] = {}
        self.conditions = tuple(conditions)
        self._check_conditions()
        self._codes: dict[tuple[int, str], np.ndarray] = {}
        self._lengths: dict[int, np.ndarray] = {}
        self._fewest_packs: dict[tuple[int, int], int] = {}
        if split_column is not None and "split" not in corpus.columns:
            raise ScfmInputError(f"split_column={split_column!r} but the corpus has no 'split' column "
                                 f"(its label columns: {corpus.columns})",
                                 where=str(corpus.path), fix="prepare with columns.split=<obs column>, "
                                                             "or leave split_column unset to split by cell id")
        if batching.strategy != "packed":
            compile_kernels()  # here, in the process that forks the loader workers (they inherit the machine code)

    # -- condition tokens ------------------------------------------------------------------------
    def _check_conditions(self) -> None:
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown:
            raise ScfmInputError(f"unknown condition(s) {unknown}", where="data.conditions",
                                 fix=f"choose from {list(CONDITIONS)}")
        missing = [c for c in self.conditions if c != "modality" and c not in self.corpus.columns]
        if missing:
            raise ScfmInputError(f"condition(s) {missing} were not declared when the corpus was prepared "
                                 f"(its label columns: {self.corpus.columns or 'none'})", where=str(self.corpus.path),
                                 fix="prepare with columns.<role>=<obs column> (e.g. columns.batch=sample), "
                                     "or drop them from data.conditions")
        if "modality" in self.conditions:
            self._modality_codes = self.corpus.vocab.modality_codes()
        if "perturbation" in self.conditions:
            vocab = self.corpus.vocab
            values = self.corpus.labels["perturbation"]
            by_id = vocab.lookup(values)
            by_symbol = {s: i + vocab.n_special for i, s in enumerate(vocab.symbols) if s}
            self._target_token = np.array([t if t >= 0 else by_symbol.get(v, -1) for v, t in zip(values, by_id)],
                                          dtype=np.int64)

    def label_codes(self, shard: int, role: str) -> np.ndarray:
        """Per cell of a shard: index of its ``role`` label in ``corpus.labels[role]``; -1 where missing."""
        if (shard, role) not in self._codes:
            col = self.corpus.obs(shard, columns=[role])[role]
            codes = pd.Categorical(col, categories=self.corpus.labels[role]).codes.astype(np.int64)
            self._codes[(shard, role)] = codes
        return self._codes[(shard, role)]

    def _add_conditions(self, encoded: dict[str, Any], shards: np.ndarray, cells: np.ndarray) -> None:
        cell = encoded.setdefault("cell", {})
        rows = encoded.get("rows", {})
        for role in self.conditions:
            if role == "modality":
                if "gene_ids" in rows:  # the same genes in every cell: one row
                    rows["modality"] = self._modality_codes[rows["gene_ids"]]
                else:
                    encoded["modality"] = self._modality_codes[encoded["gene_ids"]]
                continue
            codes = _gather_per_shard(lambda shard, role=role: self.label_codes(shard, role), shards, cells)
            cell[role] = codes
            if role == "perturbation":  # per token: is this gene the cell's perturbed gene?
                target = np.where(codes >= 0, self._target_token[np.maximum(codes, 0)], -1)
                per_token = np.repeat(target, np.diff(encoded["offsets"]))
                genes = np.tile(rows["gene_ids"], len(codes)) if "gene_ids" in rows else encoded["gene_ids"]
                encoded["perturbed"] = (genes == per_token) & (per_token >= 0)

    # -- epoch and state -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self._served, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ScfmInputError(f"resuming a stream with seed {self.seed} from a state with seed {state['seed']}",
                                 fix="resume with the same data.seed as the checkpointed run")
        self.epoch, self._skip = int(state["epoch"]), int(state["batches"])
        worker = get_worker_info()
        if worker is not None:  # a loader worker: batches of its last message the main process had not served
            self._skip -= self.unserved.get(worker.id, 0)
        self._served = self._skip  # a state taken before the first batch (the loader records one at once)

    # -- plan ------------------------------------------------------------------------------------
    def members(self, shard: int) -> np.ndarray:
        """Boolean mask of the shard's cells that belong to this split (read from the shard's obs table)."""
        if self.split_column is not None:
            col = self.corpus.obs(shard, columns=["split"])["split"].astype(str).to_numpy()
            return col == self.split
        key = self.corpus.obs(shard, columns=["split_key"])["split_key"].to_numpy()
        is_val = key < self.val_fraction
        return is_val if self.split == "val" else ~is_val

    def member_index(self, shard: int) -> np.ndarray:
        """Positions (ascending) of the shard's cells that belong to this split (``members``, read once)."""
        if shard not in self._member_index:
            self._member_index[shard] = np.flatnonzero(self.members(shard))
        return self._member_index[shard]

    def lengths(self, shard: int) -> np.ndarray:
        if shard not in self._lengths:
            self._lengths[shard] = np.asarray(self.encoding.lengths(self.corpus.shard(shard)), dtype=np.int64)
        return self._lengths[shard]

    def read_shard_facts(self) -> None:
        """Read what every epoch's plan needs of every shard (split membership, encoded lengths) now. The DataModule's
        loader calls this before it forks its workers, which inherit the result: each worker would otherwise read it
        again at every epoch (~0.2 s per worker on 100k cells: obs tables, a pass over the counts)."""
        for shard in range(self.corpus.n_shards):
            self.member_index(shard)
            self.lengths(shard)

    def consumer(self) -> tuple[int, int]:
        """(index, count) of this reader among all ranks × loader workers."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def cell_order(self, epoch: int, consumer: int, n_consumers: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, index-in-shard) of the cells this consumer serves in ``epoch``, in order."""
        sizes = [int(n) for n in self.corpus.shard_sizes]
        n_chunks = [-(-n // self.chunk_cells) for n in sizes]
        chunk_shard = np.repeat(np.arange(len(sizes)), n_chunks)
        chunk_lo = np.concatenate([np.arange(0, n, self.chunk_cells) for n in sizes]) if sizes else chunk_shard
        # a chunk's members: a range of its shard's member positions (ascending), from two binary searches
        first_member, counts = np.empty(len(chunk_lo), np.int64), np.empty(len(chunk_lo), np.int64)
        chunk_first = np.cumsum([0, *n_chunks]).tolist()  # the shards' chunks, in shard order
        for shard, n in enumerate(sizes):
            a, b = chunk_first[shard], chunk_first[shard + 1]
            starts = chunk_lo[a:b]
            first, end = np.searchsorted(self.member_index(shard), [starts, np.minimum(starts + self.chunk_cells, n)])
            first_member[a:b], counts[a:b] = first, end - first
        rng = np.random.default_rng([self.seed, epoch])
        if self.shuffle:
            perm = rng.permutation(len(chunk_lo))
            chunk_shard, first_member, counts = chunk_shard[perm], first_member[perm], counts[perm]
        total = int(counts.sum())
        workers = n_consumers // self.world_size
        per_rank = total // self.world_size
        rank, worker = divmod(consumer, workers)
        lo = rank * per_rank + worker * per_rank // workers
        hi = rank * per_rank + (worker + 1) * per_rank // workers
        ends = np.cumsum(counts)
        first, last = np.searchsorted(ends, lo, side="right"), np.searchsorted(ends, hi, side="left")
        shard_ids, cells = [], []
        for c in range(first, min(last + 1, len(counts))):
            start = ends[c] - counts[c]
            a, b = first_member[c] + max(lo - start, 0), first_member[c] + max(min(hi - start, counts[c]), 0)
            part = self.member_index(int(chunk_shard[c]))[a:max(a, b)]
            shard_ids.append(np.full(len(part), chunk_shard[c], dtype=np.int64))
            cells.append(part)
        shard_arr = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int64)
        cell_arr = np.concatenate(cells) if cells else np.zeros(0, np.int64)
        if self.shuffle:
            wrng = np.random.default_rng([self.seed, epoch, consumer, 1])
            for w in range(0, len(cell_arr), self.buffer_cells):
                perm = w + wrng.permutation(min(self.buffer_cells, len(cell_arr) - w))
                shard_arr[w:w + len(perm)], cell_arr[w:w + len(perm)] = shard_arr[perm], cell_arr[perm]
        return shard_arr, cell_arr

    def __len__(self) -> int:
        """Batches this rank serves in the current epoch (all its loader workers together).

        ``random`` and ``length_grouped`` depend only on cell counts; ``packed`` depends on the epoch's
        shuffle, so its length is planned for ``self.epoch`` (lengths only, no reading).
        """
        workers = max(self.num_workers, 1)
        if self.batching.strategy == "packed":
            return sum(len(self.plan(self.epoch, self.rank * workers + w, self.world_size * workers)[3])
                       for w in range(workers))
        total = sum(len(self.member_index(s)) for s in range(self.corpus.n_shards))
        per_rank = total // self.world_size
        shares = [(w + 1) * per_rank // workers - w * per_rank // workers for w in range(workers)]
        return sum(self.batching.n_batches(n) for n in shares)

    def plan(self, epoch: int, consumer: int, n_consumers: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        """(shard, index-in-shard, encoded length) of the consumer's cells, and the batches as positions
        into them."""
        shards, cells, lengths, batches = self._batches(epoch, consumer, n_consumers)
        if self.batching.strategy == "packed" and self.world_size > 1:
            batches = batches[:self.fewest_packs(epoch, n_consumers)]
        return shards, cells, lengths, batches

    def _batches(self, epoch: int, consumer: int, n_consumers: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        """:meth:`plan` before packed batches are cut to the count every consumer reaches."""
        shards, cells = self.cell_order(epoch, consumer, n_consumers)
        lengths = _gather_per_shard(self.lengths, shards, cells)
        return shards, cells, lengths, list(self.batching.plan(cells, lengths, self.encoding.max_len))

    def fewest_packs(self, epoch: int, n_consumers: int) -> int:
        """Fewest packs any consumer (rank x worker) gets in ``epoch``. Pack counts follow the cells' lengths, so
        equal cell shares can give ranks different counts; DDP all-reduces every step (and broadcasts buffers at
        every forward), so a rank with one more batch waits forever. Every consumer stops at this count (the
        last few packs of an epoch are dropped, as with ``drop_last``). Lengths only: nothing is read."""
        key = (epoch, n_consumers)
        if key not in self._fewest_packs:
            self._fewest_packs[key] = min(len(self._batches(epoch, c, n_consumers)[3]) for c in range(n_consumers))
        return self._fewest_packs[key]

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        keep_freed_memory()
        consumer, n_consumers = self.consumer()
        epoch, skip = self.epoch, self._skip
        self._skip, self._served = 0, 0
        shards, cells, cell_lengths, batches = self.plan(epoch, consumer, n_consumers)
        base = np.concatenate([[0], np.cumsum(self.corpus.shard_sizes)])
        strategy = "packed" if self.batching.strategy == "packed" else "padded"
        self._served = min(skip, len(batches))
        worker = get_worker_info()
        shared = worker is not None and self.send_shared
        pool = BufferPool(self.in_use, worker.id) if shared and self.in_use is not None else None
        sizes = np.array([len(x) for x in batches], dtype=np.int64)
        order = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        firsts = np.cumsum(sizes) - sizes
        tokens = np.add.reduceat(cell_lengths[order], firsts) if len(order) else sizes
        stored = np.add.reduceat(_gather_per_shard(lambda s: self.corpus.shard(s).n_genes, shards[order], cells[order]),
                                 firsts) if len(order) else sizes  # stored (non-zero) tokens: what reading costs
        # Blocks of consecutive batches are read and encoded at once (cells are encoded independently, so the result
        # does not depend on the grouping), cut from the plan alone. A loader worker sends its batches in messages of
        # ``per_message``, a number the same for every worker and rank (it depends on the config and the encoding's
        # output dtypes alone): a resumed run sends the messages of the uninterrupted one (its first: the rest of the
        # message being served), and under DDP every rank's workers stand at the same batch after the same number of
        # steps (Lightning saves rank 0's loader state for all ranks).
        widest = self.batching.budget(self.encoding.max_len) if strategy == "packed" else \
            self.batching.batch_size * self.encoding.max_len  # laid-out tokens of a batch, at most
        per_message = 0  # set from the first batch's bytes per token
        blocks = _cut((tokens, _BLOCK_ENCODED), (stored, _BLOCK_TOKENS))
        pending: list[dict[str, Any]] = []
        for first, end in itertools.pairwise(blocks):
            if end <= skip:
                continue
            b = max(first, skip)
            block = order[firsts[b]:firsts[end - 1] + sizes[end - 1]]  # the cells of batches b … end - 1
            encoded = self.encode_cells(shards[block], cells[block], base, epoch)
            lo = 0
            for j in range(b, end):
                hi = lo + len(batches[j])
                part = _cell_slice(encoded, lo, hi)
                lo = hi
                if not shared:
                    self._served = j + 1  # count before yielding: the loader snapshots state right after a yield
                    yield collate(part, strategy)
                    continue
                pending.append(part)
                per_message = per_message or max(1, self.message_bytes // (widest * token_bytes(part, strategy)))
                if (j + 1) % per_message == 0 or j + 1 == len(batches):
                    self._served = j + 1
                    yield SharedBatches(pending, strategy, worker.id, pool)
                    pending = []

    def encode_cells(self, shards: np.ndarray, cells: np.ndarray, base: np.ndarray, epoch: int) -> dict[str, Any]:
        """Read and encode the given cells (in this order): flat per-token arrays, ``offsets`` and ``cell``."""
        n = len(cells)
        starts, ends, totals = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
        of_shard = {}
        for s in np.unique(shards).tolist():
            sel = np.flatnonzero(shards == s)
            shard = of_shard[s] = self.corpus.shard(s)
            idx = cells[sel]
            starts[sel], ends[sel], totals[sel] = shard.offsets[idx], shard.offsets[idx + 1], shard.total_counts[idx]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        # a cell's tokens are one contiguous slice: concatenating slices (plain ndarray views) is ~2x faster than
        # one fancy-index gather over the block, and as fast as a compiled copy (memory-bound: ~3.6 µs per cell)
        spans = list(zip([of_shard[s] for s in shards.tolist()], starts.tolist(), ends.tolist()))
        if n:
            genes = np.concatenate([x.gene_ids[a:b] for x, a, b in spans])
            counts = np.concatenate([x.counts[a:b] for x, a, b in spans])
        else:
            genes, counts = np.zeros(0, np.int32), np.zeros(0, np.int32)
        cell_index = base[shards] + cells
        epoch_key = _epoch_key(self.seed, epoch)
        seeds = epoch_key ^ cell_index.astype(np.uint64)  # per-cell seeds for stochastic encodings
        encoded = self.encoding.encode(genes, counts, offsets, totals, cell_seeds=seeds)
        encoded.setdefault("cell", {})["cell_index"] = cell_index
        if self.conditions:
            self._add_conditions(encoded, shards, cells)
        return encoded


@lru_cache(maxsize=4)
def _epoch_key(seed: int, epoch: int) -> np.uint64:
    """The epoch's 64-bit key, XOR-ed with a cell's global index to make its seed (SeedSequence hashing, ~80 µs:
    once per epoch, not once per block)."""
    return np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]


def _cut(*weights_and_caps: tuple[np.ndarray, int]) -> np.ndarray:
    """Boundaries of consecutive groups of items, greedily: an item starts a new group when adding it would take any
    group total over its cap (a single item may exceed it). ``[0, ..., n]``. Weights are integers >= 0: a group's end
    is a binary search in each weight's running sum."""
    n = len(weights_and_caps[0][0]) if weights_and_caps else 0
    sums = [(np.concatenate([[0], np.cumsum(w, dtype=np.int64)]), cap) for w, cap in weights_and_caps]
    bounds = [0]
    while bounds[-1] < n:
        i = bounds[-1]
        end = min(int(np.searchsorted(total, total[i] + cap, side="right")) - 1 for total, cap in sums)
        bounds.append(max(end, i + 1))
    return np.array(bounds, dtype=np.int64)


def _gather_per_shard(per_shard: Callable[[int], np.ndarray], shards: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """``per_shard(s)[cell]`` for each (shard, cell) pair: one gather per shard."""
    out = np.empty(len(cells), dtype=np.int64)
    for s in np.unique(shards):
        sel = shards == s
        out[sel] = per_shard(int(s))[cells[sel]]
    return out


def _cell_slice(encoded: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    """Cells ``lo:hi`` of an encoded block (views)."""
    offsets = encoded["offsets"]
    a, b = offsets[lo], offsets[hi]
    out = {k: v[a:b] for k, v in encoded.items() if k not in ("offsets", "cell", "rows")}
    if "rows" in encoded:
        out["rows"] = encoded["rows"]
    out["offsets"] = offsets[lo:hi + 1] - a
    out["cell"] = {k: v[lo:hi] for k, v in encoded.get("cell", {}).items()}
    return out


def worker_init_fn(worker_id: int) -> None:
    """Keep each loader worker to one thread (numpy/torch), so workers do not oversubscribe cores."""
    torch.set_num_threads(1)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_allocator_tuned = False


def keep_freed_memory(mmap_below: int = 32 << 20, trim_above: int = 1 << 30) -> bool:
    """glibc only: serve allocations below ``mmap_below`` bytes from the heap and keep up to ``trim_above`` bytes of
    freed heap, instead of a fresh ``mmap`` (zeroed, page-faulted) and ``munmap`` for every large numpy temporary.

    Encoding a block makes dozens of 1–10 MB temporaries; with glibc's defaults each is page-faulted anew. This makes
    ``encoding=bin`` ~1.4× faster (``bench/loader.py``), at the cost of the process keeping its peak heap. Called once
    per loader process (worker or main); a no-op elsewhere. Returns whether the settings were applied."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        _allocator_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_below) and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                              trim_above))
    except (OSError, AttributeError):  # not glibc
        return False
    return _allocator_tuned
