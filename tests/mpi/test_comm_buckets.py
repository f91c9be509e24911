"""Gradients as views into flat buckets (GradientBuckets, DistributedOptimizer(gradient_as_bucket_view=True)):
odd parameter sizes over several buckets and dtypes give the ranks' averaged gradients in place, views survive
zeroing and replaced gradients, training matches the per-tensor optimizer, and a layout that differs between ranks
raises instead of hanging."""
import numpy as np
import pytest

import aimass

torch = pytest.importorskip("torch")


def make_model(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5), torch.nn.Tanh(),
                            torch.nn.Linear(5, 3))
    m[2].double()  # a float64 layer: buckets are per dtype
    return m


def forward(m, x):
    h = m[1](m[0](x))
    h = m[3](m[2](h.double())).float()
    return m[4](h)


def grads_of_rank(r, seed=0):
    m = make_model(seed)
    g = torch.Generator().manual_seed(500 + r)
    x, y = torch.randn(4, 7, generator=g), torch.randn(4, 3, generator=g)
    torch.nn.functional.mse_loss(forward(m, x), y).backward()
    return [p.grad.clone() for p in m.parameters()], x, y


def test_buckets_average_odd_sizes_in_place(dist):
    n, r = dist.size(), dist.rank()
    m = make_model()
    b = dist.GradientBuckets(m.parameters(), bucket_bytes=256, name="t.buckets.avg")
    assert len(b) >= 4  # 256-byte buckets: several per dtype, larger parameters alone
    assert {t.dtype for t in b.buckets} == {torch.float32, torch.float64}
    params = list(m.parameters())
    assert b.members(0)[0] is params[-1]  # reverse order: the last layer's gradients first
    _, x, y = grads_of_rank(r)
    torch.nn.functional.mse_loss(forward(m, x), y).backward()
    for p in params:  # autograd accumulated into the views
        i = b.bucket_of(p)
        base = b.buckets[i].data_ptr()
        assert base <= p.grad.data_ptr() < base + b.buckets[i].numel() * b.buckets[i].element_size()
    b.allreduce()
    every = [grads_of_rank(k)[0] for k in range(n)]
    for j, p in enumerate(params):
        want = sum(e[j] for e in every) / n
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-7)
    b.zero_()
    assert all(float(t.abs().sum()) == 0 for t in b.buckets)
    assert all(p.grad.data_ptr() == b._views[id(p)].data_ptr() for p in params)


def test_replaced_and_missing_gradients_are_copied_in(dist):
    n, r = dist.size(), dist.rank()
    m = make_model()
    params = list(m.parameters())
    b = dist.GradientBuckets(params, bucket_bytes=1000, name="t.buckets.repl")
    m.zero_grad(set_to_none=True)  # torch's default drops the views
    assert all(p.grad is None for p in params)
    params[0].grad = torch.full_like(params[0], float(r + 1))  # replaced by user code
    handles = b.allreduce_async(op="sum")
    for h in handles:
        dist.synchronize(h)
    assert torch.all(params[0].grad == n * (n + 1) / 2)
    assert all(float(p.grad.abs().sum()) == 0 for p in params[1:])  # missing gradients reduced as zeros
    assert params[0].grad.data_ptr() == b._views[id(params[0])].data_ptr()


def test_bucket_bf16_and_large_parameter_alone(dist):
    n, r = dist.size(), dist.rank()
    ps = [torch.nn.Parameter(torch.zeros(k, dtype=dt)) for k, dt in
          ((3, torch.bfloat16), (70_001, torch.float32), (5, torch.bfloat16), (1, torch.float32), (17, torch.float32))]
    b = dist.GradientBuckets(ps, bucket_bytes=4096, name="t.buckets.bf16")
    assert b.members(b.bucket_of(ps[1])) == [ps[1]]
    for k, p in enumerate(ps):
        p.grad.fill_(float(r + k))
    b.allreduce(op="sum")
    for k, p in enumerate(ps):
        assert torch.all(p.grad.float() == float(sum(j + k for j in range(n)))), k


