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
    assert schema.grpc_options.grpc_servicer_functions == [
        "serving.grpc_stubs.add_GRPCInferenceServiceServicer_to_server"
    ]

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
    assert (
        main(["serve", "--check-config", "--config", str(path), "--max-batch-size", "2", "--batch-wait-ms", "5"]) == 0
    )
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


def test_quantize_accepts_every_mode_of_the_pipeline(capsys):
    """The serve config reads the pipeline's own list (premier.quantize.QUANTIZE_MODES), not a copy of it."""
    import inspect

    import serving.config
    from premier.quantize import QUANTIZE_MODES

    assert "float8-dynamic" in QUANTIZE_MODES
    for mode in QUANTIZE_MODES:
        assert build_config({"quantize": mode}, environ={}).quantize == mode
    assert build_config({}, environ={"PREMIER_SERVE_QUANTIZE": "float8-dynamic"}).quantize == "float8-dynamic"
    assert build_config({}, environ={"PREMIER_SERVE_QUANTIZE": ""}).quantize is None  # the gpu overlay's "none"
    with pytest.raises(InvalidRequestError) as e:
        build_config({"quantize": "int4"}, environ={})
    assert e.value.field == "config.quantize" and all(m in e.value.message for m in QUANTIZE_MODES)
    assert "float8-dynamic" not in inspect.getsource(serving.config)


# ---------------------------------------------------------------------- generator replicas
def test_fixed_replicas_build_the_old_deployment_options():
    from serving.app import generator_options, ingress_options

    config = build_config({"generator_replicas": 3, "max_batch_size": 4, "max_queued_requests": 10}, environ={})
    options = generator_options(config)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert config.generator_max_replicas == 3 and config.admission_bound == 10 + 16 * 3
    # a replica holds one replica's bound, so with its share it never refuses (a refusal idles it in Ray's backoff)
    assert config.replica_bound == 10 + 16 and options["max_ongoing_requests"] == options["max_queued_requests"] == 26
    assert ingress_options(config)["max_ongoing_requests"] == config.admission_bound + 256
    assert "generator_autoscaling" in config.to_args() and config.to_args()["generator_autoscaling"] is None


def test_store_resource_places_the_store_openers(tmp_path, monkeypatch):
    """Only the ingress (user lookups) asks for the store's node; generators go anywhere; fit drivers ask too."""
    from serving.app import generator_options, ingress_options
    from serving.fitting import FitJobManager, FitSettings

    assert "resources" not in ingress_options(build_config({}, environ={}))["ray_actor_options"]  # default: anywhere
    config = build_config({}, environ={"PREMIER_SERVE_STORE_RESOURCE": "premier_store"})
    assert config.store_resource == "premier_store"
    assert ingress_options(config)["ray_actor_options"]["resources"] == {"premier_store": 0.001}
    assert "resources" not in generator_options(config)["ray_actor_options"]
    with pytest.raises(InvalidRequestError, match="store_resource"):
        build_config({"store_resource": "no spaces"}, environ={})
    submitted = {}

    class Client:
        def submit_job(self, **kwargs):
            submitted.update(kwargs)

    manager = FitJobManager(
        FitSettings(runner="jobs", num_gpus=1, num_cpus=4),
        store_path=str(tmp_path / "store"),
        model=None,
        checkpoint=None,
        store_resource="premier_store",
    )
    manager._client = Client()
    monkeypatch.setattr("serving.fitting.write_upload", lambda settings, job_dir, *a: job_dir)  # no upload written
    monkeypatch.setattr("serving.fitting.check_upload", lambda *a: None)
    manager.submit("alice", [("a.png", b"x")], ["a cat"])
    assert submitted["entrypoint_resources"] == {"premier_store": 0.001}  # the driver: on the store's node
    assert submitted["entrypoint_num_gpus"] == 0 and submitted["entrypoint_num_cpus"] == 0  # its task takes the GPU


def test_light_checkpoint_loader_reads_the_basis_only(tmp_path):
    from premier.checkpoint import PremierModel, load_user_basis
    from premier.models.embedded import build_embedded_premier

    model = build_embedded_premier()
    ckpt = model.save(tmp_path / "ckpt")
    users, light_id = load_user_basis(tmp_path / "ckpt")
    assert light_id == ckpt == PremierModel.load(tmp_path / "ckpt")[1]
    assert users.user_ids == model.users.user_ids and np.array_equal(users.weight.detach(), model.users.weight.detach())
    (tmp_path / "ckpt" / "adapters.safetensors").unlink()  # never read
    assert load_user_basis(tmp_path / "ckpt")[1] == ckpt


