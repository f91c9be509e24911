"""``aimass bench``: the CLI of the bench suites."""
from __future__ import annotations

import argparse
import json
import os
import sys

EXAMPLES = """examples:
  aimass bench --quick                      every suite, short windows (< 3 min on 2 cores)
  aimass bench comm --out results/          busbw vs size (starts mpirun -np 2 itself)
  mpirun -np 4 aimass bench comm            the comm suite on 4 ranks as launched
  aimass bench runtime data --tune          measure, then write the best knobs to $AIMASS_HOME/tuning.json
  aimass bench --show-tuning                print this machine's tuning profile
  aimass bench compare before/report.json after/report.json
  aimass bench readme results/report.json   regenerate README.md's measured tables"""


class UserError(ValueError):
    pass


def _cmd_show_tuning(args) -> int:
    from .. import _tuning
    path = _tuning.profile_path()
    knobs = _tuning.read_profile(path)
    doc = {"path": path, "machine": _tuning.machine_key(), "exists": os.path.exists(path), "knobs": knobs,
           "applied_from_profile": _tuning.applied(),
           "env_overrides": {v[0]: os.environ[v[0]] for k, v in _tuning.ENV_KNOBS.items()
                             if v[0] in os.environ and v[0] not in _tuning.applied()}}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if not doc["exists"]:
        print(f"no tuning profile at {path}; 'aimass bench --tune' writes one")
        return 0
    print(f"tuning profile {path} for {doc['machine']}:")
    for k, v in sorted(knobs.items()):
        env = _tuning.ENV_KNOBS.get(k, (None,))[0]
        over = f"  (overridden by {env}={os.environ[env]})" if env in doc["env_overrides"] else ""
        print(f"  {k:28s} {v}{over}")
    return 0


def _run(args) -> int:
    from rich.console import Console
    from . import SUITES, run, tune
    from ._report import plot, print_table
    from .comm import under_mpirun
    suites = list(SUITES) if not args.suites or "all" in args.suites else args.suites
    for s in suites:
        if s not in SUITES:
            raise UserError(f"unknown suite {s!r}; choose from all, {', '.join(SUITES)}")
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMIX_RANK", "0")))
    if under_mpirun() and suites != ["comm"]:
        # under mpirun only the comm suite runs on every rank; the others on rank 0 after it
        if "comm" in suites and rank != 0:
            suites = ["comm"]
        elif rank != 0:
            return 0
    console = Console(stderr=True)
    quiet = rank != 0
    from tqdm import tqdm
    bar = tqdm(total=len(suites), desc="aimass bench", unit="suite", disable=quiet or not sys.stderr.isatty())

    started = []

    def progress(msg: str) -> None:
        if quiet:
            return
        if msg.endswith(": running"):
            if started:
                bar.update(1)  # the previous suite finished
            started.append(msg)
            bar.set_postfix_str(msg.split(":")[0])
        if not bar.disable or not msg.endswith(": running"):
            bar.write(msg) if not bar.disable else print(msg, file=sys.stderr, flush=True)

    try:
        report = run(suites, quick=args.quick, progress=progress, tune=args.tune)
        bar.update(1 if started else 0)
    finally:
        bar.close()
    if quiet:
        return 0
    out = args.out or "aimass-bench"
    path = report.save(out)
    pngs = plot(report, out)
    print_table(report)
    failed = {s: v["error"] for s, v in report.suites.items() if "error" in v}
    console.print(f"report: {path}; plots: {', '.join(os.path.basename(p) for p in pngs) or 'none'}")
    if args.tune:
        if report.tuning.get("knobs"):
            p = tune(report)
            console.print(f"tuning profile written: {p} ({', '.join(f'{k}={v}' for k, v in report.tuning['knobs'].items())})")
        else:
            console.print("--tune: no suite that chooses knobs ran (runtime, data, comm)")
    for s, e in failed.items():
        console.print(f"[bold red]suite {s} failed:[/] {e}")
    return 1 if failed else 0


def _cmd_compare(args) -> int:
    from .compare import compare, print_compare
    from ._report import Report
    a, b = (Report.load(p) for p in (args.a, args.b))
    res = compare(a, b, min_change=args.min_change)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_compare(res, args.a, args.b)
    return 1 if (args.fail_on_regression and res["regressions"]) else 0


def _cmd_readme(args) -> int:
    from ._report import Report
    from .readme import update_readme
    update_readme(Report.load(args.report), args.readme)
    print(f"{args.readme}: measured tables regenerated from {args.report}")
    return 0


def _dispatch(args) -> int:
    try:
        if args.show_tuning:
            return _cmd_show_tuning(args)
        if args.suites and args.suites[0] in ("compare", "readme"):
            sub = argparse.ArgumentParser(prog=f"aimass bench {args.suites[0]}")
            if args.suites[0] == "compare":
                sub.add_argument("a", help="the reference report.json")
                sub.add_argument("b", help="the report.json to compare with it")
                sub.add_argument("--min-change", type=float, default=0.03,
                                 help="smallest relative change flagged (default 0.03)")
                sub.add_argument("--fail-on-regression", action="store_true", help="exit 1 on a regression")
                sub.add_argument("--json", action="store_true")
                extra = (["--json"] if args.json else []) + (["--fail-on-regression"] if args.fail_on_regression
                                                              else []) + ["--min-change", str(args.min_change)]
                return _cmd_compare(sub.parse_args(args.suites[1:] + extra))
            sub.add_argument("report", help="a report.json written by aimass bench")
            sub.add_argument("--readme", default="README.md", help="the README to update (default ./README.md)")
            return _cmd_readme(sub.parse_args(args.suites[1:] + ["--readme", args.readme]))
        return _run(args)
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"aimass bench: {exc}", file=sys.stderr)
        return 2


def add_cli(sub) -> None:
    p = sub.add_parser("bench", help="measure this machine and the engine against baselines; tune it",
                       description=__doc__ + "\n\n" + EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help="all (default), compress, data, comm, runtime, serve; or 'compare A B', 'readme REPORT'")
    p.add_argument("--quick", action="store_true", help="short windows and fewer points (< 3 min here)")
    p.add_argument("--out", default=None, help="directory for report.json and the PNGs (default ./aimass-bench)")
    p.add_argument("--tune", action="store_true", help="write the knobs the measurements chose to the tuning profile")
    p.add_argument("--show-tuning", action="store_true", help="print this machine's tuning profile and exit")
    p.add_argument("--json", action="store_true", help="JSON output (--show-tuning, compare)")
    p.add_argument("--readme", default="README.md", help="readme: the README to update (default ./README.md)")
    p.add_argument("--min-change", type=float, default=0.03,
                   help="compare: smallest relative change flagged (default 0.03)")
    p.add_argument("--fail-on-regression", action="store_true", help="compare: exit 1 on a regression")
    p.set_defaults(func=_dispatch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="aimass")
    add_cli(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["bench"] + list(sys.argv[1:] if argv is None else argv))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
