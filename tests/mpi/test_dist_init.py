import pytest


def test_rank_and_size_match_mpi(dist, mpi):
    assert dist.is_initialized()
    assert dist.rank() == mpi.Get_rank()
    assert dist.size() == mpi.Get_size()
    assert 0 <= dist.local_rank() < dist.local_size() <= dist.size()
    ranks = mpi.allgather(dist.rank())
    assert ranks == list(range(mpi.Get_size()))


def test_init_on_subcommunicator(mpi):
    from aimass import _C
    sub = mpi.Split(color=mpi.Get_rank() % 2, key=mpi.Get_rank())
    c = _C.Communicator(sub.handle)
    assert c.size == sub.Get_size() and c.rank == sub.Get_rank()
    c.free()
    sub.Free()


def test_init_rejects_non_communicator():
    import aimass.dist as d
    if d.is_initialized():
        # init is idempotent once done; the type check applies to a fresh init
        d.shutdown()
    with pytest.raises(TypeError, match="mpi4py communicator"):
        d.init(comm=42)
    d.init()
    assert d.is_initialized()
