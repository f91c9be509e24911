"""The engine pool's wake-up hint (aimass._C.wake_workers) and its use by the HTTP server: a hint
never changes results, bad poll times are typed errors, and every inference request sends one
before its body is read (so the threads' wake-up overlaps the request's parsing). No timing."""
import numpy as np
import pytest

import aimass
from aimass import _C

torch = pytest.importorskip("torch")


@pytest.fixture
def threads():
    old = aimass.num_threads()
    yield
    aimass.set_num_threads(old)


def test_wake_hint_keeps_results_and_validates(tmp_path, threads):
    from serve_util import export_mlp

    import aimass.runtime as rt
    path = tmp_path / "m.aimass"
    export_mlp(path, seed=3, d_in=64, hidden=256, d_out=8, layers=3)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    aimass.set_num_threads(1)
    _C.wake_workers()          # no pool at one thread: a no-op
    sess = rt.Session(str(path), max_batch_size=4)
    try:
        want = sess.run({"x": x})
        for n in (2, 3):
            aimass.set_num_threads(n)
            for hint in (None, 0, 300, 10 ** 6):   # capped, not an error
                if hint is not None:
                    _C.wake_workers(hint)
                got = sess.run({"x": x})
                for k in want:
                    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="poll_us"):
            _C.wake_workers(-5)
    finally:
        sess.close()


@pytest.mark.parametrize("wake_min_us", [0.0, 1e9])
def test_server_wakes_the_pool_for_models_worth_it(tmp_path, monkeypatch, wake_min_us):
    pytest.importorskip("starlette")
    import warnings
    with warnings.catch_warnings():   # starlette's note that it prefers httpx2
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    from aimass.serve import ServeConfig, Server, create_app, hot
    from serve_util import make_store
    reg, nets = make_store(tmp_path, versions=1)
    calls = []
    monkeypatch.setattr(hot, "_wake", lambda us: calls.append(us))
    srv = Server(reg, ServeConfig(poll_interval_s=0, wake_min_us=wake_min_us))
    x = np.arange(4, dtype=np.float32).reshape(1, 4) / 4
    with TestClient(create_app(srv)) as c:
        for i in range(4):
            r = c.post("/predict", json={"input": x[0].tolist()})
            assert r.status_code == 200
            with torch.no_grad():
                np.testing.assert_allclose(r.json()["output"], nets[0](torch.from_numpy(x)).numpy(), rtol=1e-5,
                                           atol=1e-5)
        n = len(calls)
        assert c.get("/v2/health/ready").status_code == 200 and len(calls) == n   # not on other routes
        assert c.post("/v2/models/nope/infer", json={"inputs": []}).status_code in (400, 404)
        assert len(calls) == n
    if wake_min_us == 0:
        # once the compute histogram has a batch (it is read on each of a model's first requests)
        assert calls and set(calls) == {hot.WAKE_POLL_US} and srv.wake_poll_us == {"mlp": hot.WAKE_POLL_US}
    else:
        assert calls == [] and srv.wake_poll_us == {"mlp": 0}


@pytest.mark.parametrize("threads_n", [2, 3])
def test_run_long_polling_keeps_bert_results(tmp_path, threads, threads_n):
    """Workers polling through a run (RunScope, AIMASS_RUN_SPIN_US) or parking between its ops give
    the same bits, and both match torch within rtol 1e-4; bad values are typed errors."""
    import aimass.runtime as rt
    from aimass.runtime import zoo
    torch.manual_seed(0)
    enc = zoo.bert_encoder(vocab=100, hidden=64, layers=2, heads=4, ffn=128, max_len=64).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 100, (1, 40), generator=g)
    mask = torch.ones(1, 40, dtype=torch.long)
    mask[0, 31:] = 0
    path = rt.export(enc, (ids, mask), str(tmp_path / "bert.aimass"), dynamic_seq=True,
                     input_names=["input_ids", "attention_mask"])
    with torch.no_grad():
        want = enc(ids, mask).numpy()
    old = _C.run_spin_us()
    aimass.set_num_threads(threads_n)
    ex = rt._rt.Executor(rt.load(path)._m, 1)
    try:
        got = {}
        for spin in (0, 200, 5000, 0):
            _C.set_run_spin_us(spin)
            got.setdefault(spin, []).append(ex.run([ids.numpy(), mask.numpy()])[0].copy())
        for outs in got.values():
            for o in outs:
                np.testing.assert_array_equal(o, got[0][0])
        np.testing.assert_allclose(got[0][0], want, rtol=1e-4, atol=1e-5)
        for bad in (-1, 10 ** 6 + 1):
            with pytest.raises(ValueError, match="set_run_spin_us"):
                _C.set_run_spin_us(bad)
        assert _C.run_spin_us() == 0
    finally:
        _C.set_run_spin_us(old)