def test_autoscaling_builds_ray_serve_autoscaling_and_sizes_admission():
    from ray.serve.config import AutoscalingConfig

    from serving.app import generator_options, ingress_options

    config = build_config(
        {
            "max_batch_size": 4,
            "max_queued_requests": 10,
            "generator_autoscaling": {"min_replicas": 2, "max_replicas": 5, "downscale_delay_s": 600},
        },
        environ={},
    )
    options = generator_options(config)
    assert "num_replicas" not in options  # Ray refuses a fixed count next to autoscaling_config
    auto = options["autoscaling_config"]
    assert auto == {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 8, "downscale_delay_s": 600}
    ray_auto = AutoscalingConfig(**auto)  # what Ray Serve validates it with
    assert (ray_auto.min_replicas, ray_auto.max_replicas, ray_auto.upscale_delay_s) == (2, 5, 30)  # Ray's default kept
    assert config.generator_max_replicas == 5 and config.admission_bound == 10 + 16 * 5
    assert ingress_options(config)["max_ongoing_requests"] == config.admission_bound + 256
    # The replicas rebuild the same config from the args (generator_replicas stays unset there).
    args = config.to_args()
    assert "generator_replicas" not in args and "generator_replicas" not in config.redacted()
    assert build_config(args, environ={}) == config
    # Nested environment override, as a ConfigMap would set it.
    env = {
        "PREMIER_SERVE_GENERATOR_AUTOSCALING__MAX_REPLICAS": "7",
        "PREMIER_SERVE_GENERATOR_AUTOSCALING__TARGET_ONGOING_REQUESTS": "12",
    }
    over = build_config(config.to_args(), environ=env)
    assert (
        over.generator_autoscaling_config["max_replicas"] == 7
        and over.generator_autoscaling_config["target_ongoing_requests"] == 12
    )


