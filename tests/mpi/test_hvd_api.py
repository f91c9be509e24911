"""Horovod's torch API names (docs/horovod.md table): each behaves as in horovod.torch."""
import json
import os
import shutil
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_basics_and_built_flags(dist):
    from mpi4py import MPI
    w = MPI.COMM_WORLD
    assert dist.is_initialized()
    assert (dist.rank(), dist.size()) == (w.Get_rank(), w.Get_size())
    assert 0 <= dist.local_rank() < dist.local_size() <= dist.size()
    assert 0 <= dist.cross_rank() < dist.cross_size()
    assert dist.cross_size() * dist.local_size() == dist.size()
    assert dist.is_homogeneous() is True
    assert dist.mpi_built() and dist.mpi_enabled()
    assert not dist.gloo_built() and not dist.gloo_enabled() and not dist.rocm_built()
    assert not dist.ccl_built() and not dist.ddl_built()
    assert dist.cuda_built() == aimass_cuda_built()
    assert dist.nccl_built() == dist.cuda_built()
    assert dist.mpi_threads_supported() == (MPI.Query_thread() == MPI.THREAD_MULTIPLE)
    assert dist.HorovodInternalError is dist.DistributedError


def aimass_cuda_built():
    import aimass.cuda
    return aimass.cuda.built()


def test_op_constants_compare_to_strings(dist):
    assert (dist.Average, dist.Sum, dist.Min, dist.Max, dist.Product) == ("average", "sum", "min", "max", "product")
    x = torch.full((4,), float(dist.rank() + 1))
    n = dist.size()
    assert torch.equal(dist.allreduce(x, op=dist.Sum, name="c.sum"), torch.full((4,), n * (n + 1) / 2))
    assert torch.equal(dist.allreduce(x, op=dist.Min, name="c.min"), torch.ones(4))
    assert torch.equal(dist.allreduce(x, op=dist.Max, name="c.max"), torch.full((4,), float(n)))
    assert torch.equal(dist.allreduce(x, op=dist.Product, name="c.prod"),
                       torch.full((4,), float(np.prod(np.arange(1, n + 1)))))
    assert torch.equal(dist.allreduce(x, name="c.avg"), torch.full((4,), (n + 1) / 2))


def test_adasum_says_what_to_use(dist):
    with pytest.raises(NotImplementedError, match="op=Average"):
        dist.allreduce(torch.ones(2), op=dist.Adasum)


def test_average_argument_is_deprecated_but_works(dist):
    x = torch.ones(3)
    with pytest.warns(DeprecationWarning):
        s = dist.allreduce(x, average=False, name="dep.sum")
    assert torch.equal(s, torch.full((3,), float(dist.size())))
    with pytest.raises(ValueError, match="supersedes"):
        dist.allreduce(x, average=True, op=dist.Sum)


def test_prescale_postscale(dist):
    n = dist.size()
    x = torch.full((5,), 2.0)
    got = dist.allreduce(x, op=dist.Sum, prescale_factor=0.5, postscale_factor=3.0, name="scale.sum")
    assert torch.equal(got, torch.full((5,), 3.0 * n))
    got = dist.allreduce(x, op=dist.Average, prescale_factor=4.0, postscale_factor=0.25, name="scale.avg")
    assert torch.allclose(got, torch.full((5,), 2.0))
    i = torch.full((3,), 10, dtype=torch.int64)
    assert torch.equal(dist.allreduce(i, op=dist.Sum, postscale_factor=0.5, name="scale.int"),
                       torch.full((3,), 5 * n, dtype=torch.int64))
    with pytest.raises(TypeError, match="bool"):
        dist.allreduce(torch.ones(2, dtype=torch.bool), op=dist.Sum, prescale_factor=2.0)


def test_allreduce_forms_and_poll(dist):
    n = dist.size()
    x = torch.full((6,), float(dist.rank()))
    want = torch.full((6,), (n - 1) / 2)
    h = dist.allreduce_async(x, name="forms.async")
    assert isinstance(h, dist.Handle)
    out = dist.synchronize(h)
    assert torch.equal(out, want) and torch.equal(x, torch.full((6,), float(dist.rank())))
    y = x.clone()
    h = dist.allreduce_async_(y, name="forms.async_")
    while not dist.poll(h):
        pass
    assert dist.synchronize(h) is y and torch.equal(y, want)
    z = x.clone()
    assert dist.allreduce_(z, name="forms._") is z and torch.equal(z, want)


