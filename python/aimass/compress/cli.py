"""``aimass compress`` (prune, quantize, distill a trained model into .aimass files) and
``aimass export`` (a model.pt to one .aimass file)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Callable, Dict, Optional


def _prune_spec(p) -> dict:
    if p.method == "n:m":
        return {"method": "n:m", "n": p.n, "m": p.m}
    return {"method": p.method, "sparsity": p.sparsity}


def _prune_name(p) -> str:
    return f"pruned-{p.n}of{p.m}" if p.method == "n:m" else f"pruned-{p.method}-{int(p.sparsity * 100)}"


class _KeepMasks:
    """Trainer callback: after every step, pruned weights are put back to zero."""

    def __init__(self, masks):
        self.masks = masks

    def on_train_begin(self, trainer):
        pass

    def on_step_end(self, trainer, step, loss):
        import torch
        with torch.no_grad():
            for w, m in self.masks:
                w.mul_(m)

    def on_epoch_end(self, trainer, epoch, metrics):
        pass

    def on_train_end(self, trainer):
        pass


def _prune_and_finetune(cfg, model, spec, p, log, progress):
    """A pruned copy of `model`; magnitude and n:m pruning are followed by p.finetune_epochs of
    training at a tenth of the learning rate with the pruned weights held at zero."""
    import copy

    from ..compress import prune_model
    from ..train import pipeline
    pruned = copy.deepcopy(model)
    if p.method == "channel" or p.finetune_epochs == 0:
        return pruned, 0
    prune_model(pruned, p.method, p.sparsity, n=p.n, m=p.m)
    masks = [(mod.weight, (mod.weight != 0).to(mod.weight.dtype)) for mod in pruned.modules()
             if hasattr(mod, "weight") and mod.weight is not None and mod.weight.dim() >= 2]
    ft_cfg = pipeline.config_with(cfg, train={"lr": cfg.train.lr * 0.1, "schedule": "none"})
    pipeline.run(ft_cfg, out_dir=os.path.join(pipeline.run_dir(cfg), "pruned"), init_model=pruned,
                 callbacks=[_KeepMasks(masks)], epochs=p.finetune_epochs, export=False, log=log, progress=progress)
    pruned.eval()
    return pruned, p.finetune_epochs


def run(cfg, prune: bool = True, quantize: bool = True, distill: bool = True, log: Callable = print,
        quantize_bits=None, progress: Optional[bool] = None) -> Dict[str, str]:
    """Compress the model `aimass train` wrote for `cfg` as the config's compress: section says
    (a missing section: prune 2:4, quantize int8 and int4, distill a student with hidden [32]).
    Writes <run_dir>/compressed/<name>.aimass; returns {name: path} (rank 0; {} elsewhere)."""
    import torch

    from .. import runtime
    from ..config import DistillSection, ModelSection, PruneSection, QuantizeSection
    from ..train import models, pipeline
    rd = pipeline.run_dir(cfg)
    model_pt = os.path.join(rd, "model.pt")
    if not os.path.isfile(model_pt):
        raise FileNotFoundError(f"{model_pt} does not exist: run 'aimass train {cfg.path or 'config.yml'}' first")
    rank = pipeline._rank()
    out_dir = os.path.join(rd, "compressed")
    out: Dict[str, str] = {}
    model, spec = models.load(model_pt)
    example = (torch.zeros([1] + spec["input_shape"]),)
    c = cfg.compress
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    pipeline._barrier("compress.dir")
    if prune:
        p = c.prune or PruneSection()
        pruned, ft = _prune_and_finetune(cfg, model, spec, p, log, progress)
        if rank == 0:
            path = os.path.join(out_dir, _prune_name(p) + ".aimass")
            out[_prune_name(p)] = runtime.export(pruned, example, path, prune=_prune_spec(p))
            log(f"compress: {_prune_name(p)}" + (f" + {ft} epochs of masked fine-tuning" if ft else "")
                + f" -> {path}")
    if rank == 0:
        if quantize:
            q = c.quantize or QuantizeSection()
            if q.group_size != 32:
                raise ValueError(f"compress.quantize.group_size: the runtime's int4 groups are 32 wide, got {q.group_size}")
            bits = quantize_bits or ([q.bits] if c.quantize else [8, 4])
            for b in bits:
                path = os.path.join(out_dir, f"int{b}.aimass")
                out[f"int{b}"] = runtime.export(model, example, path, quantize=f"int{b}")
                log(f"compress: int{b} -> {path}")
    if distill:
        d = c.distill or DistillSection()
        teacher = model
        if d.teacher:
            teacher, _ = models.load(cfg.resolve(d.teacher))
        student_cfg = ModelSection(kind="mlp", hidden=list(d.hidden), dropout=0.0)
        dcfg = dataclasses.replace(cfg, compress=dataclasses.replace(c, distill=d))
        r = pipeline.run(dcfg, out_dir=os.path.join(rd, "student"), teacher=teacher, model_cfg=student_cfg,
                         epochs=d.epochs, log=log, progress=progress)
        if rank == 0:
            path = os.path.join(out_dir, "distilled.aimass")
            shutil.copyfile(r["aimass_path"], path)
            out["distilled"] = path
            log(f"compress: distilled student (hidden {d.hidden}, T={d.temperature}, alpha={d.alpha}) -> {path}")
    return out


def _cmd_compress(args) -> int:
    from .. import config
    cfg = config.load(args.config)
    every = not (args.prune or args.quantize or args.distill)
    from ..train.cli import _err
    out = run(cfg, prune=every or args.prune, quantize=every or args.quantize, distill=every or args.distill,
              log=_err)
    if out:
        print(json.dumps(out, indent=2))
    return 0


def _cmd_export(args) -> int:
    import torch

    from .. import runtime
    from ..train import models
    model, spec = models.load(args.model)
    prune = None
    if args.prune:
        prune = {"method": "n:m", "n": 2, "m": 4} if args.prune == "2:4" else {"method": args.prune,
                                                                            "sparsity": args.sparsity}
    path = runtime.export(model, (torch.zeros([1] + spec["input_shape"]),), args.out,
                          quantize=args.quantize, prune=prune)
    print(json.dumps({"out": path, "bytes": os.path.getsize(path), "input_shape": spec["input_shape"]}))
    return 0


def add_cli(sub) -> None:
    from ..cli import add_command
    p = add_command(sub, "compress", "prune, quantize and distill the model 'aimass train' wrote",
                    "aimass compress config.yml              # every compress: entry (default: 2:4, int8, int4, "
                    "student)\naimass compress config.yml --quantize   # only the quantized files", _cmd_compress,
                    description="Reads <run_dir>/model.pt and writes <run_dir>/compressed/*.aimass as the "
                                "config's compress: section says (prune method/sparsity, quantize bits, distill "
                                "teacher/temperature/alpha/hidden).")
    p.add_argument("config")
    p.add_argument("--prune", action="store_true", help="only prune (with the other flags: those steps only)")
    p.add_argument("--quantize", action="store_true", help="only quantize")
    p.add_argument("--distill", action="store_true", help="only distill a smaller student")
    p = add_command(sub, "export", "write a trained model.pt as an .aimass file (fp32, int8, int4; pruned)",
                    "aimass export runs/config/model.pt model-int8.aimass --quantize int8", _cmd_export)
    p.add_argument("model", help="model.pt written by 'aimass train' (or its run folder)")
    p.add_argument("out", help="the .aimass file to write")
    p.add_argument("--quantize", choices=["int8", "int4"])
    p.add_argument("--prune", choices=["2:4", "magnitude", "channel"])
    p.add_argument("--sparsity", type=float, default=0.5, help="for --prune magnitude/channel")
