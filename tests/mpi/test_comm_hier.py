"""The hierarchical allreduce across simulated nodes (AIMASS_RANKS_PER_NODE=2): shared-memory
reduce-scatter inside each node, each local rank's slice exchanged with the other node over MPI
point-to-point (one exchange for small slices, reduce-scatter + allgather between the two nodes
from 1 MiB slices), shared-memory allgather. Odd sizes, every dtype and op, results identical on
every rank. With 3 ranks the node sizes differ and every rank takes MPI_Allreduce."""
import os
import sys
import time

import aimass
import numpy as np
import pytest
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _engine_env import engine_env, restart  # noqa: E402

DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"]
OPS = ["sum", "average", "min", "max", "product"]


@pytest.fixture(scope="module")
def nodes(dist):
    restart(dist, AIMASS_RANKS_PER_NODE=2)
    dist.set_shm_min_bytes(0)
    yield dist
    dist.shutdown()
    dist.init()


def rank_data(seed, r, count, dtype):
    rng = np.random.default_rng(seed * 1000 + r)
    if dtype == "bool":
        return rng.integers(0, 2, count).astype(bool)
    if dtype == "uint8":
        return rng.integers(0, 3, count).astype(dtype)
    x = rng.integers(-2, 3, count).astype(dtype)  # products and sums stay exact in every dtype
    if np.dtype(dtype).kind == "f":
        x[::7] = -0.0 if r % 2 else 0.0  # signed zeros: min / max must pick alike on every rank
    return x


def reference(inputs, op, dtype):
    if dtype == "bool":
        st = np.stack(inputs)
        return st.all(0) if op in ("min", "product") else st.any(0)
    st = np.stack([x.astype(np.float64) for x in inputs])
    if op == "sum":
        return st.sum(0)
    if op == "product":
        return st.prod(0)
    if op == "average":
        ref = st.sum(0) / len(inputs)
        return np.trunc(ref) if np.dtype(dtype).kind in "iu" else ref
    return st.min(0) if op == "min" else st.max(0)


def same_on_every_rank(d, out, name):
    b = np.ascontiguousarray(out).reshape(-1).view(np.uint8).reshape(1, -1)
    everyone = d.allgather(b, name=name)
    assert (everyone == everyone[:1]).all(), "ranks disagree on the result bits"


@pytest.mark.timeout(120)
def test_every_dtype_and_op_odd_sizes(nodes):
    d = nodes
    n, r = d.size(), d.rank()
    if n % 2 == 0:
        assert d.local_size() == 2 and d.cross_size() == n // 2
    for k, dtype in enumerate(DTYPES):
        for op in OPS:
            if dtype == "bool" and op == "average":
                continue
            for count in (1, 3, 1001, 70001):
                inputs = [rank_data(k * 100 + count, i, count, dtype) for i in range(n)]
                out = d.allreduce(inputs[r], op=op, name=f"hier.{dtype}.{op}.{count}")
                ref = reference(inputs, op, dtype)
                if op == "average" and np.dtype(dtype).kind == "f":
                    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=1e-3 if dtype == "float16" else 1e-6)
                else:
                    np.testing.assert_array_equal(out.astype(np.float64) if dtype != "bool" else out, ref)
                if count == 1001:
                    same_on_every_rank(d, out, f"hier.same.{dtype}.{op}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype,op", [("float32", "sum"), ("float32", "min"), ("float32", "average"),
                                      ("int8", "max"), ("float16", "sum"), ("int64", "product")])
