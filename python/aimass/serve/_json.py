"""JSON for the hot paths: orjson when installed (parses and writes float arrays several times faster,
and writes numpy arrays without .tolist()), else the standard library."""
from __future__ import annotations

import json

import numpy as np

try:
    import orjson
except ImportError:  # optional speed-up
    orjson = None


def loads(body):
    if orjson is not None:
        return orjson.loads(body)
    return json.loads(body)


def _default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def dumps(obj) -> bytes:
    """Compact JSON bytes; numpy arrays and scalars are written as lists and numbers."""
    if orjson is not None:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY, default=_default)
    return json.dumps(obj, separators=(",", ":"), default=_default).encode()


DecodeError = (ValueError, UnicodeDecodeError) if orjson is None else (ValueError, UnicodeDecodeError,
                                                                        orjson.JSONDecodeError)

