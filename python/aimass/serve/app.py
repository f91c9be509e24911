"""The ASGI app of ``aimass serve``: KServe v2, TF-Serving REST, /predict, admin, metrics, dashboard."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

import aimass

from . import hot, kserve, tfserving
from .auth import AuthError, TokenTable
from .errors import RECENT, ServeError, log_error
from .metrics import ServerMetrics
from .models import ModelManager

log = logging.getLogger("aimass.serve")
STATIC = Path(__file__).with_name("static")


@dataclass
class ServeConfig:
    max_body_bytes: int = 64 << 20
    max_batch_size: Optional[int] = None      # None: the machine's tuning profile (aimass bench), else 32
    max_queue_delay_us: Optional[int] = None  # None: the tuning profile, else 500
    queue_capacity: int = 1024
    num_threads: Optional[int] = None
    poll_interval_s: float = 1.0
    default_model: Optional[str] = None
    deadline_ms: Optional[float] = None      # default per-request deadline (none: wait)
    # a lone request on a model whose batches take less than this (mean compute time) runs on the event
    # loop's thread through Session.run (no thread hand-offs); 0 turns this off
    inline_max_us: float = 1000.0
    # a model whose batches take at least this (mean compute time) has the engine's parked threads
    # woken when its request arrives (hot.WAKE_POLL_US), so their wake-up overlaps the request's
    # parsing; a cheaper one (no parallel layer worth it) would only have them poll for nothing
    wake_min_us: float = 50.0


class Server:
    """The state every handler shares: models, tokens, metrics, draining."""

    def __init__(self, registry, config: Optional[ServeConfig] = None, tokens: Optional[TokenTable] = None,
                 session_factory: Optional[Callable] = None):
        self.config = config or ServeConfig()
        self.tokens = tokens
        c = self.config
        if session_factory is None:
            from ..runtime import Session

            def session_factory(path):
                return Session(path, max_batch_size=c.max_batch_size, max_queue_delay_us=c.max_queue_delay_us,
                               queue_capacity=c.queue_capacity, num_threads=c.num_threads)
        self.manager = ModelManager(registry, session_factory, c.poll_interval_s)
        self.metrics = ServerMetrics(self.manager, self)
        self.native = None          # aimass.serve.native.NativeFront with --http native
        self._draining = False
        self.inflight = 0
        # open HTTP connections, when the ASGI server tells (cli.make_uvicorn_server): with one, no other
        # request can be waiting unread, so a lone request runs inline without first yielding to the loop
        self.open_connections: Optional[Callable[[], int]] = None
        # model name -> microseconds the engine threads poll after one of its requests arrives (0: not
        # woken); kept by _cheap from the compute histogram, read by hot.handle before the body
        self.wake_poll_us: dict = {}
        self.started = time.time()

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, on: bool) -> None:
        self._draining = on
        if self.native is not None:
            self.native.set_draining(on)   # new hot requests reach Python, which answers 503

    def total_inflight(self) -> int:
        """Inference requests in flight here and in the native front end (SIGTERM drain waits for both)."""
        return self.inflight + (self.native.inflight if self.native is not None else 0)

    def is_ready(self) -> bool:
        return self.manager.ready and not self.draining

    def authorize(self, request: Request, scope: str, model: Optional[str] = None) -> None:
        if self.tokens is not None:
            self.tokens.authorize(request.headers.get("authorization"), scope, model)

    async def run(self, lv, inputs, deadline_ms=None, priority=0):
        if deadline_ms is None:
            deadline_ms = self.config.deadline_ms
        try:
            if self.inflight == 1 and self._cheap(lv):
                # Alone so far. Requests whose bytes are already on their sockets have not been read
                # yet: the loop reads them when this task yields. So yield once, and run inline (no
                # thread hand-offs; the batcher runs an idle session's request on this thread) only if
                # none arrived. Without this yield a loaded server ran every request inline, one by
                # one, never batching (each saw itself alone while the others waited unread).
                if self.open_connections is None or self.open_connections() > 1:
                    await asyncio.sleep(0)
                if self.inflight == 1:
                    # inline=True: the batcher runs it here only if it also sees no load (its last batch
                    # held one request); otherwise it queues it and this awaits without blocking the
                    # loop. (Session.run here blocked the loop through the batcher's gathering wait,
                    # up to max_queue_delay_us, for requests that could not arrive meanwhile.)
                    return await lv.session.run_async(inputs, deadline_ms=deadline_ms, priority=priority,
                                                      inline=True)
            return await lv.session.run_async(inputs, deadline_ms=deadline_ms, priority=priority)
        except aimass.QueueFullError as exc:
            raise ServeError(503, f"model '{lv.name}' is overloaded (queue full): {exc}; retry later",
                             retry_after=1) from None
        except TimeoutError as exc:
            raise ServeError(504, f"deadline passed before model '{lv.name}' ran the request: {exc}") from None
        except aimass.ClosedError as exc:
            raise ServeError(503, f"model '{lv.name}' version {lv.version} was closed: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise ServeError(400, f"model '{lv.name}' rejected the inputs: {exc}") from None

    def _cheap(self, lv) -> bool:
        lv.calls += 1
        if lv.calls & 255 == 1 or lv.calls < 8:   # re-read the compute histogram every 256 requests
            h = lv.session.stats()["compute_us"]
            mean = h["sum"] / h["count"] if h["count"] else 0.0
            lv.cheap = h["count"] > 0 and mean < self.config.inline_max_us
            self.wake_poll_us[lv.name] = hot.WAKE_POLL_US if h["count"] and mean >= self.config.wake_min_us else 0
        return lv.cheap

    def context(self, model: Optional[str]) -> "Ctx":
        return Ctx(self, model)

    def default_model(self) -> str:
        """The model of POST /predict: --default-model, else the first loaded one by name."""
        if self.config.default_model:
            return self.config.default_model
        names = sorted(n for n, st in self.manager.models.items() if st.default is not None)
        if not names:
            raise ServeError(503, "no model is loaded")
        return names[0]

    def error_reply(self, exc, path: str, model: Optional[str], ctx: "Ctx"):
        """(status, JSON body, extra headers) of a ServeError/AuthError, logged as one JSON line."""
        log_error("request_failed", exc, status=exc.status, path=path, model=model,
                  version=ctx.lv.version if ctx.lv else None)
        headers = [(b"retry-after", str(max(1, int(exc.retry_after + 0.999))).encode())] if exc.retry_after else []
        return exc.status, json.dumps({"error": str(exc)}).encode(), headers

    def internal_error(self, exc, path: str, model: Optional[str]):
        log_error("internal_error", exc, status=500, path=path, model=model)
        log.exception("internal error")
        return 500, json.dumps({"error": f"internal error: {type(exc).__name__}: {exc}"}).encode(), []

    def finish(self, ctx: "Ctx", protocol: Optional[str], model: Optional[str], status: int, t0: float) -> None:
        """Release the request's version and count it (protocol None: not an inference request)."""
        if ctx.lv is not None:
            self.manager.release(ctx.lv)
        if protocol is not None and model is not None:
            # names from URLs that are not loaded models share one label value (bounded series)
            self.metrics.observe(model if model in self.manager.models else "_unknown",
                                 ctx.lv.version if ctx.lv else None, protocol, status, time.perf_counter() - t0)

    async def guarded(self, request: Request, protocol: Optional[str], scope: str, model: Optional[str],
                      handler: Callable[["Ctx"], Awaitable[Response]]) -> Response:
        """Auth, error mapping, metrics and the version's hold around one request of the Starlette routes
        (the inference routes are in hot.py). protocol: the label of aimass_requests_total (None: not counted)."""
        t0 = time.perf_counter()
        ctx = Ctx(self, model)
        status = 500
        counted = scope == "infer"      # SIGTERM drain waits for these
        if counted:
            self.inflight += 1
        try:
            if self.draining and counted:
                raise ServeError(503, "server is draining (shutting down); retry on another replica")
            self.authorize(request, scope, model)
            resp = await handler(ctx)
            status = resp.status_code
            return resp
        except (ServeError, AuthError) as exc:
            status, body, headers = self.error_reply(exc, request.url.path, model, ctx)
            return Response(body, status_code=status, headers=dict((k.decode(), v.decode()) for k, v in headers),
                            media_type="application/json")
        except Exception as exc:  # a bug: say so without leaking a traceback to the client
            status, body, _ = self.internal_error(exc, request.url.path, model)
            return Response(body, status_code=500, media_type="application/json")
        finally:
            if counted:
                self.inflight -= 1
            self.finish(ctx, protocol, model, status, t0)

    def status(self) -> dict:
        """The dashboard's JSON."""
        models = []
        for name, st in sorted(self.manager.models.items()):
            vers = []
            for v, lv in sorted(st.versions.items()):
                s = lv.session.stats() if not lv.closed else None
                vers.append({"version": v, "default": v == st.default, "inflight": lv.inflight,
                             "labels": sorted(k for k, x in st.labels.items() if x == v),
                             "requests": s["requests"] if s else {}, "queue_depth": s["queue_depth"] if s else 0,
                             "batches": s["batches"] if s else 0})
            models.append({"name": name, "default": st.default, "labels": st.labels, "versions": vers,
                           "state": "READY" if st.default is not None else "UNAVAILABLE", "reason": st.reason})
        if self.native is not None:
            self.native.drain_errors()
        return {"ready": self.is_ready(), "draining": self.draining, "inflight": self.total_inflight(), "uptime_s": time.time() - self.started,
                "switches": self.manager.switches, "models": models, "errors": list(RECENT)[-20:],
                **({"native": {"answers": self.native.f.native_answers, "forwarded": self.native.f.forwarded}}
                   if self.native is not None else {}),
                **self.metrics.summary()}


