"""The one place aimass reads AIMASS_HOME: the folder of its per-user state (default ``~/.aimass``).

The model registry keeps its default store in ``aimass_home() / "registry"`` and its cache of
remote blobs in ``aimass_home() / "cache"``; ``aimass bench --tune`` writes ``tuning.json`` there. Nothing is created here; callers make what they use.
"""
from __future__ import annotations

import os
from pathlib import Path


def aimass_home() -> Path:
    """The aimass state folder: ``$AIMASS_HOME`` if set (``~`` expanded), else ``~/.aimass``."""
    value = os.environ.get("AIMASS_HOME", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".aimass"
