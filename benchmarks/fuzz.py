"""Fuzzing the live server: every route of its /openapi.json, KServe v2 over HTTP and over gRPC, with hostile input.

Three surfaces, each a fixed share of `--requests` (default 2000; `--quick`: 300), all generated from one seed
before the first request is sent, so that a run is reproducible:

  openapi      schemathesis reads the server's own /openapi.json and generates positive and negative cases for
               every operation (Hypothesis strategies, drawn with a fixed seed; a share of the positive ones
               names a real model or user in the path, so that they get past the 404). A share is made
               hostile on top: NaN/Infinity, numbers of 5,000 digits, 1e400, lone surrogates ("\\ud800") and
               invalid UTF-8, strings of 100,000 characters, nesting 100,000 deep, duplicate keys, BOMs, wrong
               content types, odd path segments and query values, and missing or wrong API keys. The fit route
               also gets multipart uploads built here: junk, truncated and bomb images, odd file names and
               captions, broken multipart framing; and a few requests go to routes the document leaves out
               (/openapi.json, /docs, versioned KServe paths) or use methods a route does not take.
  kserve-http  KServe v2 infer requests built from a valid one (JSON, or Triton's binary extension) with one to
               three mutations: Inference-Header-Content-Length lies, wrong datatypes and shapes,
               binary_data_size lies, garbage BYTES length prefixes, non-dict parameters, non-list outputs,
               bad input lists, numbers over 4,300 digits, deep nesting, semantic values out of range.
  grpc         KServe v2 gRPC: ModelInfer requests with wrong tensors (datatypes, shapes, typed contents in the
               wrong field, raw_input_contents of the wrong count or length, length-prefix lies), bad model names,
               bad or missing metadata (API key variants, binary and oversized metadata), the unimplemented RPCs
               (ModelStatistics, RepositoryIndex, ModelStreamInfer, ...), unknown methods and services, and
               undecodable protobuf bytes.

Every answer is counted per surface and endpoint (HTTP status, gRPC code). A failure is an HTTP 5xx other than
503 (503 is the server's documented, retryable refusal: busy, not ready, fitting unavailable), a gRPC INTERNAL or
DATA_LOSS, or a gRPC UNKNOWN whose details carry a traceback. Every failure is listed with its request reproduced
compactly (a large or odd body by a recipe such as "'[' * 100000 + ']' * 100000") and, where the server logged it
(an "internal error <id>" answer) or the details carry a traceback, with its cause; failures are also grouped by
endpoint, status and cause. Answers that leak a traceback or server paths, and requests that got no answer
(`lost`), are listed too. After the fuzzing, a valid generation over HTTP /v1, KServe HTTP and gRPC must still
succeed (`final_check`).

Costs are bounded: the run stops by itself after `--requests` requests or `--time-limit` seconds, whichever comes
first (each request has a client timeout); a generation whose settings are valid but expensive (more than 8 steps
or a side over 64 pixels) is cheapened to valid small settings (`cost_capped` counts them). Traffic goes to
127.0.0.1 only: the benchmark starts its own server (`premier serve` on the embedded model, an API key, free
ports, a fresh store; the Ray dashboard and so real fit submissions only with `--fitting`, which then never sends
a fully valid upload), or `--url`/`--grpc` name a running one on the loopback interface.

Run: `python benchmarks/fuzz.py` (about 1.5 min on 2 cores, 40 s of it the server's start), `--quick`,
`--requests N`, `--seed S`, `--fitting`; `--url`/`--grpc`/`--api-key` (and `--log-dir` for causes). Writes JSON
(`--out`, default benchmarks/results/<machine>/fuzz.json, fuzz_quick.json for --quick) and exits 1 when any
failure was seen or the server stopped serving.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.client
import ipaddress
import json
import math
import os
import random
import re
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.grpc_kserve import UNIMPLEMENTED_RPCS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FULL = dict(requests=2000, time_limit_s=900.0, concurrency=4, client_timeout_s=30.0)
QUICK = dict(FULL, requests=300, time_limit_s=150.0)
SPLIT = {"openapi": 0.45, "kserve-http": 0.30, "grpc": 0.25}
SERVER = {
    "max_batch_size": 4,
    "batch_wait_timeout_s": 0.01,
    "max_queued_requests": 16,
    "torch_threads": 1,
    "request_timeout_s": 30.0,
}
COST = {"max_steps": 8, "max_side": 64}  # valid settings above these are cheapened (cost_capped)
# schemathesis cases per operation, relative; an operation whose input space runs out gets hostile variants
OP_WEIGHTS = {
    "POST /v1/generate": 8.0,
    "POST /v1/users/{user_id}/fit": 7.0,
    "POST /v2/models/{model_name}/infer": 3.0,
    "GET /v1/users/{user_id}": 2.0,
    "DELETE /v1/users/{user_id}": 2.0,
    "GET /v1/users/{user_id}/neighbors": 3.0,
    "GET /v1/jobs/{job_id}": 2.0,
    "GET /v2/models/{model_name}": 1.5,
    "GET /v2/models/{model_name}/ready": 1.5,
}
# path values that exist on the embedded model's server (demo and checkpoint users), per route
KNOWN_PATH_VALUES = {
    "GET /v1/users/{user_id}": {"user_id": "alice"},
    "GET /v1/users/{user_id}/neighbors": {"user_id": "bob"},
    "DELETE /v1/users/{user_id}": {"user_id": "u0002"},  # a checkpoint user: 409, the demo users stay
    "POST /v1/users/{user_id}/fit": {"user_id": "fz-new-user"},
    "GET /v2/models/{model_name}": {"model_name": "premier"},
    "GET /v2/models/{model_name}/ready": {"model_name": "premier"},
    "POST /v2/models/{model_name}/infer": {"model_name": "premier"},
}
FRAMING_HEADERS = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade", "te", "trailer"}
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+")
SERVER_PATHS = re.compile(r"/(?:work|tmp/ray|home|root|usr)/[\w./-]+|site-packages")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ERROR_ID = re.compile(r"internal error ([0-9a-f]{8,32})")


# ---------------------------------------------------------------------- hostile values
@dataclass(frozen=True)
class Raw:
    """JSON text sent verbatim (what json.dumps cannot or will not write), with a compact label for reproduction."""

    text: str
    label: str


def nested(n: int, kind: str = "list") -> Raw:
    if kind == "list":
        return Raw("[" * n + "]" * n, f"'[' * {n} + ']' * {n}")
    return Raw('{"a": ' * n + "1" + "}" * n, f"'{{\"a\": ' * {n} + '1' + '}}' * {n}")


def digits(n: int, sign: str = "") -> Raw:
    return Raw(sign + "1" + "0" * (n - 1), f"{sign}1 followed by {n - 1} zeros ({n} digits)")


HOSTILE_VALUES: list[Any] = [
    Raw("NaN", "NaN"),
    Raw("Infinity", "Infinity"),
    Raw("-Infinity", "-Infinity"),
    Raw("1e400", "1e400"),
    Raw("-1e400", "-1e400"),
    digits(5000),
    digits(4301, "-"),
    Raw("9" * 4300, "'9' * 4300"),
    Raw("0." + "0" * 5000 + "1", "0. + '0' * 5000 + '1'"),
    Raw("1e-400", "1e-400"),
    2**63,
    2**64,
    -(2**63) - 1,
    2**31,
    -1,
    0,
    -0.0,
    1.5,
    1e308,
    5e-324,
    True,
    False,
    None,
    "",
    " ",
    "\ud800",
    "a\udfffb",
    "\udc00\ud800",
    "\x00",
    "\u202e\u200b\ufeff",
    "\U0001f600" * 3,
    "x" * 100_000,
    [],
    {},
    [None],
    {"": None},
    {"\ud800": 1},
    [0] * 10_000,
    nested(1_000),
    nested(100_000),
    nested(50_000, "dict"),
]
HOSTILE_STRINGS = ["", " ", "\ud800", "a\udfffb", "\x00", "\u202e", "x" * 30_000, "\U0001f600", "../../etc/passwd"]


def dumps(obj: Any) -> str:
    """JSON with Raw fragments verbatim, NaN/Infinity as Python writes them and lone surrogates as \\ud800 escapes."""
    if isinstance(obj, Raw):
        return obj.text
    if isinstance(obj, dict):
        return (
            "{"
            + ", ".join(f"{k.text if isinstance(k, Raw) else json.dumps(str(k))}: {dumps(v)}" for k, v in obj.items())
            + "}"
        )
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(dumps(v) for v in obj) + "]"
    return json.dumps(obj)


def describe(obj: Any, limit: int = 400) -> str:
    """A compact, reproducible description: Raw labels, long strings and long lists summarised."""

    def go(o: Any) -> str:
        if isinstance(o, Raw):
            return f"<{o.label}>"
        if isinstance(o, str):
            return (
                f"<{o[:1]!r} * {len(o)}>"
                if len(o) > 60 and len(set(o)) == 1
                else repr(o[:60]) + ("..." if len(o) > 60 else "")
            )
        if isinstance(o, dict):
            return "{" + ", ".join(f"{go(k) if isinstance(k, Raw) else repr(k)}: {go(v)}" for k, v in o.items()) + "}"
        if isinstance(o, (list, tuple)):
            if len(o) > 8:
                return (
                    f"[{go(o[0])}] * {len(o)}"
                    if all(x == o[0] for x in o)
                    else "[" + ", ".join(go(x) for x in o[:8]) + f", ... ({len(o)} items)]"
                )
            return "[" + ", ".join(go(x) for x in o) + "]"
        return repr(o)

    text = go(obj)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def png(width: int = 1, height: int = 1, pixels: bool = True) -> bytes:
    """A PNG: valid (RGB, `width` x `height`), or only its header (for a bomb: a huge size with no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if not pixels:
        return head + chunk(b"IEND", b"")
    raw = b"".join(b"\x00" + b"\xc8\x28\x28" * width for _ in range(height))
    return head + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


VALID_PNG = png(8, 8)
JUNK_IMAGES: list[tuple[str, bytes]] = [
    ("random bytes", bytes(range(256)) * 4),
    ("one byte", b"x"),
    ("PNG signature only", b"\x89PNG\r\n\x1a\n"),
    ("truncated PNG", VALID_PNG[:45]),
    ("PNG with a broken IDAT", VALID_PNG[:-20] + b"\x00" * 8),
    ("PNG header 100000x100000, no pixels", png(100_000, 100_000, pixels=False)),
    ("PNG header 0x0", png(0, 0, pixels=False)),
    ("PNG header 2**31-1 x 1", png(2**31 - 1, 1, pixels=False)),
    ("GIF89a header only", b"GIF89a\x01\x00\x01\x00\x00\x00\x00"),
    ("JPEG SOI+EOI", b"\xff\xd8\xff\xd9"),
    ("JPEG SOI then junk", b"\xff\xd8\xff\xe0" + b"\x00" * 64),
    ("BMP header lie", b"BM" + struct.pack("<I", 2**31) + b"\x00" * 48),
    ("RIFF/WEBP lie", b"RIFF\xff\xff\xff\xffWEBPVP8 " + b"\x00" * 32),
    ("TIFF header lie", b"II*\x00" + struct.pack("<I", 2**31) + b"\x00" * 16),
    ("SVG text", b'<svg xmlns="http://www.w3.org/2000/svg" width="99999999" height="99999999"/>'),
    ("NUL bytes", b"\x00" * 1024),
    ("zlib bomb in IDAT", VALID_PNG[:33] + struct.pack(">I", 0) + b"IDAT" + b"\x00\x00\x00\x00" + VALID_PNG[-12:]),
]


# ---------------------------------------------------------------------- cases and outcomes
@dataclass
class HttpCase:
    surface: str
    endpoint: str  # "METHOD /route/{template}": what failures are grouped by
    kind: str  # how it was made: generator and mutations
    method: str
    target: str  # path and query, percent-encoded
    headers: list[tuple[str, bytes]]
    body: bytes = b""
    recipe: str | None = None  # a compact description of a large or odd body

    def compact(self) -> dict[str, Any]:
        shown = [  # "Name: value" each, in order (a header may come twice); the framing ones left out
            f"{k}: {_short(v.decode('latin-1'), 120)}"
            for k, v in self.headers
            if k.lower() not in ("content-length", "user-agent", "accept-encoding", "accept", "connection")
        ]
        out: dict[str, Any] = {"method": self.method, "target": _short(self.target, 300), "headers": shown}
        if self.recipe:
            out["body"] = self.recipe
        elif self.body:
            out["body"] = _short(self.body.decode("utf-8", "backslashreplace"), 400)
        out["body_bytes"] = len(self.body)
        return out


@dataclass
class GrpcCase:
    kind: str
    rpc: str  # "ModelInfer", or a full "/service/Method" path
    message: Any = None  # a protobuf message, or bytes sent as they are
    metadata: list[tuple[str, Any]] = field(default_factory=list)
    stream: bool = False
    timeout_s: float | None = None
    surface: str = "grpc"

    @property
    def endpoint(self) -> str:
        return self.rpc

    def compact(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rpc": self.rpc}
        out["metadata"] = [[k, _short(v if isinstance(v, str) else f"bytes {v[:40]!r}", 120)] for k, v in self.metadata]
        if isinstance(self.message, bytes):
            out["raw_message"] = f"{self.message[:60]!r}" + (
                f"... ({len(self.message)} bytes)" if len(self.message) > 60 else ""
            )
        elif self.message is not None:
            from google.protobuf import text_format

            text = text_format.MessageToString(self.message, as_one_line=True, as_utf8=False)
            out["message"] = _short(text, 500)
            out["message_bytes"] = self.message.ByteSize()
        if self.stream:
            out["stream"] = True
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        return out


@dataclass
class Outcome:
    index: int
    surface: str
    endpoint: str
    kind: str
    answer: str  # "404", "INVALID_ARGUMENT", "lost:timeout", "client:ValueError", "not_sent"
    detail: str = ""  # the answer's body / details, truncated
    latency_s: float = 0.0
    verdict: str = "ok"  # ok | refused | failure | lost | client | not_sent
    full_detail: str = ""
    request_id: str = ""  # Ray Serve's id of the request (X-Request-Id), to find its traceback in the logs


def redact(obj: Any, key: str) -> Any:
    """The run's API key shown as <key> (it is new each run); reproductions stay valid with the key put back."""
    return json.loads(json.dumps(obj).replace(key, "<key>")) if key else obj


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


def http_verdict(status: int) -> str:
    if status == 503:
        return "refused"
    return "failure" if status >= 500 else "ok"


def grpc_verdict(code: str, details: str) -> str:
    if code in ("INTERNAL", "DATA_LOSS") or (code == "UNKNOWN" and TRACEBACK.search(details or "")):
        return "failure"
    return "ok"


def leaks(text: str) -> bool:
    return bool(TRACEBACK.search(text) or SERVER_PATHS.search(text))


# ---------------------------------------------------------------------- auth variants
def http_auth(key: str, rng: random.Random, p_wrong: float) -> tuple[list[tuple[str, bytes]], str]:
    right = ("Authorization", f"Bearer {key}".encode())
    if rng.random() >= p_wrong:
        return [right], ""
    k = key.encode()
    variants: list[tuple[str, list[tuple[str, bytes]]]] = [
        ("none", []),
        ("wrong", [("Authorization", b"Bearer wrong")]),
        ("key+x", [("Authorization", b"Bearer " + k + b"x")]),
        ("key prefix", [("Authorization", b"Bearer " + k[:-1])]),
        ("lower-case scheme", [("Authorization", b"bearer " + k)]),
        ("basic", [("Authorization", b"Basic " + base64.b64encode(b"user:" + k))]),
        ("scheme only", [("Authorization", b"Bearer")]),
        ("empty", [("Authorization", b"")]),
        ("two spaces", [("Authorization", b"Bearer  " + k)]),
        ("trailing space", [("Authorization", b"Bearer " + k + b" ")]),
        ("20k token", [("Authorization", b"Bearer " + b"k" * 20_000)]),
        ("latin-1 bytes", [("Authorization", b"Bearer \xff\xfe" + k)]),
        ("utf-8 token", [("Authorization", "Bearer ключ".encode())]),
        ("surrogate bytes", [("Authorization", b"Bearer \xed\xa0\x80")]),
        ("NUL in token", [("Authorization", b"Bearer \x00" + k)]),
        ("wrong then right", [("Authorization", b"Bearer wrong"), right]),
        ("right then wrong", [right, ("Authorization", b"Bearer wrong")]),
        ("token scheme", [("Authorization", b"Token " + k)]),
        ("key as cookie", [("Cookie", b"Authorization=Bearer " + k)]),
    ]
    label, headers = rng.choice(variants)
    return headers, f"auth:{label}"


def grpc_auth(key: str, rng: random.Random, p_wrong: float) -> tuple[list[tuple[str, Any]], str]:
    right = ("authorization", f"Bearer {key}")
    if rng.random() >= p_wrong:
        return [right], ""
    variants: list[tuple[str, list[tuple[str, Any]]]] = [
        ("none", []),
        ("wrong", [("authorization", "Bearer wrong")]),
        ("lower-case scheme", [("authorization", f"bearer {key}")]),
        ("scheme only", [("authorization", "Bearer")]),
        ("empty", [("authorization", "")]),
        ("basic", [("authorization", "Basic " + base64.b64encode(f"u:{key}".encode()).decode())]),
        ("binary metadata", [("authorization-bin", b"Bearer \xff\x00" + key.encode())]),
        ("wrong then right", [("authorization", "Bearer wrong"), right]),
        ("right then wrong", [right, ("authorization", "Bearer wrong")]),
        ("16k value", [("authorization", "Bearer " + "k" * 16_000)]),
        ("right + 16k other", [right, ("x-junk", "j" * 16_000)]),
        ("right + application=nope", [right, ("application", "nope")]),
        ("right + odd request_id", [right, ("request_id", "../" * 700)]),
        ("right + 200 junk keys", [right, *((f"x-junk-{i}", "v") for i in range(200))]),
    ]
    label, md = rng.choice(variants)
    return md, f"auth:{label}"


# ---------------------------------------------------------------------- the openapi surface (schemathesis)
def draw(strategy: Any, n: int, seed: int) -> list[Any]:
    """Up to n examples of a Hypothesis strategy, the same ones for the same seed (fewer if its space runs out)."""
    out: list[Any] = []
    if n <= 0:
        return out
    with no_local_constants():
        _draw_into(out, strategy, n, seed)
    return out[:n]


@contextlib.contextmanager
def no_local_constants() -> Iterator[None]:
    """Hypothesis also draws constants from the project's modules that happen to be imported, which would make
    the cases depend on what else the process loaded: switched off (an internal hook; left alone if it moved)."""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover
        yield
        return
    original = getattr(providers, "_get_local_constants", None)
    if original is None or not hasattr(providers, "Constants"):  # pragma: no cover
        yield
        return
    providers._get_local_constants = providers.Constants
    providers.CONSTANTS_CACHE.cache.clear()
    try:
        yield
    finally:
        providers._get_local_constants = original
        providers.CONSTANTS_CACHE.cache.clear()


def _draw_into(out: list[Any], strategy: Any, n: int, seed: int) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    @hseed(seed)
    @settings(
        max_examples=n,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        out.append(example)

    collect()


def apportion(n: int, weights: dict[str, float]) -> dict[str, int]:
    """n split in proportion to the weights (largest remainder), at least one each while n allows."""
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    out = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - out[k], reverse=True)[: n - sum(out.values())]:
        out[k] += 1
    return out


def from_transport(kw: dict[str, Any]) -> tuple[str, str, list[tuple[str, bytes]], bytes]:
    """schemathesis' requests kwargs -> (method, target, headers, body) as they go on the wire."""
    import requests

    args = {k: kw.get(k) for k in ("method", "url", "headers", "params", "data", "files", "cookies")}
    if "json" in kw:
        args["json"] = kw["json"]
    try:
        prepared = requests.Request(**args).prepare()
    except ValueError:  # NaN in a JSON body: requests refuses it, the fuzzer does not
        args.pop("json", None)
        args["data"] = json.dumps(kw["json"], allow_nan=True).encode()
        prepared = requests.Request(**args).prepare()
    body = prepared.body or b""
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    headers = []
    for k, v in prepared.headers.items():
        if k.lower() in FRAMING_HEADERS or k.lower() in ("authorization", "x-schemathesis-testcaseid"):
            continue
        headers.append((k, v.encode("latin-1") if _latin1(v) else v.encode("utf-8", "surrogatepass")))
    return prepared.method or "GET", prepared.path_url, *fixed_boundary(headers, body)


def fixed_boundary(headers: list[tuple[str, bytes]], body: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """A multipart boundary made from the content instead of os.urandom, so the same seed sends the same bytes."""
    for k, v in headers:
        m = re.search(rb"boundary=([0-9A-Za-z_-]{8,})", v) if k.lower() == "content-type" else None
        if m:
            old = m.group(1)
            new = b"fzb" + hashlib.sha256(body.replace(old, b"")).hexdigest()[:29].encode()
            return [(k2, v2.replace(old, new)) for k2, v2 in headers], body.replace(old, new)
    return headers, body


def _latin1(v: str) -> bool:
    try:
        v.encode("latin-1")
        return True
    except UnicodeEncodeError:
        return False


PATH_SEGMENTS = [
    "alice",
    "u0000",
    "nobody",
    "premier",
    "PREMIER",
    "..",
    "%2e%2e",
    "%2F",
    "%00",
    "%ff",
    "%ED%A0%80",  # a lone surrogate, UTF-8 encoded (invalid UTF-8)
    "%C0%AF",
    "%F0%9F%98%80",
    "%25",
    "bad%20id!",
    "a" * 5000,
    "fit-0123456789abcdef",
    "fit-" + "0" * 16,
    "fit-..%2F..%2Fetc",
    "premier%00",
    "1",
    "%09",
]
QUERY_VALUES = [
    "NaN",
    "Infinity",
    "1e400",
    "9" * 5000,
    "-0",
    "",
    "%00",
    "0x10",
    "%ED%A0%80",
    "1.0",
    "%2B5",
    "%D9%A3",  # Arabic-Indic digit three
    "1_0",
    "-1",
    "1000000",
]


def hostile_json(base: dict[str, Any], fields: list[str], rng: random.Random) -> tuple[bytes, str, str]:
    """A hostile JSON body from a (generated) object: a hostile value in one field, or a hostile whole body."""
    if rng.random() < 0.7:
        obj = dict(base)
        name = rng.choice([*fields, "<extra>", "<hostile key>"])
        value = rng.choice(HOSTILE_VALUES)
        if name == "<extra>":
            obj["colour"] = value
        elif name == "<hostile key>":
            obj[rng.choice(["\ud800", "", "x" * 10_000, "prompt\x00"])] = value
        else:
            obj[name] = value
        text = dumps(obj)
        return text.encode("utf-8", "surrogatepass"), describe(obj), f"hostile {name}"
    label, make = rng.choice(hostile_bodies(base))
    return make(), label, "hostile body"


def hostile_bodies(base: dict[str, Any]) -> list[tuple[str, Callable[[], bytes]]]:
    """(label, maker): the large ones are made only when chosen."""
    valid = json.dumps(base).encode()
    return [
        ("<empty>", lambda: b""),
        ("<one space>", lambda: b" "),
        ("null", lambda: b"null"),
        ("[]", lambda: b"[]"),
        ('"x"', lambda: b'"x"'),
        ("{", lambda: b"{"),
        ("}", lambda: b"}"),
        ("valid + ' trailing'", lambda: valid + b" trailing"),
        ("UTF-8 BOM + valid", lambda: b"\xef\xbb\xbf" + valid),
        ("valid as UTF-16 with BOM", lambda: json.dumps(base).encode("utf-16")),
        ('{"prompt": "\\xff\\xfe"} (invalid UTF-8)', lambda: b'{"prompt": "\xff\xfe"}'),
        ('{"prompt": "\\xed\\xa0\\x80"} (a surrogate as raw UTF-8)', lambda: b'{"prompt": "\xed\xa0\x80"}'),
        ('{"prompt": "a", "prompt": 5}', lambda: b'{"prompt": "a", "prompt": 5}'),
        ('{"prompt": "\\ud800"}', lambda: b'{"prompt": "\\ud800"}'),
        ('{"prompt": "a", "user_id": "\\udfff"}', lambda: b'{"prompt": "a", "user_id": "\\udfff"}'),
        ("'[' * 100000 + ']' * 100000", lambda: b"[" * 100_000 + b"]" * 100_000),
        ("'{\"prompt\": ' * 50000 + '\"x\"' + '}' * 50000", lambda: b'{"prompt": ' * 50_000 + b'"x"' + b"}" * 50_000),
        ("NUL * 64", lambda: b"\x00" * 64),
        ('{"prompt": "a" * 2000000}', lambda: b'{"prompt": "' + b"a" * 2_000_000 + b'"}'),
        ("an object of 20000 keys", lambda: ("{" + ", ".join(f'"k{i}": {i}' for i in range(20_000)) + "}").encode()),
        (
            '{"prompt": "p", "seed": 1 followed by 5000 zeros}',
            lambda: b'{"prompt": "p", "seed": 1' + b"0" * 5000 + b"}",
        ),
        ("valid, then 10 MB of spaces", lambda: valid + b" " * 10_000_000),
    ]


CONTENT_TYPES = [
    b"text/plain",
    b"application/x-www-form-urlencoded",
    b"multipart/form-data",
    b"multipart/form-data; boundary=",
    b"application/json; charset=utf-16",
    b"application/json; charset=bogus",
    b"application/xml",
    b"image/png",
    b"",
    b"application/json\x00",
    b"application/json; " + b"a" * 5000,
    "application/json; charset=\u00e9".encode(),
]


def cheap_settings(obj: Any, limits: dict[str, Any]) -> bool:
    """Make valid but expensive settings in a /v1 JSON body cheap (in place); True when it changed anything."""
    if not isinstance(obj, dict):
        return False
    changed = False
    max_steps = limits.get("max_steps", 200)
    steps = obj.get("steps")
    if type(steps) is int and COST["max_steps"] < steps <= max_steps:
        obj["steps"] = 1 + steps % COST["max_steps"]
        changed = True
    mult, lo, hi = limits.get("size_multiple", 4), limits.get("min_size", 8), limits.get("max_size", 512)
    for side in ("height", "width"):
        v = obj.get(side)
        if type(v) is int and COST["max_side"] < v <= hi and v % mult == 0:
            obj[side] = max(lo, (v % COST["max_side"]) // mult * mult) or lo
            changed = True
    return changed


def openapi_cases(
    spec: dict[str, Any], n: int, seed: int, key: str, limits: dict[str, Any]
) -> tuple[list[HttpCase], dict[str, Any]]:
    import schemathesis
    from schemathesis import GenerationMode

    rng = random.Random(seed * 7919 + 1)
    schema = schemathesis.openapi.from_dict(spec)
    ops, skipped = [], []
    for result in schema.get_all_operations():
        try:
            ops.append(result.ok())
        except Exception as e:  # an operation schemathesis cannot read: reported
            skipped.append(str(e)[:200])
    endpoints = {f"{op.method.upper()} {op.path}": op for op in ops}
    hidden = min(n // 2, max(5, n // 40))  # routes the document leaves out
    budget = apportion(n - hidden, {e: OP_WEIGHTS.get(e, 1.0) for e in endpoints})
    cases: list[HttpCase] = []
    stats = {"operations": len(ops), "skipped_operations": skipped, "drawn": {}, "cost_capped": 0}
    for op_index, (endpoint, op) in enumerate(sorted(endpoints.items())):
        k = budget[endpoint]
        if k <= 0:
            continue
        is_fit = endpoint == "POST /v1/users/{user_id}/fit"
        handmade = k // 2 if is_fit else 0  # half of the fit route's share: the uploads built here
        wanted = k - handmade
        known = {p: v for p, v in KNOWN_PATH_VALUES.get(endpoint, {}).items() if "{" + p + "}" in op.path}
        plan = [("positive", GenerationMode.POSITIVE, None, 0.5), ("negative", GenerationMode.NEGATIVE, None, 0.5)]
        if known:  # random path values mostly meet 404: a share of the positive cases names a real model or user
            plan = [
                ("positive", GenerationMode.POSITIVE, None, 0.3),
                ("positive, known path", GenerationMode.POSITIVE, known, 0.3),
                ("negative", GenerationMode.NEGATIVE, None, 0.4),
            ]
        shares = apportion(wanted, {label: share for label, _, _, share in plan})
        drawn: list[tuple[Any, str]] = []
        for mode_i, (label, mode, path_parameters, _) in enumerate(plan):
            try:
                strategy = op.as_strategy(generation_mode=mode, path_parameters=path_parameters)
                drawn += [(c, label) for c in draw(strategy, shares[label], seed * 1000 + op_index * 4 + mode_i)]
            except Exception as e:  # e.g. nothing to negate
                stats["drawn"][f"{endpoint} {label}"] = f"none: {type(e).__name__}"
        rng.shuffle(drawn)  # repeats (below) then come from every mode
        stats["drawn"][endpoint] = len(drawn)
        for i in range(wanted):
            if not drawn:
                break
            case, mode = drawn[i % len(drawn)]
            force = i >= len(drawn)  # the input space ran out: repeats are made hostile
            cases.append(mutate_openapi(case, mode, endpoint, key, limits, rng, force, stats))
        for _ in range(handmade):
            cases.append(fit_upload_case(key, rng, fitting_enabled=bool(limits.get("_fitting"))))
    cases += [hidden_route_case(key, rng) for _ in range(hidden)]
    return cases, stats


HIDDEN_ROUTES = [
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/v2/models/{model_name}/versions/{version}"),
    ("GET", "/v2/models/{model_name}/versions/{version}/ready"),
    ("POST", "/v2/models/{model_name}/versions/{version}/infer"),
    ("PUT", "/v1/generate"),
    ("OPTIONS", "/v1/generate"),
    ("HEAD", "/v1/model"),
    ("TRACE", "/v1/model"),
    ("GET", "/v1/users/{user_id}/fit"),
]


def hidden_route_case(key: str, rng: random.Random) -> HttpCase:
    """A route /openapi.json does not list (the docs, versioned KServe paths) or a method a route does not take."""
    method, template = rng.choice(HIDDEN_ROUTES)
    target = template
    for name, choices in (
        ("{model_name}", ["premier", "premier", "other", "%ED%A0%80"]),
        ("{version}", ["1", "1", "2", "%00", "9" * 5000]),
        ("{user_id}", ["alice", "fz-user", "%ff"]),
    ):
        target = target.replace(name, rng.choice(choices))
    auth, label = http_auth(key, rng, p_wrong=0.5)
    body = b'{"inputs": []}' if method in ("POST", "PUT") else b""
    kind = " + ".join(["hidden route", *([label] if label else [])])
    return HttpCase("openapi", f"{method} {template}", kind, method, target, auth, body)


def mutate_openapi(
    case: Any,
    mode: str,
    endpoint: str,
    key: str,
    limits: dict[str, Any],
    rng: random.Random,
    force: bool,
    stats: dict[str, Any],
) -> HttpCase:
    body_obj = getattr(case, "body", None)
    if isinstance(body_obj, dict) and cheap_settings(body_obj, limits):
        stats["cost_capped"] += 1
    method, target, headers, body = from_transport(case.as_transport_kwargs(base_url="http://127.0.0.1"))
    kinds = [f"schemathesis:{mode}"]
    recipe = None
    auth, label = http_auth(key, rng, p_wrong=0.15)
    if label:
        kinds.append(label)
    roll = rng.random()
    if (force or roll < 0.4) and endpoint in ("POST /v1/generate", "POST /v2/models/{model_name}/infer"):
        base = body_obj if isinstance(body_obj, dict) else {"prompt": "a cat"}
        fields = ["prompt", "user_id", "seed", "steps", "height", "width", "guidance", "format"]
        if endpoint.endswith("/infer"):
            base, fields = (
                {"inputs": [{"name": "PROMPT", "datatype": "BYTES", "shape": [1], "data": ["a cat"]}]},
                ["inputs", "outputs", "parameters", "id"],
            )
        body, recipe, what = hostile_json(base, fields, rng)
        headers = [(k, v) for k, v in headers if k.lower() != "content-type"] + [("Content-Type", b"application/json")]
        kinds.append(what)
    elif force or roll < 0.55:
        path, _, query = target.partition("?")
        parts = path.split("/")
        templated = [i for i, p in enumerate(op_template(endpoint).split("/")) if p.startswith("{")]
        templated = [i for i in templated if i < len(parts)]
        if templated and rng.random() < 0.6:
            i = rng.choice(templated)
            parts[i] = rng.choice(PATH_SEGMENTS)
            kinds.append(f"path segment {describe(parts[i], 40)}")
        else:
            name = rng.choice(["k", "version", "k", "\u00e9", "user_id"])
            value = rng.choice(QUERY_VALUES)
            query = (query + "&" if query else "") + f"{urllib.parse.quote(name)}={value}"
            kinds.append(f"query {name}={describe(value, 40)}")
        target = "/".join(parts) + ("?" + query if query else "")
    if rng.random() < 0.08:
        ct = rng.choice(CONTENT_TYPES)
        headers = [(k, v) for k, v in headers if k.lower() != "content-type"] + [("Content-Type", ct)]
        kinds.append(f"content-type {ct[:40]!r}")
    return HttpCase("openapi", endpoint, " + ".join(kinds), method, target, auth + headers, body, recipe)


def op_template(endpoint: str) -> str:
    return endpoint.split(" ", 1)[1]


# ---------------------------------------------------------------------- multipart fit uploads
FILE_NAMES = [
    "a.png",
    "b.jpg",
    "c.webp",
    "../../etc/passwd.png",
    "a/b.png",
    "..\\a.png",
    ".hidden.png",
    "A.PNG",
    "a.exe",
    "",
    "a" * 300 + ".png",
    "caf\u00e9.png",
    "captions.jsonl",
    "CON.png",
    "a .png",
    "a\x00.png",
    "\u202egnp.exe",
    "a.png.",
]


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes) -> bytes:
    """parts: (headers block, body) each; the closing boundary is added."""
    out = b""
    for head, data in parts:
        out += b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def _disposition(field_name: str, filename: str | None, ctype: bytes = b"image/png") -> bytes:
    fn = b""
    if filename is not None:
        fn = b'; filename="' + filename.encode("utf-8", "surrogatepass").replace(b'"', b"%22") + b'"'
    head = b'Content-Disposition: form-data; name="' + field_name.encode("utf-8", "surrogatepass") + b'"' + fn
    return head + (b"\r\nContent-Type: " + ctype if filename is not None else b"")


def fit_upload_case(key: str, rng: random.Random, fitting_enabled: bool) -> HttpCase:
    """A multipart upload to /v1/users/{id}/fit with junk in it; never a fully valid one while fitting is on."""
    kinds = ["fit upload"]
    user = rng.choice(["fz-user", "fz-user", "fz-user", "bad%20id!", "..", "a" * 300, "%ED%A0%80", "alice", "u0000"])
    n_images = rng.choice([1, 1, 2, 3, 65])
    images: list[tuple[str, bytes, str]] = []
    for i in range(n_images):
        if rng.random() < 0.25:
            name, data, what = f"img{i}.png", VALID_PNG, "valid PNG"
        else:
            what, data = rng.choice(JUNK_IMAGES)
            name = rng.choice(FILE_NAMES) if rng.random() < 0.35 else f"img{i}.png"
        images.append((name, data, what))
    # while the Jobs API is there, an upload that is all valid would start a real fit: spoil it
    if fitting_enabled and all(w == "valid PNG" for _, _, w in images) and user in ("fz-user", "alice", "u0000"):
        images.append((f"img{len(images)}.png", JUNK_IMAGES[3][1], JUNK_IMAGES[3][0]))
    n_captions = len(images) + rng.choice([0, 0, 0, -1, 1])
    captions = [
        rng.choice(["a red square", *HOSTILE_STRINGS]) if rng.random() < 0.3 else f"caption {i}"
        for i in range(max(0, n_captions))
    ]
    boundary = b"fz" + bytes(f"{rng.getrandbits(48):012x}", "ascii")
    parts = [(_disposition("images", name), data) for name, data, _ in images]
    parts += [(_disposition("captions", None), c.encode("utf-8", "surrogatepass")) for c in captions]
    if rng.random() < 0.2:
        rng.shuffle(parts)
    ctype = b"multipart/form-data; boundary=" + boundary
    framing = rng.random()
    body = multipart(parts, boundary)
    if framing < 0.06:
        body = body[: -len(boundary) - 6]
        kinds.append("no closing boundary")
    elif framing < 0.10:
        ctype = b"multipart/form-data; boundary=other"
        kinds.append("boundary mismatch")
    elif framing < 0.13:
        ctype = b"multipart/form-data"
        kinds.append("no boundary parameter")
    elif framing < 0.16:
        parts.append((b"X-Nothing: here", b"part without a disposition"))
        body = multipart(parts, boundary)
        kinds.append("part without Content-Disposition")
    elif framing < 0.19:
        parts.insert(0, (b"Content-Disposition: form-data; name=\"images\"; filename*=UTF-8''%ED%A0%80.png", VALID_PNG))
        body = multipart(parts, boundary)
        kinds.append("filename* with an encoded surrogate")
    elif framing < 0.22:
        ctype = b"application/json"
        kinds.append("multipart body as application/json")
    elif framing < 0.25:
        body = (
            b"--"
            + boundary
            + b"\r\n"
            + b'Content-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
            + VALID_PNG
        )
        kinds.append("cut in the first part")
    auth, label = http_auth(key, rng, p_wrong=0.1)
    if label:
        kinds.append(label)
    what = ", ".join(f"{name!r}: {w}" for name, _, w in images[:6]) + (
        f", ... ({len(images)} images)" if len(images) > 6 else ""
    )
    recipe = f"multipart: images [{what}]; captions {describe(captions, 200)}; " + "; ".join(kinds[1:])
    return HttpCase(
        "openapi",
        "POST /v1/users/{user_id}/fit",
        " + ".join(kinds),
        "POST",
        f"/v1/users/{user}/fit",
        auth + [("Content-Type", ctype)],
        body,
        recipe,
    )


# ---------------------------------------------------------------------- KServe v2 over HTTP
TENSORS = {  # name: (datatype, struct format of one element)
    "PROMPT": ("BYTES", None),
    "USER_ID": ("BYTES", None),
    "SEED": ("INT64", "<q"),
    "STEPS": ("INT32", "<i"),
    "HEIGHT": ("INT32", "<i"),
    "WIDTH": ("INT32", "<i"),
    "GUIDANCE": ("FP32", "<f"),
}
DATATYPES = [
    "BYTES",
    "INT64",
    "INT32",
    "FP32",
    "FP64",
    "FP16",
    "BF16",
    "BOOL",
    "UINT8",
    "UINT64",
    "INT8",
    "bytes",
    "int64",
    "",
]
PROMPTS = ["a red circle", "a cat on a sofa", "two blue squares", "a lighthouse at dusk"]


def bytes_element(b: bytes) -> bytes:
    """Triton's serialized BYTES element: a 4-byte little-endian length, then the bytes."""
    return struct.pack("<I", len(b)) + b


@dataclass
class InferDraft:
    inputs: list[dict[str, Any]]
    raw: dict[int, bytes]  # input index -> binary data (Triton's binary extension)
    req_extra: dict[str, Any] = field(default_factory=dict)
    model: str = "premier"
    version: str | None = None
    header_len: Any = "auto"  # "auto": the true JSON length when there is binary data; else sent as given
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    content_type: bytes | None = b"application/json"
    labels: list[str] = field(default_factory=list)
    body_override: tuple[bytes, str] | None = None
    tail_extra: bytes = b""
    tail_cut: int = 0

    def build(self, key: str, rng: random.Random) -> HttpCase:
        auth, label = http_auth(key, rng, p_wrong=0.1)
        labels = self.labels + ([label] if label else [])
        req: dict[str, Any] = {"inputs": self.inputs, **self.req_extra}
        if self.body_override is not None:
            body, recipe = self.body_override
            head_len = None
        else:
            head = dumps(req).encode("utf-8", "surrogatepass")
            tail = b"".join(self.raw[i] for i in sorted(self.raw)) + self.tail_extra
            if self.tail_cut:
                tail = tail[: -self.tail_cut]
            body = head + tail
            head_len = len(head) if (self.header_len == "auto" and (self.raw or self.tail_extra)) else self.header_len
            tail_note = f" + {len(tail)} binary bytes" if tail else ""
            recipe = describe(req, 600) + tail_note
        headers = list(self.headers)
        if head_len not in (None, "auto"):
            headers.append(
                (
                    "Inference-Header-Content-Length",
                    str(head_len).encode("utf-8", "surrogatepass") if not isinstance(head_len, bytes) else head_len,
                )
            )
        if self.content_type is not None:
            headers.append(("Content-Type", self.content_type))
        path = f"/v2/models/{self.model}" + (f"/versions/{self.version}" if self.version is not None else "") + "/infer"
        if len(body) <= 300 and recipe and not self.raw:
            recipe = None  # the body itself is short enough to show
        return HttpCase(
            "kserve-http",
            "POST /v2/models/{model_name}/infer",
            " + ".join(labels) or "valid",
            "POST",
            path,
            auth + headers,
            body,
            recipe,
        )


def kserve_base(rng: random.Random, limits: dict[str, Any]) -> InferDraft:
    values: dict[str, Any] = {"PROMPT": rng.choice(PROMPTS)}
    for name, choices in (
        ("USER_ID", ["", "alice", "bob", "u0001", "nobody"]),
        ("SEED", [0, 7, 2**31, 2**63 - 1]),
        ("STEPS", [1, 2, 4]),
        ("HEIGHT", [16, 32, 64]),
        ("WIDTH", [16, 32, 48]),
        ("GUIDANCE", [0.0, 1.5, 3.5]),
    ):
        if rng.random() < 0.5:
            values[name] = rng.choice(choices)
    binary = rng.random() < 0.4
    inputs, raw = [], {}
    for i, (name, v) in enumerate(values.items()):
        dt, fmt = TENSORS[name]
        t: dict[str, Any] = {"name": name, "datatype": dt, "shape": [1]}
        if binary and rng.random() < 0.8:
            data = bytes_element(v.encode()) if dt == "BYTES" else struct.pack(fmt, v)
            t["parameters"] = {"binary_data_size": len(data)}
            raw[i] = data
        else:
            t["data"] = [v]
        inputs.append(t)
    d = InferDraft(inputs, raw)
    if rng.random() < 0.3:
        d.req_extra["outputs"] = [{"name": "IMAGE", "parameters": {"binary_data": rng.random() < 0.5}}]
    if rng.random() < 0.2:
        d.req_extra["parameters"] = {"binary_data_output": rng.random() < 0.5}
    if rng.random() < 0.2:
        d.req_extra["id"] = f"req-{rng.getrandbits(32):x}"
    return d


def _pick(d: InferDraft, rng: random.Random) -> tuple[int, dict[str, Any]]:
    i = rng.randrange(len(d.inputs))
    return i, d.inputs[i]


def m_header_len(d: InferDraft, rng: random.Random) -> None:
    v = rng.choice(
        [
            -1,
            10**6,
            0,
            1,
            "abc",
            "1.5",
            " 12",
            "+5",
            "\u0663",
            "9" * 5000,
            "0x10",
            "",
            "1_0",
            "-0",
            "\u0661\u0660",
            None,
        ]
    )
    if v is None:
        d.header_len = None
        d.labels.append("no Inference-Header-Content-Length")
    else:
        d.header_len = v
        d.labels.append(f"Inference-Header-Content-Length {describe(v, 40)}")


def m_datatype(d: InferDraft, rng: random.Random) -> None:
    _, t = _pick(d, rng)
    t["datatype"] = rng.choice([*DATATYPES, None, 5, [], {}, "BYTES\x00", "\ud800", "x" * 10_000])
    d.labels.append(f"{t.get('name')} datatype {describe(t['datatype'], 40)}")


def m_shape(d: InferDraft, rng: random.Random) -> None:
    _, t = _pick(d, rng)
    t["shape"] = rng.choice(
        [
            [],
            [0],
            [-1],
            [2],
            [1, 1],
            [10**18],
            [2**63],
            [-(2**63)],
            [True],
            ["1"],
            [1.5],
            None,
            "1",
            {},
            [[1]],
            [1] * 100,
            Raw("[" + "9" * 5000 + "]", "[9 * 5000 digits]"),
            Raw("[1e400]", "[1e400]"),
            [2**64],
            [-1, -1],
        ]
    )
    d.labels.append(f"{t.get('name')} shape {describe(t['shape'], 40)}")


def m_data(d: InferDraft, rng: random.Random) -> None:
    i, t = _pick(d, rng)
    d.raw.pop(i, None)
    t.pop("parameters", None)
    t["data"] = rng.choice(
        [
            None,
            [],
            [[["x"]]],
            {},
            "x",
            5,
            [Raw("NaN", "NaN")],
            [Raw("Infinity", "Infinity")],
            [Raw("-Infinity", "-Infinity")],
            [Raw("1e400", "1e400")],
            [10**30],
            [digits(5000)],
            [True],
            ["\ud800"],
            [{"a": 1}],
            [[1, 2]],
            ["x" * 100_000],
            ["1"],
            [1.5],
            [-1],
            [2**63],
            [-(2**63) - 1],
            [nested(10_000)],
            [None],
            [1, 2],
            ["a", "b"],
            [b"x".hex()],
            [3.4e38 * 10],
        ]
    )
    d.labels.append(f"{t.get('name')} data {describe(t['data'], 60)}")


def m_value(d: InferDraft, rng: random.Random) -> None:
    """A well-formed tensor whose value is out of range (or odd) for its parameter."""
    name = rng.choice(list(TENSORS))
    dt, fmt = TENSORS[name]
    choices = {
        "PROMPT": ["", " ", "x" * 30_000, "\ud800", "\x00", "a" * 200, "\U0001f600" * 100],
        "USER_ID": ["", "nobody", "bad id!", "../x", "\ud800", "a" * 10_000, "alice\x00"],
        "SEED": [-1, 2**63 - 1, -(2**63), 0],
        "STEPS": [0, -1, 2**31 - 1, -(2**31), 201],
        "HEIGHT": [33, 0, -4, 2**31 - 1, 516, 4],
        "WIDTH": [1, 0, -8, 2**31 - 1, 1_000_000 // 4 * 4],
        "GUIDANCE": [math.nan, math.inf, -math.inf, -0.0, 1e30, -1.0, 31.0, 3.4e38],
    }[name]
    v = rng.choice(choices)
    d.inputs = [t for t in d.inputs if t.get("name") != name]
    d.raw = {}  # indices shift: rebuild the remaining binary inputs as JSON data
    for t in d.inputs:
        if "parameters" in t and "binary_data_size" in t.get("parameters", {}):
            t.pop("parameters")
            t["data"] = ["a cat"] if t["datatype"] == "BYTES" else [1]
    t: dict[str, Any] = {"name": name, "datatype": dt, "shape": [1]}
    if rng.random() < 0.5:
        try:
            data = bytes_element(v.encode("utf-8", "surrogatepass")) if dt == "BYTES" else struct.pack(fmt, v)
            t["parameters"] = {"binary_data_size": len(data)}
            d.raw[len(d.inputs)] = data
        except struct.error:
            t["data"] = [v]
    else:
        t["data"] = [Raw("NaN", "NaN") if isinstance(v, float) and math.isnan(v) else v]
    d.inputs.append(t)
    if not any(x.get("name") == "PROMPT" for x in d.inputs):
        d.inputs.insert(0, {"name": "PROMPT", "datatype": "BYTES", "shape": [1], "data": ["a cat"]})
        d.raw = {k + 1: v for k, v in d.raw.items()}
    d.labels.append(f"{name}={describe(v, 40)}" + (" (binary)" if "parameters" in t else ""))


def m_binary_size(d: InferDraft, rng: random.Random) -> None:
    i, t = _pick(d, rng)
    if i not in d.raw:
        data = bytes_element(b"a cat") if t.get("datatype") == "BYTES" else b"\x01\x00\x00\x00"
        d.raw[i] = data
        t.pop("data", None)
    n = len(d.raw[i])
    lie = rng.choice([n + 1, n - 1, 0, -1, 10**20, True, False, 1.5, str(n), None, digits(5000), n * 1000, 2**63])
    t["parameters"] = {"binary_data_size": lie}
    d.labels.append(f"{t.get('name')} binary_data_size {describe(lie, 40)} (true {n})")


def m_bytes_prefix(d: InferDraft, rng: random.Random) -> None:
    """A binary BYTES tensor whose length prefix lies, or which holds invalid UTF-8."""
    name = rng.choice(["PROMPT", "USER_ID"])
    data = rng.choice(
        [
            struct.pack("<I", 0xFFFFFFFF) + b"abc",
            struct.pack("<I", 2**31) + b"abc",
            struct.pack("<I", 10) + b"abc",
            b"\x01\x00",
            b"",
            bytes_element(b"\xff\xfe\xfd"),
            bytes_element(b"\xed\xa0\x80"),
            bytes_element(b"a") + bytes_element(b"b"),
            struct.pack("<I", 0),
        ]
    )
    d.inputs = [t for t in d.inputs if t.get("name") != name]
    d.raw = {}
    for t in d.inputs:
        if "binary_data_size" in (t.get("parameters") or {}):
            t.pop("parameters")
            t["data"] = ["a cat"] if t.get("datatype") == "BYTES" else [1]
    d.inputs.append({"name": name, "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(data)}})
    d.raw[len(d.inputs) - 1] = data
    if not any(x.get("name") == "PROMPT" for x in d.inputs):
        d.inputs.insert(0, {"name": "PROMPT", "datatype": "BYTES", "shape": [1], "data": ["a cat"]})
        d.raw = {k + 1: v for k, v in d.raw.items()}
    d.labels.append(f"{name} binary BYTES {data[:16]!r} ({len(data)} bytes)")


def m_tail(d: InferDraft, rng: random.Random) -> None:
    if rng.random() < 0.5 and d.raw:
        d.tail_cut = rng.choice([1, 3, sum(len(v) for v in d.raw.values())])
        d.labels.append(f"binary tail cut by {d.tail_cut}")
    else:
        d.tail_extra = rng.choice([b"\x00", b"junk" * 100, b"\xff" * 10_000])
        d.labels.append(f"{len(d.tail_extra)} extra binary bytes")


def m_parameters(d: InferDraft, rng: random.Random) -> None:
    where = rng.choice(["request", "input", "output"])
    v = rng.choice(
        [
            [],
            "x",
            5,
            True,
            None,
            Raw("NaN", "NaN"),
            nested(10_000, "dict"),
            {"binary_data_output": "yes"},
            {"binary_data_output": [1]},
            {"binary_data_output": Raw("NaN", "NaN")},
            {"binary_data": {}},
            {"\ud800": 1},
            {"binary_data_size": -1},
        ]
    )
    if where == "request":
        d.req_extra["parameters"] = v
    elif where == "input":
        i, t = _pick(d, rng)
        if i in d.raw and not isinstance(v, dict):
            t["parameters"] = v
            d.raw.pop(i)
            t["data"] = ["a cat"] if t.get("datatype") == "BYTES" else [1]
        elif i not in d.raw:
            t["parameters"] = v
    else:
        d.req_extra["outputs"] = [{"name": "IMAGE", "parameters": v}]
    d.labels.append(f"{where} parameters {describe(v, 40)}")


def m_outputs(d: InferDraft, rng: random.Random) -> None:
    v = rng.choice(
        [
            {},
            "IMAGE",
            5,
            None,
            [None],
            [5],
            ["IMAGE"],
            [{"name": 5}],
            [{"name": "IMAGE", "parameters": []}],
            [{"name": "OTHER"}],
            [{}],
            [{"name": ["IMAGE"]}],
            [{"name": "IMAGE"}] * 1000,
            [{"name": {"a": 1}}],
            nested(10_000),
        ]
    )
    d.req_extra["outputs"] = v
    d.labels.append(f"outputs {describe(v, 40)}")


def m_inputs(d: InferDraft, rng: random.Random) -> None:
    choice = rng.randrange(10)
    d.raw = {} if choice != 4 else d.raw
    if choice == 0:
        v = rng.choice([None, {}, "x", 5, [None], [5], [[]], [""], nested(10_000)])
        d.inputs = v  # type: ignore[assignment]
        d.labels.append(f"inputs {describe(v, 40)}")
        return
    for t in d.inputs:
        if "binary_data_size" in (t.get("parameters") or {}) and choice != 4:
            t.pop("parameters")
            t["data"] = ["a cat"] if t.get("datatype") == "BYTES" else [1]
    if choice == 1:
        d.inputs = [t for t in d.inputs if t.get("name") != "PROMPT"]
        d.labels.append("no PROMPT")
    elif choice == 2:
        d.inputs = d.inputs + [dict(d.inputs[0])]
        d.labels.append(f"{d.inputs[0].get('name')} twice")
    elif choice == 3:
        d.inputs = d.inputs + [
            {"name": "PROMPT2", "datatype": "BYTES", "shape": [1], "data": ["x"]} for _ in range(500)
        ]
        d.labels.append("500 unknown inputs")
    elif choice == 4:
        d.inputs = d.inputs + [{"name": "SEEDS", "datatype": "INT64", "shape": [1], "data": [1]}]
        d.labels.append("an unknown input SEEDS")
    else:
        name = rng.choice([5, None, "\ud800", "x" * 10_000, "", "prompt", "PROMPT\x00", ["PROMPT"], {"a": 1}, True])
        d.inputs[0] = {**d.inputs[0], "name": name}
        d.labels.append(f"input name {describe(name, 40)}")


def m_top(d: InferDraft, rng: random.Random) -> None:
    choice = rng.randrange(6)
    if choice == 0:
        label, body = rng.choice(
            [
                ("[]", b"[]"),
                ('"x"', b'"x"'),
                ("5", b"5"),
                ("null", b"null"),
                ("<empty>", b""),
                ("'[' * 100000 + ']' * 100000", b"[" * 100_000 + b"]" * 100_000),
                ('{"inputs": 1' + "0" * 5000 + "}", b'{"inputs": 1' + b"0" * 5000 + b"}"),
                ('{"inputs": [], "inputs": "x"}', b'{"inputs": [], "inputs": "x"}'),
                ("UTF-8 BOM + {inputs: []}", b'\xef\xbb\xbf{"inputs": []}'),
                ('{"inputs": [{"name": "\\xff"}]} (invalid UTF-8)', b'{"inputs": [{"name": "\xff"}]}'),
                ("<NUL * 100>", b"\x00" * 100),
                ("UTF-16 JSON", json.dumps({"inputs": []}).encode("utf-16")),
            ]
        )
        d.body_override = (body, label)
        d.raw = {}
        d.labels.append(f"body {label[:60]}")
    elif choice == 1:
        d.req_extra["id"] = rng.choice([5, None, [], {}, "x" * 100_000, "\ud800", Raw("NaN", "NaN"), nested(1000)])
        d.labels.append(f"id {describe(d.req_extra['id'], 40)}")
    elif choice == 2:
        key = rng.choice(["\ud800", "x" * 10_000, "", "inputs\x00"])
        d.req_extra[key] = rng.choice(HOSTILE_VALUES)
        d.labels.append(f"extra key {describe(key, 30)}: {describe(d.req_extra[key], 40)}")
    elif choice == 3:
        d.model = rng.choice(["other", "PREMIER", "%00", "%ED%A0%80", "premier%2F..", "a" * 5000, "%F0%9F%98%80"])
        d.labels.append(f"model {describe(d.model, 40)}")
    elif choice == 4:
        d.version = rng.choice(["1", "2", "0", "-1", "%00", "01", "1%20", "9" * 5000, "%ED%A0%80"])
        d.labels.append(f"version {describe(d.version, 40)}")
    else:
        d.content_type = rng.choice([None, *CONTENT_TYPES])
        d.labels.append(f"content-type {describe(d.content_type, 40)}")
    if rng.random() < 0.1:
        d.headers.append(("Content-Encoding", rng.choice([b"gzip", b"br", b"identity, gzip"])))
        d.labels.append("a Content-Encoding lie")


KSERVE_MUTATIONS: list[tuple[Callable[[InferDraft, random.Random], None], float]] = [
    (m_header_len, 1.0),
    (m_datatype, 1.5),
    (m_shape, 1.5),
    (m_data, 2.0),
    (m_value, 2.0),
    (m_binary_size, 1.5),
    (m_bytes_prefix, 1.0),
    (m_tail, 0.7),
    (m_parameters, 1.2),
    (m_outputs, 1.0),
    (m_inputs, 1.2),
    (m_top, 1.5),
]


def kserve_cases(n: int, seed: int, key: str, limits: dict[str, Any]) -> list[HttpCase]:
    rng = random.Random(seed * 7919 + 2)
    fns, weights = zip(*KSERVE_MUTATIONS)
    cases = []
    for _ in range(n):
        d = kserve_base(rng, limits)
        k = 0 if rng.random() < 0.05 else rng.choice([1, 1, 1, 2, 2, 3])
        for fn in rng.choices(fns, weights, k=k):
            try:
                fn(d, rng)
            except (TypeError, AttributeError, IndexError, KeyError, ValueError):
                d.labels.append(f"({fn.__name__} skipped)")  # an earlier mutation left nothing it can work on
        cases.append(d.build(key, rng))
    return cases


# ---------------------------------------------------------------------- KServe v2 over gRPC
UNIMPLEMENTED = list(UNIMPLEMENTED_RPCS)  # the server's own list: they must answer UNIMPLEMENTED
CONTENTS_FIELDS = [
    "bytes_contents",
    "int64_contents",
    "int_contents",
    "fp32_contents",
    "fp64_contents",
    "uint_contents",
    "uint64_contents",
    "bool_contents",
]


def grpc_infer_base(rng: random.Random, pb: Any) -> tuple[Any, bool]:
    req = pb.ModelInferRequest(model_name="premier")
    raw = rng.random() < 0.5
    values: dict[str, Any] = {"PROMPT": rng.choice(PROMPTS)}
    for name, choices in (
        ("USER_ID", ["", "alice", "u0002", "nobody"]),
        ("SEED", [1, 5, 2**40]),
        ("STEPS", [1, 2, 3]),
        ("GUIDANCE", [1.0, 3.5]),
    ):
        if rng.random() < 0.4:
            values[name] = rng.choice(choices)
    for name, v in values.items():
        dt, fmt = TENSORS[name]
        t = req.inputs.add(name=name, datatype=dt, shape=[1])
        if raw:
            req.raw_input_contents.append(bytes_element(v.encode()) if dt == "BYTES" else struct.pack(fmt, v))
        elif dt == "BYTES":
            t.contents.bytes_contents.append(v.encode())
        elif dt == "INT64":
            t.contents.int64_contents.append(v)
        elif dt == "INT32":
            t.contents.int_contents.append(v)
        else:
            t.contents.fp32_contents.append(v)
    if rng.random() < 0.3:
        req.outputs.add(name="IMAGE")
    if rng.random() < 0.2:
        req.id = f"req-{rng.getrandbits(32):x}"
    return req, raw


def grpc_mutate(req: Any, raw: bool, rng: random.Random, pb: Any) -> list[str]:
    labels = []
    choice = rng.randrange(14)
    t = req.inputs[rng.randrange(len(req.inputs))] if len(req.inputs) else None
    if choice == 0 and t is not None:
        t.datatype = rng.choice([*DATATYPES, "\u00e9", "x" * 10_000, "BYTES\x00"])
        labels.append(f"{t.name} datatype {describe(t.datatype, 30)}")
    elif choice == 1 and t is not None:
        shape = rng.choice([[], [0], [-1], [2], [1, 1], [2**62], [-(2**63)], [2**63 - 1], [1] * 100, [-1, -1]])
        del t.shape[:]
        t.shape.extend(shape)
        labels.append(f"{t.name} shape {describe(shape, 30)}")
    elif choice == 2:
        if raw and len(req.raw_input_contents):
            what = rng.randrange(3)
            if what == 0:
                del req.raw_input_contents[-1]
                labels.append("one raw_input_contents fewer than inputs")
            elif what == 1:
                req.raw_input_contents.append(b"\x00" * 8)
                labels.append("one raw_input_contents more than inputs")
            else:
                i = rng.randrange(len(req.raw_input_contents))
                req.raw_input_contents[i] = req.raw_input_contents[i][: rng.choice([0, 1, 3, 7])]
                labels.append(f"raw_input_contents[{i}] cut short")
        else:
            req.raw_input_contents.append(rng.choice([b"", b"\x00" * 4, b"junk"]))
            labels.append("raw_input_contents with typed contents")
    elif choice == 3:
        data = rng.choice(
            [
                struct.pack("<I", 0xFFFFFFFF) + b"abc",
                struct.pack("<I", 2**31) + b"x",
                b"\x01",
                bytes_element(b"\xff\xfe"),
                bytes_element(b"\xed\xa0\x80"),
                bytes_element(b"a") * 2,
                b"",
            ]
        )
        for i, x in enumerate(req.inputs):
            if x.name == "PROMPT":
                if raw:
                    req.raw_input_contents[i] = data
                else:
                    x.ClearField("contents")
                    x.contents.bytes_contents.append(data)
        labels.append(f"PROMPT bytes {data[:12]!r}" + (" (raw)" if raw else " (bytes_contents)"))
    elif choice == 4 and t is not None and not raw:
        fld = rng.choice(CONTENTS_FIELDS)
        t.ClearField("contents")
        v = {
            "bytes_contents": [b"x", b"y"],
            "int64_contents": [2**63 - 1],
            "int_contents": [-(2**31)],
            "fp32_contents": [math.nan],
            "fp64_contents": [math.inf],
            "uint_contents": [2**32 - 1],
            "uint64_contents": [2**64 - 1],
            "bool_contents": [True],
        }[fld]
        getattr(t.contents, fld).extend(v)
        labels.append(f"{t.name} contents in {fld} {describe(v, 30)}")
    elif choice == 5 and t is not None and not raw:
        t.ClearField("contents")
        labels.append(f"{t.name} with no contents")
    elif choice == 6:
        name = rng.choice(["", "prompt", "SEEDS", "\u00e9", "x" * 10_000, "PROMPT"])
        x = req.inputs.add(name=name, datatype="BYTES", shape=[1])
        if raw:
            req.raw_input_contents.append(bytes_element(b"x"))
        else:
            x.contents.bytes_contents.append(b"x")
        labels.append(f"an extra input {describe(name, 30)}")
    elif choice == 7:
        req.model_name = rng.choice(["", "other", "premier\x00", "\u00e9", "x" * 10_000, "PREMIER"])
        labels.append(f"model_name {describe(req.model_name, 30)}")
    elif choice == 8:
        req.model_version = rng.choice(["2", "-1", "1 ", "\u00e9", "9" * 5000, "0"])
        labels.append(f"model_version {describe(req.model_version, 30)}")
    elif choice == 9:
        o = req.outputs.add(name=rng.choice(["OTHER", "", "IMAGE", "\u00e9"]))
        if rng.random() < 0.5:
            o.parameters["binary_data"].string_param = "yes"
        labels.append(f"output {o.name!r}")
    elif choice == 10:
        p = req.parameters[rng.choice(["binary_data_output", "priority", "timeout", "\u00e9", "x" * 1000])]
        kind = rng.randrange(5)
        if kind == 0:
            p.string_param = "x" * 100_000
        elif kind == 1:
            p.int64_param = -(2**63)
        elif kind == 2:
            p.bool_param = True
        elif kind == 3:
            p.double_param = math.nan
        else:
            p.uint64_param = 2**64 - 1
        labels.append(f"request parameter kind {kind}")
    elif choice == 11:
        req.id = rng.choice(["x" * 100_000, "\u00e9\u202e", "\x00"])
        labels.append(f"id {describe(req.id, 30)}")
    elif choice == 12:
        name = rng.choice(["STEPS", "HEIGHT", "WIDTH", "SEED", "GUIDANCE", "PROMPT", "USER_ID"])
        dt, fmt = TENSORS[name]
        v = {
            "STEPS": [0, -1, 2**31 - 1, 201],
            "HEIGHT": [33, 0, -4, 2**31 - 1],
            "WIDTH": [4, 1_000_000],
            "SEED": [-1, -(2**63), 2**63 - 1],
            "GUIDANCE": [math.nan, math.inf, -1.0, 1e30],
            "PROMPT": ["", " ", "x" * 30_000, "\x00"],
            "USER_ID": ["nobody", "bad id!", "a" * 10_000],
        }[name]
        value = rng.choice(v)
        keep = [(x, req.raw_input_contents[i] if raw else None) for i, x in enumerate(req.inputs) if x.name != name]
        new = pb.ModelInferRequest(model_name=req.model_name, id=req.id)
        new.outputs.extend(req.outputs)
        for x, r in keep:
            new.inputs.append(x)
            if raw:
                new.raw_input_contents.append(r)
        x = new.inputs.add(name=name, datatype=dt, shape=[1])
        if raw:
            new.raw_input_contents.append(bytes_element(value.encode()) if dt == "BYTES" else struct.pack(fmt, value))
        elif dt == "BYTES":
            x.contents.bytes_contents.append(value.encode())
        else:
            getattr(
                x.contents, {"INT64": "int64_contents", "INT32": "int_contents", "FP32": "fp32_contents"}[dt]
            ).append(value)
        req.CopyFrom(new)
        labels.append(f"{name}={describe(value, 30)}")
    else:
        del req.inputs[:]
        del req.raw_input_contents[:]
        labels.append("no inputs")
    return labels or ["valid"]


def grpc_cases(n: int, seed: int, key: str) -> list[GrpcCase]:
    from serving.grpc_stubs import service_pb2 as pb

    rng = random.Random(seed * 7919 + 3)
    cases = []
    for _ in range(n):
        md, auth_label = grpc_auth(key, rng, p_wrong=0.15)
        roll = rng.random()
        if roll < 0.68:
            req, raw = grpc_infer_base(rng, pb)
            labels = []
            for _ in range(0 if rng.random() < 0.05 else rng.choice([1, 1, 2, 3])):
                try:
                    labels += grpc_mutate(req, raw, rng, pb)
                except (TypeError, AttributeError, IndexError, KeyError, ValueError):
                    labels.append("(mutation skipped)")
            kind = ("raw " if raw else "typed ") + " + ".join(
                [*labels, auth_label] if auth_label else labels or ["valid"]
            )
            timeout = rng.choice([0.001, 0.05]) if rng.random() < 0.02 else None
            cases.append(GrpcCase(kind, "ModelInfer", req, md, timeout_s=timeout))
        elif roll < 0.86:
            rpc = rng.choice(
                [
                    *UNIMPLEMENTED,
                    "ModelStreamInfer",
                    "ModelStreamInfer",
                    "ServerLive",
                    "ServerReady",
                    "ServerMetadata",
                    "ModelReady",
                    "ModelMetadata",
                    "ModelMetadata",
                    "ModelReady",
                ]
            )
            request_cls = {"ModelStreamInfer": "ModelInferRequest"}.get(rpc, f"{rpc}Request")
            msg = getattr(pb, request_cls)()
            if rpc in ("ModelReady", "ModelMetadata", "ModelStatistics", "ModelConfig"):
                msg.name = rng.choice(["premier", "premier", "", "other", "\u00e9", "x" * 10_000])
                msg.version = rng.choice(["", "", "1", "2", "\x00"])
            if rpc == "ModelStreamInfer":
                msg, _ = grpc_infer_base(rng, pb)
            cases.append(GrpcCase(f"{rpc} {auth_label}".strip(), rpc, msg, md, stream=rpc == "ModelStreamInfer"))
        elif roll < 0.93:
            rpc = rng.choice(
                [
                    "Nope",
                    "/inference.GRPCInferenceService/modelinfer",
                    "/other.Service/ModelInfer",
                    "/inference.GRPCInferenceService/",
                    "/grpc.health.v1.Health/Check",
                    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                ]
            )
            cases.append(GrpcCase(f"unknown method {rpc} {auth_label}".strip(), rpc, b"", md))
        else:
            rpc = rng.choice(["ModelInfer", "ModelMetadata", "ModelReady"])
            label, data = rng.choice(
                [
                    ("truncated varint", b"\x0a\xff"),
                    ("wrong wire type", b"\x0d\x00\x00\x00"),
                    ("random bytes", bytes(rng.getrandbits(8) for _ in range(64))),
                    ("length past the end", b"\x0a\x7f" + b"p"),
                    ("unknown fields only", b"\xf8\xff\xff\xff\x0f\x01"),
                    ("invalid UTF-8 in a string field", b"\x0a\x03\xff\xfe\xfd"),
                    ("groups nested 1000 deep", b"\x9b\x06" * 1000 + b"\x9c\x06" * 1000),
                    ("5 MB message", b"\x0a" + b"\x80\xa0\x31" + b"p" * 800_000),
                ]
            )
            cases.append(GrpcCase(f"undecodable {label} {auth_label}".strip(), rpc, data, md))
    return cases


# ---------------------------------------------------------------------- sending
class HttpSender:
    """One keep-alive connection per thread to 127.0.0.1; a request is sent exactly as its case says."""

    def __init__(self, host: str, port: int, timeout_s: float):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        return conn

    def _drop(self) -> None:
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            conn.close()
        self.local.conn = None

    def send(self, case: HttpCase) -> tuple[str, str, float, str, str]:
        """(answer, full detail, latency, verdict, request id)."""
        t0 = time.perf_counter()
        conn = self._conn()
        try:
            conn.putrequest(case.method, case.target, skip_accept_encoding=True)
            for k, v in case.headers:
                conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(case.body)))
            conn.endheaders(case.body or None)
        except (ValueError, UnicodeError, http.client.InvalidURL) as e:  # the client would not send it
            self._drop()
            return f"client:{type(e).__name__}", str(e)[:300], 0.0, "client", ""
        except OSError as e:
            self._drop()
            return f"lost:{type(e).__name__}", str(e)[:300], time.perf_counter() - t0, "lost", ""
        try:
            resp = conn.getresponse()
            data = resp.read()
            if resp.will_close:
                self._drop()
        except TimeoutError:
            self._drop()
            return "lost:timeout", "", time.perf_counter() - t0, "lost", ""
        except (OSError, http.client.HTTPException) as e:
            self._drop()
            return f"lost:{type(e).__name__}", str(e)[:300], time.perf_counter() - t0, "lost", ""
        text = (
            data[:4000].decode("utf-8", "replace")
            if not resp.getheader("content-type", "").startswith("image/")
            else ""
        )
        rid = resp.getheader("x-request-id") or ""
        return str(resp.status), text, time.perf_counter() - t0, http_verdict(resp.status), rid


class GrpcSender:
    def __init__(self, target: str, timeout_s: float):
        import grpc

        self.grpc = grpc
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        )
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def send(self, case: GrpcCase) -> tuple[str, str, float, str, str]:
        grpc = self.grpc
        path = case.rpc if case.rpc.startswith("/") else f"/inference.GRPCInferenceService/{case.rpc}"
        ser = (lambda b: b) if isinstance(case.message, bytes) else (lambda m: m.SerializeToString())
        timeout = case.timeout_s or self.timeout_s
        t0 = time.perf_counter()
        try:
            if case.stream:
                call = self.channel.stream_stream(path, request_serializer=ser, response_deserializer=lambda b: b)
                for _ in call(iter([case.message]), metadata=case.metadata or None, timeout=timeout):
                    pass
            else:
                call = self.channel.unary_unary(path, request_serializer=ser, response_deserializer=lambda b: b)
                call(case.message, metadata=case.metadata or None, timeout=timeout)
            return "OK", "", time.perf_counter() - t0, "ok", ""
        except grpc.RpcError as e:
            code = e.code().name if e.code() is not None else "NONE"
            details = e.details() or ""
            verdict = grpc_verdict(code, details)
            if code == "INTERNAL" and details.startswith("Invalid metadata"):  # refused by the client, never sent
                return f"client:{details[:40]}", details[:300], 0.0, "client", ""
            if code == "DEADLINE_EXCEEDED" and case.timeout_s is None:
                verdict = "lost"
            rid = dict(e.trailing_metadata() or ()).get("request_id", "") if hasattr(e, "trailing_metadata") else ""
            return code, details[:4000], time.perf_counter() - t0, verdict, str(rid)
        except (ValueError, TypeError) as e:  # metadata the client refuses (e.g. a non-ASCII value)
            return f"client:{type(e).__name__}", str(e)[:300], 0.0, "client", ""


def run_cases(
    cases: list[HttpCase | GrpcCase], http: HttpSender, grpc_sender: GrpcSender, concurrency: int, deadline: float
) -> list[Outcome]:
    results: list[Outcome | None] = [None] * len(cases)
    done = Counter()
    lock = threading.Lock()

    def one(i: int) -> None:
        case = cases[i]
        if time.monotonic() > deadline:
            results[i] = Outcome(i, case.surface, case.endpoint, case.kind, "not_sent", verdict="not_sent")
            return
        sender = grpc_sender if isinstance(case, GrpcCase) else http
        try:
            answer, detail, latency, verdict, rid = sender.send(case)  # type: ignore[arg-type]
        except Exception as e:  # a client-side problem: counted, never fatal
            answer, detail, latency, verdict, rid = f"client:{type(e).__name__}", str(e)[:300], 0.0, "client", ""
        detail = ANSI.sub("", detail)
        results[i] = Outcome(
            i,
            case.surface,
            case.endpoint,
            case.kind,
            answer,
            _short(detail, 300),
            round(latency, 4),
            verdict,
            detail,
            rid,
        )
        with lock:
            done[verdict] += 1
            total = sum(done.values())
            if total % 250 == 0:
                print(f"  {total}/{len(cases)} sent: {dict(done)}", flush=True)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(len(cases))))
    return [r for r in results if r is not None]


def interleave(groups: dict[str, list[Any]], rng: random.Random) -> list[Any]:
    """Each surface shuffled, then the surfaces mixed in proportion: a time limit cuts all endpoints alike."""
    shuffled = {}
    for name in sorted(groups):
        cases = list(groups[name])
        rng.shuffle(cases)
        shuffled[name] = cases
    tagged = [(name, i) for name, cases in shuffled.items() for i in range(len(cases))]
    keys = {t: (t[1] + rng.random()) / max(1, len(shuffled[t[0]])) for t in tagged}
    return [shuffled[name][i] for name, i in sorted(tagged, key=lambda t: keys[t])]


# ---------------------------------------------------------------------- causes and report
class ServerLogs:
    """The Ray Serve logs of the server: the traceback of an 'internal error <id>' or of a request id that failed."""

    def __init__(self, log_dir: str | None):
        self.log_dir = log_dir
        self._text: str | None = None

    def text(self) -> str:
        if self._text is None:
            parts = []
            if self.log_dir and os.path.isdir(self.log_dir):
                for p in sorted(Path(self.log_dir).glob("*.log")):
                    with contextlib.suppress(OSError):
                        parts.append(p.read_text(errors="replace"))
            self._text = "\n".join(parts)
        return self._text

    def cause(self, marker: str) -> str | None:
        """The cause in the traceback logged right after `marker` (e.g. '(error 1f2e...)', '<request id> -- Request failed')."""
        text = self.text()
        at = text.find(marker)
        if at < 0:
            return None
        block = text[at : at + 40_000].splitlines()[1:]
        tb = []
        for line in block:
            if re.match(r"^(INFO|ERROR|WARNING|DEBUG|CRITICAL) \d{4}-", line):
                break
            tb.append(line)
        return traceback_cause("\n".join(tb))


def traceback_cause(text: str) -> str | None:
    """'path:line in function: ExceptionType: message' from a traceback (the innermost project frame)."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    exc = next(
        (
            ln
            for ln in reversed(lines)
            if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt|Warning)\b", ln) or re.match(r"^[\w.]+: ", ln)
        ),
        None,
    )
    if not frames and not exc:
        return None
    own = [f for f in frames if re.search(r"/(serving|premier|store|kernels)/", f[0]) and "site-packages" not in f[0]]
    where = own[-1] if own else (frames[-1] if frames else None)
    loc = ""
    if where:
        path = re.sub(r".*/(?=(serving|premier|store|kernels|ray|starlette|fastapi|grpc)/)", "", where[0])
        loc = f"{path}:{where[1]} in {where[2]}: "
    return loc + _short(exc or "?", 200)


def cause_of(o: Outcome, logs: ServerLogs) -> str:
    m = ERROR_ID.search(o.full_detail)
    found = logs.cause(f"(error {m.group(1)})") if m else None
    if not found and o.request_id:
        found = logs.cause(f"{o.request_id} -- Request failed")
    if not found and TRACEBACK.search(o.full_detail):
        found = traceback_cause(o.full_detail)
    if found:
        return found
    first = o.full_detail.strip().splitlines()[0] if o.full_detail.strip() else "(empty answer)"
    return _short(first, 160) + (" (cause not found in the server logs)" if logs.log_dir else "")


def cause_key(cause: str) -> str:
    """A cause without its particulars (quoted values, numbers other than line numbers): what groups failures."""
    return re.sub(r"'[^']*'|\"[^\"]*\"|(?<![:\w])\d+", "_", cause)


def histogram(outcomes: list[Outcome]) -> dict[str, Any]:
    by_surface: dict[str, Counter] = defaultdict(Counter)
    by_endpoint: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for o in outcomes:
        by_surface[o.surface][o.answer] += 1
        by_endpoint[o.surface][o.endpoint][o.answer] += 1
    out = {}
    for s in by_surface:
        counts = by_surface[s]
        out[s] = {
            "sent": sum(v for k, v in counts.items() if k not in ("not_sent",) and not k.startswith("client:")),
            "answers": dict(sorted(counts.items())),
            "failures": sum(1 for o in outcomes if o.surface == s and o.verdict == "failure"),
            "refused_503": counts.get("503", 0),
            "lost": sum(v for k, v in counts.items() if k.startswith("lost:")),
            "by_endpoint": {e: dict(sorted(c.items())) for e, c in sorted(by_endpoint[s].items())},
        }
    return out


def report_failures(
    outcomes: list[Outcome], cases: list[Any], logs: ServerLogs
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    failures, groups = [], {}
    for o in outcomes:
        if o.verdict != "failure":
            continue
        cause = cause_of(o, logs)
        entry = {
            "index": o.index,
            "surface": o.surface,
            "endpoint": o.endpoint,
            "answer": o.answer,
            "kind": o.kind,
            "cause": cause,
            "request": cases[o.index].compact(),
            "response": _short(o.full_detail, 300),
        }
        failures.append(entry)
        key = (o.surface, o.endpoint, o.answer, cause_key(cause))
        g = groups.setdefault(
            key,
            {
                "surface": o.surface,
                "endpoint": o.endpoint,
                "answer": o.answer,
                "cause": cause,
                "count": 0,
                "indices": [],
                "example": entry["request"],
                "example_kind": o.kind,
            },
        )
        g["count"] += 1
        g["indices"].append(o.index)
    ordered = sorted(groups.values(), key=lambda g: (-g["count"], g["surface"], g["endpoint"]))
    for g in ordered:
        g["indices"] = g["indices"][:50]
    return failures, ordered


def other_findings(outcomes: list[Outcome], cases: list[Any]) -> dict[str, Any]:
    lost = [
        {
            "index": o.index,
            "surface": o.surface,
            "endpoint": o.endpoint,
            "answer": o.answer,
            "kind": o.kind,
            "request": cases[o.index].compact(),
        }
        for o in outcomes
        if o.verdict == "lost"
    ]
    leaked = [
        {
            "index": o.index,
            "surface": o.surface,
            "endpoint": o.endpoint,
            "answer": o.answer,
            "kind": o.kind,
            "response": _short(o.full_detail, 300),
        }
        for o in outcomes
        if o.verdict in ("ok", "refused") and o.full_detail and leaks(o.full_detail)
    ]
    unknown = Counter(_short(o.full_detail, 120) for o in outcomes if o.answer == "UNKNOWN" and o.verdict != "failure")
    client = Counter(f"{o.answer}: {_short(o.full_detail, 80)}" for o in outcomes if o.verdict == "client")
    return {
        "lost": lost[:200],
        "lost_count": len(lost),
        "leaks": leaked[:100],
        "leak_count": len(leaked),
        "unknown_without_traceback": dict(unknown.most_common(20)),
        "not_sent_by_client": dict(client.most_common(20)),
    }


# ---------------------------------------------------------------------- the server under test, the final check
def check_loopback(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(url if "//" in url else "//" + url)
    host, port = parsed.hostname or "", parsed.port
    if port is None:
        raise ValueError(f"{url!r}: give a port")
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except OSError as e:
        raise ValueError(f"{url!r}: cannot resolve {host!r} ({e})") from None
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise ValueError(f"{url!r} is not on the loopback interface: this benchmark sends traffic to 127.0.0.1 only")
    return "127.0.0.1" if host in ("localhost",) else host, port


@contextlib.contextmanager
def own_server(fitting: bool, extra: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A local Ray + Serve + the app on free loopback ports with a fresh store and an API key; all stopped after."""
    import secrets

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from serving.config import ServerOptions, build_config
    from serving.server import ServerSession

    key = "fuzz-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="premier-fuzz-") as work:
        # without --fitting the fit route must not start real fits: the Jobs runner, and no Jobs API to reach (503)
        fit = {} if fitting else {"fitting": {"runner": "jobs"}}
        config = build_config(
            {"store": str(Path(work) / "store"), **SERVER, **fit, **extra, "api_key": key}, environ={}
        )
        options = ServerOptions(host="127.0.0.1", http_port=0, grpc_port=0)
        with ServerSession(config, options, dashboard=fitting, num_cpus=2, ready_timeout_s=300.0) as session:
            log_dir = None
            with contextlib.suppress(Exception):
                import ray

                log_dir = str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve")
            yield {
                "http_url": session.http_url,
                "grpc_target": session.grpc_target,
                "api_key": key,
                "log_dir": log_dir,
            }


def final_check(http_url: str, grpc_target: str, key: str, timeout_s: float) -> dict[str, Any]:
    """One valid generation over each protocol after the fuzzing: the server must still serve."""
    import numpy as np
    import requests

    auth = {"Authorization": f"Bearer {key}"}
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        r = requests.post(
            http_url + "/v1/generate",
            json={"prompt": "a red circle", "seed": 1, "format": "json"},
            headers=auth,
            timeout=timeout_s,
        )
        ok = r.status_code == 200 and len(base64.b64decode(r.json()["image"])) > 0
        out["http_v1"] = {"status": r.status_code, "ok": ok, "latency_s": round(time.perf_counter() - t0, 3)}
        if not ok:
            out["http_v1"]["body"] = _short(r.text, 300)
    except Exception as e:
        out["http_v1"] = {"ok": False, "error": f"{type(e).__name__}: {_short(str(e), 200)}"}
    t0 = time.perf_counter()
    try:
        body = {
            "inputs": [
                {"name": "PROMPT", "datatype": "BYTES", "shape": [1], "data": ["a red circle"]},
                {"name": "SEED", "datatype": "INT64", "shape": [1], "data": [1]},
            ]
        }
        r = requests.post(http_url + "/v2/models/premier/infer", json=body, headers=auth, timeout=timeout_s)
        shape = r.json()["outputs"][0]["shape"] if r.status_code == 200 else None
        out["kserve_http"] = {
            "status": r.status_code,
            "ok": r.status_code == 200 and shape is not None and shape[-1] == 3,
            "shape": shape,
            "latency_s": round(time.perf_counter() - t0, 3),
        }
    except Exception as e:
        out["kserve_http"] = {"ok": False, "error": f"{type(e).__name__}: {_short(str(e), 200)}"}
    t0 = time.perf_counter()
    try:
        import tritonclient.grpc as tg

        client = tg.InferenceServerClient(grpc_target)
        try:
            inputs = []
            for name, dt, value in (
                ("PROMPT", "BYTES", np.array([b"a red circle"], dtype=object)),
                ("SEED", "INT64", np.array([1], dtype=np.int64)),
            ):
                t = tg.InferInput(name, [1], dt)
                t.set_data_from_numpy(value)
                inputs.append(t)
            image = client.infer(
                "premier", inputs, headers={"authorization": f"Bearer {key}"}, client_timeout=timeout_s
            ).as_numpy("IMAGE")
            out["grpc"] = {
                "ok": image is not None and image.ndim == 3,
                "shape": list(image.shape) if image is not None else None,
                "latency_s": round(time.perf_counter() - t0, 3),
            }
        finally:
            client.close()
    except Exception as e:
        out["grpc"] = {"ok": False, "error": f"{type(e).__name__}: {_short(str(e), 300)}"}
    out["ok"] = all(v.get("ok") for v in out.values() if isinstance(v, dict))
    return out


def model_limits(http_url: str, key: str) -> dict[str, Any]:
    import requests

    for _ in range(30):
        with contextlib.suppress(Exception):
            r = requests.get(http_url + "/v1/model", headers={"Authorization": f"Bearer {key}"}, timeout=10)
            if r.status_code == 200:
                return dict(r.json().get("limits") or {})
        time.sleep(1.0)
    return {}


# ---------------------------------------------------------------------- the run
def build_cases(
    spec: dict[str, Any], total: int, seed: int, key: str, limits: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    shares = apportion(total, SPLIT)
    t0 = time.perf_counter()
    openapi, stats = openapi_cases(spec, shares["openapi"], seed, key, limits)
    groups = {
        "openapi": openapi,
        "kserve-http": kserve_cases(shares["kserve-http"], seed, key, limits),
        "grpc": grpc_cases(shares["grpc"], seed, key),
    }
    cases = interleave(groups, random.Random(seed))
    stats["generation_s"] = round(time.perf_counter() - t0, 2)
    stats["cases"] = {k: len(v) for k, v in groups.items()}
    return cases, stats


def fuzz(
    http_url: str, grpc_target: str, key: str, size: dict[str, Any], seed: int, log_dir: str | None, fitting: bool
) -> dict[str, Any]:
    import requests

    host, port = check_loopback(http_url)
    check_loopback(grpc_target)
    started = time.monotonic()
    deadline = started + size["time_limit_s"]
    r = requests.get(http_url + "/openapi.json", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    spec = r.json() if r.status_code == 200 else {}
    if "openapi" not in spec:
        raise RuntimeError(f"GET /openapi.json answered {r.status_code}: {r.text[:200]}")
    limits = {**model_limits(http_url, key), "_fitting": fitting}
    cases, stats = build_cases(spec, size["requests"], seed, key, limits)
    print(
        f"{len(cases)} cases ({stats['cases']}) generated in {stats['generation_s']} s; sending with {size['concurrency']} workers",
        flush=True,
    )
    http_sender = HttpSender(host, port, size["client_timeout_s"])
    grpc_sender = GrpcSender(grpc_target, size["client_timeout_s"])
    t_send = time.perf_counter()
    try:
        outcomes = run_cases(cases, http_sender, grpc_sender, size["concurrency"], deadline)
    finally:
        grpc_sender.close()
    send_s = time.perf_counter() - t_send
    check = final_check(http_url, grpc_target, key, timeout_s=120.0)
    logs = ServerLogs(log_dir)
    failures, groups = redact(report_failures(outcomes, cases, logs), key)
    sent = [o for o in outcomes if o.verdict not in ("not_sent", "client")]
    http_counts = Counter(o.answer for o in outcomes if o.surface != "grpc")
    grpc_counts = Counter(o.answer for o in outcomes if o.surface == "grpc")
    totals = {
        "requests_generated": len(cases),
        "requests_sent": len(sent),
        "not_sent_time_limit": sum(1 for o in outcomes if o.verdict == "not_sent"),
        "refused_by_client": sum(1 for o in outcomes if o.verdict == "client"),
        "http_status": dict(sorted(http_counts.items())),
        "grpc_code": dict(sorted(grpc_counts.items())),
        "server_errors_5xx": sum(1 for o in outcomes if o.verdict == "failure" and o.surface != "grpc"),
        "grpc_internal_or_traceback": sum(1 for o in outcomes if o.verdict == "failure" and o.surface == "grpc"),
        "failures": len(failures),
        "refused_503": http_counts.get("503", 0),
        "lost": sum(1 for o in outcomes if o.verdict == "lost"),
        "requests_per_s": round(len(sent) / send_s, 2) if send_s > 0 else None,
        "latency_p50_ms": _pct([o.latency_s for o in sent], 50),
        "latency_p99_ms": _pct([o.latency_s for o in sent], 99),
    }
    return {
        "totals": totals,
        "surfaces": histogram(outcomes),
        "failure_groups": groups,
        "failures": failures,
        **redact(other_findings(outcomes, cases), key),
        "generation": {k: v for k, v in stats.items() if k != "drawn"} | {"drawn_per_operation": stats["drawn"]},
        "final_check": check,
        "server_still_serves": check["ok"],
        "send_s": round(send_s, 2),
        "stopped_by_time_limit": totals["not_sent_time_limit"] > 0,
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(1000 * v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))], 2)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few hundred requests (300) and a shorter time limit")
    ap.add_argument("--requests", type=int, help="total requests over all surfaces (default 2000; --quick 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, help="seconds of fuzzing at most (default 900; --quick 150)")
    ap.add_argument("--concurrency", type=int, help="requests in flight (default 4)")
    ap.add_argument("--fitting", action="store_true", help="start the Ray dashboard: fit uploads reach the Jobs API")
    ap.add_argument(
        "--url", help="a running server's HTTP URL on 127.0.0.1 (with --grpc and --api-key); default: start one"
    )
    ap.add_argument("--grpc", help="the running server's gRPC address (127.0.0.1:PORT)")
    ap.add_argument("--api-key", help="the running server's API key")
    ap.add_argument("--log-dir", help="the running server's Ray Serve log folder, to name the causes of 5xx")
    ap.add_argument(
        "--out", help="JSON path (default benchmarks/results/<machine>/fuzz.json; fuzz_quick.json with --quick)"
    )
    args = ap.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    if args.requests is not None:
        size["requests"] = max(1, args.requests)
    if args.time_limit is not None:
        size["time_limit_s"] = args.time_limit
    if args.concurrency is not None:
        size["concurrency"] = max(1, args.concurrency)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    if args.url:
        if not (args.grpc and args.api_key):
            ap.error("--url needs --grpc and --api-key")
        check_loopback(args.url)
        check_loopback(args.grpc)
        result = fuzz(args.url.rstrip("/"), args.grpc, args.api_key, size, args.seed, args.log_dir, args.fitting)
        server = {"url": args.url}
    else:
        with own_server(args.fitting, {}) as s:
            started_s = time.perf_counter() - t0
            print(f"server up in {started_s:.0f} s at {s['http_url']} (gRPC {s['grpc_target']})", flush=True)
            result = fuzz(s["http_url"], s["grpc_target"], s["api_key"], size, args.seed, s["log_dir"], args.fitting)
        server = {
            "started_by_benchmark": True,
            "start_s": round(started_s, 1),
            "config": SERVER,
            "fitting": args.fitting,
        }
    import hypothesis
    import schemathesis

    payload = {
        "config": {
            **size,
            "seed": args.seed,
            "quick": args.quick,
            "split": SPLIT,
            "cost_cap": COST,
            "server": server,
            "schemathesis": schemathesis.__version__,
            "hypothesis": hypothesis.__version__,
            "failure_rule": "HTTP 5xx except 503; gRPC INTERNAL, DATA_LOSS, or UNKNOWN with a traceback",
        },
        "machine_load": {
            "loadavg_1m_before": round(load_before[0], 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
        },
        "wall_s": round(time.perf_counter() - t0, 1),
        **result,
    }
    payload["pass"] = payload["totals"]["failures"] == 0 and payload["server_still_serves"]
    from benchmarks.common import write_result

    path = write_result("fuzz" + ("_quick" if args.quick else ""), payload, args.out)
    t = payload["totals"]
    print(
        f"sent {t['requests_sent']} in {payload['send_s']} s: HTTP {t['http_status']}  gRPC {t['grpc_code']}  "
        f"failures {t['failures']} in {len(payload['failure_groups'])} groups, lost {t['lost']}, "
        f"still serves: {payload['server_still_serves']}"
    )
    for g in payload["failure_groups"]:
        print(f"  {g['count']:4d} x {g['surface']} {g['endpoint']} -> {g['answer']}: {g['cause']}")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main()["pass"] else 1)
