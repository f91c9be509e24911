"""The chunked shared-memory allreduce at its edges: chunk boundaries and tails (sizes that are not a
multiple of the chunk or of the rank count), tiny and empty tensors, the staging ring wrapping around,
many tensors fused into one pass, against numpy references.

The engine is restarted with 4 KiB chunks so small arrays span many chunks (fast tests)."""
import os
import sys

import numpy as np
import pytest
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _engine_env import restart  # noqa: E402

CHUNK = 4096
DTYPES = ["float16", "float32", "float64", "int32", "int64"]
OPS = ["sum", "average", "min", "max"]


@pytest.fixture(scope="module")
def small_chunks(dist):
    restart(dist, AIMASS_SHM_CHUNK_BYTES=CHUNK)
    if not dist.shm_available():
        dist.shutdown()
        dist.init()
        pytest.skip("no shared-memory segment (single rank per node or AIMASS_SHM=0)")
    dist.set_shm_min_bytes(0)
    dist.set_ll_max_bytes(0)  # the engine's shared-memory path, not the caller-thread channel
    yield dist
    dist.shutdown()
    dist.init()


def rank_data(seed, r, count, dtype):
    rng = np.random.default_rng(seed * 1000 + r)
    # small integers: sums are exact in every dtype (fp16 included)
    return rng.integers(-20, 21, size=count).astype(dtype)


def reference(inputs, op, dtype):
    stack = np.stack([x.astype(np.float64) for x in inputs])
    if op == "sum":
        return stack.sum(0)
    if op == "average":
        ref = stack.sum(0) / len(inputs)
        return np.trunc(ref) if np.dtype(dtype).kind == "i" else ref
    return stack.min(0) if op == "min" else stack.max(0)


def check(out, inputs, op, dtype):
    ref = reference(inputs, op, dtype)
    if op == "average" and np.dtype(dtype).kind == "f":
        rtol = 1e-3 if dtype == "float16" else 1e-6
        np.testing.assert_allclose(out.astype(np.float64), ref, rtol=rtol, atol=rtol)
    else:
        np.testing.assert_array_equal(out.astype(np.float64), ref)


def edge_sizes(dtype, n):
    per_chunk = CHUNK // np.dtype(dtype).itemsize
    unit = 64 // np.dtype(dtype).itemsize  # slices are whole cache lines
    return sorted({0, 1, unit - 1, unit, unit + 1, n * unit - 1, n * unit + 1, per_chunk - 1, per_chunk,
                   per_chunk + 1, 2 * per_chunk + n + 3, 9 * per_chunk + 5})  # 9 chunks wrap the ring


@pytest.mark.timeout(90)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_chunk_boundaries_and_tails(small_chunks, dtype, op):
    d = small_chunks
    n, r = d.size(), d.rank()
    seed = DTYPES.index(dtype) * 10 + OPS.index(op)
    for count in edge_sizes(dtype, n):
        inputs = [rank_data(seed + count, i, count, dtype) for i in range(n)]
        before = d.stats()["shm_allreduces"]
        out = d.allreduce(inputs[r], op=op, name=f"chunks.{dtype}.{op}.{count}")
        if count:
            assert d.stats()["shm_allreduces"] == before + 1
        assert out.dtype == np.dtype(dtype) and out.shape == (count,)
        check(out, inputs, op, dtype)


