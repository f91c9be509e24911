"""The lean lane of allreduce_async / allreduce_async_ (numpy arrays, every other argument at its
default): results, identical bits on every rank, and the same errors as the general path (run under
mpirun -np 2, 3, 4)."""
import os
import sys

import numpy as np
import pytest

import aimass
from aimass.dist import collectives
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _reduce_reference import reference  # noqa: E402

# sizes around cache lines, pieces and pages, a 0-d array and an empty one
SHAPES = [(), (0,), (1,), (7,), (15, 3), (1023,), (4097,), (3, 5, 7), (65537,), (262147,)]
DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"]


def rank_input(seed, r, shape, dtype):
    rng = np.random.default_rng(seed * 1000 + r)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    # small integers: sums exact in every dtype (fp16 included), products avoided below
    return rng.integers(-3 if np.dtype(dtype).kind != "u" else 0, 4, size=shape).astype(dtype)


@pytest.fixture
def lean_only(monkeypatch):
    """Makes the general path raise: a call that passes took the lean lane."""
    def general(*a, **k):
        raise AssertionError("the general path ran")
    monkeypatch.setattr(collectives, "_allreduce_handle", general)


@pytest.mark.parametrize("op", ["sum", "average", "min", "max", None])
def test_many_mixed_tensors_match_reference_through_the_lean_lane(dist, mpi, lean_only, op):
    r, n = dist.rank(), dist.size()
    cases = [(i, s, dt) for i, (s, dt) in enumerate((s, dt) for s in SHAPES for dt in DTYPES)
             if not (dt == "bool" and op in ("average", None))]
    ins = {i: rank_input(i, r, s, dt) for i, s, dt in cases}
    handles = []
    for i, s, dt in cases:  # in place and out of place, interleaved
        x = ins[i].copy()
        if i % 2:
            handles.append((i, x, dist.allreduce_async_(x, name=f"lean.{op}.{i}", op=op)))
        else:
            handles.append((i, x, dist.allreduce_async(x, name=f"lean.{op}.{i}", op=op)))
    for i, x, h in reversed(handles):  # waited for in another order than submitted
        out = dist.synchronize(h)
        s, dt = [(s, dt) for j, s, dt in cases if j == i][0]
        assert out.shape == s and out.dtype == np.dtype(dt)
        if i % 2:
            assert out is x
        else:
            np.testing.assert_array_equal(x, ins[i])  # the input is left alone
        ref = reference([rank_input(i, k, s, dt) for k in range(n)], op or "average", dt)
        if np.dtype(dt).kind == "f":
            np.testing.assert_allclose(out.astype(np.float64), ref, rtol=1e-3 if dt == "float16" else 1e-6)
        else:
            np.testing.assert_array_equal(out, ref)
        # identical bits on every rank
        digests = mpi.allgather(out.tobytes())
        assert all(d == digests[0] for d in digests)


def test_results_equal_the_general_path_bit_for_bit(dist, mpi):
    r = dist.rank()
    rng = np.random.default_rng(100 + r)
    xs = [rng.standard_normal(k).astype(np.float32) for k in (5, 4099, 70001, 1 << 20)]
    lean = [dist.synchronize(dist.allreduce_async(x, name=f"bits.lean.{i}")) for i, x in enumerate(xs)]
    full = [dist.synchronize(dist.allreduce_async(x, name=f"bits.full.{i}", process_set=None))
            for i, x in enumerate(xs)]
    for a, b in zip(lean, full):
        assert a.tobytes() == b.tobytes()


@pytest.fixture
def general_path_calls(monkeypatch):
    """A list that grows by one for every call the general (non-lean) allreduce path takes."""
    seen = []
    general = collectives._allreduce_handle

    def spy(*a, **k):
        seen.append(1)
        return general(*a, **k)
    monkeypatch.setattr(collectives, "_allreduce_handle", spy)
    return seen


def test_calls_the_lean_lane_declines_take_the_general_path(dist, general_path_calls):
    seen = general_path_calls
    x = np.ones(6, np.float32)
    n = dist.size()
    # unnamed, scaled, a timeout, compression, a strided view: the general path
    outs = [
        dist.synchronize(dist.allreduce_async(x, op="sum")),
        dist.synchronize(dist.allreduce_async(x, name="decl.scale", op="sum", prescale_factor=2.0)),
        dist.synchronize(dist.allreduce_async(x, name="decl.timeout", op="sum", timeout=30)),
        dist.synchronize(dist.allreduce_async(x, name="decl.fp16", op="sum", compression="fp16")),
        dist.synchronize(dist.allreduce_async(np.ones(12, np.float32)[::2], name="decl.strided", op="sum")),
    ]
    assert len(seen) == 5
    np.testing.assert_array_equal(outs[0], [n] * 6)
    np.testing.assert_array_equal(outs[1], [2 * n] * 6)
    np.testing.assert_array_equal(outs[2], [n] * 6)
    np.testing.assert_allclose(outs[3], [n] * 6)
    np.testing.assert_array_equal(outs[4], [n] * 6)


