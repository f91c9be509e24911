"""nn.LSTM / nn.GRU (1-2 layers, batch_first) through the runtime, with a dynamic sequence length."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass.runtime as rt  # noqa: E402
from torch import nn  # noqa: E402

from _rt_util import check_session  # noqa: E402


@pytest.fixture
def set_threads():
    """set_threads(n): aimass's thread count for the rest of the test, restored after it."""
    import aimass
    old = aimass.num_threads()
    yield aimass.set_num_threads
    aimass.set_num_threads(old)


class Head(nn.Module):
    def __init__(self, cls, layers, bias=True, hidden=16):
        super().__init__()
        self.r = cls(8, hidden, num_layers=layers, batch_first=True, bias=bias)
        self.fc = nn.Linear(hidden, 3)

    def forward(self, x):
        out, _ = self.r(x)
        return out, self.fc(out[:, -1])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("layers", [1, 2])
def test_rnn_matches_torch_at_every_length(tmp_path, cls, layers):
    torch.manual_seed(0)
    check_session(tmp_path, Head(cls, layers), lambda n: (torch.randn(3, n, 8),), (9, 1, 20), dynamic_seq=True)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("hidden", [1, 7, 17, 300])
def test_rnn_hidden_sizes_off_the_unit_groups(tmp_path, cls, hidden):
    # the recurrent weights are packed in groups of 8 hidden units (threaded at 300): tails and padding
    torch.manual_seed(1)
    check_session(tmp_path, Head(cls, 2, hidden=hidden), lambda n: (torch.randn(2, n, 8),), (6,), name=f"h{hidden}")


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("layers", [1, 2])
def test_bidirectional_rnn_matches_torch(tmp_path, cls, layers):
    # forward state in [0, H), the reverse pass (last step first) in [H, 2H); layer 2 reads both
    torch.manual_seed(2)
    rnn = cls(8, 12, num_layers=layers, batch_first=True, bidirectional=True).eval()
    path = tmp_path / "bi.aimass"
    rt.export(rnn, (torch.randn(2, 5, 8),), path, dynamic_seq=True)
    with rt.Session(path) as s:
        for n in (1, 6, 13):
            x = torch.randn(3, n, 8)
            got = s.run({"input_0": x.numpy()})["output"]
            with torch.no_grad():
                ref = rnn(x)[0].numpy()
            assert got.shape == (3, n, 24)
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_rnn_without_bias_and_bare_module(tmp_path):
    torch.manual_seed(0)
    check_session(tmp_path, Head(nn.GRU, 2, bias=False), lambda n: (torch.randn(2, n, 8),), (5,), name="nb")
    lstm = nn.LSTM(8, 16, batch_first=True).eval()
    rt.export(lstm, (torch.randn(2, 5, 8),), tmp_path / "bare.aimass", dynamic_seq=True)
    x = torch.randn(2, 7, 8)
    with rt.Session(tmp_path / "bare.aimass") as s:
        got = s.run({"input_0": x.numpy()})["output"]
    with torch.no_grad():
        ref = lstm(x)[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_rnn_unsupported_configs(tmp_path):
    class State(nn.Module):
        def __init__(self):
            super().__init__()
            self.r = nn.LSTM(8, 16, batch_first=True)

        def forward(self, x):
            out, (h, c) = self.r(x)
            return h[0]
    with pytest.raises(rt.UnsupportedOpError, match="only the first"):
        rt.export(State(), (torch.randn(2, 5, 8),), tmp_path / "s.aimass")
    with pytest.raises(rt.UnsupportedOpError, match="batch_first=False"):
        rt.export(nn.GRU(8, 16, bidirectional=True), (torch.randn(2, 5, 8),), tmp_path / "b.aimass")


@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_threaded_steps_match_torch(tmp_path, cls, threads, set_threads):
    # hidden 300: every step's unit groups are split over the threads (ops_rnn.cc), also with more
    # threads than cores
    torch.manual_seed(2)
    set_threads(threads)
    check_session(tmp_path, Head(cls, 2, hidden=300), lambda n: (torch.randn(2, n, 8),), (5, 1),
                  dynamic_seq=True, name=f"t{threads}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_threaded_time_loop_bidirectional_odd_hidden(tmp_path, cls, layers, threads, set_threads):
    # hidden 263 (33 unit groups, the last one 7 wide): at 2 threads the whole time loop of each
    # layer and direction is one pool job (ops_rnn.cc run_threaded); batch 1 and 4, forward and reverse
    torch.manual_seed(3)
    rnn = cls(24, 263, num_layers=layers, batch_first=True, bidirectional=True).eval()
    path = tmp_path / "bi263.aimass"
    rt.export(rnn, (torch.randn(2, 5, 24),), path, dynamic_seq=True)
    set_threads(threads)
    with rt.Session(path) as s:
        for b, n in ((1, 11), (4, 3)):
            x = torch.randn(b, n, 24)
            got = s.run({"input_0": x.numpy()})["output"]
            with torch.no_grad():
                ref = rnn(x)[0].numpy()
            assert got.shape == (b, n, 526)
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_single_row_step_kernels_agree(tmp_path, monkeypatch, cls, threads, set_threads):
    # batch 1 runs the single-row step kernel (AIMASS_RNN_GEMV=1, the default; 0 the blocked panels
    # kernel): both equal torch, the walk in both directions, hidden 263 (K % 4 != 0 and a 7-wide
    # last group), two layers, biases (GRU's b_hh goes through the kernel's bias)
    torch.manual_seed(5)
    rnn = cls(24, 263, num_layers=2, batch_first=True, bidirectional=True).eval()
    path = tmp_path / "walk.aimass"
    rt.export(rnn, (torch.randn(2, 5, 24),), path, dynamic_seq=True)
    x = torch.randn(1, 9, 24)
    with torch.no_grad():
        ref = rnn(x)[0].numpy()
    set_threads(threads)
    with rt.Session(path) as s:
        outs = {}
        for mode in ("0", "1"):
            monkeypatch.setenv("AIMASS_RNN_GEMV", mode)
            outs[mode] = s.run({"input_0": x.numpy()})["output"]
            np.testing.assert_allclose(outs[mode], ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(outs["1"], outs["0"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_first_step_skips_the_zero_state_product(tmp_path, monkeypatch, cls, threads, set_threads):
    # step 0 reads h = 0, so h @ W_hh^T is 0 (GRU: b_hh) and is not computed (AIMASS_RNN_SKIP0=0
    # computes it): equal results at batch 1 and 4, hidden 263, bidirectional (the reverse
    # direction's first step is the last timestep)
    torch.manual_seed(6)
    rnn = cls(24, 263, num_layers=2, batch_first=True, bidirectional=True).eval()
    path = tmp_path / "skip0.aimass"
    rt.export(rnn, (torch.randn(2, 5, 24),), path, dynamic_seq=True)
    set_threads(threads)
    with rt.Session(path) as s:
        for b, n in ((1, 7), (4, 3)):
            x = torch.randn(b, n, 24)
            with torch.no_grad():
                ref = rnn(x)[0].numpy()
            outs = []
            for flag in ("1", "0"):
                monkeypatch.setenv("AIMASS_RNN_SKIP0", flag)
                outs.append(s.run({"input_0": x.numpy()})["output"])
                np.testing.assert_allclose(outs[-1], ref, rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_nonfinite_recurrent_weight_still_poisons_the_first_step(tmp_path, cls):
    # 0 * inf is NaN: with an inf in W_hh torch's first step is already NaN, so the zero-state
    # shortcut must not apply (ops_rnn.cc checks W_hh once at plan build)
    torch.manual_seed(7)
    rnn = cls(8, 16, batch_first=True).eval()
    with torch.no_grad():
        rnn.weight_hh_l0[3, 5] = float("inf")
    path = tmp_path / "inf.aimass"
    rt.export(rnn, (torch.randn(2, 4, 8),), path, dynamic_seq=True)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        ref = rnn(x)[0].numpy()
    with rt.Session(path) as s:
        got = s.run({"input_0": x.numpy()})["output"]
    assert np.isnan(ref[0, 0]).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)  # NaN where torch has NaN


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_projection_rides_along_the_steps(tmp_path, monkeypatch, cls, threads, set_threads):
    # batch 1: the input projection of the rows ahead runs inside the steps in blocks of 8 rows
    # (AIMASS_RNN_FUSE=1, the default; 0 runs it as one GEMM up front). Sequence lengths below, at
    # and past two blocks (no fusion, one block riding along, tail rows), hidden 263 (33 unit
    # groups: uneven V shares per step and per thread), input width 24 != hidden, 1-3 layers, both
    # directions (the reverse one's blocks start from the last row)
    torch.manual_seed(8)
    set_threads(threads)
    for layers, bidir in ((1, False), (2, False), (3, False), (2, True)):
        rnn = cls(24, 263, num_layers=layers, batch_first=True, bidirectional=bidir).eval()
        path = tmp_path / f"fuse{layers}{int(bidir)}.aimass"
        rt.export(rnn, (torch.randn(2, 5, 24),), path, dynamic_seq=True)
        with rt.Session(path) as s:
            for n in (15, 16, 17, 23, 40):
                x = torch.randn(1, n, 24)
                with torch.no_grad():
                    ref = rnn(x)[0].numpy()
                outs = {}
                for flag in ("1", "0"):
                    monkeypatch.setenv("AIMASS_RNN_FUSE", flag)
                    outs[flag] = s.run({"input_0": x.numpy()})["output"]
                    np.testing.assert_allclose(outs[flag], ref, rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(outs["1"], outs["0"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_nonfinite_input_weight_in_the_riding_projection(tmp_path, monkeypatch, cls, bad):
    # a NaN / inf in layer 1's W_ih reaches the projection inside the steps: NaN where torch has NaN
    # (a NaN spreads over every unit through W_hh; an inf saturates its gate), with and without it
    torch.manual_seed(9)
    rnn = cls(8, 40, num_layers=2, batch_first=True).eval()
    with torch.no_grad():
        rnn.weight_ih_l1[5, 7] = bad
    path = tmp_path / "bad1.aimass"
    rt.export(rnn, (torch.randn(2, 4, 8),), path, dynamic_seq=True)
    x = torch.randn(1, 20, 8)
    with torch.no_grad():
        ref = rnn(x)[0].numpy()
    assert np.isnan(ref).any() == (bad != bad)
    with rt.Session(path) as s:
        for flag in ("1", "0"):
            monkeypatch.setenv("AIMASS_RNN_FUSE", flag)
            got = s.run({"input_0": x.numpy()})["output"]
            np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("hidden", [200, 300, 520])
def test_gru_three_gate_panels_split_at_whole_panels(tmp_path, hidden, threads, set_threads):
    # GRU's 3 gates take 24 columns a group of 8 units, 4 groups to 3 panels (ops_rnn.cc): hidden 200
    # (25 groups: 7 blocks, the last one group), 300 (38: the last block 2 groups and half a panel),
    # 520 (65 groups, 49 panels: the fused input projection at batch 1 splits them over its steps).
    # Threads split at whole blocks; batch 1 (the single-row walk) and batch 3, both directions, 2 layers.
    torch.manual_seed(hidden)
    rnn = nn.GRU(16, hidden, num_layers=2, batch_first=True, bidirectional=True).eval()
    path = tmp_path / f"gru{hidden}.aimass"
    rt.export(rnn, (torch.randn(2, 5, 16),), path, dynamic_seq=True)
    set_threads(threads)
    with rt.Session(path) as s:
        for b, n in ((1, 19), (3, 4)):
            x = torch.randn(b, n, 16)
            got = s.run({"input_0": x.numpy()})["output"]
            with torch.no_grad():
                ref = rnn(x)[0].numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_late_chunks_run_twice_with_the_same_bits(tmp_path, monkeypatch, cls, threads, set_threads):
    # threaded time loop (ops_rnn.cc run_threaded): a thread that waits on a chunk running elsewhere
    # runs it itself after AIMASS_RNN_TAKEOVER_US (0: at once, so chunks often run twice and race to
    # commit; -1: never, a plain barrier per step). Every setting gives the same bits, and torch's
    # result: batch 1 (the projection riding along, its rows committed with the chunk) and 3,
    # hidden 263 (uneven chunks), 2 layers and a bidirectional one, lengths around the 8-row blocks
    torch.manual_seed(13)
    set_threads(threads)
    for layers, bidir in ((2, False), (1, True)):
        rnn = cls(24, 263, num_layers=layers, batch_first=True, bidirectional=bidir).eval()
        path = tmp_path / f"late{layers}{int(bidir)}.aimass"
        rt.export(rnn, (torch.randn(2, 5, 24),), path, dynamic_seq=True)
        with rt.Session(path) as s:
            for b, n in ((1, 17), (1, 40), (3, 9)):
                x = torch.randn(b, n, 24)
                with torch.no_grad():
                    ref = rnn(x)[0].numpy()
                outs = {}
                for us in ("-1", "0", "30"):
                    monkeypatch.setenv("AIMASS_RNN_TAKEOVER_US", us)
                    for _ in range(3):  # races differ from run to run
                        got = s.run({"input_0": x.numpy()})["output"]
                        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
                        outs.setdefault(us, got)
                        np.testing.assert_array_equal(got, outs["-1"])
