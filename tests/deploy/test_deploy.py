"""deploy/k8s: the kustomize overlays render, validate against the Kubernetes and KubeRay schemas, and agree
with the server they deploy (serve config, ports, metric names, store paths, the single-node store rule).

Why each check: a manifest that renders but names a port, a path or a metric that does not exist fails
only in a cluster; these tests make those mismatches fail here. `kubectl` is the one on PATH (CI installs
Debian's kubernetes-client, kubectl 1.20 with kustomize v2.0.3) unless KUBECTL names another; the
manifests are written to render identically with kustomize v5.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CORE_KINDS = {"Namespace", "PersistentVolumeClaim", "ConfigMap", "Service", "CronJob"}
STORE_PVC, ARTIFACTS_PVC = "premier-store", "premier-artifacts"
STORE_SELECTOR = {
    "app.kubernetes.io/part-of": "premier-serve",
    "app.kubernetes.io/component": "ray-head",
}  # the store's pod
STORE_RESOURCE = "premier_store"  # the Ray custom resource only the head advertises

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def kubectl() -> str | None:
    return os.environ.get("KUBECTL") or shutil.which("kubectl")


needs_kubectl = pytest.mark.skipif(
    kubectl() is None, reason="kubectl is not installed (CI installs Debian's kubernetes-client)"
)


def kustomize(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)


@functools.cache
def _rendered(name: str) -> tuple[dict, ...]:
    path = K8S / "training" if name == "training" else K8S / "overlays" / name
    out = kustomize(path)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return tuple(d for d in yaml.load_all(out.stdout, Loader=_LOADER) if d)


def rendered(name: str) -> list[dict]:
    """The overlay's objects (a deep copy: tests may mutate them)."""
    return copy.deepcopy(list(_rendered(name)))


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# ---------------------------------------------------------------------- CRD schemas
def crd_dir() -> Path:
    """The in-repo copy (a clean clone validates offline); else the shared one next to the repository."""
    for d in (K8S / "crds", REPO / ".." / "shared" / "kuberay"):
        if all((d / f).is_file() for f in CRD_FILES.values()):
            return d
    pytest.fail("no KubeRay CRDs in deploy/k8s/crds or ../shared/kuberay")


def _strict(schema: Any) -> Any:
    """Reject unknown fields like the API server's strict field validation: `additionalProperties: false`
    on every object schema that lists its properties and does not preserve unknown fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str):
    import jsonschema

    crd = yaml.load((crd_dir() / CRD_FILES[kind]).read_text(), Loader=_LOADER)
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert version["served"] and version["storage"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def crd_errors(obj: dict) -> list[str]:
    assert obj["apiVersion"] == "ray.io/v1"
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(obj["kind"]).iter_errors(obj)]


@functools.cache
def k8s_versions() -> tuple[str, str]:
    """The oldest and newest Kubernetes schemas the installed kubernetes-validate ships (1.25 and 1.37 in 1.37.0)."""
    from kubernetes_validate.utils import all_versions

    versions = all_versions()
    return versions[0], versions[-1]


def core_validate(obj: dict, version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, version, strict=True)


def pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod template) of a RayService, RayJob or CronJob."""
    if obj["kind"] in ("RayService", "RayJob"):
        cluster = obj["spec"]["rayClusterConfig" if obj["kind"] == "RayService" else "rayClusterSpec"]
        yield "head", cluster["headGroupSpec"]["template"]
        for g in cluster.get("workerGroupSpecs", []):
            yield g["groupName"], g["template"]
    elif obj["kind"] == "CronJob":
        yield "job", obj["spec"]["jobTemplate"]["spec"]["template"]


