"""Writes the seed inputs of the front-end fuzz target (tests/fuzz/fuzz_frontend.cc; run once, the fuzzer
grows them): tests/fuzz/corpus/frontend/seed-*, each a scene byte and the bytes one client sends. The model
is the C++ tests' tiny linear one, x [B, 3] -> y [B, 2], served as "m" (versions 1 and 2, label "stable").

    python3 tests/fuzz/make_frontend_seeds.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus", "frontend")

# scene byte (fuzz_frontend.cc): bits 0-2 upstream mode, 3 tokens, 4 draining, 5 queued, bits 6-7: 2 the
# floor server, 3 a split send
PLAIN, HANGUP, MALFORMED, CHUNKED_UP, TO_EOF, CLOSE_UP = 0, 1, 2, 3, 4, 5
TOKENS, DRAIN, QUEUED, FLOOR, SPLIT = 8, 16, 32, 0x80, 0xC0


def post(target, body, *extra):
    if isinstance(body, str):
        body = body.encode()
    head = f"POST {target} HTTP/1.1\r\nHost: t\r\n" + "".join(h + "\r\n" for h in extra)
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body


def v2bin(rows=1, name="m", binary_out=None, outputs=None, path=None, *extra):
    x = struct.pack(f"<{3 * rows}f", *[0.5 * i - 1 for i in range(3 * rows)])
    head = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 3],
                        "parameters": {"binary_data_size": len(x)}}]}
    if binary_out is not None:
        head["parameters"] = {"binary_data_output": binary_out}
    if outputs is not None:
        head["outputs"] = outputs
    h = json.dumps(head, separators=(",", ":")).encode()
    return post(path or f"/v2/models/{name}/infer", h + x, f"Inference-Header-Content-Length: {len(h)}", *extra)


V2JSON = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3], [0, -1.5, 2e-3]]}]})
GET = b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n"


def seeds():
    hot = [
        v2bin(), v2bin(2, binary_out=True), v2bin(1, binary_out=False, outputs=[{"name": "y", "parameters": {"binary_data": True}}]),
        post("/v2/models/m/infer", V2JSON), post("/v2/models/m/versions/2/infer", V2JSON),
        post("/v1/models/m:predict", '{"instances": [[1, 2, 3], [4, 5, 6]]}'),
        post("/v1/models/m/labels/stable:predict", '{"instances": [1, 2, 3]}'),
        post("/v1/models/m/versions/1:predict", '{"instances": [[1e-3, -2.5, 3]]}'),
        post("/predict", '{"input": [[1, 2, 3]]}'), post("/predict?x=1", '{ "input" : [ 0.25 , 1e2 , -0 ] }'),
    ]
    for i, h in enumerate(hot):
        yield f"hot-{i}", PLAIN, h
        yield f"hot-queued-{i}", QUEUED, h
    yield "pipelined", PLAIN, b"".join(hot) + GET
    yield "pipelined-queued", QUEUED, b"".join(hot[:4]) + GET + b"".join(hot[4:])
    yield "pipelined-close", PLAIN, hot[0] + post("/predict", '{"input": [1, 2, 3]}', "Connection: close") + hot[1]
    yield "http10", PLAIN, post("/predict", '{"input": [1, 2, 3]}').replace(b"HTTP/1.1", b"HTTP/1.0")
    # forwarded: undecodable, other paths and methods, repeated headers, '%' paths, gzip
    fwd = [
        post("/predict", '{"input": [1, 2]}'), post("/predict", '{"input": [1, 2, 3], "x": 1}'),
        post("/v2/models/n/infer", V2JSON), post("/v2/models/m/versions/9/infer", V2JSON),
        post("/v2/models/m%2f/infer", V2JSON), post("/v1/models/m/labels/none:predict", '{"instances": [1, 2, 3]}'),
        post("/v2/models/m/infer", V2JSON, "Content-Encoding: gzip"),
        v2bin(1, "m", None, None, None, "Inference-Header-Content-Length: 3"),
        b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n", b"HEAD /v2 HTTP/1.1\r\nHost: t\r\n\r\n",
        post("/v2/models/m/infer", '{"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}]}'),
        post("/v2/models/m/infer", '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 1e39]}]}'),
    ]
    for i, r in enumerate(fwd):
        yield f"fwd-{i}", PLAIN, r
    yield "fwd-mixed", PLAIN, hot[0] + fwd[0] + hot[3] + fwd[8] + hot[8]
    for mode, name in ((HANGUP, "hangup"), (MALFORMED, "malformed"), (CHUNKED_UP, "chunked"), (TO_EOF, "eof"),
                       (CLOSE_UP, "close")):
        yield f"upstream-{name}", mode, fwd[8] + hot[0] + fwd[9] + fwd[0]
    # refusals of the parser
    for i, raw in enumerate([b"GARBAGE\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00", b"GET / HTTP/2.0\r\n\r\n",
                             b"POST /predict HTTP/1.1\r\nContent-Length: 99999\r\n\r\n",
                             b"GET / HTTP/1.1\r\nX: " + b"a" * 1100 + b"\r\n\r\n",
                             b"POST /predict HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                             b"POST /predict HTTP/1.1\nContent-Length: 3\n\nabc"]):
        yield f"refuse-{i}", PLAIN, raw
        yield f"refuse-after-hot-{i}", PLAIN, hot[0] + raw
    # chunked: tunnelled to the upstream byte for byte
    chunked = b"POST /predict HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"inp\r\n0\r\n\r\n"
    yield "chunked", PLAIN, chunked
    yield "chunked-after-hot", PLAIN, hot[3] + chunked + hot[0]
    yield "chunked-split", PLAIN | SPLIT, hot[0] + chunked
    # 100-continue, and a body after its head
    cont = post("/predict", '{"input": [1, 2, 3]}', "Expect: 100-continue")
    yield "continue", PLAIN | SPLIT, cont
    yield "continue-drain", PLAIN | SPLIT | DRAIN, cont + hot[1]
    yield "split-v2bin", PLAIN | SPLIT, v2bin(3, binary_out=True) + hot[3]
    yield "drain", DRAIN, b"".join(hot[:3])
    # tokens
    for tok in ("t-infer", "t-read", "t-other", "t-rate", "nope"):
        yield f"token-{tok}", TOKENS, post("/predict", '{"input": [1, 2, 3]}', f"Authorization: Bearer {tok}") + hot[0]
    yield "token-missing", TOKENS, hot[3]
    yield "token-malformed", TOKENS, post("/predict", '{"input": [1, 2, 3]}', "Authorization: Basic abc")
    yield "token-twice", TOKENS, post("/predict", '{"input": [1, 2, 3]}', "Authorization: Bearer t-infer",
                                      "authorization: Bearer t-read")
    yield "token-utf8", TOKENS, post("/predict", '{"input": [1, 2, 3]}', "Authorization: Bearer t-\u00e9")
    yield "token-queued", TOKENS | QUEUED, v2bin(1, "m", True, None, None, "Authorization: bearer  t-infer ")
    # the floor server: the hot path, its own readers' 400s, health, 404/405, parser refusals, chunked
    floor = hot + fwd + [GET, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", b"GET /predict HTTP/1.1\r\n\r\n",
                         post("/predict", '{"input": [1, 2, 3, 4, 5, 6], "extra": 1}'),
                         post("/v2/models/m/infer", '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": ["a", 1, 2]}]}'),
                         post("/v2/models/m/infer", '{"inputs": []}'), chunked]
    for i, r in enumerate(floor):
        yield f"floor-{i}", FLOOR | (QUEUED if i % 2 else 0), r
    yield "floor-pipelined", FLOOR, b"".join(floor[:-1])
    yield "floor-pipelined-queued", FLOOR | QUEUED, b"".join(floor[:-1])


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, scene, raw in seeds():
        with open(os.path.join(OUT, f"seed-{name}"), "wb") as f:
            f.write(bytes([scene]) + raw)


if __name__ == "__main__":
    main()
