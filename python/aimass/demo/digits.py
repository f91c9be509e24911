"""`aimass demo`: the platform end to end on scikit-learn's bundled handwritten digits.

1,797 8x8 images (no download). The demo writes a config.yml, converts and cleans the
data (a few planted duplicates and bad labels are dropped, with a report), splits it
70/15/15, trains an MLP with progress bars (data-parallel under ``mpirun -np 2``),
prunes it 2:4, quantizes it int8 and int4, distills a smaller student, evaluates all
of them side by side (accuracy, F1, ROC AUC, latency through runtime.Session), pushes
fp32 (label stable) and int8 (canary) to a registry, starts `aimass serve` on a free
loopback port and asks it through the KServe v2 and TF-Serving routes with a token,
reads its metrics, stops it, and prints a summary table and where the report is.
Everything stays in --out (default AIMASS_HOME/demo).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import numpy as np

CONFIG = """\
# written by 'aimass demo': scikit-learn's handwritten digits (8x8, values 0..16)
data_path: raw/digits.npz
download: false
splitting:
  train: 70
  valid: 15
  test: 15
data:
  format: npy
  input: x
  label: label
  classes: 10
  scale: 0.0625
model:
  kind: mlp
  hidden: [128, 64]
train:
  epochs: {epochs}
  batch_size: 32
  optimizer: adam
  lr: 0.003
  schedule: cosine
  seed: 0
  checkpoint_dir: run
compress:
  prune: {{method: "n:m", n: 2, m: 4}}
  quantize: {{bits: 8}}
  distill: {{temperature: 4.0, alpha: 0.7, hidden: [32], epochs: {epochs}}}
eval:
  kfold: {kfold}
  latency_batches: {latency_batches}
registry:
  store: registry
  name: digits
  label: stable
serve:
  host: 127.0.0.1
  port: 0
"""


def _write_raw(path: str, seed: int) -> dict:
    """digits as uint8 images plus 20 planted exact duplicates and 5 labels outside 0..9."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = d.images.astype(np.uint8)  # [1797, 8, 8], values 0..16
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    dup = rng.choice(len(x), 20, replace=False)
    bad = rng.choice(len(x), 5, replace=False)
    xb, yb = x[bad].copy(), np.full(5, 10, np.int64)
    xb[:, 0, 0] = 17  # not a copy of a real image: only the label makes it bad
    x = np.concatenate([x, x[dup], xb])
    y = np.concatenate([y, y[dup], yb])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from .._io import atomic_path
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, x=x, label=y)
    return {"records": len(x), "planted_duplicates": 20, "planted_bad_labels": 5}


def run(out: Optional[str] = None, quick: bool = False, log: Callable = print, progress: bool = True) -> dict:
    """Run the demo into `out`; returns the summary (rows, paths, accuracies) on rank 0."""
    import torch

    from .. import config
    from ..compress import cli as compress_cli
    from ..config import aimass_home
    from ..eval import cli as eval_cli
    from ..eval import report
    from ..train import pipeline

    t_start = time.perf_counter()
    torch.manual_seed(0)
    # a 64-128-64-10 MLP: torch's intra-op threads cost more than they save (on the loaded 2-core
    # development machine a step took 1.1 ms on one thread and 24 ms on two)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out, quick, log, progress, t_start)
    finally:
        torch.set_num_threads(threads)


