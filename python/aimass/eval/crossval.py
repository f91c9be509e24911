"""k-fold cross-validation of the config's model on its train + valid records."""
from __future__ import annotations

from typing import Callable

import numpy as np


def kfold(cfg, k: int = 5, epochs=None, log: Callable = print) -> dict:
    """Train k models, each on k-1 folds of train+valid (stratified, seeded) and score it on the
    held-out fold. Returns {"k", "accuracy": [per fold], "mean", "std"}."""
    import torch
    import torch.nn.functional as F
    from sklearn.model_selection import StratifiedKFold

    from .. import data
    from ..train import Trainer, models, pipeline
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"kfold: k must be an int >= 2, got {k!r}")
    ds_path = pipeline.prepare_data(cfg, log)
    info = pipeline.dataset_info(ds_path, cfg)
    ds = data.open(ds_path)
    idx = np.sort(np.concatenate([data.open_split(ds_path, s).indices for s in ("train", "valid")
                                  if s in ds._index.get("splits", {})]))
    y = ds.column(info["label"]).reshape(len(ds), -1)[:, 0][idx]
    tf = [data.Cast(info["input"], "float32", info["scale"])]
    accs = []
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=cfg.train.seed)
    for i, (tr, va) in enumerate(folds.split(idx, y)):
        torch.manual_seed(cfg.train.seed + i)
        spec = models.spec_from(cfg.model, info["shape"], info["classes"], info["input"], info["label"],
                                info["scale"], info["nhwc"])
        model = models.build(spec)
        opt = pipeline.make_optimizer(cfg.train, model.parameters())
        ltr = data.Loader(ds.subset(idx[tr]), batch_size=cfg.train.batch_size, seed=cfg.train.seed, transforms=tf,
                          output="torch")
        lva = data.Loader(ds.subset(idx[va]), batch_size=cfg.eval.batch_size, shuffle=False, transforms=tf,
                          output="torch")
        t = Trainer(model, opt, F.cross_entropy, ltr, epochs=epochs or cfg.train.epochs, progress=False,
                    batch_fn=pipeline.batch_fn(info))
        t.fit()
        accs.append(t.evaluate(lva)["accuracy"])
        log(f"fold {i + 1}/{k}: accuracy {accs[-1]:.4f}")
    return {"k": k, "accuracy": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs))}
