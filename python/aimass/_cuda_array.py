"""Describing CUDA arrays without copying: torch CUDA tensors (through torch's own
accessors, which also cover bfloat16) and anything with ``__cuda_array_interface__``
(cupy, numba). Used by the NCCL path of aimass.dist and the CUDA quantized linear."""
from __future__ import annotations

import sys
from typing import Any, NamedTuple, Tuple

import numpy as np

from ._array import is_torch

_TORCH_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "float64": "float64",
                 "int8": "int8", "uint8": "uint8", "int32": "int32", "int64": "int64"}


class DeviceArray(NamedTuple):
    ptr: int
    shape: Tuple[int, ...]
    dtype: str  # numpy-style name; "bfloat16" for torch.bfloat16
    device: int
    stream: int  # the array's framework's current stream on its device


def is_cuda_array(x: Any) -> bool:
    if is_torch(x):
        return bool(x.is_cuda)
    return hasattr(type(x), "__cuda_array_interface__") or hasattr(x, "__cuda_array_interface__")


def interface(x: Any, name: str) -> dict:
    """x's ``__cuda_array_interface__``, checked to be C-contiguous."""
    try:
        d = x.__cuda_array_interface__
    except AttributeError:
        raise TypeError(f"{name} must be a CUDA array (torch CUDA tensor or __cuda_array_interface__), "
                        f"got {type(x).__name__}") from None
    if d.get("strides") is not None:
        shape = tuple(int(s) for s in d["shape"])
        expect, acc = [], np.dtype(d["typestr"]).itemsize
        for s in reversed(shape):
            expect.insert(0, acc)
            acc *= s
        if tuple(d["strides"]) != tuple(expect) and int(np.prod(shape)) > 1:
            raise ValueError(f"{name} must be C-contiguous; call .contiguous() first")
    return d


def current_stream(x: Any) -> int:
    """The current stream of x's framework on x's device (torch, cupy), else 0 (the legacy default)."""
    if is_torch(x):
        return int(sys.modules["torch"].cuda.current_stream(x.device).cuda_stream)
    cupy = sys.modules.get("cupy")
    return int(cupy.cuda.get_current_stream().ptr) if cupy is not None else 0


def describe(x: Any, name: str) -> DeviceArray:
    """Pointer, shape, dtype, device and current stream of a C-contiguous CUDA array."""
    if is_torch(x):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous() first")
        dt = str(x.dtype).replace("torch.", "")
        if dt not in _TORCH_DTYPES:
            raise TypeError(f"{name}: dtype {dt} is not supported on CUDA; use one of {', '.join(_TORCH_DTYPES)}")
        dev = x.device.index if x.device.index is not None else sys.modules["torch"].cuda.current_device()
        return DeviceArray(int(x.data_ptr()), tuple(x.shape), dt, int(dev), current_stream(x))
    d = interface(x, name)
    dtype = np.dtype(d["typestr"])
    shape = tuple(int(s) for s in d["shape"])
    if dtype.name not in _TORCH_DTYPES:
        raise TypeError(f"{name}: dtype {dtype.name} is not supported on CUDA; use one of {', '.join(_TORCH_DTYPES)}")
    cupy = sys.modules.get("cupy")
    device, stream = 0, 0
    if cupy is not None and isinstance(x, cupy.ndarray):
        device, stream = int(x.device.id), current_stream(x)
    elif d.get("stream") not in (None, 1, 2):  # 1/2 mean the legacy / per-thread default stream
        stream = int(d["stream"])
    return DeviceArray(int(d["data"][0]), shape, dtype.name, device, stream)


def empty_like(x: Any, shape, dtype: str = None):
    """A new uninitialised array of x's kind on x's device: torch for torch tensors, else cupy."""
    if is_torch(x):
        torch = sys.modules["torch"]
        return torch.empty(tuple(shape), dtype=getattr(torch, dtype) if dtype else x.dtype, device=x.device)
    cupy = sys.modules.get("cupy")
    if cupy is None:
        raise TypeError("CUDA arrays other than torch tensors need cupy to allocate the output")
    if not isinstance(x, cupy.ndarray):  # another __cuda_array_interface__ producer: cupy's current device
        return cupy.empty(tuple(shape), dtype=dtype or np.dtype(x.__cuda_array_interface__["typestr"]))
    with x.device:
        return cupy.empty(tuple(shape), dtype=dtype or x.dtype)
