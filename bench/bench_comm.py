"""Collective benchmarks (run under mpirun; ratios against baselines measured in the same run).

    mpirun -np 2 python bench/bench_comm.py [--quick]
    mpirun -np 2 python -m pytest bench/bench_comm.py --benchmark-only   (pytest-benchmark, fixed rounds)

1. allreduce busbw (nccl-tests definition: algbw * 2(n-1)/n) for fp32 buffers 4 KiB..256 MiB:
   aimass.dist.allreduce_ vs mpi4py Allreduce on numpy (the Open MPI wheel) vs torch.distributed gloo.
2. fusion: ResNet-50's 161 gradient tensors submitted at once, aimass fused vs one MPI_Allreduce per tensor.
3. training throughput: an MLP with aimass DistributedOptimizer vs torch DDP (gloo), samples/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))


def resnet50_grad_shapes():
    """The 161 parameter shapes of torchvision's ResNet-50 (conv, batch-norm weight/bias, fc)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (width * 4, width, 1, 1), (width * 4,), (width * 4,)]
            if b == 0:
                shapes += [(width * 4, inplanes, 1, 1), (width * 4,), (width * 4,)]
            inplanes = width * 4
    shapes += [(1000, 2048), (1000,)]
    assert len(shapes) == 161
    return shapes


def setup():
    from mpi4py import MPI
    import aimass.dist as d
    d.init()
    return MPI, MPI.COMM_WORLD, d


def setup_gloo(comm):
    import torch
    import torch.distributed as tdist
    # One rank per core: torch's intra-op threads would only oversubscribe the cores, and their
    # idle spinning after a parallel fill slows whichever collective runs next (aimass or gloo).
    torch.set_num_threads(1)
    if not tdist.is_initialized():
        port = comm.bcast(29500 + (os.getpid() % 2000) if comm.Get_rank() == 0 else None, root=0)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        tdist.init_process_group("gloo", rank=comm.Get_rank(), world_size=comm.Get_size())
    return tdist


def timed(comm, fn, iters, warmup=1, rounds=3):
    """Seconds per call: the best of `rounds` rounds of `iters` calls (the machine is shared, so the best round is
    the least disturbed one; every contender is timed the same way), each round timed on the slowest rank."""
    from mpi4py import MPI
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, comm.allreduce((time.perf_counter() - t0) / iters, op=MPI.MAX))
    return best


def busbw(nbytes, seconds, n):
    return nbytes / seconds * 2 * (n - 1) / n / 1e9


