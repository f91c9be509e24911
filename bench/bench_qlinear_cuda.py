"""GPU benches (skip without a CUDA device): the int8 weight-only GEMV against torch's fp16 and
fp32 matmul on the same GPU, batch 1..64, 4096x4096 and 8192x8192, timed with CUDA events; and the
Loader into cupy with pinned buffers against the CPU loader. Run by tests/gpu/run.sh.

    python -m pytest bench/bench_qlinear_cuda.py -s
"""
import time

import numpy as np
import pytest

import aimass
from aimass import compress

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not aimass.cuda.is_available() or not torch.cuda.is_available(),
                                reason="needs a CUDA device")


def cuda_time(fn, reps=50, warmup=5):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3  # seconds per call


@pytest.mark.parametrize("n", [4096, 8192])
def test_int8_gemv_vs_torch(n):
    from aimass.compress import qlinear as qlin
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, n)).astype(np.float32) * 0.02
    qw = qlin.quantize_weight(w, bits=8)
    wd32 = torch.from_numpy(w).cuda()
    wd16 = wd32.half()
    bw = torch.cuda.get_device_properties(0)
    print(f"\n{bw.name}: int8 weight-only linear {n}x{n} (weights {n * n / 2**20:.0f} MiB int8), ms per call:")
    for m in (1, 8, 64):
        x = torch.randn(m, n, device="cuda")
        xh = x.half()
        t_ours = cuda_time(lambda: compress.linear(x, qw))
        t32 = cuda_time(lambda: x @ wd32.T)
        t16 = cuda_time(lambda: xh @ wd16.T)
        roof = n * n / 4.8e12  # int8 weights read once at the H200's ~4.8 TB/s
        print(f"  batch {m:3d}: aimass int8 {t_ours * 1e3:.4f}, torch fp16 {t16 * 1e3:.4f} (x{t16 / t_ours:.2f}), "
              f"torch fp32 {t32 * 1e3:.4f} (x{t32 / t_ours:.2f}); weight-read roof {roof * 1e3:.4f} "
              f"({100 * roof / t_ours:.0f}% of roof)")


def test_loader_into_cupy_pinned(tmp_path):
    cupy = pytest.importorskip("cupy")
    from aimass import data as D
    n = 100_000
    rng = np.random.default_rng(0)
    ds = D.write(str(tmp_path / "ds"), {"x": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                        "label": rng.integers(0, 10, n).astype(np.int64)})
    rates = {}
    for name, kw in (("numpy", {}), ("cupy pinned", {"output": "cupy", "pin_memory": True})):
        loader = D.Loader(ds, 256, shuffle=True, seed=0, **kw)
        t = time.perf_counter()
        k = 0
        for b in loader:
            k += len(b["label"])
        if name != "numpy":
            cupy.cuda.Device().synchronize()
        rates[name] = k / (time.perf_counter() - t)
    print(f"\nLoader 100k x 3 KiB: numpy {rates['numpy']:.0f} samples/s, into cupy with pinned buffers "
          f"{rates['cupy pinned']:.0f} samples/s (x{rates['cupy pinned'] / rates['numpy']:.2f})")
