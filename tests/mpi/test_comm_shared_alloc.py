"""aimass.dist.empty / zeros / is_shared: user arrays in node-shared memory (as MPI_Alloc_mem). Where the engine
maps the local peers' shared buffers, in-place allreduces of such arrays are reduced in every rank's mapping
(stats ll_mapped / shm_mapped) with the same bits as on ordinary arrays; elsewhere the arrays are ordinary
memory. Typed errors for bad shapes and dtypes; the memory lives as long as any array or view of it."""
import gc
import hashlib
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _engine_env import engine_env  # noqa: E402

DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"]
# odd element counts: below and above the channel's slot size (256 KiB) and past 1 MiB
COUNTS = [1, 7, 4_099, 70_001, 300_007]


def maps(dist):
    return dist.shm_available() and dist._require_engine().shared_buffers


def rank_values(seed, r, count, dtype):
    """Seeded per-rank values; floats that round when summed, so the operand order shows in the bits."""
    rng = np.random.default_rng(seed * 7919 + r)
    if dtype == "bool":
        return rng.integers(0, 2, count).astype(bool)
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(count) * 3).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -50), min(info.max, 50) + 1, count).astype(dtype)


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).tobytes()


def test_errors(dist):
    for bad in (-1, (3, -2)):
        with pytest.raises(ValueError, match="negative"):
            dist.empty(bad)
    for bad in (2.5, (2, "a"), "abc", None, (True, 2)):
        with pytest.raises(TypeError, match="shape"):
            dist.zeros(bad)
    for bad in ("complex64", np.uint32, object, "U3", ">f4"):
        with pytest.raises(TypeError, match="dtype"):
            dist.empty(4, bad)
    with pytest.raises(TypeError, match="not a dtype"):
        dist.empty(4, "no-such-dtype")
    with pytest.raises(TypeError, match="bfloat16"):
        dist.empty(4, "bfloat16")
    with pytest.raises(ValueError, match="addressed"):
        dist.empty((1 << 62, 8), np.int64)
    with pytest.raises(TypeError, match="process_set"):
        dist.empty(4, process_set="world")
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        dist.is_shared([1, 2])


def test_shapes_dtypes_and_shared_flag(dist):
    shared = maps(dist)
    for dt in DTYPES:
        for shape in (0, 5, (3, 0), (2, 3, 5), ()):
            a = dist.zeros(shape, dt)
            want = np.zeros(shape, dt)
            assert a.shape == want.shape and a.dtype == want.dtype and a.flags.c_contiguous and a.flags.writeable
            assert not a.any()
            if a.size:
                assert dist.is_shared(a) == shared, (dt, shape)
            e = dist.empty(shape, dt)
            assert e.shape == want.shape and e.dtype == want.dtype
    assert not dist.is_shared(np.zeros(1000, np.float32))  # ordinary memory


def test_lifetime_views_keep_the_buffer(dist):
    if not maps(dist):
        pytest.skip("the engine does not map the peers' shared buffers here: ordinary memory")
    a = dist.empty((64, 1024), np.float32)
    v = a[3:5]       # a view
    w = a.reshape(-1)[::2]  # a strided view
    a[:] = np.arange(a.size, dtype=np.float32).reshape(a.shape)
    want_v, want_w = v.copy(), w.copy()
    del a
    gc.collect()
    junk = [dist.empty(1 << 16, np.float32) for _ in range(4)]  # would reuse freed memory
    for j in junk:
        j.fill(-1)
    assert np.array_equal(v, want_v) and np.array_equal(w, want_w)
    assert dist.is_shared(v) and dist.is_shared(w)  # the registry still holds the buffer: it is alive
    r, n = dist.rank(), dist.size()
    v[:] = r + 1  # the view of a shared array is reduced in place, in the peers' mappings
    dist.allreduce_(v, op="sum", name="t.salloc.view")
    assert (v == n * (n + 1) / 2).all()
    del v, w, junk
    gc.collect()


def _run(dist, alloc, dtype, count, op, seed, blocking, name):
    x = alloc(count, dtype)
    x[...] = rank_values(seed, dist.rank(), count, dtype)
    if blocking:
        dist.allreduce_(x, op=op, name=name)
    else:
        dist.synchronize(dist.allreduce_async_(x, op=op, name=name))
    return x


