"""aimass bench comm's timing under mpirun: aimass's call and its mpi4py baseline in alternating windows
(bench/_measure.py measure_pair), the slowest rank's window on every rank, and the small-message curves
built from it (aimass.bench.comm_small), quick mode."""
import itertools

import numpy as np
import pytest
from mpi4py import MPI


@pytest.mark.timeout(120)
def test_pair_alternates_and_every_rank_gets_the_slowest_window(dist):
    from aimass.bench.comm import _Timer
    comm = MPI.COMM_WORLD
    x = np.ones(2, np.float32)
    y = np.ones(2, np.float32)
    order = []

    def fa():
        order.append("a")
        dist.allreduce_(x, op="sum", name="test.bench.pair")

    def fb():
        order.append("b")
        comm.Allreduce(MPI.IN_PLACE, y, op=MPI.SUM)
    a, b = _Timer(comm, quick=True).pair(fa, fb, 8)
    assert a.windows == b.windows >= 3 and a.calls == b.calls
    assert a.seconds > 0 and b.seconds > 0
    # every rank reports the same (slowest) window values, so every rank stops after the same window
    got = comm.allgather((a.window_values, b.window_values))
    assert all(g == got[0] for g in got)
    # warm-up of each, then one run of a's calls and one of b's per window (each after one untimed call)
    runs = [k for k, _ in itertools.groupby(order)]
    assert runs == ["a", "b"] * (a.windows + 1)


@pytest.mark.timeout(120)
def test_small_curves_report_every_collective_against_mpi4py(dist):
    from aimass.bench._report import Report
    from aimass.bench.comm import _Timer
    from aimass.bench.comm_small import KINDS, sizes, small_curves
    comm = MPI.COMM_WORLD
    report = Report()
    res = small_curves(dist, comm, MPI, _Timer(comm, quick=True), report, quick=True)
    assert set(res) == set(KINDS)
    for kind, r in res.items():
        assert len(r["aimass"]) == len(r["mpi4py"]) == len(sizes(True))
        assert all(v > 0 for v in r["aimass"] + r["mpi4py"])
    rows = [f for f in report.figures if "small-message curve" in f.name]
    assert len(rows) == len(KINDS) * len(sizes(True))
    assert all(f.baseline_value > 0 and f.goal is not None for f in rows)
