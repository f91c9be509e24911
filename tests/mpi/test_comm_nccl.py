"""The NCCL path of aimass.dist (CUDA tensors). Without a GPU this checks the
library discovery and that a CUDA collective fails the same clear way on every
rank without disturbing the host path; with one GPU per rank it checks the
collectives against numpy."""
import os

import numpy as np
from aimass._cuda_array import is_cuda_array
import pytest

import aimass
import aimass.cuda

torch = pytest.importorskip("torch")


class FakeCudaArray:
    """Looks like a CUDA array (``__cuda_array_interface__``) but points nowhere: no GPU here."""

    def __init__(self, n):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "<f4", "data": (0, False), "version": 3}


def test_library_path_prefers_env_then_wheel(monkeypatch):
    from aimass import _dist_nccl
    monkeypatch.setenv("AIMASS_NCCL_LIBRARY", "/opt/custom/libnccl.so.2")
    assert _dist_nccl.library_path() == "/opt/custom/libnccl.so.2"
    monkeypatch.delenv("AIMASS_NCCL_LIBRARY")
    p = _dist_nccl.library_path()
    try:
        import nvidia.nccl  # noqa: F401
        assert p.endswith("nvidia/nccl/lib/libnccl.so.2") and os.path.exists(p)
    except ImportError:
        assert p == "libnccl.so.2"


@pytest.mark.skipif(not aimass.cuda.built(), reason="aimass built without its CUDA module")
def test_nccl_library_loads_without_a_gpu():
    from aimass import _dist_nccl
    m = aimass.cuda._module()
    if not m.nccl_compiled():
        pytest.skip("built without the nvidia-nccl wheel's headers")
    m.nccl_load(_dist_nccl.library_path())
    assert m.nccl_loaded()
    assert m.nccl_version() >= 22700  # 2.27 or newer, as requirements.txt asks
    assert len(m.nccl_unique_id()) == 128


@pytest.mark.skipif(aimass.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_collective_without_gpu_fails_on_every_rank_then_host_path_works(dist, mpi):
    with pytest.raises((aimass.DistributedError, RuntimeError)) as ei:
        dist.allreduce(FakeCudaArray(8), op="sum", name="nccl.nogpu")
    msg = str(ei.value)
    assert "CUDA" in msg or "NCCL" in msg
    # every rank reached the same error (none is left waiting), and host tensors still reduce
    x = np.full(5, float(dist.rank() + 1), np.float32)
    np.testing.assert_array_equal(dist.allreduce(x, op="sum", name="nccl.after"),
                                  np.full(5, sum(range(1, dist.size() + 1)), np.float32))


def test_fake_cuda_array_is_routed_to_nccl(dist):
    assert is_cuda_array(FakeCudaArray(3))
    assert not is_cuda_array(np.zeros(3))
    assert not is_cuda_array(torch.zeros(3))


gpu_per_rank = pytest.mark.skipif(
    not aimass.cuda.is_available() or aimass.cuda.device_count() < int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")),
    reason="needs one CUDA device per rank")


def _dev(dist):
    d = torch.device("cuda", dist.local_rank() % torch.cuda.device_count())
    torch.cuda.set_device(d)
    return d


@gpu_per_rank
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32,
                                   torch.int64])
@pytest.mark.parametrize("op", ["sum", "average", "min", "max"])
def test_nccl_allreduce_matches_numpy(dist, dtype, op):
    dev = _dev(dist)
    rs = [np.random.default_rng(100 + r).integers(-50, 50, size=(37, 5)) for r in range(dist.size())]
    x = torch.from_numpy(rs[dist.rank()]).to(dtype).to(dev)
    got = dist.allreduce(x, op=op, name=f"nccl.ar.{dtype}.{op}")
    stack = np.stack(rs).astype(np.float64)
    ref = {"sum": stack.sum(0), "min": stack.min(0), "max": stack.max(0)}.get(op)
    if op == "average":
        ref = stack.sum(0) / dist.size()
        if not dtype.is_floating_point:
            ref = np.trunc(ref)
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6
    np.testing.assert_allclose(got.double().cpu().numpy(), ref, rtol=tol, atol=tol * 50)
    assert got.device == dev and got.dtype == dtype


