"""CellStream / CellDataModule: deterministic sharding, splits, batching strategies and exact resume."""

from __future__ import annotations

import functools
import gc
import itertools
import operator
import pickle
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchdata.stateful_dataloader import StatefulDataLoader

from scfm.data import stream as stream_module
from scfm.data.batching import Batching, collate, collate_arrays, token_bytes
from scfm.data.datamodule import CellDataModule, _as_is
from scfm.data.stream import CellStream, SharedBatches
from scfm.encodings.bin import BinEncoding
from scfm.encodings.continuous import ContinuousEncoding
from scfm.encodings.rank import RankEncoding
from scfm.errors import ScfmInputError


def stream(corpus, split="train", strategy="random", batch_size=12, max_len=2048, **kw):
    enc = RankEncoding(max_len=max_len).bind(corpus)
    return CellStream(corpus, enc, Batching(strategy=strategy, batch_size=batch_size), split=split, **kw)


def global_ids(s: CellStream, consumer: int, n: int, epoch: int = 0) -> np.ndarray:
    shards, cells = s.cell_order(epoch, consumer, n)
    base = np.concatenate([[0], np.cumsum(s.corpus.shard_sizes)])
    return base[shards] + cells


@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 1), (2, 3)])
def test_consumers_partition_the_split(synthetic_corpus, world, workers):
    shares = []
    for rank in range(world):
        s = stream(synthetic_corpus, world_size=world, rank=rank, chunk_cells=64, buffer_cells=500)
        rank_share = [global_ids(s, rank * workers + w, world * workers) for w in range(workers)]
        shares.append(np.concatenate(rank_share))
    sizes = {len(x) for x in shares}
    assert len(sizes) == 1  # every rank serves the same number of cells
    served = np.concatenate(shares)
    assert len(np.unique(served)) == len(served)  # no cell twice
    train = sum(int(stream(synthetic_corpus).members(i).sum()) for i in range(synthetic_corpus.n_shards))
    assert train - len(served) < world  # only the remainder of an uneven split is dropped


def test_split_is_deterministic_and_disjoint(synthetic_corpus):
    train = stream(synthetic_corpus, val_fraction=0.2)
    val = stream(synthetic_corpus, split="val", val_fraction=0.2)
    t, v = global_ids(train, 0, 1), global_ids(val, 0, 1)
    assert not set(t) & set(v)
    assert len(t) + len(v) == synthetic_corpus.n_cells
    assert abs(len(v) / synthetic_corpus.n_cells - 0.2) < 0.03
    np.testing.assert_array_equal(np.sort(global_ids(stream(synthetic_corpus, split="val", val_fraction=0.2), 0, 1)),
                                  np.sort(v))


def test_shuffle_differs_by_epoch_and_is_reproducible(synthetic_corpus):
    s = stream(synthetic_corpus)
    e0, e0b, e1 = global_ids(s, 0, 1, 0), global_ids(s, 0, 1, 0), global_ids(s, 0, 1, 1)
    np.testing.assert_array_equal(e0, e0b)
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(np.sort(e0), np.sort(e1))
    val = stream(synthetic_corpus, split="val")
    ids = global_ids(val, 0, 1)
    np.testing.assert_array_equal(ids, np.sort(ids))  # validation is not shuffled


def test_batches_are_tensordicts_with_the_padded_layout(pbmc_corpus):
    b = next(iter(stream(pbmc_corpus)))
    assert isinstance(b, TensorDict)
    B, L = b["gene_ids"].shape
    assert B == 12 and int(b["lengths"].max()) == L
    assert torch.equal(b["padding_mask"].sum(1), b["lengths"])
    assert (b["gene_ids"][~b["padding_mask"]] == 0).all() and (b["gene_ids"][b["padding_mask"]] >= 4).all()


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.float64, np.float32, np.bool_, np.float16, ">i8"])
def test_padded_layout_equals_a_plain_per_cell_copy(dtype):
    """Ragged cells (an empty one included) of every token dtype: row c holds cell c's tokens, then the pad (gene_ids:
    ``pad_id``, others 0), in the batch dtype; the mask and positions cover exactly the real tokens."""
    rng = np.random.default_rng(1)
    lengths = np.array([7, 0, 1, 12, 3])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(1, 9, offsets[-1]).astype(dtype)
    out = collate_arrays({"gene_ids": values.copy(), "x": values, "offsets": offsets}, "padded", pad_id=-5)
    want_dtype = {"i": np.int64, "u": np.int64, "b": np.bool_}.get(np.dtype(dtype).kind, np.float32)
    for key, pad in (("gene_ids", -5), ("x", 0)):
        want = np.full((5, 12), pad, dtype=want_dtype)
        for c, (a, b) in enumerate(itertools.pairwise(offsets)):
            want[c, :b - a] = values[a:b]
        assert out[key].dtype == want_dtype
        np.testing.assert_array_equal(out[key], want)
    np.testing.assert_array_equal(out["padding_mask"], np.arange(12) < lengths[:, None])
    np.testing.assert_array_equal(out["positions"], np.where(out["padding_mask"], np.arange(12), 0))


