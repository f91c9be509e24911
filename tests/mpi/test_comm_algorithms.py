"""Every algorithm of the per-size table (AIMASS_COMM_ALGOS: mpi, shm staged through the segment, cma single
copy) gives numpy's answer for allreduce, broadcast, allgather and reduce_scatter: odd sizes around the 64-byte
slice unit and the (4 KiB) chunk, uneven and empty blocks, every dtype and op, fused batches, collectives of
different kinds back to back (they share the segment's ring); tables that are bad or differ between ranks are
refused at init; with AIMASS_RANKS_PER_NODE=2 (np 4: two simulated nodes of 2) the other collectives fall back to
MPI and agree too."""
import os
import sys

import numpy as np
import pytest
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _engine_env import restart  # noqa: E402
from _reduce_reference import reference  # noqa: E402

CHUNK = 4096
ALGOS = ["mpi", "shm", "cma"]
# the single-copy allreduce pulling the reduced slices afterwards instead of pushing them into the peers'
# outputs (AIMASS_SHM_CMA_PUSH=0), and pushing with one fixed slice per rank instead of claimed pieces (and the
# single-copy broadcast's receivers pulling alone: AIMASS_SHM_CMA_STEAL=0)
VARIANTS = {"cma-pull": {"AIMASS_SHM_CMA_PUSH": "0"}, "cma-fixed": {"AIMASS_SHM_CMA_STEAL": "0"}}
KINDS = ("allreduce", "broadcast", "allgather", "reduce_scatter")
NUMPY_DTYPES = ["float32", "float64", "int32", "int64", "int16", "int8", "uint8", "float16", "bool"]


@pytest.fixture(scope="module", params=ALGOS + list(VARIANTS))
def algo(request, dist):
    base = request.param.split("-")[0]
    table = ";".join(f"{k}=0:{base}" for k in KINDS)
    restart(dist, AIMASS_COMM_ALGOS=table, AIMASS_SHM_CHUNK_BYTES=CHUNK, **VARIANTS.get(request.param, {}))
    dist.set_shm_min_bytes(0)
    yield base
    restart(dist)


def data(seed, r, count, dtype):
    rng = np.random.default_rng(seed * 1009 + r)
    if dtype == "bool":
        return rng.integers(0, 2, size=count).astype(bool)
    lo, hi = (0, 4) if dtype == "uint8" else (-3, 4)  # products and sums stay exact in every dtype
    return rng.integers(lo, hi, size=count).astype(dtype)


def check(out, ref, op, dtype):
    if dtype in ("float16", "float32", "float64") and op == "average":
        np.testing.assert_allclose(out.astype(np.float64), ref, rtol=2e-3 if dtype == "float16" else 1e-6)
    else:
        np.testing.assert_array_equal(out.astype(np.float64), np.asarray(ref).astype(np.float64))


def sizes(dtype, n):
    es = np.dtype(dtype).itemsize
    unit, per = 64 // es, CHUNK // es
    return [1, unit - 1, n * unit + 1, per + 3, 3 * per + n + 5]


@pytest.mark.timeout(120)
def test_table_in_use(dist, algo):
    assert f"broadcast=0:{algo}" in dist._require_engine().algorithms


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_allreduce_every_dtype_and_op(dist, algo, dtype):
    n, r = dist.size(), dist.rank()
    ops = ["sum", "min", "max", "product"] + ([] if dtype == "bool" else ["average"])
    for k, op in enumerate(ops):
        for count in sizes(dtype, n):
            inputs = [data(k * 100 + count, i, count, dtype) for i in range(n)]
            out = dist.allreduce(inputs[r], op=op, name=f"alg.ar.{dtype}.{op}.{count}")
            check(out, reference(np.stack(inputs), op, dtype), op, dtype)


