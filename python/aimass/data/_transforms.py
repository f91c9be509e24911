"""Transforms the C++ loader workers apply while filling a batch (fused, no GIL)."""
from __future__ import annotations

from ._format import _DTYPES

import numpy as np


class _Transform:
    kind = -1

    def __init__(self, field: str):
        if not isinstance(field, str) or not field:
            raise TypeError(f"{type(self).__name__}: field must be a field name, got {field!r}")
        self.field = field

    def spec(self) -> dict:
        d = {k: v for k, v in vars(self).items()}
        d["kind"] = self.kind
        return d

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Cast(_Transform):
    """x -> dtype(x * scale), e.g. uint8 pixels to float32 in [0, 1]."""
    kind = 0

    def __init__(self, field: str, dtype: str = "float32", scale: float = 1 / 255):
        super().__init__(field)
        if dtype not in ("float32", "float16", "bfloat16"):
            raise TypeError(f"Cast: dtype must be 'float32', 'float16' or 'bfloat16', got {dtype!r}")
        self.dtype, self.scale = dtype, float(scale)


class Normalize(_Transform):
    """x -> (x - mean[c]) / std[c] over the last (channel) dimension; fused with a preceding Cast."""
    kind = 1

    def __init__(self, field: str, mean, std):
        super().__init__(field)
        self.mean = [float(v) for v in np.atleast_1d(mean)]
        self.std = [float(v) for v in np.atleast_1d(std)]


class RandomCrop(_Transform):
    """Zero-pad an HWC image by `padding` and crop a random size[0] x size[1] window (seeded per sample)."""
    kind = 2

    def __init__(self, field: str, size, padding: int = 0):
        super().__init__(field)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.crop_h, self.crop_w, self.padding = int(h), int(w), int(padding)


class RandomHorizontalFlip(_Transform):
    """Mirror an HWC image left-right with probability p (seeded per sample)."""
    kind = 3

    def __init__(self, field: str, p: float = 0.5):
        super().__init__(field)
        self.p = float(p)


class OneHot(_Transform):
    """An integer label -> a one-hot vector of num_classes."""
    kind = 4

    def __init__(self, field: str, num_classes: int, dtype: str = "float32"):
        super().__init__(field)
        self.num_classes, self.dtype = int(num_classes), dtype


class CFunc(_Transform):
    """A user transform compiled to a C function that the C++ workers call without
    the GIL, e.g. a numba ``@cfunc(types.int32(types.voidptr, types.int64, types.voidptr,
    types.int64, types.int64, types.uint64))``. C signature (docs/format.md)::

        int32_t fn(const void* in, int64_t in_bytes, void* out, int64_t out_bytes,
                   int64_t record, uint64_t seed);   // return 0 on success

    `in` is the field as stored for one record (in_bytes = prod(stored shape) *
    itemsize), `out` the sample's slot of dtype `dtype` and per-sample `shape`
    (out_bytes bytes, all of which fn must write); `record` is the dataset index and
    `seed` a per-sample value derived from (seed, epoch, record, field) for
    reproducible randomness. A non-zero return stops the epoch with ValueError.
    `fn` is a numba cfunc (its ``.address``), a ctypes function pointer (ctypes
    callbacks take the GIL, so they are for testing), or an int address; the loader
    keeps `fn` alive. It must be the only transform on its field."""
    kind = 5

    def __init__(self, field: str, fn, dtype: str, shape):
        super().__init__(field)
        if hasattr(fn, "address"):
            address = int(fn.address)
        elif isinstance(fn, int):
            address = fn
        else:
            import ctypes
            if not isinstance(fn, ctypes._CFuncPtr):
                raise TypeError("CFunc: fn must be a numba cfunc, a ctypes function pointer or an address, "
                                f"got {type(fn).__name__}")
            address = ctypes.cast(fn, ctypes.c_void_p).value
        if not address:
            raise ValueError("CFunc: fn has a null address")
        if dtype not in _DTYPES:
            raise TypeError(f"CFunc: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.fn = fn
        self.address, self.dtype = int(address), dtype
        self.shape = [int(d) for d in ((shape,) if isinstance(shape, int) else shape)]

    def spec(self) -> dict:
        d = super().spec()
        del d["fn"]
        return d

