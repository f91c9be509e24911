"""Collectives against numpy references (run under mpirun -np 2, 3, 4).

Every rank generates every rank's input from a seeded generator, so references
need no communication."""
import time

import numpy as np
import pytest

DTYPES = ["float16", "float32", "float64", "int32", "int64"]
OPS = ["sum", "average", "min", "max"]


def rank_data(seed, r, shape, dtype):
    rng = np.random.default_rng(seed * 1000 + r)
    # small integers: exact in every dtype, so sums are exact in fp16 too
    return rng.integers(-8, 9, size=shape).astype(dtype)


def reference(inputs, op, dtype):
    stack = np.stack([x.astype(np.float64) for x in inputs])
    n = len(inputs)
    if op == "sum":
        ref = stack.sum(0)
    elif op == "average":
        ref = stack.sum(0) / n
        if np.dtype(dtype).kind == "i":
            ref = np.trunc(ref)
    elif op == "min":
        ref = stack.min(0)
    else:
        ref = stack.max(0)
    return ref


def random_shape(seed):
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(0, 4))
    return tuple(int(s) for s in rng.integers(1, 7, size=ndim))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_allreduce_matches_numpy(dist, dtype, op):
    n, r = dist.size(), dist.rank()
    seed = DTYPES.index(dtype) * 10 + OPS.index(op)
    shape = random_shape(seed)
    inputs = [rank_data(seed, i, shape, dtype) for i in range(n)]
    mine = inputs[r].copy()
    out = dist.allreduce(mine, op=op, name=f"ar.{dtype}.{op}")
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    np.testing.assert_allclose(out.astype(np.float64), reference(inputs, op, dtype), rtol=1e-3 if dtype == "float16" else 1e-6)
    np.testing.assert_array_equal(mine, inputs[r])  # input untouched


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int64"])
def test_torch_allreduce_inplace_and_out_of_place(dist, dtype):
    torch = pytest.importorskip("torch")
    n, r = dist.size(), dist.rank()
    tdt = getattr(torch, dtype)
    inputs = [torch.from_numpy(rank_data(77, i, (5, 3), "int64")).to(tdt) for i in range(n)]
    ref = torch.stack([x.double() for x in inputs]).sum(0)
    out = dist.allreduce(inputs[r], op="sum", name=f"torch.{dtype}")
    assert isinstance(out, torch.Tensor) and out.dtype == tdt
    torch.testing.assert_close(out.double(), ref)
    t = inputs[r].clone()
    res = dist.allreduce_(t, op="sum", name=f"torch_.{dtype}")
    assert res is t
    torch.testing.assert_close(t.double(), ref)


@pytest.mark.timeout(30)
def test_allreduce_inplace_numpy_large_and_empty(dist):
    n, r = dist.size(), dist.rank()
    x = np.full(300_001, r + 1, dtype=np.float32)
    dist.allreduce_(x, op="sum", name="inplace.large")
    np.testing.assert_array_equal(x, np.full_like(x, n * (n + 1) / 2))
    e = np.zeros((0, 3), np.float32)
    assert dist.allreduce(e, name="empty").shape == (0, 3)


@pytest.mark.timeout(60)
def test_async_in_different_order_per_rank_is_fused(dist):
    n, r = dist.size(), dist.rank()
    names = [f"grad.{i}" for i in range(40)]
    order = np.random.default_rng(r).permutation(len(names))
    before = dist.stats()
    handles = {}
    for i in order:
        shape = (i % 7 + 1, 3)
        handles[i] = dist.allreduce_async(np.full(shape, float(i + r), np.float32), op="sum", name=names[i])
    for i, h in handles.items():
        got = dist.synchronize(h)
        assert dist.poll(h)
        np.testing.assert_array_equal(got, np.full((i % 7 + 1, 3), n * i + n * (n - 1) / 2, np.float32))
    after = dist.stats()
    tensors = after["fused_tensors"] - before["fused_tensors"]
    buffers = after["fused_buffers"] - before["fused_buffers"]
    assert tensors == 40 and buffers < 40  # several tensors travelled in one buffer


