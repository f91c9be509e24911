"""Fused allreduces on one node choose staged or single-copy by the ranks' timing vote (engine.cc
vote_bits): results over both ways, identical bits on every rank, and the vote off where a table
names allreduce (run under mpirun -np 2, 3, 4; with more ranks than CPUs the vote is off)."""
import os

import numpy as np
import pytest

DTYPES = ["float32", "float64", "int32", "float16", "int8"]
# odd sizes: whole fused batches from a few KiB to a few MiB, across the vote's size classes
SIZES = [1, 3, 17, 1023, 4097, 65537, 300007, 700001]


def rank_input(step, i, r, n, dtype):
    rng = np.random.default_rng(step * 100003 + i * 101 + r)
    if dtype == "int8":
        return rng.integers(-3, 4, size=n).astype(dtype)
    return rng.integers(-50, 51, size=n).astype(dtype)


@pytest.mark.timeout(240)
def test_fused_steps_over_both_ways_match_reference_bit_for_bit(dist, mpi):
    import aimass.dist as d
    r, world = dist.rank(), dist.size()
    eng = d._require_engine()
    old_min = eng.shm_min_bytes
    d.set_shm_min_bytes(0)
    before = dict(eng.stats())
    try:
        steps = 70  # past two exploration runs (every 32nd voted run takes the other way)
        for step in range(steps):
            tensors = [(i, SIZES[(i + step) % len(SIZES)], DTYPES[i % len(DTYPES)]) for i in range(12)]
            xs = [rank_input(step, i, r, n, dt) for i, n, dt in tensors]
            hs = [d.allreduce_async_(x, name=f"vote.{i}", op="sum") for (i, _, _), x in zip(tensors, xs)]
            for h in hs:
                d.synchronize(h)
            for (i, n, dt), x in zip(tensors, xs):
                ref = sum(rank_input(step, i, k, n, dt).astype(np.float64) for k in range(world))
                np.testing.assert_array_equal(x.astype(np.float64), ref)
            if step % 10 == 0:
                blob = b"".join(x.tobytes() for x in xs)
                assert all(b == blob for b in mpi.allgather(blob))
    finally:
        d.set_shm_min_bytes(old_min)
    after = dict(eng.stats())
    voted = after["shm_voted"] - before["shm_voted"]
    staged = after["shm_voted_staged"] - before["shm_voted_staged"]
    crowded = world > (os.cpu_count() or 1)
    table_names_allreduce = "allreduce" in os.environ.get("AIMASS_COMM_ALGOS", "")
    if crowded or table_names_allreduce or not d.shm_available():
        assert voted == 0
    else:
        # every fused batch voted, and both ways ran (the first untimed runs and the explorations)
        assert voted >= steps
        assert 0 < staged < voted
    # the same counts on every rank: every rank ran the same way each time
    assert all(v == (voted, staged) for v in mpi.allgather((voted, staged)))


@pytest.mark.timeout(60)
def test_mismatch_during_voted_fused_steps_raises(dist):
    import aimass
    import aimass.dist as d
    r = dist.rank()
    eng = d._require_engine()
    old_min = eng.shm_min_bytes
    d.set_shm_min_bytes(0)
    try:
        good = np.ones(4097, np.float32)
        bad = np.ones(300007 + r, np.float32)
        hg = d.allreduce_async_(good, name="vote.mm.good", op="sum")
        hb = d.allreduce_async_(bad, name="vote.mm.bad", op="sum")
        np.testing.assert_array_equal(d.synchronize(hg), [dist.size()] * 4097)
        with pytest.raises(aimass.DistributedError, match="different arguments"):
            d.synchronize(hb)
    finally:
        d.set_shm_min_bytes(old_min)
