"""A running server: Ray (a new local cluster or an existing one), Ray Serve's HTTP and gRPC proxies, the app.

One class for `premier serve`, its demo and the tests' harness, so all three start and stop the
server the same way. Stopping is graceful: Serve drains in-flight requests (each deployment's
graceful_shutdown_timeout_s) before the replicas exit, then Ray is shut down if we started it.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

from premier.errors import InvalidRequestError
from serving.config import APP_NAME, GRPC_SERVICER, ServeConfig, ServerOptions, check_exposure

BIND_ATTEMPTS = 3
BIND_WAIT_S = 120.0
PROXY_CHECK_TIMEOUT_S = 60.0
STORE_RESOURCE = "premier_store"  # the custom resource of the store's node (deploy/k8s: the head group declares it)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ray_environment() -> None:
    """Ray settings of a server's cluster, where the operator has not set them (a local cluster inherits them)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 enables token auth by default
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its worker processes (Serve's proxy and controller, the ingress, the generators) at nice 15, so
    # any other busy process on the machine starves them: under `stress-ng --cpu 2` a proxy took 66 s to start.
    # The server's processes are the machine's work: normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # On a busy machine a starting proxy answers Serve's 5 s readiness check late, is declared unhealthy
    # three times in a row and killed, again and again: give it time.
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(name, str(PROXY_CHECK_TIMEOUT_S))


class ServerSession:
    """Context manager: start on enter (ports 0 become free ports), stop on exit (idempotent)."""

    def __init__(
        self,
        config: ServeConfig,
        options: ServerOptions,
        *,
        address: str | None = None,
        dashboard: bool = True,
        num_cpus: int | None = None,
        dashboard_port: int | None = None,
        ready_timeout_s: float = 300.0,
    ):
        self.config = check_exposure(config, options)  # closed by default (serving/config.py)
        self.host = options.host
        self._auto_ports = (options.http_port == 0, options.grpc_port == 0)  # re-picked if taken before Ray binds
        self.http_port = options.http_port or free_port(self.host)
        self.grpc_port = options.grpc_port or free_port(self.host)
        self.address = address
        self.dashboard = dashboard
        self.dashboard_port = (dashboard_port or free_port()) if dashboard and address is None else None
        self.num_cpus = num_cpus
        self.ready_timeout_s = ready_timeout_s
        self._started_ray = False
        self._running = False
        self._stop_event = threading.Event()

    # ------------------------------------------------------------------ addresses
    @property
    def http_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return self.http_url.removeprefix("http://").rsplit(":", 1)[0] + f":{self.grpc_port}"

    @property
    def dashboard_url(self) -> str | None:
        return f"http://127.0.0.1:{self.dashboard_port}" if self.dashboard_port else None

    def auth_headers(self) -> dict[str, str]:
        key = self.config.api_key
        return {"Authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> ServerSession:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ray_environment()
        import ray
        from ray import serve

        from serving.app import build

        if not ray.is_initialized():
            kwargs: dict = {"address": self.address or "local", "log_to_driver": False}
            if self.address is None:
                # A cluster of one node: it is the store's node, so it advertises the store resource (a config's
                # `store_resource: premier_store` places the ingress and fit drivers on it, as on a KubeRay head).
                kwargs.update(num_cpus=self.num_cpus, include_dashboard=self.dashboard, resources={STORE_RESOURCE: 1})
                if self.dashboard:
                    kwargs.update(dashboard_host="127.0.0.1", dashboard_port=self.dashboard_port)
            ray.init(**kwargs)
            self._started_ray = True
        self._running = True
        for attempt in range(1, BIND_ATTEMPTS + 1):
            serve.start(
                http_options={"host": self.host, "port": self.http_port},
                grpc_options={"port": self.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
            )
            if self._listening(self.http_port) and self._listening(self.grpc_port):
                break
            # A free port picked here was taken by someone else before Ray's proxies bound it: pick again.
            if attempt == BIND_ATTEMPTS or not any(self._auto_ports):
                raise InvalidRequestError(
                    "http_port",
                    f"Ray Serve could not listen on HTTP {self.host}:{self.http_port} and gRPC port {self.grpc_port}: "
                    "is another server using them? (choose others with --http-port / --grpc-port, 0 for free ones)",
                )
            serve.shutdown()
            self.http_port = free_port(self.host) if self._auto_ports[0] else self.http_port
            self.grpc_port = free_port(self.host) if self._auto_ports[1] else self.grpc_port
        serve.run(build(self.config), name=APP_NAME, route_prefix="/")
        self.wait_ready(self.ready_timeout_s)

    def _listening(self, port: int, timeout_s: float = BIND_WAIT_S) -> bool:
        """Whether something accepts connections on `port` of this host within `timeout_s` (Ray's proxies start
        asynchronously; one that failed to bind never does)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((host, port), timeout=2):
                    return True
            except OSError:
                time.sleep(0.2)
        return False

    def wait_ready(self, timeout_s: float) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(self.http_url + "/readyz", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {self.http_url} was not ready within {timeout_s:g}s")
            time.sleep(0.2)

    def serve_forever(self) -> None:
        """Block until SIGINT / SIGTERM (or `request_stop`)."""
        previous = {s: signal.signal(s, lambda *_: self._stop_event.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self._stop_event.wait(0.5):
                pass
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def request_stop(self) -> None:
        self._stop_event.set()

    def stop(self) -> None:
        if not self._running and not self._started_ray:
            return
        import ray

        try:
            if self._running:
                self._running = False
                # In a thread with a deadline: if Ray itself is already gone (a signal sent to the whole
                # process group), Serve's calls would wait for it forever.
                drain = threading.Thread(target=_drain_and_shutdown_serve, daemon=True)
                drain.start()
                drain.join(self.config.request_timeout_s + 60)
                if drain.is_alive():
                    print(
                        "premier serve: Serve did not stop in time (is Ray already gone?); shutting Ray down",
                        flush=True,
                    )
        finally:
            if self._started_ray:
                self._started_ray = False
                ray.shutdown()


def _drain_and_shutdown_serve() -> None:
    from ray import serve

    try:  # deleting the app first drains it: replicas finish in-flight requests, proxies keep answering
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()


__all__ = ["ServerSession", "free_port", "STORE_RESOURCE"]