def test_large_buckets_in_huge_page_memory(dist):
    """Host buckets of 2 MiB or more live in _C.HostBuffer memory (2 MiB-aligned, advised as huge pages, so
    the single-copy path's page walks are few); smaller ones and gradients' values behave as before: odd
    sizes, two dtypes, zeroing and a replaced gradient, the buffer kept alive by the bucket alone."""
    import gc
    from aimass.dist.buckets import HUGE_BUCKET_BYTES
    n, r = dist.size(), dist.rank()
    big = HUGE_BUCKET_BYTES // 4 + 12_345  # float32 elements: past the bound, not a whole page
    ps = [torch.nn.Parameter(torch.zeros(k, dtype=dt)) for k, dt in
          ((big, torch.float32), (7, torch.float32), (HUGE_BUCKET_BYTES // 2 + 3, torch.bfloat16), (11, torch.float64))]
    b = dist.GradientBuckets(ps, bucket_bytes=64 << 20, name="t.buckets.huge")
    gc.collect()
    for t, shared in zip(b.buckets, b.shared):
        huge = t.numel() * t.element_size() >= HUGE_BUCKET_BYTES
        # shared host buckets (the engine maps the peers' ones) are whole pages; else huge pages
        assert shared == (huge and dist._require_engine().shared_buffers), (t.dtype, t.numel())
        assert (t.data_ptr() % (4096 if shared else HUGE_BUCKET_BYTES) == 0) == huge, (t.dtype, t.numel())
        assert float(t.abs().sum()) == 0
    for k, p in enumerate(ps):
        p.grad.copy_(torch.arange(p.numel(), dtype=torch.float64).remainder(97).to(p.dtype) + (r + k))
    b.allreduce(op="sum")
    for k, p in enumerate(ps):
        want = (torch.arange(p.numel(), dtype=torch.float64).remainder(97) * n + sum(j + k for j in range(n)))
        torch.testing.assert_close(p.grad.double(), want.to(p.dtype).double(), rtol=0, atol=0)
    b.zero_()
    ps[0].grad = torch.full_like(ps[0], float(r + 1))  # replaced: copied back into the bucket
    for h in b.allreduce_async(op="sum"):
        dist.synchronize(h)
    assert torch.all(ps[0].grad == n * (n + 1) / 2)
    assert ps[0].grad.data_ptr() == b._views[id(ps[0])].data_ptr()
    assert b.buckets[b.bucket_of(ps[0])].data_ptr() % (4096 if b.shared[b.bucket_of(ps[0])] else HUGE_BUCKET_BYTES) == 0


def _shared_bucket_run(dist, name, ops=("average", "sum", "max")):
    """Large odd-sized buckets of four dtypes (seeded per-rank values), each op in turn: the reduced buckets'
    bits, the buckets' shared flags and the engine's count of allreduces reduced in the peers' mappings."""
    r = dist.rank()
    big = (2 << 20) // 4 + 4_099  # past HUGE_BUCKET_BYTES: buckets in shared memory where the engine maps them
    specs = ((big, torch.float32), (big // 2 + 7, torch.float64), (2 * big + 1, torch.bfloat16),
             (2 * big + 3, torch.float16), (13, torch.float32))
    ps = [torch.nn.Parameter(torch.zeros(k, dtype=dt)) for k, dt in specs]
    # The 13 floats: a small private bucket, in buckets of their own. In one set, a negotiation cycle that
    # caught it beside the large ones (a loaded machine delays the engine until every bucket is pending)
    # ran the whole fused batch with kernel copies, so the count of mapped runs depended on the timing.
    large = dist.GradientBuckets(ps[:4], bucket_bytes=big * 4, name=name)
    small = dist.GradientBuckets(ps[4:], bucket_bytes=big * 4, name=name + ".small")
    before = dist.stats()["shm_mapped"]
    out = []
    for op in ops:
        g = torch.Generator().manual_seed(1000 + r)
        for p in ps:  # values whose sums round: the operand order shows in the bits
            p.grad.copy_((torch.randn(p.numel(), generator=g, dtype=torch.float64) * 3).to(p.dtype))
        large.allreduce(op=op)
        small.allreduce(op=op)
        out.append([p.grad.clone() for p in ps])
        for b, group in ((large, ps[:4]), (small, ps[4:])):
            for p in group:  # views still in place
                base = b.buckets[b.bucket_of(p)]
                assert base.data_ptr() <= p.grad.data_ptr() < base.data_ptr() + base.numel() * base.element_size()
    return out, list(large.shared) + list(small.shared), dist.stats()["shm_mapped"] - before, ps


def test_shared_buckets_reduced_in_the_peers_mappings_bit_exact(dist):
    """Where the engine maps the local peers' shared host buffers (one node, single copy allowed), large
    buckets live there and are reduced with loads and stores in every rank's bucket: the same bits as the
    kernel-copy push on private buckets (AIMASS_SHM_MAP=0), on every rank, for fp32 / fp64 / bf16 / fp16,
    odd sizes, average / sum / max, and close to the ranks' values reduced here."""
    from mpi4py import MPI
    from _engine_env import engine_env
    if not dist.shm_available() or not dist._require_engine().shared_buffers:
        pytest.skip("the engine does not map the peers' shared buffers here (no shared-memory segment or no cma)")
    n = dist.size()
    new, shared, mapped, ps = _shared_bucket_run(dist, "t.buckets.shared")
    assert sorted(shared) == [False] + [True] * 4, shared  # the 13 floats' bucket is under the huge-bucket bound
    assert mapped >= 3, mapped  # every large bucket, each op (fused batches count once)
    with engine_env(dist, AIMASS_SHM_MAP="0"):
        assert not dist._require_engine().shared_buffers
        old, shared0, mapped0, _ = _shared_bucket_run(dist, "t.buckets.private")
        assert shared0 == [False] * 5 and mapped0 == 0
    for o, (a_op, b_op) in enumerate(zip(new, old)):
        for k, (a, b) in enumerate(zip(a_op, b_op)):
            assert torch.equal(a.view(torch.int8 if a.element_size() == 1 else
                                      {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]),
                               b.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[b.element_size()])), (o, k)
    # every rank holds the same bits
    digest = [float(t.double().sum()) for op_res in new for t in op_res]
    every = MPI.COMM_WORLD.allgather(digest)
    assert all(e == every[0] for e in every)
    # and they are the ranks' values reduced (recomputed here from the seeds)
    for k, p in enumerate(ps):
        vals = []
        for j in range(n):
            g = torch.Generator().manual_seed(1000 + j)
            for q in ps[:k]:
                torch.randn(q.numel(), generator=g, dtype=torch.float64)
            vals.append((torch.randn(p.numel(), generator=g, dtype=torch.float64) * 3).to(p.dtype).double())
        tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}[p.dtype]
        torch.testing.assert_close(new[0][k].double(), sum(vals) / n, rtol=tol, atol=tol * 4)
        torch.testing.assert_close(new[1][k].double(), sum(vals), rtol=tol, atol=tol * 4 * n)
        torch.testing.assert_close(new[2][k].double(), torch.stack(vals).max(0).values, rtol=0, atol=0)


def test_shared_bucket_layout_differing_between_ranks_raises(dist):
    """Large (shared) buckets whose sizes differ between ranks raise on every rank instead of hanging."""
    r = dist.rank()
    p = torch.nn.Parameter(torch.zeros((3 << 20) // 4 + (r == 0)))  # rank 0's bucket is one element longer
    b = dist.GradientBuckets([p], name="t.buckets.shared.mismatch", bucket_bytes=16 << 20)
    with pytest.raises(aimass.DistributedError):
        b.allreduce(timeout=5)


def test_bad_arguments():
    from aimass.dist.buckets import GradientBuckets
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="bucket_bytes"):
        GradientBuckets([p], bucket_bytes=0)
    with pytest.raises(TypeError, match="torch parameters"):
        GradientBuckets([np.zeros(3)])
    with pytest.raises(ValueError, match="no parameter"):
        GradientBuckets([torch.zeros(3)])  # requires_grad False
    with pytest.raises(ValueError, match="name"):
        GradientBuckets([p], name="")
    b = GradientBuckets([p])
    with pytest.raises(KeyError, match="not in these buckets"):
        b.bucket_of(torch.nn.Parameter(torch.zeros(1)))


def test_layout_differing_between_ranks_raises(dist):
    r = dist.rank()
    p = torch.nn.Parameter(torch.zeros(5 + (r == 0)))  # rank 0's bucket is one element longer
    b = dist.GradientBuckets([p], name="t.buckets.mismatch")
    with pytest.raises(aimass.DistributedError):
        b.allreduce(timeout=5)


def train(dist, bucketed, steps=3):
    m = make_model(1)
    opt = dist.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                    named_parameters=m.named_parameters(), gradient_as_bucket_view=bucketed,
                                    bucket_bytes=300 if bucketed else None)
    for s in range(steps):
        g = torch.Generator().manual_seed(10 * s + dist.rank())
        x, y = torch.randn(4, 7, generator=g), torch.randn(4, 3, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(forward(m, x), y).backward()
        opt.step()
    opt.remove_hooks()
    return [p.detach().clone() for p in m.parameters()], opt


def test_optimizer_bucket_view_matches_per_tensor(dist):
    plain, _ = train(dist, False)
    bucketed, opt = train(dist, True)
    for a, b in zip(plain, bucketed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert opt._buckets is not None and len(opt._buckets) > 1
    with pytest.raises(ValueError, match="no groups"):
        dist.DistributedOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), num_groups=2,
                                  gradient_as_bucket_view=True)
    with pytest.raises(ValueError, match="bucket_bytes applies"):
        dist.DistributedOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), bucket_bytes=100)


