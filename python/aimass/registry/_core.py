"""Registry: the public API over the metadata store (_meta) and the blob store (_blobs)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import sqlalchemy as sa

from .._home import aimass_home
from . import _meta as M
from ._blobs import fault, open_blobs, stage_copy
from ._errors import ConflictError, IntegrityError, InvalidArgumentError, NotFoundError
from ._location import resolve_store
from ._values import ModelVersion, _iso, check_label, check_metrics, check_name, check_version

__all__ = ["Registry", "ModelVersion", "DEFAULT_LABEL"]

DEFAULT_LABEL = "stable"
DEFAULT_GC_GRACE_S = 3600.0


class Registry:
    """A versioned model store. See the package docstring for the whole API."""

    def __init__(self, store: Union[str, os.PathLike, None] = None, blobs: Union[str, os.PathLike, None] = None):
        url, blob_spec, default_root, local_root = resolve_store(store, blobs)
        cache = aimass_home() / "cache" / "blobs" / "sha256"
        self._blobs = open_blobs(blob_spec, default_root, cache, Path(local_root) / "tmp")
        self._meta = M.MetaStore(url if isinstance(url, str) else url.render_as_string(hide_password=False))

    # ---- plumbing
    @property
    def store(self) -> str:
        """Where the metadata lives (password hidden)."""
        return self._meta.display

    @property
    def blob_store(self) -> str:
        return self._blobs.display

    def __repr__(self):
        return f"aimass.registry.Registry(store={self.store!r}, blobs={self.blob_store!r})"

    def close(self) -> None:
        self._meta.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def generation(self) -> int:
        """A counter that moves on every change of any version or label (one cheap query)."""
        return self._meta.generation()

    # ---- reads
    def _model_id(self, conn, name: str) -> int:
        mid = conn.execute(sa.select(M.models.c.id).where(M.models.c.name == check_name(name))).scalar()
        if mid is None:
            raise NotFoundError(f"no model named {name!r} in the registry ({self.store}); "
                                "'aimass registry list' shows what is there")
        return mid

    def _labels_of(self, conn, mid: int) -> Dict[str, int]:
        rows = conn.execute(sa.select(M.labels.c.label, M.labels.c.version)
                            .where(M.labels.c.model_id == mid).order_by(M.labels.c.label))
        return {r.label: r.version for r in rows}

    def _mv(self, name: str, row, labels: Dict[str, int]) -> ModelVersion:
        return ModelVersion(
            name=name, version=row.version, sha256=row.sha256, size=int(row.size), created=_iso(row.created),
            source=row.source, metrics=json.loads(row.metrics), parent=row.parent,
            signature=json.loads(row.signature),
            labels=sorted(k for k, v in labels.items() if v == row.version), path=self._blobs.path(row.sha256))

    def _version_row(self, conn, mid: int, name: str, version: int):
        row = conn.execute(sa.select(M.versions).where(M.versions.c.model_id == mid,
                                                       M.versions.c.version == version)).first()
        if row is None:
            raise NotFoundError(f"model {name!r} has no version {version}; 'aimass registry show {name}' "
                                "lists its versions")
        return row

    def list(self) -> List[Dict[str, Any]]:
        """Every model: {"name", "created", "versions": [int], "latest", "labels": {label: version}}."""
        with self._meta.read() as conn:
            ms = conn.execute(sa.select(M.models).order_by(M.models.c.name)).all()
            vs = conn.execute(sa.select(M.versions.c.model_id, M.versions.c.version)
                              .order_by(M.versions.c.version)).all()
            ls = conn.execute(sa.select(M.labels.c.model_id, M.labels.c.label, M.labels.c.version)
                              .order_by(M.labels.c.label)).all()
        vmap: Dict[int, List[int]] = {}
        lmap: Dict[int, Dict[str, int]] = {}
        for r in vs:
            vmap.setdefault(r.model_id, []).append(r.version)
        for r in ls:
            lmap.setdefault(r.model_id, {})[r.label] = r.version
        out = []
        for m in ms:
            vlist = vmap.get(m.id, [])
            out.append({"name": m.name, "created": _iso(m.created), "versions": vlist,
                        "latest": vlist[-1] if vlist else None, "labels": lmap.get(m.id, {})})
        return out

    def versions(self, name: str) -> List[ModelVersion]:
        """Every stored version of `name`, oldest first."""
        with self._meta.read() as conn:
            mid = self._model_id(conn, name)
            labels = self._labels_of(conn, mid)
            rows = conn.execute(sa.select(M.versions).where(M.versions.c.model_id == mid)
                                .order_by(M.versions.c.version)).all()
        return [self._mv(name, r, labels) for r in rows]

    def resolve(self, name: str, version: Optional[int] = None, label: Optional[str] = None) -> ModelVersion:
        """The version asked for: `version`, else `label`'s version, else the 'stable' label's, else the newest."""
        if version is not None and label is not None:
            raise InvalidArgumentError("give a version or a label, not both")
        with self._meta.read() as conn:
            mid = self._model_id(conn, name)
            labels = self._labels_of(conn, mid)
            if version is not None:
                version = check_version(version)
            elif label is not None:
                if check_label(label) not in labels:
                    raise NotFoundError(f"model {name!r} has no label {label!r} (its labels: "
                                        f"{sorted(labels) or 'none'})")
                version = labels[label]
            elif DEFAULT_LABEL in labels:
                version = labels[DEFAULT_LABEL]
            else:
                version = conn.execute(sa.select(sa.func.max(M.versions.c.version))
                                       .where(M.versions.c.model_id == mid)).scalar()
                if version is None:
                    raise NotFoundError(f"model {name!r} has no versions left")
            row = self._version_row(conn, mid, name, version)
        return self._mv(name, row, labels)

    show = resolve

    def fetch(self, name: str, version: Optional[int] = None, label: Optional[str] = None) -> str:
        """A local path of the version's artifact after verifying its sha256 (IntegrityError if not)."""
        mv = self.resolve(name, version=version, label=label)
        return self._blobs.fetch(mv.sha256)

    def label_history(self, name: str, label: str) -> List[Dict[str, Any]]:
        """Every change of `label`, oldest first: {"version", "previous", "action", "changed"}."""
        check_label(label)
        with self._meta.read() as conn:
            mid = self._model_id(conn, name)
            rows = self._history_rows(conn, mid, label)
        return [{"label": label, "version": r.version, "previous": r.previous, "action": r.action,
                 "changed": _iso(r.changed)} for r in rows]

    def _history_rows(self, conn, mid: int, label: str):
        h = M.label_history
        return conn.execute(sa.select(h).where(h.c.model_id == mid, h.c.label == label).order_by(h.c.id)).all()

    # ---- writes
    def push(self, path, name: str, label: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None,
             source: Optional[str] = None, parent: Optional[int] = None) -> int:
        """Store the .aimass file at `path` as the next version of `name`; returns the version.

        The file is copied and hashed, validated as a model (its signature is recorded), written to
        the blob store durably, and only then is the version row committed (with `label` pointing at
        it, if given). A crash at any point leaves no visible version; 'gc' removes what was left."""
        from .. import runtime

        check_name(name)
        if label is not None:
            check_label(label)
        metrics = check_metrics(metrics)
        if parent is not None:
            parent = check_version(parent, "parent")
        if source is not None and not isinstance(source, str):
            raise InvalidArgumentError(f"source must be a string, got {type(source).__name__}")
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidArgumentError(f"push: path must be a file path, got {type(path).__name__}")
        path = Path(path)
        if not path.is_file():
            raise InvalidArgumentError(f"push: {path} is not a file")
        if source is None:
            source = str(path.absolute())

        if parent is not None:  # checked again in the transaction; here so a bad push stores nothing
            with self._meta.read() as conn:
                nxt = conn.execute(sa.select(M.models.c.next_version).where(M.models.c.name == name)).scalar() or 1
            self._check_parent(name, parent, nxt)

        staged, sha, size = stage_copy(str(path), self._blobs.staging_dir())
        try:
            fault("staged")
            try:  # validate the copy that will be stored, not the file that may still change
                signature = runtime.load(staged).signature
            except (ValueError, OSError) as exc:
                raise InvalidArgumentError(f"push: {path} is not a valid .aimass model: {exc}") from None
            self._blobs.commit(staged, sha)
        finally:
            staged.unlink(missing_ok=True)
        fault("blob")

        now = time.time()
        with self._meta.write() as conn:
            mid = conn.execute(sa.select(M.models.c.id).where(M.models.c.name == name)).scalar()
            if mid is None:
                mid = conn.execute(M.models.insert().values(name=name, created=now, next_version=1)
                                   ).inserted_primary_key[0]
            version = conn.execute(sa.select(M.models.c.next_version).where(M.models.c.id == mid)).scalar_one()
            if parent is not None:
                self._check_parent(name, parent, version)
            if not self._blobs.exists(sha):  # a gc with grace 0 ran between the upload and here
                raise IntegrityError(f"push: the artifact {sha} vanished before it was recorded "
                                     "(a 'gc --grace 0' ran during the push); push again")
            conn.execute(M.models.update().where(M.models.c.id == mid).values(next_version=version + 1))
            conn.execute(M.versions.insert().values(
                model_id=mid, version=version, sha256=sha, size=size, created=now, source=source,
                metrics=json.dumps(metrics, sort_keys=True), parent=parent,
                signature=json.dumps(signature, sort_keys=True)))
            if label is not None:
                self._set_label(conn, mid, label, version, "set", now)
            fault("txn")
        fault("committed")
        return version

    @staticmethod
    def _check_parent(name: str, parent: int, next_version: int) -> None:
        if parent >= next_version:
            raise InvalidArgumentError(f"push: parent version {parent} of {name!r} does not exist "
                                       f"(its newest version number so far is {next_version - 1})")

    def _set_label(self, conn, mid: int, label: str, version: Optional[int], action: str, now: float):
        cur = conn.execute(sa.select(M.labels.c.version).where(M.labels.c.model_id == mid,
                                                              M.labels.c.label == label)).scalar()
        if cur == version and action != "rollback":
            return cur
        if version is None:
            conn.execute(M.labels.delete().where(M.labels.c.model_id == mid, M.labels.c.label == label))
        elif cur is None:
            conn.execute(M.labels.insert().values(model_id=mid, label=label, version=version, updated=now))
        else:
            conn.execute(M.labels.update().where(M.labels.c.model_id == mid, M.labels.c.label == label)
                         .values(version=version, updated=now))
        conn.execute(M.label_history.insert().values(model_id=mid, label=label, version=version, previous=cur,
                                                     action=action, changed=now))
        return cur

    def set_label(self, name: str, label: str, version: int) -> Optional[int]:
        """Point `label` at `version` (recorded in the label's history); returns the version it had."""
        check_label(label)
        version = check_version(version)
        with self._meta.write() as conn:
            mid = self._model_id(conn, name)
            self._version_row(conn, mid, name, version)
            return self._set_label(conn, mid, label, version, "set", time.time())

    def remove_label(self, name: str, label: str) -> int:
        """Remove `label` (recorded in its history, so rollback can restore it); returns its version."""
        check_label(label)
        with self._meta.write() as conn:
            mid = self._model_id(conn, name)
            cur = self._labels_of(conn, mid).get(label)
            if cur is None:
                raise NotFoundError(f"model {name!r} has no label {label!r}")
            self._set_label(conn, mid, label, None, "remove", time.time())
            return cur

    def promote(self, name: str, from_label: str = "canary", to_label: str = DEFAULT_LABEL) -> int:
        """Point `to_label` at the version `from_label` points at; returns that version."""
        check_label(from_label)
        check_label(to_label)
        with self._meta.write() as conn:
            mid = self._model_id(conn, name)
            labels = self._labels_of(conn, mid)
            if from_label not in labels:
                raise NotFoundError(f"model {name!r} has no label {from_label!r} to promote (its labels: "
                                    f"{sorted(labels) or 'none'})")
            self._set_label(conn, mid, to_label, labels[from_label], "set", time.time())
            return labels[from_label]

    def rollback(self, name: str, label: str = DEFAULT_LABEL) -> int:
        """Return `label` to the version it had before its last change (skipping versions deleted
        since); repeated rollbacks walk further back. Returns the version it now points at."""
        check_label(label)
        with self._meta.write() as conn:
            mid = self._model_id(conn, name)
            stack = _label_stack(self._history_rows(conn, mid, label))
            alive = set(conn.execute(sa.select(M.versions.c.version).where(M.versions.c.model_id == mid)).scalars())
            current = stack.pop() if stack else None
            while stack and (stack[-1] is None or stack[-1] not in alive or stack[-1] == current):
                stack.pop()
            if not stack:
                raise ConflictError(f"label {label!r} of model {name!r} has no earlier version to roll back "
                                    "to; set it explicitly with 'aimass registry label'")
            self._set_label(conn, mid, label, stack[-1], "rollback", time.time())
            return stack[-1]

    def delete(self, name: str, version: int) -> ModelVersion:
        """Delete a version (refused while a label points at it); 'gc' later frees its blob if unshared.
        Its number is never handed out again. Returns what was deleted."""
        version = check_version(version)
        with self._meta.write() as conn:
            mid = self._model_id(conn, name)
            labels = self._labels_of(conn, mid)
            row = self._version_row(conn, mid, name, version)
            held = sorted(k for k, v in labels.items() if v == version)
            if held:
                raise ConflictError(f"version {version} of {name!r} is labelled {held}; move or remove the "
                                    "label(s) first ('aimass registry label')")
            conn.execute(M.versions.delete().where(M.versions.c.model_id == mid, M.versions.c.version == version))
        return self._mv(name, row, {})

    # ---- maintenance
    def gc(self, grace_s: float = DEFAULT_GC_GRACE_S, dry_run: bool = False) -> Dict[str, Any]:
        """Remove blobs no version references and temp files of killed pushes, both older than
        `grace_s` seconds (the grace protects pushes in flight; 0 only when none is running)."""
        if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or grace_s < 0:
            raise InvalidArgumentError(f"gc: grace_s must be a number >= 0, got {grace_s!r}")
        with self._meta.read() as conn:
            referenced = set(conn.execute(sa.select(M.versions.c.sha256).distinct()).scalars())
        blobs, temps, freed = [], [], 0
        for sha, age, size in list(self._blobs.list_blobs()):
            if sha not in referenced and age >= grace_s:
                blobs.append(sha)
                freed += size
                if not dry_run:
                    self._blobs.remove_blob(sha)
        for p, age, size in list(self._blobs.list_temp()):
            if age >= grace_s:
                temps.append(p)
                freed += size
                if not dry_run:
                    self._blobs.remove_temp(p)
        return {"removed_blobs": blobs, "removed_temp": temps, "bytes_freed": freed, "dry_run": bool(dry_run)}

    def check(self, deep: bool = False) -> List[str]:
        """Problems found (empty: consistent): versions whose blob is missing (or, with `deep`, does
        not match its sha256), labels pointing at no version."""
        problems = []
        with self._meta.read() as conn:
            names = dict(conn.execute(sa.select(M.models.c.id, M.models.c.name)).all())
            rows = conn.execute(sa.select(M.versions.c.model_id, M.versions.c.version, M.versions.c.sha256)).all()
            lrows = conn.execute(sa.select(M.labels)).all()
        have = {(r.model_id, r.version) for r in rows}
        for r in rows:
            try:
                if deep:
                    self._blobs.fetch(r.sha256)
                elif not self._blobs.exists(r.sha256):
                    raise IntegrityError(f"blob {self._blobs.path(r.sha256)} is missing")
            except IntegrityError as exc:
                problems.append(f"{names[r.model_id]} v{r.version}: {exc}")
        for r in lrows:
            if (r.model_id, r.version) not in have:
                problems.append(f"{names[r.model_id]}: label {r.label!r} points at missing version {r.version}")
        return problems


def _label_stack(rows) -> List[Optional[int]]:
    """Replay a label's history into the stack of values rollback walks back through."""
    stack: List[Optional[int]] = []
    for r in rows:
        if r.action == "rollback":
            if stack:
                stack.pop()
            while stack and stack[-1] != r.version:
                stack.pop()
            if not stack:
                stack.append(r.version)
        else:
            stack.append(r.version)
    return stack
