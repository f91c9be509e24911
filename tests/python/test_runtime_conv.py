"""The packed conv kernel (runtime/ops_conv.h) against torch at every SIMD level the CPU has: kernel
sizes, strides, padding and dilation that exercise the implicit-im2col panels (runs across output
rows and samples, taps outside the image), K-slices (> 256 taps), output channels off the 8-channel
row blocks, the fused residual + ReLU epilogue, pointwise panels read in place, and 1 and 2 threads."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass  # noqa: E402
import aimass.runtime as rt  # noqa: E402
from torch import nn  # noqa: E402

from _rt_util import close  # noqa: E402

LEVELS = [lv for lv in ("scalar", "avx2", "avx512")
          if {"scalar": True, "avx2": aimass.cpu_features().get("avx2"),
              "avx512": aimass.cpu_features().get("avx512f")}[lv]]


@pytest.fixture
def each_level():
    old_level, old_threads = aimass.cpu_features()["simd"], aimass.num_threads()

    def levels():
        for lv in LEVELS:
            for t in (1, 2):
                aimass.set_simd_level(lv)
                aimass.set_num_threads(t)
                yield lv, t
    yield levels
    aimass.set_simd_level(old_level)
    aimass.set_num_threads(old_threads)


class Block(nn.Module):
    """conv -> (+ x when shapes allow) -> relu: the residual epilogue of a ResNet block."""

    def __init__(self, c, o, k, stride, pad, dil, residual):
        super().__init__()
        self.conv = nn.Conv2d(c, o, k, stride, pad, dil, bias=True)
        self.residual = residual

    def forward(self, x):
        y = self.conv(x)
        if self.residual:
            y = y + x
        return torch.relu(y)


CASES = [  # c, o, k, stride, pad, dil, H, W, residual
    (3, 16, 7, 2, 3, 1, 23, 19, False),    # stem-like, stride 2 (strided gather), odd sizes
    (8, 8, 3, 1, 1, 1, 7, 7, True),        # P = 49: panels span samples, residual through the tile
    (5, 13, 3, 1, 1, 1, 6, 11, False),     # O off the 8-row blocks
    (40, 24, 3, 1, 2, 2, 9, 9, False),     # dilation, Kc = 360 > 256: two K-slices
    (300, 16, 1, 1, 0, 1, 5, 5, False),    # pointwise, K-slices
    (16, 32, 1, 2, 0, 1, 9, 8, False),     # strided 1x1 (ResNet downsample)
    (4, 8, 5, 3, 2, 1, 17, 40, False),     # stride 3 (gathered), a 40-wide row
    (6, 6, 3, 1, 0, 1, 3, 3, True),        # one output pixel per sample
    (8, 8, 1, 1, 0, 1, 40, 40, True),      # pointwise, P = 1600: runs of a whole panel
    (300, 20, 1, 1, 0, 1, 9, 8, False),    # pointwise P = 72: full panels read in place over 2 K-slices, a packed tail
    (24, 24, 1, 1, 0, 1, 8, 12, True),     # pointwise P = 96: in-place panels with the residual epilogue
    (13, 13, 1, 1, 0, 1, 5, 7, True),      # pointwise P = 35: one in-place panel, a tail crossing samples
    # Winograd F(2x2, 3x3) (stride-1 3x3, >= 16 channels): odd sizes clip the edge tiles
    (16, 16, 3, 1, 1, 1, 9, 11, True),     # residual + ReLU through the output transform
    (20, 17, 3, 1, 0, 1, 6, 7, False),     # no padding, O off the 8-row blocks
    (136, 16, 3, 1, 2, 1, 5, 5, False),    # padding 2, C > 128: two K-slices
    (16, 24, 3, 1, 1, 1, 12, 40, False),   # 20 tiles per tile row: two vector chunks per run
]


@pytest.mark.parametrize("case", CASES, ids=[f"c{c[0]}o{c[1]}k{c[2]}s{c[3]}p{c[4]}d{c[5]}" for c in CASES])
def test_conv_matches_torch_at_every_level(tmp_path, each_level, case):
    c, o, k, stride, pad, dil, h, w, residual = case
    torch.manual_seed(0)
    m = Block(c, o, k, stride, pad, dil, residual).eval()
    path = tmp_path / "c.aimass"
    rt.export(m, (torch.randn(2, c, h, w),), path)
    x = torch.randn(5, c, h, w)
    with torch.no_grad():
        ref = m(x)
    for level, threads in each_level():
        ex = rt._rt.Executor(rt.load(path)._m, 5)
        for b in (1, 5):
            close(ex.run([x[:b].numpy()])[0], ref[:b])


def test_conv_keeps_nan_and_inf_per_pixel(tmp_path, each_level):
    # a NaN input poisons only the outputs whose window covers it (no spill into padded lanes)
    torch.manual_seed(1)
    m = Block(2, 4, 3, 1, 1, 1, False).eval()
    path = tmp_path / "n.aimass"
    rt.export(m, (torch.randn(1, 2, 6, 6),), path)
    x = torch.randn(3, 2, 6, 6)
    x[1, 0, 0, 0] = float("nan")
    with torch.no_grad():
        ref = m(x).numpy()
    for _ in each_level():
        got = rt._rt.Executor(rt.load(path)._m, 3).run([x.numpy()])[0]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        close(np.nan_to_num(got), torch.from_numpy(np.nan_to_num(ref)))


def test_winograd_conv_confines_nan_to_its_output_tiles(tmp_path):
    # A Winograd conv (stride-1 3x3, >= 16 channels) mixes each 4x4 input patch into its whole 2x2
    # output tile: a NaN input poisons every output whose window covers it (as torch) and at most
    # the rest of those outputs' tiles; other pixels and samples stay finite and correct.
    torch.manual_seed(2)
    m = Block(16, 16, 3, 1, 1, 1, False).eval()
    path = tmp_path / "w.aimass"
    rt.export(m, (torch.randn(1, 16, 8, 8),), path)
    x = torch.randn(3, 16, 8, 8)
    x[1, 0, 3, 4] = float("nan")
    with torch.no_grad():
        ref = m(x).numpy()
    tiles = np.zeros_like(ref, dtype=bool)
    tiles[1, :, 2:6, 2:6] = True  # output tiles (1..2, 1..2): patches rows/cols 1..6 hold (3, 4)
    old = aimass.num_threads()
    try:
        for t in (1, 2):
            aimass.set_num_threads(t)
            got = rt._rt.Executor(rt.load(path)._m, 3).run([x.numpy()])[0]
            assert np.isnan(got[np.isnan(ref)]).all()
            assert not np.isnan(got[~tiles]).any()
            keep = ~tiles
            close(got[keep], torch.from_numpy(ref[keep]))
    finally:
        aimass.set_num_threads(old)