def _narrowed_threads(want, poke):
    """Threads of this process whose affinity differs from `want`, looked up until none does (a worker
    restores its mask right after the job it was woken for, which may end after the caller returned;
    one queued behind other processes gets it back from the caller's next job that ends over 2 ms
    after the wake-up, so each look first runs `poke`, a small parallel call)."""
    import os
    import time
    left = []
    for i in range(200):
        if i:
            poke()
        left = []
        for tid in os.listdir("/proc/self/task"):
            try:
                if os.sched_getaffinity(int(tid)) != want:
                    left.append(tid)
            except OSError:
                pass  # a thread that ended meanwhile
        if not left:
            break
        time.sleep(0.005)
    return left


@pytest.mark.parametrize("threads_n", [2, 3])
def test_wake_steering_keeps_results_and_pins_nothing(tmp_path, threads, threads_n):
    """Parked workers woken with the caller's CPU excluded from their affinity (aimass/parallel.h
    set_wake_steering, AIMASS_WAKE_STEER) or not: after idle gaps that park them, BERT mini-like runs
    and an int8 linear give the same bits either way (and match torch), and every thread ends with
    the process's mask."""
    import os
    import time

    import aimass.runtime as rt
    from aimass.compress import quantize_model
    from aimass.runtime import zoo
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity")
    mask = os.sched_getaffinity(0)
    torch.manual_seed(0)
    enc = zoo.bert_encoder(vocab=100, hidden=64, layers=2, heads=4, ffn=128, max_len=64).eval()
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(2))
    attn = torch.ones(1, 40, dtype=torch.long)
    path = rt.export(enc, (ids, attn), str(tmp_path / "bert.aimass"), dynamic_seq=True,
                     input_names=["input_ids", "attention_mask"])
    q8 = quantize_model(torch.nn.Linear(512, 1024), bits=8)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = enc(ids, attn).numpy()
        want_q = q8(x).numpy()
    aimass.set_num_threads(threads_n)
    sess = rt.Session(path, max_batch_size=2)
    feeds = {"input_ids": ids.numpy(), "attention_mask": attn.numpy()}
    old = _C.wake_steering()
    try:
        got, got_q = {}, {}
        for steer in (True, False, True):
            _C.set_wake_steering(steer)
            assert _C.wake_steering() is steer
            for _ in range(3):
                time.sleep(0.005)  # past the workers' polling: each run starts with them parked
                got.setdefault(steer, []).append(next(iter(sess.run(feeds).values())).copy())
                with torch.no_grad():
                    got_q.setdefault(steer, []).append(q8(x).numpy().copy())
        for outs, ref in ((got, got[True][0]), (got_q, got_q[True][0])):
            for o in (o for v in outs.values() for o in v):
                np.testing.assert_array_equal(o, ref)
        np.testing.assert_allclose(got[True][0], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_q[True][0], want_q, rtol=0, atol=0)
    finally:
        _C.set_wake_steering(old)
        sess.close()
    with torch.no_grad():
        assert _narrowed_threads(mask, lambda: q8(x)) == []
