"""One dead-peer trial on the caller-thread hierarchical allreduce (comm/hier_fast.cc), launched by
test_comm_peer_failure.py as `AIMASS_RANKS_PER_NODE=2 mpirun --enable-recovery -np 4 python
comm_hier_failure_worker.py OUTDIR TRIAL_JSON`: 4 ranks as 2 simulated nodes x 2.

Every rank loops blocking `allreduce_` calls of the trial's size (>= 16 KiB, so the caller-thread
hierarchical path takes them); after a warm-up it records stats()["hier_collectives"] (the path was
taken), then after a random delay the victim rank sends itself SIGKILL or SIGSTOP, noting the moment
first. The survivors record when and how their allreduce failed, time their shutdown, and exit. Not a
test file: it only runs under mpirun."""
import json
import os
import sys

import numpy as np
from mpi4py import MPI

from _failure_trial import arm_victim, run_until_error, shut_down_and_write

out_dir, t = sys.argv[1], json.loads(sys.argv[2])
world = MPI.COMM_WORLD
rank = world.Get_rank()
victim = rank == t["victim"]
import aimass  # noqa: E402
import aimass.dist as dist  # noqa: E402

dist.init(timeout=t["timeout"])
n = max(1, t["bytes"] // 4)
x = np.empty(n, np.float32)
want = float(sum(1 + r for r in range(world.Get_size())))
path = os.path.join(out_dir, f"rank{rank}.{'victim' if victim else 'survivor'}.json")


def step(i):
    x.fill(1.0 + rank)
    dist.allreduce_(x, op="sum", name=f"h{i}")
    if x[0] != want or x[-1] != want:
        raise AssertionError(f"wrong result {x[0]} != {want}")


world.Barrier()
for i in range(3):  # warm-up: the job works before the failure
    step(i)
st = dist.stats()
record = {"pid": os.getpid(), "error": None, "local_size": dist.local_size(),
          "hier_warmup": st["hier_collectives"], "fallbacks_warmup": st["hier_fallbacks"],
          "staged_warmup": st["hier_staged"]}
world.Barrier()
if victim:
    arm_victim(path, record, t)
run_until_error(step, record, aimass)
if victim:  # only a signal that did not stop this rank gets here (it should not)
    sys.exit(0)
try:
    record["hier_error"] = dist.stats()["hier_collectives"]
except Exception as e:  # noqa: BLE001 - reported, not raised: the timing above is what counts
    record["hier_error"] = f"stats() raised {type(e).__name__}: {e}"
shut_down_and_write(dist, path, record)
