"""config.yml -> data (fetch, convert, clean, split) -> model -> Trainer -> model.pt + model.aimass.

Used by ``aimass train``, ``aimass tune`` and the demo. Every rank calls run(); rank 0 converts
and splits the data and writes the outputs, into folders every rank can read."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from . import models


def _dist():
    from .. import dist
    from .trainer import _under_mpirun
    if _under_mpirun() or dist.is_initialized():
        dist.init()
        return dist
    return None


def _barrier(name: str, timeout: Optional[float] = None) -> None:
    """Every rank waits here (timeout: seconds, default aimass.dist's)."""
    d = _dist()
    if d is not None and d.size() > 1:
        d.barrier(timeout=timeout, name=name)


def _rank() -> int:
    d = _dist()
    return d.rank() if d is not None else 0


def run_dir(cfg) -> str:
    if cfg.train.checkpoint_dir:
        return cfg.resolve(cfg.train.checkpoint_dir)
    stem = os.path.splitext(os.path.basename(cfg.path or "config.yml"))[0]
    base = os.path.dirname(cfg.path) if cfg.path else os.getcwd()
    return os.path.join(base, "runs", stem)


def _source(cfg, log) -> str:
    from ..config import fetch
    url = cfg.data_url or (cfg.data_path if cfg.data_path and "://" in cfg.data_path else None)
    if cfg.download:
        if url is None:
            path = cfg.resolve(cfg.data_path)
            if path and os.path.exists(path):
                return path
            raise ValueError("config: 'download: true' needs 'data_url' (an http(s):// or file:// URL), "
                             "or data_path pointing at data that is already there")
        return fetch(url, sha256=cfg.sha256, progress=_rank() == 0)
    if url is not None:
        raise ValueError(f"config: data_path {url} is a URL; set 'download: true' to fetch it")
    if not cfg.data_path:
        raise ValueError("config: 'data_path' is missing (where the data is)")
    path = cfg.resolve(cfg.data_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data_path {path} does not exist (set 'download: true' and 'data_url' to fetch it)")
    return path


def _format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "index.json")):
            return "records"
        return "image_folder"
    low = path.lower()
    if low.endswith((".npy", ".npz")):
        return "npy"
    if low.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    raise ValueError(f"cannot tell the format of {path}; set data.format (records, npy, csv, image_folder)")


def prepare_data(cfg, log: Callable = print) -> str:
    """Convert (and clean) data_path into records and split it; returns the records folder."""
    from .. import data
    src = _source(cfg, log)
    fmt = _format(src, cfg.data.format)
    if fmt == "records":
        out = src
    else:
        out = cfg.resolve(cfg.data.out_dir) if cfg.data.out_dir else os.path.splitext(src.rstrip("/"))[0] + ".records"
    if _rank() == 0:
        fresh = os.path.isfile(os.path.join(out, "index.json")) and (
            fmt == "records" or os.path.getmtime(os.path.join(out, "index.json")) >= os.path.getmtime(src))
        if not fresh:
            d = cfg.data
            if fmt == "npy":
                if src.endswith(".npz"):
                    with np.load(src, allow_pickle=False) as z:
                        arrays = {k: z[k] for k in z.files}
                else:
                    arrays = {d.input or "x": np.load(src, allow_pickle=False)}
                if d.clean:
                    _, report = data.clean(arrays, label=d.label if d.label in arrays else None,
                                           classes=d.classes if d.label in arrays else None, out_dir=out,
                                           verbose=False, overwrite=True)
                    log(f"clean: {report['input']} records in, {report['kept']} kept")
                else:
                    data.write(out, arrays, overwrite=True)
            elif fmt == "csv":
                data.from_csv(src, out, label=d.label, clean_rows=d.clean, overwrite=True)
            elif fmt == "image_folder":
                data.from_image_folder(src, out, size=tuple(d.image_size), overwrite=True)
            log(f"data: {src} -> {out} ({fmt})")
        label = cfg.data.label if cfg.data.label in data.open(out).fields else True
        data.split(data.open(out), config=cfg.splitting_dict(), seed=cfg.train.seed, stratify=label, save=True)
    _barrier("pipeline.data", timeout=3600)  # rank 0 may be converting a large set
    return out


def _fields(ds, cfg):
    label = cfg.data.label
    if label not in ds.fields:
        label = ds.metadata.get("label_field") or label
    if label not in ds.fields:
        raise ValueError(f"data: no label field {cfg.data.label!r}; the dataset has {ds.fields} (set data.label)")
    inp = cfg.data.input
    if inp is None:
        others = [f for f in ds.fields if f != label]
        if len(others) != 1:
            raise ValueError(f"data: fields {ds.fields}; set data.input to the model's input field")
        inp = others[0]
    elif inp not in ds.fields:
        raise ValueError(f"data.input {inp!r} is not a field of {ds.path} ({ds.fields})")
    return inp, label


def dataset_info(ds_path: str, cfg) -> dict:
    from .. import data
    ds = data.open(ds_path)
    inp, label = _fields(ds, cfg)
    shape = next(f["shape"] for f in ds.schema if f["name"] == inp)
    dtype = next(f["dtype"] for f in ds.schema if f["name"] == inp)
    classes = cfg.data.classes or len(ds.metadata.get("classes") or []) or int(ds.column(label).max()) + 1
    scale = cfg.data.scale
    if dtype == "uint8" and scale == 1.0:
        scale = 1 / 255
    nhwc = cfg.model.kind == "cnn" and len(shape) == 3 and shape[-1] in (1, 3) and shape[0] not in (1, 3)
    return {"input": inp, "label": label, "shape": shape, "classes": int(classes), "scale": scale, "nhwc": nhwc,
            "class_names": ds.metadata.get("classes")}


