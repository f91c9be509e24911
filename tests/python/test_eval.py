"""aimass.eval: metrics checked against values computed by hand/numpy and scikit-learn, models
side by side through Session, report.json and its figures, k-fold cross-validation."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_metrics_match_hand_counts_and_scikit_learn():
    from sklearn import metrics as skm

    from aimass.eval import classification_metrics
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    logits = rng.standard_normal((200, 3)) + 2.0 * np.eye(3)[y]
    m = classification_metrics(y, logits, class_names=["a", "b", "c"])
    pred = logits.argmax(1)
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (y, pred), 1)
    assert m["confusion_matrix"] == cm.tolist()
    prec = np.diag(cm) / cm.sum(0)
    rec = np.diag(cm) / cm.sum(1)
    f1 = 2 * prec * rec / (prec + rec)
    assert [m["per_class"][c]["precision"] for c in "abc"] == pytest.approx(prec)
    assert [m["per_class"][c]["recall"] for c in "abc"] == pytest.approx(rec)
    assert m["f1_macro"] == pytest.approx(f1.mean())
    assert m["precision_macro"] == pytest.approx(prec.mean()) and m["recall_macro"] == pytest.approx(rec.mean())
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert m["roc_auc_ovr"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"))
    # one-vs-rest AUC of class 0 by counting pairs, the definition
    pos, neg = p[y == 0, 0], p[y != 0, 0]
    auc0 = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
    assert auc0 == pytest.approx(skm.roc_auc_score(y == 0, p[:, 0]))


def test_binary_auc_and_errors():
    from aimass.eval import classification_metrics
    y = np.array([0, 0, 1, 1])
    # class-1 margins: negatives -2, 1; positives 3, 1 -> 3 of 4 pairs ordered, one tie: AUC 3.5 / 4
    logits = np.array([[2, 0], [0, 1], [0, 3], [1, 2]], float)
    m = classification_metrics(y, logits)
    assert m["roc_auc_ovr"] == pytest.approx(0.875) and m["accuracy"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="logits"):
        classification_metrics(y, np.zeros((3, 2)))


def _export(tmp_path, quantize=None):
    from aimass import runtime
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return m, runtime.export(m, (torch.zeros(1, 6),), str(tmp_path / f"m-{quantize}.aimass"), quantize=quantize)


def test_compare_models_side_by_side_and_write_report(tmp_path):
    from aimass import eval as aeval
    m, fp32 = _export(tmp_path)
    _, int8 = _export(tmp_path, "int8")
    x = np.random.default_rng(1).standard_normal((50, 6)).astype(np.float32)
    with torch.no_grad():
        logits = m(torch.from_numpy(x)).numpy()
    y = logits.argmax(1)
    rows = aeval.compare({"fp32": fp32, "int8": int8}, x, y, batch_size=16, latency_batches=3)
    assert [r["name"] for r in rows] == ["fp32", "int8"]
    assert rows[0]["accuracy"] == 1.0  # the Session answers like torch
    assert rows[1]["size_bytes"] < rows[0]["size_bytes"] and rows[1]["accuracy"] > 0.9
    assert all(r["latency_p50_ms"] > 0 for r in rows)
    text = aeval.table(rows)
    assert "fp32" in text and "int8" in text
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "train_accuracy": 0.5, "val_accuracy": 0.6},
               {"epoch": 2, "train_loss": 0.5, "val_loss": 0.6, "train_accuracy": 0.8, "val_accuracy": 0.7}]
    rep = aeval.write(str(tmp_path / "report"), rows, history)
    saved = json.load(open(rep["path"]))
    assert saved["figure_data"]["training_curves"]["val_loss"] == [0.9, 0.6]
    assert saved["figure_data"]["confusion_matrix"] == rows[0]["confusion_matrix"]
    for f in saved["figures"].values():
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError):
        aeval.compare({"x": str(tmp_path / "missing.aimass")}, x, y)
    with pytest.raises(ValueError, match="no models"):
        aeval.compare({}, x, y)


def test_kfold_cross_validation(tmp_path):
    from aimass import config
    from aimass.eval import kfold
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, label=y)
    (tmp_path / "c.yml").write_text("data_path: d.npz\nsplitting: {train: 70, valid: 15, test: 15}\n"
                                    "model: {kind: logreg}\ntrain: {epochs: 5, lr: 0.5, progress: false}\n")
    cfg = config.load(tmp_path / "c.yml")
    r = kfold(cfg, 3, log=lambda *a: None)
    assert r["k"] == 3 and len(r["accuracy"]) == 3 and r["mean"] > 0.8
    with pytest.raises(ValueError, match="k must be"):
        kfold(cfg, 1)
