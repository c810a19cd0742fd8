"""The server's configuration: one pydantic model, read from YAML and the environment, printed at start.

The same YAML serves two readers. A standard Ray Serve config file (`serving/serve_config.yaml`,
what `serve run` and a KubeRay RayService take) holds it as the `args` of the `premier`
application, next to `http_options` / `grpc_options`; `premier serve --config` reads that file
too, or a plain YAML mapping of the fields below. Environment variables `PREMIER_SERVE_<FIELD>`
(nested fields with `__`, e.g. `PREMIER_SERVE_FITTING__MAX_IMAGES`) override both; their values
are parsed as YAML scalars, so `8`, `0.01`, `true` and `null` have their usual types.

How many generators run is an application arg too (`generator_replicas`, or `generator_autoscaling`
for Ray Serve autoscaling), never the file's `deployments:` section (refused for the Generator):
the ingress sizes its admission bound from the most replicas there can be, and cannot see
`deployments:` overrides.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from premier.errors import InvalidRequestError
from premier.quantize import QUANTIZE_MODES
from serving.fitting import FitSettings

ENV_PREFIX = "PREMIER_SERVE_"
APP_NAME = "premier"
MODEL_NAME = "premier"  # the KServe v2 model name
PACKAGED_SERVE_CONFIG = Path(__file__).with_name("serve_config.yaml")
GRPC_SERVICER = "serving.grpc_stubs.add_GRPCInferenceServiceServicer_to_server"


class GeneratorAutoscaling(BaseModel):
    """Ray Serve autoscaling of the Generator deployment (its `autoscaling_config`), set in the app's args.

    Here rather than in the Serve file's `deployments:` section because the ingress must know the
    largest replica count: it sizes the admission bound (ServeConfig.admission_bound), and a
    `deployments:` override is invisible to the application code.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    min_replicas: int = Field(
        1,
        ge=1,
        le=1024,
        description="replicas kept when idle; at least 1: a replica loads "
        "the model for minutes, longer than a request waits (request_timeout_s)",
    )
    max_replicas: int = Field(..., ge=1, le=1024, description="most replicas; sizes the ingress's admission bound")
    target_ongoing_requests: float | None = Field(
        None,
        gt=0,
        description="requests in flight per replica the autoscaler aims at (default: two batches, 2 x max_batch_size)",
    )
    upscale_delay_s: float | None = Field(
        None, ge=0, description="load must stay high this long before a scale-up (Ray's default: 30)"
    )
    downscale_delay_s: float | None = Field(
        None,
        ge=0,
        description="load must stay low this long before a scale-down "
        "(Ray's default: 600; keep it long, a replica is slow to start)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> GeneratorAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


class ServeConfig(BaseModel):
    """Everything the `premier` Ray Serve application needs (the `args` of its application entry)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = Field(None, description="local diffusers FLUX folder; null: the embedded tiny model")
    checkpoint: str | None = Field(None, description="Premier checkpoint folder; null: the embedded demo checkpoint")
    store: str = Field(
        "premier-store",
        description="user store folder (created and, on the embedded model, seeded with its demo users)",
    )
    seed_demo_users: bool = Field(True, description="on the embedded model, put its demo users into an empty store")
    device: str | None = Field(None, description="torch device of the generators (default: cuda if available)")
    dtype: str | None = Field(None, pattern="^(float32|bfloat16|float16)$")
    compile: str | None = Field(None, pattern="^(regional|full)$")
    quantize: str | None = Field(
        None, description=f"torchao quantization of the FLUX blocks: {', '.join(QUANTIZE_MODES)}"
    )

    generator_replicas: int = Field(1, ge=1, le=1024, description="a fixed number of generator replicas")
    generator_autoscaling: GeneratorAutoscaling | None = Field(
        None,
        description="instead of generator_replicas (exclusive): Ray Serve autoscaling between min_replicas and max_replicas",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per generator replica")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per generator replica")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per generator (default: torch's)")
    max_batch_size: int = Field(8, ge=1, le=256, description="requests per forward")
    batching: Literal["request", "step"] = Field(
        "request",
        description="'request': a batch runs all its steps together (requests of one size, steps and guidance); "
        "'step': requests join and leave the running batch at every denoising step (any steps, guidance, users)",
    )
    step_profile: str | None = Field(
        None,
        description="step-level batching: a JSON step-time profile (premier.step_profile) giving the batch caps; "
        "default: the packaged one for the embedded model, else measured when the generator starts",
    )
    step_profile_sizes: list[int] = Field(
        [],
        description="step-level batching without a profile file: square sizes (pixels) measured at start-up "
        "besides the model's default; other sizes scale from the nearest measured one",
    )
    batch_wait_timeout_s: float = Field(
        0.002,
        ge=0,
        le=10,
        description="how long a new batch waits to fill (under load batches fill while the previous one runs)",
    )
    max_queued_requests: int = Field(
        16, ge=1, le=100_000, description="generation requests admitted but not yet running, per ingress; above it: 503"
    )
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of a 503")
    request_timeout_s: float = Field(120.0, gt=0, description="longest a generation may take before a 503")
    store_cache_size: int = Field(
        1024, ge=0, description="materialised user embeddings cached by the ingress (it resolves users)"
    )
    store_resource: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
        description="Ray custom resource that only the store's node (the head) advertises, e.g. premier_store: the ingress "
        "and fit-job drivers (the store's only openers) request a sliver of it; null: no placement constraint",
    )
    api_key: SecretStr | None = Field(
        None, description="if set, every route but health needs 'Authorization: Bearer <key>'"
    )
    public_docs: bool = Field(
        False, description="serve /docs and /openapi.json without the API key (default: they follow the key rule)"
    )
    insecure: bool = Field(
        False, description="allow `premier serve` to listen on a non-loopback address without an API key"
    )
    grpc_peers: Literal["any", "loopback"] = Field(
        "any",
        description="who may call the gRPC API: Ray's gRPC proxy binds every interface whatever `host` says, so "
        "`premier serve` on a loopback host sets 'loopback' and the ingress refuses other peers",
    )
    fitting: FitSettings = Field(default_factory=FitSettings)

    @field_validator("quantize")
    @classmethod
    def _known_quantization(cls, v: str | None) -> str | None:
        """The pipeline's own list (premier.quantize.QUANTIZE_MODES), so a mode it gains is servable at once."""
        if v is not None and v not in QUANTIZE_MODES:
            raise ValueError(f"must be one of {', '.join(QUANTIZE_MODES)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_replica_setting(self) -> ServeConfig:
        auto = self.generator_autoscaling
        if auto is None:
            return self
        if "generator_replicas" in self.model_fields_set:
            raise ValueError("generator_replicas (a fixed count) and generator_autoscaling are exclusive: set one")
        if auto.target_ongoing_requests is not None and auto.target_ongoing_requests > self.generator_max_ongoing:
            raise ValueError(
                f"generator_autoscaling.target_ongoing_requests ({auto.target_ongoing_requests:g}) exceeds what a "
                f"replica takes at once (4 x max_batch_size = {self.generator_max_ongoing}): it would never be reached"
            )
        return self

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().strip():
            return None
        return v

    # ------------------------------------------------------------------ derived
    @property
    def has_users(self) -> bool:
        """False for a real FLUX model without a Premier checkpoint: plain FLUX only, no store."""
        return self.model is None or self.checkpoint is not None

    @property
    def generator_max_ongoing(self) -> int:
        """One replica's share of the admission bound: four full batches, so requests trickling in during a forward
        fill the next one (measured: mean batch 7.5 of 8 under overload, 5 with two); Ray's limit is `replica_bound`."""
        return 4 * self.max_batch_size

    @property
    def generator_max_replicas(self) -> int:
        """The most generator replicas that can run: the fixed count, or the autoscaling maximum."""
        auto = self.generator_autoscaling
        return self.generator_replicas if auto is None else auto.max_replicas

    @property
    def generator_autoscaling_config(self) -> dict[str, Any] | None:
        """Ray Serve's `autoscaling_config` of the Generator deployment; None: a fixed replica count."""
        auto = self.generator_autoscaling
        if auto is None:
            return None
        out = auto.model_dump(exclude_none=True)
        out.setdefault("target_ongoing_requests", 2 * self.max_batch_size)  # two batches in flight per replica
        return out

    @property
    def replica_bound(self) -> int:
        """Ray Serve's max_ongoing_requests of a generator replica: a one-replica server's admission bound."""
        return self.max_queued_requests + self.generator_max_ongoing

    @property
    def admission_bound(self) -> int:
        """Generation requests one ingress lets in at once (running or queued), for the most replicas; then 503."""
        return self.max_queued_requests + self.generator_max_ongoing * self.generator_max_replicas

    def _dump(self) -> dict[str, Any]:
        # With autoscaling, generator_replicas is unused and must stay unset for the args to validate again.
        return self.model_dump(mode="json", exclude={"generator_replicas"} if self.generator_autoscaling else None)

    def redacted(self) -> dict[str, Any]:
        """The configuration as printed at start: the API key hidden."""
        out = self._dump()
        out["api_key"] = "***" if self.api_key is not None else None
        return out

    def to_args(self) -> dict[str, Any]:
        """The application `args` (JSON-safe, the API key in clear) that rebuild this config."""
        out = self._dump()
        out["api_key"] = self.api_key.get_secret_value() if self.api_key is not None else None
        return out


class ServerOptions(BaseModel):
    """Ray Serve's own HTTP and gRPC listeners (`http_options` / `grpc_options` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(9000, ge=0, le=65535)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """A host name or address that only this machine can reach."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(config: ServeConfig, options: ServerOptions) -> ServeConfig:
    """Closed by default: refuse a non-loopback listener without an API key (unless `insecure`), and on a
    loopback host let only loopback peers use gRPC (Ray's gRPC proxy listens on every interface)."""
    if not options.loopback and config.api_key is None and not config.insecure:
        raise InvalidRequestError(
            "host",
            f"refusing to listen on {options.host} without an API key: set one (--api-key or PREMIER_SERVE_API_KEY), "
            "or pass --insecure to serve anyone who can reach this address",
        )
    if options.loopback and config.grpc_peers == "any":
        config = config.model_copy(update={"grpc_peers": "loopback"})
    return config


# ---------------------------------------------------------------------- loading
def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if path[-1] == "api_key" and value is not None:
            value = str(raw)  # a key is a string, whatever it looks like
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError("config", f"{path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InvalidRequestError("config", f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("config", f"{path} must hold a mapping, not {type(data).__name__}")
    return data


def split_serve_file(data: dict[str, Any], source: str = "config") -> tuple[dict[str, Any], dict[str, Any]]:
    """(application args, server options) from a Ray Serve config file, or (data, {}) from a plain mapping."""
    if "applications" not in data:
        return data, {}
    apps = data.get("applications") or []
    app = next((a for a in apps if isinstance(a, dict) and a.get("name") == APP_NAME), None)
    if app is None:
        raise InvalidRequestError("config", f"{source} has no application named {APP_NAME!r}")
    for dep in app.get("deployments") or []:
        # One source of truth for the generators' count: the app reads it to size its admission bound.
        if not (isinstance(dep, dict) and dep.get("name") == "Generator"):
            continue
        clash = sorted({"num_replicas", "autoscaling_config"} & set(dep))
        if clash:
            raise InvalidRequestError(
                "config",
                f"{source}: deployments[Generator].{clash[0]} would override the app's replica "
                "settings unseen by its admission bound; set generator_replicas or generator_autoscaling "
                "in the application's args instead",
            )
    http, grpc = data.get("http_options") or {}, data.get("grpc_options") or {}
    server = {
        k: v
        for k, v in (("host", http.get("host")), ("http_port", http.get("port")), ("grpc_port", grpc.get("port")))
        if v is not None
    }
    return dict(app.get("args") or {}), server


def build_config(
    values: dict[str, Any], environ: dict[str, str] | None = None, overrides: dict[str, Any] | None = None
) -> ServeConfig:
    """Validate `values`, then the environment's PREMIER_SERVE_* (default os.environ), then `overrides` (None
    values skipped); a bad field raises InvalidRequestError naming it."""
    merged = _merge(values, _env_overrides(dict(os.environ) if environ is None else environ))
    merged = _merge(merged, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return ServeConfig.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(["config", *(str(p) for p in err["loc"])])
        raise InvalidRequestError(field, err["msg"].removeprefix("Value error, ")) from None


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> tuple[ServeConfig, ServerOptions]:
    """Config file (Ray Serve format or plain; default: the packaged one), then environment, then explicit overrides."""
    source = Path(path) if path is not None else PACKAGED_SERVE_CONFIG
    args, server = split_serve_file(read_yaml(source), str(source))
    try:
        options = ServerOptions.model_validate(server)
    except ValidationError as e:
        err = e.errors()[0]
        raise InvalidRequestError(f"config.{'.'.join(map(str, err['loc']))}", err["msg"]) from None
    return build_config(args, environ, overrides), options


def describe(config: ServeConfig, options: ServerOptions | None = None) -> str:
    """The text printed at start."""
    data = {"app": config.redacted()}
    if options is not None:
        data["server"] = options.model_dump()
    return json.dumps(data, indent=2, sort_keys=True)


__all__ = [
    "ServeConfig",
    "GeneratorAutoscaling",
    "ServerOptions",
    "FitSettings",
    "load_config",
    "build_config",
    "describe",
    "split_serve_file",
    "read_yaml",
    "APP_NAME",
    "MODEL_NAME",
    "PACKAGED_SERVE_CONFIG",
    "GRPC_SERVICER",
]