@pytest.mark.timeout(300, method="thread")
@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "async"])
def test_allreduce_bit_exact_against_ordinary_arrays(dist, blocking):
    """Every dtype, odd sizes, sum / max (average for floats): the shared arrays' results are the bits of the same
    allreduce on ordinary numpy arrays, on every rank; the large ones took the mapped path."""
    from mpi4py import MPI
    shared = maps(dist)
    mapped_before = dist.stats()
    digests = []
    for k, dt in enumerate(DTYPES):
        for count in COUNTS:
            for op in (("average", "sum", "max") if np.dtype(dt).kind == "f" else ("sum", "max")):
                nm = f"t.salloc.{blocking}.{dt}.{count}.{op}"
                got = _run(dist, dist.empty, dt, count, op, k * 31 + count, blocking, nm + ".shared")
                ref = _run(dist, np.empty, dt, count, op, k * 31 + count, blocking, nm + ".plain")
                assert dist.is_shared(got) == shared
                assert bits(got) == bits(ref), (dt, count, op)
                digests.append(hashlib.sha1(bits(got)).hexdigest())
    st = dist.stats()
    mapped = (st["ll_mapped"] - mapped_before["ll_mapped"]) + (st["shm_mapped"] - mapped_before["shm_mapped"])
    if shared:
        assert mapped >= 1, (mapped, st)
    else:
        assert mapped == 0
    every = MPI.COMM_WORLD.allgather(digests)
    assert all(e == every[0] for e in every)  # every rank holds the same bits


