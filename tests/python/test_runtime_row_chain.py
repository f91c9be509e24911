"""Row chains (docs/runtime.md): at 2+ threads, consecutive packed Linear / LayerNorm steps run as
one pool job, each thread taking a range of rows through all of them. The results must be the
same bits as one thread (every Linear here has K <= 256: one K block on every path) and as the
step-by-step path (AIMASS_ROW_CHAINS=0), and match torch; the step profile names the chain."""
import gc
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass  # noqa: E402
import aimass.runtime as rt  # noqa: E402
from aimass.runtime import zoo  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

pytestmark = pytest.mark.timeout(120)

LEVELS = [lv for lv in ("scalar", "avx2", "avx512")
          if {"scalar": True, "avx2": aimass.cpu_features().get("avx2"),
              "avx512": aimass.cpu_features().get("avx512f")}[lv]]


class TokenTail(nn.Module):
    """The row-local tail of a transformer layer. The widths change along the chain (48 -> 256 ->
    192 -> 256 -> 40), so the arena would hand a block that one step read to a later step's output
    if the chain did not keep its blocks busy: a thread ahead would then write rows that the other
    thread still reads."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(48, 256)
        self.ln1 = nn.LayerNorm(256)
        self.ffn1 = nn.Linear(256, 192)
        self.ffn2 = nn.Linear(192, 256)
        self.ln2 = nn.LayerNorm(256)
        self.head = nn.Linear(256, 40)

    def forward(self, x):
        h = self.ln1(self.up(x))
        h = self.ln2(h + self.ffn2(F.gelu(self.ffn1(h))))
        return self.head(h)


@pytest.fixture
def restore():
    level, threads = aimass.cpu_features()["simd"], aimass.num_threads()
    old_env = {k: os.environ.get(k) for k in ("AIMASS_ROW_CHAINS", "AIMASS_PROFILE_STEPS")}
    yield
    aimass.set_simd_level(level)
    aimass.set_num_threads(threads)
    for k, v in old_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_executor(path, arrays, batch, threads, chains, profile=False):
    """One executor built under the given switches (both are read when its plan is built)."""
    aimass.set_num_threads(threads)
    os.environ["AIMASS_ROW_CHAINS"] = "1" if chains else "0"
    os.environ["AIMASS_PROFILE_STEPS"] = "1" if profile else "0"
    ex = rt._rt.Executor(rt.load(path)._m, batch)
    outs = [ex.run(arrays)[0].copy() for _ in range(3)]
    del ex
    gc.collect()  # the plan goes: with the profile on, its table goes to stderr now
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])  # run to run, bit for bit
    return outs[0]


@pytest.mark.parametrize("level", LEVELS)
def test_chain_matches_one_thread_bit_for_bit_and_torch(tmp_path, restore, capfd, level):
    torch.manual_seed(0)
    m = TokenTail().eval()
    path = tmp_path / "tail.aimass"
    rt.export(m, (torch.randn(2, 80, 48),), path, input_names=["x"])
    aimass.set_simd_level(level)
    x = torch.randn(5, 80, 48)
    with torch.no_grad():
        ref = m(x).numpy()
    # 80 tokens: batch 1 is 80 rows (too few to split: 64 rows a chunk at least), 2 and 5 chain
    for b in (1, 2, 5):
        arrays = [x[:b].numpy()]
        one = run_executor(path, arrays, b, 1, True)
        capfd.readouterr()
        two = run_executor(path, arrays, b, 2, True, profile=True)
        table = capfd.readouterr().err
        off = run_executor(path, arrays, b, 2, False)
        np.testing.assert_array_equal(two, one)
        np.testing.assert_array_equal(off, one)
        np.testing.assert_allclose(two, ref[:b], rtol=1e-4, atol=1e-5)
        # the six steps plan as one chain; it runs where each thread gets >= 64 rows
        assert ("(row chain to step 5)" in table) == (b > 1), table


def test_chain_off_and_one_thread_profile_every_step(tmp_path, restore, capfd):
    torch.manual_seed(1)
    m = TokenTail().eval()
    path = tmp_path / "tail.aimass"
    rt.export(m, (torch.randn(2, 80, 48),), path, input_names=["x"])
    arrays = [torch.randn(4, 80, 48).numpy()]
    capfd.readouterr()
    for threads, chains in ((2, False), (1, True)):
        run_executor(path, arrays, 4, threads, chains, profile=True)
        table = capfd.readouterr().err
        assert "aimass step profile (7 steps" in table, table  # six layers and the output's alias
        assert "row chain" not in table, table
        assert table.count("calls      3") == 7, table  # every step timed on its own, each run


def test_bert_layers_chain_from_out_projection_to_next_qkv(tmp_path, restore, capfd):
    torch.manual_seed(2)
    m = zoo.bert_encoder(hidden=64, layers=2, heads=2, ffn=128).eval()
    path = tmp_path / "bert.aimass"
    ids = torch.randint(0, 30522, (3, 128))
    mask = torch.ones(3, 128, dtype=torch.long)
    mask[2, 100:] = 0
    rt.export(m, (ids[:2], mask[:2]), path, dynamic_seq=True, input_names=["input_ids", "attention_mask"])
    with torch.no_grad():
        ref = m(ids, mask).numpy()
    for b in (1, 3):
        arrays = [ids[:b].numpy(), mask[:b].numpy()]
        one = run_executor(path, arrays, b, 1, True)
        capfd.readouterr()
        two = run_executor(path, arrays, b, 2, True, profile=True)
        table = capfd.readouterr().err
        np.testing.assert_array_equal(two, one)
        np.testing.assert_allclose(two, ref[:b], rtol=1e-4, atol=1e-5)
        # layer 0: out projection (+ residual), LayerNorm, FFN up (+ GELU), FFN down (+ residual),
        # LayerNorm and layer 1's q/k/v Linear; layer 1 ends at its last LayerNorm
        assert table.count("(row chain to step") == 2, table
        assert "node 'layers_0_o' (linear)" in table and "node 'layers_1_o' (linear)" in table, table
