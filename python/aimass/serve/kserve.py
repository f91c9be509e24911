"""KServe v2 / Open Inference Protocol, as Triton speaks it over HTTP (JSON and binary tensor data).

Binary extension: the request body is the JSON header (its length in ``Inference-Header-Content-Length``)
followed by the raw tensors of the inputs whose ``parameters.binary_data_size`` is set, in order.
Outputs come back binary when the request asks (``parameters.binary_data_output`` or an output's
``parameters.binary_data``), the same way.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import _json
from .errors import ServeError

# Triton datatype <-> numpy
V2_TO_NP = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
            "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
            "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
SIG_TO_V2 = {"float32": "FP32", "int64": "INT64", "float16": "FP16", "int32": "INT32", "uint8": "UINT8",
             "int8": "INT8", "float64": "FP64", "bool": "BOOL"}
NP_TO_V2 = {np.dtype(v): k for k, v in V2_TO_NP.items()}
V2_DTYPE = {k: np.dtype(v) for k, v in V2_TO_NP.items()}


def v2_dtype(sig_dtype: str) -> str:
    return SIG_TO_V2.get(sig_dtype, sig_dtype.upper())


def tensor_meta(specs) -> List[dict]:
    return [{"name": s["name"], "datatype": v2_dtype(s["dtype"]), "shape": list(s["shape"])} for s in specs]


def model_metadata(st, lv) -> dict:
    return {"name": st.name, "versions": [str(v) for v in sorted(st.versions)], "platform": "aimass",
            "inputs": tensor_meta(lv.signature["inputs"]), "outputs": tensor_meta(lv.signature["outputs"])}


def model_config(st, lv, max_batch_size: int) -> dict:
    def dims(specs):
        return [{"name": s["name"], "data_type": "TYPE_" + v2_dtype(s["dtype"]),
                 "dims": [d for d in s["shape"][1:]]} for s in specs]
    return {"name": st.name, "platform": "aimass", "backend": "aimass", "max_batch_size": max_batch_size,
            "input": dims(lv.signature["inputs"]), "output": dims(lv.signature["outputs"]),
            "dynamic_batching": {}, "version_policy": {"specific": {"versions": sorted(st.versions)}}}


def split_body(body: bytes, header_len: Optional[str]) -> Tuple[dict, memoryview]:
    """The JSON header and the binary section of a request body."""
    if header_len is not None:
        try:
            n = int(header_len)
        except ValueError:
            raise ServeError(400, f"Inference-Header-Content-Length must be an integer, got {header_len!r}") from None
        if n < 0 or n > len(body):
            raise ServeError(400, f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
    else:
        n = len(body)
    try:
        req = _json.loads(bytes(body[:n]) if n != len(body) else body)
    except _json.DecodeError as exc:
        raise ServeError(400, f"malformed JSON request: {exc}") from None
    if not isinstance(req, dict):
        raise ServeError(400, "the request must be a JSON object with an 'inputs' list")
    return req, memoryview(body)[n:]


def _check_shape(name: str, shape, spec) -> List[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ServeError(400, f"input '{name}': 'shape' must be a list of non-negative integers, got {shape!r}")
    want = spec["shape"]
    if len(shape) != len(want) or any(w >= 0 and w != d for w, d in zip(want, shape)):
        raise ServeError(400, f"input '{name}': shape {shape} does not match the model's {list(want)} "
                              "(-1: any size; the first dimension is the batch)")
    if shape and shape[0] == 0:
        raise ServeError(400, f"input '{name}': the batch dimension is 0")
    return shape


def decode_inputs(req: dict, binary: memoryview, signature: dict) -> Dict[str, np.ndarray]:
    items = req.get("inputs")
    if not isinstance(items, list) or not items:
        raise ServeError(400, "the request needs a non-empty 'inputs' list of {name, shape, datatype, data}")
    specs = {s["name"]: s for s in signature["inputs"]}
    out: Dict[str, np.ndarray] = {}
    offset = 0
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ServeError(400, "every entry of 'inputs' must be an object with a 'name'")
        name = item["name"]
        spec = specs.get(name)
        if spec is None:
            raise ServeError(400, f"unknown input '{name}'; the model takes {sorted(specs)}")
        if name in out:
            raise ServeError(400, f"input '{name}' is given twice")
        want = v2_dtype(spec["dtype"])
        dt = item.get("datatype")
        if dt != want:
            raise ServeError(400, f"input '{name}': datatype {dt!r} does not match the model's {want}")
        shape = _check_shape(name, item.get("shape"), spec)
        npdt = V2_DTYPE[want]
        count = math.prod(shape)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise ServeError(400, f"input '{name}': 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ServeError(400, f"input '{name}': binary_data_size must be a non-negative integer")
            if size != count * npdt.itemsize:
                raise ServeError(400, f"input '{name}': binary_data_size {size} is not {count} x {npdt.itemsize} "
                                      f"bytes for shape {shape} {want}")
            if offset + size > len(binary):
                raise ServeError(400, f"input '{name}': the binary section holds {len(binary) - offset} bytes, "
                                      f"{size} needed")
            arr = np.frombuffer(binary[offset:offset + size], dtype=npdt).reshape(shape)
            offset += size
        else:
            if "data" not in item:
                raise ServeError(400, f"input '{name}': no 'data' and no binary_data_size")
            try:
                arr = np.asarray(item["data"], dtype=npdt)
            except (ValueError, TypeError) as exc:
                raise ServeError(400, f"input '{name}': 'data' is not a (nested) list of {want} values: {exc}") \
                    from None
            if arr.size != count:
                raise ServeError(400, f"input '{name}': 'data' holds {arr.size} values, shape {shape} needs {count}")
            arr = arr.reshape(shape)
        out[name] = arr
    if offset != len(binary):
        raise ServeError(400, f"the binary section holds {len(binary)} bytes but the inputs' binary_data_size "
                              f"add up to {offset}")
    missing = [n for n in specs if n not in out]
    if missing:
        raise ServeError(400, f"missing inputs {missing}; the model takes {sorted(specs)}")
    return out


def encode_response(req: dict, lv, outputs: Dict[str, Any]) -> Tuple[bytes, bytes, list]:
    """(body, content type, extra headers) of the inference response: JSON, or the JSON header and the
    binary outputs with Inference-Header-Content-Length."""
    params = req.get("parameters") or {}
    all_binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    wanted = req.get("outputs")
    if wanted is None:
        wanted = [{"name": s["name"]} for s in lv.signature["outputs"]]
    elif not isinstance(wanted, list):
        raise ServeError(400, "'outputs' must be a list of {name, parameters}")
    out_json, blobs = [], []
    for w in wanted:
        name = w.get("name") if isinstance(w, dict) else None
        if name not in outputs:
            raise ServeError(400, f"unknown output {name!r}; the model has {sorted(outputs)}")
        arr = np.ascontiguousarray(np.asarray(outputs[name]))
        p = w.get("parameters") or {}
        binary = bool(p.get("binary_data", all_binary)) if isinstance(p, dict) else all_binary
        t = {"name": name, "datatype": NP_TO_V2.get(arr.dtype, "FP32"), "shape": list(arr.shape)}
        if binary:
            b = arr.tobytes()
            t["parameters"] = {"binary_data_size": len(b)}
            blobs.append(b)
        else:
            t["data"] = arr.ravel()
        out_json.append(t)
    body = {"model_name": lv.name, "model_version": str(lv.version), "outputs": out_json}
    if "id" in req:
        body["id"] = req["id"]
    head = _json.dumps(body)
    if not blobs:
        return head, b"application/json", []
    return (b"".join([head, *blobs]), b"application/octet-stream",
            [(b"inference-header-content-length", str(len(head)).encode())])


# -- the binary fast path: a validated request header, reused while the same header bytes come back
PLAN_HEADER_MAX = 4096      # longer headers are not cached
PLANS_PER_VERSION = 64      # distinct headers cached per loaded version (the cache is cleared when full)


class Plan:
    """A v2 binary request header that decoded and validated once against a version's signature (every
    input binary, no request id). A client sends the same header bytes for every request of one shape, so
    the next such request skips JSON parsing and validation: its inputs are read-only views of the
    body, and its response header is reused while the output shapes stay the same (docs/serving.md)."""

    __slots__ = ("req", "inputs", "nbytes", "deadline", "prio", "heads")

    def __init__(self, req: dict, inputs: Dict[str, np.ndarray], deadline, prio):
        self.req, self.deadline, self.prio = req, deadline, prio
        self.inputs = [(k, a.dtype, a.shape, a.nbytes) for k, a in inputs.items()]   # in body order
        self.nbytes = sum(a.nbytes for a in inputs.values())
        self.heads: Dict[tuple, tuple] = {}   # output (shape, dtype)s -> (JSON head, extra headers)

    def decode(self, body: bytes, offset: int) -> Optional[Dict[str, np.ndarray]]:
        """The inputs from the body's binary section (it starts at `offset`); None when its size is wrong
        (the full decoder then says why)."""
        if len(body) - offset != self.nbytes:
            return None
        out = {}
        for name, dt, shape, n in self.inputs:
            out[name] = np.ndarray(shape, dt, body, offset)     # a read-only view, as np.frombuffer gives
            offset += n
        return out

    def encode(self, lv, outputs: Dict[str, Any]) -> Tuple[bytes, bytes, list]:
        """encode_response for this header, with the JSON part reused when every output is binary."""
        arrs = [v if type(v) is np.ndarray else np.asarray(v) for v in outputs.values()]
        key = tuple([(a.shape, a.dtype) for a in arrs])
        hit = self.heads.get(key)
        if hit is None:     # new output shapes (or JSON outputs): the full encoder, then keep its header
            body, ctype, extra = encode_response(self.req, lv, outputs)
            if len(self.heads) < 8 and extra and list(_wanted(self.req, lv)) == list(outputs):
                n = int(extra[0][1])
                if len(body) - n == sum(a.nbytes for a in arrs):
                    self.heads[key] = (body[:n], extra)
            return body, ctype, extra
        head, extra = hit
        if len(arrs) == 1:
            return head + arrs[0].tobytes(), b"application/octet-stream", extra    # tobytes: C order
        return b"".join([head, *[a.tobytes() for a in arrs]]), b"application/octet-stream", extra


def _wanted(req: dict, lv):
    """Output names in response order, when every one is sent binary; else nothing."""
    params = req.get("parameters") or {}
    all_binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    wanted = req.get("outputs")
    if wanted is None:
        wanted = [{"name": s["name"]} for s in lv.signature["outputs"]]
    for w in wanted:
        p = w.get("parameters") or {}
        if not (bool(p.get("binary_data", all_binary)) if isinstance(p, dict) else all_binary):
            return
        yield w["name"]


def cached_plan(lv, body: bytes, header_len: Optional[bytes]) -> Optional[Tuple["Plan", int]]:
    """(the Plan of this request's header, the header's length) when the version has one for these bytes."""
    if header_len is None or not lv.plans or not header_len.isdigit():
        return None
    n = int(header_len)
    if n > PLAN_HEADER_MAX or n > len(body):
        return None
    plan = lv.plans.get(body[:n])
    return None if plan is None else (plan, n)


def remember_plan(lv, body: bytes, header_len: Optional[bytes], req: dict, inputs: Dict[str, np.ndarray],
                  deadline, prio) -> Optional["Plan"]:
    """Cache a request header that decode_inputs accepted, when it qualifies (see Plan)."""
    if header_len is None or "id" in req or not header_len.isdigit():
        return None
    n = int(header_len)
    if n > PLAN_HEADER_MAX or any(not isinstance(it.get("parameters"), dict)
                                  or it["parameters"].get("binary_data_size") is None for it in req["inputs"]):
        return None
    if len(lv.plans) >= PLANS_PER_VERSION:
        lv.plans.clear()
    plan = lv.plans[body[:n]] = Plan(req, inputs, deadline, prio)
    return plan


def request_options(req: dict) -> Tuple[Optional[float], int]:
    """(deadline_ms, priority) from Triton's request parameters (timeout is in microseconds)."""
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise ServeError(400, "'parameters' must be an object")
    timeout, prio = params.get("timeout"), params.get("priority", 0)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
        raise ServeError(400, f"parameters.timeout must be a non-negative number of microseconds, got {timeout!r}")
    if isinstance(prio, bool) or not isinstance(prio, int):
        raise ServeError(400, f"parameters.priority must be an integer, got {prio!r}")
    return (None if timeout is None else timeout / 1000.0), prio
