"""Eager blocking broadcasts on one node (docs/comm.md, "Eager broadcast"): the root posts the data
and returns without waiting for its receivers; a mismatch still raises DistributedError on every
rank (the receivers at once, the root at its next collective), and nothing hangs."""
import os
import sys
import time

import numpy as np
import pytest
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _engine_env import engine_env  # noqa: E402

DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"]


def payload(seed, count, dtype):
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, count).astype(bool)
    return rng.integers(-100, 100, count).astype(dtype)


@pytest.mark.timeout(90)
def test_every_root_dtype_and_size_back_to_back(ll):
    d = ll
    n, r = d.size(), d.rank()
    before = d.stats()["ll_collectives"]
    calls = 0
    # odd sizes around the eager limit (16 KiB) and past it (the normal path), 0-size and 0-d too;
    # far more broadcasts in a row than the ring holds, roots changing every call
    for dtype in DTYPES:
        for count in (0, 1, 3, 17, 1001, 4097, 16384 // np.dtype(dtype).itemsize + 1, 20011):
            for root in range(n):
                seed = (DTYPES.index(dtype) * 100003 + count) * 17 + root
                x = payload(seed, count, dtype) if r == root else np.zeros(count, dtype)
                got = d.broadcast(x, root, name=f"eb.{dtype}.{count}.{root}")
                np.testing.assert_array_equal(got, payload(seed, count, dtype))
                y = payload(seed + 1, count, dtype) if r == root else np.zeros(count, dtype)
                assert d.broadcast_(y, root, name=f"eb_.{dtype}.{count}.{root}") is y
                np.testing.assert_array_equal(y, payload(seed + 1, count, dtype))
                calls += 2
    z = np.float64(3.5) if r == 0 else np.float64(0)
    assert float(d.broadcast(np.asarray(z), 0, name="eb.0d")) == 3.5
    assert d.stats()["ll_collectives"] - before >= calls // 2  # most went through the channel


@pytest.mark.timeout(60)
def test_root_runs_ahead_of_late_receivers(ll):
    d = ll
    r = d.rank()
    if r != 0:
        time.sleep(0.3)  # the root posts as far ahead as the ring allows, then waits (bounded)
    for k in range(40):
        x = np.full(5, k if r == 0 else -1, np.int32)
        d.broadcast_(x, 0, name=f"eb.ahead.{k}")
        np.testing.assert_array_equal(x, np.full(5, k, np.int32))
    np.testing.assert_array_equal(d.allreduce(np.ones(2, np.float32), op="sum", name="eb.ahead.after"),
                                  np.full(2, d.size(), np.float32))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["shape", "dtype", "name", "root"])
def test_mismatch_raises_on_every_rank(ll, what):
    d = ll
    n, r = d.size(), d.rank()
    last = r == n - 1  # this rank calls something else than the others
    shape = 4 if (what == "shape" and last) else 3
    dtype = np.float64 if (what == "dtype" and last) else np.float32
    name = f"eb.mm.{what}" + (".other" if (what == "name" and last) else "")
    root = (1 if what == "root" and last else 0)
    t0 = time.monotonic()
    with pytest.raises(d.DistributedError, match="different arguments") as ei:
        d.broadcast(np.ones(shape, dtype), root, name=name)
        d.barrier(name=f"eb.mm.{what}.next")  # ranks whose broadcast went through learn of it here
    assert "rank" in str(ei.value) and "broadcast" in str(ei.value)
    assert time.monotonic() - t0 < 20  # at once, not after the 60 s timeout
    # every rank raised exactly once: the channel and the stream keep working
    for k in range(3):
        got = d.broadcast(np.full(2, 7.0 if r == 1 % n else 0.0, np.float32), 1 % n, name=f"eb.mm.{what}.after.{k}")
        np.testing.assert_array_equal(got, [7.0, 7.0])
    np.testing.assert_array_equal(d.allreduce(np.ones(2, np.float32), op="sum", name=f"eb.mm.{what}.ar"),
                                  np.full(2, n, np.float32))