@gpu_per_rank
def test_nccl_inplace_compression_broadcast_allgather_reduce_scatter(dist):
    dev = _dev(dist)
    n, r = dist.size(), dist.rank()
    x = torch.full((1000,), float(r + 1), device=dev)
    assert dist.allreduce_(x, op="sum", name="nccl.inplace") is x
    assert torch.all(x == n * (n + 1) / 2)
    y = dist.allreduce(torch.full((64,), 0.5 * (r + 1), device=dev), op="sum", compression="fp16", name="nccl.fp16")
    assert y.dtype == torch.float32 and torch.allclose(y, torch.full_like(y, 0.25 * n * (n + 1)))
    b = dist.broadcast(torch.full((3, 4), float(r), device=dev), root=n - 1, name="nccl.bcast")
    assert torch.all(b == n - 1)
    g = dist.allgather(torch.full((r + 1, 2), float(r), device=dev), name="nccl.ag")  # uneven first dims
    ref = np.concatenate([np.full((k + 1, 2), float(k)) for k in range(n)])
    np.testing.assert_array_equal(g.cpu().numpy(), ref)
    rows = 2 * n + 1
    t = torch.arange(rows * 3, dtype=torch.float32, device=dev).reshape(rows, 3) * (r + 1)
    rsout = dist.reduce_scatter(t, op="sum", name="nccl.rs")
    full = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) * (n * (n + 1) / 2)
    np.testing.assert_allclose(rsout.cpu().numpy(), np.array_split(full, n)[r])


@gpu_per_rank
def test_nccl_mismatch_raises_on_every_rank(dist):
    dev = _dev(dist)
    if dist.size() < 2:
        pytest.skip("needs two ranks")
    shape = (4,) if dist.rank() == 0 else (5,)
    with pytest.raises(aimass.DistributedError, match="do not match"):
        dist.allreduce(torch.ones(shape, device=dev), name="nccl.mismatch")


# ---- the orchestration of the NCCL path, on the host: a stand-in for aimass._cuda whose
# "device" arrays are numpy buffers and whose communicator reduces with mpi4py.

class HostArray:
    def __init__(self, a):
        self.a = np.ascontiguousarray(a, dtype=np.float32)
        self.__cuda_array_interface__ = {"shape": self.a.shape, "typestr": "<f4",
                                         "data": (self.a.ctypes.data, False), "version": 3}


def _view(ptr, count):
    import ctypes
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(ptr)) if count else np.zeros(0, np.float32)


class HostNcclComm:
    def __init__(self, uid, nranks, rank, device):
        from mpi4py import MPI
        assert len(uid) == 128
        self.mpi, self.rank, self.size, self.device, self.closed = MPI.COMM_WORLD, rank, nranks, device, False
        self.ops = {"sum": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}

    def allreduce(self, send, recv, count, dtype, op, stream):
        out = _view(recv, count)
        self.mpi.Allreduce(_view(send, count).copy(), out, op=self.ops.get(op, self.ops["sum"]))
        if op == "average":
            out /= self.size

    def broadcast(self, send, recv, count, dtype, root, stream):
        buf = _view(send, count).copy()
        self.mpi.Bcast(buf, root=root)
        _view(recv, count)[:] = buf

    def allgather(self, send, recv, counts, dtype, stream):
        self.mpi.Allgatherv(_view(send, counts[self.rank]).copy(), [_view(recv, sum(counts)), counts])

    def reduce_scatter(self, send, recv, counts, dtype, op, stream):
        full = _view(send, sum(counts)).copy()
        self.mpi.Allreduce(full.copy(), full, op=self.ops[op])
        off = sum(counts[:self.rank])
        _view(recv, counts[self.rank])[:] = full[off:off + counts[self.rank]]

    def wait(self, stream, timeout):
        pass

    def query(self, stream):
        return True


