"""``aimass serve``: the HTTP server (the native C++ front end with uvicorn behind it by default, or uvicorn
alone), with SIGTERM drain; ``aimass serve-token``."""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import signal
import sys
import time

log = logging.getLogger("aimass.serve")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, tokens, insecure: bool) -> None:
    """Without tokens the server binds loopback only, unless --insecure says otherwise."""
    if tokens is None and not _is_loopback(host):
        if not insecure:
            raise SystemExit(f"aimass serve: refusing to bind {host} without --tokens (anyone who can reach it "
                             "could run and replace models); pass --tokens tokens.yml, or --insecure to allow it")
        log.warning('{"event": "insecure", "host": "%s", "message": "serving without tokens on a non-loopback '
                    'address"}', host)
    elif tokens is None:
        log.warning('{"event": "no_tokens", "message": "no --tokens: every request is allowed; binding loopback '
                    'only"}')


def make_uvicorn_server(app, srv, host: str, port: int, drain_timeout_s: float = 30.0, **kw):
    """A uvicorn.Server whose SIGTERM drains: readiness goes false and new inference requests get 503,
    in-flight requests finish (up to drain_timeout_s), then uvicorn shuts down and the process exits 0."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if sig == signal.SIGTERM and not srv.draining:
                srv.draining = True   # /v2/health/ready -> 503 from now on
                log.info('{"event": "drain", "inflight": %d}', _inflight(srv))
                asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))
                return
            if sig == signal.SIGTERM:
                return
            super().handle_exit(sig, frame)

        async def _drain(self):
            end = time.monotonic() + drain_timeout_s
            while _inflight(srv) > 0 and time.monotonic() < end:
                await asyncio.sleep(0.01)
            if _inflight(srv):
                log.warning('{"event": "drain_timeout", "inflight": %d}', _inflight(srv))
            self.should_exit = True

    loop = "uvloop" if _has("uvloop") else "asyncio"
    http = kw.pop("http", None) or ("httptools" if _has("httptools") else "h11")
    if isinstance(http, str):
        from uvicorn.importer import import_from_string
        from uvicorn.config import HTTP_PROTOCOLS
        http = _one_write_protocol(import_from_string(HTTP_PROTOCOLS[http]))
    # no access log and no X-Forwarded-For rewriting (proxy_headers): both cost every request, and
    # the error log (one JSON line per failure) and the metrics already tell what happened; no
    # "server: uvicorn" header (it names the software and costs a header per response)
    kw.setdefault("proxy_headers", False)
    kw.setdefault("server_header", False)
    cfg = uvicorn.Config(app, host=host, port=port, loop=loop, http=http, lifespan="on", access_log=False,
                         log_config=None, timeout_graceful_shutdown=drain_timeout_s, **kw)
    server = _Server(cfg)
    srv.open_connections = lambda: len(server.server_state.connections)
    return server


def _inflight(srv) -> int:
    """In-flight inference requests: Server.total_inflight() (the native front end's too), else .inflight."""
    total = getattr(srv, "total_inflight", None)
    return total() if total is not None else srv.inflight


class _OneWriteTransport:
    """uvicorn writes a response's status line and headers, then its body, as two socket writes: two
    send() calls, and two wake-ups of a client that waits for the whole response. This holds a header
    block (a write that starts with the status line and ends with the blank line) until the next write,
    and sends both with one writelines; a held block that nothing follows in the same loop step is sent
    on the next one (a 100 Continue, a streamed response's first part). Everything else is the transport's."""

    __slots__ = ("_t", "_held", "_loop")

    def __init__(self, transport, loop):
        self._t, self._held, self._loop = transport, None, loop

    def write(self, data) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._t.writelines((held, data))
        elif data[:5] == b"HTTP/" and data[-4:] == b"\r\n\r\n":
            self._held = data
            self._loop.call_soon(self._flush)
        else:
            self._t.write(data)

    def writelines(self, chunks) -> None:
        self._flush()
        self._t.writelines(chunks)

    def _flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._t.is_closing():    # the connection may have gone meanwhile
                self._t.write(held)

    def close(self) -> None:
        self._flush()
        self._t.close()

    def write_eof(self) -> None:
        self._flush()
        self._t.write_eof()

    def __getattr__(self, name):
        return getattr(self._t, name)


def _one_write_protocol(base):
    """uvicorn's HTTP protocol class `base`, writing each response with one socket write (_OneWriteTransport)."""

    class OneWrite(base):
        def connection_made(self, transport, *args):
            super().connection_made(_OneWriteTransport(transport, asyncio.get_running_loop()), *args)

    OneWrite.__name__ = OneWrite.__qualname__ = f"OneWrite{base.__name__}"
    return OneWrite


def _has(mod: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(mod) is not None


def _cmd_serve(args) -> int:
    from ..registry import Registry
    from .app import Server, ServeConfig, create_app
    from .auth import TokenTable

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(message)s", stream=sys.stderr)
    try:
        tokens = TokenTable.load(args.tokens) if args.tokens else None
        registry = Registry(args.store)
    except (ValueError, OSError, LookupError) as exc:   # bad tokens.yml, unreachable or invalid store
        print(f"aimass serve: {exc}", file=sys.stderr)
        return 2
    check_bind(args.host, tokens, args.insecure)
    cfg = ServeConfig(max_body_bytes=int(args.max_body_mb * (1 << 20)), max_batch_size=args.max_batch_size,
                      max_queue_delay_us=args.max_queue_delay_us, queue_capacity=args.queue_capacity,
                      num_threads=args.threads, poll_interval_s=args.poll_interval, default_model=args.default_model,
                      deadline_ms=args.deadline_ms)
    http = resolve_http(args.http)
    if http is None:
        return 2
    srv = Server(registry, cfg, tokens)
    if http == "native":
        return _serve_native(args, srv, create_app)
    server = make_uvicorn_server(create_app(srv), srv, args.host, args.port, args.drain_timeout)
    server.run()
    if not server.started:
        return 1
    return 0


def default_http() -> str:
    """The --http mode `aimass serve` runs when none is named: native where this build has the front end
    (it needs OpenSSL's libcrypto at build time), else uvicorn."""
    from .native import unavailable
    return "uvicorn" if unavailable() else "native"


def resolve_http(asked):
    """The --http mode to run (None: refused, reason printed). Unnamed: native, falling back to uvicorn with
    a logged reason when the front end was compiled out; --http native named where it cannot run is an error."""
    from .native import unavailable
    why = unavailable() if asked in (None, "native") else None
    if why is None:
        return asked or "native"
    if asked == "native":
        print(f"aimass serve: --http native: {why}", file=sys.stderr)
        return None
    log.warning(json.dumps({"event": "http_fallback", "http": "uvicorn",
                            "message": "the native front end cannot run, serving with uvicorn alone", "reason": why}))
    return "uvicorn"


def numeric_host(host: str) -> str:
    """--host as the front end binds it: it takes numeric addresses (and localhost) only, where uvicorn
    also takes a name; a name binds its first address, as uvicorn's resolver would order them.
    Raises OSError (socket.gaierror) for a name that does not resolve."""
    import socket
    if host == "localhost":
        return host
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][4][0]


def _serve_native(args, srv, create_app) -> int:
    """--http native: the C++ front end on --host/--port, uvicorn on a private loopback port behind it."""
    import socket

    from .native import NativeFront

    try:
        host = numeric_host(args.host)
    except OSError as exc:
        print(f"aimass serve: cannot resolve --host {args.host}: {exc}", file=sys.stderr)
        return 1
    private = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    private.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    private.bind(("127.0.0.1", 0))
    private.listen(2048)     # connections the front end opens before uvicorn runs wait in the backlog
    try:
        front = NativeFront(srv, host, args.port, private.getsockname()[1], args.max_connections,
                            args.idle_timeout)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"aimass serve: {exc}", file=sys.stderr)
        return 1
    # the front end keeps its upstream connections open: uvicorn must not time them out under it
    server = make_uvicorn_server(create_app(srv), srv, "127.0.0.1", 0, args.drain_timeout,
                                 timeout_keep_alive=24 * 3600)
    front.start()
    try:
        server.run(sockets=[private])
    finally:
        front.stop()
    if not server.started:
        return 1
    return 0