def make_optimizer(tcfg, params):
    import torch
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    if tcfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    return torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)


def make_scheduler(tcfg, optimizer, total_steps: int):
    import torch
    if tcfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if tcfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(total_steps // 3, 1), gamma=0.1)
    return None


def loaders(ds_path: str, info: dict, batch_size: int, seed: int):
    from .. import data
    tf = [data.Cast(info["input"], "float32", info["scale"])]
    out = {}
    for name in ("train", "valid", "test"):
        try:
            part = data.open_split(ds_path, name)
        except KeyError:
            continue
        if len(part) == 0:
            continue
        out[name] = data.Loader(part, batch_size=batch_size, shuffle=(name == "train"), seed=seed,
                                transforms=tf, output="torch")
    if "train" not in out:
        raise ValueError(f"{ds_path} has no training split; give splitting.train > 0")
    return out


def split_arrays(ds_path: str, info: dict, split: str = "test"):
    """(inputs as the model takes them, labels) of one split, as numpy arrays."""
    from .. import data
    part = data.open_split(ds_path, split)
    return models.prepare(part.column(info["input"]), info), part.column(info["label"]).reshape(-1)


def push(cfg, path: str, metrics: dict, label: Optional[str] = None, name: Optional[str] = None) -> dict:
    """Push a model (.aimass; a model.pt is exported first) to the registry named by cfg.registry."""
    try:
        from ..registry import Registry
    except ImportError as exc:
        raise ValueError(f"the registry is not available in this build ({exc})") from None
    if path.endswith(".pt"):
        import torch

        from .. import runtime
        model, spec = models.load(path)
        path = runtime.export(model, (torch.zeros([1] + spec["input_shape"]),), path[:-3] + ".aimass")
    store = cfg.resolve(cfg.registry.store) if cfg.registry.store else None
    reg = Registry(store) if store else Registry()
    version = reg.push(path, name or cfg.registry.name, label=label or cfg.registry.label, metrics=metrics)
    return {"name": name or cfg.registry.name, "version": version, "store": store}


def batch_fn(info: dict):
    inp, label, nhwc = info["input"], info["label"], info["nhwc"]

    def fn(batch):
        x = batch[inp]
        if nhwc:
            x = x.permute(0, 3, 1, 2).contiguous()
        return x, batch[label].reshape(-1)
    return fn


def run(cfg, resume: bool = False, log: Callable = print, callbacks: Sequence = (), out_dir: Optional[str] = None,
        progress: Optional[bool] = None, export: bool = True, teacher=None, model_cfg=None, epochs=None,
        init_model=None) -> dict:
    """Train what `cfg` describes (or go on training `init_model`, built from the same spec).
    Returns {history, valid, test, run_dir, model_path, aimass_path, spec}."""
    import torch
    import torch.nn.functional as F

    from .trainer import Trainer
    torch.manual_seed(cfg.train.seed)
    ds_path = prepare_data(cfg, log)
    info = dataset_info(ds_path, cfg)
    spec = models.spec_from(model_cfg or cfg.model, info["shape"], info["classes"], info["input"], info["label"],
                            info["scale"], info["nhwc"])
    model = init_model if init_model is not None else models.build(spec)
    ld = loaders(ds_path, info, cfg.train.batch_size, cfg.train.seed)
    opt = make_optimizer(cfg.train, model.parameters())
    n_epochs = epochs or cfg.train.epochs
    sched = make_scheduler(cfg.train, opt, n_epochs * len(ld["train"]))
    rd = out_dir or run_dir(cfg)
    tr = Trainer(model, opt, F.cross_entropy, ld["train"], ld.get("valid"), epochs=n_epochs, checkpoint_dir=rd,
                 callbacks=callbacks, scheduler=sched, checkpoint_every=cfg.train.checkpoint_every,
                 progress=cfg.train.progress if progress is None else progress, batch_fn=batch_fn(info),
                 teacher=teacher, **({"kd_temperature": cfg.compress.distill.temperature,
                                      "kd_alpha": cfg.compress.distill.alpha} if teacher is not None
                                     and cfg.compress.distill else {}))
    history = tr.fit(resume=resume)
    result = {"history": history, "run_dir": rd, "spec": spec, "dataset": ds_path, "info": info,
              "trainer": tr, "model": model}
    if tr.stop_training and tr.epoch < tr.epochs:
        return result
    for name in ("valid", "test"):
        if name in ld:
            result[name] = tr.evaluate(ld[name])
    if _rank() == 0:
        os.makedirs(rd, exist_ok=True)
        result["model_path"] = os.path.join(rd, "model.pt")
        models.save(result["model_path"], model, spec, {"config": cfg.to_dict(), "info": info})
        if export:
            from .. import runtime
            example = torch.zeros([1] + spec["input_shape"])
            result["aimass_path"] = runtime.export(model, (example,), os.path.join(rd, "model.aimass"))
        from .._io import atomic_write_text
        summary = {k: result[k] for k in ("valid", "test") if k in result}
        atomic_write_text(os.path.join(rd, "result.json"), json.dumps({**summary, "spec": spec}, indent=1))
    _barrier("pipeline.done")
    return result


def config_with(cfg, **sections):
    """A copy of cfg with some train/model fields replaced: config_with(cfg, train={"lr": 0.1})."""
    new = dataclasses.replace(cfg)
    for sec, vals in sections.items():
        setattr(new, sec, dataclasses.replace(getattr(cfg, sec), **vals))
    return new
