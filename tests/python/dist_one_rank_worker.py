"""aimass.dist in a job of one rank (run by test_dist_one_rank.py in a process of its own, as
`python train.py` without mpirun runs): every collective's result is this rank's own data, made in
the caller's thread. Prints one JSON line of what it saw; the test asserts on it."""
import json

import numpy as np
import torch

import aimass.dist as d

d.init()
out = {"size": d.size(), "rank": d.rank()}
rng = np.random.default_rng(0)
x = rng.standard_normal((3, 5)).astype(np.float32)

# allreduce, every op, a new array and in place, numpy and torch
for op in ("sum", "average", "min", "max", "product"):
    r = d.allreduce(x, op=op, name=f"ar.{op}")
    out[f"allreduce_{op}"] = bool(np.array_equal(r, x)) and r is not x
y = x.copy()
out["allreduce_inplace_same_object"] = d.allreduce_(y, op="sum", name="ar.inplace") is y and bool(np.array_equal(y, x))
ints = np.arange(-7, 8, dtype=np.int32)
out["int_average"] = bool(np.array_equal(d.allreduce(ints, name="ar.int"), ints))
flags = np.array([True, False, True])
out["bool_sum"] = bool(np.array_equal(d.allreduce(flags, op="sum", name="ar.bool"), flags))
t = torch.from_numpy(x.copy())
rt = d.allreduce(t, name="ar.torch")
out["torch_allreduce"] = isinstance(rt, torch.Tensor) and bool(torch.equal(rt, t))
# compression: the value as the wire carries it
wide = (rng.standard_normal(1000) * 1e3).astype(np.float32)
got16 = d.allreduce(wide, op="sum", name="ar.fp16", compression=d.Compression.fp16)
out["fp16_is_rounded_like_numpy"] = bool(np.array_equal(got16, wide.astype(np.float16).astype(np.float32)))
out["fp16_changed_something"] = bool(not np.array_equal(got16, wide))
# async: done when submitted
z = x.copy()
h = d.allreduce_async_(z, op="sum", name="ar.async")
out["async_poll"] = bool(d.poll(h))
out["async_result"] = bool(np.array_equal(d.synchronize(h), x))
hs = [d.allreduce_async_(np.full(4, float(i), np.float32), op="sum", name=f"ar.many.{i}") for i in range(50)]
out["async_many"] = all(np.array_equal(d.synchronize(h), np.full(4, float(i))) for i, h in enumerate(hs))
g = d.grouped_allreduce([x, ints], op="sum", name="grouped")
out["grouped"] = bool(np.array_equal(g[0], x) and np.array_equal(g[1], ints))
# broadcast from the only rank; another root is a clear error
b = x.copy()
out["broadcast_inplace"] = bool(np.array_equal(d.broadcast_(b, 0, name="bc"), x))
out["broadcast_new"] = bool(np.array_equal(d.broadcast(x, 0, name="bc.new"), x))
try:
    d.broadcast(x, 1, name="bc.bad")
    out["broadcast_bad_root"] = "no error"
except Exception as e:  # noqa: BLE001 - the type is what the test checks
    out["broadcast_bad_root"] = type(e).__name__
# allgather / reduce_scatter: this rank's rows are all the rows
ag = d.allgather(x, name="ag")
out["allgather"] = [list(ag.shape), bool(np.array_equal(ag, x))]
ag0 = d.allgather(np.float32(2.5), name="ag.scalar")
out["allgather_scalar"] = [list(np.asarray(ag0).shape), float(np.asarray(ag0).reshape(-1)[0])]
agt = d.allgather(torch.arange(6).reshape(2, 3), name="ag.torch")
out["allgather_torch"] = isinstance(agt, torch.Tensor) and agt.tolist() == [[0, 1, 2], [3, 4, 5]]
h = d.allgather_async(x, name="ag.async")
out["allgather_async"] = bool(np.array_equal(d.synchronize(h), x))
rs = d.reduce_scatter(x, op="average", name="rs")
out["reduce_scatter"] = [list(rs.shape), bool(np.array_equal(rs, x))]
a2a = d.alltoall(x, name="a2a")
out["alltoall"] = bool(np.array_equal(np.asarray(a2a), x))
d.barrier()
# DistributedOptimizer on one rank: the same steps as the optimizer it wraps
torch.manual_seed(0)
m1 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
m2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
m2.load_state_dict(m1.state_dict())
o1 = d.DistributedOptimizer(torch.optim.SGD(m1.parameters(), lr=0.1), named_parameters=m1.named_parameters())
o2 = torch.optim.SGD(m2.parameters(), lr=0.1)
xb, yb = torch.randn(32, 8), torch.randint(0, 3, (32,))
for _ in range(5):
    for m, o in ((m1, o1), (m2, o2)):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(xb), yb).backward()
        o.step()
out["optimizer_same_weights"] = all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
# none of it went through the engine's background thread (its round trip took 22-65 us a call)
st = d.stats()
out["engine_requests"] = st["fused_tensors"] + st["cache_hits"] + st["full_rounds"]
d.shutdown()
try:
    d.allreduce(x, name="after")
    out["after_shutdown"] = "no error"
except Exception as e:  # noqa: BLE001
    out["after_shutdown"] = type(e).__name__
print(json.dumps(out))
