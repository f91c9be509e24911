"""One wave of peer-failure trials (issue 16), launched by test_comm_peer_failure.py as
`mpirun --enable-recovery -np 2K python comm_peer_failure_worker.py OUTDIR TRIALS_JSON`.

Ranks 2k and 2k+1 form pair k (their own communicator) and run trial k: both loop
allreduces of the trial's size on the trial's path (shared memory staged or single-copy, or MPI;
fused or not);
after a random delay the victim (odd rank) sends itself SIGKILL or SIGSTOP, noting the
moment first. The survivor records when and how its allreduce failed, times its
shutdown, and exits. Not a test file: it only runs under mpirun."""
import json
import os
import sys

import numpy as np
from mpi4py import MPI

from _failure_trial import arm_victim, run_until_error, shut_down_and_write

out_dir, trials = sys.argv[1], json.loads(sys.argv[2])
world = MPI.COMM_WORLD
pair, victim = world.Get_rank() // 2, world.Get_rank() % 2 == 1
sub = world.Split(pair, world.Get_rank())
t = trials[pair]
if t["path"] == "mpi":
    os.environ["AIMASS_SHM"] = "0"
elif t["path"] in ("cma", "map"):  # single copy: the peers read each other's buffers (process_vm_readv)
    os.environ["AIMASS_COMM_ALGOS"] = "allreduce=0:cma"
elif t["path"] == "llst":  # the caller-thread allreduce forced staged (shared-memory rings, no push)
    os.environ["AIMASS_LL_STAGED"] = "1"
elif t["path"] == "llagp":  # allgathers pushed at every size: each rank writes its rows into the peer's result
    os.environ["AIMASS_LL_GATHER_PUSH_MIN_BYTES"] = "0"
import aimass  # noqa: E402
import aimass.dist as dist  # noqa: E402

dist.init(comm=sub, timeout=t["timeout"])
dist.set_fusion_threshold(64 << 20 if t["fused"] else 0)
if t["path"] in ("shm", "cma", "map"):
    dist.set_shm_min_bytes(0)  # even 4 bytes take the shared-memory path
parts = 4 if t["fused"] else 1
n = max(1, t["bytes"] // 4 // parts)
# "map" / "llmap": the arrays in shared host buffers (as gradient buckets are), reduced in place in the
# peers' mappings, through the engine / the caller-thread channel's push (docs/comm.md)
mapped = t["path"] in ("map", "llmap")
if mapped:
    from aimass import _C
    xs = [np.frombuffer(_C.SharedHostBuffer(n * 4), np.float32) for _ in range(parts)]
else:
    xs = [np.full(n, 1.0 + i, np.float32) for i in range(parts)]
want = [2.0 * (1.0 + i) for i in range(parts)]
path = os.path.join(out_dir, f"pair{pair}.{'victim' if victim else 'survivor'}.json")


def step(i):
    if mapped:  # in place: the inputs again, then one allreduce_ each (blocking: llmap)
        for j, x in enumerate(xs):
            x.fill(1.0 + j)
        if t["path"] == "llmap":
            for j, x in enumerate(xs):
                dist.allreduce_(x, op="sum", name=f"t{i}.{j}")
        else:
            for h in [dist.allreduce_async_(x, op="sum", name=f"t{i}.{j}") for j, x in enumerate(xs)]:
                dist.synchronize(h)
        for x, w in zip(xs, want):
            if x[0] != w or x[-1] != w:
                raise AssertionError(f"wrong result {x[0]} != {w}")
        return
    if t["path"] in ("ll", "llst"):  # blocking calls: the caller-thread low-latency channel (docs/comm.md)
        for j, (x, w) in enumerate(zip(xs, want)):
            r = dist.allreduce(x, op="sum", name=f"t{i}.{j}")
            if r[0] != w or r[-1] != w:
                raise AssertionError(f"wrong result {r[0]} != {w}")
        return
    if t["path"] in ("llag", "llagp"):  # blocking allgathers: single copy through the same channel
        for j, (x, w) in enumerate(zip(xs, want)):
            r = dist.allgather(x, name=f"t{i}.{j}")
            if r.shape[0] != 2 * x.shape[0] or r[0] != w / 2 or r[-1] != w / 2:
                raise AssertionError(f"wrong allgather result {r[0]}, {r[-1]} != {w / 2}")
        return
    if t["path"] == "llbc":  # blocking broadcasts, roots alternating: eager on the channel
        for j, x in enumerate(xs):
            root = (i + j) % 2
            r = dist.broadcast(x if sub.Get_rank() == root else np.zeros_like(x), root, name=f"t{i}.{j}")
            if r[0] != x[0] or r[-1] != x[-1]:
                raise AssertionError(f"wrong broadcast result {r[0]} != {x[0]}")
        return
    hs = [dist.allreduce_async(x, op="sum", name=f"t{i}.{j}") for j, x in enumerate(xs)]
    for h, w in zip(hs, want):
        r = dist.synchronize(h)
        if r[0] != w or r[-1] != w:
            raise AssertionError(f"wrong result {r[0]} != {w}")


sub.Barrier()  # start together: setup (64 MiB arrays) takes longer than the timeout on a loaded machine
for i in range(3):  # warm-up: the pair works before the failure
    step(i)
if mapped and dist._require_engine().shared_buffers:  # the warm-up reduced in the peer's mapping
    st = dist.stats()
    assert st["shm_mapped" if t["path"] == "map" else "ll_mapped"] > 0, st
if t["path"] == "llagp" and dist._require_engine().ll_slot_bytes and n * 4 >= 16 << 10:
    assert dist.stats()["ll_gather_pushed"] > 0, dist.stats()  # the warm-up took the push
sub.Barrier()
if victim:
    arm_victim(path, {"pid": os.getpid()}, t)
record = {"pid": os.getpid(), "error": None}
run_until_error(step, record, aimass)
shut_down_and_write(dist, path, record)
