"""``aimass bench``: what this machine gives and how the engine does on it.

Suites (one module each): ``compress`` (quantize, quantized linear vs batch and threads),
``data`` (Loader vs torch DataLoader and a memmap roof; threads x prefetch), ``comm``
(busbw vs size per path vs mpi4py, the other collectives, fusion; under mpirun),
``runtime`` (latency vs torch and onnxruntime, packed kernel vs BLAS, SIMD levels, threads,
the batcher's max_batch_size x delay grid), ``serve`` (HTTP concurrency vs req/s and p99).
Every figure is measured beside its baseline in the same run and, where one applies, its
roof; :mod:`aimass.bench._measure` repeats windows until they agree.

    from aimass import bench
    report = bench.run(["compress"], quick=True)
    report.save("out/")            # report.json
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, Iterable, Optional

from ._machine import machine_info, versions
from ._measure import Measurement, measure, race
from ._report import Figure, Report, plot, print_table
from .compare import compare

SUITES = ("compress", "data", "comm", "runtime", "serve")
# which suite's measurement sets which tuning knob
TUNED_BY = {"num_threads": "runtime", "simd": "runtime", "packed_max_rows": "runtime",
            "session_max_batch_size": "runtime", "session_max_queue_delay_us": "runtime",
            "loader_threads": "data", "loader_prefetch": "data", "fusion_threshold": "comm",
            "cycle_time_ms": "comm", "shm_min_bytes": "comm", "comm_algos": "comm"}


def _suite(name: str):
    if name not in SUITES:
        raise ValueError(f"unknown bench suite {name!r}; choose from {', '.join(SUITES)} or 'all'")
    return importlib.import_module(f"{__name__}.{name}")


def run(suites: Iterable[str] = SUITES, quick: bool = False, progress: Optional[Callable[[str], None]] = None,
        measure_machine: bool = True, tune: bool = False) -> Report:
    """Run `suites` in order; returns the Report (machine, versions, figures, sweeps, and in
    ``report.tuning['knobs']`` the knobs the measurements chose). A suite that fails is
    recorded in ``report.suites[name]['error']`` and the others still run. tune: suites that
    need extra measurements to choose knobs run them (comm: every algorithm of the table)."""
    from ._report import SuiteTimer
    suites = list(suites)
    for s in suites:
        _suite(s)  # unknown names fail before anything runs
    report = Report(quick=quick)
    report.machine = machine_info(measure_bandwidth=measure_machine, quick=quick)
    report.versions = versions()
    knobs: Dict[str, object] = {}
    for s in suites:
        mod = _suite(s)
        if progress:
            progress(f"{s}: running")
        try:
            with SuiteTimer(report, s):
                got = (mod.run(report, quick=quick, progress=progress, tune=True) if tune and s == "comm"
                       else mod.run(report, quick=quick, progress=progress))
        except Exception as exc:  # noqa: BLE001 - one broken suite must not lose the others' figures
            if progress:
                progress(f"{s}: FAILED ({type(exc).__name__}: {exc})")
            continue
        if isinstance(got, dict):
            knobs.update({k: v for k, v in got.items() if k in TUNED_BY and v is not None})
    report.tuning = {"knobs": knobs}
    return report


def tune(report: Report, path: Optional[str] = None) -> str:
    """Write the knobs `report` chose to this machine's tuning profile; returns its path."""
    from .. import _tuning
    knobs = dict(report.tuning.get("knobs", {}))
    if not knobs:
        raise ValueError("the report chose no knobs: run the runtime, data or comm suites with --tune")
    evidence = {k: f"measured by the {TUNED_BY.get(k, '?')} suite on {report.started}" for k in knobs}
    return _tuning.write_profile(knobs, evidence, path=path)


__all__ = ["run", "tune", "compare", "machine_info", "versions", "measure", "race", "Measurement", "Report",
           "Figure", "plot", "print_table", "SUITES"]
