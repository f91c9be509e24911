"""The machine first: what the hardware gives, so every figure can sit beside its roof."""
from __future__ import annotations

import glob
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional

import numpy as np

from .._tuning import cpu_model


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def cache_sizes() -> Dict[str, str]:
    """L1d/L1i/L2/L3 sizes of cpu0 from sysfs (e.g. {'L1d': '48K', 'L2': '1024K', 'L3': '32768K'})."""
    out = {}
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        level, typ, size = _read(f"{d}/level"), _read(f"{d}/type"), _read(f"{d}/size")
        if level and size:
            name = f"L{level}" + ({"Data": "d", "Instruction": "i"}.get(typ or "", ""))
            out[name] = size
    return out


def memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def copy_bandwidth(nbytes: int = 256 << 20, threads: int = 1, repeats: int = 5) -> float:
    """Memory copy bandwidth in GB/s, counted as bytes read + bytes written (STREAM's copy
    convention), best of `repeats`; numpy's copy releases the GIL, so `threads` > 1 copies
    disjoint slices in parallel."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if p.size]

    def one(b):
        np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]])

    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as ex:
        for _ in range(repeats + 1):  # first pass faults the pages in
            t0 = time.perf_counter()
            list(ex.map(one, bounds))
            best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def read_bandwidth(nbytes: int = 16 << 20, repeats: int = 20) -> float:
    """Read-only bandwidth (GB/s) for a buffer of `nbytes` (one thread): the roof of a kernel that
    streams that many bytes of weights once per call, e.g. a batch-1 quantized linear."""
    a = np.ones(nbytes // 8, np.float64)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def mpi_info() -> Dict[str, str]:
    try:
        from mpi4py import MPI
    except Exception as exc:  # noqa: BLE001 - report, don't fail the suite
        return {"mpi": f"unavailable ({type(exc).__name__}: {exc})"}
    lib = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0] if MPI.Get_library_version() else "?"
    return {"mpi": lib, "mpi_standard": "%d.%d" % MPI.Get_version()}


def gpu_info() -> Dict[str, object]:
    from .. import cuda
    info: Dict[str, object] = {"cuda_built": bool(cuda.built()), "cuda_available": bool(cuda.is_available())}
    return info


def versions() -> Dict[str, str]:
    import aimass
    out = {"aimass": aimass.__version__, "python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "onnxruntime", "mpi4py"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional baselines
            out[mod] = "not installed"
    return out


def machine_info(measure_bandwidth: bool = True, quick: bool = False) -> Dict[str, object]:
    import aimass
    cores = os.cpu_count() or 1
    info: Dict[str, object] = {
        "cpu_model": cpu_model(), "logical_cores": cores,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores,
        "simd": aimass.cpu_features().get("simd"), "cpu_features": aimass.cpu_features(),
        "engine_threads": aimass.num_threads(), "caches": cache_sizes(), "memory_bytes": memory_bytes(),
        "platform": platform.platform(), "load_average": list(os.getloadavg()),
    }
    info.update(mpi_info())
    info.update(gpu_info())
    if measure_bandwidth:
        n = (64 << 20) if quick else (256 << 20)
        info["copy_GBps_1_thread"] = copy_bandwidth(n, 1)
        info["copy_GBps_all_threads"] = copy_bandwidth(n, info["usable_cores"])
        info["read_GBps_16MiB"] = read_bandwidth(16 << 20)
    return info