def mounts_of(template: dict, claim: str) -> list[str]:
    """Mount paths, in every container, of the volume backed by PVC `claim`."""
    vols = {
        v["name"]
        for v in template["spec"].get("volumes", [])
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim
    }
    return [
        m["mountPath"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", []) if m["name"] in vols
    ]


def under(path: str, root: str) -> bool:
    return Path(path) == Path(root) or Path(root) in Path(path).parents


# ---------------------------------------------------------------------- serve config
def serve_yaml(objs: list[dict]) -> dict:
    return yaml.safe_load(one(objs, "RayService")["spec"]["serveConfigV2"])


def pod_env(objs: list[dict]) -> dict[str, str]:
    """The PREMIER_SERVE_* environment the Ray head gets from the ConfigMap and its Secret references (a stand-in
    value for each secret)."""
    data = one(objs, "ConfigMap", "premier-serve-env")["data"]
    env = {k: str(v) for k, v in data.items()}
    head = one(objs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for var in head.get("env", []):
        if "secretKeyRef" in var.get("valueFrom", {}):
            env[var["name"]] = "secret-from-" + var["valueFrom"]["secretKeyRef"]["name"]
    return env


def effective_config(objs: list[dict]):
    """(ServeConfig, ServerOptions) as serving.app.build_app would see them inside the pods."""
    from pydantic import ValidationError

    from serving.config import ServerOptions, build_config, split_serve_file

    args, server = split_serve_file(serve_yaml(objs), "serveConfigV2")
    try:
        options = ServerOptions.model_validate(server)
    except ValidationError as e:  # pragma: no cover - reported as a failure
        pytest.fail(f"serveConfigV2 server options: {e}")
    return build_config(args, environ=pod_env(objs)), options


# ====================================================================== rendering
@needs_kubectl
@pytest.mark.parametrize("name", [*OVERLAYS, "training"])
def test_overlay_renders(name: str) -> None:
    kinds = sorted(o["kind"] for o in rendered(name))
    if name == "training":
        assert kinds == ["RayJob"]
    else:
        assert kinds == sorted(
            [
                "Namespace",
                "ConfigMap",
                "PersistentVolumeClaim",
                "PersistentVolumeClaim",
                "Service",
                "Service",
                "CronJob",
                "RayService",
                "PodMonitor",
                "PrometheusRule",
            ]
        )


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_one_namespace(name: str) -> None:
    """Old kustomize does not rename a Namespace object: each overlay must ship its own, matching its objects."""
    objs = rendered(name)
    ns = one(objs, "Namespace")["metadata"]["name"]
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {ns}
    assert (
        {o["metadata"].get("namespace") for o in rendered("training")}
        == {"premier"}
        == {one(rendered("gpu"), "Namespace")["metadata"]["name"]}
    )


@needs_kubectl
def test_broken_kustomization_is_detected(tmp_path: Path) -> None:
    """A patch that points at a worker group that does not exist must fail to render, not render silently."""
    (tmp_path / "patch.yaml").write_text(
        "- op: replace\n  path: /spec/rayClusterConfig/workerGroupSpecs/5/maxReplicas\n  value: 3\n"
    )
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "bases": [os.path.relpath(K8S / "base", tmp_path)],
                "patchesJson6902": [
                    {
                        "target": {"group": "ray.io", "version": "v1", "kind": "RayService", "name": "premier-serve"},
                        "path": "patch.yaml",
                    }
                ],
            }
        )
    )
    assert kustomize(tmp_path).returncode != 0


# ====================================================================== schemas
@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_core_objects_validate(name: str) -> None:
    objs = rendered(name)
    core = [o for o in objs if o["kind"] in CORE_KINDS]
    assert {o["kind"] for o in core} == CORE_KINDS
    for version in k8s_versions():
        for o in core:
            core_validate(o, version)
        # The pod templates inside the custom resources, against the core PodTemplate schema too.
        for o in objs + rendered("training"):
            if o["kind"] in ("RayService", "RayJob"):
                for where, template in pod_templates(o):
                    core_validate(
                        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": where}, "template": template},
                        version,
                    )


def test_crd_copies_match_shared() -> None:
    """deploy/k8s/crds holds unmodified copies of ../shared/kuberay (where that exists)."""
    shared = REPO / ".." / "shared" / "kuberay"
    if not shared.is_dir():
        pytest.skip("../shared/kuberay is not next to this checkout (a clean clone): the in-repo copy is used")
    for f in CRD_FILES.values():
        assert (K8S / "crds" / f).read_bytes() == (shared / f).read_bytes(), f


@needs_kubectl
@pytest.mark.parametrize("name", [*OVERLAYS, "training"])
def test_ray_resources_validate_against_kuberay_crds(name: str) -> None:
    ray = [o for o in rendered(name) if o["apiVersion"] == "ray.io/v1"]
    assert ray
    for o in ray:
        assert crd_errors(o) == [], o["kind"]