def _cmd_token(args) -> int:
    from .auth import hash_token, new_token
    tok = new_token()
    entry = {"name": args.name, "sha256": hash_token(tok), "scopes": args.scopes.split(",")}
    if args.models:
        entry["models"] = args.models.split(",")
    if args.rate:
        entry["rate"] = args.rate
        entry["burst"] = args.burst or max(1.0, args.rate)
    print(json.dumps({"token": tok, "tokens.yml entry": entry}, indent=2))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("serve", help="serve the store's models over HTTP (KServe v2, TF-Serving REST, /predict)",
                       description="Serve every model of the store at its 'stable' label (else newest) plus its "
                       "labelled versions; label changes in the store take effect live. Inference requests are answered by a "
                       "C++ front end with the Python app behind it (--http native, the default where it is built), or "
                       "by the app alone (--http uvicorn). See docs/serving.md.")
    p.add_argument("--store", default=None, help="registry store: a folder or database URL (default: AIMASS_HOME)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--tokens", default=None, help="tokens.yml (sha256 of each token, scopes, models, rate, burst)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --tokens")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="rows per executed batch (default: the machine's tuning profile, else 32)")
    p.add_argument("--max-queue-delay-us", type=int, default=None,
                   help="batcher wait for more rows (default: the tuning profile, else 500)")
    p.add_argument("--queue-capacity", type=int, default=1024, help="queued requests per model before 503")
    p.add_argument("--threads", type=int, default=None, help="engine CPU threads (default: aimass's setting)")
    p.add_argument("--deadline-ms", type=float, default=None, help="default request deadline (504 when passed)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between store checks (default 1)")
    p.add_argument("--default-model", default=None, help="model of POST /predict (default: first by name)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body (default 64 MiB; 413)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="SIGTERM: longest wait for in-flight requests")
    p.add_argument("--http", default=None, choices=["native", "uvicorn"],
                   help="native (the default where aimass was built with OpenSSL's libcrypto, else uvicorn with a "
                   "logged reason): a C++ front end answers inference requests and auth refusals and forwards the "
                   "rest to the app behind it; uvicorn: the ASGI app answers every request (docs/serving.md)")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="--http native: open client connections before new ones are closed (default 1024)")
    p.add_argument("--idle-timeout", type=float, default=5.0,
                   help="--http native: seconds a connection may sit with no request in progress (default 5)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_cmd_serve)
    t = sub.add_parser("serve-token", help="make a random API token and print its tokens.yml entry")
    t.add_argument("--name", required=True, help="the token's name (shown in logs)")
    t.add_argument("--scopes", default="infer", help="comma-separated: infer, admin, metrics (default infer)")
    t.add_argument("--models", default=None, help="comma-separated models it may use (default all)")
    t.add_argument("--rate", type=float, default=None, help="requests per second (default unlimited)")
    t.add_argument("--burst", type=float, default=None, help="bucket size (default max(1, rate))")
    t.set_defaults(func=_cmd_token)