@pytest.mark.timeout(60)
def test_root_through_its_engine_and_receivers_blocking(ll):
    """The root runs the broadcast as an async handle (its engine); the receivers call the blocking
    broadcast: they find no eager entry, see the root busy in its engine and join it there."""
    d = ll
    r = d.rank()
    for k in range(3):
        x = np.full(3, 10 + k if r == 0 else 0, np.float32)
        if r == 0:
            h = d.broadcast_async_(x, 0, name=f"eb.engine.{k}")
            d.synchronize(h)
        else:
            d.broadcast_(x, 0, name=f"eb.engine.{k}")
        np.testing.assert_array_equal(x, np.full(3, 10 + k, np.float32))
    # the stream is still aligned: eager broadcasts from every root
    for k in range(12):
        root = k % d.size()
        got = d.broadcast(np.full(2, k if r == root else -1, np.int64), root, name=f"eb.engine.after.{k}")
        np.testing.assert_array_equal(got, [k, k])


@pytest.mark.timeout(60)
def test_interleaves_with_async_allreduces(ll):
    d = ll
    n, r = d.size(), d.rank()
    hs = []
    for k in range(20):
        hs.append(d.allreduce_async(np.full(4, float(k), np.float32), op="sum", name=f"eb.mix.ar.{k}"))
        got = d.broadcast(np.full(3, k if r == k % n else -1, np.int32), k % n, name=f"eb.mix.bc.{k}")
        np.testing.assert_array_equal(got, [k, k, k])
    for k, h in enumerate(hs):
        np.testing.assert_array_equal(d.synchronize(h), np.full(4, float(k * n), np.float32))


@pytest.mark.timeout(60)
def test_receiver_that_never_comes_fails_the_root_within_the_deadline(dist):
    """The root's broadcast returns at once; its next collective waits for the receivers no longer
    than the deadline and then raises, naming the rank; the receivers' own calls time out too."""
    with engine_env(dist, AIMASS_COMM_TIMEOUT="1.0"):
        if not dist._require_engine().ll_slot_bytes:
            pytest.skip("no low-latency channel")
        r = dist.rank()
        t0 = time.monotonic()
        if r == 0:
            dist.broadcast(np.ones(2, np.float32), 0, name="eb.lost")  # returns: eager
            with pytest.raises(dist.DistributedError, match="did not take part|timed out"):
                dist.allreduce(np.ones(2, np.float32), op="sum", name="eb.lost.next")
        else:
            with pytest.raises(dist.DistributedError):
                dist.allreduce(np.ones(2, np.float32), op="sum", name="eb.lost.next")
        assert time.monotonic() - t0 < 20
    np.testing.assert_array_equal(dist.allreduce(np.ones(2, np.float32), op="sum", name="eb.lost.after"),
                                  np.full(2, dist.size(), np.float32))


@pytest.mark.timeout(90)
def test_broadcasts_from_threads_interleaving_differently_per_rank(ll, in_threads):
    """Only the thread that started aimass.dist posts eagerly; other threads' broadcasts keep the
    name-matched paths, so broadcasts that interleave differently on each rank still pair by name."""
    d = ll
    n, r = d.size(), d.rank()

    def step(tid, i):
        root = (tid + i) % n
        got = d.broadcast(np.full(3, tid * 100 + i if r == root else -1, np.int32), root, name=f"eb.t{tid}.{i}")
        return None if (got == tid * 100 + i).all() else str(got)

    in_threads(step, steps=15)
    # and the main thread's eager stream is unaffected
    got = d.broadcast(np.full(2, 5 if r == 0 else 0, np.int16), 0, name="eb.t.after")
    np.testing.assert_array_equal(got, [5, 5])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("copy_max,push", [(None, None), ("0", None), (None, "0")])
