"""The loaded models of a server: one runtime.Session per loaded version, live label switches.

Each model of the store is served at its default version (the 'stable' label, else the newest)
plus every other labelled version (so ``/labels/canary`` and ``/versions/N`` of a labelled N work).
A background task polls ``Registry.generation()``; when labels or versions change it loads the
new versions first, then switches new requests to them, and retires the versions no longer wanted:
a retired version keeps serving the requests that already hold it and is closed when the last
one releases it. Acquire/release run on the event loop thread only, so the counts need no lock.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .errors import ServeError, log_error

log = logging.getLogger("aimass.serve")

DEFAULT_LABEL = "stable"


@dataclass(eq=False)
class LoadedVersion:
    name: str
    version: int
    session: Any
    signature: dict
    sha256: str = ""
    loaded_at: float = field(default_factory=time.time)
    inflight: int = 0
    retired: bool = False
    closed: bool = False
    calls: int = 0
    cheap: bool = False
    plans: dict = field(default_factory=dict)   # v2 binary request headers seen (kserve.Plan)


@dataclass
class ModelState:
    name: str
    versions: Dict[int, LoadedVersion] = field(default_factory=dict)
    default: Optional[int] = None
    labels: Dict[str, int] = field(default_factory=dict)
    unloaded: bool = False          # by the repository API: stays unloaded until a load request
    reason: str = ""                # why it is not (fully) available


class ModelManager:
    """Owns the Sessions. session_factory(path) -> Session (tests and the bench pass their own)."""

    def __init__(self, registry, session_factory, poll_interval_s: float = 1.0):
        self.registry = registry
        self._factory = session_factory
        self.poll_interval_s = poll_interval_s
        self.models: Dict[str, ModelState] = {}
        self._lock: Optional[asyncio.Lock] = None
        self._poller: Optional[asyncio.Task] = None
        self._generation: Optional[int] = None
        self._closing: List[asyncio.Future] = []
        self.ready = False
        self.switches = 0
        # --http native (aimass.serve.native): called after every change of the loaded versions, so the
        # front end routes by the new table; and native_busy(lv) says whether a native request may
        # still hold a retired version, whose Session then closes a little later
        self.on_change = None
        self.native_busy = None

    # -- life cycle
    async def start(self) -> None:
        self._lock = asyncio.Lock()
        self._generation = await asyncio.to_thread(self.registry.generation)
        await self.refresh()
        self.ready = True
        if self.poll_interval_s > 0:
            self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        self.ready = False
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except (asyncio.CancelledError, Exception):
                pass
        self.native_busy = None     # the front end has stopped before this (native.NativeFront.stop)
        for st in self.models.values():
            for lv in list(st.versions.values()):
                self._retire(lv)
            st.versions.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                gen = await asyncio.to_thread(self.registry.generation)
                if gen != self._generation:
                    self._generation = gen
                    await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a store hiccup must not stop the poller
                log_error("registry_poll_failed", exc)

    # -- requests
    def acquire(self, name: str, version: Optional[int] = None, label: Optional[str] = None) -> LoadedVersion:
        st = self.models.get(name)
        if st is None:
            raise ServeError(404, f"unknown model '{name}' (loaded: {sorted(self.models) or 'none'})")
        if st.unloaded or st.default is None:
            raise ServeError(503, f"model '{name}' is not loaded{': ' + st.reason if st.reason else ''}; "
                                  f"an admin can load it with POST /v2/repository/models/{name}/load")
        if label is not None:
            if label not in st.labels:
                raise ServeError(404, f"model '{name}' has no label '{label}' (labels: {sorted(st.labels) or 'none'})")
            version = st.labels[label]
        v = st.default if version is None else version
        lv = st.versions.get(v)
        if lv is None:
            raise ServeError(404, f"version {v} of model '{name}' is not loaded (loaded: {sorted(st.versions)}); "
                                  "the server loads the default ('stable', else newest) and labelled versions")
        lv.inflight += 1
        return lv

    def release(self, lv: LoadedVersion) -> None:
        lv.inflight -= 1
        if lv.retired and lv.inflight == 0:
            self._close(lv)

    def current(self, name: str) -> Optional[LoadedVersion]:
        st = self.models.get(name)
        return None if st is None or st.default is None else st.versions.get(st.default)

    def loaded(self) -> List[LoadedVersion]:
        return [lv for st in self.models.values() for lv in st.versions.values()]

    # -- store changes
    async def refresh(self, only: Optional[str] = None) -> None:
        """Bring the loaded versions in line with the store (all models, or just `only`)."""
        async with self._lock:
            listing = await asyncio.to_thread(self.registry.list)
            seen = set()
            for entry in listing:
                name = entry["name"]
                seen.add(name)
                if only is not None and name != only:
                    continue
                st = self.models.setdefault(name, ModelState(name))
                if st.unloaded:
                    continue
                await self._sync_model(st, entry)
            for name in [n for n in self.models if n not in seen and (only is None or n == only)]:
                st = self.models.pop(name)       # deleted from the store
                self._changed()
                for lv in st.versions.values():
                    self._retire(lv)
            self._changed()

    async def _sync_model(self, st: ModelState, entry: dict) -> None:
        labels = {k: int(v) for k, v in (entry.get("labels") or {}).items()}
        versions = entry.get("versions") or []
        default = labels.get(DEFAULT_LABEL, versions[-1] if versions else None)
        wanted = sorted({v for v in [default, *labels.values()] if v is not None})
        fresh: Dict[int, LoadedVersion] = {}
        failed = []
        for v in wanted:
            if v in st.versions:
                continue
            try:
                fresh[v] = await asyncio.to_thread(self._load, st.name, v)
            except Exception as exc:
                failed.append(f"version {v}: {exc}")
                log_error("model_load_failed", exc, model=st.name, version=v)
        # switch: from here new requests see the new mapping; old holders keep their LoadedVersion
        keep = {v: st.versions[v] for v in wanted if v in st.versions}
        keep.update(fresh)
        old = [lv for v, lv in st.versions.items() if v not in keep]
        if default is not None and default not in keep:
            # the new default failed to load: keep serving the previous default rather than nothing
            prev = st.versions.get(st.default) if st.default is not None else None
            if prev is not None:
                keep[prev.version] = prev
                old = [lv for lv in old if lv is not prev]
                default = prev.version
            else:
                default = None
        if st.default is not None and default != st.default:
            self.switches += 1
            log.info('{"event": "switch", "model": "%s", "from": %s, "to": %s}', st.name, st.default, default)
        st.versions, st.default = keep, default
        st.labels = {k: v for k, v in labels.items() if v in keep}
        st.reason = "; ".join(failed)
        self._changed()
        for lv in old:
            self._retire(lv)

    def _load(self, name: str, version: int) -> LoadedVersion:
        path = self.registry.fetch(name, version)   # sha256-verified local file
        sess = self._factory(path)
        mv = self.registry.resolve(name, version=version)
        log.info('{"event": "load", "model": "%s", "version": %d}', name, version)
        return LoadedVersion(name, version, sess, sess.signature, sha256=getattr(mv, "sha256", ""))

    async def load(self, name: str) -> None:
        st = self.models.get(name)
        if st is not None:
            st.unloaded = False
        listing = await asyncio.to_thread(self.registry.list)
        if not any(e["name"] == name for e in listing):
            raise ServeError(404, f"model '{name}' is not in the store")
        await self.refresh(only=name)
        st = self.models[name]
        if st.default is None:
            raise ServeError(400, f"failed to load model '{name}': {st.reason or 'no versions'}")

    async def unload(self, name: str) -> None:
        async with self._lock:
            st = self.models.get(name)
            if st is None:
                raise ServeError(404, f"unknown model '{name}'")
            st.unloaded, st.reason = True, "unloaded by the repository API"
            old = list(st.versions.values())
            st.versions, st.default, st.labels = {}, None, {}
            self._changed()
            for lv in old:
                self._retire(lv)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- retiring
    def _retire(self, lv: LoadedVersion) -> None:
        if lv.retired:
            return
        lv.retired = True
        if lv.inflight == 0:
            self._close(lv)

    def _retry_close(self, lv: LoadedVersion) -> None:
        lv.__dict__["_close_pending"] = False
        if lv.inflight == 0:
            self._close(lv)

    def _close(self, lv: LoadedVersion) -> None:
        if lv.closed:
            return
        if self.native_busy is not None and self.native_busy(lv):
            # a request of the native front end may still hold it: look again shortly
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                if not lv.__dict__.get("_close_pending"):
                    lv.__dict__["_close_pending"] = True
                    loop.call_later(0.005, self._retry_close, lv)
                return
        lv.closed = True
        log.info('{"event": "close", "model": "%s", "version": %d}', lv.name, lv.version)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            lv.session.close()
            return
        fut = loop.run_in_executor(None, lv.session.close)
        self._closing.append(fut)
        fut.add_done_callback(lambda f: self._closing.remove(f))

