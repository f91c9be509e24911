"""Logistic regression, binary and multiclass, on CSVs through aimass's data pipeline.

scikit-learn's bundled breast-cancer (binary, 569 rows) and iris (3 classes, 150 rows) sets
are written as CSV files, converted with aimass.data.from_csv, split 70/15/15, trained with
aimass.train.Trainer and scored with aimass.eval. No download.

    python3 examples/logistic_regression.py [--out DIR] [--epochs N]
"""
import argparse
import csv
import json
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from aimass import data, eval as aeval, train


def write_csv(path, x, y, names):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(names) + ["label"])
        for row, label in zip(x, y):
            w.writerow([f"{v:.6g}" for v in row] + [int(label)])


def fit(name, x, y, out, epochs):
    # standardised features (a Linear layer learns poorly from raw scales that differ by 1000x)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    write_csv(os.path.join(out, f"{name}.csv"), x, y, [f"f{i}" for i in range(x.shape[1])])
    ds = data.from_csv(os.path.join(out, f"{name}.csv"), os.path.join(out, name), label="label", overwrite=True)
    splits = data.split(ds, config={"splitting": {"train": 70, "valid": 15, "test": 15}}, seed=0, stratify=True)
    tf = []
    n_classes = int(ds.column("label").max()) + 1
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], n_classes)  # logistic regression: softmax over one linear map
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tr = train.Trainer(model, opt, F.cross_entropy,
                       data.Loader(splits.train, batch_size=32, transforms=tf, output="torch"),
                       data.Loader(splits.valid, batch_size=256, shuffle=False, transforms=tf, output="torch"),
                       epochs=epochs, progress=False)
    tr.fit()
    test = next(iter(data.Loader(splits.test, batch_size=len(splits.test), shuffle=False, transforms=tf)))
    with torch.no_grad():
        logits = model(torch.from_numpy(test["x"])).numpy()
    m = aeval.classification_metrics(test["label"], logits)
    return {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"], "roc_auc_ovr": m["roc_auc_ovr"],
            "classes": n_classes, "test_rows": m["samples"]}


def main():
    from sklearn.datasets import load_breast_cancer, load_iris
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="working folder (default: a temporary one)")
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    out = args.out or tempfile.mkdtemp(prefix="aimass-logreg-")
    os.makedirs(out, exist_ok=True)
    b, i = load_breast_cancer(), load_iris()
    result = {"binary": fit("breast_cancer", b.data, b.target, out, args.epochs),
              "multiclass": fit("iris", i.data, i.target, out, args.epochs)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
