"""The caller-thread fast path: blocking small collectives through the low-latency shared-memory
channel (docs/comm.md). Results must equal the engine's path bit for bit; anything irregular
(mismatched arguments, async work queued on some rank, threads, slow peers) must fall back to
the engine and keep its guarantees (a mismatch raises DistributedError, never hangs)."""
import os
import sys
import time

import numpy as np
import pytest
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _engine_env import engine_env  # noqa: E402

DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"]
OPS = ["sum", "average", "min", "max", "product"]


def data(seed, rank, count, dtype):
    rng = np.random.default_rng(seed * 101 + rank)
    if dtype == "bool":
        return rng.integers(0, 2, count).astype(bool)
    if dtype in ("float32", "float64", "float16"):
        return rng.integers(-8, 9, count).astype(dtype) / 4  # exact in every float type
    lo, hi = (0, 4) if dtype == "uint8" else (-3, 4)
    return rng.integers(lo, hi, count).astype(dtype)


def engine_result(d, fn):
    d.set_ll_max_bytes(0)
    try:
        return fn()
    finally:
        d.set_ll_max_bytes(d._require_engine().ll_slot_bytes)


def check_against_engine(d, x, op, tag, inplace=None):
    """One blocking allreduce of x against the engine path's: the same bits out of place (input left
    intact) and in place (`inplace`, a copy of x unless given, e.g. a view at another offset), the same
    on every rank, and at most one fast-path collective (0 when a slow peer made the attempt fall back)."""
    x0 = x.copy()
    before = d.stats()["ll_collectives"]
    got = d.allreduce(x, op=op, name=tag)
    fast = d.stats()["ll_collectives"] - before
    want = engine_result(d, lambda: d.allreduce(x, op=op, name=f"eng.{tag}"))
    np.testing.assert_array_equal(x, x0)  # input intact
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    inplace = x.copy() if inplace is None else inplace
    assert d.allreduce_(inplace, op=op, name=f"ip.{tag}") is inplace
    np.testing.assert_array_equal(inplace, want)
    everyone = d.allgather(np.frombuffer(got.tobytes(), np.uint8).reshape(1, -1), name=f"chk.{tag}")
    assert (everyone == everyone[:1]).all()
    assert fast in (0, 1)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("dtype", DTYPES)
def test_allreduce_matches_engine_path(ll, dtype):
    d = ll
    r = d.rank()
    for op in OPS:
        if dtype == "bool" and op == "average":
            continue
        for count in (1, 3, 17, 255, 1001):
            x = data(count + OPS.index(op), r, count, dtype)
            before = d.stats()["ll_collectives"]
            got = d.allreduce(x, op=op, name=f"ll.{dtype}.{op}.{count}")
            fast = d.stats()["ll_collectives"] - before
            want = engine_result(d, lambda: d.allreduce(x, op=op, name=f"eng.{dtype}.{op}.{count}"))
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
            inplace = x.copy()
            assert d.allreduce_(inplace, op=op, name=f"ll_.{dtype}.{op}.{count}") is inplace
            np.testing.assert_array_equal(inplace, want)
            # every rank got the same bits (the channel reduces in rank order on every rank)
            everyone = d.allgather(got.reshape(1, -1).view(np.uint8), name=f"llcheck.{dtype}.{op}.{count}")
            assert (everyone == everyone[:1]).all()
            assert fast in (0, 1)  # 1 unless a slow peer made the attempt fall back


@pytest.mark.timeout(60)
def test_steady_state_takes_the_fast_path(ll):
    d = ll
    n = d.size()
    x = np.ones(2, np.float32)
    before = d.stats()
    for i in range(200):
        np.testing.assert_array_equal(d.allreduce(x, op="sum", name="ll.steady"), np.full(2, n, np.float32))
    after = d.stats()
    # the odd attempt may fall back (a rank descheduled past the fallback window); most do not
    assert after["ll_collectives"] - before["ll_collectives"] >= 100
    assert after["ll_collectives"] - before["ll_collectives"] + after["ll_fallbacks"] - before["ll_fallbacks"] >= 200


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", ["float32", "int64", "float16", "bool"])
def test_broadcast_allgather_reduce_scatter(ll, dtype):
    d = ll
    n, r = d.size(), d.rank()
    for root in range(n):
        x = data(root, r, 13, dtype).reshape(13, 1)
        want = data(root, root, 13, dtype).reshape(13, 1)
        np.testing.assert_array_equal(d.broadcast(x, root, name=f"ll.bc.{dtype}.{root}"), want)
        y = x.copy()
        d.broadcast_(y, root, name=f"ll.bc_.{dtype}.{root}")
        np.testing.assert_array_equal(y, want)
    # allgather: a different number of rows per rank, and a scalar
    mine = data(5, r, (r + 1) * 3, dtype).reshape(r + 1, 3)
    got = d.allgather(mine, name=f"ll.ag.{dtype}")
    np.testing.assert_array_equal(got, np.concatenate([data(5, j, (j + 1) * 3, dtype).reshape(j + 1, 3)
                                                       for j in range(n)]))
    s = d.allgather(np.array(data(6, r, 1, dtype)[0]), name=f"ll.ag0.{dtype}")
    np.testing.assert_array_equal(s, np.concatenate([data(6, j, 1, dtype) for j in range(n)]))
    # reduce_scatter: a first dimension that does not divide by the world size
    for op in ("sum", "max") if dtype == "bool" else ("sum", "average", "min"):
        t = data(7, r, (2 * n + 1) * 2, dtype).reshape(2 * n + 1, 2)
        got = d.reduce_scatter(t, op=op, name=f"ll.rs.{dtype}.{op}")
        want = engine_result(d, lambda: d.reduce_scatter(t, op=op, name=f"eng.rs.{dtype}.{op}"))
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    d.barrier(name=f"ll.barrier.{dtype}")


@pytest.mark.timeout(60)
def test_mismatch_on_the_fast_path_raises(ll):
    d = ll
    r = d.rank()
    cases = [
        (np.ones(3 + (r == 0), np.float32), "sum"),  # shape
        (np.ones(3, np.float32 if r else np.float64), "sum"),  # dtype
        (np.ones(3, np.float32), "sum" if r else "max"),  # op
    ]
    for i, (x, op) in enumerate(cases):
        t0 = time.monotonic()
        with pytest.raises(d.DistributedError, match="different arguments"):
            d.allreduce(x, op=op, name=f"ll.bad.{i}")
        assert time.monotonic() - t0 < 20  # raised, not hung (the engine's timeout is 60 s)
    with pytest.raises(d.DistributedError, match="different arguments"):
        d.broadcast(np.ones(2, np.float32), r % 2, name="ll.bad.root")
        d.barrier(name="ll.bad.root.next")  # a rank whose eager broadcast went through learns of it here
    # names that differ: each times out (the call's timeout) naming what every rank submitted
    with pytest.raises(d.DistributedError, match="did not submit it"):
        d.allreduce(np.ones(2, np.float32), name=f"ll.only.{r}", timeout=1.0)
    # the channel still works afterwards
    np.testing.assert_array_equal(d.allreduce(np.ones(2, np.float32), op="sum", name="ll.after"),
                                  np.full(2, d.size(), np.float32))


