"""Fused quantized linear: ``y = x @ dequant(W).T + bias`` on the engine's kernels.

Weights are symmetric int8 (per-channel, per-tensor or grouped) or symmetric int4
(grouped or per-channel) in the layout of docs/quant_format.md. They are prepacked
once into a C++ ``PackedLinear`` (cached on the quantized weight object, like
FBGEMM's packed weights) and every call picks a kernel by shape:

* ``weight_only``   weights widened on the fly (small M); int8 per-channel weights and
                    int4 weights in groups of 128k take activations rounded to 16-bit integers and exact integer dot products
                    (``activation_precision="int16"``, the default: extra error at most
                    max|x_row| / 65534 per element) or exact fp32 activations ("fp32");
* ``dynamic_int8``  activations quantized per row to int8, int8 x int8 dot products
                    with int32 accumulation (larger M; extra error, see docs/qlinear.md);
* ``dequant_sgemm`` weights dequantized panel by panel, then BLAS sgemm (fallback).

CUDA tensors (torch or anything with ``__cuda_array_interface__``) go to the CUDA
int8 weight-only GEMV when ``aimass.cuda.is_available()``.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .. import _C
from .._array import as_numpy, float32_array, is_torch, like

KERNELS = ("auto", "weight_only", "dynamic_int8", "dequant_sgemm")
ACTIVATION_PRECISIONS = ("int16", "fp32")
_QT_FIELDS = ("data", "scale", "zero_point", "bits", "group_size", "shape", "scheme", "granularity", "axis")


class PackedLinear:
    """A quantized linear weight prepacked for :func:`linear` (immutable, thread-safe).

    Build it with :func:`pack_linear` (raw arrays) or :meth:`from_quantized`
    (a QuantizedTensor); ``linear(x, packed)`` and ``packed(x)`` run it."""

    __slots__ = ("_handle", "bits", "group_size", "out_features", "in_features", "_cuda", "_src")

    def __init__(self, handle, src=None):
        self._handle = handle
        self.bits = int(handle.bits)
        self.group_size = int(handle.group_size)
        self.out_features = int(handle.out_features)
        self.in_features = int(handle.in_features)
        self._cuda = None  # device copy for the CUDA kernel, made on first CUDA call
        self._src = src    # (data, scale) in the canonical layout, kept for the CUDA copy

    @property
    def shape(self):
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return int(self._handle.nbytes)

    @classmethod
    def from_quantized(cls, qweight: Any) -> "PackedLinear":
        return _packed_from_quantized(qweight)

    def kernel_for(self, m: int) -> str:
        """The kernel ``linear`` picks for ``m`` rows at the current SIMD level."""
        return _C.qlinear_choose_kernel(self._handle, int(m))

    def plan(self, m: int, kernel: str = "auto", activation_precision: str = "int16") -> tuple:
        """``(kernel, activations)`` that ``linear`` runs for ``m`` rows: activations is
        'fp32', 'int16' or 'int8' (how x enters the dot products)."""
        _check_options(kernel, activation_precision)
        return _C.qlinear_plan(self._handle, int(m), kernel, activation_precision)

    def __call__(self, x, bias=None, *, kernel: str = "auto", activation_precision: str = "int16"):
        return linear(x, self, bias, kernel=kernel, activation_precision=activation_precision)

    def __repr__(self) -> str:
        g = "per-channel" if self.group_size == 0 else f"group_size={self.group_size}"
        return f"PackedLinear(int{self.bits}, out_features={self.out_features}, in_features={self.in_features}, {g})"


def pack_linear(data, scale, *, bits: int, shape, group_size: int = 0) -> PackedLinear:
    """Prepack raw symmetric quantized weights.

    data: int8 [N, K] (bits=8) or uint8 packed nibbles [N, K/2] / [ceil(N*K/2)] (bits=4);
    scale: float32 [N] (group_size=0, per-channel) or [N, K/group_size]; shape: (N, K)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if len(tuple(shape)) != 2:
        raise ValueError(f"shape must be (out_features, in_features), got {tuple(shape)!r}")
    n, k = (int(s) for s in shape)
    group_size = 0 if group_size is None else int(group_size)
    d, _ = as_numpy(data, "data")
    s, sdt = as_numpy(scale, "scale")
    if sdt != "float32":
        raise TypeError(f"scale must be float32, got {sdt}")
    if not d.flags.c_contiguous or not s.flags.c_contiguous:
        raise ValueError("data and scale must be C-contiguous; call np.ascontiguousarray() / .contiguous() first")
    handle = _C.qlinear_pack(bits, n, k, group_size, d, s)
    return PackedLinear(handle, src=(d, s, bits, group_size))


