"""Data-parallel torch training with aimass.dist, written the way Horovod users write theirs.

    mpirun -np 2 python3 examples/train_distributed.py [--epochs N]

Each rank reads its shard of the data (aimass.data.Loader shards by rank), gradients are
averaged across ranks while backward runs (DistributedOptimizer), rank 0's initial weights
and optimizer state are broadcast to all, and metrics are averaged with allreduce. The
learning rate is scaled by the number of ranks, as Horovod recommends. Runs in one process too.
"""
import argparse
import json
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

import aimass.dist as hvd
from aimass import data


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", help="folder every rank can read (default: rank 0's temporary folder)")
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(hvd.rank())  # different on purpose: broadcast_parameters makes them equal

    # rank 0 writes the dataset; the others read it from the same folder
    out = args.out or (tempfile.mkdtemp(prefix="aimass-dist-") if hvd.rank() == 0 else "")
    codes = np.frombuffer(out.encode().ljust(512), np.uint8).astype(np.int32)
    out = bytes(hvd.broadcast(codes, root=0, name="out_dir").astype(np.uint8)).decode().strip()
    if hvd.rank() == 0:
        from sklearn.datasets import load_digits
        d = load_digits()
        data.write(os.path.join(out, "digits"), {"x": d.data.astype(np.float32) / 16, "label": d.target},
                   overwrite=True)
        data.split(os.path.join(out, "digits"), config={"splitting": {"train": 80, "valid": 20}}, seed=0)
    hvd.barrier(name="written")
    train_ds = data.open_split(os.path.join(out, "digits"), "train")
    valid_ds = data.open_split(os.path.join(out, "digits"), "valid")

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05 * hvd.size(), momentum=0.9)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    loader = data.Loader(train_ds, batch_size=32, seed=0, output="torch")  # this rank's shard
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(batch["x"]), batch["label"])
            loss.backward()
            optimizer.step()
        # validation on this rank's shard, averaged over ranks
        correct = total = 0
        with torch.no_grad():
            for batch in data.Loader(valid_ds, batch_size=256, shuffle=False, output="torch"):
                correct += int((model(batch["x"]).argmax(1) == batch["label"]).sum())
                total += len(batch["label"])
        acc = float(hvd.allreduce(np.array([correct / total]), op="average", name="val_acc")[0])
        if hvd.rank() == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, validation accuracy {acc:.4f}", flush=True)
    # every rank ends with the same weights
    w = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
    spread = float(np.abs(hvd.allgather(w.reshape(1, -1), name="weights") - w).max())
    if hvd.rank() == 0:
        print(json.dumps({"ranks": hvd.size(), "valid_accuracy": acc, "max_weight_difference": spread}))


if __name__ == "__main__":
    main()