@pytest.mark.timeout(60)
def test_interleaves_with_async_ops_in_any_order(ll):
    d = ll
    n, r = d.size(), d.rank()
    for k in range(10):
        # rank 0 queues async work first, the others run the blocking call first
        if r == 0:
            h = d.allreduce_async(np.full(5, 1.0, np.float32), op="sum", name=f"ll.async.{k}")
            a = d.allreduce(np.full(3, 2.0, np.float32), op="sum", name=f"ll.sync.{k}")
            b = d.synchronize(h)
        else:
            a = d.allreduce(np.full(3, 2.0, np.float32), op="sum", name=f"ll.sync.{k}")
            b = d.allreduce(np.full(5, 1.0, np.float32), op="sum", name=f"ll.async.{k}")
        np.testing.assert_array_equal(a, np.full(3, 2.0 * n, np.float32))
        np.testing.assert_array_equal(b, np.full(5, 1.0 * n, np.float32))
    # fused async gradients in flight while blocking calls run on every rank
    hs = [d.allreduce_async(np.full(7, float(i), np.float32), op="sum", name=f"ll.g.{i}") for i in range(8)]
    m = d.allreduce(np.full(1, float(r), np.float64), op="max", name="ll.metric")
    assert m[0] == n - 1
    for i, h in enumerate(hs):
        np.testing.assert_array_equal(d.synchronize(h), np.full(7, float(i) * n, np.float32))


@pytest.mark.timeout(90)
def test_concurrent_threads(ll, in_threads):
    d = ll
    n = d.size()

    def step(tid, i):
        got = d.allreduce(np.full(4, float(tid + i), np.float32), op="sum", name=f"ll.t{tid}.{i}")
        return None if (got == (tid + i) * n).all() else str(got)

    in_threads(step)


@pytest.mark.timeout(60)
def test_slow_peer_past_the_fallback_window(ll):
    d = ll
    n, r = d.size(), d.rank()
    for k in range(3):
        if r == n - 1:
            time.sleep(0.12)  # longer than the 50 ms fallback window: the others go to the engine
        got = d.allreduce(np.full(6, float(k), np.float32), op="sum", name=f"ll.slow.{k}")
        np.testing.assert_array_equal(got, np.full(6, k * n, np.float32))


