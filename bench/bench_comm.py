"""Collective benchmarks: a thin wrapper over aimass.bench.comm (nccl-tests' busbw, against
mpi4py on the same Open MPI, in the same run).

    mpirun -np 2 python bench/bench_comm.py [--quick]      # the table (same as `aimass bench comm`)
    mpirun -np 2 python -m pytest bench/bench_comm.py      # pytest-benchmark, fixed rounds
"""
from __future__ import annotations

import sys

import numpy as np


def _setup():
    from mpi4py import MPI
    import aimass.dist as d
    if not d.is_initialized():
        d.init()
    return MPI, MPI.COMM_WORLD, d


def test_allreduce_64mib_aimass(benchmark):
    MPI, comm, d = _setup()
    x = np.ones((64 << 20) // 4, np.float32)
    benchmark.pedantic(lambda: d.allreduce_(x, op="sum", name="pb.64m"), rounds=5, iterations=1, warmup_rounds=1)


def test_allreduce_64mib_mpi4py(benchmark):
    MPI, comm, d = _setup()
    x = np.ones((64 << 20) // 4, np.float32)
    benchmark.pedantic(lambda: comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM), rounds=5, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    from aimass.bench.cli import main
    sys.exit(main(["comm"] + sys.argv[1:]))