class Ctx:
    __slots__ = ("srv", "model", "lv")

    def __init__(self, srv: Server, model: Optional[str]):
        self.srv, self.model, self.lv = srv, model, None

    def acquire(self, version=None, label=None):
        self.lv = self.srv.manager.acquire(self.model, version, label)
        return self.lv

    def release(self) -> None:
        if self.lv is not None:
            self.srv.manager.release(self.lv)
            self.lv = None


def _version(request: Request) -> Optional[int]:
    return hot._version(request.path_params.get("version"))


def create_app(srv: Server):
    """The ASGI app: hot.dispatch (inference routes) in front of the Starlette app (the rest)."""
    M = srv.manager

    # -- KServe v2
    async def live(request):
        return JSONResponse({"live": True})

    async def ready(request):
        ok = srv.is_ready()
        return JSONResponse({"ready": ok, "draining": srv.draining}, status_code=200 if ok else 503)

    async def server_meta(request):
        return JSONResponse({"name": "aimass", "version": aimass.__version__,
                             "extensions": ["binary_tensor_data", "model_repository", "parameters"]})

    def model_route(fn, scope="infer", protocol="v2"):
        async def endpoint(request):
            name = request.path_params["name"]
            return await srv.guarded(request, protocol, scope, name, lambda ctx: fn(request, ctx))
        return endpoint

    async def model_meta(request, ctx):
        lv = ctx.acquire(_version(request))
        return JSONResponse(kserve.model_metadata(M.models[ctx.model], lv))

    async def model_cfg(request, ctx):
        lv = ctx.acquire(_version(request))
        mbs = getattr(lv.session, "max_batch_size", None) or srv.config.max_batch_size or 0
        return JSONResponse(kserve.model_config(M.models[ctx.model], lv, mbs))

    async def model_ready(request, ctx):
        try:
            ctx.acquire(_version(request))
        except ServeError as exc:
            if exc.status == 503:
                return JSONResponse({"name": ctx.model, "ready": False}, status_code=400)
            raise
        ok = srv.is_ready()
        return JSONResponse({"name": ctx.model, "ready": ok}, status_code=200 if ok else 400)

    # -- TF-Serving REST
    async def tf_status(request, ctx):
        st = M.models.get(ctx.model)
        if st is None:
            raise ServeError(404, f"unknown model '{ctx.model}'")
        return JSONResponse(tfserving.version_status(st))

    # -- admin (Triton repository extension)
    async def repo_index(request):
        async def run(ctx):
            out = []
            for name, st in sorted(M.models.items()):
                if st.versions:
                    out += [{"name": name, "version": str(v), "state": "READY", "reason": ""} for v in sorted(st.versions)]
                else:
                    out.append({"name": name, "state": "UNAVAILABLE", "reason": st.reason})
            return JSONResponse(out)
        return await srv.guarded(request, None, "admin", None, run)

    async def repo_load(request, ctx):
        await M.load(ctx.model)
        return JSONResponse({})

    async def repo_unload(request, ctx):
        await M.unload(ctx.model)
        return JSONResponse({})

    # -- observability
    async def metrics(request):
        async def run(ctx):
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
            return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)
        return await srv.guarded(request, None, "metrics", None, run)

    async def api_status(request):
        async def run(ctx):
            return JSONResponse(srv.status())
        return await srv.guarded(request, None, "metrics", None, run)

    async def index(request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def dashboard_js(request):
        return FileResponse(STATIC / "dashboard.js", media_type="text/javascript",
                            headers={"Cache-Control": "no-cache"})

    m = "/v2/models/{name}"
    mv = m + "/versions/{version}"
    v2, v1, flask = hot.Endpoint(srv, "v2"), hot.Endpoint(srv, "v1"), hot.Endpoint(srv, "predict")
    routes = [   # the inference routes: hot.dispatch answers their POSTs before Starlette; here for 405s
        Route(m + "/infer", v2, methods=["POST"]), Route(mv + "/infer", v2, methods=["POST"]),
        Route("/predict", flask, methods=["POST"]),
        Route("/v1/models/{name}:predict", v1, methods=["POST"]),
        Route("/v1/models/{name}/versions/{version}:predict", v1, methods=["POST"]),
        Route("/v1/models/{name}/labels/{label}:predict", v1, methods=["POST"]),
        Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_meta),
        Route(m, model_route(model_meta, protocol=None)), Route(mv, model_route(model_meta, protocol=None)),
        Route(m + "/config", model_route(model_cfg, protocol=None)),
        Route(mv + "/config", model_route(model_cfg, protocol=None)),
        Route(m + "/ready", model_route(model_ready, protocol=None)),
        Route(mv + "/ready", model_route(model_ready, protocol=None)),
        Route("/v1/models/{name}", model_route(tf_status, protocol=None)),
        Route("/v2/repository/index", repo_index, methods=["GET", "POST"]),
        Route("/v2/repository/models/{name}/load", model_route(repo_load, "admin", None), methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", model_route(repo_unload, "admin", None), methods=["POST"]),
        Route("/metrics", metrics), Route("/api/status", api_status),
        Route("/", index), Route("/dashboard.js", dashboard_js),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            await M.start()
        except BaseException:
            await M.stop()      # close whatever was loaded before the failure
            raise
        try:
            yield
        finally:
            if srv.native is not None:
                await asyncio.to_thread(srv.native.stop)   # no native request starts after this
            await M.stop()

    async def http_error(request, exc):   # unknown paths and methods answer JSON like every other error
        return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.server = srv
    return hot.dispatch(srv, app)
