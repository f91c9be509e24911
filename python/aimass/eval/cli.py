"""``aimass eval``: the trained and compressed models side by side, with report.json and PNGs."""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Optional


def default_models(run_dir: str) -> Dict[str, str]:
    """model.aimass as 'fp32', then every <run_dir>/compressed/*.aimass by its name."""
    out = {}
    if os.path.isfile(os.path.join(run_dir, "model.aimass")):
        out["fp32"] = os.path.join(run_dir, "model.aimass")
    cdir = os.path.join(run_dir, "compressed")
    if os.path.isdir(cdir):
        for f in sorted(os.listdir(cdir)):
            if f.endswith(".aimass"):
                out[f[:-len(".aimass")]] = os.path.join(cdir, f)
    return out


def _history(run_dir: str):
    p = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(p):
        return []
    with open(p) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(cfg, models: Optional[Dict[str, str]] = None, split: str = "test", kfold: Optional[int] = None,
        out_dir: Optional[str] = None, log: Callable = print) -> dict:
    from ..train import pipeline
    from . import crossval, report
    rd = pipeline.run_dir(cfg)
    models = models or default_models(rd)
    if not models:
        raise FileNotFoundError(f"no models to evaluate in {rd}: run 'aimass train' (and 'aimass compress') first, "
                                "or pass --model NAME=PATH")
    ds_path = pipeline.prepare_data(cfg, log)  # every rank: the k folds below train data-parallel
    info = pipeline.dataset_info(ds_path, cfg)
    k = cfg.eval.kfold if kfold is None else kfold
    kf = crossval.kfold(cfg, k, log=log) if k else None
    if pipeline._rank() != 0:
        return {}
    x, y = pipeline.split_arrays(ds_path, info, split)
    rows = report.compare(models, x, y, info.get("class_names"), batch_size=cfg.eval.batch_size,
                          latency_batches=cfg.eval.latency_batches)
    out_dir = out_dir or (cfg.resolve(cfg.eval.out_dir) if cfg.eval.out_dir else os.path.join(rd, "report"))
    rep = report.write(out_dir, rows, _history(rd), kf, extra={"split": split, "dataset": ds_path})
    log(report.table(rows))
    if kf:
        log(f"{k}-fold cross-validation accuracy: {kf['mean']:.4f} +- {kf['std']:.4f}")
    log(f"report: {rep['path']} (figures: {', '.join(os.path.basename(v) for v in rep['figures'].values())})")
    return rep


def _cmd_eval(args) -> int:
    from .. import config
    cfg = config.load(args.config)
    models = {}
    for m in args.model or []:
        name, sep, path = m.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model takes NAME=PATH (e.g. int8=runs/x/compressed/int8.aimass), got {m!r}")
        models[name] = path
    run(cfg, models or None, split=args.split, kfold=args.kfold, out_dir=args.out)
    return 0


def add_cli(sub) -> None:
    from ..cli import add_command
    p = add_command(sub, "eval", "accuracy, precision, recall, F1, ROC AUC, confusion matrix and latency of "
                    "the trained and compressed models side by side; report.json and PNGs",
                    "aimass eval config.yml\naimass eval config.yml --kfold 5 --model mine=other.aimass",
                    _cmd_eval)
    p.add_argument("config")
    p.add_argument("--model", action="append", metavar="NAME=PATH", help="an .aimass model to include (repeatable; "
                   "default: the run's model.aimass and compressed/*.aimass)")
    p.add_argument("--split", default="test", help="which split to score (default test)")
    p.add_argument("--kfold", type=int, help="also k-fold cross-validate the config's model (k >= 2)")
    p.add_argument("--out", help="report folder (default <run_dir>/report)")