def test_padded_layout_rejects_cells_that_do_not_fit():
    """Offsets that step down, tokens fewer than the offsets say, or a batch laid out for narrower cells: an error,
    never a write outside the batch."""
    tokens = np.arange(6)
    with pytest.raises(ValueError, match="ascend"):
        collate_arrays({"gene_ids": tokens, "offsets": np.array([0, 5, 3, 6])}, "padded")
    good = {"gene_ids": tokens, "offsets": np.array([0, 2, 6])}
    out = collate_arrays(good, "padded")
    narrow = {k: v[:, :3] if v.ndim == 2 else v for k, v in out.items()}
    with pytest.raises(ValueError, match="width"):
        collate_arrays(good, "padded", out={k: np.ascontiguousarray(v) for k, v in narrow.items()})
    with pytest.raises(ValueError, match="fit the tokens"):
        collate_arrays({"gene_ids": tokens[:4], "offsets": np.array([0, 2, 6])}, "padded", out=out)


def test_batch_content_equals_encoding_of_those_cells(pbmc_corpus):
    s = stream(pbmc_corpus, max_len=300)
    b = next(iter(s))
    for row, cell in enumerate(b["cell_index"].tolist()):
        g, c = pbmc_corpus.cell(0, cell)
        total = pbmc_corpus.shard(0).total_counts[cell]
        expected = s.encoding.encode(g, c, np.array([0, len(g)]), np.array([total]))["gene_ids"]
        got = b["gene_ids"][row][b["padding_mask"][row]].numpy()
        np.testing.assert_array_equal(got, expected)


def test_length_grouped_sorts_megabatches_longest_first(pbmc_corpus):
    s = stream(pbmc_corpus, strategy="length_grouped")
    s.batching.megabatch = 10
    batches = list(s)
    maxima = [int(b["lengths"].max()) for b in batches]
    assert maxima[0] == max(maxima)  # out-of-memory shows at once
    for mega in range(0, len(batches), 10):
        lens = torch.cat([b["lengths"] for b in batches[mega:mega + 10]]).tolist()
        assert lens == sorted(lens, reverse=True)
    assert sum(len(b["lengths"]) for b in batches) == len(global_ids(s, 0, 1))


def _efficiency(batches):
    real = sum(int(b["lengths"].sum()) for b in batches)
    return real / sum(b["gene_ids"].numel() for b in batches)


def test_length_grouped_pads_much_less_than_random(pbmc_corpus):
    rand = _efficiency(list(stream(pbmc_corpus)))
    grouped = _efficiency(list(stream(pbmc_corpus, strategy="length_grouped")))
    assert grouped > 0.9 > rand


def test_packed_keeps_cells_whole_and_within_budget(pbmc_corpus):
    s = stream(pbmc_corpus, strategy="packed", max_len=512)
    budget = 12 * 512
    served = []
    padded = {int(c): row for b in stream(pbmc_corpus, max_len=512)
              for c, row in zip(b["cell_index"], b["gene_ids"].unbind(0))}
    for b in s:
        T = b["gene_ids"].shape[1]
        assert budget >= T and b["cu_seqlens"][-1] == T
        assert torch.equal(torch.diff(b["cu_seqlens"]).long(), b["lengths"])
        for i, cell in enumerate(b["cell_index"].tolist()):
            lo, hi = int(b["cu_seqlens"][i]), int(b["cu_seqlens"][i + 1])
            assert (b["doc_ids"][0, lo:hi] == i).all()
            assert torch.equal(b["positions"][0, lo:hi], torch.arange(hi - lo))
            row = padded[cell]
            assert torch.equal(b["gene_ids"][0, lo:hi], row[: hi - lo])
            served.append(cell)
    assert sorted(served) == sorted(padded)