def test_compression_none_fp16_bf16_and_custom(dist):
    n = dist.size()
    x = torch.full((64,), 0.1 * (dist.rank() + 1))
    want = 0.1 * (n + 1) / 2
    for c in (dist.Compression.none, dist.Compression.fp16, dist.Compression.bf16):
        got = dist.allreduce(x, compression=c, name=f"comp.{c.__name__}")
        assert got.dtype == torch.float32
        assert torch.allclose(got, torch.full((64,), want), rtol=1e-2)
    t, ctx = dist.Compression.fp16.compress(torch.ones(2, dtype=torch.float64))
    assert t.dtype == torch.float16 and dist.Compression.fp16.decompress(t, ctx).dtype == torch.float64
    d = dist.allreduce(torch.ones(4, dtype=torch.float64), compression=dist.Compression.fp16, name="comp.f64")
    assert d.dtype == torch.float64 and torch.equal(d, torch.ones(4, dtype=torch.float64))

    class Halver(dist.Compressor):  # user-defined: runs in Python around the collective
        calls = []

        @staticmethod
        def compress(tensor):
            Halver.calls.append("c")
            return tensor * 0.5, "ctx"

        @staticmethod
        def decompress(tensor, ctx):
            assert ctx == "ctx"
            Halver.calls.append("d")
            return tensor * 2

    got = dist.allreduce(torch.ones(3), op=dist.Sum, compression=Halver, name="comp.custom")
    assert torch.equal(got, torch.full((3,), float(n))) and Halver.calls == ["c", "d"]


def test_allreduce_is_differentiable(dist):
    n = dist.size()
    x = torch.full((3,), float(dist.rank() + 1), requires_grad=True)
    y = dist.allreduce(x, op=dist.Sum, name="grad.ar")
    (y * (dist.rank() + 1)).sum().backward()
    # d/dx_r of sum_k c_k * sum_j x_j = sum_k c_k
    assert torch.equal(x.grad, torch.full((3,), n * (n + 1) / 2))


def test_broadcast_root_rank_and_root_alias(dist):
    n, r = dist.size(), dist.rank()
    x = torch.full((2, 3), float(r))
    assert torch.equal(dist.broadcast(x, n - 1, name="b.pos"), torch.full((2, 3), float(n - 1)))
    assert torch.equal(dist.broadcast(x, root_rank=0, name="b.kw"), torch.zeros(2, 3))
    assert torch.equal(dist.broadcast(x, root=n - 1, name="b.alias"), torch.full((2, 3), float(n - 1)))
    with pytest.raises(ValueError, match="disagree"):
        dist.broadcast(x, root_rank=0, root=1)
    y = x.clone()
    assert dist.broadcast_(y, 0, name="b._") is y and torch.equal(y, torch.zeros(2, 3))
    h = dist.broadcast_async(x, 0, name="b.async")
    assert torch.equal(dist.synchronize(h), torch.zeros(2, 3))
    y = x.clone()
    h = dist.broadcast_async_(y, n - 1, name="b.async_")
    assert dist.synchronize(h) is y and torch.equal(y, torch.full((2, 3), float(n - 1)))
    z = torch.full((2,), float(r + 1), requires_grad=True)
    dist.broadcast(z, 0, name="b.grad").sum().backward()
    assert torch.equal(z.grad, torch.full((2,), float(n) if r == 0 else 0.0))