def test_large_slices_take_the_two_step_exchange(nodes, dtype, op):
    d = nodes
    n, r = d.size(), d.rank()
    count = (5 << 20) // np.dtype(dtype).itemsize + 13  # 5 MiB + odd: >= 1 MiB slices per local rank
    inputs = [rank_data(77, i, count, dtype) for i in range(n)]
    before = d.stats()
    out = d.allreduce(inputs[r], op=op, name=f"hier.big.{dtype}.{op}")
    st = d.stats()
    # hierarchical iff equal nodes (the engine's, or the caller thread's: hier_collectives); with one node
    # (np 2) the caller-thread single-copy push may take it
    took = sum(st[k] - before[k] for k in ("shm_allreduces", "ll_collectives", "hier_collectives"))
    assert took == (1 if n % 2 == 0 else 0)
    ref = reference(inputs, op, dtype)
    if op == "average":
        np.testing.assert_allclose(out.astype(np.float64), ref, rtol=1e-6)
    else:
        np.testing.assert_array_equal(out.astype(np.float64), ref)
    same_on_every_rank(d, out[:4099], f"hier.big.same.{dtype}.{op}")
    x = inputs[r].copy()
    assert d.allreduce_(x, op=op, name=f"hier.big_.{dtype}.{op}") is x
    np.testing.assert_array_equal(x, out)


@pytest.mark.timeout(120)
def test_back_to_back_calls_with_async_work_between(nodes):
    """The steady state across nodes: blocking allreduces back to back (each usually negotiated in
    one round now that the engine's tick counts from the end of its last cycle), with async
    submissions and a rank that sleeps past several ticks between them; odd sizes, every op."""
    d = nodes
    n, r = d.size(), d.rank()
    for it in range(12):
        op = OPS[it % len(OPS)]
        dtype = ("float32", "int32", "float64", "int8")[it % 4]
        count = (1 << 18) + 2 * it + 1 if it % 3 else 4097 + it
        inputs = [rank_data(500 + it, i, count, dtype) for i in range(n)]
        h = d.allreduce_async(inputs[r][:257], op="sum", name=f"hier.b2b.async.{it}")
        out = d.allreduce(inputs[r], op=op, name=f"hier.b2b.{dtype}.{op}.{count}")
        ref = reference(inputs, op, dtype)
        if op == "average" and np.dtype(dtype).kind == "f":
            np.testing.assert_allclose(out.astype(np.float64), ref, rtol=1e-6)
        else:
            np.testing.assert_array_equal(out.astype(np.float64), ref)
        np.testing.assert_array_equal(d.synchronize(h).astype(np.float64),
                                      reference([x[:257] for x in inputs], "sum", dtype))
        if it % 4 == r % 4:
            time.sleep(0.004)  # several cycle times: the peers' engines tick meanwhile
    same_on_every_rank(d, out, "hier.b2b.same")


@pytest.mark.timeout(60)
def test_mismatch_and_skipped_name_raise_across_nodes(nodes):
    """Across simulated nodes the negotiation still reports what each rank submitted: a shape
    mismatch raises on every rank, a name one rank never submits times out there (its peers' idle
    engines keep joining the rounds), and the engine works afterwards."""
    d = nodes
    n, r = d.size(), d.rank()
    with pytest.raises(aimass.DistributedError) as ei:
        d.allreduce(np.ones(3 + r, np.float32), name="hier.mm.shape", timeout=5)
    assert "hier.mm.shape" in str(ei.value) and "different arguments" in str(ei.value)
    t0 = time.monotonic()
    if r == 0:
        with pytest.raises(aimass.DistributedError) as ei:
            d.allreduce(np.ones((1 << 18) + 3, np.float32), name="hier.skipped", timeout=1.0)
        msg = str(ei.value)
        assert "timed out" in msg and all(f"rank {i}: did not submit it" in msg for i in range(1, n))
        assert time.monotonic() - t0 < 10
    else:
        time.sleep(1.5)  # idle: only the engine's ticks take part in rank 0's rounds
    d.barrier(name="hier.mm.barrier")
    x = np.ones((1 << 18) + 5, np.float32)
    np.testing.assert_array_equal(d.allreduce(x, op="sum", name="hier.after.mm"), np.full(x.size, n, np.float32))


