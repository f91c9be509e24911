"""An MNIST-style MLP on scikit-learn's bundled digits, driven by a config.yml.

The same steps as ``aimass train config.yml`` then ``aimass eval config.yml``, from Python:
the config names the data, the split, the model and the training; aimass converts, cleans
and splits the data, trains with checkpoints and metrics.jsonl, exports model.aimass and
scores it through runtime.Session. Under ``mpirun -np 2`` the training is data-parallel.

    python3 examples/mnist_mlp.py [--out DIR] [--epochs N]
"""
import argparse
import json
import os
import tempfile

import numpy as np

from aimass import config
from aimass.eval import cli as eval_cli
from aimass.train import pipeline

CONFIG = """\
data_path: digits.npz
download: false
splitting: {{train: 70, valid: 15, test: 15}}
data: {{format: npy, input: x, label: label, classes: 10, scale: 0.0625}}
model: {{kind: mlp, hidden: [128, 64]}}
train: {{epochs: {epochs}, batch_size: 32, optimizer: adam, lr: 0.003, schedule: cosine, checkpoint_dir: run}}
"""


def main():
    import torch
    from sklearn.datasets import load_digits
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="working folder (default: a temporary one)")
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a small MLP: one thread per process is fastest
    out = args.out or tempfile.mkdtemp(prefix="aimass-mlp-")
    os.makedirs(out, exist_ok=True)
    d = load_digits()
    np.savez(os.path.join(out, "digits.npz"), x=d.images.astype(np.uint8), label=d.target.astype(np.int64))
    with open(os.path.join(out, "config.yml"), "w") as f:
        f.write(CONFIG.format(epochs=args.epochs))
    cfg = config.load(os.path.join(out, "config.yml"))
    r = pipeline.run(cfg, progress=False, log=lambda *a: None)
    rep = eval_cli.run(cfg, log=lambda *a: None)
    if rep:
        fp32 = rep["models"][0]
        print(json.dumps({"torch_test_accuracy": r["test"]["accuracy"], "session_test_accuracy": fp32["accuracy"],
                          "f1_macro": fp32["f1_macro"], "report": rep["path"], "model": r["aimass_path"]}))


if __name__ == "__main__":
    main()
