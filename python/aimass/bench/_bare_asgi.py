"""The serve benchmark's floor: a bare ASGI app under exactly the uvicorn settings of ``aimass serve``
(``serve.cli.make_uvicorn_server``: uvloop, httptools, no access log, no proxy headers, one socket
write per response). It reads the
request body and answers a fixed small JSON body, with no model, routing, auth or metrics: its p50
under the bench's load generator is what uvicorn, the kernel's loopback TCP and the client cost on
this machine, the part of the HTTP overhead that no change inside aimass can remove.

Given a model file too, it calls ``Session.run`` on that model (batch 1, a fixed zero input, on the
event loop's thread as ``aimass serve`` runs a lone request) before answering: its p50 minus
``Session.run``'s is the floor *with that model*, what uvicorn, the kernel and the client cost when
each request's compute has swept the caches they use (docs/serving.md, "Where the time goes").

    python -m aimass.bench._bare_asgi PORT [MODEL.aimass]
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

# about the size of the MLP's /predict answer (10 floats)
BODY = b'{"output": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


RUN = None     # (session, inputs) when a model is given


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:                      # read the whole body, as the real handler does
        msg = await receive()
        if msg["type"] != "http.request":
            return
        more = msg.get("more_body", False)
    if RUN is not None:
        RUN[0].run(RUN[1])
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main(argv=None) -> int:
    from ..serve.cli import make_uvicorn_server
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or not args[0].isdigit():
        print("usage: python -m aimass.bench._bare_asgi PORT [MODEL.aimass]", file=sys.stderr)
        return 2
    global RUN
    if len(args) == 2:
        import numpy as np

        from ..runtime import Session
        sess = Session(args[1])
        RUN = (sess, {s["name"]: np.zeros([1 if d < 0 else d for d in s["shape"]], s["dtype"])
                      for s in sess.signature["inputs"]})
    state = SimpleNamespace(draining=False, inflight=0, open_connections=None)
    make_uvicorn_server(app, state, "127.0.0.1", int(args[0]), drain_timeout_s=1.0, log_level="warning").run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
