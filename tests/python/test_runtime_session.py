"""Session and dynamic batcher: batching correctness, deadlines, priorities, back-pressure, close()."""
import asyncio
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass  # noqa: E402
import aimass.runtime as rt  # noqa: E402
from torch import nn  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    path = tmp_path_factory.mktemp("rt") / "mlp.aimass"
    rt.export(net, (torch.randn(2, 32),), path, input_names=["x"])
    return path


@pytest.fixture(scope="module")
def slow_path(tmp_path_factory):
    """A model slow enough (tens of ms for 256 rows) to keep the executor busy."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                        nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 4)).eval()
    path = tmp_path_factory.mktemp("rt") / "slow.aimass"
    rt.export(net, (torch.randn(2, 1024),), path, input_names=["x"])
    return path


def wait_taken(sess):
    """Until the scheduler has taken everything queued (the blocker is running)."""
    deadline = time.monotonic() + 10
    while sess.stats()["queue_depth"] > 0 and time.monotonic() < deadline:
        time.sleep(0.0005)


def rows(n, d=32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_batched_equals_unbatched(mlp_path):
    x = rows(64)
    with rt.Session(mlp_path, max_batch_size=1) as plain:
        ref = [plain.run({"x": x[i:i + 1]})["output"] for i in range(64)]
    with rt.Session(mlp_path, max_batch_size=16, max_queue_delay_us=2000) as sess:
        # a big request keeps the executor busy while the single rows queue up behind it
        blocker = sess.submit({"x": rows(100_000, seed=9)})
        futs = [sess.submit({"x": x[i:i + 1]}) for i in range(64)]
        got = [f.result(timeout=30)["output"] for f in futs]
        blocker.result(timeout=30)
        st = sess.stats()
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)
    assert st["requests"]["ok"] == 65
    assert st["batches"] < 65  # requests really were batched
    assert st["batch_requests"]["count"] == st["batches"]
    used = [b for b, c in zip(st["batch_requests"]["bounds"], st["batch_requests"]["counts"]) if c]
    assert max(used) <= 16 and len(st["batch_requests"]["counts"]) == len(st["batch_requests"]["bounds"]) + 1


def test_many_threads_run_concurrently(mlp_path):
    x = rows(40, seed=3)
    with rt.Session(mlp_path, max_batch_size=1) as plain:
        ref = plain.run({"x": x})["output"]
    errors = []
    with rt.Session(mlp_path, max_batch_size=8) as sess:
        def client(t):
            try:
                for i in range(t, 40, 8):
                    out = sess.run({"x": x[i]})["output"]
                    np.testing.assert_allclose(out[0], ref[i], rtol=1e-5, atol=1e-6)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
        threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_multi_row_requests_and_torch_outputs(mlp_path):
    x = torch.from_numpy(rows(7))
    with rt.Session(mlp_path, max_batch_size=4) as sess:
        out = sess.run({"x": x})["output"]   # larger than max_batch_size: runs alone
        assert isinstance(out, torch.Tensor) and out.shape == (7, 8)
        a = sess.run({"x": x[:3]})["output"]
        np.testing.assert_allclose(a.numpy(), out[:3].numpy(), rtol=1e-5, atol=1e-6)


def test_deadline_expiry(mlp_path):
    with rt.Session(mlp_path) as sess:
        fut = sess.submit({"x": rows(1)}, deadline_ms=0)
        with pytest.raises(TimeoutError, match="deadline"):
            fut.result(timeout=10)
        with pytest.raises(TimeoutError):
            sess.run({"x": rows(1)}, deadline_ms=0)
        assert sess.run({"x": rows(1)}, deadline_ms=10_000)["output"].shape == (1, 8)
        st = sess.stats()["requests"]
        assert st["timeout"] == 2 and st["ok"] == 1


def test_priority_order(slow_path):
    x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    with rt.Session(slow_path, max_batch_size=1) as sess:
        # The premise: all four requests are queued while the blocker holds the executor. On a
        # loaded machine the submitting thread can stall past the blocker; then try again.
        for attempt in range(5):
            order = []
            blocker = sess.submit({"x": x})           # occupies the executor (tens of ms)
            wait_taken(sess)
            futs = {}
            for name, prio in (("low", 0), ("mid", 5), ("high", 10), ("low2", 0)):
                f = sess.submit({"x": x[:1]}, priority=prio)
                f.add_done_callback(lambda _f, n=name, o=order: o.append(n))
                futs[name] = f
            queued_behind_blocker = sess.stats()["queue_depth"] == 4  # none taken yet
            blocker.result(timeout=60)
            for f in futs.values():
                f.result(timeout=60)
            if queued_behind_blocker:
                break
        assert queued_behind_blocker, "the blocker never outlasted four submits"
    assert order == ["high", "mid", "low", "low2"]


def test_queue_full(slow_path):
    x = np.random.default_rng(0).standard_normal((2048, 1024)).astype(np.float32)
    with rt.Session(slow_path, max_batch_size=1, queue_capacity=2) as sess:
        # The premise: two requests are queued while the blocker (hundreds of ms) holds the executor.
        # On a loaded machine the submitting thread can stall past the blocker (CI once saw the third
        # submit accepted behind a 256-row one); then try again.
        for attempt in range(5):
            blocker = sess.submit({"x": x})
            wait_taken(sess)
            queued = [sess.submit({"x": x[:1]}) for _ in range(2)]
            try:
                extra = sess.submit({"x": x[:1]})
            except aimass.QueueFullError as e:
                assert "queue_capacity=2" in str(e)
                extra = None
            blocker.result(timeout=60)
            for f in queued:
                assert f.result(timeout=60)["output"].shape == (1, 4)
            if extra is None:
                break
            extra.result(timeout=60)
        assert extra is None, "the blocker never outlasted three submits"
        assert sess.stats()["requests"]["rejected_full"] == 1


def test_close_drains_and_rejects(slow_path):
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    sess = rt.Session(slow_path, max_batch_size=4)
    futs = [sess.submit({"x": x[i:i + 1]}) for i in range(20)]
    sess.close()
    for f in futs:  # every queued request still ran
        assert f.result(timeout=0)["output"].shape == (1, 4)
    with pytest.raises(aimass.ClosedError):
        sess.run({"x": x[:1]})
    with pytest.raises(aimass.ClosedError):
        sess.submit({"x": x[:1]})
    sess.close()  # idempotent
    st = sess.stats()["requests"]
    assert st["ok"] == 20 and st["rejected_closed"] == 2


def test_run_async(mlp_path):
    x = rows(4)
    with rt.Session(mlp_path) as sess:
        ref = sess.run({"x": x})["output"]

        async def main():
            outs = await asyncio.gather(*(sess.run_async({"x": x[i:i + 1]}) for i in range(4)))
            return np.concatenate([o["output"] for o in outs])

        np.testing.assert_allclose(asyncio.run(main()), ref, rtol=1e-5, atol=1e-6)


def test_run_async_inline(slow_path):
    """inline=True runs on the caller's thread on an idle session (result back without a loop wake-up);
    after a batch of several requests it queues instead, and still resolves, without blocking the loop."""
    x = rows(4, 1024)
    with rt.Session(slow_path, max_batch_size=8, max_queue_delay_us=0) as sess:
        ref = sess.run({"x": x})["output"]

        async def main():
            a = await sess.run_async({"x": x[:1]}, inline=True)
            inline_after_one = sess.stats()["inline_runs"]
            # keeps the executor busy long enough (hundreds of ms on a loaded 2-core machine) that the
            # three below queue behind it together; 256 rows let a loaded CI box split them
            blocker = sess.submit({"x": rows(2048, 1024, seed=1)})
            wait_taken(sess)
            # three queue behind it and run as one batch, so the next lone request sees load
            outs = await asyncio.gather(*(sess.run_async({"x": x[i:i + 1]}) for i in range(3)))
            blocker.result(timeout=30)
            b = await sess.run_async({"x": x[3:4]}, inline=True)
            return a, inline_after_one, outs, b

        a, inline_after_one, outs, b = asyncio.run(main())
        st = sess.stats()
    np.testing.assert_allclose(a["output"], ref[:1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b["output"], ref[3:4], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([o["output"] for o in outs]), ref[:3], rtol=1e-4, atol=1e-5)
    assert inline_after_one == 2          # the blocking run() above and the first inline=True
    assert st["inline_runs"] == 2 and st["requests"]["ok"] == 7
    assert st["batch_requests"]["count"] == 5     # run, a, the blocker, the three together, b


def test_run_async_inline_kinds_and_errors(mlp_path):
    """inline=True gives the same answers as run() for plain numpy inputs (the one-call fast path),
    torch tensors and inputs that need converting (the ticket path), keeps the output kind, counts each
    request once, and raises the same typed errors."""
    x = rows(3)
    with rt.Session(mlp_path) as sess:
        ref = sess.run({"x": x})["output"]

        async def main():
            a = await sess.run_async({"x": x[:1]}, inline=True)
            t = await sess.run_async({"x": torch.from_numpy(x[1:2])}, inline=True)
            d = await sess.run_async({"x": x[2:3].astype(np.float16)}, inline=True, priority=np.int64(3))
            with pytest.raises(ValueError, match="x"):
                await sess.run_async({"x": rows(1, 31)}, inline=True)
            with pytest.raises(TypeError, match="deadline_ms"):
                await sess.run_async({"x": x[:1]}, inline=True, deadline_ms="soon")
            with pytest.raises(ValueError, match="priority"):
                await sess.run_async({"x": x[:1]}, inline=True, priority=2 ** 40)
            return a, t, d

        a, t, d = asyncio.run(main())
        st = sess.stats()
    assert isinstance(a["output"], np.ndarray) and isinstance(t["output"], torch.Tensor)
    np.testing.assert_allclose(a["output"], ref[:1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t["output"].numpy(), ref[1:2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d["output"].astype(np.float32), ref[2:3], rtol=2e-2, atol=2e-2)
    assert st["inline_runs"] == 4 and st["requests"]["ok"] == 4


def test_bad_request_does_not_fail_its_batch(tmp_path):
    net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2)).eval()
    path = tmp_path / "emb.aimass"
    rt.export(net, (torch.randint(0, 10, (2, 2)),), path, input_names=["ids"])
    with rt.Session(path, max_batch_size=8, max_queue_delay_us=5000) as sess:
        good = [sess.submit({"ids": np.array([[1, 2]])}) for _ in range(3)]
        bad = sess.submit({"ids": np.array([[1, 99]])})
        good += [sess.submit({"ids": np.array([[3, 4]])}) for _ in range(3)]
        with pytest.raises(ValueError, match=r"\(embedding\): index 99 "):
            bad.result(timeout=10)
        for f in good:
            assert f.result(timeout=10)["output"].shape == (1, 2)


def test_session_argument_errors(mlp_path):
    with pytest.raises(ValueError, match="max_batch_size"):
        rt.Session(mlp_path, max_batch_size=0)
    with pytest.raises(ValueError, match="queue_capacity"):
        rt.Session(mlp_path, queue_capacity=0)
    with rt.Session(mlp_path) as sess:
        with pytest.raises(TypeError, match="dict"):
            sess.run([rows(1)])
        with pytest.raises(ValueError, match="deadline_ms"):
            sess.submit({"x": rows(1)}, deadline_ms=-1)


def test_stats_histograms(mlp_path):
    with rt.Session(mlp_path) as sess:
        for _ in range(5):
            sess.run({"x": rows(2)})
        st = sess.stats()
    assert st["requests"]["submitted"] == 5 and st["requests"]["ok"] == 5
    for h in ("queue_us", "compute_us", "batch_rows", "batch_requests"):
        assert sum(st[h]["counts"]) == st[h]["count"]
        assert len(st[h]["counts"]) == len(st[h]["bounds"]) + 1
    assert st["queue_us"]["count"] == 5
    assert st["batch_rows"]["sum"] == 10
    assert st["inline_runs"] == 5  # an idle session runs a blocking request on the caller thread


def test_process_exits_cleanly_with_an_open_session(mlp_path):
    """A Session left open (futures thread running) is closed at exit instead of aborting the process."""
    import os
    import subprocess
    import sys
    code = ("import numpy as np, aimass.runtime as rt\n"
            f"s = rt.Session({str(mlp_path)!r})\n"
            "print(s.submit({'x': np.ones((1, 32), np.float32)}).result()['output'].shape)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0 and "(1, 8)" in r.stdout, r.stderr
