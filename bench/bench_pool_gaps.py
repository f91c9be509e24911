"""Latency after an idle gap: what a service with sparse traffic sees, call by call.

Each round sleeps `gap` ms before every contender (in a rotating order, the same treatment for each;
gap 0: 20 untimed calls instead, so that the previous contender's spinning threads are gone), then
times `calls` calls back to back: call 0 is the one that finds the threads parked and the
caches of a machine that did other things meanwhile, calls 1-4 the warm-up, calls 5+ steady state.
Contenders: aimass int8 linear (aimass.compress, N x N) against torch dynamic int8 (FBGEMM) and torch
fp32 nn.Linear; with --model, BERT mini through aimass.runtime.Session (the batcher's inline run)
against onnxruntime when it is installed. At the end it prints the process's CPU use over an idle
stretch (an idle service must sit near 0%). Timings on a shared machine are noisy: compare
contenders of one run only (--steer 0 1 puts both pool settings in the same rounds), and builds by
running this script against each (PYTHONPATH) in alternation.

    python bench/bench_pool_gaps.py [--threads 1 2] [--batch 1 16 256] [--gaps 0 1 10 50 200 1000]
                                    [--rounds 5] [--calls 8] [--n 2048] [--model] [--only aimass]
                                    [--steer 0 1]
"""
import argparse
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch

import aimass
import aimass.runtime as rt
from aimass import _C
from aimass.compress import quantize_model

try:
    import onnxruntime as ort
except ImportError:  # the baseline is optional
    ort = None


def _linear_contenders(n, b):
    torch.manual_seed(0)
    x = torch.randn(b, n)
    q8 = quantize_model(torch.nn.Linear(n, n), bits=8)
    fp32 = torch.nn.Linear(n, n).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tdyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(n, n)),
                                                      {torch.nn.Linear}, dtype=torch.qint8).eval()
    return {"aimass int8": lambda: q8(x), "torch FBGEMM int8": lambda: tdyn(x), "torch fp32": lambda: fp32(x)}


def _model_contenders(tmp, b, threads):
    from aimass.bench.runtime_families import families
    make_model, make_inputs, _, _, _ = families(False)["bert-mini"]
    torch.manual_seed(0)
    model = make_model().eval()
    xs = make_inputs(b)
    names = ["input_ids", "attention_mask"]
    path = rt.export(model, make_inputs(2), os.path.join(tmp, "m.aimass"), dynamic_seq=True, input_names=names)
    sess = rt.Session(path, max_batch_size=max(8, b), num_threads=threads)
    feeds = {k: v.numpy() for k, v in zip(names, xs)}
    fns = {"aimass BERT mini Session": lambda: sess.run(feeds)}
    if ort is not None:
        onnx_path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(model, make_inputs(2), onnx_path, dynamo=False, opset_version=20, input_names=names,
                          dynamic_axes={k: {0: "b", 1: "s"} for k in names})
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        fns["onnxruntime BERT mini"] = lambda: so.run(None, feeds)
    return fns, sess


def run_gaps(fns, gaps, rounds, calls):
    """name -> gap -> list of per-round lists of call times (s)."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    keys = list(fns)
    out = {k: {g: [] for g in gaps} for k in keys}
    pc = time.perf_counter
    for r in range(rounds):
        for gi, g in enumerate(gaps):
            for j in range(len(keys)):
                k = keys[(r + gi + j) % len(keys)]
                fn = fns[k]
                if g > 0:
                    time.sleep(g / 1e3)
                else:  # back to back: past the previous contender's spinning threads first
                    for _ in range(20):
                        fn()
                ts = []
                for _ in range(calls):
                    t0 = pc()
                    fn()
                    ts.append(pc() - t0)
                out[k][g].append(ts)
    return out


def summarize(rows):
    """call 0, median of calls 1-4, median of calls 5+ (medians over rounds), in us."""
    med = statistics.median
    c0 = med(r[0] for r in rows)
    warm = med(med(r[1:5]) for r in rows) if len(rows[0]) > 1 else float("nan")
    steady = med(med(r[5:]) for r in rows) if len(rows[0]) > 5 else float("nan")
    return c0 * 1e6, warm * 1e6, steady * 1e6


def idle_cpu(seconds):
    # A thread's CPU time reaches the process clock at its next tick or switch, not while it runs
    # on another CPU: let the last calls' share settle before the window opens.
    time.sleep(0.1)
    c0, w0 = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    return (time.process_time() - c0) / (time.perf_counter() - w0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--gaps", type=float, nargs="+", default=[0, 1, 10, 50, 200, 1000])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--model", action="store_true", help="BERT mini Session (batch from --batch, <= 8) too")
    ap.add_argument("--no-linear", action="store_true", help="skip the int8 linear contenders")
    ap.add_argument("--steer", type=int, nargs="+", default=None, choices=[0, 1],
                    help="aimass contenders with the wake-up steering off/on (aimass/parallel.h set_wake_steering)")
    ap.add_argument("--only", nargs="+", default=None, help="contenders whose name contains one of these words")
    ap.add_argument("--idle-s", type=float, default=1.0, help="idle time after the runs whose CPU use is printed")
    ap.add_argument("--tag", default="", help="prefix of every line (which build)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.calls < 1 or args.n < 1 or min(args.threads) < 1 or min(args.batch) < 1:
        ap.error("--rounds, --calls, --n, --threads and --batch must be >= 1")
    if min(args.gaps) < 0:
        ap.error("--gaps must be >= 0")
    torch.set_grad_enabled(False)
    print(f"# {args.tag} gaps {args.gaps} ms, {args.rounds} rounds x {args.calls} calls, load average "
          f"{os.getloadavg()[0]:.2f}; us: call 0 / median of calls 1-4 / of calls 5+", flush=True)
    with tempfile.TemporaryDirectory(prefix="aimass-pool-gaps-") as tmp:
        for th in args.threads:
            aimass.set_num_threads(th)
            torch.set_num_threads(th)
            for b in args.batch:
                fns, sess = {}, None
                if not args.no_linear:
                    fns.update(_linear_contenders(args.n, b))
                if args.model and b <= 8:
                    m, sess = _model_contenders(tmp, b, th)
                    fns.update(m)
                if args.steer:  # each aimass contender once per setting, in the same rounds
                    for k in [k for k in fns if k.startswith("aimass")]:
                        fn = fns.pop(k)
                        for v in args.steer:
                            fns[f"{k} steer={v}"] = (lambda fn, v: lambda: (_C.set_wake_steering(bool(v)), fn()))(fn, v)
                if args.only:
                    fns = {k: f for k, f in fns.items() if any(w in k for w in args.only)}
                if not fns:
                    continue
                res = run_gaps(fns, args.gaps, args.rounds, args.calls)
                for g in args.gaps:
                    for k in fns:
                        c0, warm, steady = summarize(res[k][g])
                        print(f"{args.tag} {th}t b{b:<4d} gap {g:6g} ms  {k:26s} {c0:9.1f} {warm:9.1f} {steady:9.1f}",
                              flush=True)
                if sess is not None:
                    sess.close()
    if args.steer:
        _C.set_wake_steering(True)
    print(f"{args.tag} idle {args.idle_s:g} s after the runs: process CPU {idle_cpu(args.idle_s) * 100:.2f}%")


if __name__ == "__main__":
    main()
