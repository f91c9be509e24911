"""The serve benchmark's compiled floor: the native front end of ``aimass serve --http native``
(``aimass_core/src/serve/frontend.cc``: one epoll thread) with no upstream, answering
``POST /v2/models/{name}/infer`` (JSON and binary tensors) and ``/predict`` by running the model
through the runtime's Batcher, with no Python on the request path (``floor_server.cc`` words what the
hot readers leave). Its p50 at one connection minus ``Session.run``'s is what the compiled front end
costs per request: kernel loopback, the load generator, HTTP parsing and the copy in and out, after
each request's compute has swept the caches (docs/serving.md, "Where the time goes"). A lone request
runs inline on the loop's thread; when several are at hand they are queued and batched, and the
batcher's completion hook hands the answers back to the loop. It has no tokens, metrics or label
switches: it is a measuring tool, not a server.

    python -m aimass.bench._native_floor PORT MODEL.aimass [--name NAME] [--threads N]
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m aimass.bench._native_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("port", type=int)
    p.add_argument("model")
    p.add_argument("--name", default="mlp", help="the {name} of /v2/models/{name}/infer (default: mlp)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--max-body-mb", type=float, default=64.0)
    p.add_argument("--threads", type=int, default=None, help="the engine's CPU threads (default: all cores)")
    a = p.parse_args(argv)
    from .. import _C
    if a.threads is not None:
        _C.set_num_threads(a.threads)
    srv = _C.NativeFloorServer(a.model, host=a.host, port=a.port, model_name=a.name,
                               max_body_bytes=int(a.max_body_mb * (1 << 20)))
    # serve() releases the GIL and blocks; it runs on a thread so that this one takes SIGTERM/SIGINT
    t = threading.Thread(target=srv.serve, name="native-floor", daemon=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    t.start()
    while not stop.is_set() and t.is_alive():
        stop.wait(0.2)
    srv.stop()
    t.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
