"""The native Loader: order, sharding, resume, output kinds, threads, errors."""
import gc
import os

import numpy as np
import pytest

import aimass.data as D


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader")
    n = 1003
    X = (np.arange(n * 12, dtype=np.int64) % 251).astype(np.uint8).reshape(n, 2, 2, 3)
    return D.write(d / "ds", {"x": X, "id": np.arange(n, dtype=np.int64)}, shard_bytes=8_000)


def ids(loader):
    return [b["id"].copy() for b in loader]


def test_determinism_and_epochs(ds):
    a = ids(D.Loader(ds, 100, seed=7))
    b = ids(D.Loader(ds, 100, seed=7))
    assert all((x == y).all() for x, y in zip(a, b)) and len(a) == len(b) == 11
    flat = np.concatenate(a)
    assert sorted(flat.tolist()) == list(range(len(ds)))
    assert not (flat == np.arange(len(ds))).all()
    c = D.Loader(ds, 100, seed=8)
    assert not (np.concatenate(ids(c)) == flat).all()
    # iterating again advances the epoch: another order; set_epoch(0) replays epoch 0
    loader = D.Loader(ds, 100, seed=7)
    e0 = np.concatenate(ids(loader))
    e1 = np.concatenate(ids(loader))
    assert loader.epoch == 2 and not (e0 == e1).all()
    loader.set_epoch(0)
    np.testing.assert_array_equal(np.concatenate(ids(loader)), e0)
    unshuffled = np.concatenate(ids(D.Loader(ds, 64, shuffle=False)))
    np.testing.assert_array_equal(unshuffled, np.arange(len(ds)))
    # the data travels with the ids
    b0 = next(iter(D.Loader(ds, 16, seed=1)))
    for i, row in zip(b0["id"], b0["x"]):
        np.testing.assert_array_equal(row, ds[int(i)]["x"])


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_sharding(ds, world, drop_last):
    n, bs = len(ds), 32
    per_rank = [ids(D.Loader(ds, bs, seed=3, rank=r, world_size=world, drop_last=drop_last, num_threads=2))
                for r in range(world)]
    counts = {len(p) for p in per_rank}
    assert len(counts) == 1  # equal batch count on every rank
    sizes = {tuple(len(b) for b in p) for p in per_rank}
    assert len(sizes) == 1  # and equal batch sizes
    allids = np.concatenate([np.concatenate(p) for p in per_rank])
    if drop_last:
        assert all(len(b) == bs for b in per_rank[0])
        assert len(set(allids.tolist())) == len(allids)  # nothing twice
        assert len(allids) == world * ((n // world) // bs) * bs
    else:
        assert set(allids.tolist()) == set(range(n))  # everything at least once
        assert len(allids) == world * -(-n // world)  # padded by wrapping
    # same order as the single-rank permutation, strided
    full = np.concatenate(ids(D.Loader(ds, n, seed=3)))
    r0 = np.concatenate(per_rank[0])
    np.testing.assert_array_equal(r0, np.resize(full, len(r0) * world)[0::world][:len(r0)])


def test_exactly_once_when_divisible(tmp_path):
    ds = D.write(tmp_path / "d", {"id": np.arange(96, dtype=np.int64)})
    got = np.concatenate([np.concatenate(ids(D.Loader(ds, 5, seed=1, rank=r, world_size=3))) for r in range(3)])
    assert sorted(got.tolist()) == list(range(96))


def test_resume_exact(ds):
    ref = D.Loader(ds, 50, seed=11)
    ids(ref)  # epoch 0
    expected = ids(ref)  # epoch 1
    run = D.Loader(ds, 50, seed=11, num_threads=3, prefetch=3)
    ids(run)
    it = iter(run)
    head = [next(it)["id"].copy() for _ in range(7)]
    state = run.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 7
    del it, run
    resumed = D.Loader(ds, 50, seed=11, num_threads=1)
    resumed.load_state_dict(state)
    tail = ids(resumed)
    got = head + tail
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    assert resumed.state_dict()["epoch"] == 2
    with pytest.raises(ValueError, match="batch_size"):
        D.Loader(ds, 51, seed=11).load_state_dict(state)


def test_torch_output_zero_copy(ds):
    torch = pytest.importorskip("torch")
    loader = D.Loader(ds, 8, seed=0, output="torch")
    b = next(iter(loader))
    assert isinstance(b["x"], torch.Tensor) and b["x"].dtype == torch.uint8 and b["x"].shape == (8, 2, 2, 3)
    assert b["id"].dtype == torch.int64


def _threads():
    return len(os.listdir("/proc/self/task"))


def test_no_leaked_threads_and_buffers_recycled(ds):
    before = _threads()
    for _ in range(3):
        loader = D.Loader(ds, 16, seed=0, num_threads=3)
        it = iter(loader)
        next(it)
        next(it)
        assert _threads() >= before + 3
        del it, loader
        gc.collect()
    assert _threads() == before
    loader = D.Loader(ds, 16, seed=0, num_threads=2)
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(iter(loader))
    # buffers held by the user are never overwritten
    loader = D.Loader(ds, 16, seed=0, num_threads=2)
    held = [b for b in loader]
    again = [b for b in D.Loader(ds, 16, seed=0, num_threads=2)]
    for a, b in zip(held, again):
        np.testing.assert_array_equal(a["id"], b["id"])


def test_bad_arguments(ds):
    with pytest.raises(TypeError, match="Dataset"):
        D.Loader(np.zeros(3), 4)
    with pytest.raises(ValueError, match="batch_size"):
        D.Loader(ds, 0)
    with pytest.raises(ValueError, match="rank"):
        D.Loader(ds, 4, rank=3, world_size=2)
    with pytest.raises(ValueError, match="both"):
        D.Loader(ds, 4, rank=0)
    with pytest.raises(ValueError, match="output"):
        D.Loader(ds, 4, output="jax")
    with pytest.raises(ValueError, match="num_threads"):
        D.Loader(ds, 4, num_threads=0)
    with pytest.raises(ValueError, match="unknown field 'img'"):
        D.Loader(ds, 4, transforms=[D.Cast("img")])
    with pytest.raises(ValueError, match="no full batch"):
        D.Loader(ds, 2000, drop_last=True)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("output,verify", [("numpy", True), ("numpy", "once"), ("torch", True)])
def test_memory_is_flat_across_epochs(tmp_path, output, verify):
    """Batch buffers come back to the pool and are reused: after the first epoch
    neither the pool nor the process grows, however many epochs run."""
    if output == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    n = 3000
    d = D.write(tmp_path / "ds", {"x": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                  "label": np.arange(n, dtype=np.int64)})
    loader = D.Loader(d, 100, seed=0, num_threads=2, prefetch=3, verify=verify, output=output)
    seen = 0
    for b in loader:  # the first epoch maps the shards and fills the pool
        seen += len(b["label"])
    assert seen == n
    gc.collect()
    rss0, pool0 = _rss_bytes(), loader.buffers_allocated
    window = 2 * 3  # threads x prefetch
    for _ in range(8):
        total = 0
        for b in loader:
            total += int(b["label"][-1])
        assert total > 0
    gc.collect()
    # the window, the batch the caller holds and the one being handed over
    assert pool0 <= loader.buffers_allocated <= window + 2
    grown = _rss_bytes() - rss0
    # a batch is 300 KB: keeping even one per epoch would exceed this bound within 8 epochs
    assert grown < 2 << 20, f"RSS grew by {grown} bytes over 8 epochs"