@pytest.mark.parametrize("strategy", ["random", "length_grouped", "packed"])
def test_resume_mid_epoch_at_the_exact_cell(synthetic_corpus, strategy):
    full = [b["cell_index"].tolist() for b in stream(synthetic_corpus, strategy=strategy, batch_size=8)]
    s = stream(synthetic_corpus, strategy=strategy, batch_size=8)
    it = iter(s)
    first = [next(it)["cell_index"].tolist() for _ in range(7)]
    state = s.state_dict()
    resumed = stream(synthetic_corpus, strategy=strategy, batch_size=8)
    resumed.load_state_dict(state)
    rest = [b["cell_index"].tolist() for b in resumed]
    assert first + rest == full


def test_resume_through_stateful_dataloader_with_workers(synthetic_corpus):
    def loader():
        return StatefulDataLoader(stream(synthetic_corpus, batch_size=16), batch_size=None, num_workers=2,
                                  collate_fn=_as_is)

    full = [b["cell_index"].tolist() for b in loader()]
    dl = loader()
    it = iter(dl)
    first = [next(it)["cell_index"].tolist() for _ in range(9)]
    state = dl.state_dict()
    del it, dl
    dl2 = loader()
    dl2.load_state_dict(state)
    rest = [b["cell_index"].tolist() for b in dl2]
    assert first + rest == full
    assert sorted(functools.reduce(operator.iadd, full, [])) == sorted(set(functools.reduce(operator.iadd, full, [])))


@pytest.mark.parametrize(("strategy", "encoding"), [("random", "rank"), ("packed", "rank"), ("random", "continuous")])
def test_shared_batches_are_the_batches_they_were_given(pbmc_corpus, strategy, encoding):
    enc = (RankEncoding(max_len=300) if encoding == "rank" else ContinuousEncoding(max_genes=3000)).bind(pbmc_corpus)
    s = CellStream(pbmc_corpus, enc, Batching(strategy=strategy, batch_size=5))
    shards, cells, _, batches = s.plan(0, 0, 1)
    base = np.concatenate([[0], np.cumsum(pbmc_corpus.shard_sizes)])
    layout = "packed" if strategy == "packed" else "padded"
    parts = [s.encode_cells(shards[b], cells[b], base, 0) for b in batches[:3]]
    parts[1]["extra"] = np.full(int(parts[1]["offsets"][-1]), -0.0, dtype=np.float32)  # float bits kept
    parts[1]["extra"][:2] = np.nan, 1.5
    parts[2]["cell"]["empty"] = np.zeros((len(batches[2]), 0), dtype=np.int32)
    message = pickle.loads(pickle.dumps(SharedBatches(parts, layout, worker=1)))
    assert len(message) == 3 and message.worker == 1
    for part, got in zip(parts, message.batches()):
        want = collate(part, layout)
        assert list(got.keys()) == list(want.keys())
        for k, v in want.items():
            assert (got[k].dtype, got[k].shape) == (v.dtype, v.shape), k
            assert shared_row(got[k]) == shared_row(v), k  # rows every cell shares stay one row
            bits = [np.ascontiguousarray(x.numpy()).view(np.uint8) for x in (got[k], v)]
            assert np.array_equal(*bits), k


def shared_row(t: torch.Tensor) -> bool:
    """A stride-0 [B, L] view of one row."""
    return t.dim() == 2 and t.shape[0] > 1 and t.numel() > 0 and t.stride(0) == 0


def test_buffer_pool_reuses_a_buffer_once_its_batches_are_gone(pbmc_corpus):
    enc = RankEncoding(max_len=300).bind(pbmc_corpus)
    s = CellStream(pbmc_corpus, enc, Batching(batch_size=5))
    shards, cells, _, batches = s.plan(0, 0, 1)
    base = np.concatenate([[0], np.cumsum(pbmc_corpus.shard_sizes)])
    parts = [s.encode_cells(shards[b], cells[b], base, 0) for b in batches[:2]]
    in_use = torch.zeros((2, 2), dtype=torch.bool).share_memory_()
    pool = stream_module.BufferPool(in_use, worker=1)
    sent = [SharedBatches(parts, "padded", 1, pool), SharedBatches(parts[:1], "padded", 1, pool)]
    assert [m.slot for m in sent] == [0, 1] and in_use[1].all() and not in_use[0].any()
    assert SharedBatches(parts, "padded", 1, pool).slot == -1  # no free slot: a buffer of its own
    received = [pickle.loads(pickle.dumps(m)) for m in sent]  # as the main process gets them
    held = list(received[0].batches(in_use))
    del received[0]
    gc.collect()
    assert in_use[1, 0]  # its batches are alive
    ids = held[1]["gene_ids"].clone()
    del held
    gc.collect()
    assert not in_use[1, 0] and in_use[1, 1]
    again = SharedBatches(parts[1:], "padded", 1, pool)
    assert again.slot == 0 and again.buffer is sent[0].buffer
    assert torch.equal(next(again.batches())["gene_ids"], ids)


