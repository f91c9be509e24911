"""Array conversions in one place: everything that enters the engine becomes a
numpy view (zero-copy) plus a dtype name; results go back as the caller's kind.

Accepted inputs: numpy arrays, torch CPU tensors (bfloat16 included, viewed as
uint16), anything with ``__dlpack__`` or the buffer protocol.
"""
from __future__ import annotations

import sys
from typing import Any, Tuple

import numpy as np

FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def _torch():
    return sys.modules.get("torch")


def is_torch(x: Any) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


def bfloat16_bits(x) -> np.ndarray:
    """A CPU torch bfloat16 tensor's bits as a uint16 numpy view (numpy has no bfloat16)."""
    return x.view(_torch().int16).numpy().view(np.uint16)


# dtype -> name: numpy's dtype.name runs Python code (about 2 us a call, a tenth of an async
# allreduce's submission)
_DTYPE_NAMES: dict = {}


def _dtype_name(dt) -> str:
    n = _DTYPE_NAMES.get(dt)
    if n is None:
        n = _DTYPE_NAMES[dt] = dt.name
    return n


def as_numpy(x: Any, name: str = "array") -> Tuple[np.ndarray, str]:
    """Return (numpy view, dtype name). bfloat16 comes back as a uint16 view with
    dtype name 'bfloat16'. Never copies a contiguous CPU input."""
    if isinstance(x, np.ndarray):
        return x, _dtype_name(x.dtype)
    t = _torch()
    if t is not None and isinstance(x, t.Tensor):
        if x.device.type != "cpu":
            raise TypeError(f"{name} is a torch tensor on {x.device}; move it to the CPU with .cpu() "
                            "(or use the CUDA entry points)")
        if x.requires_grad:
            x = x.detach()
        if x.is_neg() or x.is_conj():  # (a lazy view: its memory does not hold its values)
            raise TypeError(f"{name} is a torch tensor with its negative or conjugate bit set; call "
                            ".resolve_neg() / .resolve_conj() first")
        if x.dtype == t.bfloat16:
            return bfloat16_bits(x), "bfloat16"
        return x.numpy(), str(x.dtype).replace("torch.", "")
    if hasattr(x, "__dlpack__"):
        try:
            a = np.from_dlpack(x)
            return a, a.dtype.name
        except (TypeError, BufferError, RuntimeError) as exc:
            raise TypeError(f"{name}: cannot read it through DLPack ({exc}); pass a CPU array") from exc
    try:
        a = np.asarray(memoryview(x))
    except TypeError:
        raise TypeError(f"{name} must be a numpy array, a torch tensor, or support DLPack / the buffer "
                        f"protocol; got {type(x).__name__}") from None
    return a, a.dtype.name


def float32_array(x: Any, name: str = "array") -> np.ndarray:
    """A float32 C-contiguous view or converted copy of a float input (fp32/fp16/bf16)."""
    a, dt = as_numpy(x, name)
    if dt == "float32":
        return np.ascontiguousarray(a)
    if dt == "float16":
        return a.astype(np.float32)
    if dt == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dt}")


def like(result: np.ndarray, template: Any):
    """Give `result` back as the kind of array `template` was (torch stays torch), zero-copy."""
    t = _torch()
    if t is not None and isinstance(template, t.Tensor):
        return t.from_numpy(result)
    return result
