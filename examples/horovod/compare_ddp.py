"""Same-run comparison of the synthetic benchmark's training step: aimass.dist
(DistributedOptimizer, `import aimass.dist as hvd`) against torch DDP over gloo.

    mpirun -np 2 python examples/horovod/compare_ddp.py --model small_cnn --rounds 5

Both run in the same processes on the same model, batch and thread count, in
alternating rounds (so load on the machine hits both alike); prints images/s per rank
of each and their ratio (median over rounds).
"""
import argparse
import socket
import time

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F

# run as a script, its own folder is first on sys.path: the sibling example imports directly
from pytorch_synthetic_benchmark import MODELS

import aimass.dist as hvd


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small_cnn", choices=sorted(MODELS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hvd.init()
    port = hvd.broadcast_object(free_port() if hvd.rank() == 0 else None, root_rank=0)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=hvd.rank(),
                             world_size=hvd.size())

    torch.manual_seed(0)
    data = torch.randn(args.batch_size, 3, 32, 32)
    target = torch.randint(0, 10, (args.batch_size,))

    m_a = MODELS[args.model]()
    opt_a = hvd.DistributedOptimizer(torch.optim.SGD(m_a.parameters(), lr=0.01), m_a.named_parameters())
    m_b = torch.nn.parallel.DistributedDataParallel(MODELS[args.model]())
    opt_b = torch.optim.SGD(m_b.parameters(), lr=0.01)

    def run(model, opt, steps):
        hvd.barrier()
        t = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(data), target).backward()
            opt.step()
        return args.batch_size * steps / (time.perf_counter() - t)

    run(m_a, opt_a, 2)
    run(m_b, opt_b, 2)
    a, b = [], []
    for _ in range(args.rounds):
        a.append(run(m_a, opt_a, args.steps))
        b.append(run(m_b, opt_b, args.steps))
    ra, rb = float(np.median(a)), float(np.median(b))
    if hvd.rank() == 0:
        print(f"model={args.model} batch={args.batch_size} ranks={hvd.size()} threads/rank={args.threads}")
        print(f"aimass.dist: {ra:.1f} img/s per rank (rounds: {', '.join(f'{x:.0f}' for x in a)})")
        print(f"torch DDP (gloo): {rb:.1f} img/s per rank (rounds: {', '.join(f'{x:.0f}' for x in b)})")
        print(f"ratio aimass/DDP: {ra / rb:.2f}")
    opt_a.remove_hooks()
    # Every rank must be done with gloo before any tears it down (rank 0 also hosts the TCP
    # store): a rank that destroys its group while a slower one is still finishing the last
    # DDP allreduce can leave that one hanging (pytorch/pytorch#75097). Seen once at np 3.
    tdist.barrier()
    tdist.destroy_process_group()
    return ra, rb


if __name__ == "__main__":
    main()
