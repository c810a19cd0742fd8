"""`premier serve`: start the Ray Serve application (HTTP + KServe v2 gRPC) and keep it running.

    premier serve                                   # embedded model, packaged serving/serve_config.yaml
    premier serve --config my_serve.yaml --store /data/users --api-key KEY
    premier serve --model /models/FLUX.1-dev --checkpoint /ckpt/premier --num-gpus 1
    premier serve --check-config --config serving/serve_config.yaml   # validate and print, start nothing
    premier serve --demo premier-serve-demo         # start, send HTTP and gRPC requests, write images, stop

Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the inference server (HTTP, KServe v2 HTTP and gRPC) on Ray Serve",
        description="Start the Premier Ray Serve application and serve until Ctrl-C / SIGTERM. The configuration "
        "comes from a Ray Serve config file (default: the packaged serving/serve_config.yaml) or a plain YAML "
        "of its application args, then PREMIER_SERVE_<FIELD> environment variables, then these options; "
        "it is printed at start.",
    )
    p.add_argument("--config", metavar="FILE", help="Ray Serve config file or plain YAML of ServeConfig fields")
    g = p.add_argument_group("model and users")
    g.add_argument("--model", metavar="PATH", help="local diffusers FLUX folder (default: the embedded tiny model)")
    g.add_argument(
        "--checkpoint", metavar="DIR", help="Premier checkpoint folder (default: the embedded demo checkpoint)"
    )
    g.add_argument(
        "--store",
        metavar="DIR",
        help="user store folder (default premier-store; seeded with the demo users on the embedded model)",
    )
    g.add_argument("--device", help="torch device of the generators")
    g = p.add_argument_group("capacity")
    g.add_argument("--replicas", dest="generator_replicas", type=int, help="generator replicas")
    g.add_argument("--num-gpus", type=float, help="GPUs per generator replica")
    g.add_argument("--num-cpus", type=float, help="CPUs per generator replica")
    g.add_argument("--max-batch-size", type=int, help="requests per forward")
    g.add_argument(
        "--batching",
        choices=("request", "step"),
        help="request-level batches, or step-level: requests join and leave at every denoising step",
    )
    g.add_argument("--batch-wait-ms", type=float, help="how long a new batch waits to fill, in ms")
    g.add_argument("--max-queued", dest="max_queued_requests", type=int, help="queue bound; above it requests get 503")
    g = p.add_argument_group("network")
    g.add_argument("--host", help="listen address (default from the config file: 127.0.0.1)")
    g.add_argument("--http-port", type=int, help="HTTP port (default 8000; 0: a free port)")
    g.add_argument("--grpc-port", type=int, help="gRPC port (default 9000; 0: a free port)")
    g.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on every route but health (or PREMIER_SERVE_API_KEY)"
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback --host without an API key (anyone who reaches the address may use the API)",
    )
    g.add_argument("--address", help="an existing Ray cluster to join (default: start a local one)")
    g.add_argument(
        "--no-dashboard",
        dest="dashboard",
        action="store_false",
        help="do not start Ray's dashboard (it hosts the Jobs API: fits of runner jobs are then unavailable; resident fit workers still fit)",
    )
    p.add_argument("--check-config", action="store_true", help="validate and print the configuration, start nothing")
    p.add_argument(
        "--demo",
        metavar="DIR",
        help="start on free ports with a fresh store, send requests for several users "
        "over HTTP and gRPC, write the images and a contact sheet to DIR, stop",
    )
    p.set_defaults(func=cmd_serve)


def _overrides(args: argparse.Namespace) -> dict:
    keys = (
        "model",
        "checkpoint",
        "store",
        "device",
        "generator_replicas",
        "num_gpus",
        "num_cpus",
        "max_batch_size",
        "batching",
        "max_queued_requests",
        "api_key",
        "insecure",
    )
    out = {k: getattr(args, k) for k in keys}
    if args.batch_wait_ms is not None:
        out["batch_wait_timeout_s"] = args.batch_wait_ms / 1000
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.config import check_exposure, describe, load_config
    from serving.server import ServerSession

    config, options = load_config(args.config, _overrides(args))
    updates = {
        k: v
        for k, v in (("host", args.host), ("http_port", args.http_port), ("grpc_port", args.grpc_port))
        if v is not None
    }
    options = options.model_copy(update=updates)
    config = check_exposure(config, options)  # refused here too, so --check-config says what start would
    if args.check_config:
        print(describe(config, options))
        return 0
    if args.demo:
        from serving.demo import run_demo

        return run_demo(args.demo, config, options, explicit_store=args.store is not None, address=args.address)
    print(describe(config, options), flush=True)
    with ServerSession(config, options, address=args.address, dashboard=args.dashboard) as session:
        print(
            f"premier serve: HTTP {session.http_url} (OpenAPI {session.http_url}/docs), "
            f"gRPC {session.grpc_target} (KServe v2; Ray's gRPC proxy listens on every interface, "
            f"{'only local peers are served' if session.config.grpc_peers == 'loopback' else 'any peer'}), "
            f"metrics {session.http_url}/metrics, Ray dashboard and Jobs API "
            f"{session.dashboard_url or 'off'}; Ctrl-C to stop",
            flush=True,
        )
        session.serve_forever()
    print("premier serve: stopped", flush=True)
    return 0
