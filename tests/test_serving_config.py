"""Serving pieces that need no running server: config files, KServe v2 tensor decoding, metrics exposition."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from premier.cli import main
from premier.errors import InvalidRequestError
from serving import kserve
from serving.config import PACKAGED_SERVE_CONFIG, build_config, load_config, split_serve_file


# ---------------------------------------------------------------------- config
def test_packaged_serve_config_is_a_valid_ray_serve_config_and_premier_serve_accepts_it(capsys):
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(PACKAGED_SERVE_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(data)
    app = schema.applications[0]
    assert app.name == "premier" and app.import_path == "serving.app:build_app" and app.route_prefix == "/"
    assert schema.grpc_options.grpc_servicer_functions == ["serving.grpc_stubs.add_GRPCInferenceServiceServicer_to_server"]

    config, options = load_config(PACKAGED_SERVE_CONFIG, environ={})
    assert config.model_dump(mode="json") == build_config(app.args, environ={}).model_dump(mode="json")
    assert (options.http_port, options.grpc_port) == (data["http_options"]["port"], data["grpc_options"]["port"])

    assert main(["serve", "--check-config", "--config", str(PACKAGED_SERVE_CONFIG), "--api-key", "s3cret"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["app"]["max_batch_size"] == app.args["max_batch_size"]
    assert printed["app"]["api_key"] == "***" and "s3cret" not in json.dumps(printed)


def test_plain_yaml_environment_and_options_override_in_that_order(tmp_path, monkeypatch, capsys):
    path = tmp_path / "serve.yaml"
    path.write_text("max_batch_size: 4\nmax_queued_requests: 10\nstore: /tmp/x\n")
    monkeypatch.setenv("PREMIER_SERVE_MAX_BATCH_SIZE", "6")
    monkeypatch.setenv("PREMIER_SERVE_FITTING__MAX_IMAGES", "5")
    config, _ = load_config(path)
    assert (config.max_batch_size, config.max_queued_requests, config.fitting.max_images) == (6, 10, 5)
    assert main(["serve", "--check-config", "--config", str(path), "--max-batch-size", "2", "--batch-wait-ms", "5"]) == 0
    printed = json.loads(capsys.readouterr().out)["app"]
    assert (printed["max_batch_size"], printed["batch_wait_timeout_s"], printed["store"]) == (2, 0.005, "/tmp/x")


@pytest.mark.parametrize(
    "text, field",
    [
        ("max_batch_size: 0\n", "config.max_batch_size"),
        ("max_batch_sise: 4\n", "config.max_batch_sise"),
        ("batch_wait_timeout_s: -1\n", "config.batch_wait_timeout_s"),
        ("[1, 2]\n", "config"),
        ("applications: [{name: other}]\n", "config"),
        ("fitting: {steps: 0}\n", "config.fitting.steps"),
    ],
)
def test_bad_config_is_refused_naming_the_field(tmp_path, text, field, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InvalidRequestError) as e:
        load_config(path, environ={})
    assert e.value.field == field
    assert main(["serve", "--check-config", "--config", str(path)]) == 2
    assert field in capsys.readouterr().err


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["serve", "--check-config", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_file_without_premier_app_args_uses_defaults():
    args, server = split_serve_file({"applications": [{"name": "premier", "import_path": "serving.app:build_app"}]})
    assert args == {} and server == {}
    assert build_config(args, environ={}).max_batch_size == 8


# ---------------------------------------------------------------------- KServe v2 tensors
def _http_body(inputs: list[dict], binary: list[bytes] = ()) -> tuple[bytes, int | None]:
    head = json.dumps({"inputs": inputs}).encode()
    return (head + b"".join(binary), len(head)) if binary else (head, None)


def test_kserve_http_json_and_binary_inputs_decode_to_generation_parameters():
    body, n = _http_body([
        {"name": "PROMPT", "datatype": "BYTES", "shape": [1], "data": ["a red circle"]},
        {"name": "USER_ID", "datatype": "BYTES", "shape": [1], "data": [""]},
        {"name": "STEPS", "datatype": "INT32", "shape": [1], "data": [4]},
        {"name": "GUIDANCE", "datatype": "FP32", "shape": [1], "data": [2.5]},
    ])  # fmt: skip
    params, binary, rid = kserve.parse_http_infer(body, n)
    assert params == {"prompt": "a red circle", "user_id": None, "steps": 4, "guidance": 2.5} and not binary and rid is None

    prompt = kserve.serialize_byte_tensor(np.array([b"two squares"], dtype=object)).item()
    seed = np.array([7], dtype="<i8").tobytes()
    body, n = _http_body([
        {"name": "PROMPT", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(prompt)}},
        {"name": "SEED", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": len(seed)}},
    ], [prompt, seed])  # fmt: skip
    params, _, _ = kserve.parse_http_infer(body, n)
    assert params == {"prompt": "two squares", "seed": 7}


@pytest.mark.parametrize(
    "tensor, named, says",
    [
        ({"name": "PROMPTS", "datatype": "BYTES", "shape": [1], "data": ["x"]}, "PROMPTS", "unknown input tensor"),
        ({"name": "SEED", "datatype": "FP32", "shape": [1], "data": [1.0]}, "SEED", "datatype must be INT64"),
        ({"name": "STEPS", "datatype": "INT32", "shape": [2], "data": [1, 2]}, "STEPS", "shape must be [1]"),
        ({"name": "STEPS", "datatype": "INT32", "shape": [1], "data": [1, 2]}, "STEPS", "the data has 2"),
        ({"name": "STEPS", "datatype": "INT32", "shape": [1], "data": ["x"]}, "STEPS", "cannot decode"),
        ({"name": "STEPS", "datatype": "INT32", "shape": [1]}, "STEPS", "neither 'data'"),
        ({"name": "HEIGHT", "datatype": "INT32", "shape": [1], "parameters": {"binary_data_size": 99}}, "HEIGHT", "binary_data_size"),
    ],
)
def test_kserve_bad_tensor_is_named(tensor, named, says):
    body, n = _http_body([{"name": "PROMPT", "datatype": "BYTES", "shape": [1], "data": ["p"]}, tensor])
    with pytest.raises(InvalidRequestError) as e:
        kserve.parse_http_infer(body, n)
    assert e.value.field == named and says in str(e.value)


def test_kserve_missing_prompt_and_bad_json_are_refused():
    with pytest.raises(InvalidRequestError, match="PROMPT: required input tensor is missing"):
        kserve.parse_http_infer(*_http_body([{"name": "SEED", "datatype": "INT64", "shape": [1], "data": [1]}]))
    with pytest.raises(InvalidRequestError, match="body: is not valid JSON"):
        kserve.parse_http_infer(b"{nope", None)
    with pytest.raises(InvalidRequestError, match="Inference-Header-Content-Length"):
        kserve.parse_http_infer(b"{}", 10)


def test_kserve_grpc_request_decodes_and_stub_messages_pickle():
    from serving.grpc_stubs import service_pb2

    req = service_pb2.ModelInferRequest(model_name="premier")
    for name, dtype in (("PROMPT", "BYTES"), ("SEED", "INT64")):
        t = req.inputs.add(name=name, datatype=dtype)
        t.shape.append(1)
    req.raw_input_contents.append(kserve.serialize_byte_tensor(np.array([b"hi"], dtype=object)).item())
    req.raw_input_contents.append(np.array([3], dtype="<i8").tobytes())
    assert kserve.parse_grpc_infer(pickle.loads(pickle.dumps(req))) == {"prompt": "hi", "seed": 3}
    req.inputs[1].datatype = "INT32"
    with pytest.raises(InvalidRequestError, match="SEED: datatype must be INT64"):
        kserve.parse_grpc_infer(req)
    meta = kserve.grpc_metadata_response()
    assert [i.name for i in meta.inputs] == [s.name for s in kserve.INPUTS] and meta.outputs[0].name == "IMAGE"


# ---------------------------------------------------------------------- metrics exposition
def promtool_check(text: bytes) -> None:
    """`promtool check metrics` on an exposition; required on CI (Debian's prometheus package)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool is missing on CI: install Debian's 'prometheus' package")
        pytest.skip("promtool is not installed")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_metrics_exposition_passes_promtool():
    from serving.metrics import ServeMetrics

    m = ServeMetrics(fit_counts=lambda: {"SUCCEEDED": 2, "FAILED": 1})
    for pos, cache in enumerate(("hit", "miss", "checkpoint", "none")):
        m.observe("http", {"timings": {"queue_wait_s": 0.01}, "batch_position": pos, "batch_size": 4, "user_cache": cache}, 0.2)
    m.refused("http", 503)
    text = m.exposition()
    promtool_check(text)
    s = text.decode()
    assert 'premier_fit_jobs{status="SUCCEEDED"} 2.0' in s
    assert "premier_batch_size_count 1.0" in s and "premier_user_cache_hit_ratio 0.5" in s
    assert 'premier_requests_total{code="503",protocol="http"} 1.0' in s


def test_kserve_malformed_binary_bytes_tensor_is_a_clear_error():
    body, n = _http_body([{"name": "PROMPT", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}],
                         [b"\xff\xff\xff\x7fabcd"])  # fmt: skip
    with pytest.raises(InvalidRequestError, match="PROMPT: cannot decode the BYTES data"):
        kserve.parse_http_infer(body, n)
