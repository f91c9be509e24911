"""Compression suite: quantize throughput and the fused quantized linear vs torch.

Baselines in the same process: ``torch.quantize_per_channel`` end to end (scales included),
torch fp32 ``nn.Linear`` and torch's dynamic int8 linear (FBGEMM). Roofs: quantize as a
fraction of memory copy bandwidth (it reads fp32 and writes int8), the batch-1 linear as a
fraction of the time to read its weights once."""
from __future__ import annotations

import warnings
from typing import Dict

import numpy as np

from ._measure import measure, race
from ._report import Report

SUITE = "compress"


def _threads(n: int) -> None:
    import aimass
    import torch
    aimass.set_num_threads(n)
    torch.set_num_threads(n)


def bench_quantize(report: Report, n: int, quick: bool) -> None:
    import torch
    from ..compress import quantize
    w = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    wt = torch.from_numpy(w)

    def torch_e2e():
        scales = (wt.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        return torch.quantize_per_channel(wt, scales, torch.zeros(n, dtype=torch.int64), axis=0, dtype=torch.qint8)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = race({"aimass": lambda: quantize(w, bits=8, granularity="channel"), "torch": torch_e2e},
                 rounds=3 if quick else 5, block=2 if quick else 3, warmup=1)
    bytes_moved = w.nbytes + w.size  # read fp32, write int8
    roof = report.machine.get("copy_GBps_all_threads") or report.machine.get("copy_GBps_1_thread")
    report.add(SUITE, f"quantize {n}x{n} fp32 per-channel int8", r["aimass"].seconds, "s", higher_is_better=False,
               spread=r["aimass"].spread, stable=r["aimass"].stable, baseline="torch.quantize_per_channel e2e",
               baseline_value=r["torch"].seconds, baseline_spread=r["torch"].spread,
               roof="copy bandwidth" if roof else None, roof_value=bytes_moved / (roof * 1e9) if roof else None,
               goal=20.0)


def bench_linear(report: Report, n: int, quick: bool) -> None:
    """Quantized linear vs batch size and threads."""
    import os
    import torch
    from ..compress import quantize_model
    torch.manual_seed(0)
    fp32 = torch.nn.Linear(n, n).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tdyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(n, n)),
                                                      {torch.nn.Linear}, dtype=torch.qint8).eval()
    q8 = quantize_model(torch.nn.Linear(n, n), bits=8)
    q4 = quantize_model(torch.nn.Linear(n, n), bits=4, group_size=128)
    batches = (1, 16, 256) if quick else (1, 2, 4, 8, 16, 32, 64, 128, 256)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    thread_counts = sorted({1, cores})
    read_bw = report.machine.get("read_GBps_16MiB")
    for th in thread_counts:
        _threads(th)
        series: Dict[str, list] = {"aimass int8": [], "aimass int4 g128": [], "torch fp32": [],
                                   "torch dynamic int8 (FBGEMM)": []}
        for b in batches:
            x = torch.randn(b, n)
            rounds = 3 if quick else 5
            block = max(1, min(10, 64 // b))
            # Every contender's block starts after the same 50 ms idle gap, as a service's sporadic
            # calls find the machine: without it the contenders interleave call by call and torch's
            # OpenMP workers, spinning after each call, hold the cores that the next contender's
            # threads need (b256 2t read 0.58x FBGEMM). The gap parks every pool; two warm-up calls
            # (for each contender) bring the threads back: aimass's worker, its wake-up steered
            # off the caller's CPU, joins within ~0.1 ms (docs/runtime.md, "after an idle gap").
            with torch.no_grad():
                r = race({"int8": lambda: q8(x), "int4": lambda: q4(x), "fp32": lambda: fp32(x),
                          "fbgemm": lambda: tdyn(x)}, rounds=rounds, block=block, warmup=2, gap_s=0.05)
            for label, k in (("aimass int8", "int8"), ("aimass int4 g128", "int4"), ("torch fp32", "fp32"),
                             ("torch dynamic int8 (FBGEMM)", "fbgemm")):
                series[label].append(r[k].seconds * 1e3)
            roof = None
            if b == 1 and th == 1 and read_bw:
                roof = (n * n) / (read_bw * 1e9)  # the int8 weights read once, one thread
            report.add(SUITE, f"int8 linear {n}x{n} batch {b}, {th} thread(s)", r["int8"].seconds, "s",
                       higher_is_better=False, spread=r["int8"].spread, stable=r["int8"].stable,
                       baseline="torch dynamic int8 (FBGEMM)", baseline_value=r["fbgemm"].seconds,
                       baseline_spread=r["fbgemm"].spread, roof="weight read" if roof else None, roof_value=roof,
                       goal=1.2 if b == 1 else (1.0 if b == 256 else None))
            report.add(SUITE, f"int8 linear {n}x{n} batch {b}, {th} thread(s) vs fp32", r["int8"].seconds, "s",
                       higher_is_better=False, spread=r["int8"].spread, baseline="torch fp32 nn.Linear",
                       baseline_value=r["fp32"].seconds, baseline_spread=r["fp32"].spread,
                       goal=4.0 if b == 1 else None)
            report.add(SUITE, f"int4 g128 linear {n}x{n} batch {b}, {th} thread(s)", r["int4"].seconds, "s",
                       higher_is_better=False, spread=r["int4"].spread, baseline="torch fp32 nn.Linear",
                       baseline_value=r["fp32"].seconds, baseline_spread=r["fp32"].spread,
                       goal=6.0 if b == 1 else None)
        report.add_sweep(f"qlinear_{n}_vs_batch_{th}t", list(batches), series, xlabel="batch rows",
                         ylabel="ms per call (lower is better)", logx=True, logy=True)


def run(report: Report, quick: bool = False, progress=None) -> None:
    import aimass
    import torch
    old = (aimass.num_threads(), torch.get_num_threads())
    n = 2048 if quick else 4096
    try:
        bench_quantize(report, n, quick)
        if progress:
            progress("compress: quantize done")
        bench_linear(report, n, quick)
    finally:
        aimass.set_num_threads(old[0])
        torch.set_num_threads(old[1])
