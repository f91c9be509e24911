"""TF-Serving REST predict (row ``instances`` and columnar ``inputs``) and the Flask-style ``/predict``."""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from .errors import ServeError

_NP = {"float32": np.float32, "int64": np.int64}


def coerce(name: str, value: Any, spec: dict) -> np.ndarray:
    """A JSON value as the input's array: numbers only, integers for integer inputs, the model's shape."""
    want = spec["dtype"]
    try:
        a = np.asarray(value)
    except ValueError as exc:  # ragged nesting
        raise ServeError(400, f"input '{name}': not a rectangular (nested) list of numbers: {exc}") from None
    if a.dtype.kind not in "biuf":
        raise ServeError(400, f"input '{name}': expected numbers, got {a.dtype.kind!r}-kind values "
                              f"(e.g. {str(a.ravel()[:1].tolist())[:40]})")
    if want == "int64" and a.dtype.kind == "f":
        raise ServeError(400, f"input '{name}': the model takes int64, got floating-point values")
    shape = list(spec["shape"])
    if a.ndim == len(shape) - 1:      # one example without its batch dimension
        a = a[None]
    if a.ndim != len(shape) or any(w >= 0 and w != d for w, d in zip(shape, a.shape)):
        raise ServeError(400, f"input '{name}': shape {list(a.shape)} does not match the model's {shape} "
                              "(-1: any size; the first dimension is the batch)")
    if a.shape[0] == 0:
        raise ServeError(400, f"input '{name}': no rows")
    return np.ascontiguousarray(a, dtype=_NP.get(want, np.float32))


def decode_predict(req: Any, signature: dict) -> tuple:
    """(inputs dict, 'row'|'columnar') from a TF-Serving predict body."""
    if not isinstance(req, dict):
        raise ServeError(400, "the request must be a JSON object with 'instances' (row format) or 'inputs' "
                              "(columnar format)")
    has_i, has_c = "instances" in req, "inputs" in req
    if has_i == has_c:
        raise ServeError(400, "give exactly one of 'instances' (row format) or 'inputs' (columnar format)")
    specs = signature["inputs"]
    names = [s["name"] for s in specs]
    if has_i:
        rows = req["instances"]
        if not isinstance(rows, list) or not rows:
            raise ServeError(400, "'instances' must be a non-empty list, one entry per example")
        if isinstance(rows[0], dict):
            for i, r in enumerate(rows):
                if not isinstance(r, dict) or set(r) != set(names):
                    got = sorted(r) if isinstance(r, dict) else type(r).__name__
                    raise ServeError(400, f"instances[{i}]: expected an object with the inputs {names}, got {got}")
            cols = {n: [r[n] for r in rows] for n in names}
        elif len(names) == 1:
            cols = {names[0]: rows}
        else:
            raise ServeError(400, f"the model takes several inputs {names}: each instance must be an object "
                                  "naming them")
        return {s["name"]: coerce(s["name"], cols[s["name"]], s) for s in specs}, "row"
    val = req["inputs"]
    if isinstance(val, dict):
        if set(val) != set(names):
            raise ServeError(400, f"'inputs' must name the model's inputs {names}, got {sorted(val)}")
        return {s["name"]: coerce(s["name"], val[s["name"]], s) for s in specs}, "columnar"
    if len(names) != 1:
        raise ServeError(400, f"the model takes several inputs {names}: 'inputs' must be an object naming them")
    return {names[0]: coerce(names[0], val, specs[0])}, "columnar"


def encode_predict(outputs: Dict[str, Any], fmt: str) -> dict:
    """numpy arrays stay arrays: the response writer (orjson) serializes them without .tolist()."""
    arrs = {k: np.asarray(v) for k, v in outputs.items()}
    if fmt == "row":
        if len(arrs) == 1:
            return {"predictions": next(iter(arrs.values()))}
        n = len(next(iter(arrs.values())))
        return {"predictions": [{k: a[i] for k, a in arrs.items()} for i in range(n)]}
    if len(arrs) == 1:
        return {"outputs": next(iter(arrs.values()))}
    return {"outputs": arrs}


def version_status(st) -> dict:
    out = []
    for v, lv in sorted(st.versions.items()):
        out.append({"version": str(v), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}})
    if not out:
        out.append({"version": "0", "state": "END" if st.unloaded else "UNKNOWN",
                    "status": {"error_code": "UNAVAILABLE", "error_message": st.reason}})
    return {"model_version_status": out}


def decode_flask(req: Any, signature: dict) -> Dict[str, np.ndarray]:
    if not isinstance(req, dict) or "input" not in req:
        raise ServeError(400, "expected a JSON object {\"input\": [...]} (one example or a list of examples)")
    specs = signature["inputs"]
    if len(specs) != 1:
        raise ServeError(400, f"/predict serves single-input models; this one takes {[s['name'] for s in specs]}: "
                              "use /v2/models/{name}/infer")
    return {specs[0]["name"]: coerce(specs[0]["name"], req["input"], specs[0])}


def encode_flask(outputs: Dict[str, Any]) -> dict:
    if len(outputs) == 1:
        return {"output": np.asarray(next(iter(outputs.values())))}
    return {"output": {k: np.asarray(v) for k, v in outputs.items()}}
