"""HTTP serving benchmark: aimass serve against a Flask /predict app running the same torch model per
request (the platform's documented pattern), and Triton-style JSON against binary tensors. The
measuring code is aimass.bench.serve (also run by `aimass bench serve`); this prints its tables.

    python bench/bench_serve.py [--quick] [--rounds 5] [--plot docs/serving_latency.png] [--json out.json]

Loopback only, bounded in requests and time per point; targets interleaved per round, medians reported.
"""
from __future__ import annotations

import argparse
import json
import sys

from aimass.bench.serve import (BARE, BARE_MODEL, NATIVE, NATIVE_JSON, NATIVE_SERVE, PROTOCOLS, TINY, UVICORN_SERVE,
                                default_label, sweep)

FLASK = "Flask /predict (torch)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests per point")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=None, help="longest time per point")
    ap.add_argument("--requests", type=int, default=None, help="most requests per point")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per point (median reported)")
    ap.add_argument("--serve-args", default="", help="extra `aimass serve` options, e.g. '--threads 1'")
    ap.add_argument("--only", default=None, help="comma-separated subset: predict,v2json,v2bin,tfserving "
                    "(aimass serve --http uvicorn),flask,"
                    "native-predict,native-v2json,native-v2bin,native-tfserving (aimass serve --http native),"
                    "tiny,bare,native (the last three: concurrency 1 only)")
    ap.add_argument("--plot", default=None, help="write a latency plot (PNG) here")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    concs = [int(c) for c in args.concurrency.split(",")]
    res = sweep(quick=args.quick, concurrency=concs, seconds=args.seconds, requests=args.requests,
                rounds=args.rounds, serve_args=args.serve_args.split(),
                only=args.only.split(",") if args.only else None, log=lambda m: print(m, flush=True))
    runs = res["runs"]
    print(f"\nload generator: {res.get('generator')}; aimass serve's default on this build: {default_label()}")
    if FLASK in runs:
        print("\n| target | concurrency | req/s | Flask req/s | ratio | p50 | p99 | Flask p99 | server CPU/req, "
              "target / Flask |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for label in [k for k in runs if k.startswith("aimass") and k != TINY and not k.endswith("/v2/health/live")]:
            for c in concs:
                if c not in runs[label] or c not in runs[FLASK]:
                    continue
                a, f = runs[label][c], runs[FLASK][c]
                print(f"| {label.replace('aimass serve --http ', '')} | {c} | {a['rps']:,.0f} | {f['rps']:,.0f} | "
                      f"{a['rps'] / f['rps']:.1f}x | {a['p50_us'] / 1e3:.2f} ms | {a['p99_us'] / 1e3:.2f} ms | "
                      f"{f['p99_us'] / 1e3:.2f} ms | {a['cpu_us']:.0f} / {f['cpu_us']:.0f} us |")
    print_overhead(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.plot:
        plot(res, concs, args.plot)
    return 0


def print_overhead(res) -> None:
    """HTTP overhead at concurrency 1 (serve p50 - Session.run p50, the issue's definition), and what it
    is made of: the bare uvicorn floor, aimass on a tiny model, and Session.run paced like a server's."""
    runs, s50 = res["runs"], res["session_p50_us"]
    print("\nHTTP overhead at concurrency 1 (p50s, same run):")
    bare = runs.get(BARE, {}).get(1)
    if bare:
        print(f"  floor: {BARE} (same uvicorn settings, same request bytes): {bare['p50_us']:.1f} us "
              "= uvicorn + loopback TCP + the load generator, no aimass code")
    bm = runs.get(BARE_MODEL, {}).get(1)
    if bm:
        print(f"  floor with the model: {BARE_MODEL}: p50 {bm['p50_us']:.1f} us - Session.run {s50:.1f} us = "
              f"{bm['p50_us'] - s50:.1f} us = uvicorn + loopback TCP + the load generator after each request's "
              "compute swept the caches, no aimass serve code")
    tiny = runs.get(TINY, {}).get(1)
    if tiny and "session_tiny_p50_us" in res:
        t50 = res["session_tiny_p50_us"]
        print(f"  {TINY} (784x10 linear): p50 {tiny['p50_us']:.1f} us - Session.run {t50:.1f} us = "
              f"{tiny['p50_us'] - t50:.1f} us" + (f" ({tiny['p50_us'] - t50 - bare['p50_us']:+.1f} us over the floor)"
                                                   if bare else ""))
    for label in (NATIVE, NATIVE_JSON):
        nat = runs.get(label, {}).get(1)
        if nat:
            print(f"  compiled floor: {label}: p50 {nat['p50_us']:.1f} us - Session.run {s50:.1f} us = "
                  f"{nat['p50_us'] - s50:.1f} us = loopback TCP + the load generator + C++ HTTP parsing and the "
                  "copies, after each request's compute swept the caches")
    paced = res.get("session_paced_p50_us")
    default = default_label()
    for label in [mode + p for mode in (UVICORN_SERVE, NATIVE_SERVE) for p in PROTOCOLS]:
        if 1 in runs.get(label, {}):
            r = runs[label][1]
            line = (f"  {label}{' (the default)' if label.startswith(default) else ''}: p50 {r['p50_us']:.1f} us - Session.run {s50:.1f} us = {r['p50_us'] - s50:.1f} us "
                    f"[goal < 150 us: {'met' if r['p50_us'] - s50 < 150 else 'NOT met'}]")
            if paced:
                line += (f"; - Session.run paced {res['paced_gap_us']:.0f} us apart ({paced:.1f} us) = "
                         f"{r['p50_us'] - paced:.1f} us")
            if bm:
                line += f"; - the floor with the model = {r['p50_us'] - bm['p50_us']:.1f} us of aimass serve's own"
            print(line + f" (server's mean compute per batch {r['server_compute_us']:.1f} us)")


def plot(results, concs, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, runs in results["runs"].items():
        cs = [c for c in concs if c in runs]
        if len(cs) < 2:
            continue
        ax1.plot(cs, [runs[c]["rps"] for c in cs], marker="o", label=label)
        ax2.plot(cs, [runs[c]["p50_us"] / 1e3 for c in cs], marker="o", label=label + " p50")
        ax2.plot(cs, [runs[c]["p99_us"] / 1e3 for c in cs], marker="x", linestyle="--", color=ax2.lines[-1].get_color(),
                 label=label + " p99")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_xlabel("concurrent connections")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("requests/s")
    ax1.set_title("Throughput (MLP 784-1024-1024-10, 1 row/request)")
    ax2.set_ylabel("latency (ms)")
    ax2.set_title("Latency p50 (solid) / p99 (dashed)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


if __name__ == "__main__":
    sys.exit(main())
