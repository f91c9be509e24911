"""Runtime benchmarks of the model families: a BERT-base-shaped encoder (12 layers, hidden 768, 12
heads, seq 128) at batch 1 and 8 and a 4-layer mini, ResNet-18/50 224x224 at batch 1 and 8, an LSTM
2x512 at seq 64 batch 1 - each against torch eager and onnxruntime (graph optimizations on) on the
same weights, fp32 and int8 (the encoders' Linear layers), 1 and 2 threads - and a concurrency sweep
of the BERT mini through Session with mixed sequence lengths (padded batches vs batching off).

    python bench/bench_runtime.py --families [--quick]
    python bench/bench_runtime_families.py [--quick] [--only bert-mini resnet50 ... sweep]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import warnings

import numpy as np

import torch  # noqa: E402
from torch import nn  # noqa: E402

import aimass  # noqa: E402
import aimass.runtime as rt  # noqa: E402
from aimass.bench._measure import race  # noqa: E402
from aimass.runtime import zoo  # noqa: E402

try:
    import onnxruntime as ort
except ImportError:  # optional baseline
    ort = None

# exported models (up to 1.5 GB for the families): removed when the process exits
_TMPDIR = tempfile.TemporaryDirectory(prefix="aimass-bench-fam-")
_TMP = _TMPDIR.name
warnings.filterwarnings("ignore")


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.r = nn.LSTM(512, 512, 2, batch_first=True)

    def forward(self, x):
        return self.r(x)[0]


def families(quick):
    """name -> (model, make_inputs(batch), batches, dynamic_seq, int8)."""
    def tokens(seq):
        def make(b):
            g = torch.Generator().manual_seed(b)
            return torch.randint(0, 30522, (b, seq), generator=g), torch.ones(b, seq, dtype=torch.long)
        return make
    return {
        "bert-base": (lambda: zoo.bert_encoder(), tokens(128), (1, 8), True, True),
        "bert-mini": (lambda: zoo.bert_encoder(hidden=256, layers=4, heads=4, ffn=1024), tokens(128), (1, 8),
                      True, True),
        "resnet18": (lambda: zoo.resnet18(), lambda b: (torch.randn(b, 3, 224, 224),), (1, 8), False, False),
        "resnet50": (lambda: zoo.resnet50(), lambda b: (torch.randn(b, 3, 224, 224),), (1, 8), False, False),
        "lstm2x512": (LSTMNet, lambda b: (torch.randn(b, 64, 512),), (1,), True, False),
    }


def bench_family(name, spec, threads, reps, log=print):
    make_model, make_inputs, batches, dyn, int8 = spec
    torch.manual_seed(0)
    model = make_model().eval()
    ex_in = make_inputs(2)
    names = ["input_ids", "attention_mask"] if len(ex_in) == 2 else ["x"]
    paths = {}
    for q in (None, "int8") if int8 else (None,):
        paths[q or "fp32"] = rt.export(model, ex_in, os.path.join(_TMP, f"{name}-{q or 'fp32'}.aimass"), quantize=q,
                                       dynamic_seq=True if dyn else None, input_names=names)
    onnx_path = os.path.join(_TMP, f"{name}.onnx")
    dyn_axes = {n: ({0: "b", 1: "s"} if dyn else {0: "b"}) for n in names}
    have_ort = False
    if ort is not None:
        try:
            torch.onnx.export(model, ex_in, onnx_path, dynamo=False, opset_version=20, input_names=names,
                              dynamic_axes=dyn_axes)
            have_ort = True
        except Exception as exc:  # noqa: BLE001 - baseline optional
            log(f"# {name}: onnx export failed ({exc}); onnxruntime skipped")
    rows = []
    for t in threads:
        aimass.set_num_threads(t)
        torch.set_num_threads(t)
        exs = {k: rt._rt.Executor(rt.load(p)._m, max(batches)) for k, p in paths.items()}
        so = None
        if have_ort:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = t
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        for b in batches:
            xs = make_inputs(b)
            arrays = [x.numpy() for x in xs]
            feeds = dict(zip(names, arrays))
            with torch.no_grad():
                ref = model(*xs).numpy()
            fns = {"torch": lambda: model(*xs)}
            if so is not None:
                fns["ort"] = lambda: so.run(None, feeds)
            for k, e in exs.items():
                fns[k] = lambda e=e: e.run(arrays)
            # interleaved rounds: a burst of load on the shared machine hits every contender. The
            # 50 ms gap lets the previous contender's spinning pool go idle first: without it, at
            # 2 threads whoever ran after onnxruntime found its workers still spinning on both
            # cores (the LSTM read 12.6 ms against 7.0 ms with the gap, onnxruntime 6.6 ms).
            with torch.no_grad():
                meas = race(fns, rounds=reps, block=1, warmup=1, gap_s=0.05)
                res = {k: m.seconds for k, m in meas.items()}
                spreads = {k: m.spread for k, m in meas.items()}
            acc = {k: float(np.abs(e.run(arrays)[0] - ref).max() / max(np.abs(ref).max(), 1e-30))
                   for k, e in exs.items()}
            rows.append((name, t, b, res, acc, spreads))
            base = res.get("ort", res["torch"])
            line = f"{name:10s} thr {t} batch {b}: torch {res['torch'] * 1e3:8.1f} ms"
            if "ort" in res:
                line += f" | onnxruntime {res['ort'] * 1e3:8.1f} ms"
            for k in exs:
                line += (f" | aimass {k} {res[k] * 1e3:8.1f} ms (x{base / res[k]:4.2f} vs "
                         f"{'onnxruntime' if 'ort' in res else 'torch'}, x{res['torch'] / res[k]:4.2f} vs torch, "
                         f"max rel err {acc[k]:.1e})")
            log(line)
    return rows


def run(report, quick: bool = False, progress=None) -> None:
    """The families into an aimass bench report (the runtime suite calls this): quick runs the BERT
    mini at 1 thread; the full suite every family at 1 and 2 threads."""
    fams = families(quick)
    names = ["bert-mini"] if quick else ["bert-mini", "bert-base", "resnet18", "resnet50", "lstm2x512"]
    threads = [1] if quick else [1, 2]
    log = (lambda m: progress(f"runtime: {m}")) if progress else (lambda m: None)
    old = (aimass.num_threads(), torch.get_num_threads())
    try:
        for name in names:
            for _, t, b, res, acc, spreads in bench_family(name, fams[name], threads, 2 if quick else 5, log):
                base = "onnxruntime" if "ort" in res else "torch eager"
                for k in ("fp32", "int8"):
                    if k in res:
                        report.add("runtime", f"{name} batch {b}, {t} thread(s), {k}", res[k], "s",
                                   higher_is_better=False, baseline=f"{base} fp32", spread=spreads[k],
                                   baseline_value=res.get("ort", res["torch"]),
                                   baseline_spread=spreads.get("ort", spreads["torch"]), goal=1.0 if k == "fp32" else 2.0,
                                   note=f"max rel err {acc[k]:.1e}; torch eager {res['torch'] * 1e3:.2f} ms")
    finally:
        aimass.set_num_threads(old[0])
        torch.set_num_threads(old[1])


def sweep_mixed(seconds, levels=(1, 4, 16)):
    """BERT mini through Session: requests of random lengths 16..128 from N threads, padded batches vs
    batching off (max_batch_size=1)."""
    torch.manual_seed(0)
    model = zoo.bert_encoder(hidden=256, layers=4, heads=4, ffn=1024).eval()
    path = os.path.join(_TMP, "bert-mini-varlen.aimass")
    rt.export(model, (torch.randint(0, 30522, (1, 16)), torch.ones(1, 16, dtype=torch.long)), path,
              dynamic_seq=True, padding={"mask_input": "attention_mask", "pad_value": 0},
              input_names=["input_ids", "attention_mask"])
    rng = np.random.default_rng(0)
    reqs = [{"input_ids": rng.integers(0, 30522, (1, n)), "attention_mask": np.ones((1, n), np.int64)}
            for n in rng.integers(16, 129, 64)]
    print("## BERT mini, mixed lengths 16..128, batch-1 requests from N threads: throughput req/s, p99 ms "
          "(padded batches vs the same Session with batching off)")
    for c in levels:
        out = {}
        for batched in (True, False):
            with rt.Session(path, max_batch_size=16 if batched else 1, max_queue_delay_us=2000) as s:
                s.run(reqs[0])
                lats = [[] for _ in range(c)]
                stop = time.perf_counter() + seconds

                def client(i):
                    k = i
                    while time.perf_counter() < stop:
                        t0 = time.perf_counter()
                        s.run(reqs[k % len(reqs)])
                        lats[i].append(time.perf_counter() - t0)
                        k += c
                ts = [threading.Thread(target=client, args=(i,)) for i in range(c)]
                t0 = time.perf_counter()
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                wall = time.perf_counter() - t0
                all_l = np.concatenate([np.array(x) for x in lats])
                out[batched] = (len(all_l) / wall, float(np.percentile(all_l, 99)) * 1e3)
        (tb, pb), (tu, pu) = out[True], out[False]
        print(f"c={c:2d} batched {tb:7.1f} req/s p99 {pb:7.1f} ms | unbatched {tu:7.1f} req/s p99 {pu:7.1f} ms | "
              f"throughput x{tb / tu:4.2f}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (the machine is shared)")
    ap.add_argument("--only", nargs="+", default=None, help="families to run (default: all) and/or 'sweep'")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    args, _ = ap.parse_known_args(argv)
    reps = 2 if args.quick else 5
    fams = families(args.quick)
    only = args.only or list(fams) + ["sweep"]
    print(f"# aimass {aimass.__version__}, simd={aimass.cpu_features()['simd']}, onnxruntime="
          f"{ort.__version__ if ort else 'no'}, torch {torch.__version__}; median of {reps} runs; ratios >1: "
          "aimass faster")
    for name in fams:
        if name in only:
            bench_family(name, fams[name], args.threads, reps)
    if "sweep" in only:
        sweep_mixed(1.5 if args.quick else 5.0)


if __name__ == "__main__":
    main()