@pytest.mark.parametrize(("encoding", "hold"), [("rank", True), ("rank", False), ("continuous", False)])
def test_datamodule_workers_send_blocks_of_the_same_batches(synthetic_corpus, monkeypatch, encoding, hold):
    """The DataModule's workers send blocks of batches in shared memory; served one by one, they are the batches a
    worker yields one at a time (interleaved across workers message by message instead of batch by batch), whether
    the batches are kept (the workers' buffers cannot be reused) or dropped as they come (they are)."""
    make = (lambda: RankEncoding(max_len=64)) if encoding == "rank" else (lambda: ContinuousEncoding(max_genes=64))
    dm = CellDataModule(make(), {"batch_size": 16}, corpus=str(synthetic_corpus.path), val_fraction=0.0,
                        num_workers=2, progress=False, message_bytes=40_000)  # rank: 2 batches of 16 × 64 × 17 B
    dm.setup()
    got = [b if hold else b.clone() for b in dm.train_dataloader()]
    inner = CellStream(synthetic_corpus, make().bind(synthetic_corpus), Batching(batch_size=16), val_fraction=0.0)
    want = list(StatefulDataLoader(inner, batch_size=None, num_workers=2, collate_fn=_as_is))
    assert len(got) == len(want) > 2
    assert [b["cell_index"].tolist() for b in got] != [b["cell_index"].tolist() for b in want]  # interleaving differs
    got, want = (sorted(x, key=lambda b: int(b["cell_index"][0])) for x in (got, want))
    for a, b in zip(got, want):
        assert set(a.keys()) == set(b.keys())
        for k in sorted(b.keys()):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _two_worker_loader(corpus, state=None):
    """The DataModule's training loader over ``corpus`` with 2 workers (rank, 64 tokens, batches of 16, 3 batches per
    message)."""
    dm = CellDataModule(RankEncoding(max_len=64), {"batch_size": 16}, corpus=str(corpus.path), val_fraction=0.0,
                        num_workers=2, progress=False, message_bytes=60_000)
    dm.setup()
    dl = dm.train_dataloader()
    if state is not None:
        dl.load_state_dict(state)
    return dl


@pytest.mark.parametrize("stop", [1, 5, 9])
def test_datamodule_resumes_mid_message_with_workers(synthetic_corpus, monkeypatch, stop):
    """A checkpoint taken part-way through a worker's message resumes at the next batch of that message."""

    loader = functools.partial(_two_worker_loader, synthetic_corpus)
    full = [b["cell_index"].tolist() for b in loader()]
    it = iter(dl := loader())
    first = [next(it)["cell_index"].tolist() for _ in range(stop)]
    state = dl.state_dict()
    assert ("scfm_unserved" in state) == (stop != 9)  # (checked for this corpus: batch 9 ends a message)
    del it, dl
    rest = [b["cell_index"].tolist() for b in loader(state)]
    assert first + rest == full


@pytest.mark.parametrize("strategy", ["random", "length_grouped", "packed"])
def test_messages_cut_every_rank_and_worker_alike(synthetic_corpus, monkeypatch, strategy):
    """Under DDP, Lightning saves rank 0's loader state and every rank resumes from it: each worker must stand at the
    same batch on every rank after the same number of steps, so messages hold the same number of batches."""
    monkeypatch.setattr(stream_module, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=1))
    sizes = []
    for rank in range(2):
        s = stream(synthetic_corpus, strategy=strategy, batch_size=16, max_len=64, world_size=2, rank=rank,
                   message_bytes=50_000)  # 2 batches of 16 × 64 tokens: padded 17 B a token, packed 24 B
        s.send_shared = True
        sizes.append([len(m) for m in s])
    assert sizes[0] == sizes[1] and set(sizes[0][:-1]) == {2}