class HostCudaModule:
    NcclComm = HostNcclComm

    def nccl_load(self, path):
        pass

    def nccl_unique_id(self):
        return bytes(128)


@pytest.fixture
def host_nccl(dist, monkeypatch):
    from aimass import _dist_nccl
    _dist_nccl.shutdown()
    monkeypatch.setattr(aimass.cuda, "module", lambda: HostCudaModule())
    monkeypatch.setattr(_dist_nccl, "empty_like", lambda x, shape, dtype=None: HostArray(np.empty(shape, np.float32)))
    yield dist
    _dist_nccl.shutdown()


def test_nccl_orchestration_on_host_stand_in(host_nccl):
    dist = host_nccl
    n, r = dist.size(), dist.rank()
    x = HostArray(np.arange(10) * (r + 1))
    out = dist.allreduce(x, op="sum", name="h.ar")
    np.testing.assert_array_equal(out.a, np.arange(10) * n * (n + 1) / 2)
    assert dist.allreduce_(x, op="average", name="h.ar_") is x
    np.testing.assert_allclose(x.a, np.arange(10) * (n + 1) / 2)
    b = dist.broadcast(HostArray(np.full((2, 3), r)), root=n - 1, name="h.bc")
    np.testing.assert_array_equal(b.a, np.full((2, 3), n - 1))
    g = dist.allgather(HostArray(np.full((r + 1, 2), r)), name="h.ag")  # uneven first dimensions
    np.testing.assert_array_equal(g.a, np.concatenate([np.full((k + 1, 2), k) for k in range(n)]))
    rows = 2 * n + 1
    t = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    rs = dist.reduce_scatter(HostArray(t * (r + 1)), op="sum", name="h.rs")
    np.testing.assert_array_equal(rs.a, np.array_split(t * n * (n + 1) / 2, n)[r])


def test_nccl_signature_mismatch_raises_on_every_rank(host_nccl):
    dist = host_nccl
    if dist.size() < 2:
        pytest.skip("needs two ranks")
    shape = (4,) if dist.rank() == 0 else (5,)
    with pytest.raises(aimass.DistributedError, match=r"do not match.*rank 0: allreduce 'h.mm' shape=\[4\]"):
        dist.allreduce(HostArray(np.ones(shape)), name="h.mm")
    # the path stays usable after a mismatch that every rank saw
    out = dist.allreduce(HostArray(np.ones(3)), op="sum", name="h.ok")
    np.testing.assert_array_equal(out.a, np.full(3, dist.size()))


@gpu_per_rank
def test_nccl_with_horovod_names(dist):
    """CUDA tensors through the Horovod-style API: op constants (Product), Compression.bf16, root_rank,
    prescale/postscale, process_set only global."""
    dev = _dev(dist)
    n, r = dist.size(), dist.rank()
    p = dist.allreduce(torch.full((8,), 2.0, device=dev), op=dist.Product, name="nccl.hvd.prod")
    assert torch.all(p == 2.0 ** n)
    y = dist.allreduce(torch.full((64,), 0.5, device=dev), op=dist.Sum, compression=dist.Compression.bf16,
                       name="nccl.hvd.bf16")
    assert y.dtype == torch.float32 and torch.allclose(y, torch.full_like(y, 0.5 * n))
    s = dist.allreduce(torch.full((4,), 2.0, device=dev), op=dist.Sum, prescale_factor=0.5, postscale_factor=3.0,
                       name="nccl.hvd.scale")
    assert torch.allclose(s, torch.full_like(s, 3.0 * n))
    b = dist.broadcast(torch.full((3,), float(r), device=dev), root_rank=n - 1, name="nccl.hvd.bcast")
    assert torch.all(b == n - 1)
