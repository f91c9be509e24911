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
