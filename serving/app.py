"""The `premier` Ray Serve application: an Ingress in front of Generator replicas.

`build` makes the graph from a validated ServeConfig (`premier serve`, its demo and the tests
call it); `build_app` is its entry for Ray Serve config files (`import_path:
serving.app:build_app` in `serving/serve_config.yaml`, for `serve run` and a KubeRay RayService).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from serving.config import ServeConfig, build_config
from serving.fitting import STORE_RESOURCE_SHARE


def generator_options(config: ServeConfig) -> dict[str, Any]:
    """`.options()` of the Generator deployment: a fixed replica count, or Ray Serve autoscaling within
    `generator_autoscaling`'s bounds. Separate from `build` so that tests check them without Ray."""
    replicas: dict[str, Any] = {"num_replicas": config.generator_replicas}
    if config.generator_autoscaling is not None:
        replicas = {"autoscaling_config": config.generator_autoscaling_config}
    return dict(
        name="Generator",
        **replicas,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        # A replica holds what one replica's admission bound admits, so with its share of the load it never refuses:
        # a refused request waits out the router's retry backoff (up to 0.5 s) while the generator idles once its
        # own queue drains (at 2x saturation on 2 cores that cost 20-45 % of the images per second,
        # benchmarks/load.py). Beyond it (autoscaling, fewer replicas running than the bound counts) requests wait
        # in the handle's queue, where the replicas being added pick them up.
        max_ongoing_requests=config.replica_bound,
        max_queued_requests=config.replica_bound,
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=max(30.0, config.request_timeout_s),
    )


def ingress_options(config: ServeConfig) -> dict[str, Any]:
    """`.options()` of the Ingress deployment: one replica that answers refusals itself (its admission
    bound counts the most generator replicas there can be)."""
    actor: dict[str, Any] = {"num_cpus": 0}
    if config.store_resource:  # the ingress opens the store: it must run on the store's node
        actor["resources"] = {config.store_resource: STORE_RESOURCE_SHARE}
    return dict(
        name="Ingress",
        num_replicas=1,
        ray_actor_options=actor,
        max_ongoing_requests=config.admission_bound + 256,  # refusals must reach the ingress to be answered at once
        graceful_shutdown_timeout_s=max(30.0, config.request_timeout_s),
    )


def build(config: ServeConfig) -> Application:
    from serving.generator import Generator
    from serving.ingress import Ingress

    args = config.to_args()
    generator = serve.deployment(Generator).options(**generator_options(config))
    ingress = Ingress.options(**ingress_options(config))
    return ingress.bind(generator.bind(args), args)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder for Ray Serve config files: `args` are ServeConfig fields (env overrides apply)."""
    from serving.config import describe

    config = build_config(dict(args or {}))
    print(f"premier serve config:\n{describe(config)}", flush=True)
    return build(config)


__all__ = ["build", "build_app", "generator_options", "ingress_options"]
