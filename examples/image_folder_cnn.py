"""A small CNN on an image folder: generate cat/dog pictures with Pillow, convert the folder
to records with `aimass data convert`, split, train, export to .aimass and serve it through runtime.Session.

The pictures are synthetic (no download): "cat" images carry a warm disc, "dog" images a
cool square, at random places and sizes on a noisy background.

    python3 examples/image_folder_cnn.py [--out DIR] [--epochs N] [--per-class N]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from aimass import data, eval as aeval, runtime, train


def make_folder(root, per_class, size=24, seed=0):
    rng = np.random.default_rng(seed)
    for cls in ("cat", "dog"):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(per_class):
            bg = rng.integers(60, 160, (size, size, 3), dtype=np.uint8)
            im = Image.fromarray(bg)
            dr = ImageDraw.Draw(im)
            r = int(rng.integers(4, 8))
            cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
            if cls == "cat":
                dr.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(230, int(rng.integers(90, 150)), 40))
            else:
                dr.rectangle([cx - r, cy - r, cx + r, cy + r], fill=(40, int(rng.integers(90, 150)), 230))
            im.save(os.path.join(root, cls, f"{i:04d}.png"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="working folder (default: a temporary one)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--per-class", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.out or tempfile.mkdtemp(prefix="aimass-cnn-")
    folder = os.path.join(out, "catdog")
    make_folder(folder, args.per_class)
    # the folder -> records (uint8 [H, W, 3] images, int64 labels, class names in the metadata),
    # with the same command a user types
    records = os.path.join(out, "catdog.records")
    subprocess.run([sys.executable, "-m", "aimass", "data", "convert", folder, records, "--size", "16", "16",
                    "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    ds = data.open(records)
    splits = data.split(ds, config={"splitting": {"train": 70, "valid": 15, "test": 15}}, seed=0, stratify=True)
    tf = [data.Cast("image", "float32", 1 / 255)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 2))

    def nchw(batch):  # records hold HWC pixels; torch convolutions take NCHW
        return batch["image"].permute(0, 3, 1, 2).contiguous(), batch["label"]

    tr = train.Trainer(model, torch.optim.Adam(model.parameters(), lr=3e-3), F.cross_entropy,
                       data.Loader(splits.train, batch_size=32, transforms=tf, output="torch"),
                       data.Loader(splits.valid, batch_size=128, shuffle=False, transforms=tf, output="torch"),
                       epochs=args.epochs, batch_fn=nchw, checkpoint_dir=os.path.join(out, "run"), progress=False)
    tr.fit()
    path = runtime.export(model, (torch.zeros(1, 3, 16, 16),), os.path.join(out, "catdog-cnn.aimass"))
    x = np.ascontiguousarray(splits.test.column("image").transpose(0, 3, 1, 2), dtype=np.float32) / 255
    y = splits.test.column("label").reshape(-1)
    with runtime.Session(path) as sess:  # serve: one request per image, batched by the Session
        name = sess.signature["inputs"][0]["name"]
        futures = [sess.submit({name: x[i:i + 1]}) for i in range(len(x))]
        logits = np.concatenate([next(iter(f.result().values())) for f in futures])
    m = aeval.classification_metrics(y, logits, class_names=ds.metadata["classes"])
    print(json.dumps({"classes": ds.metadata["classes"], "images": len(ds), "test_accuracy": m["accuracy"],
                      "roc_auc": m["roc_auc_ovr"], "model": path, "served_requests": len(x)}))


if __name__ == "__main__":
    main()