@pytest.mark.timeout(60)
def test_bfloat16_torch_across_chunks(small_chunks):
    torch = pytest.importorskip("torch")
    d = small_chunks
    n, r = d.size(), d.rank()
    count = 5 * (CHUNK // 2) + 3
    inputs = [torch.from_numpy(rank_data(77, i, count, "float32")).to(torch.bfloat16) for i in range(n)]
    mine = inputs[r].clone()
    d.allreduce_(mine, op="sum", name="chunks.bf16")
    want = torch.stack([x.float() for x in inputs]).sum(0)
    assert mine.dtype == torch.bfloat16
    assert torch.equal(mine.float(), want)


@pytest.mark.timeout(60)
def test_many_fused_tensors_of_odd_sizes(small_chunks):
    """Hundreds of tensors (empty, tiny, odd, several chunks) in one cycle: one pass, each tensor exact."""
    d = small_chunks
    n, r = d.size(), d.rank()
    d.set_cycle_time(20)  # a long window: the submissions land in one or a few cycles
    try:
        sizes = [int(s) for s in np.random.default_rng(5).integers(0, 3 * CHUNK // 4, size=300)]
        sizes[:4] = [0, 1, 0, 17]
        inputs = [[rank_data(1000 + i, k, s, "float32") for k in range(n)] for i, s in enumerate(sizes)]
        mine = [x[r].copy() for x in inputs]
        before = d.stats()
        hs = [d.allreduce_async_(m, op="sum", name=f"chunks.many.{i}") for i, m in enumerate(mine)]
        for h in hs:
            d.synchronize(h)
        after = d.stats()
    finally:
        d.set_cycle_time(1)
    for i, x in enumerate(inputs):
        np.testing.assert_array_equal(mine[i], np.sum(np.stack(x), 0), err_msg=f"tensor {i} (size {sizes[i]})")
    assert after["fused_tensors"] - before["fused_tensors"] == len(sizes)
    # fused, not one pass per tensor (a loaded machine may split the burst into a few cycles)
    assert after["shm_allreduces"] - before["shm_allreduces"] <= len(sizes) // 10


@pytest.mark.timeout(60)
def test_mixed_dtypes_and_ops_in_one_cycle(small_chunks):
    d = small_chunks
    n, r = d.size(), d.rank()
    d.set_cycle_time(20)
    try:
        cases = [(dt, op, 3 * CHUNK // np.dtype(dt).itemsize + 7 * k + 1)
                 for k, (dt, op) in enumerate((dt, op) for dt in DTYPES for op in OPS)]
        inputs = [[rank_data(2000 + i, k, c, dt) for k in range(n)] for i, (dt, op, c) in enumerate(cases)]
        hs = [d.allreduce_async(inputs[i][r], op=op, name=f"chunks.mixed.{i}") for i, (dt, op, c) in enumerate(cases)]
        outs = [d.synchronize(h) for h in hs]
    finally:
        d.set_cycle_time(1)
    for (dt, op, c), x, out in zip(cases, inputs, outs):
        check(out, x, op, dt)


@pytest.mark.timeout(60)
def test_inplace_repeated_calls_keep_ranks_in_step(small_chunks):
    """Consecutive calls of different chunk counts (the ranks' sequence counters must stay equal)."""
    d = small_chunks
    n, r = d.size(), d.rank()
    for it, count in enumerate([1, 5000, 3, 0, 1025, 64 * 1024 + 3, 2, 1024 * 7]):
        x = np.full(count, float(r + it), np.float64)
        d.allreduce_(x, op="average", name=f"chunks.repeat.{it}")
        np.testing.assert_allclose(x, np.full(count, it + (n - 1) / 2))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_compression_across_chunks(small_chunks, compression):
    d = small_chunks
    n, r = d.size(), d.rank()
    count = 7 * CHUNK // 2 + 9
    inputs = [rank_data(3000, k, count, "float32") for k in range(n)]
    out = d.allreduce(inputs[r], op="sum", name=f"chunks.comp.{compression}", compression=compression)
    np.testing.assert_array_equal(out, np.sum(np.stack(inputs), 0))  # small integers: exact in 16 bits


@pytest.fixture
def two_rank_nodes(dist):
    """Groups of 2 ranks act as separate nodes (AIMASS_RANKS_PER_NODE): with 4 ranks, slices reduced in
    shared memory are allreduced across the 2 'nodes' over MPI; with 3 the node sizes differ, so every
    rank falls back to MPI_Allreduce."""
    restart(dist, AIMASS_RANKS_PER_NODE=2, AIMASS_SHM_CHUNK_BYTES=CHUNK)
    dist.set_shm_min_bytes(0)
    dist.set_ll_max_bytes(0)  # the engine's hierarchical path, not the caller-thread channel
    yield dist
    dist.shutdown()
    dist.init()


@pytest.mark.timeout(90)
def test_hierarchical_path_across_simulated_nodes(two_rank_nodes):
    d = two_rank_nodes
    n, r = d.size(), d.rank()
    assert d.local_size() == (2 if n % 2 == 0 or r < n - 1 else 1)
    assert d.shm_available() == (n % 2 == 0)
    before = d.stats()["shm_allreduces"]
    calls = 0
    for k, (dtype, op) in enumerate((dt, op) for dt in DTYPES for op in OPS):
        for count in (1, 17, 3 * CHUNK // np.dtype(dtype).itemsize + 5):
            inputs = [rank_data(4000 + k * 10 + count, i, count, dtype) for i in range(n)]
            out = d.allreduce(inputs[r], op=op, name=f"hier.{dtype}.{op}.{count}")
            check(out, inputs, op, dtype)
            calls += 1
    # a fused batch mixing sum and average
    d.set_cycle_time(20)
    try:
        sizes = [0, 3, 1000, 5 * CHUNK // 4 + 1, 64]
        ops = ["sum", "average", "sum", "average", "average"]
        inputs = [[rank_data(5000 + i, k, s, "float32") for k in range(n)] for i, s in enumerate(sizes)]
        hs = [d.allreduce_async(inputs[i][r], op=ops[i], name=f"hier.fused.{i}") for i in range(len(sizes))]
        outs = [d.synchronize(h) for h in hs]
    finally:
        d.set_cycle_time(1)
    for x, op, out in zip(inputs, ops, outs):
        check(out, x, op, "float32")
    if d.shm_available():
        assert d.stats()["shm_allreduces"] - before >= calls
