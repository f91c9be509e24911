"""The machine's tuning profile: ``$AIMASS_HOME/tuning.json``, written by ``aimass bench --tune``.

Layout (format 1)::

    {"format": 1,
     "profiles": {"<cpu model>|<logical cores>": {
         "created": "2026-12-04T14:30:00Z", "aimass": "0.1.0",
         "knobs": {"num_threads": 2, "fusion_threshold": 67108864, ...},
         "evidence": {"num_threads": "runtime mlp784 batch 1: 1 thread 61 us, 2 threads 45 us", ...}}}}

Precedence, highest first: an explicit argument (``Loader(num_threads=...)``,
``Session(max_batch_size=...)``, ``dist.init(fusion_threshold=...)``), then an environment
variable (``AIMASS_NUM_THREADS`` ...), then this profile, then the built-in default.

Engine knobs are applied once, at ``import aimass``, before the engine reads its
environment: each becomes the value of its environment variable when that variable is not
already set. Python-level knobs (loader and session defaults) are read with
:func:`default`. A profile that cannot be read, has a bad value, or was made on another
machine (other CPU model or core count) is ignored with one warning, never an error.
"""
from __future__ import annotations

import json
import os
import platform
import re
import warnings
from typing import Any, Dict, Optional

FORMAT = 1

_ALGO_ROW = r"\s*\d+[kmgKMG]?\s*:\s*(mpi|shm|cma)(@\d+[kmgKMG]?)?\s*"
_ALGO_PART = re.compile(r"\s*(allreduce|broadcast|allgather|reduce_scatter)\s*=" + _ALGO_ROW + "(," + _ALGO_ROW + ")*")


def valid_comm_algos(text: str) -> bool:
    """The form of AIMASS_COMM_ALGOS (the engine checks the rest at init): `kind=bytes:algo[@chunk],...;...`
    with a row for 0 bytes per kind."""
    parts = [p for p in text.split(";") if p.strip()]
    return all(_ALGO_PART.fullmatch(p) and any(c.split(":")[0].strip() == "0" for c in p.split("=", 1)[1].split(","))
               for p in parts)


# knob -> (environment variable, type, check, meaning)
ENV_KNOBS = {
    "num_threads": ("AIMASS_NUM_THREADS", int, lambda v: v >= 1, "engine CPU threads"),
    "simd": ("AIMASS_SIMD", str, lambda v: v in ("scalar", "avx2", "avx512"), "SIMD level cap"),
    "fusion_threshold": ("AIMASS_FUSION_THRESHOLD", int, lambda v: v >= 0, "dist fusion buffer bytes"),
    "cycle_time_ms": ("AIMASS_CYCLE_TIME", float, lambda v: v > 0, "dist engine cycle time, ms"),
    "shm_chunk_bytes": ("AIMASS_SHM_CHUNK_BYTES", int, lambda v: 4096 <= v <= (1 << 30),
                        "shared-memory allreduce chunk bytes"),
    "shm_min_bytes": ("AIMASS_SHM_MIN_BYTES", int, lambda v: v >= 0, "smallest allreduce on the shm path"),
    "comm_algos": ("AIMASS_COMM_ALGOS", str, valid_comm_algos,
                   "per-size collective algorithm table (docs/comm.md), e.g. 'allreduce=0:shm,16m:cma'"),
    "spin_us": ("AIMASS_SPIN_US", int, lambda v: 0 <= v <= 100_000, "pool worker polling before sleep, us"),
    "packed_max_rows": ("AIMASS_PACKED_MAX_ROWS", int, lambda v: v >= 0,
                        "largest batch on the packed small-batch fp32 kernel"),
}
PY_KNOBS = {
    "loader_threads": (int, lambda v: v >= 1, "Loader num_threads default"),
    "loader_prefetch": (int, lambda v: v >= 1, "Loader prefetch default"),
    "session_max_batch_size": (int, lambda v: v >= 1, "Session max_batch_size default"),
    "session_max_queue_delay_us": (int, lambda v: v >= 0, "Session max_queue_delay_us default"),
}
KNOBS = {**{k: v[1:] for k, v in ENV_KNOBS.items()}, **PY_KNOBS}

_loaded: Optional[Dict[str, Any]] = None
_applied: Dict[str, str] = {}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_key() -> str:
    """The key a profile is stored under: CPU model and logical core count."""
    return f"{cpu_model()}|{os.cpu_count() or 1}"


