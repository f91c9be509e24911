"""``aimass tune``: Optuna search over the config's ``search:`` ranges.

Each trial is a Trainer run (under mpirun the ranks run it together: rank 0 asks Optuna
for the parameters and broadcasts them). The TPE sampler proposes, the median pruner stops
trials whose per-epoch validation metric falls below the median of earlier trials at the
same epoch. The study is stored in SQLite (AIMASS_HOME/studies.db) so a second run
continues it; the best trial's model can be pushed to the registry; a PNG of the search
history is written beside the trials."""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Optional

from ..config import aimass_home
from . import pipeline
from .checkpoint import broadcast_object
from .trainer import Callback

_TRAIN_KEYS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule")
_MODEL_KEYS = ("kind", "hidden", "dropout", "channels")


def _target(name: str):
    if "." in name:
        sec, key = name.split(".", 1)
    else:
        sec = "train" if name in _TRAIN_KEYS else "model" if name in _MODEL_KEYS else None
        key = name
    ok = {"train": _TRAIN_KEYS, "model": _MODEL_KEYS}
    if sec not in ok or key not in ok[sec]:
        raise ValueError(f"search.params.{name}: can search train.{{{', '.join(_TRAIN_KEYS)}}} or "
                         f"model.{{{', '.join(_MODEL_KEYS)}}}")
    return sec, key


def _suggest(trial, name: str, p):
    if p.type == "log_uniform":
        return trial.suggest_float(name, p.low, p.high, log=True)
    if p.type == "uniform":
        return trial.suggest_float(name, p.low, p.high)
    if p.type == "int":
        return trial.suggest_int(name, int(p.low), int(p.high))
    # categorical values must be scalars for optuna: lists (hidden sizes) travel as JSON text
    enc = [json.dumps(c) if isinstance(c, (list, dict)) else c for c in p.choices]
    v = trial.suggest_categorical(name, enc)
    return json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v


class _Pruning(Callback):
    def __init__(self, trial, metric: str, world: int):
        self.trial, self.metric, self.world = trial, metric, world
        self.pruned = False

    def on_epoch_end(self, trainer, epoch, metrics):
        prune = False
        if trainer.rank == 0:
            if self.metric not in metrics:
                raise ValueError(f"search.metric {self.metric!r} is not a per-epoch metric; "
                                 f"have {sorted(k for k in metrics if k not in ('epoch', 'step'))}")
            self.trial.report(float(metrics[self.metric]), epoch)
            prune = self.trial.should_prune()
        if broadcast_object(prune, self.world):
            self.pruned = True
            trainer.stop_training = True


def _final(result: dict, metric: str) -> float:
    if metric.startswith("val_") and "valid" in result:
        return float(result["valid"][metric[4:]])
    for row in reversed(result["history"]):
        if metric in row:
            return float(row[metric])
    raise ValueError(f"search.metric {metric!r} was not measured")


def run(cfg, trials: Optional[int] = None, push: bool = False, study_name: Optional[str] = None,
        log: Callable = print) -> Optional[dict]:
    """Run (or continue) the study; returns the best trial on rank 0 (None on other ranks)."""
    import optuna
    s = cfg.search
    if not s.params:
        raise ValueError(f"{cfg.path}: 'aimass tune' needs a search: section with params "
                         "(e.g. lr: {type: log_uniform, low: 0.001, high: 0.3})")
    for name in s.params:
        _target(name)
    d = pipeline._dist()
    rank, world = (d.rank(), d.size()) if d is not None else (0, 1)
    n_trials = trials if trials is not None else s.trials
    if n_trials < 1:
        raise ValueError(f"trials must be >= 1, got {n_trials}")
    name = study_name or s.study or os.path.splitext(os.path.basename(cfg.path or "config"))[0]
    base = os.path.join(pipeline.run_dir(cfg), "tune", name)
    study = None
    if rank == 0:
        os.makedirs(aimass_home(), exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            study_name=name, storage=f"sqlite:///{os.path.join(aimass_home(), 'studies.db')}", load_if_exists=True,
            direction=s.direction, sampler=optuna.samplers.TPESampler(seed=cfg.train.seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    pipeline.prepare_data(cfg, log if rank == 0 else (lambda *a: None))
    import time
    t0 = time.monotonic()
    for i in range(n_trials):
        late = s.timeout_s is not None and time.monotonic() - t0 > s.timeout_s
        if broadcast_object(late, world):  # rank 0's clock decides for every rank
            log(f"search.timeout_s={s.timeout_s:g} reached after {i} trial(s) of {n_trials}")
            break
        trial = study.ask() if rank == 0 else None
        params = {k: _suggest(trial, k, p) for k, p in s.params.items()} if rank == 0 else None
        number = trial.number if rank == 0 else None
        params, number = broadcast_object((params, number), world)
        changes = {}
        for k, v in params.items():
            sec, key = _target(k)
            changes.setdefault(sec, {})[key] = v
        tcfg = pipeline.config_with(cfg, **changes)
        cb = _Pruning(trial, s.metric, world)
        out = os.path.join(base, f"trial-{number:04d}")
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
        result = pipeline.run(tcfg, out_dir=out, callbacks=[cb], progress=False, export=False,
                              log=lambda *a: None)
        if rank == 0:
            if cb.pruned:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                log(f"trial {number}: pruned {params}")
            else:
                value = _final(result, s.metric)
                study.tell(trial, value)
                log(f"trial {number}: {s.metric} {value:.4f} {params}")
    if rank != 0:
        return None
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise ValueError(f"study {name!r}: every trial was pruned; run more trials")
    best = study.best_trial
    best_dir = os.path.join(base, f"trial-{best.number:04d}")
    out = {"study": name, "storage": os.path.join(aimass_home(), "studies.db"), "trials": len(study.trials),
           "best_trial": best.number, "best_value": best.value, "best_params": best.params,
           "best_model": os.path.join(best_dir, "model.pt")}
    out["history_png"] = _plot(study, os.path.join(base, "search_history.png"))
    if push:
        out["registry"] = pipeline.push(cfg, out["best_model"], {s.metric: best.value, **best.params})
    return out


def _plot(study, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        ax = plot_optimization_history(study)
    fig = ax.figure
    fig.tight_layout()
    from .._io import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