@pytest.mark.timeout(60)
def test_async_burst_completes_by_poll_alone_with_exact_results(dist):
    """A gradient-like burst (odd sizes from 1 element to over 1 MiB, three dtypes, in place) submitted
    without waking the engine per submission: it must still run without a synchronize() (which flushes),
    seen through poll() alone, for several steps (the response-cache steady state), with exact results."""
    n, r = dist.size(), dist.rank()
    rng = np.random.default_rng(12)
    sizes = [int(s) for s in rng.integers(1, 5000, 40)] + [(1 << 18) + 3, 333333, 7]
    dtypes = [("float32", "float64", "int32")[i % 3] for i in range(len(sizes))]
    for step in range(3):
        xs = [np.arange(k, dtype=dt) % 97 + (r + step) for k, dt in zip(sizes, dtypes)]
        hs = [dist.allreduce_async_(x, op="sum", name=f"burst.{i}") for i, x in enumerate(xs)]
        deadline = time.monotonic() + 30
        while not all(dist.poll(h) for h in hs):
            assert time.monotonic() < deadline, "an async burst did not finish without synchronize()"
            time.sleep(0.001)
        for k, dt, x, h in zip(sizes, dtypes, xs, hs):
            dist.synchronize(h)
            want = (np.arange(k, dtype=np.int64) % 97) * n + n * step + n * (n - 1) // 2
            np.testing.assert_array_equal(x, want.astype(dt))


@pytest.mark.timeout(60)
def test_steady_state_uses_the_response_cache(dist):
    n = dist.size()
    for step in range(3):
        hs = [dist.allreduce_async(np.ones(4, np.float32), op="sum", name=f"cached.{i}") for i in range(10)]
        for h in hs:
            np.testing.assert_array_equal(dist.synchronize(h), np.full(4, n, np.float32))
        if step == 0:
            base = dist.stats()["cache_hits"]
    assert dist.stats()["cache_hits"] - base >= 10  # later steps negotiated through the bit vector


