"""The first part of `aimass demo --kernels`: data -> training -> compression -> serving.

It makes a small synthetic cat/dog image set (8x8x3 uint8; the classes differ in
colour, with noise, duplicates and bad labels mixed in), cleans it, writes it as
records, splits it 70/15/15 from a `config.yml`, trains a torch MLP from the native
Loader with aimass.dist's DistributedOptimizer (one rank, or N under `mpirun -np N`),
exports it fp32 and int8 to `.aimass` files, and serves both through a batching
Session, printing accuracy and latency. Everything lives in a temporary folder.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np


def _images(n: int, rng: np.random.Generator):
    """Class 0 ('cat') is redder, class 1 ('dog') bluer; noise makes it a real (if easy) task."""
    y = rng.integers(0, 2, n)
    base = rng.normal(128, 50, (n, 8, 8, 3))
    shift = np.where(y[:, None, None, None] == 0, [[[[6, 0, -6]]]], [[[[-6, 0, 6]]]])
    x = np.clip(base + shift, 0, 255).astype(np.uint8)
    return x, y.astype(np.int64)


def run(n: int = 6000, epochs: int = 3, seed: int = 0, log=print) -> dict:
    import torch

    from .. import data, dist, runtime

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    dist.init()
    rank, world = dist.rank(), dist.size()
    out = {"ranks": world}
    say = log if rank == 0 else (lambda *a, **k: None)

    # ---- collect + clean: duplicates and out-of-set labels are dropped, with a report
    x, y = _images(n, rng)
    x[:50], y[:50] = x[50:100], y[50:100]  # 50 exact duplicates
    y[100:110] = 7  # labels outside {0, 1}
    with tempfile.TemporaryDirectory(prefix="aimass-demo-") as tmp:
        # every rank works in rank 0's folder (one machine; on several nodes pass a shared path)
        path_codes = np.frombuffer(tmp.encode().ljust(256), np.uint8).astype(np.int32)
        root = bytes(dist.broadcast(path_codes, root=0, name="demo.tmp").astype(np.uint8)).decode().strip()
        ds_dir = os.path.join(root, "catdog")
        if rank == 0:
            cleaned, report = data.clean({"image": x, "label": y}, label="label", classes=[0, 1], verbose=False)
            data.write(ds_dir, cleaned, shard_bytes=64 << 10)
            with open(os.path.join(root, "config.yml"), "w") as f:
                f.write(f"data_path: {ds_dir}\ndownload: false\nsplitting:\n  train: 70\n  valid: 15\n  test: 15\n")
            out["clean_dropped"] = {k: int(v) for k, v in report["dropped"].items() if v}
            say(f"data: {n} rows -> {len(cleaned['label'])} after clean (dropped: {out['clean_dropped']}); "
                f"written to {len(os.listdir(ds_dir)) - 1} shards")
        dist.barrier(name="demo.written")
        splits = data.split(data.open(ds_dir), config=os.path.join(root, "config.yml"), seed=seed,
                            stratify="label", save=(rank == 0))
        say(f"split 70/15/15: train {len(splits.train)}, valid {len(splits.valid)}, test {len(splits.test)}")

        # ---- train from the native loader, gradients averaged by aimass.dist
        tf = [data.Cast("image", "float32", 1 / 255), data.Normalize("image", [0.5] * 3, [0.25] * 3)]
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 128), torch.nn.ReLU(),
                                    torch.nn.Linear(128, 2))
        dist.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = dist.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                        model.named_parameters())
        loader = data.Loader(splits.train, batch_size=64, seed=seed, transforms=tf, output="torch")
        t0, seen = time.perf_counter(), 0
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])
                loss.backward()
                opt.step()
                seen += len(batch["label"])
        train_s = time.perf_counter() - t0
        out["train_samples_per_s"] = seen * world / train_s
        say(f"train: {epochs} epochs on {world} rank(s), {out['train_samples_per_s']:,.0f} samples/s, "
            f"last loss {loss.item():.3f}")

        # ---- evaluate, compress, export and serve (rank 0)
        if rank == 0:
            test = next(iter(data.Loader(splits.test, batch_size=len(splits.test), shuffle=False, transforms=tf,
                                         rank=0, world_size=1)))
            xt, yt = test["image"], test["label"]
            with torch.no_grad():
                out["torch_acc"] = float((model(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean())
            example = (torch.from_numpy(xt[:1]),)
            for kind in ("fp32", "int8"):
                path = os.path.join(root, f"catdog-{kind}.aimass")
                runtime.export(model, example, path, quantize=None if kind == "fp32" else "int8")
                sess = runtime.Session(path)
                name_in = sess.signature["inputs"][0]["name"]
                logits = np.concatenate([sess.run({name_in: xt[i:i + 1]})[sess.signature["outputs"][0]["name"]]
                                         for i in range(len(yt))])
                lat = []
                for i in range(200):
                    t = time.perf_counter()
                    sess.run({name_in: xt[i % len(yt):i % len(yt) + 1]})
                    lat.append(time.perf_counter() - t)
                sess.close()
                out[f"{kind}_acc"] = float((logits.argmax(1) == yt).mean())
                out[f"{kind}_p50_us"] = float(np.median(lat) * 1e6)
                say(f"serve {kind}: {os.path.getsize(path) / 1024:.0f} KiB file, test accuracy "
                    f"{out[f'{kind}_acc']:.3f} (torch {out['torch_acc']:.3f}), batch-1 p50 "
                    f"{out[f'{kind}_p50_us']:.0f} us through Session.run")
        dist.barrier(name="demo.done")
    return out
