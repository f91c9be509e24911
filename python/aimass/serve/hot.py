"""The inference routes as raw ASGI: ``POST /v2/models/{name}[/versions/{v}]/infer``,
``/v1/models/{name}[/versions/{v}|/labels/{l}]:predict`` and ``/predict``.

Each request runs with a few dict/list operations between uvicorn and the model: no Starlette
middleware, routing, Request or Response objects. ``dispatch`` sits in front of the Starlette app
and takes the POSTs to these paths; everything else (and these paths with other methods: 405) goes
to Starlette, where the same endpoints are mounted as raw ASGI routes. On this server's batch-1 MLP,
the Starlette path cost about 40 us of Python per request with warm caches and about 120 us right
after a batch had streamed the weights through the core's caches (docs/serving.md). A v2 binary
request whose header bytes repeat an earlier one's reuses its decoding (kserve.Plan).
"""
from __future__ import annotations

import re
import time
import zlib
from typing import Optional, Tuple

from .. import _C
from . import _json as _jsonlib, kserve, tfserving
from .auth import AuthError
from .errors import ServeError

# How long the engine's parked threads poll for work after a request arrives (wake_workers), for
# models whose compute is worth it (ServeConfig.wake_min_us): the request's body read, parsing and
# decoding then overlap their wake-up, which otherwise came at the model's first parallel layer
# (about 60 us on this VM, per request at one connection, where the threads park between requests).
WAKE_POLL_US = 200
# the headers the hot routes read (names arrive lower-cased from the ASGI server)
_WANT = frozenset((b"authorization", b"content-length", b"content-encoding", b"inference-header-content-length"))
_JSON = b"application/json"
_HOT = re.compile(r"/v2/models/(?P<n2>[^/]+)(?:/versions/(?P<v2>[^/]+))?/infer"
                  r"|/v1/models/(?P<n1>[^/]+?)(?:/versions/(?P<v1>[^/]+)|/labels/(?P<l1>[^/]+))?:predict"
                  r"|(?P<p>/predict)")


_wake = _C.wake_workers
# {"<key>": nested numbers} -> float32 array, else None (aimass_core/src/serve/json_numbers.cc): the
# 784 floats of the bench's /predict body cost ~60 us through orjson + np.asarray after a 7 MB compute
_numbers = _C.json_number_body
# {"inputs": [{name, datatype: FP32, shape, data}]} -> the same list with data as float32 arrays, else None
_v2_numbers = _C.json_v2_inputs
_EMPTY = memoryview(b"")


class Disconnected(Exception):
    """The client went away before sending the whole body: there is nobody to answer."""


def _version(v: Optional[str]) -> Optional[int]:
    if v is None:
        return None
    if not v.isdigit():
        raise ServeError(400, f"version must be a positive integer, got {v!r}")
    return int(v)


def _json(body: bytes):
    try:
        return _jsonlib.loads(body)
    except _jsonlib.DecodeError as exc:
        raise ServeError(400, f"malformed JSON: {exc}") from None


