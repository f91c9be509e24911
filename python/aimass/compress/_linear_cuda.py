"""CUDA entry points of the quantized linear (int8 symmetric per-channel).

Arrays are torch CUDA tensors or anything with ``__cuda_array_interface__`` (cupy);
device pointers go to aimass._cuda as integers. Used by ``compress.linear`` when x
lives on a GPU; ``quantize_int8`` / ``dequantize_int8`` work on device weights."""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .. import cuda as _cuda
from .._array import is_torch
from .._cuda_array import current_stream, empty_like, interface


def _check(a: Any, name: str, typestr: str) -> dict:
    d = interface(a.detach() if is_torch(a) else a, name)
    if np.dtype(d["typestr"]) != np.dtype(typestr):
        raise TypeError(f"{name} must have dtype {np.dtype(typestr).name}, got {np.dtype(d['typestr']).name}")
    return d


def _to_device_like(x: Any, host: np.ndarray):
    if is_torch(x):
        torch = sys.modules["torch"]
        return torch.from_numpy(np.ascontiguousarray(host)).to(x.device)
    return sys.modules["cupy"].asarray(host)


def _ptr(a: Any, name: str, typestr: str) -> int:
    return int(_check(a, name, typestr)["data"][0])


def linear(x, p, bias=None):
    """y = x @ dequant(W).T + bias on the GPU (int8 per-channel weights); fp32 in, fp32 out."""
    m = _cuda.module()  # RuntimeError with the reason when no GPU can be used
    if p.bits != 8 or p.group_size != 0:
        raise ValueError(f"the CUDA quantized linear supports int8 per-channel weights; this weight is "
                         f"int{p.bits} group_size={p.group_size} (move x to the CPU for it)")
    d = _check(x, "x", "<f4")
    shape = tuple(d["shape"])
    if not shape or shape[-1] != p.in_features:
        raise ValueError(f"x has shape {shape}; its last dimension must be in_features={p.in_features}")
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    if p._cuda is None or p._cuda[0] != _device_key(x):
        data, scale, _, _ = p._src
        p._cuda = (_device_key(x), _to_device_like(x, np.asarray(data, np.int8).reshape(p.out_features, p.in_features)),
                   _to_device_like(x, np.asarray(scale, np.float32).reshape(-1)))
    _, qd, sd = p._cuda
    bptr = 0
    if bias is not None:
        bd = _check(bias, "bias", "<f4")
        if tuple(bd["shape"]) != (p.out_features,):
            raise ValueError(f"bias must have shape ({p.out_features},), got {tuple(bd['shape'])}")
        bptr = int(bd["data"][0])
    y = empty_like(x, shape[:-1] + (p.out_features,), "float32")
    m.qlinear_linear_int8(_ptr(qd, "qweight", "|i1"), _ptr(sd, "scale", "<f4"), p.out_features, p.in_features,
                          int(d["data"][0]), rows, bptr, _ptr(y, "y", "<f4"), current_stream(x))
    return y


def _device_key(x: Any):
    return str(x.device) if is_torch(x) else ("cupy", int(sys.modules["cupy"].cuda.Device().id))


def quantize_int8(w):
    """Per-channel symmetric int8 quantization of a CUDA weight [N, K] -> (q int8, scale fp32 [N])."""
    m = _cuda.module()
    d = _check(w, "w", "<f4")
    if len(d["shape"]) != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(d['shape'])}")
    n, k = d["shape"]
    q = empty_like(w, (n, k), "int8")
    s = empty_like(w, (n,), "float32")
    m.qlinear_quantize_int8(int(d["data"][0]), n, k, _ptr(q, "q", "|i1"), _ptr(s, "scale", "<f4"), current_stream(w))
    return q, s


def dequantize_int8(q, scale):
    """fp32 [N, K] = q * scale[:, None] on the GPU."""
    m = _cuda.module()
    d = _check(q, "q", "|i1")
    n, k = d["shape"]
    sd = _check(scale, "scale", "<f4")
    if tuple(sd["shape"]) != (n,):
        raise ValueError(f"scale must have shape ({n},), got {tuple(sd['shape'])}")
    out = empty_like(q, (n, k), "float32")
    m.qlinear_dequantize_int8(int(d["data"][0]), int(sd["data"][0]), n, k, _ptr(out, "out", "<f4"), current_stream(q))
    return out
