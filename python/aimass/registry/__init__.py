"""aimass.registry: a versioned model store with labels, history and rollback.

    from aimass.registry import Registry
    reg = Registry()                     # $AIMASS_REGISTRY, else $AIMASS_HOME/registry (~/.aimass/registry)
    v = reg.push("mlp.aimass", "mnist", label="canary", metrics={"accuracy": 0.98})
    reg.promote("mnist")                 # stable <- canary's version
    path = reg.fetch("mnist", v)         # verified (sha256) local file for aimass.runtime.Session
    reg.rollback("mnist")                # stable back to the version it had before

Store locations (``Registry(store=None, blobs=None)``; CLI ``--store`` / ``--blobs``; env
``AIMASS_REGISTRY`` / ``AIMASS_REGISTRY_BLOBS``):
  * a folder: metadata in ``<folder>/registry.db`` (SQLite, WAL), blobs in ``<folder>/blobs/sha256/<hex>``;
  * ``sqlite:///PATH``: that database, blobs beside it unless ``blobs`` is given;
  * ``postgresql://USER[:PW]@HOST[:PORT]/DB`` (psycopg): ``blobs`` is required;
  * ``blobs``: a folder, or an fsspec URL (``s3://``, ``gs://``, ``file://``, ``memory://``); remote
    blobs are fetched into ``$AIMASS_HOME/cache`` and verified there.

API (stable; the HTTP server builds on it):
  * ``push(path, name, label=None, metrics=None, source=None, parent=None) -> int`` the new version;
    versions start at 1 per model, only grow, and a deleted number is never reused.
  * ``list() -> [{"name", "created", "versions": [int], "latest", "labels": {label: version}}]``
  * ``versions(name) -> [ModelVersion]`` oldest first.
  * ``resolve(name, version=None, label=None) -> ModelVersion`` (``show`` is the same): the version,
    else the label's, else label 'stable', else the newest.
  * ``fetch(name, version=None, label=None) -> str`` local path, sha256 verified on every call.
  * ``set_label(name, label, version) -> previous or None``; ``remove_label(name, label)``;
    ``promote(name, from_label="canary", to_label="stable") -> version``;
    ``rollback(name, label="stable") -> version``; ``label_history(name, label) -> [dict]``.
  * ``delete(name, version) -> ModelVersion`` (refused while labelled); ``gc(grace_s=3600, dry_run=False)``;
    ``check(deep=False) -> [problem]``.
  * ``generation() -> int``: moves on every version/label change; poll it to notice changes.
  * ``ModelVersion``: name, version, sha256, size, created (ISO-8601 UTC), source, metrics (dict),
    parent, signature (``{"inputs": [...], "outputs": [...]}`` as ``aimass.runtime.Model``), labels
    (list), path (blob file or URL); ``.to_dict()``.

Errors: ``RegistryError`` and its subclasses ``NotFoundError`` (LookupError; HTTP 404),
``ConflictError`` (ValueError; 409), ``InvalidArgumentError`` (ValueError; 400), ``IntegrityError``
(aimass.CorruptDataError; a blob missing or not matching its sha256, or a push that is not a model).
Names and labels: 1-128 of ``[A-Za-z0-9._-]`` starting alphanumeric; labels are not all digits.
See docs/registry.md.
"""
from __future__ import annotations

import importlib as _importlib

from ._errors import ConflictError, IntegrityError, InvalidArgumentError, NotFoundError, RegistryError

# imported on first use, so that `aimass <any command>` does not pay for SQLAlchemy
_LAZY = {"Registry": "_core", "DEFAULT_LABEL": "_core", "ModelVersion": "_values"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Registry", "ModelVersion", "RegistryError", "NotFoundError", "ConflictError",
           "InvalidArgumentError", "IntegrityError", "DEFAULT_LABEL", "add_cli"]


def add_cli(subparsers) -> None:
    """Register ``aimass registry ...`` (aimass.registry.cli)."""
    from .cli import add_cli as _add
    _add(subparsers)
