"""``aimass bench compare A.json B.json``: B against A, figure by figure.

For each figure in both reports, change = B's value over A's in the figure's "better"
direction (> 1: B is better). A change worse than the larger of the two measured spreads
(and at least `min_change`) is flagged as a regression; one better by as much as an
improvement. Figures in only one report are listed."""
from __future__ import annotations

from typing import Dict, List, Tuple

from ._report import Figure, Report, fmt_value


def compare(a: Report, b: Report, min_change: float = 0.03) -> Dict[str, list]:
    fa: Dict[str, Figure] = {f.key: f for f in a.figures}
    fb: Dict[str, Figure] = {f.key: f for f in b.figures}
    rows: List[Tuple] = []
    regressions, improvements = [], []
    for key in [k for k in fa if k in fb]:
        x, y = fa[key], fb[key]
        if not x.value or not y.value:
            continue
        change = y.value / x.value if x.higher_is_better else x.value / y.value
        noise = max([v for v in (x.spread, y.spread) if v == v] + [min_change])
        verdict = "regression" if change < 1 - noise else ("improvement" if change > 1 + noise else "same")
        rows.append((key, fmt_value(x.value, x.unit), fmt_value(y.value, y.unit), change, noise, verdict))
        (regressions if verdict == "regression" else improvements if verdict == "improvement" else []).append(key)
    return {"rows": rows, "regressions": regressions, "improvements": improvements,
            "only_a": sorted(set(fa) - set(fb)), "only_b": sorted(set(fb) - set(fa))}


def print_compare(result: Dict[str, list], a_name: str, b_name: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console(width=None if Console().is_terminal else 200)
    t = Table(title=f"{b_name} vs {a_name} (change > 1: {b_name} better; flagged beyond the measured spread)")
    for h in ("figure", a_name, b_name, "change", "noise", "verdict"):
        t.add_column(h, overflow="fold")
    for key, va, vb, change, noise, verdict in result["rows"]:
        style = {"regression": "bold red", "improvement": "green"}.get(verdict, "")
        t.add_row(key, va, vb, f"{change:.2f}x", f"±{100 * noise:.0f}%", f"[{style}]{verdict}[/]" if style else verdict)
    console.print(t)
    for label, keys in (("only in " + a_name, result["only_a"]), ("only in " + b_name, result["only_b"])):
        if keys:
            console.print(f"{label}: {', '.join(keys)}")
    console.print(f"{len(result['regressions'])} regression(s), {len(result['improvements'])} improvement(s)")
