"""max_pool2d's row-window path (runtime/ops.cc max_pool2d_rows: undilated windows such as ResNet's
3x3/2 pad 1) against torch, exactly: padding on every side, odd and tiny planes, strides 1-3, batch > 1,
channel counts off any block size, NaN and inf inside windows, every SIMD level and 1 and 2 threads;
plus the paths it sits between (2x2/2, dilated windows)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass  # noqa: E402
import aimass.runtime as rt  # noqa: E402
from torch import nn  # noqa: E402

LEVELS = [lv for lv in ("scalar", "avx2", "avx512")
          if {"scalar": True, "avx2": aimass.cpu_features().get("avx2"),
              "avx512": aimass.cpu_features().get("avx512f")}[lv]]

CASES = [  # c, k, stride, pad, dil, H, W
    (3, 3, 2, 1, 1, 16, 16),   # ResNet's stem pool on an even plane
    (5, 3, 2, 1, 1, 15, 13),   # odd planes: the last window hangs over the right/bottom padding
    (7, 3, 1, 1, 1, 6, 9),     # stride 1, same-size output
    (2, 3, 3, 0, 1, 10, 11),   # stride 3, no padding, leftover columns ignored
    (4, 5, 2, 2, 1, 9, 7),     # 5x5 window, pad 2
    (3, 2, 1, 1, 1, 4, 5),     # even window with padding
    (3, 3, 2, 1, 1, 1, 1),     # 1x1 plane: every window mostly padding
    (17, 2, 2, 0, 1, 8, 8),    # the 2x2/2 path
    (3, 3, 1, 1, 2, 9, 8),     # dilated: the direct loop
]


@pytest.mark.parametrize("case", CASES, ids=[f"c{c[0]}k{c[1]}s{c[2]}p{c[3]}d{c[4]}_{c[5]}x{c[6]}" for c in CASES])
def test_max_pool_matches_torch_exactly(tmp_path, case):
    c, k, stride, pad, dil, h, w = case
    m = nn.MaxPool2d(k, stride, pad, dil).eval()
    path = tmp_path / "p.aimass"
    rt.export(m, (torch.zeros(2, c, h, w),), path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, c, h, w, generator=g)
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)[:6]
    flat[idx[:2]] = float("nan")
    flat[idx[2:4]] = float("inf")
    flat[idx[4:]] = float("-inf")
    ref = m(x).numpy()
    old = aimass.cpu_features()["simd"], aimass.num_threads()
    try:
        for level in LEVELS:
            for threads in (1, 2):
                aimass.set_simd_level(level)
                aimass.set_num_threads(threads)
                ex = rt._rt.Executor(rt.load(path)._m, 3)
                for b in (1, 3):
                    got = ex.run([x[:b].numpy()])[0]
                    np.testing.assert_array_equal(got, ref[:b], err_msg=f"{level}, {threads} thread(s), batch {b}")
    finally:
        aimass.set_simd_level(old[0])
        aimass.set_num_threads(old[1])


def test_resnet_stem_pool_in_a_conv_graph(tmp_path):
    # conv -> relu -> 3x3/2 pool -> conv, as ResNet's stem feeds layer 1
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 5, 3, 1, 1)).eval()
    path = tmp_path / "s.aimass"
    rt.export(m, (torch.randn(2, 3, 30, 30),), path)
    x = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        ref = m(x).numpy()
    got = rt._rt.Executor(rt.load(path)._m, 2).run([x.numpy()])[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
