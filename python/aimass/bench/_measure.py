"""Stable measurement, the way perf_analyzer does it: warm up, then time windows until
the last `stable_windows` agree within `bound` (relative), or `max_windows` run out.

A window's value is the median seconds per call inside it. The result is the median of
the last stable windows and their spread, (max - min) / median. A result that never
settled is flagged ``stable=False`` and reported as such, never dropped.

Under MPI every rank must make the same calls: pass `agree` (e.g. ``comm.bcast`` bound to
root 0 and `reduce_max`, e.g. the slowest rank's window) and fixed `calls_per_window`."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Tuple


@dataclass
class Measurement:
    seconds: float            # median seconds per call over the stable windows
    spread: float             # (max - min) / median of those windows
    stable: bool              # the windows agreed within the bound
    windows: int              # windows timed (after warm-up)
    calls: int                # timed calls in all
    bound: float              # the agreement asked for
    window_values: List[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _window(fn: Callable[[], object], calls: Optional[int], window_s: float) -> List[float]:
    ts = []
    end = time.perf_counter() + window_s
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        ts.append(t1 - t0)
        if calls is not None:
            if len(ts) >= calls:
                return ts
        elif t1 >= end and len(ts) >= 3:
            return ts


def measure(fn: Callable[[], object], *, window_s: float = 0.2, bound: float = 0.05, stable_windows: int = 3,
            max_windows: int = 12, warmup: int = 2, calls_per_window: Optional[int] = None,
            reduce_max: Optional[Callable[[float], float]] = None,
            agree: Optional[Callable[[bool], bool]] = None) -> Measurement:
    """Time `fn` until stable; see the module docstring."""
    return _measure_windows([fn], window_s=window_s, bound=bound, stable_windows=stable_windows,
                            max_windows=max_windows, warmup=warmup, calls_per_window=calls_per_window,
                            reduce_max=reduce_max, agree=agree, rewarm=0)[0]


def measure_pair(fa: Callable[[], object], fb: Callable[[], object], *, window_s: float = 0.2, bound: float = 0.05,
                 stable_windows: int = 3, max_windows: int = 12, warmup: int = 2,
                 calls_per_window: Optional[int] = None, reduce_max: Optional[Callable[[float], float]] = None,
                 agree: Optional[Callable[[bool], bool]] = None) -> Tuple[Measurement, Measurement]:
    """Time `fa` and its baseline `fb` in alternating windows (a, b, a, b, ...) until both are stable, so that
    both see the same machine: on a 2-vCPU VM the same call's time flips between two levels (e.g. 0.6 and
    1.2 us) for seconds at a time, and two measurements taken one after the other could land in different
    levels and read as a 2x win or loss. One untimed call precedes each window (the switch's first call)."""
    a, b = _measure_windows([fa, fb], window_s=window_s, bound=bound, stable_windows=stable_windows,
                            max_windows=max_windows, warmup=warmup, calls_per_window=calls_per_window,
                            reduce_max=reduce_max, agree=agree, rewarm=1)
    return a, b


def _measure_windows(fns: List[Callable[[], object]], *, window_s: float, bound: float, stable_windows: int,
                     max_windows: int, warmup: int, calls_per_window: Optional[int],
                     reduce_max: Optional[Callable[[float], float]], agree: Optional[Callable[[bool], bool]],
                     rewarm: int) -> List[Measurement]:
    """One window of each fn in turn, until every fn's last `stable_windows` agree within `bound`."""
    if not (0 < bound < 1):
        raise ValueError(f"bound must be in (0, 1), got {bound}")
    if stable_windows < 2 or max_windows < stable_windows:
        raise ValueError("need 2 <= stable_windows <= max_windows")
    for fn in fns:
        for _ in range(warmup):
            fn()
    values: List[List[float]] = [[] for _ in fns]
    calls = [0] * len(fns)

    def settled(vals: List[float]) -> bool:
        last = vals[-stable_windows:]
        med = statistics.median(last)
        return med > 0 and (max(last) - min(last)) / med <= bound

    while len(values[0]) < max_windows:
        for i, fn in enumerate(fns):
            for _ in range(rewarm):
                fn()
            ts = _window(fn, calls_per_window, window_s)
            calls[i] += len(ts)
            v = statistics.median(ts)
            if reduce_max is not None:
                v = reduce_max(v)
            values[i].append(v)
        if len(values[0]) >= stable_windows:
            stable = all(settled(v) for v in values)
            if agree is not None:
                stable = agree(stable)
            if stable:
                break
    out = []
    for vals, n in zip(values, calls):
        last = vals[-stable_windows:] if len(vals) >= stable_windows else vals
        med = statistics.median(last)
        spread = (max(last) - min(last)) / med if med > 0 else 0.0
        out.append(Measurement(med, spread, spread <= bound, len(vals), n, bound, vals))
    return out


def race(fns: dict, *, rounds: int = 5, block: int = 5, warmup: int = 2, bound: float = 0.10,
         gap_s: float = 0.0) -> dict:
    """Interleaved blocks: every contender sees the same machine over the rounds (a burst of load
    hits both sides). Returns name -> Measurement of per-round medians (spread over rounds).
    gap_s: idle time before each contender's block, so that the previous contender's thread pool
    (onnxruntime's and OpenMP's workers spin 10-20 ms after a call) no longer holds the cores."""
    per: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if gap_s > 0:
                time.sleep(gap_s)
            for _ in range(warmup):
                fn()
            ts = []
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            per[name].append(min(ts))
    out = {}
    for name, vals in per.items():
        med = statistics.median(vals)
        spread = (max(vals) - min(vals)) / med if med > 0 else 0.0
        out[name] = Measurement(med, spread, spread <= bound, rounds, rounds * block, bound, vals)
    return out
