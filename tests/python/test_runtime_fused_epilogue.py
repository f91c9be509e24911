"""Linear epilogues fused by the executor (bias + ReLU/GELU + residual in the packed GEMM's
registers; `x + linear(..)` folded into the linear) equal torch eager within rtol 1e-4 on the packed
path (blocked shapes: K past 256, N past 256, rows past one M block) and the sgemm path
(packed_max_rows 0), and an activation after a fused residual is not folded before the add."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass.runtime as rt  # noqa: E402
from aimass import _C  # noqa: E402
from torch import nn  # noqa: E402

_rt = _C.runtime


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Block(nn.Module):
    """x + proj(x), relu(x + proj(x)), gelu-FFN + residual, then a LayerNorm."""

    def __init__(self, d=288, ffn=600):
        super().__init__()
        self.p, self.f1, self.f2, self.ln = nn.Linear(d, d), nn.Linear(d, ffn), nn.Linear(ffn, d), nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.p(x)
        x = torch.relu(self.p(x) + x)
        x = x + self.f2(nn.functional.gelu(self.f1(x)))
        return self.ln(x)


@pytest.mark.parametrize("packed_rows", [4096, 0])
def test_fused_residual_and_gelu_match_torch(tmp_path, packed_rows):
    prev = _rt.set_packed_max_rows(packed_rows)
    try:
        m = Block().eval()
        path = rt.export(m, (torch.randn(2, 3, 288),), str(tmp_path / "b.aimass"), input_names=["x"])
        graph = json.loads(rt.load(path).metadata["aimass.graph"])["nodes"]
        assert sum(n["op"] == "add" for n in graph) == 3
        ex = _rt.Executor(rt.load(path)._m, 256)
        steps = ex.num_steps
        for b in (1, 7, 256):  # 3 .. 768 rows: one tile, several, past one M block
            x = torch.randn(b, 3, 288)
            with torch.no_grad():
                ref = m(x).numpy()
            got = ex.run([x.numpy()])[0]
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        # the three residual adds and the GELU fold into their linears; relu(p(x) + x) keeps its own
        # step (folding it would run it before the add)
        assert [n["op"] for n in graph].count("activation") == 2
        assert steps == len(graph) - 4
    finally:
        _rt.set_packed_max_rows(prev)


@pytest.mark.parametrize("simd", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("threads", [1, 2])
def test_ffn_at_k_multiple_of_512_matches_torch(tmp_path, simd, threads):
    """The FFN-down Linear at K = 1024 (K % 512 == 0: the packed GEMM pads x's rows once per call
    at AVX-512) with its residual: one row tile, several, and 600 rows (>= 512 rows, which ran on
    sgemm before the padding), at every SIMD level and 1-2 threads, equal to torch."""
    import aimass

    old = (aimass.cpu_features()["simd"], aimass.num_threads())
    try:
        level = aimass.set_simd_level(simd)
        aimass.set_num_threads(threads)
        m = Block(d=96, ffn=1024).eval()
        path = rt.export(m, (torch.randn(2, 3, 96),), str(tmp_path / "f.aimass"), input_names=["x"])
        ex = _rt.Executor(rt.load(path)._m, 200)
        for b in (4, 13, 200):  # 12, 39, 600 rows
            x = torch.randn(b, 3, 96)
            with torch.no_grad():
                ref = m(x).numpy()
            got = ex.run([x.numpy()])[0]
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                                       err_msg=f"simd={level} threads={threads} rows={3 * b}")
    finally:
        aimass.set_simd_level(old[0])
        aimass.set_num_threads(old[1])
