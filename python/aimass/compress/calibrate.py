"""Activation calibration: choose a per-tensor scale / zero point from sample
batches. Methods (exact definitions in docs/numerics.md):

* ``minmax``: the observed range [min, max].
* ``percentile``: clip to the ``percentile``-th percentile (symmetric: of |x|;
  asymmetric: the (100-p)-th and p-th percentiles of x), so rare outliers do not
  stretch the scale.
* ``mse``: the clipping range (a shrink factor of the observed range) that minimises
  the mean squared quantize-dequantize error over the samples.

The range then goes through the same formulas as weight quantization, per tensor.
All work is vectorised numpy; samples are held in memory (calibration sets are small:
a few batches).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np

from .. import _array

__all__ = ["Calibration", "calibrate"]

_METHODS = ("minmax", "percentile", "mse")
# mse: candidate shrink factors of the observed range (coarse grid, then a fine one
# around the best); the search runs on at most this many samples (seeded subsample).
_MSE_COARSE = 64
_MSE_FINE = 64
_MSE_MAX_SAMPLES = 1 << 20


def _params(lo: float, hi: float, bits: int, scheme: str):
    """Scale / zero point for the clipping range [lo, hi] (same formulas as quantize())."""
    f32 = np.float32
    if scheme == "symmetric":
        qmax = f32(127 if bits == 8 else 7)
        amax = max(abs(f32(lo)), abs(f32(hi)))
        scale = f32(amax) / qmax
        return (f32(1) if scale == 0 else f32(scale)), None
    qmax = f32(255 if bits == 8 else 15)
    lo, hi = min(f32(lo), f32(0)), max(f32(hi), f32(0))
    scale = f32(f32(hi - lo) / qmax)
    if not np.isfinite(scale):
        raise ValueError(f"calibrate: the range [{lo}, {hi}] overflows float32; use scheme='symmetric'")
    if scale == 0:
        scale = f32(1)
    zp = int(np.clip(np.rint(-lo / scale), f32(0), qmax))
    return scale, zp


@dataclass(frozen=True)
class Calibration:
    """Result of calibrate(): quantize activations with q = clamp(rint(x / scale) + zero_point).

    min/max: the clipping range the scale represents (symmetric: [-a, a]);
    observed_min/observed_max: what the samples held."""
    scale: float
    zero_point: Optional[int]
    min: float
    max: float
    observed_min: float
    observed_max: float
    method: str
    bits: int
    scheme: str

    @property
    def qmin(self) -> int:
        return (-(127 if self.bits == 8 else 7)) if self.scheme == "symmetric" else 0

    @property
    def qmax(self) -> int:
        if self.scheme == "symmetric":
            return 127 if self.bits == 8 else 7
        return 255 if self.bits == 8 else 15

    def quantize(self, x: Any) -> np.ndarray:
        """int32 array of quantized values (saturated to the range)."""
        a = _array.float32_array(x, "x")
        zp = np.float32(self.zero_point or 0)
        q = np.clip(np.rint(a / np.float32(self.scale)) + zp, np.float32(self.qmin), np.float32(self.qmax))
        return q.astype(np.int32)

    def dequantize(self, q: Any) -> np.ndarray:
        q = np.asarray(q, dtype=np.int32)
        return ((q - (self.zero_point or 0)).astype(np.float32) * np.float32(self.scale)).astype(np.float32)

    def fake_quantize(self, x: Any) -> np.ndarray:
        """dequantize(quantize(x)): what the model sees after quantization."""
        return self.dequantize(self.quantize(x))


def _fake_quant_error(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int, scheme: str) -> np.ndarray:
    """Mean squared quantize-dequantize error of x for each candidate range (vectorised over candidates)."""
    f32 = np.float32
    if scheme == "symmetric":
        qmax = f32(127 if bits == 8 else 7)
        scale = (np.maximum(np.abs(lo), np.abs(hi)) / qmax).astype(f32)
        scale[scale == 0] = 1
        zp = np.zeros_like(scale)
        qmin = -qmax
    else:
        qmax = f32(255 if bits == 8 else 15)
        lo, hi = np.minimum(lo, f32(0)), np.maximum(hi, f32(0))
        scale = ((hi - lo) / qmax).astype(f32)
        scale[scale == 0] = 1
        zp = np.clip(np.rint(-lo / scale), f32(0), qmax)
        qmin = f32(0)
    errs = np.empty(len(scale), np.float64)
    for i in range(0, len(scale), 8):  # 8 candidates at a time bounds the temporary memory
        s, z = scale[i:i + 8, None], zp[i:i + 8, None]
        q = np.clip(np.rint(x[None, :] / s) + z, qmin, qmax)
        d = (q - z) * s - x[None, :]
        errs[i:i + 8] = np.mean(np.square(d, dtype=np.float64), axis=1)
    return errs


def _collect(batches: Any) -> np.ndarray:
    if isinstance(batches, np.ndarray) or _array.is_torch(batches) or hasattr(batches, "__dlpack__"):
        batches = [batches]
    try:
        items = list(batches)
    except TypeError:
        raise TypeError("batches must be an array or an iterable of arrays "
                        f"(numpy, torch, DLPack); got {type(batches).__name__}") from None
    if not items:
        raise ValueError("batches is empty: calibration needs at least one batch of samples")
    flat = []
    for i, b in enumerate(items):
        a = _array.float32_array(b, f"batches[{i}]").reshape(-1)
        if a.size and not np.all(np.isfinite(a)):
            raise ValueError(f"batches[{i}] contains NaN or Inf; calibration needs finite activations")
        flat.append(a)
    x = np.concatenate(flat) if len(flat) > 1 else flat[0]
    if x.size == 0:
        raise ValueError("batches hold no elements: calibration needs at least one sample")
    return x


def calibrate(batches: Any, method: str = "minmax", bits: int = 8, scheme: str = "asymmetric",
              percentile: float = 99.99) -> Calibration:
    """Per-tensor activation scale / zero point from sample batches (array or iterable of arrays)."""
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be one of 'minmax', 'percentile', 'mse'; got {method!r}")
    if isinstance(bits, bool) or bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if scheme not in ("symmetric", "asymmetric"):
        raise ValueError(f"scheme must be 'symmetric' or 'asymmetric', got {scheme!r}")
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be a number in (50, 100], got {percentile!r}")
    x = _collect(batches)
    omin, omax = np.float32(x.min()), np.float32(x.max())
    if method == "minmax":
        lo, hi = omin, omax
    elif method == "percentile":
        if scheme == "symmetric":
            a = np.float32(np.percentile(np.abs(x), percentile))
            lo, hi = -a, a
        else:
            lo = np.float32(np.percentile(x, 100.0 - percentile))
            hi = np.float32(np.percentile(x, percentile))
    else:
        sample = x
        if x.size > _MSE_MAX_SAMPLES:
            sample = np.random.default_rng(0).choice(x, _MSE_MAX_SAMPLES, replace=False)
        if scheme == "symmetric":
            a = max(abs(omin), abs(omax))
            base_lo, base_hi = np.float32(-a), np.float32(a)
        else:
            base_lo, base_hi = min(omin, np.float32(0)), max(omax, np.float32(0))
        # shrink factors t in (0, 1]; t = 1 is minmax, so mse never does worse on the samples
        t = np.linspace(1.0 / _MSE_COARSE, 1.0, _MSE_COARSE)
        err = _fake_quant_error(sample, (base_lo * t).astype(np.float32), (base_hi * t).astype(np.float32),
                                bits, scheme)
        best = t[int(np.argmin(err))]
        step = 1.0 / _MSE_COARSE
        t2 = np.clip(np.linspace(best - step, best + step, _MSE_FINE), step / 4, 1.0)
        err2 = _fake_quant_error(sample, (base_lo * t2).astype(np.float32), (base_hi * t2).astype(np.float32),
                                 bits, scheme)
        tb = t2[int(np.argmin(err2))] if err2.min() < err.min() else best
        lo, hi = np.float32(base_lo * tb), np.float32(base_hi * tb)
    scale, zp = _params(lo, hi, bits, scheme)
    if scheme == "symmetric":
        a = max(abs(np.float32(lo)), abs(np.float32(hi)))
        lo, hi = -a, a
    else:
        lo, hi = min(np.float32(lo), np.float32(0)), max(np.float32(hi), np.float32(0))
    return Calibration(scale=float(scale), zero_point=zp, min=float(lo), max=float(hi), observed_min=float(omin),
                       observed_max=float(omax), method=method, bits=int(bits), scheme=scheme)