def test_allgather_forms_and_gradient(dist):
    n, r = dist.size(), dist.rank()
    x = torch.full((r + 1, 2), float(r))
    g = dist.allgather(x, name="ag")
    assert g.shape == (n * (n + 1) // 2, 2)
    h = dist.allgather_async(x, name="ag.async")
    assert torch.equal(dist.synchronize(h), g)
    x.requires_grad_(True)
    out = dist.allgather(x, name="ag.grad")
    (out * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((r + 1, 2), 2.0 * n))


def test_grouped_allreduce_all_forms(dist):
    n = dist.size()
    ts = [torch.full((k + 1,), float(dist.rank() + k)) for k in range(4)]
    want = [torch.full((k + 1,), (n - 1) / 2 + k) for k in range(4)]
    outs = dist.grouped_allreduce(ts, name="grp")
    assert all(torch.equal(o, w) for o, w in zip(outs, want))
    outs = dist.synchronize(dist.grouped_allreduce_async(ts, name="grp.async"))
    assert all(torch.equal(o, w) for o, w in zip(outs, want))
    cp = [t.clone() for t in ts]
    outs = dist.grouped_allreduce_(cp, op=dist.Sum, name="grp._")
    assert all(o is c for o, c in zip(outs, cp))
    h = dist.grouped_allreduce_async_([t.clone() for t in ts], name="grp.async_")
    assert all(torch.equal(o, w) for o, w in zip(dist.synchronize(h), want))
    with pytest.raises(ValueError, match="non-empty list"):
        dist.grouped_allreduce([])


def test_grouped_allgather_and_reducescatter(dist):
    n, r = dist.size(), dist.rank()
    outs = dist.grouped_allgather([torch.full((1,), float(r)), torch.full((2, 2), r, dtype=torch.int8)])
    assert outs[0].tolist() == [float(k) for k in range(n)] and outs[1].shape == (2 * n, 2)
    outs = dist.grouped_reducescatter([torch.ones(n, 2), torch.ones(2 * n)], op=dist.Sum)
    assert torch.equal(outs[0], torch.full((1, 2), float(n))) and torch.equal(outs[1], torch.full((2,), float(n)))
    outs = dist.grouped_reducescatter([torch.ones(n)], compression=dist.Compression.fp16)
    assert outs[0].dtype == torch.float32 and torch.equal(outs[0], torch.ones(1))
    h = dist.grouped_allgather_async([torch.ones(1)])
    assert dist.poll(h) in (True, False) and dist.synchronize(h)[0].shape == (n,)
    with pytest.raises(NotImplementedError, match="alltoall\\(\\)"):
        dist.alltoall_async(torch.ones(n))
    with pytest.raises(NotImplementedError, match="sparse_as_dense"):
        dist.sparse_allreduce_async(torch.ones(2))
    assert issubclass(dist.HostsUpdatedInterrupt, Exception)


def test_reducescatter_horovod_spelling(dist):
    n, r = dist.size(), dist.rank()
    x = torch.arange(2 * n, dtype=torch.float32).reshape(2 * n, 1) + r
    got = dist.reducescatter(x, name="rs")  # op defaults to Average
    want = (torch.arange(2 * n, dtype=torch.float32).reshape(2 * n, 1) + (n - 1) / 2)[2 * r:2 * r + 2]
    assert torch.equal(got, want)
    got = dist.reducescatter(x, op=dist.Sum, name="rs.sum")
    assert torch.equal(got, want * n)
    assert torch.equal(dist.synchronize(dist.reducescatter_async(x, name="rs.async")), want)
    xg = x.clone().requires_grad_(True)
    dist.reducescatter(xg, op=dist.Sum, name="rs.grad").sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))


def test_alltoall_even_and_with_splits(dist):
    n, r = dist.size(), dist.rank()
    x = torch.arange(n * 2, dtype=torch.float32) + 100 * r
    out = dist.alltoall(x, name="a2a")
    want = torch.cat([torch.arange(2 * r, 2 * r + 2, dtype=torch.float32) + 100 * k for k in range(n)])
    assert torch.equal(out, want)
    # rank r sends k+1 rows to rank k
    splits = torch.tensor([k + 1 for k in range(n)], dtype=torch.int32)
    x = torch.full((int(splits.sum()), 3), float(r))
    out, received = dist.alltoall(x, splits=splits, name="a2a.splits")
    assert received.tolist() == [r + 1] * n
    assert torch.equal(out, torch.cat([torch.full((r + 1, 3), float(k)) for k in range(n)]))
    xg = x.clone().requires_grad_(True)
    out, _ = dist.alltoall(xg, splits=splits, name="a2a.grad")
    (out * (r + 1)).sum().backward()
    # the rows sent to rank k come back with rank k's weight
    assert torch.equal(xg.grad[:, 0], torch.cat([torch.full((k + 1,), float(k + 1)) for k in range(n)]))
    with pytest.raises(ValueError, match="divisible"):
        dist.alltoall(torch.ones(n + 1 if n > 1 else 3, 2)) if n > 1 else dist.alltoall(torch.ones(3), splits=[2])


def test_barrier_and_join(dist):
    dist.barrier()
    dist.barrier(process_set=dist.global_process_set)
    last = dist.join()
    assert 0 <= last < dist.size()
    assert dist.allgather_object(last) == [last] * dist.size()


def test_broadcast_object_and_allgather_object(dist):
    r = dist.rank()
    obj = {"epoch": 7, "rank": r, "t": torch.arange(3)} if r == 0 else None
    got = dist.broadcast_object(obj, root_rank=0)
    assert got["epoch"] == 7 and got["rank"] == 0 and torch.equal(got["t"], torch.arange(3))
    assert dist.allgather_object({"r": r, "pad": "x" * r}) == [{"r": k, "pad": "x" * k} for k in range(dist.size())]