def bench_busbw(MPI, comm, d, tdist, sizes):
    import torch
    n = comm.Get_size()
    rows = []
    for nbytes in sizes:
        count = nbytes // 4
        iters = max(3, min(200, int(2e8 // max(nbytes, 1)) // 10))
        x = np.ones(count, np.float32)
        t_aim = timed(comm, lambda: d.allreduce_(x, op="sum", name="bench.busbw"), iters)
        default_min = d._require_engine().shm_min_bytes
        d.set_shm_min_bytes(None)  # the engine's MPI_Allreduce path, to place the shared-memory threshold
        t_aim_mpi = timed(comm, lambda: d.allreduce_(x, op="sum", name="bench.busbw.mpi"), iters)
        d.set_shm_min_bytes(default_min)
        y = np.ones(count, np.float32)
        t_mpi = timed(comm, lambda: comm.Allreduce(MPI.IN_PLACE, y, op=MPI.SUM), iters)
        z = torch.ones(count, dtype=torch.float32)
        t_gloo = timed(comm, lambda: tdist.all_reduce(z), iters)
        rows.append((nbytes, busbw(nbytes, t_aim, n), busbw(nbytes, t_mpi, n), busbw(nbytes, t_gloo, n),
                     busbw(nbytes, t_aim_mpi, n)))
    return rows


def bench_fusion(MPI, comm, d, iters):
    shapes = resnet50_grad_shapes()
    grads = [np.ones(s, np.float32) for s in shapes]
    total = sum(g.nbytes for g in grads)

    def fused():
        hs = [d.allreduce_async_(g, op="sum", name=f"bench.fusion.{i}") for i, g in enumerate(grads)]
        for h in hs:
            d.synchronize(h)

    def per_tensor():
        for g in grads:
            comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)

    t_fused = timed(comm, fused, iters)
    t_plain = timed(comm, per_tensor, iters)
    return total, t_fused, t_plain


def bench_training(comm, d, tdist, steps):
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(1)
    n = comm.Get_size()
    batch = 64

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                   torch.nn.ReLU(), torch.nn.Linear(1024, 10))

    x, y = torch.randn(batch, 512), torch.randint(0, 10, (batch,))
    m1 = model()
    opt = d.DistributedOptimizer(torch.optim.SGD(m1.parameters(), lr=0.01), m1.named_parameters())

    def step_aimass():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m1(x), y).backward()
        opt.step()

    m2 = torch.nn.parallel.DistributedDataParallel(model())
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.01)

    def step_ddp():
        opt2.zero_grad()
        torch.nn.functional.cross_entropy(m2(x), y).backward()
        opt2.step()

    t_aim = timed(comm, step_aimass, steps, warmup=2)
    t_ddp = timed(comm, step_ddp, steps, warmup=2)
    opt.remove_hooks()
    return batch * n / t_aim, batch * n / t_ddp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few sizes and iterations only")
    args = ap.parse_args(argv)
    MPI, comm, d = setup()
    tdist = setup_gloo(comm)
    n, rank = comm.Get_size(), comm.Get_rank()
    sizes = [4 << 10, 256 << 10, 4 << 20, 64 << 20] if args.quick else [4 << (10 + 2 * i) for i in range(9)]  # 4 KiB .. 256 MiB
    out = print if rank == 0 else (lambda *a, **k: None)
    goal_a = None
    out(f"# aimass bench_comm: {n} ranks, shm path: {d.shm_available()}, load average {os.getloadavg()[0]:.1f} "
        f"(the machine is shared: absolute numbers are noisy, ratios are from the same run)")
    out("busbw GB/s (best of 3 rounds each); 'aimass' picks the shared-memory path from "
        f"{d._require_engine().shm_min_bytes} bytes, 'aimass-mpi' forces its MPI_Allreduce path")
    out(f"{'bytes':>12} {'aimass':>8} {'aimass-mpi':>10} {'mpi4py':>8} {'gloo':>8} {'aimass/mpi4py':>13} "
        f"{'aimass/gloo':>11}")
    for nbytes, a, m, g, am in bench_busbw(MPI, comm, d, tdist, sizes):
        out(f"{nbytes:>12} {a:>8.2f} {am:>10.2f} {m:>8.2f} {g:>8.2f} {a / m:>13.2f} {a / g:>11.2f}")
        if nbytes == 64 << 20:
            goal_a = (a, m, g)
    if goal_a is not None:
        a, m, g = goal_a
        out(f"allreduce 64 MiB fp32: aimass {a:.2f} GB/s busbw, mpi4py {m:.2f}, gloo {g:.2f}: "
            f"aimass/mpi4py {a / m:.2f} (goal >= 3)")
    total, tf, tp = bench_fusion(MPI, comm, d, 3 if args.quick else 10)
    out(f"fusion: ResNet-50 161 tensors ({total / 2**20:.1f} MiB): aimass fused {tf * 1e3:.1f} ms, "
        f"per-tensor MPI_Allreduce {tp * 1e3:.1f} ms, fused/per-tensor {tf / tp:.2f} (goal <= 0.5)")
    sa, sd = bench_training(comm, d, tdist, 10 if args.quick else 40)
    out(f"training MLP: aimass DistributedOptimizer {sa:.0f} samples/s, torch DDP gloo {sd:.0f} samples/s, "
        f"ratio {sa / sd:.2f}")
    out(f"engine stats rank 0: {d.stats()}")
    d.shutdown()
    tdist.destroy_process_group()


# ---- pytest-benchmark entry points (fixed rounds so every rank runs the same number of collectives)

def test_allreduce_64mib_aimass(benchmark):
    MPI, comm, d = setup()
    x = np.ones((64 << 20) // 4, np.float32)
    benchmark.pedantic(lambda: d.allreduce_(x, op="sum", name="pb.64m"), rounds=5, iterations=1, warmup_rounds=1)


def test_allreduce_64mib_mpi4py(benchmark):
    MPI, comm, d = setup()
    x = np.ones((64 << 20) // 4, np.float32)
    benchmark.pedantic(lambda: comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM), rounds=5, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    main()
