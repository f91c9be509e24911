"""Classification metrics (scikit-learn's), predictions and latency through runtime.Session."""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(y_true, logits, class_names: Optional[Sequence[str]] = None) -> dict:
    """accuracy; precision, recall, F1 (macro and per class); ROC AUC one-vs-rest (macro);
    confusion matrix (rows: true class, columns: predicted)."""
    from sklearn import metrics as skm
    y_true = np.asarray(y_true).reshape(-1)
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) != len(y_true):
        raise ValueError(f"classification_metrics: logits must be [N, classes] with N = {len(y_true)}, "
                         f"got {logits.shape}")
    n_classes = logits.shape[1]
    labels = np.arange(n_classes)
    y_pred = logits.argmax(1)
    p, r, f, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    pm, rm, fm, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro",
                                                        zero_division=0)
    prob = softmax(logits)
    present = np.unique(y_true)
    try:
        if n_classes == 2:
            auc = float(skm.roc_auc_score(y_true, prob[:, 1]))
        elif len(present) == n_classes:
            auc = float(skm.roc_auc_score(y_true, prob, multi_class="ovr", average="macro", labels=labels))
        else:
            auc = None  # a class absent from y_true has no one-vs-rest curve
    except ValueError:
        auc = None
    names = [str(c) for c in (class_names or labels)]
    return {
        "samples": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision_macro": float(pm), "recall_macro": float(rm), "f1_macro": float(fm),
        "roc_auc_ovr": auc,
        "per_class": {nm: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                           "support": int(support[i])} for i, nm in enumerate(names)},
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": names,
    }


def predict(path: str, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of the .aimass model at `path` for inputs x (one Session, batches of batch_size)."""
    from .. import runtime
    with runtime.Session(path, max_batch_size=max(1, batch_size)) as sess:
        name = sess.signature["inputs"][0]["name"]
        out = sess.signature["outputs"][0]["name"]
        return np.concatenate([np.asarray(sess.run({name: x[i:i + batch_size]})[out])
                               for i in range(0, len(x), batch_size)])


def latency(path: str, x: np.ndarray, batch_size: int = 1, batches: int = 20) -> Dict[str, float]:
    """Per-batch latency of Session.run on the .aimass model at `path` (after one warm-up batch)."""
    from .. import runtime
    if batches < 1:
        raise ValueError(f"latency: batches must be >= 1, got {batches}")
    with runtime.Session(path, max_batch_size=max(1, batch_size)) as sess:
        name = sess.signature["inputs"][0]["name"]
        sess.run({name: x[:batch_size]})
        t = []
        for i in range(batches):
            j = (i * batch_size) % max(1, len(x) - batch_size + 1)
            t0 = time.perf_counter()
            sess.run({name: x[j:j + batch_size]})
            t.append(time.perf_counter() - t0)
    t = np.asarray(t) * 1e3
    return {"batch_size": int(batch_size), "p50_ms": float(np.median(t)), "p95_ms": float(np.percentile(t, 95)),
            "mean_ms": float(t.mean())}