async def read_body(receive, hdr: dict, limit: int) -> bytes:
    """The request body, at most `limit` bytes (413 above), gzip/deflate decoded."""
    cl = hdr.get(b"content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise ServeError(413, f"request body of {cl.decode()} bytes is over the server's limit of {limit} bytes")
    msg = await receive()
    if msg["type"] != "http.request":
        raise Disconnected()
    body = msg.get("body", b"")
    if msg.get("more_body", False):
        chunks, n = [body], len(body)
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                raise Disconnected()
            chunk = msg.get("body", b"")
            n += len(chunk)
            if n > limit:
                raise ServeError(413, f"request body is over the server's limit of {limit} bytes")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
    elif len(body) > limit:
        raise ServeError(413, f"request body is over the server's limit of {limit} bytes")
    enc = hdr.get(b"content-encoding")
    if enc and enc != b"identity":
        enc = enc.decode("latin-1")
        if enc not in ("gzip", "deflate"):
            raise ServeError(400, f"unsupported Content-Encoding {enc!r} (gzip, deflate or identity)")
        d = zlib.decompressobj(31 if enc == "gzip" else 15)
        try:
            body = d.decompress(body, limit + 1)
        except zlib.error as exc:
            raise ServeError(400, f"body is not valid {enc}: {exc}") from None
        if len(body) > limit or d.unconsumed_tail:
            raise ServeError(413, f"decompressed body is over the server's limit of {limit} bytes")
    return body


# -- the three protocols: (server, ctx, headers, body, version, label) -> (body, content type, extra headers)
async def _v2_infer(srv, ctx, hdr, body, version, label) -> Tuple[bytes, bytes, list]:
    h = hdr.get(b"inference-header-content-length")
    if h is not None:   # binary tensors: the same header bytes as an earlier request skip its decoding
        try:
            lv = ctx.acquire(_version(version))
        except ServeError:
            lv = None   # the full path below raises the same error, after the body's own errors
        if lv is not None:
            hit = kserve.cached_plan(lv, body, h)
            inputs = hit and hit[0].decode(body, hit[1])
            if inputs:
                plan = hit[0]
                return plan.encode(lv, await srv.run(lv, inputs, plan.deadline, plan.prio))
            ctx.release()
    items = _v2_numbers(body) if h is None else None     # FP32 JSON tensors read natively, else None
    if items is not None:
        req, binary = {"inputs": items}, _EMPTY
    else:
        req, binary = kserve.split_body(body, None if h is None else h.decode("latin-1"))
    lv = ctx.acquire(_version(version))
    inputs = kserve.decode_inputs(req, binary, lv.signature)
    deadline, prio = kserve.request_options(req)
    plan = h is not None and kserve.remember_plan(lv, body, h, req, inputs, deadline, prio)
    outputs = await srv.run(lv, inputs, deadline, prio)
    return plan.encode(lv, outputs) if plan else kserve.encode_response(req, lv, outputs)


def _float_input(lv) -> bool:
    """The version takes one float32 input: a numeric body may skip orjson (_numbers)."""
    ins = lv.signature["inputs"]
    return len(ins) == 1 and ins[0]["dtype"] == "float32"


async def _tf_predict(srv, ctx, hdr, body, version, label):
    rows = _numbers(body, "instances")     # {"instances": nested numbers} read natively, else None
    lv = ctx.acquire(_version(version), label) if rows is not None else None
    if lv is not None and _float_input(lv):
        inputs = {lv.signature["inputs"][0]["name"]: tfserving.coerce(lv.signature["inputs"][0]["name"], rows,
                                                                      lv.signature["inputs"][0])}
        fmt = "row"
    else:
        req = _json(body)
        lv = lv or ctx.acquire(_version(version), label)
        inputs, fmt = tfserving.decode_predict(req, lv.signature)
    return _jsonlib.dumps(tfserving.encode_predict(await srv.run(lv, inputs), fmt)), _JSON, []


async def _flask_predict(srv, ctx, hdr, body, version, label):
    x = _numbers(body, "input")            # {"input": nested numbers} read natively, else None
    req = _json(body) if x is None else None   # (a malformed body is a 400 before the model is looked up)
    lv = ctx.acquire()
    if x is not None and _float_input(lv):
        inputs = tfserving.decode_flask({"input": x}, lv.signature)
    else:
        inputs = tfserving.decode_flask(req if req is not None else _json(body), lv.signature)
    return _jsonlib.dumps(tfserving.encode_flask(await srv.run(lv, inputs))), _JSON, []


async def handle(srv, scope, receive, send, kind: str, name: Optional[str], version: Optional[str],
                 label: Optional[str]) -> None:
    """One inference request: auth, draining, body, the model, error mapping, metrics, the response."""
    t0 = time.perf_counter()
    hdr = {k: v for k, v in scope["headers"] if k in _WANT}
    if kind == "predict":
        try:
            name = srv.default_model()
        except ServeError as exc:
            return await _send(send, exc.status, _jsonlib.dumps({"error": str(exc)}), _JSON, [])
        fn, protocol = _flask_predict, "predict"
    elif kind == "v1":
        fn, protocol = _tf_predict, "v1"
    else:
        fn, protocol = _v2_infer, "v2"
    wake = srv.wake_poll_us.get(name)
    if wake:
        _wake(wake)
    ctx = srv.context(name)
    status = 500
    srv.inflight += 1           # SIGTERM drain waits for these
    try:
        try:
            if srv.draining:
                raise ServeError(503, "server is draining (shutting down); retry on another replica")
            if srv.tokens is not None:
                a = hdr.get(b"authorization")
                srv.tokens.authorize(None if a is None else a.decode("latin-1"), "infer", name)
            body = await read_body(receive, hdr, srv.config.max_body_bytes)
            out, ctype, extra = await fn(srv, ctx, hdr, body, version, label)
            status = 200
        except (ServeError, AuthError) as exc:
            status, out, extra = srv.error_reply(exc, scope["path"], name, ctx)
            ctype = _JSON
        except Disconnected:
            status = 499        # nginx's "client closed request": counted, nobody to answer
            return
        except Exception as exc:  # a bug: say so without leaking a traceback to the client
            status, out, extra = srv.internal_error(exc, scope["path"], name)
            ctype = _JSON
        await _send(send, status, out, ctype, extra)
    finally:
        srv.inflight -= 1
        srv.finish(ctx, protocol, name, status, t0)


async def _send(send, status: int, body: bytes, ctype: bytes, extra: list) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


class Endpoint:
    """A hot route as a raw ASGI endpoint for Starlette's Route (path parameters from the scope)."""

    def __init__(self, srv, kind: str):
        self.srv, self.kind = srv, kind

    async def __call__(self, scope, receive, send):
        p = scope.get("path_params", {})
        await handle(self.srv, scope, receive, send, self.kind, p.get("name"), p.get("version"), p.get("label"))


def dispatch(srv, app):
    """An ASGI app that answers the hot POST routes itself and passes everything else to `app`."""
    match = _HOT.fullmatch

    async def asgi(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            m = match(scope["path"])
            if m is not None:
                n2, n1 = m.group("n2"), m.group("n1")
                if n2 is not None:
                    return await handle(srv, scope, receive, send, "v2", n2, m.group("v2"), None)
                if n1 is not None:
                    return await handle(srv, scope, receive, send, "v1", n1, m.group("v1"), m.group("l1"))
                return await handle(srv, scope, receive, send, "predict", None, None, None)
        return await app(scope, receive, send)

    asgi.state = app.state          # tests and tools reach the Server through app.state.server
    asgi.app = app
    return asgi
