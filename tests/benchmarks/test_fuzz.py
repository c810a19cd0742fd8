"""benchmarks/fuzz.py: its cases (reproducible, every route and surface, hostile), its verdicts, and a test-sized
run against a live server: the run completes, the server still serves, and no request got a 5xx or INTERNAL."""

from __future__ import annotations

import json

import pytest

from benchmarks import fuzz

KEY = "fuzz-test-key"
LIMITS = {"size_multiple": 4, "min_size": 8, "max_size": 512, "max_steps": 200}


@pytest.fixture(scope="module")
def spec():
    """The server's OpenAPI document, as the running app serves it at /openapi.json."""
    import serving.api_kserve  # noqa: F401 - each registers its routes on the one `api`
    import serving.api_users  # noqa: F401
    import serving.api_v1  # noqa: F401
    from serving.http_api import api

    return json.loads(json.dumps(api.openapi()))


def _fingerprint(cases) -> list[str]:
    return [json.dumps(c.compact(), sort_keys=True) + repr(getattr(c, "body", b"")[:2000]) for c in cases]


def test_cases_are_reproducible_and_cover_every_route_and_surface(spec):
    cases, stats = fuzz.build_cases(spec, 300, 0, KEY, LIMITS)
    again, _ = fuzz.build_cases(spec, 300, 0, KEY, LIMITS)
    assert _fingerprint(cases) == _fingerprint(again)  # a fixed seed: the same requests, byte for byte
    other = fuzz.kserve_cases(90, 1, KEY, LIMITS) + fuzz.grpc_cases(75, 1, KEY)
    assert _fingerprint([c for c in cases if c.surface != "openapi"]) != _fingerprint(other)
    assert len(cases) == 300 and stats["cases"] == {"openapi": 135, "kserve-http": 90, "grpc": 75}
    assert not stats["skipped_operations"]

    openapi = [c for c in cases if c.surface == "openapi"]
    routes = {f"{m.upper()} {p}" for p, ops in spec["paths"].items() for m in ops}
    assert routes <= {c.endpoint for c in openapi}  # every operation of /openapi.json (and some it leaves out)
    assert any(c.endpoint == "GET /openapi.json" for c in openapi)
    http = [c for c in cases if c.surface != "grpc"]
    assert all(c.target.startswith("/") for c in http)  # paths only: the host is always 127.0.0.1
    kinds = " | ".join(c.kind for c in cases)
    assert "schemathesis:positive" in kinds and "schemathesis:negative" in kinds and "auth:" in kinds
    bodies = b"\n".join(c.body for c in http)
    assert b"\\ud8" in bodies or b"\\udf" in bodies  # lone surrogates
    fit = [c for c in openapi if c.endpoint == "POST /v1/users/{user_id}/fit" and c.kind.startswith("fit upload")]
    assert fit and any(b"multipart/form-data; boundary=" in dict(c.headers).get("Content-Type", b"") for c in fit)
    assert any(not any(k == "Authorization" for k, _ in c.headers) for c in http)  # no API key at all
    kserve = [c for c in cases if c.surface == "kserve-http"]
    assert any(k == "Inference-Header-Content-Length" for c in kserve for k, _ in c.headers)

    grpc = fuzz.grpc_cases(500, 0, KEY)  # the shares of a 2000-request run
    rpcs = {c.rpc for c in grpc}
    assert {"ModelInfer", "ModelStatistics", "RepositoryIndex", "ModelStreamInfer", "ModelMetadata"} <= rpcs
    grpc_kinds = " | ".join(c.kind for c in grpc)
    assert "undecodable" in grpc_kinds and "auth:none" in grpc_kinds and "raw_input_contents" in grpc_kinds
    kserve_kinds = " | ".join(c.kind for c in fuzz.kserve_cases(600, 0, KEY, LIMITS))
    for what in ("binary_data_size", "datatype", "shape", "outputs", "parameters", "digits", "'[' * "):
        assert what in kserve_kinds, what


