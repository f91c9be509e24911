"""Two simulated nodes: 4 ranks as 2 nodes x 2 ranks (``AIMASS_RANKS_PER_NODE=2``), aimass's
hierarchical allreduce (shared-memory reduce inside each node, one rank per node and slice
allreduces across nodes over MPI, shared-memory copy-out, docs/comm.md) against a flat
``MPI_Allreduce`` over all 4 ranks (mpi4py, same Open MPI, same run), from 256 KiB (the goal: from 1 MiB up);
and ResNet-50's training step (161 gradients fused, and as bucket views) against per-tensor flat MPI.

On one machine the "network" between the simulated nodes is Open MPI's own shared-memory
transport, so this measures the structure (fewer bytes through MPI, node-local reduction),
not a real network. Part of ``aimass bench comm`` (started with ``mpirun -np 4`` after the
2-rank part); on its own: ``AIMASS_RANKS_PER_NODE=2 mpirun -np 4 python -m aimass.bench.comm_hier --out part.json``."""
from __future__ import annotations

import sys
from typing import Dict, List, Optional

import numpy as np

from ._report import Report

SUITE = "comm"
NP = 4
RANKS_PER_NODE = 2


GOAL_FROM = 1 << 20  # the goal (at least flat MPI) holds from 1 MiB up; 256 KiB shows where the curve starts


def sizes(quick: bool) -> List[int]:
    return [256 << 10, 1 << 20, 4 << 20, 16 << 20] if quick else [256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def run_worker(quick: bool) -> Optional[Dict[str, object]]:
    """Every rank calls this under mpirun -np 4 with AIMASS_RANKS_PER_NODE=2; rank 0 returns its report part."""
    from mpi4py import MPI
    import aimass.dist as d
    from .comm import _Timer
    comm = MPI.COMM_WORLD
    n = comm.Get_size()
    if not d.is_initialized():
        d.init()
    nodes = d.cross_size()
    if d.local_size() != RANKS_PER_NODE or nodes < 2:
        raise RuntimeError(f"the hierarchical bench needs {NP} ranks as 2 nodes x {RANKS_PER_NODE} "
                           f"(AIMASS_RANKS_PER_NODE={RANKS_PER_NODE}); got {n} ranks, local_size {d.local_size()}")
    report = Report(quick=quick)
    timer = _Timer(comm, quick)
    fac = 2 * (n - 1) / n
    xs, ours, flat = [], [], []
    for nbytes in sizes(quick):
        x = np.ones(nbytes // 4, np.float32)
        y = np.ones(nbytes // 4, np.float32)
        ma, mb = timer.pair(lambda: d.allreduce_(x, op="sum", name="bench.hier"),
                            lambda: comm.Allreduce(MPI.IN_PLACE, y, op=MPI.SUM), nbytes)
        a_bw, b_bw = nbytes * fac / ma.seconds / 1e9, nbytes * fac / mb.seconds / 1e9
        xs.append(nbytes)
        ours.append(a_bw)
        flat.append(b_bw)
        report.add(SUITE, f"allreduce {nbytes} B fp32 busbw, {n} ranks as {nodes} simulated nodes x "
                   f"{RANKS_PER_NODE} (hierarchical)", a_bw, "GB/s", higher_is_better=True, spread=ma.spread,
                   stable=ma.stable, baseline=f"flat mpi4py Allreduce over {n} ranks", baseline_value=b_bw,
                   baseline_spread=mb.spread, goal=1.0 if nbytes >= GOAL_FROM else None)
    report.add_sweep(f"allreduce_hierarchical_busbw_{nodes}x{RANKS_PER_NODE}", xs,
                     {"aimass hierarchical": ours, "flat mpi4py Allreduce": flat}, xlabel="bytes",
                     ylabel="busbw GB/s (higher is better)", logx=True)
    _training_step(d, comm, MPI, timer, report, n, nodes)
    d.shutdown()
    return report.to_dict() if comm.Get_rank() == 0 else None


def _training_step(d, comm, MPI, timer, report: Report, n: int, nodes: int) -> None:
    """ResNet-50's 161 gradients across the simulated nodes: fused by the engine (async, 64 MiB fusion
    threshold) and, with torch, as 25 MiB bucket views, against 161 per-tensor flat MPI_Allreduce calls."""
    from .comm import resnet50_grad_shapes, resnet50_steps
    total, fused, per_tensor = resnet50_steps(d, comm, MPI, "bench.hier.fusion")
    d.set_fusion_threshold(64 << 20)
    steps = [("fused", fused)]
    try:
        import torch
        params = [torch.nn.Parameter(torch.ones(s)) for s in resnet50_grad_shapes()]
        b = d.GradientBuckets(params, bucket_bytes=25 << 20, name="bench.hier.bucket")
        steps.append((f"as {len(b)} bucket views of <= 25 MiB", lambda: b.allreduce(op="sum")))
    except ImportError:
        pass
    for label, fn in steps:
        m, m_plain = timer.pair(fn, per_tensor, total)
        report.add(SUITE, f"ResNet-50 161 gradients ({total / 2**20:.1f} MiB) {label}, {n} ranks as {nodes} "
                   f"simulated nodes x {RANKS_PER_NODE}", m.seconds, "s", higher_is_better=False, spread=m.spread,
                   baseline="161 x flat MPI_Allreduce", baseline_value=m_plain.seconds,
                   baseline_spread=m_plain.spread, goal=1.0, goal_text="<= 1x per-tensor flat MPI")


def run(report: Report, quick: bool = False) -> None:
    """From a plain process: start the 4-rank worker under mpirun and fold its figures into `report`."""
    from .comm import launch_part
    sub = Report.from_dict(launch_part("aimass.bench.comm_hier", NP, ["--quick"] if quick else [],
                                       env={"AIMASS_RANKS_PER_NODE": str(RANKS_PER_NODE)},
                                       timeout=600 if quick else 1800))
    report.figures.extend(sub.figures)
    report.sweeps.update(sub.sweeps)


def main(argv=None) -> int:
    from .comm import part_main
    return part_main(__doc__, run_worker, argv)


if __name__ == "__main__":
    sys.exit(main())
