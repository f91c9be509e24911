"""Shared by test_train.py and tests/mpi/test_train_mpi.py: a tiny seeded task and a Trainer
that can be stopped at a given step."""
import os

import numpy as np


def write_task(root: str, n: int = 240) -> str:
    from aimass import data
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 10)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    path = os.path.join(root, "ds")
    data.write(path, {"x": x, "label": y}, overwrite=True)
    return path


def make_trainer(ds_path: str, ckpt, stop_at=None, epochs: int = 3, checkpoint_every: int = 4):
    import torch
    import torch.nn.functional as F

    from aimass import data, train
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 30)
    ds = data.open(ds_path)
    ld = data.Loader(ds, batch_size=16, seed=1, output="torch")

    class Stop(train.Callback):
        def on_step_end(self, tr, step, loss):
            if stop_at is not None and step == stop_at:
                tr.stop_training = True

    tr = train.Trainer(m, opt, F.cross_entropy, ld, data.Loader(ds, batch_size=64, shuffle=False, output="torch"),
                       epochs=epochs, checkpoint_dir=ckpt, checkpoint_every=checkpoint_every, scheduler=sched,
                       callbacks=[Stop()], progress=False)
    return tr, m


def same_weights(a, b) -> bool:
    import torch
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