def test_autoscaling_options_apply_to_the_generator_deployment_without_ray_running():
    import ray
    from ray import serve

    from serving.app import generator_options
    from serving.generator import Generator

    config = build_config({"generator_autoscaling": {"max_replicas": 3}}, environ={})
    deployment = serve.deployment(Generator).options(**generator_options(config))
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "values, says",
    [
        ({"generator_autoscaling": {"min_replicas": 4, "max_replicas": 3}}, "must not exceed max_replicas"),
        ({"generator_autoscaling": {"min_replicas": 0, "max_replicas": 3}}, "greater than or equal to 1"),
        ({"generator_autoscaling": {"max_replicas": 0}}, "greater than or equal to 1"),
        ({"generator_autoscaling": {"min_replicas": 1}}, "max_replicas"),
        ({"generator_autoscaling": {"max_replicas": 2, "max_replica": 3}}, "max_replica"),
        ({"generator_autoscaling": {"max_replicas": 2, "target_ongoing_requests": 0}}, "greater than 0"),
        (
            {"generator_autoscaling": {"max_replicas": 2, "target_ongoing_requests": 33}},
            "exceeds what a replica takes at once",
        ),
        ({"generator_replicas": 2, "generator_autoscaling": {"max_replicas": 2}}, "exclusive"),
    ],
)
def test_bad_autoscaling_is_refused(values, says, tmp_path, capsys):
    with pytest.raises(InvalidRequestError) as e:
        build_config(values, environ={})
    assert says in str(e.value) and e.value.field.startswith("config")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(values))
    assert main(["serve", "--check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_serve_file_replica_override_is_refused_other_deployment_settings_pass():
    """One source of truth: a Serve-level num_replicas/autoscaling_config for the Generator would bypass the
    admission bound, so it is refused; other deployment settings stay Ray Serve's business."""
    app = {
        "name": "premier",
        "import_path": "serving.app:build_app",
        "args": {"generator_autoscaling": {"max_replicas": 2}},
    }
    for key, value in (("autoscaling_config", {"max_replicas": 4}), ("num_replicas", "auto")):
        data = {"applications": [{**app, "deployments": [{"name": "Generator", key: value}]}]}
        with pytest.raises(InvalidRequestError, match=rf"deployments\[Generator\]\.{key}"):
            split_serve_file(data)
    data = {"applications": [{**app, "deployments": [{"name": "Generator", "ray_actor_options": {"num_cpus": 2}}]}]}
    args, _ = split_serve_file(data)
    assert build_config(args, environ={}).generator_max_replicas == 2


# ---------------------------------------------------------------------- KServe v2 tensors
def _http_body(inputs: list[dict], binary: list[bytes] = ()) -> tuple[bytes, int | None]:
    head = json.dumps({"inputs": inputs}).encode()
    return (head + b"".join(binary), len(head)) if binary else (head, None)


def test_kserve_http_json_and_binary_inputs_decode_to_generation_parameters():
    body, n = _http_body(
        [
            {"name": "PROMPT", "datatype": "BYTES", "shape": [1], "data": ["a red circle"]},
            {"name": "USER_ID", "datatype": "BYTES", "shape": [1], "data": [""]},
            {"name": "STEPS", "datatype": "INT32", "shape": [1], "data": [4]},
            {"name": "GUIDANCE", "datatype": "FP32", "shape": [1], "data": [2.5]},
        ]
    )
    params, binary, rid = kserve.parse_http_infer(body, n)
    assert (
        params == {"prompt": "a red circle", "user_id": None, "steps": 4, "guidance": 2.5}
        and not binary
        and rid is None
    )

    prompt = kserve.serialize_byte_tensor(np.array([b"two squares"], dtype=object)).item()
    seed = np.array([7], dtype="<i8").tobytes()
    body, n = _http_body(
        [
            {"name": "PROMPT", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(prompt)}},
            {"name": "SEED", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": len(seed)}},
        ],
        [prompt, seed],
    )
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
        (
            {"name": "HEIGHT", "datatype": "INT32", "shape": [1], "parameters": {"binary_data_size": 99}},
            "HEIGHT",
            "binary_data_size",
        ),
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
    from premier.requests import GenerationSettings
    from serving.metrics import ServeMetrics
    from serving.protocol import ImageResult

    m = ServeMetrics(fit_counts=lambda: {"SUCCEEDED": 2, "FAILED": 1})
    image, settings = np.zeros((4, 4, 3), np.uint8), GenerationSettings(32, 32, 8, 3.5)
    for pos, cache in enumerate(("hit", "miss", "checkpoint", "none")):
        result = ImageResult(
            image,
            1,
            settings,
            batch_size=4,
            batch_id="b",
            batch_position=pos,
            timings={"queue_wait_s": 0.01},
            user_cache=cache,
        )
        m.observe("http", result, 0.2)
    m.refused("http", 503)
    text = m.exposition()
    promtool_check(text)
    s = text.decode()
    assert 'premier_fit_jobs{status="SUCCEEDED"} 2.0' in s
    assert "premier_batch_size_count 1.0" in s and "premier_user_cache_hit_ratio 0.5" in s
    assert 'premier_requests_total{code="503",protocol="http"} 1.0' in s


def test_kserve_malformed_binary_bytes_tensor_is_a_clear_error():
    body, n = _http_body(
        [{"name": "PROMPT", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}],
        [b"\xff\xff\xff\x7fabcd"],
    )
    with pytest.raises(InvalidRequestError, match="PROMPT: cannot decode the BYTES data"):
        kserve.parse_http_infer(body, n)


def test_closed_by_default_refuses_an_open_listener_without_a_key(capsys):
    from serving.config import ServerOptions, build_config, check_exposure
    from serving.grpc_kserve import loopback_peer

    open_host = ServerOptions(host="0.0.0.0")
    with pytest.raises(InvalidRequestError, match="without an API key") as e:
        check_exposure(build_config({}, environ={}), open_host)
    assert e.value.field == "host"
    assert check_exposure(build_config({"api_key": "k"}, environ={}), open_host).grpc_peers == "any"
    assert check_exposure(build_config({"insecure": True}, environ={}), open_host).grpc_peers == "any"
    local = check_exposure(build_config({}, environ={}), ServerOptions(host="127.0.0.1"))
    assert (
        local.grpc_peers == "loopback"
        and ServerOptions(host="::1").loopback
        and ServerOptions(host="localhost").loopback
    )
    assert not ServerOptions(host="10.1.2.3").loopback
    assert main(["serve", "--host", "0.0.0.0", "--check-config"]) == 2
    assert "without an API key" in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0", "--insecure", "--check-config"]) == 0
    assert main(["serve", "--host", "0.0.0.0", "--api-key", "k", "--check-config"]) == 0
    for peer, local_peer in (
        ("ipv4:127.0.0.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("unix:/tmp/s", True),
        ("ipv4:10.0.0.7:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
        ("", False),
    ):
        assert loopback_peer(peer) == local_peer, peer