def test_hostile_json_is_written_as_sent():
    assert fuzz.dumps({"a": fuzz.Raw("NaN", "NaN"), "b": "\ud800", "c": [fuzz.digits(5)]}) == (
        '{"a": NaN, "b": "\\ud800", "c": [10000]}'
    )
    assert fuzz.describe({"p": "x" * 1000, "n": fuzz.nested(3)}) == "{'p': <'x' * 1000>, 'n': <'[' * 3 + ']' * 3>}"
    body = {"prompt": "p", "steps": 200, "height": 512, "width": 33}
    assert fuzz.cheap_settings(body, LIMITS) and body["steps"] <= 8 and 8 <= body["height"] <= 64
    assert body["width"] == 33  # invalid values are left for the server to refuse
    case = fuzz.HttpCase(
        "openapi", "POST /v1/generate", "k", "POST", "/v1/generate",
        [("Authorization", b"Bearer wrong"), ("Authorization", b"Bearer right")], b"[" * 5000, "'[' * 5000",
    )  # fmt: skip
    assert case.compact() == {
        "method": "POST",
        "target": "/v1/generate",
        "headers": ["Authorization: Bearer wrong", "Authorization: Bearer right"],
        "body": "'[' * 5000",
        "body_bytes": 5000,
    }
    assert fuzz.redact({"h": ["Authorization: Bearer s3cret"]}, "s3cret") == {"h": ["Authorization: Bearer <key>"]}


def test_verdicts_causes_and_the_loopback_guard():
    assert fuzz.http_verdict(500) == "failure" and fuzz.http_verdict(502) == "failure"
    assert fuzz.http_verdict(503) == "refused" and fuzz.http_verdict(422) == "ok"
    assert fuzz.grpc_verdict("INTERNAL", "x") == "failure" and fuzz.grpc_verdict("DATA_LOSS", "") == "failure"
    assert fuzz.grpc_verdict("UNKNOWN", 'Traceback (most recent call last):\n  File "a.py", line 3, in f') == "failure"
    assert fuzz.grpc_verdict("UNKNOWN", "Unexpected DecodeError") == "ok"
    assert fuzz.grpc_verdict("UNIMPLEMENTED", "") == "ok"
    tb = (
        "Traceback (most recent call last):\n"
        '  File "/x/site-packages/starlette/routing.py", line 9, in handle\n'
        '  File "/work/main/serving/kserve.py", line 153, in parse_http_infer\n'
        "    req = json.loads(head)\n"
        "RecursionError: maximum recursion depth exceeded"
    )
    cause = fuzz.traceback_cause(tb)
    assert cause == "serving/kserve.py:153 in parse_http_infer: RecursionError: maximum recursion depth exceeded"
    assert fuzz.cause_key("a.py:12 in f: E: 'x' at position 10") == fuzz.cause_key("a.py:12 in f: E: 'y' at position 7")
    assert fuzz.check_loopback("http://127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert fuzz.check_loopback("localhost:9000")[1] == 9000
    for url in ("http://192.0.2.1:80", "http://example.com:80", "http://127.0.0.1"):
        with pytest.raises(ValueError):
            fuzz.check_loopback(url)


# ---------------------------------------------------------------------- a test-sized run against the live server
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "fuzz.json"
    payload = fuzz.main(["--quick", "--requests", "300", "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "fuzz_quick"
    return payload


def test_fuzz_run_completes_and_the_server_still_serves(run):
    t = run["totals"]
    assert t["requests_generated"] == 300 and t["not_sent_time_limit"] == 0
    assert t["requests_sent"] + t["refused_by_client"] == 300
    assert sum(t["http_status"].values()) + sum(t["grpc_code"].values()) == 300
    for surface in ("openapi", "kserve-http", "grpc"):
        assert run["surfaces"][surface]["sent"] > 0, surface
    assert t["http_status"].get("401", 0) > 0 and t["grpc_code"].get("UNAUTHENTICATED", 0) > 0  # the key is checked
    assert t["http_status"].get("200", 0) > 0 and t["grpc_code"].get("OK", 0) > 0  # and valid requests served
    assert run["config"]["seed"] == 0 and run["wall_s"] > 0
    assert run["final_check"]["http_v1"]["ok"] and run["final_check"]["kserve_http"]["ok"]
    assert run["final_check"]["grpc"]["ok"] and run["server_still_serves"]
    assert run["leak_count"] == 0, run["leaks"][:5]  # no traceback or server path in any answer


def test_fuzz_finds_no_5xx_and_no_internal(run):
    groups = [
        f"{g['count']} x {g['surface']} {g['endpoint']} -> {g['answer']}: {g['cause']}" for g in run["failure_groups"]
    ]
    assert run["totals"]["failures"] == 0, "\n".join(groups)