@pytest.mark.parametrize(("encoding", "per_token"), [("rank", 17), ("continuous", 10)])
def test_messages_hold_as_many_batches_as_fit_in_message_bytes(synthetic_corpus, monkeypatch, encoding, per_token):
    """Bytes per token: rank lays out gene_ids and positions (int64) and padding_mask; continuous lays out values,
    target_values (float32) and two masks, while its gene_ids, token_kind, positions and padding_mask are one row."""
    monkeypatch.setattr(stream_module, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=1))
    enc = RankEncoding(max_len=64) if encoding == "rank" else ContinuousEncoding(max_genes=62)  # 64 tokens a cell
    s = CellStream(synthetic_corpus, enc.bind(synthetic_corpus), Batching(batch_size=16), val_fraction=0.0,
                   message_bytes=100_000)
    shards, cells, _, batches = s.plan(0, 0, 1)
    base = np.concatenate([[0], np.cumsum(synthetic_corpus.shard_sizes)])
    part = s.encode_cells(shards[batches[0]], cells[batches[0]], base, 0)
    assert token_bytes(part, "padded") == per_token
    s.send_shared = True
    messages = list(s)
    assert len(messages) > 2 and {len(m) for m in messages[:-1]} == {100_000 // (16 * 64 * per_token)}
    for m in messages:  # what the buffer holds: the batches' per-token bytes, plus rows and per-cell arrays
        laid_out = sum(np.prod(shape) * np.dtype(dtype).itemsize for spec in m.specs for _, dtype, shape, _ in spec)
        assert laid_out <= 100_000 + len(m) * 2_000


def test_resume_of_a_resumed_loader_before_and_after_its_first_batch(synthetic_corpus, monkeypatch):

    loader = functools.partial(_two_worker_loader, synthetic_corpus)
    full = [b["cell_index"].tolist() for b in loader()]
    it = iter(dl := loader())
    for _ in range(5):
        next(it)
    state = dl.state_dict()
    del it, dl
    again = loader(state).state_dict()  # taken before the resumed loader serves anything
    it = iter(dl := loader(again))
    sixth = next(it)["cell_index"].tolist()
    state = dl.state_dict()
    del it, dl
    assert [sixth, *[b["cell_index"].tolist() for b in loader(state)]] == full[5:]


def test_small_shared_memory_is_warned_about(tmp_path, monkeypatch):
    from scfm.data import datamodule

    monkeypatch.setattr(datamodule.shutil, "disk_usage", lambda _: type("U", (), {"free": 10 << 20}))
    with pytest.warns(UserWarning, match=r"10 MB free.*--shm-size.*message_bytes \(now 16777216\)"):
        datamodule._check_shared_memory(2, 1 << 24, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        datamodule._check_shared_memory(2, 1 << 20, str(tmp_path))  # smaller messages fit
    monkeypatch.setattr(datamodule.shutil, "disk_usage", lambda _: type("U", (), {"free": 1 << 40}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        datamodule._check_shared_memory(2, 1 << 19, str(tmp_path))


def test_resume_rejects_a_different_seed(synthetic_corpus):
    state = stream(synthetic_corpus, seed=1).state_dict()
    with pytest.raises(ScfmInputError, match="seed"):
        stream(synthetic_corpus, seed=2).load_state_dict(state)


def test_datamodule_needs_exactly_one_source():
    with pytest.raises(ScfmInputError, match="exactly one"):
        CellDataModule(RankEncoding())


def test_datamodule_epochs_and_val(synthetic_corpus):
    dm = CellDataModule(RankEncoding(max_len=256), {"strategy": "random", "batch_size": 32},
                        corpus=str(synthetic_corpus.path), val_fraction=0.1)
    dm.setup("fit")
    e0 = [b["cell_index"] for b in dm.train_dataloader()]
    dm.set_epoch(1)
    e1 = [b["cell_index"] for b in dm.train_dataloader()]
    val = torch.cat([b["cell_index"] for b in dm.val_dataloader()])
    assert not torch.equal(e0[0], e1[0])
    assert not set(val.tolist()) & set(torch.cat(e0).tolist())


def compiled_signatures() -> dict[str, set[str]]:
    """Every numba kernel of the package and the argument types it has machine code for, in this process."""
    import numba

    from scfm.data import batching
    from scfm.encodings import bin as bin_module
    from scfm.encodings import continuous, rank, rng
    return {f"{m.__name__}.{k}": {str(sig) for sig in v.signatures}
            for m in (batching, stream_module, bin_module, continuous, rank, rng) for k, v in vars(m).items()
            if isinstance(v, numba.core.registry.CPUDispatcher)}


@pytest.mark.parametrize("encoding", ["rank", "bin", "continuous"])
def test_loader_workers_compile_nothing(pbmc_corpus, monkeypatch, encoding):
    """What a worker runs has machine code in the process that forks it, once the DataModule is set up: a kernel
    typed anew (say, for a read-only array) would be loaded again in every worker at every epoch (~50 ms each)."""
    encodings = {"rank": RankEncoding(max_len=300), "bin": BinEncoding(max_len=200),
                 "continuous": ContinuousEncoding(max_genes=3000)}
    dm = CellDataModule(encodings[encoding], {"strategy": "random", "batch_size": 5},
                        corpus=str(pbmc_corpus.path), val_fraction=0.1, num_workers=1)
    dm.setup("fit")
    before = compiled_signatures()
    s = dm.train_set
    s.send_shared, s.in_use = True, torch.zeros((1, stream_module._POOL), dtype=torch.bool)
    monkeypatch.setattr(stream_module, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=1))
    assert len(next(iter(s))) > 1  # one message, as a worker sends it
    after = compiled_signatures()
    assert {k: v - before.get(k, set()) for k, v in after.items() if v - before.get(k, set())} == {}


def test_loader_reads_shard_facts_before_it_forks_its_workers(synthetic_corpus, monkeypatch):
    """Split membership and lengths of every shard are read in the main process, once: the workers of every epoch
    inherit them (a worker that read a shard again would count in its own copy, unseen here)."""
    dm = CellDataModule(RankEncoding(max_len=256), {"strategy": "random", "batch_size": 32},
                        corpus=str(synthetic_corpus.path), val_fraction=0.1, num_workers=1)
    dm.setup("fit")
    calls = []
    read = dm.train_set.encoding.lengths
    monkeypatch.setattr(dm.train_set.encoding, "lengths", lambda shard: calls.append(1) or read(shard))
    for epoch in range(2):
        dm.set_epoch(epoch)
        assert sum(len(b["cell_index"]) for b in dm.train_dataloader()) > 0
    n = synthetic_corpus.n_shards
    assert len(calls) == n and sorted(dm.train_set._lengths) == sorted(dm.train_set._member_index) == list(range(n))


@pytest.mark.parametrize("strategy", ["random", "length_grouped"])
@pytest.mark.parametrize("workers", [0, 2])
def test_len_is_the_number_of_batches(pbmc_corpus, strategy, workers):
    s = stream(pbmc_corpus, strategy=strategy, batch_size=7)
    s.batching.megabatch = 5
    s.num_workers = workers
    dl = StatefulDataLoader(s, batch_size=None, num_workers=workers, collate_fn=_as_is)
    assert len(dl) == len(s) == sum(1 for _ in dl)


def test_split_by_an_obs_column(tmp_path, pbmc):
    from scfm.data.prepare import PrepareOptions, prepare

    sub = pbmc[:200].copy()
    sub.obs["fold"] = np.where(np.arange(200) % 4 == 0, "val", "train")
    sub.write_h5ad(tmp_path / "sub.h5ad")
    corpus = prepare([str(tmp_path / "sub.h5ad")], tmp_path / "corpus",
                     PrepareOptions(columns={"split": "fold"}, progress=False))
    val = stream(corpus, split="val", split_column="split")
    ids = global_ids(val, 0, 1)
    np.testing.assert_array_equal(np.sort(ids), np.arange(0, 200, 4))
    train = stream(corpus, split_column="split")
    assert len(global_ids(train, 0, 1)) == 150
    assert stream(corpus, split="test", split_column="split").members(0).sum() == 0


def test_split_column_needs_a_declared_split(pbmc_corpus):
    with pytest.raises(ScfmInputError, match=r"columns\.split"):
        stream(pbmc_corpus, split_column="split")


@pytest.mark.parametrize("world", [2, 3])
def test_packed_ranks_serve_equal_batch_counts(pbmc_corpus, world):
    """DDP syncs every step: a rank with one more pack than the others would hang at the epoch's end."""
    counts = []
    for rank in range(world):
        s = stream(pbmc_corpus, strategy="packed", batch_size=8, max_len=2048, world_size=world, rank=rank)
        counts.append((len(s), sum(1 for _ in s)))
    assert len({c for pair in counts for c in pair}) == 1, counts
    single = stream(pbmc_corpus, strategy="packed", batch_size=8, max_len=2048)
    assert counts[0][0] * world <= len(single) + world  # only the last few packs of a rank are dropped
