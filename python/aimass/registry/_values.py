"""ModelVersion and the checks of names, labels, versions and metrics."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import re
from typing import Any, Dict, List, Mapping, Optional

from ._errors import InvalidArgumentError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """One stored version. `created` is ISO-8601 UTC; `path` is the blob's file path (a local store)
    or URL (a remote one) - use Registry.fetch() for a verified local file."""
    name: str
    version: int
    sha256: str
    size: int
    created: str
    source: Optional[str]
    metrics: Dict[str, Any]
    parent: Optional[int]
    signature: Dict[str, Any]
    labels: List[str]
    path: str

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def check_name(name, what: str = "model name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgumentError(
            f"{what} {name!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit")
    return name


def check_label(label) -> str:
    check_name(label, "label")
    if label.isdigit():
        raise InvalidArgumentError(f"label {label!r} is a number and would read as a version; pick a word")
    return label


def check_version(version, what: str = "version") -> int:
    if isinstance(version, bool) or not isinstance(version, int):
        if isinstance(version, str) and version.isdigit():
            version = int(version)
        else:
            raise InvalidArgumentError(f"{what} must be a positive integer, got {version!r}")
    if version < 1:
        raise InvalidArgumentError(f"{what} must be a positive integer, got {version}")
    return version


def check_metrics(metrics) -> Dict[str, Any]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise InvalidArgumentError(f"metrics must be a dict of name -> number or string, got "
                                   f"{type(metrics).__name__}")
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or not k:
            raise InvalidArgumentError(f"metrics keys must be non-empty strings, got {k!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidArgumentError(f"metric {k!r} is {v}; only finite numbers can be stored")
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise InvalidArgumentError(f"metric {k!r} must be a number, string, bool or null, got "
                                       f"{type(v).__name__}")
        out[k] = v
    return out
