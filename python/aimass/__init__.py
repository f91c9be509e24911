"""aimass: a C++/CUDA engine for the whole life of a model, under a thin Python API.

Areas are submodules, imported on first use: ``aimass.compress``, ``aimass.dist``,
``aimass.data``, ``aimass.runtime``, ``aimass.cuda`` ...
"""
from __future__ import annotations

import importlib as _importlib

from . import _tuning

# The machine's tuning profile (aimass bench --tune) sets engine knobs that the environment
# does not, before the engine reads its environment.
_tuning.apply_env()

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only when the build is missing or broken
    raise ImportError(
        "aimass's compiled engine (aimass._C) could not be loaded: " + str(exc) +
        ". Install with 'python -m pip install -r requirements.txt && "
        "python -m pip install --no-build-isolation .' (see README.md)."
    ) from exc

__version__ = "0.1.0"

DistributedError = _C.DistributedError
CorruptDataError = _C.CorruptDataError
QueueFullError = _C.QueueFullError
ClosedError = _C.ClosedError

_SUBMODULES = {"compress", "dist", "data", "runtime", "serve", "registry", "bench", "cli", "cuda", "train"}


def cpu_features() -> dict:
    """CPU features detected at run time and the SIMD level the kernels use ('simd')."""
    return dict(_C.cpu_features())


def set_simd_level(level: str) -> str:
    """Cap the SIMD level ('scalar', 'avx2', 'avx512'); returns the level now in force.

    The environment variable AIMASS_SIMD does the same at start-up."""
    return _C.set_simd_level(level)


def num_threads() -> int:
    """Threads the engine's CPU kernels use."""
    return _C.num_threads()


def set_num_threads(n: int) -> None:
    """Set the engine's (and its BLAS's) CPU thread count; AIMASS_NUM_THREADS does it at start-up."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads: n must be an int >= 1, got {n!r}")
    _C.set_num_threads(n)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'aimass' has no attribute {name!r}")


__all__ = [
    "DistributedError", "CorruptDataError", "QueueFullError", "ClosedError",
    "cpu_features", "set_simd_level", "num_threads", "set_num_threads", "__version__",
]