@needs_kubectl
def test_broken_manifests_are_detected() -> None:
    """The validators fail for real: mutated copies of good objects are refused."""
    import kubernetes_validate

    objs = rendered("gpu")
    svc = one(objs, "RayService")
    typo = copy.deepcopy(svc)
    typo["spec"]["rayClusterConfig"]["workerGroupSpec"] = typo["spec"]["rayClusterConfig"].pop("workerGroupSpecs")
    assert any("workerGroupSpec" in e for e in crd_errors(typo))
    bad_type = copy.deepcopy(svc)
    bad_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert crd_errors(bad_type)
    missing = copy.deepcopy(one(rendered("training"), "RayJob"))
    del missing["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    assert crd_errors(missing)
    service = copy.deepcopy(one(objs, "Service", "premier-http"))
    service["spec"]["ports"][0]["prot"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError):
        core_validate(service, k8s_versions()[-1])
    pvc = copy.deepcopy(one(objs, "PersistentVolumeClaim", STORE_PVC))
    pvc["spec"]["accessModes"] = "ReadWriteOnce"
    with pytest.raises(kubernetes_validate.ValidationError):
        core_validate(pvc, k8s_versions()[0])


# ====================================================================== the serve config
@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_embedded_serve_config_is_the_servers(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """serveConfigV2 has serving/serve_config.yaml's shape, passes Ray's schema, and `premier serve --check-config`."""
    from ray.serve.schema import ServeDeploySchema

    from premier.cli import main
    from serving.config import APP_NAME, GRPC_SERVICER, PACKAGED_SERVE_CONFIG

    objs = rendered(name)
    data = serve_yaml(objs)
    packaged = yaml.safe_load(PACKAGED_SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(data)
    app, ref = data["applications"][0], packaged["applications"][0]
    assert len(data["applications"]) == 1 and app["name"] == APP_NAME
    for key in ("import_path", "route_prefix"):
        assert app[key] == ref[key]
    assert (
        data["grpc_options"]["grpc_servicer_functions"]
        == [GRPC_SERVICER]
        == packaged["grpc_options"]["grpc_servicer_functions"]
    )
    assert (data["http_options"]["port"], data["grpc_options"]["port"]) == (8000, 9000)
    assert data["http_options"]["host"] == "0.0.0.0"  # reachable from the Services

    config, options = effective_config(objs)
    assert options.host == "0.0.0.0"
    # The same validation `premier serve --check-config` runs, with the pods' environment.
    (tmp_path / "serve.yaml").write_text(one(objs, "RayService")["spec"]["serveConfigV2"])
    for k in [k for k in os.environ if k.startswith("PREMIER_SERVE_")]:
        monkeypatch.delenv(k)
    for k, v in pod_env(objs).items():
        monkeypatch.setenv(k, v)
    assert main(["serve", "--check-config", "--config", str(tmp_path / "serve.yaml")]) == 0
    if name == "gpu":
        assert (config.device, config.dtype, config.num_gpus) == ("cuda", "bfloat16", 1.0)
        assert config.model and config.checkpoint and not config.seed_demo_users
    else:
        assert config.model is None and config.num_gpus == 0 and config.device == "cpu"


@needs_kubectl
def test_broken_serve_config_is_detected() -> None:
    from premier.errors import InvalidRequestError

    objs = rendered("gpu")
    svc = one(objs, "RayService")
    svc["spec"]["serveConfigV2"] = svc["spec"]["serveConfigV2"].replace("max_batch_size: 4", "max_batch_size: 0")
    with pytest.raises(InvalidRequestError, match="max_batch_size"):
        effective_config(objs)
    objs = rendered("gpu")
    one(objs, "ConfigMap")["data"]["PREMIER_SERVE_DTYPE"] = "float64"
    with pytest.raises(InvalidRequestError, match="dtype"):
        effective_config(objs)


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_autoscaling_bounds_fit_the_workers(name: str) -> None:
    """Generator autoscaling comes from the app's args (one source of truth), reaches the Generator deployment
    and the ingress's admission bound, and fits the worker group."""
    from ray.serve.config import AutoscalingConfig

    from serving.app import generator_options, ingress_options

    objs = rendered(name)
    config, _ = effective_config(objs)
    assert "deployments" not in serve_yaml(objs)["applications"][0]  # no Serve-level override of the replicas
    auto = config.generator_autoscaling
    assert auto is not None and 1 <= auto.min_replicas <= auto.max_replicas
    options = generator_options(config)
    assert (
        "num_replicas" not in options
        and AutoscalingConfig(**options["autoscaling_config"]).max_replicas == auto.max_replicas
    )
    target = options["autoscaling_config"]["target_ongoing_requests"]
    assert config.max_batch_size <= target <= options["max_ongoing_requests"]  # reachable, and batches can fill
    assert config.admission_bound == config.max_queued_requests + config.generator_max_ongoing * auto.max_replicas
    assert (
        options["max_ongoing_requests"] == config.replica_bound > config.generator_max_ongoing
    )  # never refuses its share
    assert ingress_options(config)["max_ongoing_requests"] > config.admission_bound
    cluster = one(objs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = int(limits.get("nvidia.com/gpu", 0))
    if name == "gpu":
        # Every generator and one fit job at a time get a whole GPU.
        assert gpus * group["maxReplicas"] >= auto.max_replicas * config.num_gpus + config.fitting.num_gpus
        assert config.fitting.num_gpus >= 1
        assert options["autoscaling_config"]["downscale_delay_s"] >= 300  # FLUX replicas start slowly
    else:
        assert gpus == 0 and group["maxReplicas"] >= auto.max_replicas


@needs_kubectl
def test_serve_level_replica_override_is_refused() -> None:
    """The old workaround (a `deployments:` autoscaling_config next to the args) fails `--check-config`."""
    from premier.errors import InvalidRequestError

    objs = rendered("gpu")
    svc = one(objs, "RayService")
    svc["spec"]["serveConfigV2"] += "    deployments:\n      - name: Generator\n        num_replicas: auto\n"
    with pytest.raises(InvalidRequestError, match="deployments\\[Generator\\].num_replicas"):
        effective_config(objs)


@needs_kubectl
def test_overlays_differ_as_intended() -> None:
    cpu, gpu = rendered("cpu"), rendered("gpu")
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    gsvc, csvc = one(gpu, "RayService")["spec"]["rayClusterConfig"], one(cpu, "RayService")["spec"]["rayClusterConfig"]
    worker = gsvc["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 1
    for spec in (
        worker,
        gsvc["headGroupSpec"]["template"]["spec"],
        one(gpu, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"],
    ):
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert "nvidia.com/gpu" not in json.dumps(gsvc["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"])
    assert (csvc["workerGroupSpecs"][0]["maxReplicas"], gsvc["workerGroupSpecs"][0]["maxReplicas"]) == (2, 8)
    images = {c["image"] for o in gpu for _, t in pod_templates(o) for c in t["spec"]["containers"]}
    assert images == {"premier-serve:0.1.0-cuda"}
    assert {c["image"] for o in cpu for _, t in pod_templates(o) for c in t["spec"]["containers"]} == {
        "premier-serve:0.1.0-cpu"
    }
    assert one(gpu, "PersistentVolumeClaim", ARTIFACTS_PVC)["spec"]["accessModes"] == ["ReadWriteMany"]
    env = pod_env(gpu)
    assert env["PREMIER_SERVE_DTYPE"] == "bfloat16" and "PREMIER_SERVE_QUANTIZE" in env
    assert "PREMIER_SERVE_DTYPE" not in pod_env(cpu)


# ====================================================================== wiring
@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_services_and_podmonitor_target_real_ports(name: str) -> None:
    objs = rendered(name)
    config, options = effective_config(objs)
    templates = dict(pod_templates(one(objs, "RayService")))
    head = templates["head"]
    head_ports = {p["name"]: p["containerPort"] for c in head["spec"]["containers"] for p in c.get("ports", [])}
    numbers = {"premier-http": options.http_port, "premier-grpc": options.grpc_port}
    for svc in (o for o in objs if o["kind"] == "Service"):
        selector = dict(svc["spec"]["selector"])
        assert selector.pop("ray.io/serve") == "true"  # set by KubeRay on pods whose Serve proxy is healthy
        assert selector.items() <= head["metadata"]["labels"].items(), svc["metadata"]["name"]
        (port,) = svc["spec"]["ports"]
        assert head_ports[port["targetPort"]] == port["port"] == numbers[svc["metadata"]["name"]]
    monitor = one(objs, "PodMonitor")
    selected = [
        t
        for t in templates.values()
        if monitor["spec"]["selector"]["matchLabels"].items() <= t["metadata"]["labels"].items()
    ]
    assert len(selected) == len(templates)
    exposed = {p["name"] for t in selected for c in t["spec"]["containers"] for p in c.get("ports", [])}
    for ep in monitor["spec"]["podMetricsEndpoints"]:
        assert ep["port"] in exposed
    serve_ep = next(ep for ep in monitor["spec"]["podMetricsEndpoints"] if ep["port"] == "serve")
    assert serve_ep["path"] == "/metrics" and head_ports["serve"] == options.http_port
    assert '@api.get("/metrics"' in (REPO / "serving" / "api_v1.py").read_text().replace("'", '"')


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_volumes_hold_the_configured_paths(name: str) -> None:
    """The store, fit uploads, model and checkpoint paths of the serve config lie on the mounted volumes."""
    objs = rendered(name)
    config, _ = effective_config(objs)
    for where, t in pod_templates(one(objs, "RayService")):
        store_mounts, artifact_mounts = mounts_of(t, STORE_PVC), mounts_of(t, ARTIFACTS_PVC)
        if where == "head":  # the store's openers (ingress, fit-job drivers) and the fit uploads live here
            assert store_mounts and all(under(config.store, m) for m in store_mounts), where
            assert any(under(str(config.fitting.uploads_dir), m) for m in store_mounts + artifact_mounts)
        else:
            assert not store_mounts, where  # generators get users' embeddings from the ingress
        for path in (config.model, config.checkpoint):
            if path is not None:
                assert artifact_mounts and under(path, artifact_mounts[0]), (where, path)
    # The backup job reads the same store folder.
    t, args = backup_job(objs)
    assert args.store == config.store
    assert any(under(config.store, m) for m in mounts_of(t, STORE_PVC))
    assert any(under(args.backup_dir, m) for m in mounts_of(t, ARTIFACTS_PVC))
    # The training job writes where the gpu overlay's model is read from.
    if name == "gpu":
        (job,) = rendered("training")
        entry = job["spec"]["entrypoint"]
        assert config.model.replace("/data/artifacts", "$A") in entry
        for _, jt in pod_templates(job):
            assert not mounts_of(jt, STORE_PVC)  # training never opens the user store


def backup_job(objs: list[dict]) -> tuple[dict, argparse.Namespace]:
    """(pod template, parsed arguments) of the store-backup CronJob: its command must be the image's
    `premier users backup`, as the real CLI parser reads it."""
    from premier.cli import build_parser

    ((_, t),) = pod_templates(one(objs, "CronJob"))
    (container,) = t["spec"]["containers"]
    command = [*container.get("command", []), *container.get("args", [])]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert command[0] == "premier" and command[0] in scripts, command
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.users_command) == ("users", "backup") and args.func
    return t, args


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_backup_cronjob_runs_the_cli(name: str) -> None:
    """Nightly, never two at once, rotating: and the image's CLI accepts the command (a typo fails here, not at 03:17)."""
    objs = rendered(name)
    cron = one(objs, "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    t, args = backup_job(objs)
    assert args.keep and args.keep >= 7 and not hasattr(args, "checkpoint")
    images = {
        c["image"]
        for o in objs
        if o["kind"] == "RayService"
        for _, rt in pod_templates(o)
        for c in rt["spec"]["containers"]
    }
    assert {c["image"] for c in t["spec"]["containers"]} == images  # the same package version as the server


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_only_the_head_and_the_backup_open_the_store(name: str) -> None:
    """SQLite WAL needs one host: the store volume is ReadWriteOnce, mounted only by the Ray head and the backup
    CronJob (affine to the head); generator workers neither mount it nor are tied to the head's node. The head
    alone advertises the custom resource that places the store's openers (ingress, fit-job drivers) on it."""
    from serving.app import ingress_options

    objs = rendered(name)
    assert one(objs, "PersistentVolumeClaim", STORE_PVC)["spec"]["accessModes"] == ["ReadWriteOnce"]
    users = [(o["kind"], w, t) for o in objs for w, t in pod_templates(o) if mounts_of(t, STORE_PVC)]
    assert sorted((kind, where) for kind, where, _ in users) == [("CronJob", "job"), ("RayService", "head")]
    for kind, where, t in users:
        terms = t["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert any(
            term["topologyKey"] == "kubernetes.io/hostname" and term["labelSelector"]["matchLabels"] == STORE_SELECTOR
            for term in terms
        ), (kind, where)
    svc = one(objs, "RayService")
    cluster = svc["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert {k: head["template"]["metadata"]["labels"][k] for k in STORE_SELECTOR} == STORE_SELECTOR
    # Only the head's pods match the selector (so the backup cannot follow a worker), in every object.
    matching = [
        (o["kind"], w)
        for o in objs
        for w, t in pod_templates(o)
        if STORE_SELECTOR.items() <= t["metadata"].get("labels", {}).items()
    ]
    assert matching == [("RayService", "head")]
    assert json.loads(yaml.safe_load(head["rayStartParams"]["resources"])) == {STORE_RESOURCE: 1}
    for g in cluster["workerGroupSpecs"]:
        assert STORE_RESOURCE not in g["rayStartParams"].get("resources", ""), g["groupName"]
        assert "podAffinity" not in g["template"]["spec"].get("affinity", {}), g["groupName"]
    config, _ = effective_config(objs)
    assert config.store_resource == STORE_RESOURCE
    assert ingress_options(config)["ray_actor_options"]["resources"] == {STORE_RESOURCE: pytest.approx(0.001)}


@needs_kubectl
def test_training_entrypoint_parses() -> None:
    """Each `premier` command of the RayJob's entrypoint is accepted by the real CLI parser."""
    from premier.cli import build_parser

    (job,) = rendered("training")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["sh", "-c"]
    script = argv[2].replace("$A", "/data/artifacts")
    commands = [shlex.split(c.replace("$R", "--resume")) for c in script.split(";") if c.strip().startswith("premier ")]
    assert [c[1] for c in commands] == ["data", "train"]
    for cmd in commands:
        args = build_parser().parse_args(cmd[1:])
        assert args.func
    train = build_parser().parse_args(commands[1][1:])
    assert train.resume and train.data == commands[0][4]
    # 8 Ray Train workers with one GPU each, on the job's own cluster; the driver takes no GPU
    assert (train.num_workers, train.use_gpu, train.address) == (8, True, "auto")
    assert "entrypointNumGpus" not in job["spec"]
    gpus = sum(
        int(g["maxReplicas"]) * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    )
    assert gpus == train.num_workers


# ====================================================================== alerts
def _rules_groups() -> dict:
    rule = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    return {"groups": rule["spec"]["groups"]}


needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not installed (Debian's prometheus package)"
)


@needs_promtool
def test_prometheus_rules_check(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(_rules_groups()))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    broken = _rules_groups()
    broken["groups"][0]["rules"][2]["expr"] = "sum(rate(premier_requests_total[5m]) >"
    path.write_text(yaml.safe_dump(broken))
    assert subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, timeout=60).returncode != 0


@needs_promtool
def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool unit tests: 10% refusals fire PremierRequestsRefused; 503s alone are not PremierServerErrors."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_rules_groups()))
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'premier_requests_total{protocol="http",code="200"}', "values": "0+90x30"},
                    {"series": 'premier_requests_total{protocol="http",code="503"}', "values": "0+10x30"},
                    {"series": "premier_images_generated_total", "values": "0+90x30"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "25m",
                        "alertname": "PremierRequestsRefused",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning"},
                                "exp_annotations": {
                                    "summary": "more than 5% of generation requests get 503 (admission bound reached)",
                                    "description": "10% of requests were refused: the cluster is at capacity.",
                                },
                            }
                        ],
                    },
                    {"eval_time": "25m", "alertname": "PremierServerErrors", "exp_alerts": []},
                    {"eval_time": "25m", "alertname": "PremierNoImages", "exp_alerts": []},
                ],
            }
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    out = subprocess.run(
        ["promtool", "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_metrics_exist() -> None:
    """Every premier_* series the rules use is in the server's /metrics exposition (serving/metrics.py)."""
    import numpy as np

    from premier.requests import GenerationSettings
    from serving.metrics import ServeMetrics
    from serving.protocol import ImageResult

    m = ServeMetrics(lambda: {"FAILED": 1})
    image, settings = np.zeros((4, 4, 3), np.uint8), GenerationSettings(32, 32, 8, 3.5)
    m.observe("http", ImageResult(image, 1, settings, 2, "b", 0, {"queue_wait_s": 0.1}, user_cache="hit"), 0.5)
    m.refused("http", 503)
    exposed = set(re.findall(r"^(premier_[a-z_]+)", m.exposition().decode(), flags=re.M))
    used = set()
    for group in _rules_groups()["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"\b(premier_[a-z_]+)", rule["expr"]))
    assert used and used <= exposed, used - exposed
