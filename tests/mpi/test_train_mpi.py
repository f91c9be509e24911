"""The Trainer data-parallel: resume mid-epoch is bitwise exact at N ranks, every rank ends with
the same weights, the checkpoint is written once (by rank 0) into the shared folder."""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from _train_helpers import make_trainer, same_weights, write_task  # noqa: E402


@pytest.mark.timeout(180, method="thread")
def test_resume_is_bitwise_exact_across_ranks(dist, shared_dir):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    root = shared_dir("train")
    if dist.rank() == 0:
        write_task(root, n=240)
    dist.barrier(name="train.written")
    ds = os.path.join(root, "ds")
    full, m_full = make_trainer(ds, os.path.join(root, "a"), epochs=2, checkpoint_every=3)
    full.fit()
    steps = full.step
    cut, _ = make_trainer(ds, os.path.join(root, "b"), stop_at=steps // 2 + 1, epochs=2, checkpoint_every=3)
    cut.fit()
    again, m_again = make_trainer(ds, os.path.join(root, "b"), epochs=2, checkpoint_every=3)
    again.fit(resume=True)
    assert same_weights(m_full, m_again)
    # every rank holds the same weights (gradients were averaged)
    w = np.concatenate([p.detach().numpy().ravel() for p in m_full.parameters()])
    everyone = np.asarray(dist.allgather(w.reshape(1, -1), name="train.w"))
    assert (everyone == w).all()
    assert full.history[-1]["val_accuracy"] > 0.65  # learned (chance is ~0.5), few steps at 4 ranks
    # a checkpoint written by N ranks refuses a different world size
    if dist.size() > 1:
        from aimass import train
        state = train.load_checkpoint(os.path.join(root, "a"))
        assert state["world_size"] == dist.size() and len(state["ranks"]) == dist.size()
    dist.barrier(name="train.done")


@pytest.mark.timeout(180, method="thread")
def test_aimass_train_command_under_mpirun(dist, shared_dir, capsys):
    import json

    from aimass import cli
    torch.set_num_threads(1)
    root = shared_dir("cmd")
    if dist.rank() == 0:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((200, 4)).astype(np.float32)
        np.savez(os.path.join(root, "d.npz"), x=x, label=(x[:, 0] > 0).astype(np.int64))
        with open(os.path.join(root, "c.yml"), "w") as f:
            f.write("data_path: d.npz\nsplitting: {train: 70, valid: 15, test: 15}\n"
                    "model: {kind: logreg}\ntrain: {epochs: 4, batch_size: 8, lr: 0.2, progress: false}\n")
    dist.barrier(name="cmd.written")
    assert cli.main(["train", os.path.join(root, "c.yml")]) == 0
    out = capsys.readouterr().out
    if dist.rank() == 0:  # rank 0 reports and writes; the others only train
        r = json.loads(out)
        assert r["test"]["accuracy"] > 0.8 and os.path.isfile(r["aimass"])
        rows = [json.loads(line) for line in open(r["metrics"])]
        assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    dist.barrier(name="cmd.checked")