def test_bad_input_raises_the_general_paths_typed_errors(dist, mpi):
    x = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        dist.allreduce_async_(np.ones(16, np.float32)[::2], name="bad.strided")
    ro = np.ones(8, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        dist.allreduce_async_(ro, name="bad.readonly")
    with pytest.raises(ValueError, match="op must be"):
        dist.allreduce_async_(x, name="bad.op", op="median")
    with pytest.raises(TypeError, match="name must be"):
        dist.allreduce_async_(x, name="")
    with pytest.raises(TypeError, match="name must be"):
        dist.allreduce_async(x, name=7)
    with pytest.raises(TypeError, match="not supported"):
        dist.allreduce_async_(np.ones(4, np.complex64), name="bad.complex")
    with pytest.raises(TypeError, match="byte order"):
        dist.allreduce_async_(np.ones(4, ">f4"), name="bad.endian")
    with pytest.raises(TypeError, match="average of bool"):
        dist.allreduce_async_(np.ones(4, bool), name="bad.boolavg")
    # A second submission of a name still in flight raises. Each rank in turn submits first and
    # tries the duplicate while its peers wait at a barrier, so the name is surely still in flight
    # (submitted at once by every rank, it may complete before a descheduled rank's second call).
    hs = []
    for r in range(dist.size()):
        if dist.rank() == r:
            hs.append(dist.allreduce_async_(np.ones(8, np.float32), name=f"bad.twice.{r}", op="sum"))
            with pytest.raises(ValueError, match="already in flight"):
                dist.allreduce_async_(np.ones(8, np.float32), name=f"bad.twice.{r}", op="sum")
        mpi.Barrier()
        if dist.rank() != r:
            hs.append(dist.allreduce_async_(np.ones(8, np.float32), name=f"bad.twice.{r}", op="sum"))
    for h in hs:
        np.testing.assert_array_equal(dist.synchronize(h), [dist.size()] * 8)


@pytest.mark.timeout(60)
def test_mismatch_through_the_lean_lane_raises_on_every_rank(dist, lean_only):
    r = dist.rank()
    h = dist.allreduce_async_(np.ones(3 + r, np.float32), name="lean.mm.shape", op="sum")
    with pytest.raises(aimass.DistributedError, match="different arguments"):
        dist.synchronize(h)
    h = dist.allreduce_async_(np.ones(3, np.float32), name="lean.mm.op", op="sum" if r == 0 else "max")
    with pytest.raises(aimass.DistributedError, match="op="):
        dist.synchronize(h)
    # the engine keeps working afterwards
    x = np.ones(5, np.float32)
    np.testing.assert_array_equal(dist.synchronize(dist.allreduce_async_(x, name="lean.after", op="sum")),
                                  [dist.size()] * 5)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int64", "int8", "bool"])
def test_torch_cpu_tensors_take_the_lean_lane(dist, mpi, lean_only, dtype):
    torch = pytest.importorskip("torch")
    r, n = dist.rank(), dist.size()
    op = "max" if dtype == "bool" else "sum"
    shapes = [(), (5,), (33, 7), (4099,)]
    ins = [rank_input(50 + i, r, s, dtype) for i, s in enumerate(shapes)]
    ts = [torch.from_numpy(x.copy()) for x in ins]
    grads = [torch.from_numpy(x.copy()).requires_grad_(True) if dtype.startswith("float") else None for x in ins]
    hs = [dist.allreduce_async_(t, name=f"lean.torch.{dtype}.{i}", op=op, compression=dist.Compression.none)
          for i, t in enumerate(ts)]
    ts2 = [torch.from_numpy(x.copy()) for x in ins]  # (not ts: those are being reduced in place)
    hs2 = [dist.allreduce_async(t, name=f"lean.torch2.{dtype}.{i}", op=op) for i, t in enumerate(ts2)]
    for i, s in enumerate(shapes):
        ref = reference([rank_input(50 + i, k, s, dtype) for k in range(n)], op, dtype)
        got = dist.synchronize(hs[i])
        assert got is ts[i]
        got2 = dist.synchronize(hs2[i])
        assert isinstance(got2, torch.Tensor) and got2.dtype == ts[i].dtype and tuple(got2.shape) == s
        np.testing.assert_array_equal(ts2[i].numpy(), ins[i])  # the input is left alone
        np.testing.assert_array_equal(got.numpy(), ref)
        np.testing.assert_array_equal(got2.numpy(), ref)
        assert all(b == mpi.allgather(got.numpy().tobytes())[0] for b in mpi.allgather(got.numpy().tobytes()))
        if grads[i] is not None:  # a leaf that requires grad: allreduced through a detached view
            out = dist.synchronize(dist.allreduce_async_(grads[i], name=f"lean.leaf.{dtype}.{i}", op=op))
            np.testing.assert_array_equal(out.detach().numpy(), ref)


def test_torch_tensors_the_lean_lane_declines(dist, general_path_calls):
    torch = pytest.importorskip("torch")
    seen = general_path_calls
    n = dist.size()
    bf = torch.ones(6, dtype=torch.bfloat16)  # taken (its bits as uint16, labelled bfloat16), not declined
    got = dist.synchronize(dist.allreduce_async_(bf, name="decl.torch.bf16", op="sum"))
    assert got.dtype == torch.bfloat16 and got.float().tolist() == [float(n)] * 6
    assert len(seen) == 0
    with pytest.raises(ValueError, match="C-contiguous"):
        dist.allreduce_async_(torch.ones(4, 6).t(), name="decl.torch.t", op="sum")
    got = dist.synchronize(dist.allreduce_async_(torch.ones(6), name="decl.torch.fp16", op="sum",
                                                 compression=dist.Compression.fp16))
    np.testing.assert_allclose(got.numpy(), [n] * 6)
    assert len(seen) == 2
