"""Loader sharding across real MPI ranks (mpirun -np 2, 3, 4): exactly-once coverage,
equal batch counts, rank/world from aimass.dist, resume on every rank."""
import os
import shutil
import tempfile

import numpy as np
import pytest

import aimass.data as D


@pytest.fixture(scope="module")
def shared_dir(mpi):
    path = tempfile.mkdtemp(prefix="aimass_data_mpi_") if mpi.Get_rank() == 0 else None
    path = mpi.bcast(path, root=0)
    yield path
    mpi.Barrier()
    if mpi.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def _dataset(mpi, shared_dir, name, n):
    if mpi.Get_rank() == 0:
        X = (np.arange(n * 8) % 256).astype(np.uint8).reshape(n, 8)
        D.write(os.path.join(shared_dir, name), {"x": X, "id": np.arange(n, dtype=np.int64)}, shard_bytes=4096)
    mpi.Barrier()
    return D.open(os.path.join(shared_dir, name))


@pytest.mark.timeout(60)
def test_exactly_once_across_ranks(mpi, dist, shared_dir):
    n = 240  # divisible by 2, 3 and 4
    ds = _dataset(mpi, shared_dir, "even", n)
    loader = D.Loader(ds, 16, seed=5)  # rank and world from aimass.dist
    assert (loader.rank, loader.world_size) == (mpi.Get_rank(), mpi.Get_size())
    for epoch in range(2):
        mine = [b["id"].copy() for b in loader]
        counts = mpi.allgather(len(mine))
        assert len(set(counts)) == 1
        allids = np.concatenate(mpi.allgather(np.concatenate(mine)))
        assert sorted(allids.tolist()) == list(range(n)), f"epoch {epoch}"
    # the same global permutation on every rank
    order = np.concatenate([b["id"] for b in D.Loader(ds, n, seed=5, rank=0, world_size=1)])
    orders = mpi.allgather(order)
    assert all((o == orders[0]).all() for o in orders)


@pytest.mark.timeout(60)
def test_uneven_count_pads_and_drop_last(mpi, dist, shared_dir):
    n = 101
    world = mpi.Get_size()
    ds = _dataset(mpi, shared_dir, "odd", n)
    mine = [b["id"].copy() for b in D.Loader(ds, 8, seed=1)]
    shapes = mpi.allgather([len(b) for b in mine])
    assert all(s == shapes[0] for s in shapes)  # same batches, same sizes: no rank waits
    allids = np.concatenate(mpi.allgather(np.concatenate(mine)))
    assert set(allids.tolist()) == set(range(n)) and len(allids) == world * -(-n // world)
    dl = [b["id"].copy() for b in D.Loader(ds, 8, seed=1, drop_last=True)]
    allids = np.concatenate(mpi.allgather(np.concatenate(dl)))
    assert len(set(allids.tolist())) == len(allids)
    assert len(set(mpi.allgather(len(dl)))) == 1


@pytest.mark.timeout(60)
def test_resume_on_every_rank(mpi, dist, shared_dir):
    ds = _dataset(mpi, shared_dir, "resume", 96)
    full = [b["id"].copy() for b in D.Loader(ds, 4, seed=2)]
    run = D.Loader(ds, 4, seed=2)
    it = iter(run)
    head = [next(it)["id"].copy() for _ in range(3)]
    state = run.state_dict()
    del it, run
    resumed = D.Loader(ds, 4, seed=2)
    resumed.load_state_dict(state)
    got = head + [b["id"].copy() for b in resumed]
    assert len(got) == len(full) and all((a == b).all() for a, b in zip(got, full))