def _packed_from_quantized(qt: Any) -> PackedLinear:
    missing = [f for f in _QT_FIELDS if not hasattr(qt, f)]
    if missing:
        raise TypeError("qweight must be a PackedLinear or a QuantizedTensor-like object with fields "
                        f"{', '.join(_QT_FIELDS)}; {type(qt).__name__} lacks {', '.join(missing)}")
    shape = tuple(int(s) for s in qt.shape)
    if len(shape) != 2:
        raise ValueError(f"qweight must be a 2-D linear weight [out_features, in_features], got shape {shape}")
    if qt.scheme != "symmetric" or qt.zero_point is not None:
        raise ValueError(f"qweight has scheme={qt.scheme!r}; the fused linear kernels need symmetric weights "
                         "(re-quantize with scheme='symmetric', or dequantize() and use a float linear)")
    bits = int(qt.bits)
    if bits not in (4, 8):
        raise ValueError(f"qweight has bits={bits}; the fused linear kernels support 8 and 4")
    n, k = shape
    gran = qt.granularity
    scale, sdt = as_numpy(qt.scale, "qweight.scale")
    if sdt != "float32":
        raise TypeError(f"qweight.scale must be float32, got {sdt}")
    if gran == "tensor":
        scale, group_size = np.full((n,), float(np.asarray(scale).reshape(-1)[0]), np.float32), 0
    elif gran == "channel":
        if int(qt.axis) != 0:
            raise ValueError(f"qweight is per-channel along axis={qt.axis}; the fused linear needs axis=0 "
                             "(one scale per output row)")
        group_size = 0
    elif gran == "group":
        if int(qt.axis) != 0:
            raise ValueError(f"qweight is grouped along axis={qt.axis}; the fused linear needs axis=0 "
                             "(groups run along in_features)")
        group_size = int(qt.group_size)
    else:
        raise ValueError(f"qweight has granularity={gran!r}; expected 'tensor', 'channel' or 'group'")
    data, _ = as_numpy(qt.data, "qweight.data")
    return pack_linear(np.ascontiguousarray(data), np.ascontiguousarray(scale), bits=bits, shape=(n, k),
                       group_size=group_size)


def packed(qweight: Any) -> PackedLinear:
    """The PackedLinear for ``qweight``, built once and cached on the object."""
    if isinstance(qweight, PackedLinear):
        return qweight
    cached = getattr(qweight, "_aimass_packed", None)
    key = (id(getattr(qweight, "data", None)), id(getattr(qweight, "scale", None)))
    if cached is not None and cached[0] == key:
        return cached[1]
    p = _packed_from_quantized(qweight)
    try:
        qweight._aimass_packed = (key, p)
    except (AttributeError, TypeError):  # __slots__ / frozen objects: no cache, still correct
        pass
    return p


def _is_cuda_array(x: Any) -> bool:
    if is_torch(x):
        return x.device.type == "cuda"
    return hasattr(x, "__cuda_array_interface__")


def _check_options(kernel, activation_precision):
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if activation_precision not in ACTIVATION_PRECISIONS:
        raise ValueError(f"activation_precision must be one of {ACTIVATION_PRECISIONS}, got {activation_precision!r}")


def linear(x, qweight, bias=None, *, kernel: str = "auto", activation_precision: str = "int16"):
    """``y = x @ dequant(W).T + bias`` with fp32 accumulation and fp32 output.

    x: [..., K] float32/float16/bfloat16 (numpy, torch, DLPack), C-contiguous;
    qweight: PackedLinear or QuantizedTensor (symmetric int8/int4, axis 0);
    bias: [N] float or None; kernel: 'auto' (by shape), 'weight_only', 'dynamic_int8',
    'dequant_sgemm'. activation_precision: how the weight_only kernel takes x for int8
    per-channel weights and int4 weights grouped in multiples of 128: 'int16' (default; each row rounded to 16-bit integers, exact
    integer dot products, extra error <= max|x_row| / 65534 per element) or 'fp32'
    (exact). dynamic_int8 always rounds x to int8, dequant_sgemm always uses fp32; see
    ``PackedLinear.plan``. Returns float32 [..., N], a torch tensor when x is one (zero-copy)."""
    _check_options(kernel, activation_precision)
    p = packed(qweight)
    if _is_cuda_array(x):
        from . import _linear_cuda
        return _linear_cuda.linear(x, p, bias)
    a, dt = as_numpy(x, "x")
    if a.ndim < 1:
        raise ValueError("x must have at least 1 dimension [..., in_features]")
    if a.shape[-1] != p.in_features:
        raise ValueError(f"x has {a.shape[-1]} features in its last dimension but the weight has "
                         f"in_features={p.in_features}")
    if not a.flags.c_contiguous:
        raise ValueError("x must be C-contiguous; call .contiguous() (torch) or np.ascontiguousarray() first")
    xf = float32_array(x, "x") if dt != "float32" else a
    lead = xf.shape[:-1]
    x2 = xf.reshape(-1, p.in_features)
    b = None
    if bias is not None:
        b = float32_array(bias, "bias")
        if b.shape != (p.out_features,):
            raise ValueError(f"bias must have shape ({p.out_features},), got {tuple(b.shape)}")
    y = _C.qlinear_linear(p._handle, x2, b, kernel, activation_precision)
    return like(y.reshape(*lead, p.out_features), x)


def dequantize_weight(qweight) -> np.ndarray:
    """fp32 [N, K] dequantized weight (the reference the kernels are tested against)."""
    p = packed(qweight)
    if p._src is None:
        raise ValueError("this PackedLinear does not keep its source arrays")
    d, s, bits, g = p._src
    return _C.qlinear_dequantize(bits, p.out_features, p.in_features, g, d, s)


def quantize_weight(w, bits: int = 8, group_size: Optional[int] = None):
    """Symmetric quantization of a linear weight [N, K] in the layout the kernels take:
    per output channel when group_size is None/0, else groups of group_size along K.
    This is aimass.compress.quantize with those arguments (docs/numerics.md)."""
    from .quantize import quantize

    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    shape = getattr(w, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"w must be 2-D [out_features, in_features], got shape {shape}")
    g = int(group_size or 0)
    if g:
        return quantize(w, bits=bits, scheme="symmetric", granularity="group", axis=0, group_size=g)
    return quantize(w, bits=bits, scheme="symmetric", granularity="channel", axis=0)
