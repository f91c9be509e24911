"""Registry under concurrency and crashes: two processes pushing at once get distinct versions; a
push SIGKILLed at any point (fault points and random moments, 20 seeded trials) leaves no visible
half version, no lock, and nothing gc cannot clean."""
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("sqlalchemy")
from aimass.registry import Registry  # noqa: E402
from registry_util import assert_consistent, crash_trials, fork_push, make_models  # noqa: E402

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork and SIGKILL")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"), 3)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AIMASS_REGISTRY_FAULT", raising=False)


def two_processes_push(store, blobs, models, n=5):
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    procs = [fork_push(store, blobs, [models[i % len(models)] for i in range(n)], "m", go=go, out=out)
             for _ in range(2)]
    go.set()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert all(a < b for g in got for a, b in zip(g, g[1:]))  # each process sees its versions grow
    assert sorted(got[0] + got[1]) == list(range(1, 2 * n + 1))  # distinct, none lost
    with Registry(store, blobs=blobs) as reg:
        assert assert_consistent(reg, "m") == list(range(1, 2 * n + 1))


@pytest.mark.parametrize("blobs", ["local", "file"])
def test_two_processes_pushing_at_once_get_distinct_versions(tmp_path, models, blobs):
    two_processes_push(str(tmp_path / "store"), f"file://{tmp_path}/blobs" if blobs == "file" else None, models)


def test_push_killed_at_any_point_leaves_the_store_consistent(tmp_path, models):
    kills = crash_trials(str(tmp_path / "store"), None, models, trials=20, seed=17)
    print("random kills, before/after the commit:", kills)


def test_push_killed_with_fsspec_blobs(tmp_path, models):
    crash_trials(f"sqlite:///{tmp_path}/meta/reg.db", f"file://{tmp_path}/blobs", models, trials=10, seed=18)
