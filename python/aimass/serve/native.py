"""``aimass serve --http native``: the C++ front end (aimass_core/src/serve/frontend.cc) on the public
socket, the uvicorn app on a private loopback port behind it (docs/serving.md, "The native front end").

Python keeps the control plane. This module pushes the routing table to the front end whenever the
loaded versions change (ModelManager.on_change), lets a retired version's Session close only once no
native request may hold it (ModelManager.native_busy), shares the token buckets with auth.py (one
bucket per token, kept in C++), merges the front end's request counts and latency into /metrics and
the dashboard, and turns the errors it answered itself (503 queue full / closed, 504) into the usual
JSON log lines. Every request the front end does not answer natively reaches the app through uvicorn
unchanged, so every error keeps its Python status and message.
"""
from __future__ import annotations

import itertools
import json
import logging
import threading
from typing import Optional

from .. import _C
from .auth import AuthError
from .errors import ServeError, log_error
from .metrics import LATENCY_BUCKETS

log = logging.getLogger("aimass.serve")


def unavailable() -> Optional[str]:
    """Why the native front end cannot run here, or None."""
    if not hasattr(_C, "NativeFrontend"):
        return "this build of aimass has no native front end; use --http uvicorn"
    if not _C.native_frontend_available():
        return ("the native front end was compiled out: OpenSSL's libcrypto headers (Debian: libssl-dev) were "
                "missing when aimass was built; install them and reinstall aimass, or use --http uvicorn")
    return None


class _SharedBucket:
    """auth.TokenBucket's interface over the front end's bucket for the same token, so a token's rate
    holds across the requests answered natively and those answered by Python."""

    __slots__ = ("_f", "_digest", "rate", "burst")

    def __init__(self, front, digest: bytes, rate: float, burst: float):
        self._f, self._digest, self.rate, self.burst = front, digest, rate, burst

    def take(self, now=None) -> float:
        return self._f.take_token(self._digest)


class NativeFront:
    def __init__(self, srv, host: str, port: int, upstream_port: int, max_connections: int = 1024,
                 idle_timeout_s: float = 5.0):
        why = unavailable()
        if why:
            raise RuntimeError(why)
        c = srv.config
        deadline_us = -1 if c.deadline_ms is None else int(c.deadline_ms * 1000)
        self.f = _C.NativeFrontend(host, port, upstream_port, max_connections, idle_timeout_s, deadline_us,
                                   c.max_body_bytes, list(LATENCY_BUCKETS))
        self.srv = srv
        self.port = self.f.port
        self.host, self.upstream_port = host, upstream_port
        self._keys = itertools.count(1)
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._errors_thread: Optional[threading.Thread] = None
        srv.native = self
        srv.metrics.native = self
        srv.manager.on_change = self.push_routes
        srv.manager.native_busy = self.busy
        self._install_tokens()

    # -- control plane
    def _key(self, lv) -> int:
        k = lv.__dict__.get("_native_key")
        if k is None:
            k = lv.__dict__["_native_key"] = next(self._keys)
        return k

    def push_routes(self) -> None:
        """The loaded versions, their labels and /predict's model, to the front end (one atomic swap)."""
        models = []
        for name, st in list(self.srv.manager.models.items()):
            if st.unloaded or st.default is None:
                models.append((name, -1, [], {}))
                continue
            vers = [(self._key(lv), v, lv.session._batcher) for v, lv in st.versions.items()
                    if not lv.retired and not lv.closed and hasattr(getattr(lv, "session", None), "_batcher")]
            models.append((name, st.default, vers, dict(st.labels)))
        try:
            predict = self.srv.default_model()
        except ServeError:
            predict = ""
        self.f.set_routes(models, predict)

    def busy(self, lv) -> bool:
        k = lv.__dict__.get("_native_key")
        return k is not None and self.f.version_busy(k)

    def _install_tokens(self) -> None:
        table = self.srv.tokens
        if table is None:
            self.f.set_tokens([], False)
            return
        entries = []
        for digest, tok in table._tokens.items():
            rate = burst = 0.0
            if tok.bucket is not None:
                rate, burst = float(tok.bucket.rate), float(tok.bucket.burst)
                tok.bucket = _SharedBucket(self.f, digest, rate, burst)
            # auth.py's 403 and 429 messages, made here so that the front end answers in its words exactly
            entries.append((tok.name, digest, "infer" in tok.scopes,
                            None if tok.models is None else sorted(tok.models), rate, burst,
                            f"token '{tok.name}' lacks scope 'infer' (has {sorted(tok.scopes)})",
                            f"token '{tok.name}' may not use model '",
                            f"token '{tok.name}' is over its rate of {rate:g} requests/s (burst {burst:g})"))
        self.f.set_tokens(entries, True)

    def set_draining(self, on: bool) -> None:
        self.f.set_draining(on)

    @property
    def inflight(self) -> int:
        return self.f.inflight

    # -- metrics and errors
    def counts(self):
        return self.f.counts()

    def latency(self):
        return self.f.latency()

    def drain_errors(self) -> None:
        # as the exception types the app logs for the same failures (AuthError for its 401/403/429,
        # ServeError for the batcher's 503/504), so the error log reads the same in both modes; the front
        # end's own type (QueueFullError, ...) only picked the words
        for e in self.f.take_errors():
            cls = AuthError if e["type"] == "AuthError" else ServeError
            log_error("request_failed", cls(e["status"], e["error"]), status=e["status"], path=e["path"],
                      model=e["model"], version=e["version"])

    # -- life cycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self.f.serve, name="aimass-native-http", daemon=True)
        self._thread.start()

        def errors():
            while not self._stop.wait(0.5):
                self.drain_errors()
        self._errors_thread = threading.Thread(target=errors, name="aimass-native-errors", daemon=True)
        self._errors_thread.start()
        # the address clients use (uvicorn, on a private port behind it, prints no "running on" line)
        url = f"http://{'[' + self.host + ']' if ':' in self.host else self.host}:{self.port}"
        log.info(json.dumps({"event": "native_http", "url": url, "port": self.port,
                             "upstream_port": self.upstream_port}))

    def stop(self) -> None:
        """Stops the loop (no request starts natively any more); idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.f.stop()
        if self._thread is not None:
            self._thread.join(30)
        self.drain_errors()
