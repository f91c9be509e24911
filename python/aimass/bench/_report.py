"""One report per run: the machine, versions, every figure with its baseline, ratio and
spread, the sweeps behind the plots; printed as a table, saved as report.json + PNGs."""
from __future__ import annotations

import datetime
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from .._io import atomic_write_text

REPORT_FORMAT = 1


@dataclass
class Figure:
    """One measured figure. `ratio` > 1 always means aimass is better than the baseline
    (time: baseline / aimass; rate: aimass / baseline)."""
    suite: str
    name: str
    value: float
    unit: str                       # "s", "us", "GB/s", "samples/s", "req/s", ...
    higher_is_better: bool
    spread: float = float("nan")    # relative spread of the aimass value (NaN: one window, none measured)
    stable: bool = True
    baseline: Optional[str] = None
    baseline_value: Optional[float] = None
    baseline_spread: Optional[float] = None
    ratio: Optional[float] = None
    roof: Optional[str] = None      # what bounds this figure (e.g. "copy bandwidth")
    roof_value: Optional[float] = None
    fraction_of_roof: Optional[float] = None
    goal: Optional[str] = None
    goal_met: Optional[bool] = None
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.name}"


def _ratio(value: float, base: Optional[float], higher: bool) -> Optional[float]:
    if base is None or not value or not base or math.isnan(value) or math.isnan(base):
        return None
    return value / base if higher else base / value


@dataclass
class Report:
    machine: Dict[str, Any] = field(default_factory=dict)
    versions: Dict[str, str] = field(default_factory=dict)
    figures: List[Figure] = field(default_factory=list)
    sweeps: Dict[str, Dict[str, Any]] = field(default_factory=dict)   # name -> {x, xlabel, ylabel, series: {label: [y]}}
    tuning: Dict[str, Any] = field(default_factory=dict)
    suites: Dict[str, Dict[str, Any]] = field(default_factory=dict)   # suite -> {seconds, load_before, load_after, error}
    started: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"))
    quick: bool = False

    def add(self, suite: str, name: str, value: float, unit: str, *, higher_is_better: bool,
            spread: float = float("nan"), stable: bool = True, baseline: Optional[str] = None,
            baseline_value: Optional[float] = None, baseline_spread: Optional[float] = None,
            roof: Optional[str] = None, roof_value: Optional[float] = None, goal: Optional[float] = None,
            goal_text: Optional[str] = None, note: str = "") -> Figure:
        """Record a figure; `goal` is a minimum ratio vs the baseline (met when ratio >= goal)."""
        r = _ratio(value, baseline_value, higher_is_better)
        frac = None
        if roof_value:
            frac = value / roof_value if higher_is_better else roof_value / value
        f = Figure(suite, name, float(value), unit, higher_is_better, float(spread), bool(stable), baseline,
                   None if baseline_value is None else float(baseline_value),
                   None if baseline_spread is None else float(baseline_spread), r, roof,
                   None if roof_value is None else float(roof_value), frac,
                   goal_text or (f">= {goal:g}x {baseline}" if goal is not None else None),
                   None if goal is None or r is None else bool(r >= goal), note)
        self.figures.append(f)
        return f

    def add_sweep(self, name: str, x: List[Any], series: Dict[str, List[float]], *, xlabel: str, ylabel: str,
                  logx: bool = False, logy: bool = False) -> None:
        self.sweeps[name] = {"x": list(x), "series": {k: list(v) for k, v in series.items()}, "xlabel": xlabel,
                             "ylabel": ylabel, "logx": logx, "logy": logy}

    def to_dict(self) -> Dict[str, Any]:
        return {"format": REPORT_FORMAT, "started": self.started, "quick": self.quick, "machine": self.machine,
                "versions": self.versions, "suites": self.suites, "tuning": self.tuning,
                "figures": [asdict(f) for f in self.figures], "sweeps": self.sweeps}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Report":
        if not isinstance(d, dict) or d.get("format") != REPORT_FORMAT:
            raise ValueError(f"not an aimass bench report (format {REPORT_FORMAT}); was it written by 'aimass bench'?")
        r = cls(machine=d.get("machine", {}), versions=d.get("versions", {}), sweeps=d.get("sweeps", {}),
                tuning=d.get("tuning", {}), suites=d.get("suites", {}), started=d.get("started", ""),
                quick=bool(d.get("quick", False)))
        try:
            r.figures = [Figure(**f) for f in d.get("figures", [])]
        except TypeError as exc:
            raise ValueError(f"a figure in the report is malformed: {exc}") from None
        return r

    @classmethod
    def load(cls, path: str) -> "Report":
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None

    def save(self, out_dir: str) -> str:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "report.json")
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=str))
        return path


def fmt_value(v: Optional[float], unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "s":
        for u, s in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
            if abs(v) >= s or u == "ns":
                return f"{v / s:.3g} {u}"
    if abs(v) >= 1000:
        return f"{v:,.0f} {unit}".strip()
    return f"{v:.3g} {unit}".strip()


def table_rows(report: Report, suite: Optional[str] = None) -> List[List[str]]:
    rows = []
    for f in report.figures:
        if suite and f.suite != suite:
            continue
        rows.append([f.suite, f.name, fmt_value(f.value, f.unit) + ("" if f.stable else " (unsettled)"),
                     "-" if f.spread != f.spread else f"{100 * f.spread:.1f}%", f.baseline or "-", fmt_value(f.baseline_value, f.unit),
                     "-" if f.ratio is None else f"{f.ratio:.2f}x",
                     "-" if f.fraction_of_roof is None else f"{100 * f.fraction_of_roof:.0f}% of {f.roof}",
                     "-" if f.goal is None else f"{f.goal}: {'met' if f.goal_met else 'NOT met'}"])
    return rows


HEADERS = ["suite", "figure", "aimass", "spread", "baseline", "baseline value", "ratio", "roof", "goal"]


def print_table(report: Report, suite: Optional[str] = None, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console(width=None if Console().is_terminal else 200)
    t = Table(title=f"aimass bench{' ' + suite if suite else ''} (ratio > 1: aimass better; same run)")
    for h in HEADERS:
        t.add_column(h, overflow="fold")
    for row in table_rows(report, suite):
        t.add_row(*row)
    console.print(t)


def plot(report: Report, out_dir: str) -> List[str]:
    """One PNG per sweep; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for name, sw in report.sweeps.items():
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for label, ys in sw["series"].items():
            pts = [(x, y) for x, y in zip(sw["x"], ys) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if sw.get("logx"):
            ax.set_xscale("log", base=2)
        if sw.get("logy"):
            ax.set_yscale("log")
        ax.set_xlabel(sw["xlabel"])
        ax.set_ylabel(sw["ylabel"])
        ax.set_title(f"{name} ({report.machine.get('cpu_model', '?')}, {report.machine.get('logical_cores', '?')} "
                     f"cores)", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(out_dir, f"{name}.png")
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
    return paths


class SuiteTimer:
    """Records a suite's wall time and the load average before and after it."""

    def __init__(self, report: Report, suite: str):
        self.report, self.suite = report, suite

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.report.suites[self.suite] = {"load_before": os.getloadavg()[0]}
        return self

    def __exit__(self, et, ev, tb):
        s = self.report.suites[self.suite]
        s["seconds"] = time.perf_counter() - self.t0
        s["load_after"] = os.getloadavg()[0]
        if ev is not None:
            s["error"] = f"{et.__name__}: {ev}"
        return False
