"""`mpirun -np N aimass tune`: the ranks run each trial together (rank 0 asks Optuna and
broadcasts the parameters; pruning decisions are broadcast too)."""
import os

import numpy as np
import pytest

pytest.importorskip("optuna")
torch = pytest.importorskip("torch")


@pytest.mark.timeout(240, method="thread")
def test_tune_data_parallel(dist, shared_dir, monkeypatch):
    from aimass import config
    from aimass.train import tune
    root = shared_dir("tune")
    monkeypatch.setenv("AIMASS_HOME", os.path.join(root, "home"))
    torch.set_num_threads(1)
    if dist.rank() == 0:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((200, 4)).astype(np.float32)
        np.savez(os.path.join(root, "d.npz"), x=x, label=(x[:, 0] > 0).astype(np.int64))
        with open(os.path.join(root, "c.yml"), "w") as f:
            f.write("data_path: d.npz\nsplitting: {train: 70, valid: 15, test: 15}\n"
                    "model: {kind: logreg}\ntrain: {epochs: 2, progress: false}\n"
                    "search: {trials: 3, params: {lr: {type: log_uniform, low: 0.01, high: 1.0}}}\n")
    dist.barrier(name="tune.written")
    r = tune.run(config.load(os.path.join(root, "c.yml")), log=lambda *a: None)
    if dist.rank() == 0:
        assert r["trials"] == 3 and 0.01 <= r["best_params"]["lr"] <= 1.0
    else:
        assert r is None
    dist.barrier(name="tune.checked")