@pytest.mark.timeout(60)
def test_sizes_around_the_slot(ll):
    d = ll
    n = d.size()
    slot = d._require_engine().ll_slot_bytes
    for nbytes in (slot - 4, slot, slot + 4, 3 * slot):  # the last two: single copy (or the engine)
        x = np.ones(nbytes // 4, np.float32)
        got = d.allreduce(x, op="sum", name=f"ll.edge.{nbytes}")
        assert got.shape == x.shape and (got == n).all()
    d.set_ll_max_bytes(16)
    x = np.ones(5, np.float32)  # 20 bytes: above the lowered limit
    before = d.stats()["ll_collectives"]
    assert (d.allreduce(x, op="sum", name="ll.limit") == n).all()
    assert d.stats()["ll_collectives"] == before
    with pytest.raises(ValueError, match="set_ll_max_bytes"):
        d.set_ll_max_bytes(-1)


@pytest.mark.timeout(150)
def test_single_copy_broadcast_and_allgather(ll):
    """Broadcast and allgather of 16 KiB or more: the peers read the posting rank's array itself, so
    it must not return before they have; it overwrites its array at once to catch that."""
    d = ll
    n, r = d.size(), d.rank()
    slot = d._require_engine().ll_slot_bytes
    # past the slot too: a single-copy payload is not staged in it
    sizes = [b for b in ((16 << 10) - 8, 16 << 10, (16 << 10) + 12, 65536 + 36, slot - 8) if b <= slot]
    sizes += [slot + 20, (3 << 20) + 44]
    for nbytes in sizes:
        count = nbytes // 4
        for root in range(n):
            want = data(nbytes + root, root, count, "float32")
            x = data(nbytes + root, r, count, "float32")
            before = d.stats()["ll_collectives"]
            d.broadcast_(x, root, name=f"ll.cma.bc.{nbytes}.{root}")
            fast = d.stats()["ll_collectives"] - before
            got = x.copy()
            x[:] = -1  # the peers must have their copies already
            np.testing.assert_array_equal(got, want)
            out = d.broadcast(data(nbytes + root, r, count, "float32"), root, name=f"ll.cma.bco.{nbytes}.{root}")
            np.testing.assert_array_equal(out, want)
            assert fast in (0, 1)
        # allgather: a different number of rows per rank (3 float32 per row)
        rows = count // 3 + r
        mine = data(nbytes, r, rows * 3, "float32").reshape(rows, 3)
        got = d.allgather(mine, name=f"ll.cma.ag.{nbytes}")
        mine[:] = -1
        np.testing.assert_array_equal(got, np.concatenate(
            [data(nbytes, j, (count // 3 + j) * 3, "float32").reshape(-1, 3) for j in range(n)]))
    # allgather runs in the caller's thread up to 1 GiB per rank (broadcast only to 4 MiB; past 64 MiB
    # per rank since the caller's thread beat the engine there too): large and uneven rows (cheap data:
    # whole rows of a value per rank and row, so that every rank can build the reference)
    def rows_of(j, rows):
        return (np.arange(rows, dtype=np.float32)[:, None] % 1021 + np.float32(j * 2048)
                + np.arange(3, dtype=np.float32) / 4)
    for nbytes in ((9 << 20) + 44, (64 << 20) - 12, (64 << 20) + 24, (96 << 20) + 36):
        count = nbytes // 4
        mine = rows_of(r, count // 3 + r)
        before = d.stats()["ll_collectives"]
        got = d.allgather(mine, name=f"ll.cma.agbig.{nbytes}")
        fast = d.stats()["ll_collectives"] - before
        mine[:] = -1
        at = 0
        for j in range(n):
            k = count // 3 + j
            np.testing.assert_array_equal(got[at:at + k], rows_of(j, k))
            at += k
        assert at == got.shape[0]
        assert fast in (0, 1)  # 1 unless a slow peer made the attempt fall back
        del got
    # the same number of rows everywhere (the result is a recycled block) and results past the
    # last-level cache, whose own rows are copied with streaming stores: byte rows, so that a rank's
    # rows start at an odd offset in the result and the copy has an unaligned head and tail
    for nbytes in ((16 << 20) + 13, (40 << 20) + 1):
        mine = np.frombuffer(np.random.default_rng(nbytes + r).bytes(nbytes), np.uint8)
        before = d.stats()["ll_collectives"]
        got = d.allgather(mine, name=f"ll.cma.agstream.{nbytes}")
        fast = d.stats()["ll_collectives"] - before
        assert got.shape == (n * nbytes,) and got.dtype == np.uint8
        for j in range(n):
            want = np.frombuffer(np.random.default_rng(nbytes + j).bytes(nbytes), np.uint8)
            np.testing.assert_array_equal(got[j * nbytes:(j + 1) * nbytes], want)
        assert fast in (0, 1)
        del got
    d.barrier(name="ll.cma.end")


@pytest.mark.timeout(120)
def test_gather_results_in_recycled_blocks_stay_valid(ll):
    """Blocking allgather / reduce_scatter results of 1 MiB or more live in recycled result blocks
    (huge pages from 4 MiB): a block goes back only when its array and every view of it are gone,
    so a later gather of the same size never writes into a result still held."""
    d = ll
    n, r = d.size(), d.rank()
    for nbytes in ((1 << 20) + 64, (5 << 20) + 4096):
        count = nbytes // 4 // n * n
        held, views, rss = {}, {}, []
        for it in range(6):  # more than the pool keeps
            part = np.full(count // n, it * 16 + r, np.float32)
            got = d.allgather(part, name=f"ll.pool.ag.{nbytes}")
            assert got.flags.c_contiguous and got.flags.writeable and got.shape == (count,)
            if it % 2:
                views[it] = got[count // 2:]  # only a view keeps the block
                del got
            else:
                held[it] = got
            x = np.full(count, it + r, np.float32)
            rss.append(d.reduce_scatter(x, op="sum", name=f"ll.pool.rs.{nbytes}"))
        for it, got in held.items():
            np.testing.assert_array_equal(got, np.repeat(np.arange(n, dtype=np.float32) + it * 16, count // n))
        for it, v in views.items():
            want = np.repeat(np.arange(n, dtype=np.float32) + it * 16, count // n)[count // 2:]
            np.testing.assert_array_equal(v, want)
        for it, rs in enumerate(rss):
            np.testing.assert_array_equal(rs, np.full(count // n, n * it + n * (n - 1) / 2, np.float32))
        # a held result is the caller's own memory: writing it disturbs no later gather
        held[0][:] = 7
        again = d.allgather(np.full(count // n, r, np.float32), name=f"ll.pool.ag.{nbytes}")
        np.testing.assert_array_equal(again, np.repeat(np.arange(n, dtype=np.float32), count // n))
        np.testing.assert_array_equal(held[0], 7)
        del held, views, rss, again
    d.barrier(name="ll.pool.end")


@pytest.mark.timeout(120)
def test_out_of_place_allreduce_results_in_recycled_blocks(ll):
    """Out-of-place allreduce and broadcast results of 1 MiB or more (numpy through the lean lane, torch
    through the general path) live in the recycled result blocks as gather results do: a result released
    gives its block to the next result of its size (no fresh pages to fault in), and a held one is never
    written by a later call."""
    d = ll
    n, r = d.size(), d.rank()
    torch = pytest.importorskip("torch")
    for nbytes in ((1 << 20) + 64, (5 << 20) + 4096):
        count = nbytes // 4
        for kind in ("numpy", "torch"):
            def call(it):
                x = np.full(count, it + r, np.float32) + np.arange(count, dtype=np.float32) % 5
                t = x if kind == "numpy" else torch.from_numpy(x.copy())
                got = d.allreduce(t, op="sum", name=f"ll.pool.ar.{kind}.{nbytes}")
                assert (x == (np.full(count, it + r, np.float32) + np.arange(count, dtype=np.float32) % 5)).all()
                return got
            def want(it):
                return np.float32(n * it + n * (n - 1) / 2) + n * (np.arange(count, dtype=np.float32) % 5)
            def addr(a):
                return a.ctypes.data if kind == "numpy" else a.data_ptr()
            held = {it: call(it) for it in range(3)}
            got = call(3)
            np.testing.assert_array_equal(np.asarray(got), want(3))
            released = addr(got)
            del got
            again = call(4)
            assert addr(again) == released, "the released result's block was not reused"
            np.testing.assert_array_equal(np.asarray(again), want(4))
            for it, h in held.items():  # held results were never written by the later calls
                assert addr(h) != released
                np.testing.assert_array_equal(np.asarray(h), want(it))
            del held, again
        b = d.broadcast(np.full(count, r, np.float32), root_rank=0, name=f"ll.pool.bc.{nbytes}")
        np.testing.assert_array_equal(b, np.zeros(count, np.float32))
        released = b.ctypes.data
        del b
        b = d.broadcast(np.full(count, r + 1, np.float32), root_rank=n - 1, name=f"ll.pool.bc.{nbytes}")
        assert b.ctypes.data == released
        np.testing.assert_array_equal(b, np.full(count, n, np.float32))
        del b
    d.barrier(name="ll.pool.ar.end")


@pytest.mark.timeout(120)
def test_single_copy_allreduce_every_dtype_and_op(ll):
    """Allreduces of more than 256 KiB run in the caller's thread as a claimed-piece push (each piece read
    from every rank's input, reduced in rank order and written into every rank's output): the engine's
    bits, the same on every rank, in place and out of place, at odd sizes (pieces of 16 KiB to 256 KiB)."""
    d = ll
    r = d.rank()
    slot = d._require_engine().ll_slot_bytes
    for dtype in DTYPES:
        es = np.dtype(dtype).itemsize
        for op in OPS:
            if dtype == "bool" and op == "average":
                continue
            for nbytes in ((256 << 10) + es, slot + es, slot + (256 << 10) + 7 * es):
                count = nbytes // es
                x = data(count + OPS.index(op), r, count, dtype)
                check_against_engine(d, x, op, f"push.{dtype}.{op}.{count}")
    # large and odd, through the handle path too (torch-style blocking submit), then a shape
    # mismatch past the slot: raised by the engine's negotiation on every rank, never hung
    n = d.size()
    x = np.full((16 << 20) // 4 + 9, 1.5, np.float32)
    np.testing.assert_array_equal(d.allreduce(x, op="sum", name="push.big"), np.full(x.size, 1.5 * n, np.float32))
    before = d.stats()["ll_collectives"]
    got = d.allreduce(x, op="max", name="push.big.handle", timeout=30.0)  # (timeout=: the handle path)
    assert d.stats()["ll_collectives"] - before in (0, 1)
    np.testing.assert_array_equal(got, x)
    h = d.allreduce_async(x, op="min", name="push.big.async")  # async: the engine
    np.testing.assert_array_equal(d.synchronize(h), x)
    t0 = time.monotonic()
    with pytest.raises(d.DistributedError, match="different arguments"):
        d.allreduce(np.ones(slot // 4 + 5 + (r == 0), np.float32), op="sum", name="push.bad")
    assert time.monotonic() - t0 < 20
    np.testing.assert_array_equal(d.allreduce(np.ones(slot // 4 + 5, np.float32), op="sum", name="push.after"),
                                  np.full(slot // 4 + 5, n, np.float32))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("staged", ["1", "0", "mixed", "auto", "nocma"])
def test_staged_and_push_allreduce_every_dtype_and_op(ll, staged):
    """Allreduces above 256 KiB run either staged through the channel's shared-memory rings or as the
    claimed-piece push, chosen per call by the ranks' votes (AIMASS_LL_STAGED: 1 always staged, 0 always
    push, unset: timed; "mixed": ranks set it differently, which must still agree on one way): the
    engine's bits, the same on every rank, in place and out of place, at odd sizes around the staging
    chunk; a shape mismatch past the slot raises on every rank. "nocma": peers may not write each other's
    memory (AIMASS_SHM_CMA_PUSH=0, as under a ptrace restriction): every large allreduce is staged."""
    r, n = ll.rank(), ll.size()
    env = {"mixed": ("1" if r % 2 == 0 else "0"), "nocma": "auto"}.get(staged, staged)
    with engine_env(ll, AIMASS_LL_STAGED=env, AIMASS_SHM_CMA_PUSH="0" if staged == "nocma" else None) as d:
        slot = d._require_engine().ll_slot_bytes
        for dtype in DTYPES:
            es = np.dtype(dtype).itemsize
            for op in OPS:
                if dtype == "bool" and op == "average":
                    continue
                for nbytes in ((256 << 10) + es, (512 << 10) * 3 + 5 * es, slot + (512 << 10) + 7 * es):
                    count = nbytes // es
                    x = data(count + OPS.index(op), r, count, dtype)
                    check_against_engine(d, x, op, f"st.{dtype}.{op}.{count}")
        # many calls of one size: the timed choice explores both ways; every result exact
        x = np.arange((3 << 20) // 4 + 3, dtype=np.float32) % 1024
        st0 = d.stats()
        before = st0["ll_collectives"]
        for i in range(70):
            y = x + np.float32(r)
            d.allreduce_(y, op="sum", name="st.many")
            np.testing.assert_array_equal(y, x * n + np.float32(n * (n - 1) // 2))
        # (without the push these ran staged in the caller's thread, or fell back to the engine when a peer
        # was late; not all 70 fall back)
        st1 = d.stats()
        assert st1["ll_collectives"] - before >= 1
        staged_runs = st1["ll_staged"] - st0["ll_staged"]  # of the caller-thread runs, how many staged
        if staged in ("1", "nocma"):
            assert staged_runs == st1["ll_collectives"] - before
        elif staged in ("0", "mixed"):  # (any rank's 0 wins)
            assert staged_runs == 0
        elif st1["ll_collectives"] - before >= 64:  # timed: the way not preferred runs every 32nd call
            assert 0 < staged_runs < st1["ll_collectives"] - before
        everyone = d.allgather(np.array([[staged_runs, st1["ll_collectives"] - before]], np.int64), name="st.cnt")
        assert (everyone == everyone[:1]).all()  # every rank ran each call the same way
        t0 = time.monotonic()
        with pytest.raises(d.DistributedError, match="different arguments"):
            d.allreduce(np.ones(slot // 4 + 5 + (r == 0), np.float32), op="sum", name="st.bad")
        assert time.monotonic() - t0 < 20
        np.testing.assert_array_equal(d.allreduce(np.ones(slot // 4 + 5, np.float32), op="sum", name="st.after"),
                                      np.full(slot // 4 + 5, n, np.float32))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("staged,step_off", [("0", None), ("1", None), ("auto", None), ("0", "0")])
def test_ranks_put_on_one_cpu_step_apart(ll, staged, step_off):
    """Every rank is put on the same CPU (a moment's affinity of that CPU alone, then its whole mask
    back: where the scheduler's packing leaves two ranks), then runs back-to-back large allreduces
    (push, staged, as voted; AIMASS_LL_STEP_OFF=0: the step-off turned off): a rank that waits for a
    peer on its own CPU steps off it. Every result exact, every rank ends with its whole mask, and
    nobody steps off where the ranks outnumber the CPUs, or with the switch off."""
    r, n = ll.rank(), ll.size()
    mask = os.sched_getaffinity(0)
    if len(mask) < 2:
        pytest.skip("needs two usable CPUs")
    with engine_env(ll, AIMASS_LL_STAGED=staged, AIMASS_LL_STEP_OFF=step_off) as d:
        x = np.arange((2 << 20) // 4 + 5, dtype=np.float32) % 1024
        before = d.stats()["ll_step_offs"]
        d.barrier(name="colo.start")
        os.sched_setaffinity(0, {min(mask)})
        os.sched_setaffinity(0, mask)
        for i in range(40):
            y = x + np.float32(r + i)
            d.allreduce_(y, op="sum", name="colo")
            np.testing.assert_array_equal(y, x * n + np.float32(n * (n - 1) // 2 + n * i))
        assert os.sched_getaffinity(0) == mask
        steps = d.stats()["ll_step_offs"] - before
        if step_off == "0" or n > (os.cpu_count() or 1):
            assert steps == 0


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["staged", "push", "staged-unaligned"])
def test_large_allreduce_of_arrays_inside_a_cache_line(ll, mode):
    """numpy's large arrays start 16 bytes into a page: the staged allreduce then cuts its chunks on the
    arrays' 64-byte lines (every rank posts where its output starts in its line; "staged-unaligned":
    AIMASS_LL_STAGE_ALIGN=0 on rank 0 only, so the ranks' posts differ and nobody shifts), and the reduce
    kernels start their stores on dst's next line. Views at element offsets equal on every rank and
    different per rank, sizes around the shortened first chunk, several dtypes, in place and out of
    place: the engine's bits, the same on every rank."""
    r = ll.rank()
    with engine_env(ll, AIMASS_LL_STAGED="0" if mode == "push" else "1",
                    AIMASS_LL_STAGE_ALIGN="0" if mode == "staged-unaligned" and r == 0 else None) as d:
        for dtype, op in (("float32", "sum"), ("float32", "average"), ("float16", "sum"), ("float64", "max"),
                          ("int8", "sum"), ("int32", "min")):
            es = np.dtype(dtype).itemsize
            chunk = (512 << 10) // es
            # elements past the buffer's start: the same on every rank, and (4 + rank) different per rank
            for s, shift in ((1, 1), (3, 3), (4, 4 + r), (15, 15)):
                for count in (chunk - s - 1, chunk - s + 1, 3 * chunk + 5 * s + 7):
                    base = data(count + shift, r, count + shift + 16, dtype)
                    check_against_engine(d, base[shift:shift + count], op, f"al.{mode}.{dtype}.{op}.{s}.{count}",
                                         inplace=base.copy()[shift:shift + count])


@pytest.mark.timeout(60)
def test_allreduce_entries_take_plain_calls_and_pass_the_rest(ll):
    """allreduce / allreduce_ are vectorcall objects: the tensor with name= and op= (by position or
    keyword) enter the lean lane directly; any other argument goes to the Python function, unchanged."""
    import copy
    import inspect
    import pickle
    d = ll
    n, r = d.size(), d.rank()
    for f in (d.allreduce, d.allreduce_):
        assert inspect.signature(f) == inspect.signature(f.__wrapped__) and f.__doc__ == f.__wrapped__.__doc__
        # pickled by reference, as the functions they replace were (multiprocessing, partials)
        assert pickle.loads(pickle.dumps(f)) is f and copy.deepcopy(f) is f
    x = np.arange(5, dtype=np.float32) + r
    total = sum(np.arange(5, dtype=np.float32) + j for j in range(n))
    st = d.stats()
    before = st["ll_collectives"] + st["ll_fallbacks"]
    np.testing.assert_array_equal(d.allreduce(x, name="ent.kw", op="sum"), total)
    np.testing.assert_array_equal(d.allreduce(x, None, "ent.pos", None, "sum"), total)  # (compression 4th)
    y = x.copy()
    assert d.allreduce_(y, None, "ent.pos_", "sum", 1.0, 1.0, d.global_process_set) is y
    np.testing.assert_array_equal(y, total)
    np.testing.assert_array_equal(d.allreduce(x, name="ent.avg"), total / n)  # op left out: average
    st = d.stats()
    assert st["ll_collectives"] + st["ll_fallbacks"] == before + 4  # every one took the channel
    # non-default arguments: the Python function (same results, same errors)
    np.testing.assert_array_equal(d.allreduce(x, name="ent.pre", op="sum", prescale_factor=2.0), 2 * total)
    np.testing.assert_array_equal(d.allreduce(x, name="ent.post", op="sum", postscale_factor=0.5), total / 2)
    np.testing.assert_array_equal(d.allreduce(x, name="ent.to", op="sum", timeout=30.0), total)
    with pytest.warns(DeprecationWarning):
        np.testing.assert_array_equal(d.allreduce(x, name="ent.avgarg", average=False), total)
    np.testing.assert_array_equal(d.allreduce_(x.copy(), name="ent.int", op="sum", prescale_factor=1), total)
    with pytest.raises(TypeError):
        d.allreduce(x, name="ent.bogus", bogus=1)
    with pytest.raises(TypeError):
        d.allreduce_(x, None, "ent.dup", name="ent.dup")  # name given by position and by keyword
    with pytest.raises(TypeError):
        d.allreduce()
    with pytest.raises(TypeError):
        d.allreduce(x, None, "ent.many", None, "sum", 1.0, 1.0, d.global_process_set, "extra")
    np.testing.assert_array_equal(d.allreduce(tensor=x, name="ent.tkw", op="sum"), total)


@pytest.mark.timeout(60)
def test_broadcast_entries_take_plain_calls_and_pass_the_rest(ll):
    """broadcast / broadcast_ are vectorcall objects too: the tensor with root_rank (or root=) and name=,
    by position or keyword, enter the lean lane directly; anything else goes to the Python function."""
    import copy
    import inspect
    import pickle
    d = ll
    n, r = d.size(), d.rank()
    for f in (d.broadcast, d.broadcast_):
        assert inspect.signature(f) == inspect.signature(f.__wrapped__) and f.__doc__ == f.__wrapped__.__doc__
        assert pickle.loads(pickle.dumps(f)) is f and copy.deepcopy(f) is f
    root = n - 1  # not rank 0
    want = np.arange(7, dtype=np.int16) * 3 - 5
    mine = want.copy() if r == root else np.zeros(7, np.int16)
    st = d.stats()
    before = st["ll_collectives"] + st["ll_fallbacks"]
    np.testing.assert_array_equal(d.broadcast(mine, root, name="bent.pos"), want)
    np.testing.assert_array_equal(d.broadcast(mine, root_rank=root, name="bent.kw"), want)
    np.testing.assert_array_equal(d.broadcast(mine, name="bent.root", root=root), want)
    y = mine.copy()
    assert d.broadcast_(y, root, "bent.pos_", d.global_process_set) is y
    np.testing.assert_array_equal(y, want)
    st = d.stats()
    assert st["ll_collectives"] + st["ll_fallbacks"] == before + 4  # every one took the channel
    # the rest: the Python function (same results, the usual errors)
    np.testing.assert_array_equal(d.broadcast(mine, root, name="bent.to", timeout=30.0), want)
    np.testing.assert_array_equal(d.broadcast(tensor=mine, root_rank=root, name="bent.tkw"), want)
    np.testing.assert_array_equal(d.broadcast(mine[::-1].copy()[::-1], root, name="bent.view"), want)
    with pytest.raises(TypeError):
        d.broadcast(mine, root, name="bent.bogus", bogus=1)
    with pytest.raises(TypeError):
        d.broadcast_(mine, root, "bent.dup", name="bent.dup")
    with pytest.raises(TypeError):
        d.broadcast()
    np.testing.assert_array_equal(d.broadcast(mine, root, name="bent.both", root=root), want)  # agreeing
    with pytest.raises(ValueError, match="disagree"):
        d.broadcast(mine, root, name="bent.two", root=(root + 1) % n)
    np.testing.assert_array_equal(d.broadcast(mine, name="bent.none"), np.zeros(7, np.int16))  # root 0's
    with pytest.raises(ValueError, match="root must be a rank"):
        d.broadcast(mine, n + 3, name="bent.range")  # refused alike on every rank
    with pytest.raises(ValueError, match="root must be a rank"):
        d.broadcast_(mine, True, name="bent.bool")
    np.testing.assert_array_equal(d.broadcast(mine, root, name="bent.after"), want)


@pytest.mark.timeout(60)
def test_lean_lane_takes_plain_calls_and_leaves_the_rest_to_the_full_path(ll):
    """The blocking numpy calls go through one C call (_comm_lean): plain arguments run there, anything
    else (views, read-only arrays, odd op/root spellings, bad values) takes the full path, which gives the
    same results and the usual errors."""
    d = ll
    n, r = d.size(), d.rank()
    x = np.arange(6, dtype=np.float32) + r
    want = sum(np.arange(6, dtype=np.float32) + j for j in range(n))
    st = d.stats()
    before = st["ll_collectives"] + st["ll_fallbacks"]
    got = d.allreduce(x, op=d.Sum, name="lean.enum")  # a ReduceOp member, a new array
    assert got is not x and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(x, np.arange(6, dtype=np.float32) + r)  # the input is untouched
    np.testing.assert_array_equal(d.allreduce(x, name="lean.avg"), want / n)  # default op: average
    st = d.stats()  # both went to the channel (a loaded machine may make an attempt fall back)
    assert st["ll_collectives"] + st["ll_fallbacks"] == before + 2
    # full path, same results: a strided view, a numpy integer root, root= spelled as keyword
    np.testing.assert_array_equal(d.allreduce(np.repeat(x, 2)[::2], op="sum", name="lean.view"), want)
    np.testing.assert_array_equal(d.broadcast(x, np.int64(n - 1), name="lean.np_root"),
                                  np.arange(6, dtype=np.float32) + n - 1)
    np.testing.assert_array_equal(d.broadcast(x, root=0, name="lean.kw_root"), np.arange(6, dtype=np.float32))
    # byte-swapped and unaligned arrays: the lane takes neither (a swapped one is refused, by every rank)
    with pytest.raises(TypeError, match="byte order"):
        d.allreduce(x.astype(x.dtype.newbyteorder()), op="sum", name="lean.swapped")
    odd = np.zeros(x.nbytes + 1, np.uint8)[1:].view(np.float32)
    odd[:] = x
    assert not odd.flags.aligned
    np.testing.assert_array_equal(d.allreduce(odd, op="sum", name="lean.unaligned"), want)
    # errors come from the full path, on every rank alike
    ro = x.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        d.allreduce_(ro, op="sum", name="lean.readonly")
    with pytest.raises((ValueError, TypeError)):
        d.allreduce(x, op="median", name="lean.badop")
    with pytest.raises((ValueError, TypeError)):
        d.broadcast(x, n, name="lean.badroot")
    with pytest.raises((ValueError, TypeError)):
        d.reduce_scatter(np.float32(1), name="lean.rs0d")
    # results of every kind and layout still agree with the engine's
    t = data(9, r, (2 * n + 1) * 3, "float32").reshape(2 * n + 1, 3)
    np.testing.assert_array_equal(d.reduce_scatter(t, op="max", name="lean.rs"),
                                  engine_result(d, lambda: d.reduce_scatter(t, op="max", name="eng.lean.rs")))
    g = d.allgather(np.full((r % 2, 2), r, np.int16), name="lean.ag.empty_rows")  # some ranks give no rows
    assert g.shape == (sum(j % 2 for j in range(n)), 2) and g.dtype == np.int16


@pytest.mark.timeout(60)
def test_idle_engines_park_and_wake_for_a_peer(ll, mpi):
    """With nothing queued anywhere the engines stop their negotiation rounds (parked), and a rank
    whose engine gets work wakes the others' through the channel: an async collective submitted
    by one rank while the others are still parked (and only later submit it) completes."""
    d = ll
    n, r = d.size(), d.rank()

    def rounds_stop():  # the engines agree they are idle within a few cycles; then no more rounds
        seen = [d.stats()["cycles"]]
        for _ in range(100):
            time.sleep(0.05)
            seen.append(d.stats()["cycles"])
            if len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]:
                return []
        return seen

    for k in range(3):
        d.barrier(name=f"park.sync.{k}")
        seen = rounds_stop()
        assert not seen, f"the idle engine kept running negotiation rounds: {seen} {d.stats()}"
        mpi.Barrier()  # (not through the engine) every rank saw the rounds stop
        if r != k % n:
            time.sleep(0.05)  # rank k % n submits first; the others' engines are parked meanwhile
        h = d.allreduce_async(np.full(4, r + 1.0, np.float32), op="sum", name=f"park.wake.{k}")
        np.testing.assert_array_equal(d.synchronize(h), np.full(4, n * (n + 1) / 2, np.float32))


@pytest.mark.timeout(180)
def test_large_allgather_pushes_rows_into_every_result(ll):
    """An allgather of equal parts whose result reaches AIMASS_LL_GATHER_PUSH_MIN_BYTES (128 MiB) is
    pushed: each rank writes its rows into every rank's result (process_vm_writev) instead of every rank
    reading the others'. The same bytes as the pull; it needs every rank to post its result, so a rank on
    the handle path, a rank with another bound, or parts of different sizes make every rank pull. Where the
    results are shared memory the peers map (engine.shared_gathers: the lean lane's results), every rank
    posts its result at any size and the rows go in with plain stores: below the bound and with mixed
    bounds pushed too (test_comm_shared_alloc.py covers that path)."""
    d = ll
    n, r = d.size(), d.rank()
    shared = d._require_engine().shared_gathers

    def part(nbytes, j):  # odd sizes: every rank's rows start at an odd offset in the result
        return np.frombuffer(np.random.default_rng(nbytes + 7 * j).bytes(nbytes), np.uint8)

    def gather(tag, nbytes, **kw):
        mine = part(nbytes, r)
        st = d.stats()
        got = d.allgather(mine, name=tag, **kw)
        st2 = d.stats()
        assert got.shape == (n * nbytes,) and got.dtype == np.uint8
        for j in range(n):
            np.testing.assert_array_equal(got[j * nbytes:(j + 1) * nbytes], part(nbytes, j))
        fast = st2["ll_collectives"] - st["ll_collectives"]
        pushed = st2["ll_gather_pushed"] - st["ll_gather_pushed"]
        # every rank counted the same path
        seen = d.allgather(np.array([[fast, pushed]], np.int64), name=f"{tag}.seen")
        assert (seen == seen[:1]).all(), seen
        return fast, pushed

    # the default bound: a 128 MiB result
    per = (128 << 20) // n + 4099
    fast, pushed = gather("ll.agpush.big", per)
    assert fast in (0, 1) and pushed == fast  # (0: a slow peer made the attempt fall back)
    # just below it: pulled (shared results: pushed)
    fast, pushed = gather("ll.agpush.below", (128 << 20) // n - 4099)
    assert pushed == (fast if shared else 0)
    # a rank on the handle path posts no result: every rank pulls
    assert gather("ll.agpush.handle", per, timeout=60.0 if r == n - 1 else None)[1] == 0
    with engine_env(d, AIMASS_LL_GATHER_PUSH_MIN_BYTES=1 << 20):
        for nbytes in ((1 << 20) + 1, (3 << 20) + 12345):
            fast, pushed = gather(f"ll.agpush.{nbytes}", nbytes)
            assert fast in (0, 1) and pushed == fast
        # parts of different sizes: pulled into a result of its own
        rows = 70000 + 1000 * r
        mine = np.full((rows, 4), r, np.float32)
        st = d.stats()
        got = d.allgather(mine, name="ll.agpush.uneven")
        assert d.stats()["ll_gather_pushed"] == st["ll_gather_pushed"]
        np.testing.assert_array_equal(got, np.concatenate([np.full((70000 + 1000 * j, 4), j, np.float32)
                                                            for j in range(n)]))
    # a rank whose bound differs posts nothing: every rank pulls, with the same bytes
    with engine_env(d, AIMASS_LL_GATHER_PUSH_MIN_BYTES=(1 << 20) if r else (1 << 40)):
        fast, pushed = gather("ll.agpush.mixed", (2 << 20) + 5)
        assert pushed == (fast if shared else 0)
    d.barrier(name="ll.agpush.end")


def test_gather_push_bound_must_be_a_byte_count(dist):
    with pytest.raises(ValueError, match="AIMASS_LL_GATHER_PUSH_MIN_BYTES"):
        with engine_env(dist, AIMASS_LL_GATHER_PUSH_MIN_BYTES="lots"):
            pass


@pytest.mark.timeout(120)
def test_torch_tensors_take_the_lean_lane(ll):
    """Blocking collectives of CPU torch tensors (no autograd) run in the caller's thread through their numpy
    view, as numpy arrays do (stats ll_collectives), with torch results that own their memory and the engine's
    values; in place they write the tensor itself; bfloat16 as its bits (a uint16 view labelled bfloat16),
    in the lane and in the async lean submission. A tensor that needs autograd and a non-contiguous one take
    the general path, with the same values."""
    torch = pytest.importorskip("torch")
    d = ll
    n, r = d.size(), d.rank()

    def lean(fn):
        before = d.stats()
        got = fn()
        after = d.stats()
        # each call ran in the channel, or fell back to the engine (a late peer: ranks may outnumber the cores)
        return got, after["ll_collectives"] - before["ll_collectives"] + after["ll_fallbacks"] - before["ll_fallbacks"]

    fast = 0
    for dtype in (torch.float32, torch.int64, torch.float16, torch.bfloat16):
        x = (torch.arange(1000) % 7 + r).to(dtype)
        got, k = lean(lambda: d.allreduce(x, op="sum", name=f"tl.ar.{dtype}"))
        fast += k
        assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, ((torch.arange(1000) % 7) * n + n * (n - 1) // 2).to(dtype))
        assert torch.equal(x, (torch.arange(1000) % 7 + r).to(dtype))  # input intact
        y = x.clone()
        out, k = lean(lambda: d.allreduce_(y, op="max", name=f"tl.ip.{dtype}"))
        fast += k
        assert out is y and torch.equal(y, (torch.arange(1000) % 7 + n - 1).to(dtype))
    b = torch.full((33, 5), float(r))
    got, k = lean(lambda: d.broadcast(b, root_rank=n - 1, name="tl.bc"))
    fast += k
    assert isinstance(got, torch.Tensor) and torch.equal(got, torch.full((33, 5), float(n - 1)))
    out, k = lean(lambda: d.broadcast_(b, root_rank=0, name="tl.bc_"))
    fast += k
    assert out is b and torch.equal(b, torch.zeros(33, 5))
    for rows in (3, 9000):  # slots, and single-copy parts into shared results
        part = torch.full((rows, 2), r, dtype=torch.int32)
        fell = d.stats()["ll_fallbacks"]
        got, k = lean(lambda: d.allgather(part, name=f"tl.ag.{rows}"))
        fast += k
        assert isinstance(got, torch.Tensor) and got.shape == (rows * n, 2)
        assert torch.equal(got, torch.arange(n, dtype=torch.int32).repeat_interleave(rows)[:, None].expand(-1, 2))
        if rows > 3 and d._require_engine().shared_gathers and d.stats()["ll_fallbacks"] == fell:
            assert d.is_shared(got)  # the lean lane's shared result (the general path pulls into ordinary memory)
        del got
    t = torch.arange(4 * n, dtype=torch.float64) + r
    got, k = lean(lambda: d.reduce_scatter(t, op="sum", name="tl.rs"))
    fast += k
    assert isinstance(got, torch.Tensor)
    assert torch.equal(got, (torch.arange(4 * n, dtype=torch.float64) * n + n * (n - 1) / 2)[4 * r:4 * r + 4])
    bfp = torch.full((9000, 2), float(r), dtype=torch.bfloat16)  # bfloat16 rows by address
    got, k = lean(lambda: d.allgather(bfp, name="tl.ag.bf16"))
    fast += k
    assert got.dtype == torch.bfloat16 and got.shape == (9000 * n, 2)
    assert torch.equal(got, torch.arange(n, dtype=torch.bfloat16).repeat_interleave(9000)[:, None].expand(-1, 2))
    bft = (torch.arange(4 * n) % 5 + r).to(torch.bfloat16)
    got, k = lean(lambda: d.reduce_scatter(bft, op="sum", name="tl.rs.bf16"))
    fast += k
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ((torch.arange(4 * n) % 5) * n + n * (n - 1) // 2).to(torch.bfloat16)[4 * r:4 * r + 4])
    assert fast == 15
    # the async lean submission of bfloat16, out of place and in place
    bfa = (torch.arange(3000) % 9 + r).to(torch.bfloat16)
    want = ((torch.arange(3000) % 9) * n + n * (n - 1) // 2).to(torch.bfloat16)
    got = d.synchronize(d.allreduce_async(bfa, op="sum", name="tl.async.bf16"))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert d.synchronize(d.allreduce_async_(bfa, op="sum", name="tl.async_.bf16")) is bfa and torch.equal(bfa, want)
    # the general path: autograd, non-contiguous (the same values)
    g = torch.ones(6, requires_grad=True)
    out = d.allreduce(g, op="sum", name="tl.grad")
    assert out.requires_grad and torch.equal(out.detach(), torch.full((6,), float(n)))
    nc = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    before = d.stats()["ll_collectives"]
    got = d.allreduce(nc, op="sum", name="tl.nc")
    assert torch.equal(got, nc * n)
    bf = torch.ones(8, 2, dtype=torch.bfloat16).t()  # non-contiguous bfloat16
    got = d.allreduce(bf, op="sum", name="tl.bf16")
    assert got.dtype == torch.bfloat16 and torch.equal(got, torch.full((2, 8), float(n), dtype=torch.bfloat16))
    d.barrier(name="tl.end")


@pytest.mark.timeout(120)
def test_torch_tensors_take_the_lane_without_a_numpy_view(ll, monkeypatch):
    """Blocking collectives of a CPU torch tensor run in C++ from the tensor's pointer, shape and dtype (no
    numpy view: collectives._torch_view is never called once torch is registered). In place (allreduce_,
    broadcast_): every dtype, a 0-d tensor, a view at an offset inside a larger tensor (the elements around it
    untouched), sizes from the slots to single copy, the default op (average). Out of place (allreduce,
    broadcast, allgather, reduce_scatter): tensors of the input's dtype, bfloat16 included, that own their
    memory. Exact values. A misaligned tensor and a subclass (Parameter) still give the right result through
    the other paths; a negative view raises TypeError saying to resolve it."""
    torch = pytest.importorskip("torch")
    import aimass.dist.collectives as C
    d = ll
    n, r = d.size(), d.rank()
    C._lean_torch_dtypes()  # (registers torch with the lane, as the first torch call does)
    views = []
    real_view = C._torch_view
    monkeypatch.setattr(C, "_torch_view", lambda t: views.append(t) or real_view(t))
    before = d.stats()
    calls = 0
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
                  torch.int16, torch.int32, torch.int64, torch.bool):
        for count in (1, 1000, 300001):
            vals = [torch.arange(count) % 3 + k for k in range(n)]  # rank k's values
            if dtype == torch.bool:  # max: any rank's True
                x, op = vals[r] % 2 == 1, "max"
                want = torch.stack([v % 2 == 1 for v in vals]).any(0)
            else:
                x, op = vals[r].to(dtype), "sum"
                want = sum(vals).to(dtype)
            assert d.allreduce_(x, op=op, name=f"tv.ar.{dtype}.{count}") is x
            assert torch.equal(x, want), (dtype, count)
            calls += 1
    z = torch.tensor(float(r + 1))  # 0-d, the default op: the average
    assert d.allreduce_(z, name="tv.0d") is z and z.item() == sum(range(1, n + 1)) / n
    outer = torch.full((1000 + 2 * 37,), -5.0)
    v = outer[37:1037]  # contiguous, at an offset in its storage
    v.copy_(torch.arange(1000, dtype=torch.float32) + r)
    assert d.allreduce_(v, op="sum", name="tv.view") is v
    assert torch.equal(v, torch.arange(1000, dtype=torch.float32) * n + n * (n - 1) / 2)
    assert (outer[:37] == -5).all() and (outer[1037:] == -5).all()
    b = torch.full((33, 5), float(r), dtype=torch.bfloat16)
    assert d.broadcast_(b, root_rank=n - 1, name="tv.bc") is b
    assert torch.equal(b, torch.full((33, 5), float(n - 1), dtype=torch.bfloat16))
    calls += 3
    for dtype in (torch.float32, torch.bfloat16, torch.int64):  # out of place
        for count in (7, 300001):
            x = (torch.arange(count) % 5 + r).to(dtype)
            got = d.allreduce(x, op="sum", name=f"tv.oop.{dtype}.{count}")
            assert type(got) is torch.Tensor and got.dtype == dtype and got.shape == x.shape
            assert torch.equal(got, (torch.arange(count) % 5 * n + n * (n - 1) // 2).to(dtype))
            assert torch.equal(x, (torch.arange(count) % 5 + r).to(dtype))  # the input intact
            got = d.broadcast(x, root_rank=0, name=f"tv.oop.bc.{dtype}.{count}")
            assert got.dtype == dtype and torch.equal(got, (torch.arange(count) % 5).to(dtype))
            calls += 2
        part = torch.full((3, 2), r, dtype=dtype)
        got = d.allgather(part, name=f"tv.oop.ag.{dtype}")
        assert got.dtype == dtype and torch.equal(got, torch.arange(n).repeat_interleave(3)[:, None].expand(-1, 2).to(dtype))
        s0 = torch.tensor(float(r)).to(dtype)  # a 0-d part: one row per rank
        got = d.allgather(s0, name=f"tv.oop.ag0.{dtype}")
        assert got.shape == (n,) and torch.equal(got, torch.arange(n).to(dtype))
        t = (torch.arange(4 * n) + r).to(dtype)
        got = d.reduce_scatter(t, op="sum", name=f"tv.oop.rs.{dtype}")
        assert got.dtype == dtype and torch.equal(got, (torch.arange(4 * n) * n + n * (n - 1) // 2).to(dtype)[4 * r:4 * r + 4])
        calls += 3
    assert views == []  # none of them went through the numpy view
    st = d.stats()
    done = st["ll_collectives"] - before["ll_collectives"] + st["ll_fallbacks"] - before["ll_fallbacks"]
    assert done >= calls, (done, calls)
    # misaligned (a float32 view one byte into a byte buffer), a Parameter: the right values elsewhere
    buf = bytearray(4 * 64 + 1)
    mis = torch.frombuffer(buf, dtype=torch.float32, count=64, offset=1)
    mis.fill_(r + 1.0)
    assert d.allreduce_(mis, op="sum", name="tv.misaligned") is mis
    assert torch.equal(mis, torch.full((64,), float(sum(range(1, n + 1)))))
    p = torch.nn.Parameter(torch.full((8,), float(r)), requires_grad=False)
    d.allreduce_(p, op="sum", name="tv.param")
    assert torch.equal(p.data, torch.full((8,), float(n * (n - 1) // 2)))
    # a negative view (its memory holds the values negated): not taken by the lane; the general path says
    # what to do, on every rank alike (nothing was submitted)
    neg = torch._neg_view(torch.full((5,), float(r + 1)))
    for f in (d.allreduce, d.allreduce_):
        with pytest.raises(TypeError, match="resolve_neg"):
            f(neg, op="sum", name="tv.neg")
    got = d.allreduce(neg.resolve_neg(), op="sum", name="tv.neg.resolved")
    assert torch.equal(got, torch.full((5,), -float(sum(range(1, n + 1)))))
    d.barrier(name="tv.end")