def profile_path() -> str:
    from ._home import aimass_home
    return os.path.join(aimass_home(), "tuning.json")


def validate_knobs(knobs: Any) -> Dict[str, Any]:
    """Checked copy of a knob dict; ValueError naming the first bad knob."""
    if not isinstance(knobs, dict):
        raise ValueError(f"knobs must be an object, got {type(knobs).__name__}")
    out = {}
    for name, value in knobs.items():
        if name not in KNOBS:
            raise ValueError(f"unknown knob {name!r}; known: {', '.join(sorted(KNOBS))}")
        typ, ok, _ = KNOBS[name]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or isinstance(value, bool) or not ok(value):
            raise ValueError(f"knob {name!r} has a bad value {value!r} ({KNOBS[name][2]})")
        out[name] = value
    return out


def read_profile(path: Optional[str] = None, *, key: Optional[str] = None, warn: bool = True) -> Dict[str, Any]:
    """The knobs of this machine's profile, or {} (with a warning) when it is missing a
    profile for this machine, corrupt, or has a bad value."""
    path = path or profile_path()
    if not os.path.exists(path):
        return {}
    key = key or machine_key()

    def ignore(why: str) -> Dict[str, Any]:
        if warn:
            warnings.warn(f"aimass: tuning profile {path} ignored: {why}. Rerun 'aimass bench --tune' or delete it.",
                          RuntimeWarning, stacklevel=3)
        return {}

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        return ignore(f"it cannot be read as JSON ({exc})")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("profiles"), dict):
        return ignore(f"it is not a format-{FORMAT} tuning profile")
    prof = doc["profiles"].get(key)
    if prof is None:
        return ignore(f"it has no profile for this machine ({key!r}; it has {sorted(doc['profiles'])})")
    try:
        return validate_knobs(prof.get("knobs", {}) if isinstance(prof, dict) else None)
    except ValueError as exc:
        return ignore(str(exc))


def write_profile(knobs: Dict[str, Any], evidence: Optional[Dict[str, str]] = None, path: Optional[str] = None,
                  key: Optional[str] = None) -> str:
    """Store `knobs` as this machine's profile (other machines' profiles in the file are kept),
    atomically. Returns the path."""
    import datetime
    from . import __version__
    knobs = validate_knobs(knobs)
    path = path or profile_path()
    key = key or machine_key()
    doc: Dict[str, Any] = {"format": FORMAT, "profiles": {}}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if isinstance(old, dict) and old.get("format") == FORMAT and isinstance(old.get("profiles"), dict):
                doc = old
        except (OSError, ValueError):
            pass  # a corrupt file is replaced whole
    doc["profiles"][key] = {
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "aimass": __version__, "knobs": knobs, "evidence": dict(evidence or {})}
    from ._io import atomic_write_text
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True))
    return path


def load() -> Dict[str, Any]:
    """This machine's knobs (read once per process, cached). AIMASS_TUNING=0 turns the profile off."""
    global _loaded
    if _loaded is None:
        if os.environ.get("AIMASS_TUNING", "1") == "0":
            _loaded = {}
        else:
            try:
                _loaded = read_profile()
            except ValueError as exc:  # e.g. an empty AIMASS_HOME
                warnings.warn(f"aimass: tuning profile ignored: {exc}", RuntimeWarning, stacklevel=2)
                _loaded = {}
    return _loaded


def apply_env() -> Dict[str, str]:
    """Set the environment variable of each engine knob in the profile that is not set
    already (called by ``import aimass`` before the engine starts). Returns what was set."""
    for name, value in load().items():
        if name in ENV_KNOBS:
            var = ENV_KNOBS[name][0]
            if var not in os.environ:
                os.environ[var] = str(value)
                _applied[var] = str(value)
    return dict(_applied)


def applied() -> Dict[str, str]:
    """Environment variables this process took from the profile."""
    return dict(_applied)


def default(name: str, fallback: Any) -> Any:
    """A Python-level knob's default: the profile's value, else `fallback`."""
    if name not in PY_KNOBS:
        raise KeyError(f"{name!r} is not a Python-level tuning knob")
    return load().get(name, fallback)


def reset_cache() -> None:
    """Forget the cached profile (tests)."""
    global _loaded
    _loaded = None