def test_single_copy_broadcasts_in_the_stream(dist, copy_max, push):
    """Broadcasts above AIMASS_LL_EAGER_COPY_MAX_BYTES (default 4 KiB; "0": every non-empty one) are
    posted by address in the eager stream: the receivers read the root's array itself, the root returns
    once every receiver acknowledged. Every dtype, odd sizes on both sides of the bounds (the copy bound,
    the 64 KiB ring entry, the 4 MiB single-copy bound), every root, in place or not, back to back:
    bit-exact. From 32 KiB the root writes some pieces into the receivers' outputs itself, unless
    AIMASS_SHM_CMA_PUSH=0 (then a receiver reads them all, and from 128 KiB they go through the channel's
    exchange, as before). Past 4 MiB too (the bound is 1 GiB): 5 MiB + odd sizes, taken by the stream."""
    with engine_env(dist, AIMASS_LL_EAGER_COPY_MAX_BYTES=copy_max, AIMASS_SHM_CMA_PUSH=push) as d:
        if not d._require_engine().ll_slot_bytes:
            pytest.skip("no low-latency channel")
        n, r = d.size(), d.rank()
        before = d.stats()["ll_collectives"]
        calls = 0
        for dtype in DTYPES:
            es = np.dtype(dtype).itemsize
            counts = [1, 4095 // es, 4096 // es + 1, 16411 // es, (32 << 10) // es + 1, (64 << 10) // es + 3,
                      (128 << 10) // es + 1,
                      (1 << 20) // es + 5]
            if dtype in ("float32", "int8"):
                counts += [(4 << 20) // es, (4 << 20) // es + 1, (5 << 20) // es + 3]  # (the old 4 MiB bound)
            for count in counts:
                for root in range(n):
                    seed = (DTYPES.index(dtype) * 7919 + count) * 31 + root
                    want = payload(seed, count, dtype)
                    x = want.copy() if r == root else np.zeros(count, dtype)
                    got = d.broadcast(x, root, name=f"sc.{dtype}.{count}.{root}")
                    np.testing.assert_array_equal(got, want)
                    if r == root:
                        np.testing.assert_array_equal(x, want)  # the root's input is left alone
                    assert d.broadcast_(x, root, name=f"sc_.{dtype}.{count}.{root}") is x
                    np.testing.assert_array_equal(x, want)
                    calls += 2
        assert d.stats()["ll_collectives"] - before >= calls // 2
        # large ones run in the stream, not through the engine (a late peer may send some there)
        big = np.arange((24 << 20) // 4 + 7, dtype=np.float32)
        took = 0
        for k in range(4):
            root = k % n
            x = big + k if r == root else np.zeros_like(big)
            ll0 = d.stats()["ll_collectives"]
            assert d.broadcast_(x, root, name=f"sc.big.{k}") is x
            took += d.stats()["ll_collectives"] - ll0
            np.testing.assert_array_equal(x, big + k)
        if push is None:  # (without the push, broadcasts from 128 KiB go through the exchange or the engine)
            assert took >= 1, took  # (with the 4 MiB bound: none)
        # the root changes its array right after each call returns: every receiver still got the old one
        x = np.zeros(40000, np.int32)
        for k in range(30):
            root = k % n
            if r == root:
                x[:] = k
            d.broadcast_(x, root, name=f"sc.reuse.{k}")
            np.testing.assert_array_equal(x, np.full(40000, k, np.int32))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["shape", "dtype", "root"])
def test_single_copy_mismatch_raises_on_every_rank(ll, what):
    """A root posting by address and a receiver asking for something else: the receiver raises at once
    and reads nothing, the root raises in the same call or its next collective; nothing hangs."""
    d = ll
    n, r = d.size(), d.rank()
    last = r == n - 1
    count = 20000 + (7 if (what == "shape" and last) else 0)
    dtype = np.float64 if (what == "dtype" and last) else np.float32
    root = (n - 1 if what == "root" and last else 0)
    t0 = time.monotonic()
    with pytest.raises(d.DistributedError, match="different arguments"):
        d.broadcast(np.ones(count, dtype), root, name=f"sc.mm.{what}")
        d.barrier(name=f"sc.mm.{what}.next")
    assert time.monotonic() - t0 < 20
    for k in range(3):
        want = np.arange(30000, dtype=np.int32) * (k + 1)
        got = d.broadcast(want if r == 1 % n else np.zeros_like(want), 1 % n, name=f"sc.mm.{what}.after.{k}")
        np.testing.assert_array_equal(got, want)


@pytest.mark.timeout(60)
def test_single_copy_receiver_that_never_comes_fails_the_root_within_the_deadline(dist):
    """A root posting by address waits for its receivers in the call itself, no longer than the deadline."""
    with engine_env(dist, AIMASS_COMM_TIMEOUT="1.0"):
        if not dist._require_engine().ll_slot_bytes:
            pytest.skip("no low-latency channel")
        r = dist.rank()
        t0 = time.monotonic()
        if r == 0:
            with pytest.raises(dist.DistributedError, match="did not take part|timed out"):
                dist.broadcast(np.ones(50000, np.float32), 0, name="sc.lost")
        else:
            with pytest.raises(dist.DistributedError):
                dist.allreduce(np.ones(2, np.float32), op="sum", name="sc.lost.next")
        assert time.monotonic() - t0 < 20
    np.testing.assert_array_equal(dist.allreduce(np.ones(2, np.float32), op="sum", name="sc.lost.after"),
                                  np.full(2, dist.size(), np.float32))