@pytest.mark.timeout(120)
def test_futex_waits_give_the_yield_loops_bits(dist):
    """The shared-memory waits sleep on a futex (AIMASS_SHM_YIELD_US=0: right after the spin) or
    yield (AIMASS_SHM_WAIT=yield, the old loop): the same reduction order, so the same bits, across
    simulated nodes (np 4: 2 x 2) and on one node; odd sizes, random floats, sum and average."""
    n, r = dist.size(), dist.rank()
    rng = np.random.default_rng(900 + r)
    counts = (1, 4099, (1 << 18) + 7, 1000003)
    xs = [rng.standard_normal(c).astype(np.float32) for c in counts]
    got = {}
    for mode in ("futex", "yield"):
        env = {"AIMASS_RANKS_PER_NODE": "2" if n % 2 == 0 else None,
               "AIMASS_SHM_WAIT": "yield" if mode == "yield" else None,
               "AIMASS_SHM_YIELD_US": "0" if mode == "futex" else None}
        with engine_env(dist, **env):
            dist.set_shm_min_bytes(0)
            outs = []
            for i, x in enumerate(xs):
                for op in ("sum", "average"):
                    outs.append(dist.allreduce(x, op=op, name=f"hier.wait.{i}.{op}"))
                    y = x.copy()
                    hs = [dist.allreduce_async_(y[:len(y) // 2], op=op, name=f"hier.wait.a.{i}.{op}"),
                          dist.allreduce_async_(y[len(y) // 2:], op=op, name=f"hier.wait.b.{i}.{op}")]
                    for h in hs:
                        dist.synchronize(h)
                    outs.append(y)
            got[mode] = outs
    for a, b in zip(got["futex"], got["yield"]):
        assert a.tobytes() == b.tobytes()
    same_on_every_rank(dist, got["futex"][-1], "hier.wait.same")


# ---- the caller-thread hierarchical allreduce (comm/hier_fast.cc): blocking allreduces of 16 KiB or
# more across the two simulated nodes run in the caller's thread, with the engine as fallback

HIER_CASES = [("float32", "sum", 4097), ("float32", "average", 70001), ("float32", "min", (1 << 18) + 7),
              ("float64", "sum", 300007), ("float16", "max", 9001), ("int32", "product", 20011),
              ("float32", "sum", 1000003), ("int8", "sum", 65537)]


@pytest.fixture
def two_nodes(dist):
    """4 ranks as 2 simulated nodes x 2, restarted for this test (the module's `nodes` engine does not
    outlive the tests that restart the engine under other settings)."""
    with engine_env(dist, AIMASS_RANKS_PER_NODE=2):
        assert dist.local_size() == 2 and dist.cross_size() == 2
        dist.set_shm_min_bytes(0)
        yield dist


def random_input(seed, r, count, dtype):
    rng = np.random.default_rng(seed * 1000 + r)
    if np.dtype(dtype).kind == "f":
        x = rng.standard_normal(count).astype(dtype)
        x[::11] = -0.0 if r % 2 else 0.0
        return x
    return rng.integers(-2, 3, count).astype(dtype)


@pytest.mark.nprocs(4)
@pytest.mark.timeout(180)
def test_caller_thread_path_gives_the_engine_paths_bits(dist):
    """Random floats, odd sizes from 16 KiB (one slice under 1 MiB: one exchange; over: the two-step
    exchange), every op: the caller-thread path gives the same bits as the engine's hierarchical path
    (AIMASS_HIER_CALLER=0), on every rank, in and out of place, and it did run."""
    r = dist.rank()
    got = {}
    for mode in ("caller", "engine"):
        with engine_env(dist, AIMASS_RANKS_PER_NODE=2, AIMASS_HIER_CALLER="0" if mode == "engine" else None):
            assert dist.local_size() == 2 and dist.cross_size() == 2
            before = dist.stats()
            outs = []
            for k, (dtype, op, count) in enumerate(HIER_CASES):
                x = random_input(k, r, count, dtype)
                outs.append(dist.allreduce(x, op=op, name=f"hier.fast.{k}"))
                y = x.copy()
                assert dist.allreduce_(y, op=op, name=f"hier.fast_.{k}") is y
                outs.append(y)
            st = dist.stats()
            ran = st["hier_collectives"] - before["hier_collectives"]
            if mode == "engine":
                assert ran == 0
            else:  # a window that passes while a rank is descheduled sends a call to the engine: most run here
                assert ran >= len(HIER_CASES), st
            got[mode] = outs
            same_on_every_rank(dist, outs[-2], f"hier.fast.same.{mode}")
    for k, (a, b) in enumerate(zip(got["caller"], got["engine"])):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), HIER_CASES[k // 2]
    for k, (dtype, op, count) in enumerate(HIER_CASES):  # and the reduction itself
        ref = reference([random_input(k, i, count, dtype) for i in range(dist.size())], op, dtype)
        np.testing.assert_allclose(got["caller"][2 * k].astype(np.float64), ref,
                                   rtol=1e-2 if dtype == "float16" else 1e-5, atol=1e-2 if dtype == "float16" else 1e-5)


@pytest.mark.nprocs(4)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("path,mode", [("caller", "staged"), ("caller", "staged-kernel"), ("caller", "push"),
                                       ("caller", "pull"),
                                       ("engine", "push"), ("engine", "pull")])
def test_node_gather_writes_exactly_each_output(dist, path, mode):
    """The node's steps around the cross-node step, in the caller's thread and in the engine: staged (the
    caller's path up to 2 MiB: each rank copies the peers' parts of its input into its staging buffer,
    reduces from the peers' staging buffers in its mappings of them and copies their final slices out of
    them), pushed (each local rank writes its final slice into its node peers' outputs) or pulled
    (AIMASS_SHM_CMA_PUSH=0: each reads the peers' slices). Outputs that are views at odd element offsets
    inside larger arrays (the bytes around them stay as they were), outputs in node-shared memory
    (`dist.empty`), in and out of place, other sizes between (1.2 MiB and 2.4 MiB: staged and not); every
    result exact and the path taken. staged-kernel: the peers' staging buffers read through the kernel, as
    where they cannot be mapped."""
    env = {"AIMASS_RANKS_PER_NODE": 2, "AIMASS_HIER_CALLER": "0" if path == "engine" else None,
           "AIMASS_SHM_CMA_PUSH": "0" if mode == "pull" else None,
           "AIMASS_HIER_STAGE": None if mode.startswith("staged") else "0",
           "AIMASS_HIER_STAGE_MAP": "0" if mode == "staged-kernel" else None}
    with engine_env(dist, **env) as d:
        assert d.local_size() == 2 and d.cross_size() == 2
        d.set_shm_min_bytes(0)
        r, n = d.rank(), d.size()
        key = "hier_collectives" if path == "caller" else "shm_allreduces"
        before, staged_before = d.stats()[key], d.stats()["hier_staged"]
        staged = 0
        calls = 0
        for it, count in enumerate((4099, 70001, (1 << 18) + 5, 4099, 300001, 600007)):
            inputs = [random_input(50 + it, i, count, "int32") for i in range(n)]
            ref = np.stack([x.astype(np.int64) for x in inputs]).sum(0)
            # in place, in a view at an odd offset of a larger array: the bytes around it untouched
            outer = np.full(count + 2 * 37, 7 + r, np.int32)
            view = outer[37:37 + count]
            view[:] = inputs[r]
            assert d.allreduce_(view, op="sum", name=f"hier.gather.view.{it}") is view
            np.testing.assert_array_equal(view, ref)
            assert (outer[:37] == 7 + r).all() and (outer[37 + count:] == 7 + r).all()
            # in place in node-shared memory
            shared = d.empty(count, np.int32)
            shared[:] = inputs[r]
            assert d.allreduce_(shared, op="sum", name=f"hier.gather.shared.{it}") is shared
            np.testing.assert_array_equal(shared, ref)
            # out of place from a shared input (every rank's input is now the sum: max is the sum again)
            out = d.allreduce(shared, op="max", name=f"hier.gather.out.{it}")
            np.testing.assert_array_equal(out, ref)
            calls += 3
            staged += 3 if count * 4 <= 2 << 20 else 0
        ran = d.stats()[key] - before
        # (the caller's path sends a call to the engine when a window passes while a rank is descheduled)
        assert ran >= (calls - 2 if path == "caller" else calls), ran
        ran_staged = d.stats()["hier_staged"] - staged_before
        if mode.startswith("staged"):
            assert staged - 2 <= ran_staged <= staged, (ran_staged, staged)
        else:
            assert ran_staged == 0


@pytest.mark.nprocs(4)
@pytest.mark.timeout(150)
@pytest.mark.parametrize("stage_map", ["1", "0"])
def test_outgrown_staging_buffer_stays_readable_for_late_peers(dist, stage_map):
    """A rank whose staging buffer is too small for a call replaces it at the start of that call, while a
    local peer may still be copying the last call's final slice out of the old one (4 ranks on 2 cores: it
    often is). The old buffer lives until the node's next exchange completes (every peer then left the
    last call): freed at once, a peer reading it through the kernel (AIMASS_HIER_STAGE_MAP=0) got EFAULT
    or zeros within a few trials. Each trial restarts the engine (a fresh 1 MiB buffer) and grows it to
    2, 4 and 8 MiB; every result exact."""
    env = {"AIMASS_RANKS_PER_NODE": 2, "AIMASS_HIER_STAGE": str(8 << 20), "AIMASS_HIER_STAGE_MAP": stage_map}
    staged = 0
    with engine_env(dist, **env) as d:
        for trial in range(8):
            if trial:
                d.shutdown()
                d.init()
            d.set_shm_min_bytes(0)
            r = d.rank()
            for count in (70001, (1 << 18) + 5, (1 << 19) + 5, (1 << 20) + 5):
                out = d.allreduce(np.full(count, r + 1, np.int32), op="sum", name=f"hier.grow.{count}")
                assert (out == 10).all(), (trial, count, np.unique(out)[:4])
            staged += d.stats()["hier_staged"]  # (a fresh count in each restart)
    # (a call goes to the engine when a window passes while a rank is descheduled)
    assert staged >= 16, staged


@pytest.mark.nprocs(4)
@pytest.mark.timeout(120)
def test_across_nodes_large_buffers_are_private(two_nodes):
    """Across nodes the hierarchical paths (the engine's and the caller's) read and write the node's peers
    through the kernel, never in mappings, and private memory on huge pages moves faster there than a shared
    buffer's 4 KiB pages (ResNet-50's gradients as buckets on 2 x 2 ranks: 1.2-1.3x): the engine says it does
    not reduce in shared buffers, `dist.empty` gives ordinary memory and a large gradient bucket private huge
    pages (one node keeps both shared: test_comm_buckets, test_comm_shared_alloc); their allreduces exact."""
    torch = pytest.importorskip("torch")
    from aimass.dist.buckets import HUGE_BUCKET_BYTES
    d = two_nodes
    r, n = d.rank(), d.size()
    assert not d._require_engine().shared_buffers
    a = d.empty(1 << 20, np.float32)
    assert not d.is_shared(a)
    a[:] = r + 1
    assert d.allreduce_(a, op="sum", name="hier.private.empty") is a
    assert (a == n * (n + 1) // 2).all()
    ps = [torch.nn.Parameter(torch.zeros(k)) for k in (HUGE_BUCKET_BYTES // 4 + 4099, 70001)]
    b = d.GradientBuckets(ps, bucket_bytes=64 << 20, name="hier.private.buckets")
    assert b.shared == [False] and b.buckets[0].data_ptr() % HUGE_BUCKET_BYTES == 0
    for k, p in enumerate(ps):
        p.grad.copy_(torch.arange(p.numel(), dtype=torch.float32).remainder(97) + (r + k))
    b.allreduce(op="sum")
    for k, p in enumerate(ps):
        want = torch.arange(p.numel(), dtype=torch.float32).remainder(97) * n + sum(j + k for j in range(n))
        assert torch.equal(p.grad, want), k


@pytest.mark.nprocs(4)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "float16"])
def test_fused_batches_across_nodes_exact(two_nodes, dtype):
    """Async allreduces fused by the engine across nodes: each local rank's slice of the batch spans several
    tensors: a tensor's share of 1 MiB or more takes its own cross-node step in place, the smaller ones are
    reduced into one contiguous buffer, exchanged with the other node in one go and copied into their tensors.
    Odd sizes (1 element to 2.8 MiB), sums and averages in one batch, in place and out of place; every result
    exact, the inputs of out-of-place calls untouched, the same bits on every rank."""
    d = two_nodes
    n, r = d.size(), d.rank()
    counts = (1, 4099, 70001, 3, 700001, 300007, 17, 131073, 5, 262147, 600011)
    before = d.stats()
    for rep in range(3):
        inputs = [[rank_data(900 + 10 * rep + k, i, c, dtype) for i in range(n)] for k, c in enumerate(counts)]
        mine = [x[r].copy() for x in inputs]
        hs = []
        for k, x in enumerate(mine):
            op = "average" if k % 3 == 1 else "sum"
            name = f"hier.fused.{dtype}.{rep}.{k}"
            hs.append((op, x, d.allreduce_async_(x, op=op, name=name) if k % 2 == 0 else
                       d.allreduce_async(x, op=op, name=name)))
        for k, (op, x, h) in enumerate(hs):
            out = d.synchronize(h)
            ref = reference(inputs[k], op, dtype)
            if k % 2 == 0:
                assert out is x
            else:
                np.testing.assert_array_equal(x, inputs[k][r])  # out of place: the input as it was
            np.testing.assert_array_equal(out.astype(np.float64), ref, err_msg=f"{k} {op}")
        same_on_every_rank(d, np.concatenate([d.synchronize(h) if k % 2 else x for k, (_, x, h) in enumerate(hs)]),
                           f"hier.fused.same.{dtype}.{rep}")
    st = d.stats()
    assert st["fused_buffers"] - before["fused_buffers"] < 3 * len(counts)  # (some calls fused)
    assert st["shm_allreduces"] > before["shm_allreduces"]


@pytest.mark.nprocs(4)
@pytest.mark.timeout(120)
def test_caller_thread_path_mismatch_raises_on_every_rank(two_nodes):
    """A signature that differs (one rank's shape; one node's dtype; each node its own name) sends the
    call to the engine on every rank, whose negotiation raises; the path works afterwards."""
    d = two_nodes
    r = d.rank()
    with pytest.raises(aimass.DistributedError) as ei:
        d.allreduce(np.ones(8192 + (r == 3), np.float32), name="hier.fmm.shape", timeout=5)
    assert "hier.fmm.shape" in str(ei.value) and "different arguments" in str(ei.value)
    with pytest.raises(aimass.DistributedError) as ei:  # both nodes agree inside, not with each other
        d.allreduce(np.ones(8192, np.float32 if r < 2 else np.float64), name="hier.fmm.dtype", timeout=5)
    assert "different arguments" in str(ei.value)
    with pytest.raises(aimass.DistributedError) as ei:
        d.allreduce(np.ones(8192, np.float32), name=f"hier.fmm.node{r // 2}", timeout=1.0)
    assert "timed out" in str(ei.value) and "did not submit it" in str(ei.value)
    d.barrier(name="hier.fmm.barrier")
    before = d.stats()["hier_collectives"]
    for it in range(4):
        x = np.full(70001, r + it, np.float32)
        np.testing.assert_array_equal(d.allreduce(x, op="sum", name=f"hier.fmm.after.{it}"),
                                      np.full(70001, sum(i + it for i in range(4)), np.float32))
    assert d.stats()["hier_collectives"] > before  # the ranks' attempts stayed in step


@pytest.mark.nprocs(4)
@pytest.mark.timeout(120)
def test_caller_thread_path_late_ranks_and_async_peers(two_nodes):
    """Each rank in turn arrives past the fallback window (50 ms), and each in turn runs the call as an
    async submission while its peers block: every call completes with the right result (through the
    engine where the window passed), and blocking calls afterwards run in the caller's thread again."""
    d = two_nodes
    r, n = d.rank(), d.size()
    count = (1 << 18) + 3
    expect = lambda it: np.full(count, sum(i * 10 + it for i in range(n)), np.float32)  # noqa: E731
    for it in range(n):
        x = np.full(count, r * 10 + it, np.float32)
        if r == it:
            time.sleep(0.2)
        np.testing.assert_array_equal(d.allreduce(x, op="sum", name=f"hier.late.{it}"), expect(it))
        # a call everyone makes in time between the late ones
        np.testing.assert_array_equal(d.allreduce(x, op="sum", name=f"hier.ontime.{it}"), expect(it))
    d.barrier(name="hier.late.barrier0")
    before = d.stats()["hier_collectives"]
    for it in range(3):
        x = np.full(count, r * 10 + it, np.float32)
        np.testing.assert_array_equal(d.allreduce(x, op="sum", name=f"hier.late.then.{it}"), expect(it))
    assert d.stats()["hier_collectives"] > before  # late ranks leave the pair's ids in step
    for it in range(n):
        x = np.full(count, r * 10 + it, np.float32)
        if r == it:
            out = d.synchronize(d.allreduce_async(x, op="sum", name=f"hier.mixed.{it}"))
        else:
            out = d.allreduce(x, op="sum", name=f"hier.mixed.{it}")
        np.testing.assert_array_equal(out, expect(it))
    d.barrier(name="hier.late.barrier")
    before = d.stats()["hier_collectives"]
    for it in range(6):
        x = np.full(count, r * 10 + it, np.float32)
        np.testing.assert_array_equal(d.allreduce(x, op="sum", name=f"hier.late.after.{it}"), expect(it))
    # after the mixed calls the pair's ids may have drifted apart (then the path turns itself off after
    # three windows in vain); either way every result above is right, and the counters are consistent
    st = d.stats()
    assert st["hier_collectives"] >= before and st["hier_fallbacks"] >= 1


@pytest.mark.nprocs(4)
@pytest.mark.timeout(120)
def test_caller_thread_path_every_pair_takes_the_same_path(two_nodes):
    """Every cross-node pair settles a call with its own headers (local rank 1 does not wait for local
    rank 0's word): one name called again and again in place, odd sizes, a different rank late past the
    fallback window on some calls (those go to the engine on every rank), one node's ranks spoiled by
    queued async work on another: every result is exact, and every rank counted the same calls on the
    path and the same fallbacks (all ranks took the same path each time)."""
    d = two_nodes
    r, n = d.rank(), d.size()
    before = d.stats()
    for it in range(12):
        count = 8192 + 1000 * it + 7
        x = np.arange(count, dtype=np.int64) * (r + 1) + it
        if it % 3 == 1:
            time.sleep(0.15 if r == it % n else 0)
        if it % 4 == 2 and r // 2 == 1:  # the second node has queued work: its exchange is spoiled
            h = d.allreduce_async(np.full(5, r, np.float64), op="sum", name=f"hier.pairs.queued.{it}")
        else:
            h = None
        assert d.allreduce_(x, op="sum", name="hier.pairs") is x
        np.testing.assert_array_equal(x, np.arange(count, dtype=np.int64) * sum(range(1, n + 1)) + n * it)
        if r // 2 == 0 and it % 4 == 2:  # the other node's async call, made here after the blocking one
            h = d.allreduce_async(np.full(5, r, np.float64), op="sum", name=f"hier.pairs.queued.{it}")
        if h is not None:
            np.testing.assert_array_equal(d.synchronize(h), np.full(5, sum(range(n)), np.float64))
    st = d.stats()
    counts = np.array([[st["hier_collectives"] - before["hier_collectives"],
                        st["hier_fallbacks"] - before["hier_fallbacks"]]], np.int64)
    everyone = d.allgather(counts, name="hier.pairs.counts")
    assert (everyone == everyone[:1]).all(), everyone
    assert everyone[0, 0] >= 1, everyone  # (most calls run on the path; late ones and spoiled ones do not)


def wait_parked(d, limit_s=10.0):
    """True once the engine ran no negotiation round over 0.1 s (it parked), False when it kept running
    rounds for limit_s (it ticks every cycle time, 1 ms)."""
    t_end = time.monotonic() + limit_s
    while time.monotonic() < t_end:
        c0 = d.stats()["cycles"]
        time.sleep(0.1)
        if d.stats()["cycles"] == c0:
            return True
    return False


@pytest.mark.nprocs(4)
@pytest.mark.timeout(180)
def test_idle_engines_park_across_nodes(two_nodes, mpi):
    """Across the two simulated nodes idle engines park as on one node (no negotiation round while no
    rank has work), and a rank that gets work wakes the others (its node peer through the node's
    channel, the other node by a wake message): async calls submitted by one rank at a time while the
    others are parked complete with exact results, a mismatch still raises on every rank, the
    caller-thread path still runs, and AIMASS_PARK_ACROSS_NODES=0 keeps the engines ticking. (Each rank
    checks that its engine parked, then waits for the others at an mpi4py barrier, which does not touch
    the engines: a submission before every rank looked would keep the others' engines busy.)"""
    d = two_nodes

    def all_parked():
        ok = wait_parked(d)
        mpi.Barrier()
        assert ok
    r, n = d.rank(), d.size()
    for it in range(3):
        x = np.full(70001, r + it, np.float32)
        np.testing.assert_array_equal(d.allreduce(x, op="sum", name="hier.park.warm"),
                                      np.full(70001, sum(i + it for i in range(n)), np.float32))
    all_parked()
    # each rank in turn leaves the park first: the others are woken for its round
    for it in range(n):
        d.barrier(name=f"hier.park.b.{it}")
        all_parked()
        if r != it:
            time.sleep(0.05)
        x = np.arange(1001, dtype=np.int64) * (r + 1) + it
        out = d.synchronize(d.allreduce_async(x, op="sum", name=f"hier.park.async.{it}"))
        np.testing.assert_array_equal(out, np.arange(1001, dtype=np.int64) * sum(range(1, n + 1)) + n * it)
    # a rank alone at work: the others' parked engines still join its rounds, so the name times out
    # with every other rank listed (not a hang), and a mismatch raises everywhere
    all_parked()
    if r == n - 1:
        with pytest.raises(aimass.DistributedError) as ei:
            d.allreduce(np.ones(5, np.float32), name="hier.park.alone", timeout=1.0)
        assert "timed out" in str(ei.value) and all(f"rank {i}: did not submit it" in str(ei.value)
                                                    for i in range(n - 1))
    d.barrier(name="hier.park.b.alone")
    all_parked()
    with pytest.raises(aimass.DistributedError) as ei:
        d.allreduce(np.ones(3 + r, np.float32), name="hier.park.mm", timeout=5)
    assert "different arguments" in str(ei.value)
    before = d.stats()["hier_collectives"]
    for it in range(3):
        x = np.full(70001, r + it, np.float32)
        np.testing.assert_array_equal(d.allreduce(x, op="sum", name="hier.park.after"),
                                      np.full(70001, sum(i + it for i in range(n)), np.float32))
    assert d.stats()["hier_collectives"] > before
    with engine_env(d, AIMASS_PARK_ACROSS_NODES=0, AIMASS_RANKS_PER_NODE=2):
        d.set_shm_min_bytes(0)
        assert not wait_parked(d, limit_s=0.5)  # the old behaviour: a round every cycle time
        out = d.allreduce(np.full(70001, r, np.float32), op="sum", name="hier.park.off")
        np.testing.assert_array_equal(out, np.full(70001, sum(range(n)), np.float32))


def test_stage_bound_must_be_a_byte_count(dist):
    with pytest.raises(ValueError, match="AIMASS_HIER_STAGE"):
        with engine_env(dist, AIMASS_HIER_STAGE="2m"):
            pass
