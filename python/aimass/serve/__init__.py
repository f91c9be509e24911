"""aimass.serve: the HTTP server (``aimass serve``) on the runtime's batching Sessions.

KServe v2 / Open Inference Protocol (JSON and binary tensors, as Triton speaks it), TF-Serving REST,
a Flask-style ``/predict``, scoped tokens with per-token rate limits, Prometheus ``/metrics``,
live label switches from the registry, a dashboard at ``/`` and SIGTERM drain. See docs/serving.md.

Names are imported on first use so that ``aimass`` commands work without the serving extras.
"""
import importlib

_EXPORTS = {"ServeConfig": "app", "Server": "app", "create_app": "app", "AuthError": "auth", "TokenTable": "auth",
            "hash_token": "auth", "new_token": "auth", "add_cli": "cli", "make_uvicorn_server": "cli",
            "ServeError": "errors"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'aimass.serve' has no attribute {name!r}")
