"""Mismatches and stalls raise aimass.DistributedError on every rank instead of hanging."""
import os
import sys
import time

import numpy as np
import pytest
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _engine_env import engine_env  # noqa: E402

import aimass


@pytest.mark.timeout(30)
def test_shape_mismatch_raises_on_every_rank_with_what_each_submitted(dist):
    r = dist.rank()
    with pytest.raises(aimass.DistributedError) as ei:
        dist.allreduce(np.ones(3 + r, np.float32), name="mm.shape", timeout=5)
    msg = str(ei.value)
    assert "mm.shape" in msg and "different arguments" in msg
    assert "rank 0: allreduce(dtype=float32, shape=[3]" in msg
    assert "rank 1: allreduce(dtype=float32, shape=[4]" in msg


@pytest.mark.timeout(30)
def test_dtype_and_op_mismatch(dist):
    r = dist.rank()
    with pytest.raises(aimass.DistributedError, match="float64"):
        dist.allreduce(np.ones(3, np.float32 if r == 0 else np.float64), name="mm.dtype", timeout=5)
    with pytest.raises(aimass.DistributedError, match="op=max"):
        dist.allreduce(np.ones(3, np.float32), op="sum" if r == 0 else "max", name="mm.op", timeout=5)
    # the engine keeps working afterwards
    np.testing.assert_array_equal(dist.allreduce(np.ones(2, np.float32), op="sum", name="after.mm"),
                                  [dist.size()] * 2)


@pytest.mark.timeout(30)
def test_name_skipped_by_a_rank_times_out_everywhere(dist):
    r = dist.rank()
    t0 = time.monotonic()
    with pytest.raises(aimass.DistributedError) as ei:
        if r == 0:
            dist.allreduce(np.ones(3, np.float32), name="skipped", timeout=1.0)
        else:
            # this rank submits something else; the skipped name is reported to it when it asks later
            with pytest.raises(aimass.DistributedError, match="only.others"):
                # (a longer timeout than rank 0's, so 'skipped' has failed before this returns)
                dist.allreduce(np.ones(3, np.float32), name="only.others", timeout=2.0)
            dist.allreduce(np.ones(3, np.float32), name="skipped", timeout=1.0)
    msg = str(ei.value)
    assert "timed out" in msg and "rank 0: allreduce" in msg
    assert all(f"rank {i}: did not submit it" in msg for i in range(1, dist.size()))
    assert time.monotonic() - t0 < 10
    dist.barrier()


@pytest.mark.timeout(30)
def test_unnamed_allreduce_against_unnamed_broadcast_fails_fast_naming_both(dist):
    dist.barrier(name="unnamed.sync")
    dist._core.global_process_set._counters.clear()  # every rank starts its unnamed calls from the same count
    t0 = time.monotonic()
    with pytest.raises(aimass.DistributedError) as ei:
        if dist.rank() == 0:
            dist.allreduce(np.ones(3, np.float32), timeout=20)
        else:
            dist.broadcast(np.ones(3, np.float32), root=0, timeout=20)
    msg = str(ei.value)
    assert "different arguments" in msg and "did not submit" not in msg
    assert "rank 0: allreduce(dtype=float32, shape=[3]" in msg
    assert all(f"rank {i}: broadcast(dtype=float32, shape=[3], root=0)" in msg for i in range(1, dist.size()))
    assert time.monotonic() - t0 < 10  # seen at once, not after the 20 s timeout
    np.testing.assert_array_equal(dist.allreduce(np.ones(2, np.float32), op="sum"), [dist.size()] * 2)


@pytest.mark.timeout(30)
def test_name_already_in_flight_is_rejected(dist):
    # Rank 0 submits "dup" before any other rank does, so the collective cannot finish (and
    # free its name) before the second submission: the other ranks join only after the barrier.
    if dist.rank() == 0:
        h = dist.allreduce_async(np.ones(2, np.float32), name="dup", op="sum")
        with pytest.raises(ValueError, match="already in flight"):
            dist.allreduce_async(np.ones(2, np.float32), name="dup")
        dist.barrier(name="dup.checked")
    else:
        dist.barrier(name="dup.checked")
        h = dist.allreduce_async(np.ones(2, np.float32), name="dup", op="sum")
    np.testing.assert_array_equal(dist.synchronize(h), [dist.size()] * 2)


