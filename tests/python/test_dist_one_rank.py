"""aimass.dist with one rank (a training script run without mpirun, or hvd.size() == 1): every
collective gives this rank's own data back, from the caller's thread, with the results and errors of
the multi-rank API (dist_one_rank_worker.py, in a process of its own so that MPI starts there)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("mpi4py")
pytest.importorskip("torch")

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def seen():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    r = subprocess.run([sys.executable, os.path.join(HERE, "dist_one_rank_worker.py")], capture_output=True, text=True,
                       env=env, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_one_rank_job(seen):
    assert seen["size"] == 1 and seen["rank"] == 0


@pytest.mark.parametrize("key", ["allreduce_sum", "allreduce_average", "allreduce_min", "allreduce_max",
                                 "allreduce_product", "allreduce_inplace_same_object", "int_average", "bool_sum",
                                 "torch_allreduce", "grouped", "broadcast_inplace", "broadcast_new", "alltoall",
                                 "allgather_torch", "allgather_async"])
def test_results_are_the_ranks_own_data(seen, key):
    assert seen[key] is True


def test_compressed_allreduce_rounds_through_the_wire_type(seen):
    assert seen["fp16_is_rounded_like_numpy"] and seen["fp16_changed_something"]


def test_async_handles_are_done_when_submitted(seen):
    assert seen["async_poll"] and seen["async_result"] and seen["async_many"]


def test_gathers_and_scatters_keep_every_row(seen):
    assert seen["allgather"] == [[3, 5], True]
    assert seen["allgather_scalar"] == [[1], 2.5]  # a 0-d tensor gathers as one row per rank
    assert seen["reduce_scatter"] == [[3, 5], True]


def test_errors_stay_typed(seen):
    assert seen["broadcast_bad_root"] == "ValueError"
    assert seen["after_shutdown"] == "RuntimeError"


def test_distributed_optimizer_steps_as_the_wrapped_optimizer(seen):
    assert seen["optimizer_same_weights"] is True


def test_nothing_went_through_the_engine_thread(seen):
    assert seen["engine_requests"] == 0
