"""aimass.train: exact resume, checkpoints, metrics.jsonl, distillation loss, Trainer errors."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _train_helpers import make_trainer, same_weights, write_task  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(n)


@pytest.mark.parametrize("stop_at", [7, 15, 20])  # mid-epoch, mid-epoch after an epoch end, right at one
def test_resume_mid_epoch_gives_bitwise_the_same_weights(tmp_path, stop_at):
    ds = write_task(str(tmp_path))
    full, m_full = make_trainer(ds, str(tmp_path / "a"))
    full.fit()
    cut, _ = make_trainer(ds, str(tmp_path / "b"), stop_at=stop_at)
    cut.fit()
    assert cut.step == stop_at and cut.epoch < 3
    again, m_again = make_trainer(ds, str(tmp_path / "b"))
    again.fit(resume=True)
    assert same_weights(m_full, m_again)
    assert again.history == [{**r, "samples_per_s": r2["samples_per_s"]} for r, r2 in zip(full.history, again.history)]
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # each epoch once, none repeated by the resume


def test_resume_without_checkpoint_starts_fresh_and_resume_after_the_end_is_a_no_op(tmp_path):
    ds = write_task(str(tmp_path))
    tr, m = make_trainer(ds, str(tmp_path / "c"), epochs=1)
    tr.fit(resume=True)  # nothing to resume: trains from scratch
    assert tr.epoch == 1 and len(tr.history) == 1
    tr2, m2 = make_trainer(ds, str(tmp_path / "c"), epochs=1)
    tr2.fit(resume=True)
    assert same_weights(m, m2) and tr2.step == tr.step


def test_checkpoint_is_checked_against_its_sha256(tmp_path):
    import aimass
    from aimass import train
    ds = write_task(str(tmp_path))
    tr, _ = make_trainer(ds, str(tmp_path / "d"), epochs=1)
    tr.fit()
    man = train.latest_checkpoint(str(tmp_path / "d"))
    assert man["step"] == tr.step and len(man["sha256"]) == 64
    assert not [f for f in os.listdir(tmp_path / "d") if f.endswith(".tmp")]  # no temporaries left behind
    p = tmp_path / "d" / man["file"]
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))
    tr2, _ = make_trainer(ds, str(tmp_path / "d"), epochs=2)
    with pytest.raises(aimass.CorruptDataError, match="sha256"):
        tr2.fit(resume=True)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    ds = write_task(str(tmp_path))
    tr, _ = make_trainer(ds, str(tmp_path / "e"), checkpoint_every=2)
    tr.fit()
    assert len([f for f in os.listdir(tmp_path / "e") if f.startswith("ckpt-")]) == 2


def test_distill_loss_matches_a_hand_computed_value():
    from aimass.train import distill_loss
    s = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    t = np.array([[3.0, 2.0, 1.0], [0.0, 0.0, 4.0]])
    y = np.array([0, 2])
    T, alpha = 2.0, 0.3

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    pt, ps = softmax(t / T), softmax(s / T)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(1).mean() * T * T
    ce = -np.log(softmax(s)[np.arange(2), y]).mean()
    want = alpha * kl + (1 - alpha) * ce
    got = distill_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), temperature=T, alpha=alpha)
    assert float(got) == pytest.approx(want, rel=1e-12)
    # alpha 0 is the task loss alone; identical logits give no KL
    assert float(distill_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), T, 0.0)) == pytest.approx(ce)
    assert float(distill_loss(torch.tensor(s), torch.tensor(s), torch.tensor(y), T, 1.0)) == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), 0.0)
    with pytest.raises(ValueError, match="shape"):
        distill_loss(torch.tensor(s), torch.tensor(t[:, :2]), torch.tensor(y))


def test_trainer_with_a_teacher_uses_the_distillation_loss(tmp_path):
    import torch.nn.functional as F

    from aimass import data, train
    ds = data.open(write_task(str(tmp_path)))
    torch.manual_seed(0)
    teacher = torch.nn.Linear(10, 2)
    student = torch.nn.Linear(10, 2)
    seen = []

    class Spy(train.Callback):
        def on_step_end(self, tr, step, loss):
            seen.append(loss)
    batch = next(iter(data.Loader(ds, batch_size=16, seed=1, output="torch")))
    with torch.no_grad():
        want = float(train.distill_loss(student(batch["x"]), teacher(batch["x"]), batch["label"], 3.0, 0.8))
    tr = train.Trainer(student, torch.optim.SGD(student.parameters(), lr=0.0), F.cross_entropy,
                       data.Loader(ds, batch_size=16, seed=1, output="torch"), epochs=1, callbacks=[Spy()],
                       teacher=teacher, kd_temperature=3.0, kd_alpha=0.8, progress=False)
    tr.fit()
    assert seen[0] == pytest.approx(want, rel=1e-6)


def test_evaluate_and_batch_forms(tmp_path):
    import torch.nn.functional as F

    from aimass import train
    x = torch.randn(20, 4)
    y = (x[:, 0] > 0).long()
    m = torch.nn.Linear(4, 2)
    pairs = [(x[:10], y[:10]), (x[10:], y[10:])]
    tr = train.Trainer(m, torch.optim.SGD(m.parameters(), lr=0.1), F.cross_entropy, pairs, epochs=2, progress=False)
    tr.fit()
    r = tr.evaluate(pairs)
    with torch.no_grad():
        acc = float((m(x).argmax(1) == y).float().mean())
        loss = float(F.cross_entropy(m(x), y))
    assert r["accuracy"] == pytest.approx(acc) and r["loss"] == pytest.approx(loss, rel=1e-6) and r["samples"] == 20


def test_trainer_errors(tmp_path):
    import torch.nn.functional as F

    from aimass import data, train
    m = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        train.Trainer("model", opt, F.cross_entropy, [])
    with pytest.raises(ValueError, match="epochs"):
        train.Trainer(m, opt, F.cross_entropy, [], epochs=0)
    with pytest.raises(ValueError, match="kd_alpha"):
        train.Trainer(m, opt, F.cross_entropy, [], teacher=m, kd_alpha=2)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train.Trainer(m, opt, F.cross_entropy, [], progress=False).fit(resume=True)
    ds = data.open(write_task(str(tmp_path)))
    with pytest.raises(ValueError, match="world size 2"):
        train.Trainer(m, opt, F.cross_entropy, data.Loader(ds, batch_size=4, rank=0, world_size=2))
    bad = [{"a": torch.zeros(2, 4), "b": torch.zeros(2, 4), "label": torch.zeros(2).long()}]
    with pytest.raises(ValueError, match="input_key"):
        train.Trainer(m, opt, F.cross_entropy, bad, progress=False).fit()
    with pytest.raises(KeyError, match="no label field"):
        train.Trainer(m, opt, F.cross_entropy, [{"x": torch.zeros(2, 4)}], progress=False).fit()


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    ds = write_task(str(tmp_path))
    tr, _ = make_trainer(ds, str(tmp_path / "tb"), epochs=2)
    tr.fit()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    ev.Reload()
    assert {"train_loss", "val_accuracy"} <= set(ev.Tags()["scalars"])
    assert [e.step for e in ev.Scalars("val_accuracy")] == [1, 2]