@pytest.mark.timeout(30)
def test_bad_arguments_raise_typed_errors(dist):
    x = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="op must be"):
        dist.allreduce(x, op="median")
    with pytest.raises(ValueError, match="compression"):
        dist.allreduce(x, compression="int8")
    with pytest.raises(TypeError, match="applies to float32"):
        dist.allreduce(np.ones(3, np.int32), compression="fp16")
    with pytest.raises(TypeError, match="not supported"):
        dist.allreduce(np.ones(3, np.complex64))
    with pytest.raises(TypeError, match="average of bool"):
        dist.allreduce(np.ones(3, np.bool_))
    with pytest.raises(ValueError, match="root"):
        dist.broadcast(x, root=dist.size())
    with pytest.raises(ValueError, match="timeout"):
        dist.allreduce(x, timeout=-1)
    with pytest.raises(ValueError, match="C-contiguous"):
        dist.allreduce_(np.ones((4, 4), np.float32)[:, ::2])
    with pytest.raises(ValueError, match="at least one dimension"):
        dist.reduce_scatter(np.float32(1.0))
    with pytest.raises(TypeError, match="synchronize"):
        dist.synchronize(42)


@pytest.mark.timeout(60)
def test_timeout_from_environment_and_reinit(dist):
    with engine_env(dist, AIMASS_COMM_TIMEOUT="0.7"):
        assert dist._core.global_process_set._engine.timeout == pytest.approx(0.7)
        if dist.rank() == 0:
            t0 = time.monotonic()
            with pytest.raises(aimass.DistributedError, match="timed out after 0.7"):
                dist.allreduce(np.ones(1, np.float32), name="env.timeout")
            assert time.monotonic() - t0 < 5
        dist.barrier(timeout=10)
    assert dist._core.global_process_set._engine.timeout == pytest.approx(60.0)


@pytest.mark.timeout(30)
def test_pending_collective_fails_with_closed_error_on_shutdown(dist):
    h = dist.allreduce_async(np.ones(1, np.float32), name=f"never.{dist.rank()}", timeout=30)
    dist.shutdown()
    with pytest.raises(aimass.ClosedError):
        dist.synchronize(h)
    with pytest.raises(RuntimeError, match="not initialised"):
        dist.allreduce(np.ones(1, np.float32))
    dist.init()
    np.testing.assert_array_equal(dist.allreduce(np.ones(1, np.float32), op="sum", name="after.reinit"),
                                  [dist.size()])


@pytest.mark.timeout(60)
@pytest.mark.nprocs(2)
def test_survivor_raises_when_a_peer_stops_answering(dist, mpi):
    """Rank 1's engine goes away (as if the process died); rank 0's pending collective fails
    within the engine timeout instead of hanging."""
    from aimass import _C
    sub = mpi.Dup()
    comm = _C.Communicator(sub.handle)
    engine_timeout = 3.0
    eng = _C.CollectiveEngine(comm, None, None, engine_timeout)
    if dist.rank() == 1:
        assert eng.shutdown() is False  # rank 0 never agrees to stop: gives up after the timeout
    else:
        h = eng.submit("allreduce", np.ones(2, np.float32), np.empty(2, np.float32), "orphan", "float32",
                       "sum", "", 0, 30.0)
        t0 = time.monotonic()
        with pytest.raises(aimass.DistributedError, match="peer rank has died or stopped"):
            h.wait()
        assert time.monotonic() - t0 < 10
        with pytest.raises(aimass.DistributedError, match="cannot run collectives any more"):
            eng.submit("allreduce", np.ones(2, np.float32), np.empty(2, np.float32), "x", "float32", "sum", "", 0, 0)
        assert eng.broken
        t0 = time.monotonic()
        assert eng.shutdown() is False  # a failed engine stops at once: no second timeout
        assert time.monotonic() - t0 < engine_timeout / 2  # a behaviour bound (no second wait), not a speed goal
        comm.abandon()  # what dist.shutdown() does then: no MPI teardown on a communicator with a dead peer
    dist.barrier(timeout=20)  # the main engine is unaffected
