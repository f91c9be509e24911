"""Gradient clipping with Horovod's synchronize() / skip_synchronize() pattern: the
clipping sees the averaged gradients, and step() does not reduce them a second time.

    mpirun -np 2 python examples/horovod/pytorch_grad_clip.py
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import aimass.dist as hvd


def parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--clip", type=float, default=0.5)
    p.add_argument("--batches-per-allreduce", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    hvd.init()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         backward_passes_per_step=args.batches_per_allreduce)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    g = torch.Generator().manual_seed(100 + hvd.rank())
    norms = []
    for _ in range(args.steps):
        optimizer.zero_grad()
        for _ in range(args.batches_per_allreduce):
            x, y = 10 * torch.randn(8, 20, generator=g), torch.randint(0, 2, (8,), generator=g)
            F.cross_entropy(model(x), y).backward()
        optimizer.synchronize()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)))
        with optimizer.skip_synchronize():
            optimizer.step()
    optimizer.remove_hooks()
    return model, norms


if __name__ == "__main__":
    main()
