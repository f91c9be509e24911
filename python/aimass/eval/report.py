"""Several models side by side on one test set, with figures and report.json."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np

from .._io import atomic_write_text
from . import metrics as _m
from . import plots


def compare(models: Dict[str, str], x: np.ndarray, y: np.ndarray, class_names=None, batch_size: int = 256,
            latency_batches: int = 20, latency_batch_size: int = 1) -> List[dict]:
    """One row per .aimass model (name -> path): size, accuracy, precision/recall/F1 macro, ROC AUC,
    confusion matrix, per-class metrics and Session latency per batch."""
    if not models:
        raise ValueError("compare: no models given")
    rows = []
    for name, path in models.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model {name!r}: {path} does not exist")
        logits = _m.predict(path, x, batch_size)
        row = {"name": name, "path": os.path.abspath(path), "size_bytes": os.path.getsize(path),
               **_m.classification_metrics(y, logits, class_names)}
        lat = _m.latency(path, x, batch_size=latency_batch_size, batches=latency_batches)
        row["latency_p50_ms"], row["latency_p95_ms"] = lat["p50_ms"], lat["p95_ms"]
        row["latency_batch_size"] = lat["batch_size"]
        rows.append(row)
    return rows


def table(rows: List[dict]) -> str:
    """A plain-text table of the comparison (latency: median Session.run per batch, microseconds)."""
    head = f"{'model':<16}{'size KiB':>10}{'accuracy':>10}{'F1 macro':>10}{'AUC':>8}{'p50 us':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        auc = f"{r['roc_auc_ovr']:.4f}" if r.get("roc_auc_ovr") is not None else "-"
        lines.append(f"{r['name']:<16}{r['size_bytes'] / 1024:>10.1f}{r['accuracy']:>10.4f}{r['f1_macro']:>10.4f}"
                     f"{auc:>8}{r['latency_p50_ms'] * 1e3:>9.1f}")
    return "\n".join(lines)


def write(out_dir: str, rows: List[dict], history: Optional[List[dict]] = None, kfold: Optional[dict] = None,
          extra: Optional[dict] = None) -> dict:
    """PNGs (training curves, confusion matrix of the first model, accuracy vs size vs latency) and
    report.json holding the same data the figures draw, written atomically into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    figures = {}
    if history:
        figures["training_curves"] = plots.training_curves(history, os.path.join(out_dir, "training_curves.png"))
    if rows:
        first = rows[0]
        figures["confusion_matrix"] = plots.confusion_matrix(
            first["confusion_matrix"], first["class_names"], os.path.join(out_dir, "confusion_matrix.png"),
            title=f"{first['name']} (test)")
        figures["tradeoff"] = plots.tradeoff(rows, os.path.join(out_dir, "accuracy_size_latency.png"))
    report = {"models": rows, "history": history or [], "kfold": kfold, "figures": figures,
              "figure_data": {
                  "training_curves": {k: [r.get(k) for r in history or []]
                                      for k in ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")},
                  "confusion_matrix": rows[0]["confusion_matrix"] if rows else None,
                  "tradeoff": [{k: r[k] for k in ("name", "size_bytes", "accuracy", "latency_p50_ms")} for r in rows]},
              **(extra or {})}
    path = os.path.join(out_dir, "report.json")
    atomic_write_text(path, json.dumps(report, indent=1))
    report["path"] = path
    return report