def test_large_blocking_and_async_take_the_mapped_path(dist):
    """2 MiB + odd: a blocking allreduce_ runs in the caller's thread (ll_mapped), an async one in the engine's
    data phase (shm_mapped); both give the ranks' values summed."""
    if not maps(dist):
        pytest.skip("the engine does not map the peers' shared buffers here: ordinary memory")
    n, r = dist.size(), dist.rank()
    x = dist.empty((2 << 20) // 4 + 13, np.int32)
    st = dist.stats()
    x.fill(r + 1)
    dist.allreduce_(x, op="sum", name="t.salloc.big.blocking")
    assert (x == n * (n + 1) // 2).all()
    st2 = dist.stats()
    x.fill(r + 1)
    dist.synchronize(dist.allreduce_async_(x, op="sum", name="t.salloc.big.async"))
    assert (x == n * (n + 1) // 2).all()
    st3 = dist.stats()
    assert st2["ll_mapped"] + st2["shm_mapped"] > st["ll_mapped"] + st["shm_mapped"], (st, st2)
    assert st3["shm_mapped"] > st2["shm_mapped"], (st2, st3)


def test_blocking_allreduces_of_shared_memory_are_never_explored_staged(dist):
    """The caller-thread vote explores the way it did not choose 3 calls in a row every 32; an allreduce of
    shared memory is never among them (a staged run would copy it through the segment): 70 blocking calls,
    70 reduced in the peers' mappings, the ranks' values summed every time."""
    if not maps(dist):
        pytest.skip("the engine does not map the peers' shared buffers here: ordinary memory")
    n, r = dist.size(), dist.rank()
    x = dist.empty((2 << 20) // 4 + 13, np.int32)
    st0 = dist.stats()
    for i in range(70):
        x.fill(r + i)
        dist.allreduce_(x, op="sum", name="t.salloc.big.explore")
        assert (x == n * (n - 1) // 2 + n * i).all()
    st = dist.stats()
    assert st["ll_mapped"] - st0["ll_mapped"] == 70 and st["ll_staged"] == st0["ll_staged"], (st0, st)


def test_ordinary_memory_where_the_engine_does_not_map(dist):
    with engine_env(dist, AIMASS_SHM_MAP="0"):
        assert not dist._require_engine().shared_buffers
        a = dist.zeros(1 << 20, np.float32)
        assert not dist.is_shared(a) and not a.any()
        a.fill(dist.rank() + 1)
        dist.allreduce_(a, op="sum", name="t.salloc.private")
        assert (a == dist.size() * (dist.size() + 1) / 2).all()


def test_torch_tensors(dist):
    torch = pytest.importorskip("torch")
    shared = maps(dist)
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool):
        t = dist.zeros((3, 5), dt)
        assert isinstance(t, torch.Tensor) and t.dtype == dt and t.shape == (3, 5) and not t.any()
        assert dist.is_shared(t) == shared and dist.is_shared(t[1]) == shared
    with pytest.raises(TypeError, match="dtype"):
        dist.empty(4, torch.complex64)
    count = 300_007  # past the channel's slots: the push
    for k, dt in enumerate((torch.bfloat16, torch.float32)):
        g = torch.Generator().manual_seed(500 + 10 * k + dist.rank())
        vals = (torch.randn(count, generator=g, dtype=torch.float64) * 3).to(dt)
        a, b = dist.empty(count, dt), torch.empty(count, dtype=dt)
        a.copy_(vals)
        b.copy_(vals)
        view = a[1:]  # a view keeps the buffer when the tensor goes
        del a
        gc.collect()
        dist.allreduce_(view, op="average", name=f"t.salloc.torch.{k}.shared")
        dist.allreduce_(b[1:], op="average", name=f"t.salloc.torch.{k}.plain")
        ints = torch.int16 if dt.itemsize == 2 else torch.int32
        assert torch.equal(view.view(ints), b[1:].view(ints)), dt
        assert dist.is_shared(view) == shared


def test_allgather_results_in_shared_memory_the_peers_write(dist):
    """Blocking allgathers of 1 MiB results and more (numpy, equal parts) return arrays in shared memory where
    the caller-thread channel maps the peers' (engine.shared_gathers): every rank writes its rows into every
    result with plain stores (stats ll_gather_mapped), the results exact at odd sizes and 2-D rows, several
    kept alive at once (a later gather never writes into an earlier result still in use), and unequal parts
    still gathered (pulled). Elsewhere ordinary results, the same values."""
    r, n = dist.rank(), dist.size()
    eng = dist._require_engine()
    shared = eng.shared_gathers
    kept = []
    st0 = dist.stats()
    calls = mapped = 0
    for i, (shape, dtype) in enumerate([((300_007,), "float32"), ((210_001, 3), "int16"), ((262_144,), "float64"),
                                        ((300_007,), "float32"), ((1 << 20,), "uint8")]):
        part = np.full(shape, r + 1, dtype) * (np.arange(shape[0]) % 97).reshape((-1,) + (1,) * (len(shape) - 1)).astype(dtype)
        before = dist.stats()
        got = dist.allgather(part, name=f"sg.{i}")
        after = dist.stats()
        calls += 1
        # each call is written into by the peers, or fell back to the engine (a late peer: ranks may outnumber
        # the cores), whose result is ordinary memory
        was_mapped = after["ll_gather_mapped"] - before["ll_gather_mapped"]
        assert was_mapped == 1 or not shared or after["ll_fallbacks"] > before["ll_fallbacks"], (before, after)
        mapped += was_mapped
        assert got.shape == (shape[0] * n,) + shape[1:] and got.dtype == np.dtype(dtype)
        for j in range(n):
            want = np.full(shape, j + 1, dtype) * (np.arange(shape[0]) % 97).reshape((-1,) + (1,) * (len(shape) - 1)).astype(dtype)
            np.testing.assert_array_equal(got[j * shape[0]:(j + 1) * shape[0]], want)
        assert dist.is_shared(got) == bool(was_mapped)
        kept.append((got, got.copy()))
    for got, snap in kept:  # nothing wrote into a result after it was returned
        np.testing.assert_array_equal(got, snap)
    st1 = dist.stats()
    assert st1["ll_gather_mapped"] - st0["ll_gather_mapped"] == mapped
    if not shared:
        assert mapped == 0
    elif dist.size() <= (os.cpu_count() or 1):
        assert mapped >= 1, (st0, st1)  # (with a core each, the ranks rarely miss each other)
    # unequal parts: pulled into an ordinary result of the right size
    part = np.full(300_000 + 1000 * r, r, np.float32)
    got = dist.allgather(part, name="sg.unequal")
    want = np.concatenate([np.full(300_000 + 1000 * j, j, np.float32) for j in range(n)])
    np.testing.assert_array_equal(got, want)
    # many calls of one size reuse one block per rank: results stay exact
    part = np.arange(400_000, dtype=np.float32) + r
    for k in range(20):
        got = dist.allgather(part, name="sg.many")
        assert got[0] == 0 and got[400_000] == 1 and got[-1] == 399_999 + n - 1


def test_small_allgather_results_come_from_shared_slabs(dist):
    """Results from 32 KiB to 1 MiB (single-copy parts) are blocks of shared slabs the peers map once: exact
    at odd sizes, several dtypes and 2-D rows; kept alive past what the slabs hold (32 MiB), later results are
    ordinary memory with the same values; every kept result stays untouched; freed blocks are used again."""
    r, n = dist.rank(), dist.size()
    shared = dist._require_engine().shared_gathers
    rng = np.random.default_rng(7)  # the same sizes on every rank
    cases = [((4099 + int(rng.integers(0, 60_000)),), dt) for dt in ("float32", "int16", "float64", "uint8")
             for _ in range(3)] + [((8_191, 3), "float32"), ((16_385,), "float32")]
    kept, mapped = [], 0

    def want(shape, dtype, j, i):
        base = (np.arange(shape[0]) % 89 + i).reshape((-1,) + (1,) * (len(shape) - 1))
        return (np.broadcast_to(base, shape) * (j + 1)).astype(dtype)

    def gather(shape, dtype, i, name):
        nonlocal mapped
        part = want(shape, dtype, r, i)
        before = dist.stats()
        got = dist.allgather(part, name=name)
        after = dist.stats()
        mapped += after["ll_gather_mapped"] - before["ll_gather_mapped"]
        assert got.shape == (shape[0] * n,) + shape[1:] and got.dtype == np.dtype(dtype)
        for j in range(n):
            np.testing.assert_array_equal(got[j * shape[0]:(j + 1) * shape[0]], want(shape, dtype, j, i))
        return got

    for i, (shape, dtype) in enumerate(cases):
        if shape[0] * np.dtype(dtype).itemsize * np.prod(shape[1:], dtype=int) < (16 << 10):
            shape = ((16 << 10) // np.dtype(dtype).itemsize + 5,) + shape[1:]  # single-copy parts
        got = gather(shape, dtype, i, f"sg.small.{i}")
        kept.append((got, got.copy()))
    # 90 results of 400 KiB kept alive: more than the slabs hold
    for i in range(90):
        got = gather((100_003 // n,), "float32", i, "sg.small.many")
        kept.append((got, got.copy()))
    flags = [dist.is_shared(g) for g, _ in kept]
    for got, snap in kept:
        np.testing.assert_array_equal(got, snap)
    if shared and n <= (os.cpu_count() or 1):
        assert mapped >= 1 and any(flags)
        assert not all(flags[-90:])  # past the slabs: ordinary memory
    if not shared:
        assert mapped == 0 and not any(flags)
    kept.clear()
    # freed: the blocks serve new results again
    m0 = mapped
    for i in range(10):
        got = gather((100_003 // n,), "float32", i, "sg.small.again")
    if shared and n <= (os.cpu_count() or 1):
        assert mapped > m0 and dist.is_shared(got)


def test_a_forked_child_gets_private_copies_of_shared_gather_results(dist):
    """After fork, an allgather result in shared memory is the child's own: the child sees the values from the
    moment of the fork, and its writes do not reach the parent's array (nor the parent's the child's)."""
    r, n = dist.rank(), dist.size()
    got = dist.allgather(np.full(300_001, r, np.float32), name="sg.fork")
    small = dist.allgather(np.full(5_001, r, np.float64), name="sg.fork.small")  # a slab block
    if not dist.is_shared(got) or not dist.is_shared(small):
        pytest.skip("the engine does not map the local peers' memory here")
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no MPI, no aimass calls; reports and leaves at once
        ok = got[0] == 0 and got[-1] == n - 1 and small[0] == 0 and small[-1] == n - 1
        got[:] = -5
        small[:] = -5
        os.write(wr, b"1" if ok else b"0")
        os._exit(0)
    os.close(wr)
    reply = os.read(rd, 1)
    os.close(rd)
    os.waitpid(pid, 0)
    assert reply == b"1"
    assert got[0] == 0 and got[-1] == n - 1 and not (got == -5).any()
    assert small[0] == 0 and small[-1] == n - 1 and not (small == -5).any()
