"""``CellDataModule``: the LightningDataModule every scfm objective and task shares."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tensordict import TensorDict
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.stateful_dataloader import _StatefulMultiProcessingDataLoaderIter as _Iter

from scfm.data.batching import Batching, batch_to
from scfm.data.corpus import Corpus
from scfm.data.stream import _POOL, MESSAGE_BYTES, CellStream, SharedBatches, worker_init_fn
from scfm.errors import ScfmInputError


class CellDataModule(L.LightningDataModule):
    """Streams a corpus (a folder made by ``scfm-prepare``, or a built-in dataset prepared into the cache).

    Args:
        corpus: path of a prepared corpus. Exactly one of ``corpus`` / ``builtin``.
        builtin: ``pbmc3k`` or ``synthetic`` (``builtin_params`` go to the simulator).
        encoding: an encoding object (``scfm.encodings.*``), bound to the corpus in ``setup``.
        batching: a ``Batching`` (or its fields as a dict).
        val_fraction / split_column: deterministic split by cell-id hash, or by the corpus's ``split`` column.
        num_workers: loader worker processes; each encodes its own share of cells.
        message_bytes: bytes of batches per message a worker sends (shared memory; the same on every rank).
        conditions: condition tokens to add to batches: ``cell_type``, ``batch``, ``perturbation``, ``modality``.
        vocab: the vocabulary ``encoding`` is already bound to (a model bundle's: ``Bundle.encoding()``); the
            encoding is then not bound to the corpus, whose vocabulary must be the same.
    """

    def __init__(self, encoding: Any, batching: Batching | dict[str, Any] | None = None, corpus: str | None = None,
                 builtin: str | None = None, builtin_params: dict[str, Any] | None = None,
                 cache_dir: str | None = None, val_fraction: float = 0.1, split_column: str | None = None,
                 num_workers: int = 0, seed: int = 0, chunk_cells: int = 256, buffer_cells: int = 8192,
                 verify: bool = False, progress: bool = True, conditions: list[str] | None = None,
                 message_bytes: int = MESSAGE_BYTES, vocab: Any = None) -> None:
        super().__init__()
        if (corpus is None) == (builtin is None):
            raise ScfmInputError("give exactly one of data.corpus (a folder made by scfm-prepare) and data.builtin",
                                 fix="e.g. data=pbmc3k, or data=corpus data.corpus=/path/to/corpus")
        self.encoding = encoding
        self.batching = batching if isinstance(batching, Batching) else Batching(**(batching or {}))
        self.corpus_path, self.builtin = corpus, builtin
        self.builtin_params = dict(builtin_params or {})
        self.cache_dir, self.val_fraction, self.split_column = cache_dir, val_fraction, split_column
        self.num_workers, self.seed = num_workers, seed
        self.chunk_cells, self.buffer_cells, self.verify, self.progress = chunk_cells, buffer_cells, verify, progress
        self.conditions = list(conditions or [])
        self.message_bytes = message_bytes
        self.bound_vocab = vocab
        self.corpus: Corpus | None = None
        self.train_set: CellStream | None = None
        self.val_set: CellStream | None = None

    def prepare_data(self) -> None:
        if self.builtin is not None:
            from scfm.data.builtin import builtin_corpus

            corpus = builtin_corpus(self.builtin, self.cache_dir, self.builtin_params, progress=self.progress)
            self.corpus_path = str(corpus.path)

    def open(self) -> Corpus:
        """Prepare (built-in data) and open the corpus; bind the encoding. Idempotent."""
        if self.corpus is None:
            if self.corpus_path is None or not Path(self.corpus_path).exists():
                self.prepare_data()
            corpus = Corpus(self.corpus_path, verify=self.verify)
            if self.bound_vocab is None:
                self.encoding.bind(corpus)
            else:
                _check_same_vocab(corpus, self.bound_vocab)
            self.corpus = corpus
        return self.corpus

    @property
    def vocab(self):
        return self.open().vocab

    def setup(self, stage: str | None = None) -> None:
        corpus = self.open()
        world, rank = 1, 0
        if self.trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
        common = dict(corpus=corpus, encoding=self.encoding, batching=self.batching, val_fraction=self.val_fraction,
                      split_column=self.split_column, seed=self.seed, chunk_cells=self.chunk_cells,
                      buffer_cells=self.buffer_cells, world_size=world, rank=rank, conditions=self.conditions,
                      message_bytes=self.message_bytes)
        self.train_set = CellStream(split="train", **common)
        self.val_set = CellStream(split="val", **common)
        self.train_set.num_workers = self.val_set.num_workers = self.num_workers

    def predict_dataloader(self) -> StatefulDataLoader:
        """Every cell of the corpus once, in corpus order within each batch's cells (``cell_index`` says which),
        not shuffled; for embeddings and other per-cell outputs."""
        corpus = self.open()
        stream = CellStream(corpus=corpus, encoding=self.encoding, batching=self.batching, split="train",
                            val_fraction=0.0, shuffle=False, seed=self.seed, chunk_cells=self.chunk_cells,
                            buffer_cells=self.buffer_cells, conditions=self.conditions,
                            message_bytes=self.message_bytes)
        stream.num_workers = self.num_workers
        return self._loader(stream)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Rows every cell shares (``encoding=continuous``'s ``gene_ids``, ...) travel once (``batch_to``)."""
        if isinstance(batch, TensorDict):
            return batch_to(batch, device, non_blocking=device.type == "cuda")
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle (called by ``scfm.training.DataEpoch`` at each epoch start)."""
        if self.train_set is not None:
            self.train_set.set_epoch(epoch)

    def _loader(self, dataset: CellStream) -> StatefulDataLoader:
        dataset.send_shared = bool(self.num_workers)  # workers send a block of batches per message; split here
        return _Loader(dataset, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
                       worker_init_fn=worker_init_fn if self.num_workers else None,
                       persistent_workers=False, prefetch_factor=2 if self.num_workers else None)

    def train_dataloader(self) -> StatefulDataLoader:
        if self.train_set is None:
            self.setup("fit")
        if self.trainer is not None:  # reloaded each epoch for packed batching: its length depends on the epoch
            self.train_set.set_epoch(self.trainer.current_epoch)
        return self._loader(self.train_set)

    def val_dataloader(self) -> StatefulDataLoader | list:
        if self.val_set is None:
            self.setup("fit")
        if self.val_fraction == 0 and self.split_column is None:
            return []
        return self._loader(self.val_set)


class _Loader(StatefulDataLoader):
    """Serves the batches of the ``SharedBatches`` that loader workers send (see ``scfm.data.stream``) one by one.

    The loader's own state is per message: a worker's snapshot counts every batch of its last message as served.
    ``state_dict`` adds how many of them were not (``scfm_unserved``); on resume that worker serves them again."""

    _unserved: tuple[int, int] | None = None  # (worker, batches) of the message being served

    def _get_iterator(self):
        if self.num_workers and isinstance(self.dataset, CellStream):  # fresh workers: fresh buffer-pool flags
            with torch.inference_mode(False):  # predict runs in inference mode; the flags are updated later
                self.dataset.in_use = torch.zeros((self.num_workers, _POOL), dtype=torch.bool).share_memory_()
            _check_shared_memory(self.num_workers, self.dataset.message_bytes)
            self.dataset.read_shard_facts()  # once, here: the workers forked next inherit them
        return super()._get_iterator()

    def __iter__(self):
        self._unserved = None
        for item in super().__iter__():
            if not isinstance(item, SharedBatches):
                yield item
                continue
            for i, batch in enumerate(item.batches(self.dataset.in_use)):
                self._unserved = (item.worker, len(item) - 1 - i)
                yield batch
            self._unserved = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._unserved is not None and self._unserved[1]:
            state["scfm_unserved"] = {"worker": self._unserved[0], "batches": self._unserved[1]}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        unserved = state.pop("scfm_unserved", None)
        self._unserved = None
        self.dataset.unserved = {int(unserved["worker"]): int(unserved["batches"])} if unserved else {}
        if unserved and self.num_workers:  # that worker's message comes first: the loader's round robin resumes
            snapshot = state[_Iter._SNAPSHOT] = dict(state[_Iter._SNAPSHOT])  # after the last worker it served
            snapshot[_Iter._LAST_YIELDED_WORKER_ID] = (int(unserved["worker"]) - 1) % self.num_workers
        super().load_state_dict(state)


def _check_shared_memory(num_workers: int, message_bytes: int, folder: str = "/dev/shm") -> None:
    """Warn when the shared-memory file system looks too small for the workers' buffers (about 3 messages of up to
    ``message_bytes`` each per worker): a worker that runs out dies of SIGBUS."""
    need = num_workers * 3 * message_bytes
    if os.path.isdir(folder) and (free := shutil.disk_usage(folder).free) < need:
        warnings.warn(f"{folder} has {free / 2**20:.0f} MB free; {num_workers} loader worker(s) may need up to "
                      f"~{need / 2**20:.0f} MB of shared memory for their batches, and a worker that runs out dies "
                      f"with 'Bus error'. Fix: give the container more (docker run --shm-size=1g), or lower "
                      f"data.message_bytes (now {message_bytes}) or data.num_workers", stacklevel=3)


def _check_same_vocab(corpus: Corpus, vocab: Any) -> None:
    """A corpus read with a model's encoding must have the model's vocabulary (token ids mean the same genes)."""
    ours = corpus.vocab
    if tuple(ours.specials) == tuple(vocab.specials) and list(ours.gene_ids) == list(vocab.gene_ids):
        return
    shared = len(set(ours.gene_ids) & set(vocab.gene_ids))
    raise ScfmInputError(f"the corpus's vocabulary ({len(ours):,} tokens) is not the model's ({len(vocab):,} tokens; "
                         f"{shared:,} genes in common), so its token ids mean other genes",
                         where=str(corpus.path),
                         fix="prepare the data with the model's vocabulary: scfm-prepare input=<file> "
                             "output=<new folder> vocab=<bundle>/vocab.tsv")


def _as_is(batch):
    """``CellStream`` batches need no collation: TensorDicts, or ``SharedBatches`` that ``_Loader`` splits."""
    return batch
