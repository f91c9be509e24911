"""`aimass demo --kernels`: a small synthetic pipeline, then a kernel showcase.

First (aimass.demo.catdog) a synthetic cat/dog image set is cleaned, written as
records, split from a config.yml, loaded by the native Loader to train a torch MLP
with aimass.dist's DistributedOptimizer (`mpirun -np N python -m aimass demo --kernels` runs
it data-parallel), exported fp32 and int8 and served through a batching Session.
Then a Linear-sized weight is quantized to int8 and int4 and pruned 2:4, and the
fused quantized linear is timed at batch 1 against fp32 GEMV through the same BLAS.
"""
from __future__ import annotations

import time

import numpy as np


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up: packs weights, spins up threads
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(n: int = 4096, k: int = 4096, repeats: int = 20, seed: int = 0) -> dict:
    import aimass
    from aimass import compress

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(np.float32)
    x = rng.standard_normal((1, k), dtype=np.float32)
    ref = x @ w.T
    out = {"shape": [n, k], "simd": aimass.cpu_features()["simd"], "threads": aimass.num_threads()}

    t0 = time.perf_counter()
    q8 = compress.quantize(w, bits=8, granularity="channel")
    out["quantize_int8_ms"] = (time.perf_counter() - t0) * 1e3
    q4 = compress.quantize(w, bits=4, granularity="group", group_size=128)
    for name, q in (("int8", q8), ("int4_g128", q4)):
        err = np.abs(q.dequantize() - w).max()
        y = np.asarray(compress.linear(x, q))
        out[f"{name}_max_weight_err"] = float(err)
        out[f"{name}_linear_rel_err"] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))

    mask = compress.prune_mask(w, method="n:m", n=2, m=4)
    out["pruned_2of4_kept"] = float(mask.mean())

    t_fp32 = _best_of(lambda: x @ w.T, repeats)
    t_int8 = _best_of(lambda: compress.linear(x, q8), repeats)
    t_int4 = _best_of(lambda: compress.linear(x, q4), repeats)
    out["fp32_blas_gemv_ms"] = t_fp32 * 1e3
    out["int8_linear_ms"] = t_int8 * 1e3
    out["int4_linear_ms"] = t_int4 * 1e3
    # Batch-1 linear reads every weight once: weight bytes / time is the memory
    # bandwidth it reached. Once the fp32 GEMV and the fused kernels all run at the
    # machine's bandwidth, the speedup is the byte ratio (4x int8, 8x int4), not more.
    out["fp32_weight_gbps"] = w.nbytes / t_fp32 / 1e9
    out["int8_weight_gbps"] = q8.data.nbytes / t_int8 / 1e9
    out["int4_weight_gbps"] = q4.data.nbytes / t_int4 / 1e9
    out["int8_speedup_vs_fp32"] = t_fp32 / t_int8
    out["int4_speedup_vs_fp32"] = t_fp32 / t_int4
    return out


def main() -> int:
    from .. import dist
    from . import catdog
    catdog.run()
    if dist.rank() != 0:
        return 0
    r = run()
    n, k = r["shape"]
    print(f"kernels: {n}x{k} fp32 weight, batch-1 linear, SIMD={r['simd']}, threads={r['threads']}")
    print(f"  quantize per-channel int8        {r['quantize_int8_ms']:8.2f} ms")
    for name in ("int8", "int4_g128"):
        print(f"  {name:9s} max |w - dequant(w)|  {r[name + '_max_weight_err']:.2e}   "
              f"linear rel. error {r[name + '_linear_rel_err']:.2e}")
    print(f"  2:4 pruning keeps                {r['pruned_2of4_kept']:.3f} of the weights")
    print(f"  fp32 GEMV (numpy/BLAS)           {r['fp32_blas_gemv_ms']:8.3f} ms   "
          f"(weights read at {r['fp32_weight_gbps']:.0f} GB/s)")
    print(f"  int8 fused dequant-GEMV          {r['int8_linear_ms']:8.3f} ms   "
          f"({r['int8_speedup_vs_fp32']:.1f}x fp32, {r['int8_weight_gbps']:.0f} GB/s)")
    print(f"  int4 g128 fused dequant-GEMV     {r['int4_linear_ms']:8.3f} ms   "
          f"({r['int4_speedup_vs_fp32']:.1f}x fp32, {r['int4_weight_gbps']:.0f} GB/s)")
    print("  (at batch 1 each weight is read once: when both sides run at memory bandwidth"
          " the speedup is the byte ratio, 4x for int8 and 8x for int4)")
    return 0