def _blocking_bucket_run(dist, name):
    r = dist.rank()
    big = (2 << 20) // 4 + 1_001
    ps = [torch.nn.Parameter(torch.zeros(k, dtype=dt)) for k, dt in ((big, torch.float32), (2 * big + 5, torch.bfloat16))]
    b = dist.GradientBuckets(ps, bucket_bytes=64 << 20, name=name)
    g = torch.Generator().manual_seed(77 + r)
    for p in ps:
        p.grad.copy_((torch.randn(p.numel(), generator=g, dtype=torch.float64) * 3).to(p.dtype))
    st = dist.stats()
    for i, t in enumerate(b.buckets):  # blocking, in place: the caller-thread channel's push where it runs
        dist.allreduce_(t, op="average", name=f"{name}.{i}")
    st2 = dist.stats()
    return [p.grad.clone() for p in ps], list(b.shared), (st2["ll_mapped"] - st["ll_mapped"]) + (
        st2["shm_mapped"] - st["shm_mapped"])


def test_blocking_allreduce_of_shared_buckets_bit_exact(dist):
    """A blocking allreduce_ of a bucket in shared memory (the caller-thread channel's push, or the engine when
    the channel hands it over) reduces in the peers' mappings: the same bits as on private buckets."""
    from _engine_env import engine_env
    if not dist.shm_available() or not dist._require_engine().shared_buffers:
        pytest.skip("the engine does not map the peers' shared buffers here")
    new, shared, mapped = _blocking_bucket_run(dist, "t.blocking.shared")
    assert shared == [True, True] and mapped >= 1, (shared, mapped)
    with engine_env(dist, AIMASS_SHM_MAP="0"):
        old, shared0, mapped0 = _blocking_bucket_run(dist, "t.blocking.private")
        assert shared0 == [False, False] and mapped0 == 0
    for a, b in zip(new, old):
        ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
        assert torch.equal(a.view(ints), b.view(ints))
