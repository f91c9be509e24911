"""Compression benchmarks (pytest-benchmark).

  PYTHONPATH=python python3 -m pytest bench/bench_compress.py -q -p no:cacheprovider -s

test_quantize_*: 4096x4096 fp32 per-channel int8 (symmetric, axis 0), aimass vs
torch.quantize_per_channel, both timed END TO END: the scale computation is
included for both (torch: the usual w.abs().amax(dim=1) / 127 with zero points 0,
then quantize_per_channel; aimass: quantize(), which scans min/max and quantizes).
The torch-only quantize call is also timed and reported. The ratio is printed and
stored in the benchmark's extra_info. Goal: aimass >= 20x faster end to end.
"""
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from aimass.compress import quantize  # noqa: E402

N = K = 4096
# torch 2.x warns that its quantized tensor types are deprecated; the baseline still stands
pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")


def _min_time(benchmark, fn):
    """pytest-benchmark's best time, or our own when it runs with --benchmark-disable (no stats)."""
    stats = getattr(benchmark, "stats", None)
    return stats.stats.min if stats is not None else _best_of(fn)


def _best_of(fn, repeats=5):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.fixture(scope="module")
def weight():
    return np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)


def _torch_end_to_end(wt):
    scales = (wt.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    zero_points = torch.zeros(N, dtype=torch.int64)
    return torch.quantize_per_channel(wt, scales, zero_points, axis=0, dtype=torch.qint8)


def test_quantize_per_channel_int8_vs_torch(benchmark, weight):
    wt = torch.from_numpy(weight)
    scales = (wt.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    zero_points = torch.zeros(N, dtype=torch.int64)
    torch_e2e = _best_of(lambda: _torch_end_to_end(wt))
    torch_call = _best_of(lambda: torch.quantize_per_channel(wt, scales, zero_points, axis=0, dtype=torch.qint8))

    q = benchmark.pedantic(quantize, args=(weight,), kwargs=dict(bits=8, scheme="symmetric", granularity="channel"),
                           rounds=7, warmup_rounds=1)
    # same answer as torch up to torch's reciprocal-multiply rounding (it computes x * (1/scale))
    tq = _torch_end_to_end(wt).int_repr().numpy()
    assert np.mean(q.data != tq) < 1e-3 and np.max(np.abs(q.data.astype(int) - tq)) <= 1

    ours = _min_time(benchmark, lambda: quantize(weight, bits=8, scheme="symmetric", granularity="channel"))
    ratio = torch_e2e / ours
    benchmark.extra_info.update(torch_end_to_end_s=torch_e2e, torch_quantize_call_s=torch_call, aimass_s=ours,
                                speedup_end_to_end=ratio, speedup_vs_torch_call_only=torch_call / ours)
    print(f"\nquantize 4096x4096 fp32 per-channel int8: aimass {ours * 1e3:.2f} ms, torch end-to-end "
          f"{torch_e2e * 1e3:.2f} ms (quantize_per_channel call alone {torch_call * 1e3:.2f} ms): "
          f"{ratio:.1f}x end to end, {torch_call / ours:.1f}x vs the call alone (goal >= 20x)")


def test_quantize_int4_group_throughput(benchmark, weight):
    """int4 symmetric group-128 (the weight-only LLM format); no torch equivalent, reported as GB/s of input."""
    benchmark.pedantic(quantize, args=(weight,), kwargs=dict(bits=4, scheme="symmetric", granularity="group",
                                                             group_size=128), rounds=5, warmup_rounds=1)
    t_int4 = _min_time(benchmark, lambda: quantize(weight, bits=4, scheme="symmetric", granularity="group",
                                                   group_size=128))
    gbs = weight.nbytes / t_int4 / 1e9
    benchmark.extra_info["input_GB_per_s"] = gbs
    print(f"\nquantize 4096x4096 fp32 int4 group-128: {t_int4 * 1e3:.2f} ms ({gbs:.1f} GB/s)")


def test_quantize_bf16_per_channel_int8_vs_torch(benchmark, weight):
    """bf16 weights (the usual checkpoint dtype): aimass widens in cache inside its one pass;
    torch needs .float() first. Both end to end, same scale rule as above."""
    wb = torch.from_numpy(weight).to(torch.bfloat16)
    torch_e2e = _best_of(lambda: _torch_end_to_end(wb.float()))
    benchmark.pedantic(quantize, args=(wb,), kwargs=dict(bits=8, scheme="symmetric", granularity="channel"),
                       rounds=7, warmup_rounds=1)
    ours = _min_time(benchmark, lambda: quantize(wb, bits=8, scheme="symmetric", granularity="channel"))
    benchmark.extra_info.update(torch_end_to_end_s=torch_e2e, aimass_s=ours, speedup_end_to_end=torch_e2e / ours)
    print(f"\nquantize 4096x4096 bf16 per-channel int8: aimass {ours * 1e3:.2f} ms, torch (.float() + scales + "
          f"quantize_per_channel) {torch_e2e * 1e3:.2f} ms: {torch_e2e / ours:.1f}x")
