"""``aimass train`` and ``aimass tune``."""
from __future__ import annotations

import json
import sys


def _err(*a):
    """Progress lines go to stderr; stdout carries the JSON result."""
    print(*a, file=sys.stderr)


def _cmd_train(args) -> int:
    from .. import config
    from . import pipeline
    cfg = config.load(args.config)
    if args.epochs is not None:
        cfg = pipeline.config_with(cfg, train={"epochs": args.epochs})
    if args.checkpoint_dir is not None:
        cfg = pipeline.config_with(cfg, train={"checkpoint_dir": args.checkpoint_dir})
    r = pipeline.run(cfg, resume=args.resume, progress=False if args.no_progress else None, log=_err)
    if r.get("model_path"):
        out = {k: r[k] for k in ("valid", "test") if k in r}
        out.update(run_dir=r["run_dir"], model=r["model_path"], aimass=r.get("aimass_path"),
                   metrics=f"{r['run_dir']}/metrics.jsonl")
        print(json.dumps(out, indent=2))
    return 0


def _cmd_tune(args) -> int:
    from .. import config
    from . import tune
    cfg = config.load(args.config)
    r = tune.run(cfg, trials=args.trials, push=args.push, study_name=args.study, log=_err)
    if r is not None:
        print(json.dumps(r, indent=2))
    return 0


def add_cli(sub) -> None:
    from ..cli import add_command
    p = add_command(sub, "train", "train the model a config.yml describes (data-parallel under mpirun)",
                    "aimass train config.yml\n"
                    "mpirun -np 2 aimass train config.yml --resume   # continue from the last checkpoint",
                    _cmd_train,
                    description="Convert, clean and split data_path, build the model, train it and write "
                                "checkpoints, metrics.jsonl, model.pt and model.aimass into train.checkpoint_dir "
                                "(default runs/<config name>/ beside the config).")
    p.add_argument("config", help="config.yml (docs/training.md)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (bitwise exact)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--checkpoint-dir", help="override train.checkpoint_dir (a folder every rank can read)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = add_command(sub, "tune", "hyperparameter search over the config's search: ranges (Optuna TPE + median "
                    "pruning); the study lives in AIMASS_HOME/studies.db and resumes",
                    "aimass tune config.yml --trials 20\naimass tune config.yml --push   # best model to the registry",
                    _cmd_tune)
    p.add_argument("config")
    p.add_argument("--trials", type=int, help="override search.trials")
    p.add_argument("--study", help="study name (default: search.study or the config file's name)")
    p.add_argument("--push", action="store_true", help="push the best trial's model to the registry")
