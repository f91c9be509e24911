"""Tests here run under mpirun (tests/run_all.sh). Each test carries a timeout so
a hang fails the run instead of eating CI's time."""
import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(120, method="thread"))


@pytest.fixture(scope="session")
def mpi():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.fixture(scope="session")
def dist():
    import aimass.dist as d
    d.init()
    yield d


def pytest_configure(config):
    config.addinivalue_line("markers", "nprocs(*counts): run only when the world size is one of counts")


def pytest_runtest_setup(item):
    m = item.get_closest_marker("nprocs")
    if m is not None:
        from mpi4py import MPI
        if MPI.COMM_WORLD.Get_size() not in m.args:
            pytest.skip(f"needs mpirun -np in {m.args}")


@pytest.fixture
def shared_dir(dist, tmp_path_factory):
    """shared_dir(name): rank 0's fresh temporary folder, on every rank (one machine; on several
    nodes it would have to be a shared file system path)."""
    import numpy as np

    def make(name: str) -> str:
        p = str(tmp_path_factory.mktemp(name)) if dist.rank() == 0 else ""
        codes = np.frombuffer(p.encode().ljust(512), np.uint8).astype(np.int32)
        return bytes(dist.broadcast(codes, root=0, name=f"shared_dir.{name}").astype(np.uint8)).decode().strip()
    return make


def pytest_sessionfinish(session, exitstatus):
    """A rank that stops on a failure (-x) would leave its peers blocked in their next
    collective, and its own MPI_Finalize waiting on them, until the outer timeout: abort
    the whole job at once so the run fails in seconds with every rank's log written."""
    if exitstatus not in (0, 5):
        import sys
        from mpi4py import MPI
        if MPI.COMM_WORLD.Get_size() > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            tr = session.config.pluginmanager.get_plugin("terminalreporter")
            if tr is not None:  # the summary is printed after this hook: print it first
                tr.summary_failures()
                tr.short_test_summary()
                tr._tw.flush()
            MPI.COMM_WORLD.Abort(1)


@pytest.fixture
def in_threads(dist):
    """in_threads(step, threads=3, steps=40): runs step(tid, i) for i in range(steps) on each of `threads`
    threads, each sleeping up to 1 ms before some steps (seeded per rank and thread, so threads interleave
    differently on each rank); step returns an error text or None. Fails with the first errors."""
    import threading
    import time

    import numpy as np

    def run(step, threads=3, steps=40):
        errors = []

        def worker(tid):
            try:
                rng = np.random.default_rng(tid * 13 + dist.rank())
                for i in range(steps):
                    if rng.random() < 0.2:
                        time.sleep(rng.random() * 1e-3)
                    err = step(tid, i)
                    if err:
                        errors.append(f"thread {tid} step {i}: {err}")
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"thread {tid}: {type(e).__name__}: {e}")

        ts = [threading.Thread(target=worker, args=(tid,)) for tid in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors[:3]

    return run


@pytest.fixture
def ll(dist):
    """dist with the caller-thread low-latency channel (one node); its size limit restored afterwards."""
    eng = dist._require_engine()
    if not eng.ll_slot_bytes:
        pytest.skip("no low-latency channel (ranks on several nodes, or AIMASS_LL_MAX_BYTES=0)")
    yield dist
    dist.set_ll_max_bytes(eng.ll_slot_bytes)
