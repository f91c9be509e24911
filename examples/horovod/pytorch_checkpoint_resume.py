"""Checkpoint and resume in the Horovod style: rank 0 writes the checkpoint, every rank
learns where to resume with broadcast_object, and the weights and optimizer state come
from rank 0 with broadcast_parameters / broadcast_optimizer_state.

    mpirun -np 2 python examples/horovod/pytorch_checkpoint_resume.py --dir /tmp/ckpt --epochs 4
"""
import argparse
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

import aimass.dist as hvd


def make_data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=g)
    y = x @ torch.linspace(-1, 1, 10).unsqueeze(1) + 0.1 * torch.randn(256, 1, generator=g)
    return x, y


def save_atomic(obj, path):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".ckpt.")
    with os.fdopen(fd, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--stop-after", type=int, default=None, help="simulate a crash after this epoch")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    hvd.init()
    torch.manual_seed(args.seed + hvd.rank())  # different on purpose: the broadcasts must fix it
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01 * hvd.size())

    ckpt = os.path.join(args.dir, "checkpoint.pt")
    resume_from_epoch = 0
    if hvd.rank() == 0 and os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        resume_from_epoch = state["epoch"]
    resume_from_epoch = hvd.broadcast_object(resume_from_epoch, root_rank=0, name="resume_from_epoch")
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())

    x, y = make_data(args.seed)
    per = x.shape[0] // hvd.size()
    xs, ys = x[hvd.rank() * per:(hvd.rank() + 1) * per], y[hvd.rank() * per:(hvd.rank() + 1) * per]
    for epoch in range(resume_from_epoch, args.epochs):
        for i in range(0, per, 16):
            optimizer.zero_grad()
            F.mse_loss(model(xs[i:i + 16]), ys[i:i + 16]).backward()
            optimizer.step()
        if hvd.rank() == 0:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1}, ckpt)
        hvd.barrier()
        if args.stop_after is not None and epoch + 1 >= args.stop_after:
            break
    optimizer.remove_hooks()
    return resume_from_epoch, model


if __name__ == "__main__":
    main()
