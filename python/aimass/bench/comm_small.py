"""Small-message curves (8 B .. 256 KiB, powers of 4) of the four collectives, aimass's default
path (blocking calls: the caller-thread low-latency channel on one node, docs/comm.md) against
mpi4py on the same Open MPI, same run; plus the 8-byte allreduce latency.

Part of ``aimass bench comm`` (aimass.bench.comm calls small_curves under mpirun); on its own:
``mpirun -np 2 python -m aimass.bench.comm_small`` prints the table."""
from __future__ import annotations

import sys
from typing import Dict, List

import numpy as np

SUITE = "comm"
KINDS = ("allreduce", "broadcast", "allgather", "reduce_scatter")


def sizes(quick: bool) -> List[int]:
    return [8, 128, 2 << 10, 32 << 10, 256 << 10] if quick else [8 << (2 * k) for k in range(8)] + [256 << 10]


def _calls(kind: str, d, comm, MPI, nbytes: int):
    """(aimass call, mpi4py call, busbw factor, bytes moved per rank) on float32 data."""
    n = comm.Get_size()
    if kind == "allreduce":
        x, y = np.ones(max(1, nbytes // 4), np.float32), np.ones(max(1, nbytes // 4), np.float32)
        return (lambda: d.allreduce_(x, op="sum", name="bench.small.ar"),
                lambda: comm.Allreduce(MPI.IN_PLACE, y, op=MPI.SUM), 2 * (n - 1) / n, x.nbytes)
    if kind == "broadcast":
        x, y = np.ones(max(1, nbytes // 4), np.float32), np.ones(max(1, nbytes // 4), np.float32)
        return lambda: d.broadcast_(x, 0, name="bench.small.bc"), lambda: comm.Bcast(y, root=0), 1.0, x.nbytes
    count = max(n, (nbytes // 4) // n * n)  # the gathered / scattered total
    if kind == "allgather":
        part, out = np.ones(count // n, np.float32), np.empty(count, np.float32)
        return (lambda: d.allgather(part, name="bench.small.ag"), lambda: comm.Allgather(part, out),
                (n - 1) / n, count * 4)
    x, out = np.ones(count, np.float32), np.empty(count // n, np.float32)
    return (lambda: d.reduce_scatter(x, op="sum", name="bench.small.rs"),
            lambda: comm.Reduce_scatter_block(x, out, op=MPI.SUM), (n - 1) / n, count * 4)


def small_curves(d, comm, MPI, timer, report, quick: bool) -> Dict[str, Dict[str, List[float]]]:
    """Runs on every rank (timer: aimass.bench.comm._Timer); records the figures and sweeps in `report`.
    Returns {kind: {"bytes": [...], "aimass": [busbw], "mpi4py": [busbw], "aimass_s": [...], "mpi4py_s": [...]}}."""
    n = comm.Get_size()
    out: Dict[str, Dict[str, List[float]]] = {}
    for kind in KINDS:
        res: Dict[str, List[float]] = {"bytes": [], "aimass": [], "mpi4py": [], "aimass_s": [], "mpi4py_s": []}
        for nbytes in sizes(quick):
            fa, fb, fac, moved = _calls(kind, d, comm, MPI, nbytes)
            ma, mb = timer.pair(fa, fb, moved)
            a_bw, b_bw = moved * fac / ma.seconds / 1e9, moved * fac / mb.seconds / 1e9
            for k, v in (("bytes", moved), ("aimass", a_bw), ("mpi4py", b_bw), ("aimass_s", ma.seconds),
                         ("mpi4py_s", mb.seconds)):
                res[k].append(v)
            report.add(SUITE, f"{kind} {moved} B fp32 busbw (small-message curve), {n} ranks", a_bw, "GB/s",
                       higher_is_better=True, spread=ma.spread, stable=ma.stable, baseline=f"mpi4py {kind}",
                       baseline_value=b_bw, baseline_spread=mb.spread, goal=1.0)
        report.add_sweep(f"{kind}_small_busbw_{n}ranks", res["bytes"], {"aimass": res["aimass"],
                                                                         "mpi4py": res["mpi4py"]},
                         xlabel="bytes", ylabel="busbw GB/s (higher is better)", logx=True, logy=True)
        out[kind] = res
    return out


def main() -> int:
    from mpi4py import MPI
    import aimass.dist as d
    from ._report import Report
    from .comm import _Timer
    comm = MPI.COMM_WORLD
    d.init()
    quick = "--quick" in sys.argv
    report = Report()
    res = small_curves(d, comm, MPI, _Timer(comm, quick), report, quick)
    st = d.stats()
    d.shutdown()
    if comm.Get_rank() == 0:
        print(f"{comm.Get_size()} ranks; latency in us, busbw ratio aimass/mpi4py "
              f"(ll_collectives {st['ll_collectives']}, ll_fallbacks {st['ll_fallbacks']})")
        for kind, r in res.items():
            print(kind)
            for b, ta, tb in zip(r["bytes"], r["aimass_s"], r["mpi4py_s"]):
                print(f"  {b:>8} B  aimass {ta * 1e6:9.2f}  mpi4py {tb * 1e6:9.2f}  ratio {tb / ta:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
