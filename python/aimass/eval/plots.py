"""PNG figures of a report, drawn with matplotlib (Agg backend, no display needed)."""
from __future__ import annotations

from typing import List, Sequence

from .._io import atomic_path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _plt().close(fig)
    return path


def training_curves(history: List[dict], path: str) -> str:
    """Loss and accuracy per epoch (train and validation) from Trainer.history / metrics.jsonl."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ep = [r["epoch"] for r in history]
    for key, ax in (("loss", a1), ("accuracy", a2)):
        for split in ("train", "val"):
            k = f"{split}_{key}"
            if any(k in r for r in history):
                ax.plot(ep, [r.get(k) for r in history], marker="o", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def confusion_matrix(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: str, title: str = "") -> str:
    import numpy as np
    plt = _plt()
    cm = np.asarray(cm)
    n = len(cm)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n))
    ax.imshow(cm, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(n), class_names, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def tradeoff(rows: List[dict], path: str) -> str:
    """Accuracy against file size, marker area by latency, one point per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    lat = [r.get("latency_p50_ms") or 0.0 for r in rows]
    top = max(lat) or 1.0
    for r, l in zip(rows, lat):
        ax.scatter(r["size_bytes"] / 1024, r["accuracy"], s=40 + 400 * l / top, alpha=0.6)
        ax.annotate(f"{r['name']}\n{l * 1e3:.1f} us", (r["size_bytes"] / 1024, r["accuracy"]), fontsize=7,
                    xytext=(5, 5), textcoords="offset points")
    ax.set_xlabel("model file size (KiB)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs size (marker area: batch latency)", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)
