"""The hierarchical shared-memory allreduce gives the same answers as MPI_Allreduce."""
import numpy as np
import pytest


@pytest.fixture
def shm_always(dist):
    if not dist.shm_available():
        pytest.skip("no shared-memory segment (single rank per node or AIMASS_SHM=0)")
    dist.set_shm_min_bytes(0)
    ll = dist._require_engine().ll_max_bytes
    dist.set_ll_max_bytes(0)  # the engine's shared-memory path, not the caller-thread channel
    yield dist
    dist.set_ll_max_bytes(ll)
    dist.set_shm_min_bytes(4 << 10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "float16"])
@pytest.mark.parametrize("op", ["sum", "average", "min", "max"])
def test_shm_path_matches_mpi_path(shm_always, dtype, op):
    d = shm_always
    r = d.rank()
    # sizes around the 64-byte slice unit and above one staging slot chunk boundary
    for count in (1, 17, 1000, 65_537):
        x = np.random.default_rng(count * 7 + r).integers(-50, 50, size=count).astype(dtype)
        before = d.stats()["shm_allreduces"]
        got = d.allreduce(x, op=op, name=f"shm.{dtype}.{op}.{count}")
        assert d.stats()["shm_allreduces"] == before + 1
        d.set_shm_min_bytes(None)
        want = d.allreduce(x, op=op, name=f"mpi.{dtype}.{op}.{count}")
        d.set_shm_min_bytes(0)
        if dtype == "float32" and op in ("sum", "average"):
            np.testing.assert_allclose(got, want, rtol=1e-6)
        else:
            np.testing.assert_array_equal(got, want)


@pytest.mark.timeout(60)
def test_shm_path_with_fused_buffers_larger_than_a_slot(shm_always):
    d = shm_always
    n, r = d.size(), d.rank()
    hs = [d.allreduce_async(np.full(1_500_000, float(i + r), np.float32), op="sum", name=f"shm.big.{i}")
          for i in range(4)]  # 24 MB fused: more than one 16 MiB slot, so it goes in chunks
    for i, h in enumerate(hs):
        np.testing.assert_array_equal(d.synchronize(h), np.full(1_500_000, n * i + n * (n - 1) / 2, np.float32))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("compression,rtol", [("fp16", 2e-3), ("bf16", 1.6e-2)])
def test_shm_path_with_compression(shm_always, compression, rtol):
    d = shm_always
    n, r = d.size(), d.rank()
    inputs = [np.random.default_rng(700 + i).uniform(0.5, 2.0, size=50_000).astype(np.float32) for i in range(n)]
    before = d.stats()["shm_allreduces"]
    out = d.allreduce(inputs[r], op="sum", name=f"shm.comp.{compression}", compression=compression)
    assert d.stats()["shm_allreduces"] == before + 1
    # every rank's value is rounded once to 16 bits, the fp32 sum once more
    np.testing.assert_allclose(out, np.stack(inputs).astype(np.float64).sum(0), rtol=2 * rtol)