@pytest.mark.timeout(120)
def test_fused_batch_of_odd_sizes_in_place(dist, algo):
    n, r = dist.size(), dist.rank()
    counts = [0, 1, 17, CHUNK // 4 + 1, 5, 3 * CHUNK + 7, 64]
    ops = ["sum", "average", "sum", "average", "sum", "average", "sum"]
    inputs = [[data(3000 + i, k, c, "float32") for k in range(n)] for i, c in enumerate(counts)]
    mine = [x[r].copy() for x in inputs]
    dist.set_cycle_time(20)
    try:
        hs = [dist.allreduce_async_(mine[i], op=ops[i], name=f"alg.fused.{i}") for i in range(len(counts))]
        for h in hs:
            dist.synchronize(h)
    finally:
        dist.set_cycle_time(1)
    for x, op, out in zip(inputs, ops, mine):
        check(out, reference(np.stack(x), op, "float32"), op, "float32")


def at_line_offset(count, dtype, offset):
    """A writable 1-d array of `count` elements that starts `offset` bytes into a 64-byte line."""
    es = np.dtype(dtype).itemsize
    raw = np.zeros(count * es + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    return raw[start:start + count * es].view(dtype)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("agreed", [True, False])
def test_fused_batch_at_line_offsets(dist, algo, agreed):
    """Tensors starting at odd offsets within their cache lines, fused: the staged layout puts each one at the
    line offset of every rank's largest tensor when the ranks agree on it (numpy's large arrays start 16 bytes
    into a page), else packs them. Exact either way, float32 and float64 groups, several chunks."""
    n, r = dist.size(), dist.rank()
    counts = [3 * CHUNK + 5, 1, 17, CHUNK // 4 + 3, 8 * CHUNK + 1, 5, 2 * CHUNK - 3, 64]
    # bytes into a line (multiples of 8, so float64 keeps them); not agreed: every tensor's offset differs
    # between ranks, so whichever is the largest of a negotiation round, no two ranks post the same
    offsets = [(o + (0 if agreed else 8 * r)) % 64 for o in (0, 8, 24, 56, 16, 8, 48, 40)]
    dtypes = ["float32"] * 6 + ["float64"] * 2
    ops = ["sum", "average", "max", "sum", "average", "sum", "sum", "min"]
    lined = 0
    for attempt in range(5):  # (a round whose batches were split may lay out few: again until one is)
        inputs = [[data(5000 + 10 * attempt + i, k, c, dt) for k in range(n)]
                  for i, (c, dt) in enumerate(zip(counts, dtypes))]
        mine = []
        for i, (c, dt) in enumerate(zip(counts, dtypes)):
            x = at_line_offset(c, dt, offsets[i])
            x[...] = inputs[i][r]
            mine.append(x)
        before = dist.stats()["shm_staged_lined"]
        dist.set_cycle_time(20)
        try:
            hs = [dist.allreduce_async_(x, op=op, name=f"alg.lined.{i}") for i, (x, op) in enumerate(zip(mine, ops))]
            for h in hs:
                dist.synchronize(h)
        finally:
            dist.set_cycle_time(1)
        for x, op, out, dt in zip(inputs, ops, mine, dtypes):
            check(out, reference(np.stack(x), op, dt), op, dt)
        lined += dist.stats()["shm_staged_lined"] - before
        if not (agreed and algo == "shm") or lined:
            break
    # laid out only where the batches were staged and every rank posted the same offset
    assert (lined > 0) == (agreed and algo == "shm")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("offset", [16, 40])
def test_single_tensor_at_a_line_offset(dist, algo, offset):
    """One tensor a round (a large async allreduce on its own), 16 or 40 bytes into a line on every rank
    (numpy's large arrays: 16): staged, it is laid out at that offset too (stats()['shm_staged_lined']), so
    the reduce kernel reads whole lines and the copies out of the slots keep their distance; exact."""
    n, r = dist.size(), dist.rank()
    before = dist.stats()["shm_staged_lined"]
    for i, (c, op) in enumerate([(5 * CHUNK + 7, "sum"), (2 * CHUNK + 1, "average"), (CHUNK // 2 + 3, "max")]):
        inputs = [data(7000 + i, k, c, "float32") for k in range(n)]
        x = at_line_offset(c, "float32", offset)
        x[...] = inputs[r]
        dist.synchronize(dist.allreduce_async_(x, op=op, name=f"alg.single.{offset}.{i}"))
        check(x, reference(np.stack(inputs), op, "float32"), op, "float32")
    lined = dist.stats()["shm_staged_lined"] - before
    assert (lined > 0) == (algo == "shm")


@pytest.mark.timeout(120)
def test_broadcast_every_root_odd_sizes(dist, algo):
    n, r = dist.size(), dist.rank()
    for root in range(n):
        for count in (1, 63, 1025, 3 * CHUNK + 5, 40_001):
            x = data(root * 7 + count, r, count, "int16")
            want = data(root * 7 + count, root, count, "int16")
            out = dist.broadcast(x, root_rank=root, name=f"alg.bc.{root}.{count}")
            np.testing.assert_array_equal(out, want)
            y = x.copy()
            dist.broadcast_(y, root_rank=root, name=f"alg.bc_.{root}.{count}")
            np.testing.assert_array_equal(y, want)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["float32", "int8", "float64"])
def test_allgather_uneven_and_empty_rows(dist, algo, dtype):
    n, r = dist.size(), dist.rank()
    for base in (0, 1, 333, 2 * CHUNK + 1):
        rows = [0 if i == 1 else base + 3 * i for i in range(n)]
        parts = [data(base + i, i, rows[i] * 5, dtype).reshape(rows[i], 5) for i in range(n)]
        out = dist.allgather(parts[r], name=f"alg.ag.{dtype}.{base}")
        np.testing.assert_array_equal(out, np.concatenate(parts))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "float16", "uint8"])
def test_reduce_scatter_ops_and_uneven_blocks(dist, algo, dtype):
    n, r = dist.size(), dist.rank()
    for k, op in enumerate(["sum", "average", "min", "max", "product"]):
        for rows in (1, n, 2 * n + 1, 777):
            inputs = [data(k * 50 + rows, i, rows * 7, dtype).reshape(rows, 7) for i in range(n)]
            out = dist.reduce_scatter(inputs[r], op=op, name=f"alg.rs.{dtype}.{op}.{rows}")
            ref = np.array_split(reference(np.stack(inputs), op, dtype), n)[r]
            assert out.shape == ref.shape
            check(out, ref, op, dtype)


@pytest.mark.timeout(120)
def test_mixed_kinds_back_to_back(dist, algo):
    """Collectives of every kind in one burst share the segment's ring and sequence counters."""
    n, r = dist.size(), dist.rank()
    a = data(1, r, 5000, "float32")
    b = data(2, r, 3 * CHUNK + 1, "float32")
    dist.set_cycle_time(20)
    try:
        hs = [dist.allreduce_async(a, op="sum", name="alg.mix.ar"),
              dist.broadcast_async(b, root_rank=n - 1, name="alg.mix.bc"),
              dist.allgather_async(a[: r + 1], name="alg.mix.ag"),
              dist.reduce_scatter_async(b[: 2 * n * 100].reshape(2 * n, 100), op="max", name="alg.mix.rs"),
              dist.allreduce_async(b, op="min", name="alg.mix.ar2")]
        outs = [dist.synchronize(h) for h in hs]
    finally:
        dist.set_cycle_time(1)
    al = [data(1, i, 5000, "float32") for i in range(n)]
    bl = [data(2, i, 3 * CHUNK + 1, "float32") for i in range(n)]
    np.testing.assert_array_equal(outs[0], np.sum(al, 0))
    np.testing.assert_array_equal(outs[1], bl[n - 1])
    np.testing.assert_array_equal(outs[2], np.concatenate([al[i][: i + 1] for i in range(n)]))
    np.testing.assert_array_equal(outs[3], np.array_split(np.max([x[: 2 * n * 100] for x in bl], 0).reshape(2 * n, 100), n)[r])
    np.testing.assert_array_equal(outs[4], np.min(bl, 0))


@pytest.mark.timeout(120)
def test_engine_data_phase_every_kind_odd_sizes(dist, algo):
    """Blocking calls up to 1 MiB take the caller-thread channel; with it off every call runs the table's
    algorithm in the engine: many chunks (claimed pieces of the single-copy allreduce and broadcast), every
    dtype, in place and not, every root, uneven rows."""
    n, r = dist.size(), dist.rank()
    eng = dist._require_engine()
    dist.set_ll_max_bytes(0)
    shm_before = dist.stats()["shm_allreduces"]
    try:
        for dtype in NUMPY_DTYPES:
            per = CHUNK // np.dtype(dtype).itemsize
            for k, op in enumerate(["sum", "max", "min", "product"] + ([] if dtype == "bool" else ["average"])):
                count = 9 * per + 2 * n + 1 + k
                inputs = [data(k * 7 + count, i, count, dtype) for i in range(n)]
                ref = reference(np.stack(inputs), op, dtype)
                check(dist.allreduce(inputs[r], op=op, name=f"alg.eng.ar.{dtype}.{op}"), ref, op, dtype)
                y = inputs[r].copy()
                dist.allreduce_(y, op=op, name=f"alg.eng.ar_.{dtype}.{op}")
                check(y, ref, op, dtype)
        for root in range(n):
            for count in (7 * CHUNK + 3, 40_001):
                want = data(root * 11 + count, root, count, "uint8")
                y = data(root * 11 + count, r, count, "uint8")
                dist.broadcast_(y, root_rank=root, name=f"alg.eng.bc.{root}.{count}")
                np.testing.assert_array_equal(y, want)
        rows = [5 * CHUNK + 3 * i + (0 if i != 1 else 1) for i in range(n)]
        parts = [data(77 + i, i, rows[i] * 3, "int16").reshape(rows[i], 3) for i in range(n)]
        np.testing.assert_array_equal(dist.allgather(parts[r], name="alg.eng.ag"), np.concatenate(parts))
        assert (dist.stats()["shm_allreduces"] > shm_before) == (algo != "mpi")
    finally:
        dist.set_ll_max_bytes(eng.ll_slot_bytes)


@pytest.mark.timeout(60)
def test_bad_or_different_tables_are_refused(dist):
    r = dist.rank()
    with pytest.raises(ValueError, match="unknown algorithm 'nccl'"):
        restart(dist, AIMASS_COMM_ALGOS="allreduce=0:nccl")
    restart(dist)
    # each rank names another table: every rank refuses the same way (no rank runs with a different one)
    with pytest.raises(ValueError, match="differs between ranks"):
        restart(dist, AIMASS_COMM_ALGOS=f"broadcast=0:mpi,{r + 1}k:shm")
    restart(dist)
    assert dist.allreduce(np.ones(3, np.float32), op="sum", name="alg.after").tolist() == [dist.size()] * 3


@pytest.mark.nprocs(4)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("cma", ["1", "0"])
def test_simulated_nodes_every_kind(dist, cma):
    """2 nodes x 2 ranks: allreduce takes the hierarchical path (in-node reduce of each slice, single-copy or
    staged chunk by chunk, the slice allreduced across nodes over MPI, copied out), the others MPI."""
    restart(dist, AIMASS_RANKS_PER_NODE=2, AIMASS_SHM_CHUNK_BYTES=CHUNK, AIMASS_SHM_CMA=cma,
            AIMASS_COMM_ALGOS="allreduce=0:cma;broadcast=0:cma;allgather=0:cma;reduce_scatter=0:cma")
    try:
        dist.set_shm_min_bytes(0)
        n, r = dist.size(), dist.rank()
        assert dist.local_size() == 2 and dist.shm_available()
        # (the engine's hierarchical path, or the caller thread's from 16 KiB: hier_collectives)
        took = lambda: dist.stats()["shm_allreduces"] + dist.stats()["hier_collectives"]  # noqa: E731
        before = took()
        for count in (1, 17, 1001, 3 * CHUNK // 4 + 5, 70_001):
            inputs = [data(count, i, count, "float32") for i in range(n)]
            for op in ("sum", "average", "max"):
                out = dist.allreduce(inputs[r], op=op, name=f"alg.hier.{op}.{count}")
                check(out, reference(np.stack(inputs), op, "float32"), op, "float32")
            np.testing.assert_array_equal(dist.broadcast(inputs[r], root_rank=3, name=f"alg.hier.bc.{count}"),
                                          inputs[3])
            np.testing.assert_array_equal(dist.allgather(inputs[r][: r + count % 5], name=f"alg.hier.ag.{count}"),
                                          np.concatenate([inputs[i][: i + count % 5] for i in range(n)]))
        assert took() - before >= 15
        rs_in = [data(9, i, 29 * 43, "int32").reshape(29, 43) for i in range(n)]
        out = dist.reduce_scatter(rs_in[r], op="sum", name="alg.hier.rs")
        np.testing.assert_array_equal(out, np.array_split(np.sum(rs_in, 0), n)[r])
    finally:
        restart(dist)


@pytest.mark.timeout(60)
def test_large_results_recycled_only_after_release(dist):
    """Result blocks of 1 MiB and more are recycled once their array is gone, never while it lives."""
    n, r = dist.size(), dist.rank()
    rows = (1 << 20) // (4 * 64) + 7  # every part just over 1 MiB
    parts = [[np.full((rows, 64), k * 10 + i, np.float32) for i in range(n)] for k in range(3)]
    a = dist.allgather(parts[0][r], name="alg.pool.0")
    b = dist.allgather(parts[1][r], name="alg.pool.1")
    np.testing.assert_array_equal(a, np.concatenate(parts[0]))  # alive: not reused by b
    np.testing.assert_array_equal(b, np.concatenate(parts[1]))
    del a
    c = dist.allgather(parts[2][r], name="alg.pool.2")  # may take a's block
    np.testing.assert_array_equal(c, np.concatenate(parts[2]))
    np.testing.assert_array_equal(b, np.concatenate(parts[1]))
    rs = dist.reduce_scatter(np.ones((n * rows, 64), np.float32), op="sum", name="alg.pool.rs")
    np.testing.assert_array_equal(rs, np.full((rows, 64), n, np.float32))