def _run(out, quick, log, progress, t_start) -> dict:
    from .. import config
    from ..compress import cli as compress_cli
    from ..config import aimass_home
    from ..eval import cli as eval_cli
    from ..eval import report
    from ..train import pipeline

    out = os.path.abspath(out or os.path.join(aimass_home(), "demo"))
    d = pipeline._dist()
    rank, world = (d.rank(), d.size()) if d is not None else (0, 1)
    say = log if rank == 0 else (lambda *a, **k: None)
    epochs = 8 if quick else 30
    cfg_path = os.path.join(out, "config.yml")
    summary = {"out": out, "ranks": world}
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        from .._io import atomic_write_text
        atomic_write_text(cfg_path, CONFIG.format(epochs=epochs, kfold=0 if quick else 3,
                                                  latency_batches=10 if quick else 50))
        summary["raw"] = _write_raw(os.path.join(out, "raw", "digits.npz"), seed=0)
        for stale in ("run", "raw/digits.records", "registry"):  # a rerun starts from scratch, not from old checkpoints
            import shutil
            shutil.rmtree(os.path.join(out, stale), ignore_errors=True)
        say(f"[1/8] config: {cfg_path}  (data: scikit-learn digits, 1,797 8x8 images + "
            f"{summary['raw']['planted_duplicates']} planted duplicates + {summary['raw']['planted_bad_labels']} "
            f"bad labels)")
    pipeline._barrier("demo.config")
    cfg = config.load(cfg_path)

    say("[2/8] convert + clean + split 70/15/15")
    ds_path = pipeline.prepare_data(cfg, log=say)
    info = pipeline.dataset_info(ds_path, cfg)
    from .. import data
    counts = {s: len(data.open_split(ds_path, s)) for s in ("train", "valid", "test")}
    summary["split"] = counts
    say(f"      {len(data.open(ds_path))} records kept -> train {counts['train']}, valid {counts['valid']}, "
        f"test {counts['test']}")

    say(f"[3/8] train an MLP {info['shape']} -> {cfg.model.hidden} -> 10 for {epochs} epochs on {world} rank(s)")
    r = pipeline.run(cfg, log=say, progress=progress)
    summary["train"] = {"valid": r.get("valid"), "test": r.get("test"), "epochs": len(r["history"]),
                        "samples_per_s": r["history"][-1]["samples_per_s"]}

    say("[4/8] compress: prune 2:4, quantize int8 and int4, distill a student MLP [32]")
    compressed = compress_cli.run(cfg, quantize_bits=[8, 4], log=say, progress=progress)

    say("[5/8] evaluate side by side (test split" + ("" if quick else ", 3-fold cross-validation") + ")")
    models = {"fp32": os.path.join(r["run_dir"], "model.aimass")}
    for k in ("pruned-2of4", "int8", "int4", "distilled"):
        if k in compressed:
            models[k] = compressed[k]
    rep = eval_cli.run(cfg, models if rank == 0 else {"fp32": models["fp32"]},
                       out_dir=os.path.join(out, "report"), log=lambda *a: None)
    if rank != 0:  # rank 0 evaluates, pushes and serves meanwhile
        pipeline._barrier("demo.done", timeout=900)
        return summary
    rows = rep["models"]
    summary["rows"] = [{k: row[k] for k in ("name", "size_bytes", "accuracy", "f1_macro", "roc_auc_ovr",
                                            "latency_p50_ms")} for row in rows]
    summary["accuracy"] = {row["name"]: row["accuracy"] for row in rows}
    summary["report"] = rep["path"]
    summary["kfold"] = rep.get("kfold")
    say(report.table(rows))
    if rep.get("kfold"):
        kf = rep["kfold"]
        say(f"      {kf['k']}-fold cross-validation accuracy {kf['mean']:.4f} +- {kf['std']:.4f}")

    say("[6/8] push to the registry (fp32 labelled stable, int8 canary)")
    from . import serving
    summary["registry"] = serving.push(out, models, {row["name"]: {"accuracy": row["accuracy"],
                                                                  "f1_macro": row["f1_macro"]} for row in rows},
                                       cfg.registry.name, say)
    say("[7/8] serve it: aimass serve on a free loopback port, requests with a token")
    x_test, y_test = pipeline.split_arrays(ds_path, info, "test")
    summary["serve"] = serving.serve_and_ask(out, cfg.registry.name, x_test, y_test, say)

    say("[8/8] where everything is")
    rd = r["run_dir"]
    paths = {"config": cfg_path, "report.json": rep["path"],
             "figures": sorted(os.path.basename(p) for p in rep["figures"].values()),
             "metrics.jsonl": os.path.join(rd, "metrics.jsonl"), "checkpoints": rd,
             "models": os.path.join(rd, "compressed"), "registry": summary["registry"]["store"],
             "serve log": os.path.join(out, "serve.log")}
    summary["paths"] = paths
    for k, v in paths.items():
        say(f"      {k:<14}{', '.join(v) if isinstance(v, list) else v}")
    summary["seconds"] = time.perf_counter() - t_start
    say(f"done in {summary['seconds']:.1f} s: fp32 test accuracy {summary['accuracy']['fp32']:.4f}, "
        f"int8 {summary['accuracy'].get('int8', float('nan')):.4f}")
    pipeline._barrier("demo.done", timeout=900)
    return summary
