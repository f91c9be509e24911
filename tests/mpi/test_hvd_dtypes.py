"""int8/uint8/int16/bool tensors and the product op in every collective, on the MPI path and the
shared-memory path, against a numpy reference of what every rank contributed."""
import numpy as np
import pytest

SMALL = ("int8", "uint8", "int16", "bool")


def contribution(dtype, rank, n=37):
    rng = np.random.default_rng(100 + rank)
    if dtype == "bool":
        return rng.random(n) < 0.5
    lo, hi = (0, 4) if dtype == "uint8" else (-3, 4)
    return rng.integers(lo, hi, n).astype(dtype)


def reference(dtype, op, size):
    xs = [contribution(dtype, r) for r in range(size)]
    if dtype == "bool":
        stack = np.stack(xs)
        return stack.any(0) if op in ("sum", "max") else stack.all(0)
    wide = np.stack([x.astype(np.int64) for x in xs])
    if op == "sum":
        return wide.sum(0).astype(dtype)  # wraps like the engine
    if op == "average":
        s = wide.sum(0)
        return (np.sign(s) * (np.abs(s) // size)).astype(dtype)  # truncates toward zero
    if op == "min":
        return wide.min(0).astype(dtype)
    if op == "max":
        return wide.max(0).astype(dtype)
    return np.prod(wide, axis=0).astype(dtype)


@pytest.mark.parametrize("path", ["mpi", "shm", "ll"])
@pytest.mark.parametrize("dtype", SMALL)
@pytest.mark.parametrize("op", ["sum", "average", "min", "max", "product"])
def test_allreduce_small_types(dist, dtype, op, path):
    if dtype == "bool" and op == "average":
        pytest.skip("average of bool is rejected (tested below)")
    ll = dist._require_engine().ll_max_bytes
    dist.set_shm_min_bytes(0 if path == "shm" else None)
    if path != "ll":  # "ll": the caller-thread low-latency channel (when the job is on one node)
        dist.set_ll_max_bytes(0)
    try:
        got = dist.allreduce(contribution(dtype, dist.rank()), op=op, name=f"small.{path}.{dtype}.{op}")
    finally:
        dist.set_shm_min_bytes(4096)
        dist.set_ll_max_bytes(ll)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, reference(dtype, op, dist.size()))


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "float16"])
def test_product_of_wider_types(dist, dtype):
    x = np.full(9, 1.5 if "float" in dtype else 2, dtype=dtype) * (1 + (np.arange(9) % 2)).astype(dtype)
    got = dist.allreduce(x, op="product", name=f"prod.{dtype}")
    np.testing.assert_allclose(got.astype(np.float64), x.astype(np.float64) ** dist.size(), rtol=1e-3)


def test_bool_average_is_a_typed_error(dist):
    with pytest.raises(TypeError, match="average of bool"):
        dist.allreduce(np.ones(3, np.bool_), name="bool.avg")


@pytest.mark.parametrize("dtype", SMALL)
def test_broadcast_allgather_reducescatter_alltoall_small_types(dist, dtype):
    torch = pytest.importorskip("torch")
    n, r = dist.size(), dist.rank()
    mine = contribution(dtype, r, n * 3)
    t = torch.from_numpy(mine.copy())
    b = dist.broadcast(t, root_rank=n - 1, name=f"sb.{dtype}")
    assert b.dtype == t.dtype
    np.testing.assert_array_equal(b.numpy(), contribution(dtype, n - 1, n * 3))
    g = dist.allgather(t, name=f"sg.{dtype}")
    np.testing.assert_array_equal(g.numpy(), np.concatenate([contribution(dtype, k, n * 3) for k in range(n)]))
    op = "max" if dtype == "bool" else "sum"
    rs = dist.reducescatter(t, op=op, name=f"srs.{dtype}")
    full = np.stack([contribution(dtype, k, n * 3) for k in range(n)])
    want = full.any(0) if dtype == "bool" else full.astype(np.int64).sum(0).astype(dtype)
    np.testing.assert_array_equal(rs.numpy(), want[3 * r:3 * r + 3])
    a2a = dist.alltoall(t, name=f"sa.{dtype}")
    np.testing.assert_array_equal(a2a.numpy(), np.concatenate([contribution(dtype, k, n * 3)[3 * r:3 * r + 3]
                                                               for k in range(n)]))


def test_horovod_bytetensor_recipe(dist):
    """Horovod scripts share flags as ByteTensors: 'does any rank want to stop?'"""
    torch = pytest.importorskip("torch")
    want_stop = torch.ByteTensor([1 if dist.rank() == dist.size() - 1 else 0])
    assert dist.allreduce(want_stop, op=dist.Sum, name="stop.flag").item() == 1
    assert dist.allreduce(torch.tensor([dist.rank() == 0]), op=dist.Max, name="any.flag").item() is True
    assert dist.allreduce(torch.tensor([dist.rank() == 0]), op=dist.Min, name="all.flag").item() is (dist.size() == 1)
