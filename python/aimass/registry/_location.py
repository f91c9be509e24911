"""Where a Registry keeps its metadata and blobs, from Registry(store, blobs) and the environment."""
from __future__ import annotations

import os
from pathlib import Path

from .._home import aimass_home
from . import _meta as M
from ._errors import InvalidArgumentError


def resolve_store(store, blobs):
    """(database URL, blob spec, default blob root, local staging root) for Registry(store, blobs)."""
    if store is None:
        store = os.environ.get("AIMASS_REGISTRY", "").strip() or str(aimass_home() / "registry")
    if blobs is None:
        blobs = os.environ.get("AIMASS_REGISTRY_BLOBS", "").strip() or None
    if not isinstance(store, (str, os.PathLike)):
        raise InvalidArgumentError(f"registry store must be a folder or database URL, got {type(store).__name__}")
    store = os.fspath(store)
    if store.startswith("file://"):
        store = store[len("file://"):]
    if "://" not in store:
        root = Path(store).expanduser().absolute()
        if root.exists() and not root.is_dir():
            raise InvalidArgumentError(f"registry store {root} is a file, not a folder; give a folder or "
                                       "a database URL (sqlite:///PATH, postgresql://...)")
        root.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{root / 'registry.db'}", blobs, root, root
    url = M.normalize_url(store)
    if url.get_backend_name() == "sqlite":
        db = Path(url.database).expanduser().absolute()
        db.parent.mkdir(parents=True, exist_ok=True)
        return url.set(database=str(db)), blobs, db.parent, db.parent
    return url, blobs, None, aimass_home()
