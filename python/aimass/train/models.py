"""Models a config.yml can name (``model: {kind: logreg | mlp | cnn, ...}``), rebuilt from a spec
dict that travels with every checkpoint and model (model.json), so eval/compress/export can load
what train wrote without the config."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence


def build(spec: dict):
    """A torch module from {kind, input_shape, num_classes, hidden, dropout, channels}.

    input_shape is one sample's shape as the model sees it (a cnn takes [C, H, W])."""
    import torch.nn as nn
    kind = spec["kind"]
    shape = [int(s) for s in spec["input_shape"]]
    n_out = int(spec["num_classes"])
    flat = 1
    for s in shape:
        flat *= s
    if kind == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(flat, n_out))
    if kind == "mlp":
        layers, width = [nn.Flatten()], flat
        for h in spec.get("hidden") or []:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if spec.get("dropout"):
                layers.append(nn.Dropout(float(spec["dropout"])))
            width = int(h)
        return nn.Sequential(*layers, nn.Linear(width, n_out))
    if kind == "cnn":
        if len(shape) != 3:
            raise ValueError(f"model kind 'cnn' needs image inputs [C, H, W], got input shape {shape}")
        c, h, w = shape
        layers = []
        for ch in spec.get("channels") or [8, 16]:
            layers += [nn.Conv2d(c, int(ch), 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = int(ch), h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"model: {len(spec['channels'])} conv blocks halve {shape[1:]} below 1 pixel")
        layers += [nn.Flatten()]
        width = c * h * w
        for hd in spec.get("hidden") or []:
            layers += [nn.Linear(width, int(hd)), nn.ReLU()]
            width = int(hd)
        return nn.Sequential(*layers, nn.Linear(width, n_out))
    raise ValueError(f"model kind must be 'logreg', 'mlp' or 'cnn', got {kind!r}")


def spec_from(cfg_model, input_shape: Sequence[int], num_classes: int, input_field: str, label_field: str,
              scale: float, nhwc: bool) -> dict:
    shape = list(input_shape)
    if nhwc:
        shape = [shape[2], shape[0], shape[1]]
    return {"kind": cfg_model.kind, "input_shape": shape, "num_classes": int(num_classes),
            "hidden": list(cfg_model.hidden), "dropout": float(cfg_model.dropout),
            "channels": list(cfg_model.channels), "input_field": input_field, "label_field": label_field,
            "scale": float(scale), "nhwc_to_nchw": bool(nhwc)}


def prepare(x, spec: dict):
    """Raw field values (numpy) -> the float32 array the model takes (scale, and NHWC -> NCHW)."""
    import numpy as np
    x = np.asarray(x, dtype=np.float32) * np.float32(spec.get("scale", 1.0))
    if spec.get("nhwc_to_nchw", spec.get("nhwc")):
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def save(path: str, model, spec: dict, extra: Optional[dict] = None) -> None:
    """model.pt (state_dict + spec) written atomically, and model.json beside it."""
    import io

    import torch

    from .._io import atomic_path, atomic_write_text
    buf = io.BytesIO()
    torch.save({"spec": spec, "state_dict": model.state_dict(), **(extra or {})}, buf)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getvalue())
    atomic_write_text(os.path.splitext(path)[0] + ".json", json.dumps(spec, indent=1))


def load(path: str):
    """(module, spec) from a model.pt written by save(), or from a training checkpoint folder."""
    import torch
    p = os.fspath(path)
    if os.path.isdir(p):
        cand = os.path.join(p, "model.pt")
        if not os.path.isfile(cand):
            raise FileNotFoundError(f"{p} has no model.pt (run 'aimass train' first)")
        p = cand
    if not os.path.isfile(p):
        raise FileNotFoundError(f"model {p} does not exist")
    blob = torch.load(p, weights_only=False)
    if not isinstance(blob, dict) or "spec" not in blob or "state_dict" not in blob:
        raise ValueError(f"{p} is not an aimass model file (expected the model.pt that 'aimass train' writes)")
    m = build(blob["spec"])
    m.load_state_dict(blob["state_dict"])
    m.eval()
    return m, blob["spec"]
