"""Weight quantization: int8 / int4, per tensor / channel / group, symmetric or
asymmetric. The numerics are defined in docs/numerics.md (and docs/quant_format.md);
the kernels are C++ (aimass._C.quant_*), this module validates and shapes.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import numpy as np

from .._io import atomic_path

from .. import _C
from .. import _array

__all__ = ["QuantizedTensor", "quantize", "dequantize"]

_BITS = (8, 4)
_SCHEMES = ("symmetric", "asymmetric")
_GRANULARITIES = ("tensor", "channel", "group")
_FORMAT = "aimass.quantized"
_FORMAT_VERSION = "1"


def _check_choice(name: str, value: Any, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _layout(shape: Tuple[int, ...], granularity: str, axis: int) -> Tuple[int, int, int]:
    """[outer, channels, inner] view of `shape` around `axis` (tensor: one flat channel)."""
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if granularity == "tensor":
        return 1, 1, n
    outer = int(np.prod(shape[:axis], dtype=np.int64)) if axis else 1
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64)) if axis + 1 < len(shape) else 1
    return outer, int(shape[axis]), inner


def _data_shape(shape: Tuple[int, ...], bits: int) -> Tuple[int, ...]:
    if bits == 8:
        return tuple(shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(shape) >= 1 and shape[-1] % 2 == 0:
        return tuple(shape[:-1]) + (shape[-1] // 2,)  # flat row-major pairs == last dim halved
    return ((n + 1) // 2,)


def _scale_shape(shape, granularity, axis, group_size) -> Tuple[int, ...]:
    if granularity == "tensor":
        return ()
    outer, channels, inner = _layout(shape, granularity, axis)
    if granularity == "channel":
        return (channels,)
    return (channels, outer * inner // group_size)


class QuantizedTensor:
    """A quantized array in the canonical layout of docs/quant_format.md.

    data: int8 (symmetric 8-bit) or uint8 (asymmetric 8-bit, any 4-bit: packed pairs);
    scale: float32 of shape [] / [C] / [C, K/G]; zero_point: int32 like scale, or None
    (symmetric); shape/dtype: the original array's; group_size: G for 'group', else 0;
    axis: the channel axis (non-negative; 0 for 'tensor')."""

    # _aimass_packed: the kernels' prepacked copy, cached by compress.linear (qlinear.packed)
    __slots__ = ("data", "scale", "zero_point", "bits", "scheme", "granularity", "axis", "group_size",
                 "shape", "dtype", "_aimass_packed")

    def __init__(self, data: np.ndarray, scale: np.ndarray, zero_point: Optional[np.ndarray], bits: int,
                 scheme: str, granularity: str, axis: int, group_size: int, shape: Tuple[int, ...],
                 dtype: str):
        self.data = data
        self.scale = scale
        self.zero_point = zero_point
        self.bits = int(bits)
        self.scheme = scheme
        self.granularity = granularity
        self.axis = int(axis)
        self.group_size = int(group_size)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._validate()

    def _validate(self) -> None:
        """Checks every field against the others (used on construction and on load)."""
        if self.bits not in _BITS:
            raise ValueError(f"bits must be 8 or 4, got {self.bits}")
        _check_choice("scheme", self.scheme, _SCHEMES)
        _check_choice("granularity", self.granularity, _GRANULARITIES)
        if self.granularity != "tensor" and not 0 <= self.axis < max(1, len(self.shape)):
            raise ValueError(f"axis={self.axis} is out of range for shape {self.shape}")
        if self.granularity == "group":
            outer, _, inner = _layout(self.shape, "group", self.axis)
            if self.group_size < 1 or (outer * inner) % self.group_size:
                raise ValueError(f"group_size={self.group_size} does not divide {outer * inner}")
        want_dtype = np.int8 if (self.bits == 8 and self.scheme == "symmetric") else np.uint8
        if not isinstance(self.data, np.ndarray) or self.data.dtype != want_dtype:
            raise TypeError(f"data must be a numpy {np.dtype(want_dtype).name} array")
        if self.data.shape != _data_shape(self.shape, self.bits):
            raise ValueError(f"data has shape {self.data.shape}, expected {_data_shape(self.shape, self.bits)}")
        sshape = _scale_shape(self.shape, self.granularity, self.axis, self.group_size)
        if not isinstance(self.scale, np.ndarray) or self.scale.dtype != np.float32 or self.scale.shape != sshape:
            raise ValueError(f"scale must be float32 of shape {sshape}")
        if self.scheme == "asymmetric":
            zp = self.zero_point
            if not isinstance(zp, np.ndarray) or zp.dtype != np.int32 or zp.shape != sshape:
                raise ValueError(f"zero_point must be int32 of shape {sshape} for asymmetric data")
        elif self.zero_point is not None:
            raise ValueError("symmetric data has no zero_point (must be None)")

    def _spec(self):
        outer, channels, inner = _layout(self.shape, self.granularity, self.axis)
        return (self.bits, self.scheme, self.granularity, outer, channels, inner, self.group_size)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        """Bytes of data + scale + zero_point."""
        return self.data.nbytes + self.scale.nbytes + (0 if self.zero_point is None else self.zero_point.nbytes)

    def dequantize(self) -> np.ndarray:
        """fp32 array of the original shape: (q - zero_point) * scale."""
        zp = None if self.zero_point is None else np.ascontiguousarray(self.zero_point).reshape(-1)
        flat = _C.quant_dequantize(np.ascontiguousarray(self.data).reshape(-1),
                                   np.ascontiguousarray(self.scale).reshape(-1), zp, *self._spec())
        return flat.reshape(self.shape)

    def metadata(self) -> dict:
        """The parameters as safetensors metadata (all strings)."""
        return {"format": _FORMAT, "version": _FORMAT_VERSION, "bits": str(self.bits), "scheme": self.scheme,
                "granularity": self.granularity, "axis": str(self.axis), "group_size": str(self.group_size),
                "shape": ",".join(str(s) for s in self.shape), "dtype": self.dtype}

    def save(self, path: "str | os.PathLike") -> None:
        """Write to a safetensors file atomically (temporary name, fsync, rename)."""
        from safetensors.numpy import save_file
        path = os.fspath(path)
        # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
        tensors = {"data": np.require(self.data, requirements="C"), "scale": np.require(self.scale, requirements="C")}
        if self.zero_point is not None:
            tensors["zero_point"] = np.require(self.zero_point, requirements="C")
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=self.metadata())

    @classmethod
    def load(cls, path: "str | os.PathLike") -> "QuantizedTensor":
        """Read a file written by save(); raises aimass.CorruptDataError on a malformed file."""
        from safetensors import safe_open
        path = os.fspath(path)
        try:
            with safe_open(path, framework="np") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise _C.CorruptDataError(f"{path}: not a readable safetensors file ({exc})") from exc
        if meta.get("format") != _FORMAT:
            raise _C.CorruptDataError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected {_FORMAT!r}")
        try:
            shape_s = meta["shape"]
            shape = tuple(int(s) for s in shape_s.split(",")) if shape_s else ()
            return cls(tensors["data"], tensors["scale"], tensors.get("zero_point"), int(meta["bits"]),
                       meta["scheme"], meta["granularity"], int(meta["axis"]), int(meta["group_size"]), shape,
                       meta["dtype"])
        except (KeyError, ValueError, TypeError) as exc:
            raise _C.CorruptDataError(f"{path}: inconsistent quantized tensor ({exc})") from exc

    def __repr__(self) -> str:
        g = f", group_size={self.group_size}" if self.granularity == "group" else ""
        return (f"QuantizedTensor(shape={self.shape}, dtype={self.dtype}, bits={self.bits}, scheme={self.scheme!r}, "
                f"granularity={self.granularity!r}, axis={self.axis}{g})")


def quantize(w: Any, bits: int = 8, scheme: str = "symmetric", granularity: str = "channel", axis: int = 0,
             group_size: int = 128) -> QuantizedTensor:
    """Quantize a float array (numpy, torch, DLPack or buffer; fp32/fp16/bf16).

    bits: 8 or 4. scheme: 'symmetric' (int8 / int4 in [-qmax, qmax], no zero point) or
    'asymmetric' (uint8 / uint4 with a zero point). granularity: 'tensor' (one scale),
    'channel' (one per index of `axis`), 'group' (blocks of `group_size` consecutive
    elements of each channel's sequence). See docs/numerics.md for the exact formulas.
    """
    bits = _check_int("bits", bits)
    if bits not in _BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    _check_choice("scheme", scheme, _SCHEMES)
    _check_choice("granularity", granularity, _GRANULARITIES)
    axis = _check_int("axis", axis)
    a, dt = _array.as_numpy(w, "w")
    if dt not in _array.FLOAT_DTYPES:
        raise TypeError(f"w must be float32, float16 or bfloat16, got {dt}")
    if not a.flags.c_contiguous:
        raise ValueError("w must be C-contiguous; call .contiguous() (torch) or np.ascontiguousarray() first")
    shape = tuple(int(s) for s in a.shape)
    if a.size == 0:
        raise ValueError(f"w has no elements (shape {shape}); nothing to quantize")
    if granularity == "tensor":
        axis_n = 0
        gs = 0
    else:
        if len(shape) == 0:
            raise ValueError(f"w must have rank >= 1 for granularity={granularity!r} (got a scalar)")
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"axis={axis} is out of range for w of rank {len(shape)}")
        axis_n = axis % len(shape)
        gs = 0
        if granularity == "group":
            gs = _check_int("group_size", group_size)
            outer, _, inner = _layout(shape, granularity, axis_n)
            k = outer * inner
            if gs < 1 or k % gs:
                raise ValueError(f"group_size={gs} must divide the {k} elements of each channel "
                                 f"(shape {shape}, axis={axis_n}); pick a divisor of {k}")
    # half inputs go to C++ as they are (bf16 as its uint16 view); it widens them exactly
    outer, channels, inner = _layout(shape, granularity, axis_n)
    data, scale, zp = _C.quant_quantize(a.reshape(-1), dt, bits, scheme, granularity, outer, channels, inner, gs)
    sshape = _scale_shape(shape, granularity, axis_n, gs)
    return QuantizedTensor(data.reshape(_data_shape(shape, bits)), scale.reshape(sshape),
                           None if zp is None else zp.reshape(sshape), bits, scheme, granularity, axis_n, gs,
                           shape, dt)


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """fp32 numpy array of q's original shape."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    return q.dequantize()
