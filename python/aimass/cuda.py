"""CUDA availability. ``import aimass`` works with or without the CUDA module
and without a GPU; ``is_available()`` tells whether GPU kernels can run."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def _module():
    try:
        from . import _cuda
    except ImportError:
        return None
    return _cuda


def built() -> bool:
    """True when aimass was compiled with its CUDA module (nvcc was present)."""
    return _module() is not None


def device_count() -> int:
    m = _module()
    return int(m.device_count()) if m is not None else 0


def is_available() -> bool:
    """True when the CUDA module is built and at least one GPU is usable."""
    return device_count() > 0


def module():
    """The compiled CUDA module; raises RuntimeError with the reason when GPUs can't be used."""
    m = _module()
    if m is None:
        raise RuntimeError("aimass was built without CUDA (nvcc was not found at build time)")
    if m.device_count() == 0:
        raise RuntimeError("no CUDA device is available: " + m.last_error())
    return m
