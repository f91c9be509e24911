"""Packed small-M kernel (every SIMD level, odd shapes, against torch and against the sgemm
path) and batch formation in the scheduler (queued requests share one batch; no inline run
under evident load; Session.run's one-call fast path and its conversion fallback)."""
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass  # noqa: E402
import aimass.runtime as rt  # noqa: E402
from torch import nn  # noqa: E402

pytestmark = pytest.mark.timeout(120)
_rt = rt._rt


class OddMLP(nn.Module):
    """Odd widths: tails in every panel / row block; ReLU fused in registers, GELU/SiLU after."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(37, 45), nn.Linear(45, 33), nn.Linear(33, 70), nn.Linear(70, 7)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = nn.functional.gelu(self.b(x))
        x = nn.functional.silu(self.c(x))
        return self.d(x)


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    torch.manual_seed(0)
    net = OddMLP().eval()
    path = tmp_path_factory.mktemp("rt") / "odd.aimass"
    rt.export(net, (torch.randn(2, 37),), path, input_names=["x"])
    return net, path


@pytest.fixture
def restore_simd_and_packing():
    simd, rows = aimass.cpu_features()["simd"], _rt.packed_max_rows()
    yield
    aimass.set_simd_level(simd)
    _rt.set_packed_max_rows(rows)


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
def test_packed_kernel_every_simd_level_matches_torch_and_sgemm(odd, level, restore_simd_and_packing):
    net, path = odd
    aimass.set_simd_level(level)
    _rt.set_packed_max_rows(256)
    packed = _rt.Executor(rt.load(path)._m, 64)
    _rt.set_packed_max_rows(0)  # executors built now pack nothing: GEMV (<= 4 rows) / sgemm
    plain = _rt.Executor(rt.load(path)._m, 64)
    _rt.set_packed_max_rows(256)
    for n in (1, 2, 3, 5, 8, 9, 17, 40, 64):
        x = torch.randn(n, 37, generator=torch.Generator().manual_seed(n))
        got = packed.run([x.numpy()])[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, net(x).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, plain.run([x.numpy()])[0], rtol=1e-5, atol=1e-5)


def test_packed_max_rows_switches_path_at_run_time(odd, restore_simd_and_packing):
    net, path = odd
    ex = _rt.Executor(rt.load(path)._m, 64)
    x = np.random.default_rng(0).standard_normal((20, 37)).astype(np.float32)
    a = ex.run([x])[0]
    _rt.set_packed_max_rows(8)  # 20 rows now go to sgemm with the same executor
    np.testing.assert_allclose(ex.run([x])[0], a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="packed_max_rows"):
        _rt.set_packed_max_rows(-1)


@pytest.fixture(scope="module")
def slow_path(tmp_path_factory):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 4)).eval()
    path = tmp_path_factory.mktemp("rt") / "slow.aimass"
    rt.export(net, (torch.randn(2, 512),), path, input_names=["x"])
    return net, path


def test_requests_queued_behind_a_busy_executor_share_one_batch(slow_path):
    """While the executor runs, blocking run() callers queue up; the next batch takes all of them."""
    net, path = slow_path
    xs = np.random.default_rng(1).standard_normal((8, 1, 512)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(xs[:, 0])).numpy()
    for blocker_rows in (4096, 32768):  # a bigger blocker if a slow machine did not queue all 8 in time
        got, errors = [None] * 8, []
        with rt.Session(path, max_batch_size=16, max_queue_delay_us=100) as sess:
            blocker = sess.submit({"x": np.zeros((blocker_rows, 512), np.float32)})

            def client(i):
                try:
                    got[i] = sess.run({"x": xs[i]})["output"]
                except Exception as exc:  # reported below
                    errors.append(exc)
            threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while sess.stats()["queue_depth"] < 8 and time.monotonic() < deadline and not blocker.done():
                time.sleep(0.0005)
            all_queued = sess.stats()["queue_depth"] == 8 and not blocker.done()
            for t in threads:
                t.join(60)
            blocker.result(timeout=60)
            st = sess.stats()
        assert not errors, errors
        np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-4, atol=1e-5)
        if all_queued:
            break
    else:
        pytest.skip("the machine was too slow to queue 8 requests behind the blocker")
    assert st["batches"] == 2 and st["inline_runs"] == 0
    br = st["batch_requests"]
    assert br["sum"] == 9 and br["counts"][br["bounds"].index(8)] == 1  # one batch of all 8 (bucket (4, 8])


def test_no_inline_run_right_after_a_multi_request_batch(slow_path):
    _, path = slow_path
    x = np.zeros((1, 512), np.float32)
    with rt.Session(path, max_batch_size=16, max_queue_delay_us=200) as sess:
        sess.run({"x": x})
        assert sess.stats()["inline_runs"] == 1  # idle session: on the caller's thread
        blocker = sess.submit({"x": np.zeros((2048, 512), np.float32)})
        queued = [sess.submit({"x": x}) for _ in range(4)]
        blocker.result(timeout=60)
        for f in queued:
            f.result(timeout=60)
        # The last batch held several requests (evident load): the next lone request is queued
        # for the scheduler (others are likely coming back), the one after runs inline again.
        sess.run({"x": x})
        assert sess.stats()["inline_runs"] == 1
        for _ in range(50):  # once the scheduler has finished that lone batch
            sess.run({"x": x})
            if sess.stats()["inline_runs"] > 1:
                break
        assert sess.stats()["inline_runs"] > 1


def test_run_fast_path_and_conversion_fallback(odd):
    net, path = odd
    x = np.random.default_rng(2).standard_normal((6, 37)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    with rt.Session(path) as sess:
        out = sess.run({"x": x})  # plain numpy: the one-call path
        assert list(out) == ["output"] and isinstance(out["output"], np.ndarray)
        np.testing.assert_allclose(out["output"], want, rtol=1e-5, atol=1e-5)
        wide = np.zeros((6, 74), np.float32)
        wide[:, ::2] = x  # non-contiguous view: converted by the Python layer
        np.testing.assert_allclose(sess.run({"x": wide[:, ::2]})["output"], want, rtol=1e-5, atol=1e-5)
        t = sess.run({"x": torch.from_numpy(x)})["output"]  # torch in, torch out
        assert isinstance(t, torch.Tensor)
        np.testing.assert_allclose(t.numpy(), want, rtol=1e-5, atol=1e-5)
        one = sess.run({"x": x[0]})["output"]  # a single example without the batch dimension
        np.testing.assert_allclose(one, want[:1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sess.run({"x": x.astype(np.float16)})["output"],
                                   net(torch.from_numpy(x.astype(np.float16).astype(np.float32))).detach().numpy(),
                                   rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"shape \[6, 36\]"):
            sess.run({"x": x[:, :36].copy()})
        with pytest.raises(ValueError, match="missing"):
            sess.run({"y": x})
        with pytest.raises(TypeError, match="priority"):
            sess.run({"x": x}, priority=1.5)
        with pytest.raises(TimeoutError):
            sess.run({"x": x}, deadline_ms=0)


def test_gathering_stops_when_the_next_request_does_not_fit(slow_path):
    """Under evident load the scheduler waits for more requests, but not for the whole
    max_queue_delay_us once a queued request cannot join the batch (rows would exceed it).
    The delay is an hour: had the scheduler waited it out, a.result(timeout=60) would raise."""
    _, path = slow_path
    for blocker_rows in (2048, 16384):  # a bigger blocker if a slow machine did not queue all 4 in time
        with rt.Session(path, max_batch_size=8, max_queue_delay_us=3_600_000_000) as sess:
            blocker = sess.submit({"x": np.zeros((blocker_rows, 512), np.float32)})
            queued = [sess.submit({"x": np.zeros((1, 512), np.float32)}) for _ in range(4)]
            all_queued = not blocker.done()
            blocker.result(timeout=60)
            for f in queued:
                f.result(timeout=60)  # a batch of 4: load is evident, the next batch waits for 2 requests
            if not (all_queued and sess.stats()["batches"] == 2):
                continue  # the 4 did not share one batch: the premise of evident load is not set up
            a = sess.submit({"x": np.zeros((3, 512), np.float32)})
            b = sess.submit({"x": np.zeros((6, 512), np.float32)})  # 3 + 6 > 8: cannot share a's batch
            assert a.result(timeout=60)["output"].shape == (3, 4) and b.result(timeout=60)["output"].shape == (6, 4)
            st = sess.stats()
        break
    else:
        pytest.skip("the machine was too slow to queue 4 requests behind the blocker")
    assert st["batches"] == 4 and st["batch_rows"]["sum"] == blocker_rows + 4 + 3 + 6


def test_blocking_callers_and_futures_share_batches_and_all_wake(odd):
    """run() callers are woken in a chain, futures directly; mixed in one batch, all finish."""
    net, path = odd
    xs = np.random.default_rng(4).standard_normal((12, 40, 1, 37)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(xs.reshape(-1, 37))).numpy().reshape(12, 40, 1, 7)
    got = np.zeros_like(want)
    errors = []
    with rt.Session(path, max_batch_size=16, max_queue_delay_us=300) as sess:
        def client(i):
            try:
                for j in range(40):
                    got[i, j] = sess.run({"x": xs[i, j]})["output"]
            except Exception as exc:  # reported below
                errors.append(exc)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        futs = [(i, j, sess.submit({"x": xs[i, j]})) for j in range(40) for i in range(8, 12)]
        for i, j, f in futs:
            got[i, j] = f.result(timeout=60)["output"]
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a blocking caller was never woken"
        st = sess.stats()
    assert not errors, errors
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert st["requests"]["ok"] == 12 * 40