@pytest.mark.timeout(30)
def test_fusion_threshold_is_respected(dist):
    n = dist.size()
    dist.set_fusion_threshold(64)  # 16 floats per buffer
    try:
        before = dist.stats()
        hs = [dist.allreduce_async(np.ones(16, np.float32), op="sum", name=f"thr.{i}") for i in range(6)]
        for h in hs:
            np.testing.assert_array_equal(dist.synchronize(h), np.full(16, n, np.float32))
        after = dist.stats()
        assert after["fused_buffers"] - before["fused_buffers"] == 6
    finally:
        dist.set_fusion_threshold(64 << 20)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_compressed_fused_batches_grow_the_fusion_buffer(dist, compression):
    """Compressed batches go through the engine's fusion buffer (huge pages from 2 MiB, grown in whole
    huge pages): a small batch, then larger ones with odd sizes past 2 and 6 MiB of wire bytes, then a
    small one again in the grown buffer; small integers are exact in both 16-bit formats."""
    n, r = dist.size(), dist.rank()
    for step, sizes in enumerate(([5, 1001], [(1 << 20) + 3, 7, 333], [(3 << 20) + 1, (1 << 18) + 5], [9, 4099])):
        xs = [(np.arange(k) % 5 + r).astype(np.float32) for k in sizes]
        hs = [dist.allreduce_async_(x, op="sum", name=f"cfb.{compression}.{i}", compression=compression)
              for i, x in enumerate(xs)]
        for k, x, h in zip(sizes, xs, hs):
            dist.synchronize(h)
            np.testing.assert_array_equal(x, ((np.arange(k) % 5) * n + n * (n - 1) // 2).astype(np.float32))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("compression,rtol", [("fp16", 2e-3), ("bf16", 1.6e-2)])
def test_compression_close_to_fp32_reference(dist, compression, rtol):
    n, r = dist.size(), dist.rank()
    inputs = [np.random.default_rng(500 + i).uniform(0.5, 2.0, size=1000).astype(np.float32) for i in range(n)]
    ref = np.stack(inputs).astype(np.float64).mean(0)
    out = dist.allreduce(inputs[r], op="average", name=f"comp.{compression}", compression=compression)
    assert out.dtype == np.float32
    # each rank's value rounds once, and each of the (n-1) pairwise sums once more
    np.testing.assert_allclose(out, ref, rtol=rtol * n)
    assert not np.array_equal(out, ref.astype(np.float32)) or compression == "fp16"


@pytest.mark.timeout(30)
def test_broadcast_from_every_root(dist):
    n, r = dist.size(), dist.rank()
    for root in range(n):
        x = np.full((3, 2), r * 10.0, np.float64)
        out = dist.broadcast(x, root=root, name=f"bc.{root}")
        np.testing.assert_array_equal(out, np.full((3, 2), root * 10.0))
        np.testing.assert_array_equal(x, np.full((3, 2), r * 10.0))
    y = np.arange(5, dtype=np.int32) * (r + 1)
    assert dist.broadcast_(y, root=n - 1, name="bc.inplace") is y
    np.testing.assert_array_equal(y, np.arange(5) * n)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dtype", ["float32", "int64", "float16"])
def test_allgather_uneven_first_dimension(dist, dtype):
    n, r = dist.size(), dist.rank()
    parts = [np.full((i + 1, 2, 2), i, dtype=dtype) for i in range(n)]
    out = dist.allgather(parts[r], name=f"ag.{dtype}")
    np.testing.assert_array_equal(out, np.concatenate(parts))
    zero_rows = np.zeros((0 if r == 0 else 2, 3), np.float32) + r
    out = dist.allgather(zero_rows, name=f"ag0.{dtype}")
    assert out.shape == (2 * (n - 1), 3)


@pytest.mark.timeout(30)
def test_allgather_torch_bfloat16(dist):
    torch = pytest.importorskip("torch")
    r = dist.rank()
    out = dist.allgather(torch.full((r + 1,), float(r), dtype=torch.bfloat16), name="ag.torch.bf16")
    assert out.dtype == torch.bfloat16
    expect = torch.cat([torch.full((i + 1,), float(i)) for i in range(dist.size())]).to(torch.bfloat16)
    torch.testing.assert_close(out, expect)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("rows", [1, 5, 8])
def test_reduce_scatter_blocks(dist, rows):
    n, r = dist.size(), dist.rank()
    inputs = [rank_data(900 + rows, i, (rows, 3), "float32") for i in range(n)]
    out = dist.reduce_scatter(inputs[r], op="sum", name=f"rs.{rows}")
    ref = np.array_split(np.stack(inputs).sum(0), n)[r]
    np.testing.assert_array_equal(out, ref)
    avg = dist.reduce_scatter(inputs[r], op="average", name=f"rs.avg.{rows}")
    np.testing.assert_allclose(avg, ref / n, rtol=1e-6)


@pytest.mark.timeout(30)
def test_barrier_and_unnamed_collectives(dist):
    n = dist.size()
    dist.barrier()
    a = dist.allreduce(np.ones(2, np.float32), op="sum")
    b = dist.allreduce(np.ones(3, np.float32), op="max")
    np.testing.assert_array_equal(a, [n, n])
    np.testing.assert_array_equal(b, [1, 1, 1])
    dist.barrier(timeout=10)


@pytest.mark.timeout(30)
def test_waiting_releases_the_gil(dist):
    import threading
    import time
    r = dist.rank()
    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    if r != 0:
        time.sleep(0.5)  # rank 0 waits in synchronize() meanwhile
    h = dist.allreduce_async(np.ones(4, np.float32), op="sum", name="gil.release")
    t = threading.Thread(target=spin)
    t.start()
    try:
        before = len(ticks)
        out = dist.synchronize(h)
        during = len(ticks) - before
    finally:
        stop.set()
        t.join()
    np.testing.assert_array_equal(out, np.full(4, dist.size(), np.float32))
    if r == 0:
        assert during > 20  # the Python thread kept running while rank 0 waited ~0.5 s


@pytest.mark.timeout(30)
def test_dropped_handle_keeps_buffers_alive_until_done(dist):
    import gc
    n, r = dist.size(), dist.rank()
    if r == 0:
        time.sleep(0.2)  # the others' handles are dropped while their collective is still pending
    dist.allreduce_async(np.ones(100_000, np.float32), name="dropped")  # handle discarded at once
    gc.collect()
    live = [h for h in dist._core._live if h.name == "dropped"]
    assert len(live) == 1
    dist.synchronize(live[0])
    assert not any(h.name == "dropped" for h in dist._core._live)