def test_process_sets(dist):
    n, r = dist.size(), dist.rank()
    if n < 2:
        pytest.skip("needs 2 ranks")
    evens = dist.add_process_set([k for k in range(n) if k % 2 == 0])
    assert evens.process_set_id > 0 and evens.size() == len(range(0, n, 2))
    assert evens.included() == (r % 2 == 0)
    if evens.included():
        assert evens.rank() == r // 2
        got = dist.allreduce(torch.tensor([float(r)]), op=dist.Sum, process_set=evens, name="ps.sum")
        assert got.item() == sum(range(0, n, 2))
        g = dist.allgather(torch.tensor([r]), process_set=evens, name="ps.ag")
        assert g.tolist() == list(range(0, n, 2))
        b = dist.broadcast(torch.tensor([r]), root_rank=evens.size() - 1, process_set=evens, name="ps.b")
        assert b.item() == max(range(0, n, 2))
        dist.barrier(process_set=evens)
        assert dist.broadcast_object(r, 0, process_set=evens) == 0
    else:
        with pytest.raises(ValueError, match="not in process set"):
            dist.allreduce(torch.ones(1), process_set=evens)
    with pytest.raises(ValueError, match="already registered"):
        dist.add_process_set([k for k in range(n) if k % 2 == 0])
    assert dist.remove_process_set(evens) is True
    assert dist.remove_process_set(evens) is False
    with pytest.raises(ValueError, match="not registered"):
        dist.allreduce(torch.ones(1), process_set=evens)
    with pytest.raises(ValueError, match="cannot be removed"):
        dist.remove_process_set(dist.global_process_set)
    assert dist.global_process_set.size() == n and dist.global_process_set.rank() == r


def test_timeline_is_chrome_trace_json(dist):
    base = tempfile.mkdtemp(prefix="hvd-tl-") if dist.rank() == 0 else None
    base = dist.broadcast_object(base, root_rank=0)
    path = os.path.join(base, "timeline.json")
    dist.start_timeline(path, mark_cycles=True)
    dist.allreduce(torch.ones(1000), name="tl.ar")
    dist.broadcast(torch.ones(10), 0, name="tl.bc")
    dist.stop_timeline()
    dist.barrier()
    mine = path if dist.size() == 1 else os.path.join(base, f"timeline.rank{dist.rank()}.json")
    with open(mine) as f:
        ev = json.load(f)
    names = {(e.get("name"), e.get("ph")) for e in ev}
    assert ("SUBMIT", "i") in names and ("allreduce tl.ar", "X") in names and ("broadcast tl.bc", "X") in names
    assert any(e["ph"] == "C" and "cycles" in e["args"] for e in ev)
    assert all(e.get("dur", 0) >= 0 for e in ev)
    dist.barrier()
    if dist.rank() == 0:
        shutil.rmtree(base)


def test_elastic_raises_with_a_pointer(dist):
    with pytest.raises(NotImplementedError, match="elastic.*docs/horovod.md"):
        @dist.elastic.run
        def train(state):
            pass
    for cls in (dist.elastic.TorchState, dist.elastic.ObjectState, dist.elastic.ElasticSampler):
        with pytest.raises(NotImplementedError, match="restart the job"):
            cls()


@pytest.mark.timeout(60)
def test_sync_batch_norm_equals_batch_norm_on_the_whole_batch(dist):
    n, r = dist.size(), dist.rank()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4 * n, 3, 5, 5, generator=g) * 3 + 1
    dy = torch.randn(4 * n, 3, 5, 5, generator=g)
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=g)
        ref.bias.uniform_(-1, 1, generator=g)
    sbn = dist.SyncBatchNorm(3)
    sbn.load_state_dict(ref.state_dict())
    xr = x.clone().requires_grad_(True)
    (ref(xr) * dy).sum().backward()
    xs = x[4 * r:4 * r + 4].clone().requires_grad_(True)
    (sbn(xs) * dy[4 * r:4 * r + 4]).sum().backward()
    torch.testing.assert_close(sbn(xs.detach()) if False else sbn.running_mean, ref.running_mean)
    torch.testing.assert_close(sbn.running_var, ref.running_var)
    torch.testing.assert_close(xs.grad, xr.grad[4 * r:4 * r + 4], rtol=1e-4, atol=1e-5)
    wgrad = dist.allreduce(sbn.weight.grad, op=dist.Sum, name="sbn.wg")
    torch.testing.assert_close(wgrad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    sbn.eval()
    ref.eval()
    torch.testing.assert_close(sbn(x[:2]), ref(x[:2]))
    with pytest.raises(ValueError, match="2-D"):
        sbn(torch.ones(3))
