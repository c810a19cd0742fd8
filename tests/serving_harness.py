"""Start the `premier` Ray Serve application for a test module and stop everything it started.

    with serve_app({"max_batch_size": 8}) as server:
        requests.post(server.http_url + "/v1/generate", json={...}, headers=server.headers())
        tritonclient.grpc.InferenceServerClient(server.grpc_target)

A fresh local Ray (never an existing cluster: address='local') on free ports, `num_cpus=2`,
token auth off; Ray's dashboard (it hosts the Jobs API, i.e. fitting) only when asked, on a free
port. Overrides are ServeConfig fields, or a callable that gets the (not yet started) server and
returns them, for values that need its ports or folders (e.g. `server.dashboard_url`,
`server.store_dir`). The caller's PREMIER_SERVE_* environment is ignored. It is the same
`serving.server.ServerSession` that `premier serve` runs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from serving.config import ServeConfig, ServerOptions, build_config
from serving.server import ServerSession, free_port


class RunningServer:
    """What a test sees: addresses, the config, a stop method (idempotent)."""

    def __init__(self, store_dir: str, include_dashboard: bool):
        self.store_dir = store_dir
        self.dashboard_port = free_port() if include_dashboard else None
        self.config: ServeConfig | None = None
        self.session: ServerSession | None = None

    @property
    def http_port(self) -> int:
        return self.session.http_port  # picked by the session, again if taken before Ray bound it

    @property
    def grpc_port(self) -> int:
        return self.session.grpc_port

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def dashboard_url(self) -> str | None:
        return f"http://127.0.0.1:{self.dashboard_port}" if self.dashboard_port else None

    def headers(self) -> dict[str, str]:
        """The Authorization header for the configured API key (empty without one)."""
        return self.session.auth_headers() if self.session is not None else {}

    def stop(self) -> None:
        if self.session is not None:
            self.session.stop()


@contextlib.contextmanager
def serve_app(
    overrides: dict[str, Any] | Callable[[RunningServer], dict[str, Any]] | None = None,
    *,
    store_dir: str | os.PathLike | None = None,
    include_dashboard: bool = False,
    num_cpus: int = 2,
    ready_timeout_s: float = 240.0,
) -> Iterator[RunningServer]:
    """Start Ray + Serve + the app (store under `store_dir`, a fresh temp folder by default); stop all on exit."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    with contextlib.ExitStack() as stack:
        if store_dir is None:
            store_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="premier-serve-test-"))
        server = RunningServer(str(store_dir), include_dashboard)
        values = overrides(server) if callable(overrides) else dict(overrides or {})
        values.setdefault("store", os.path.join(str(store_dir), "store"))
        server.config = build_config(values, environ={})
        options = ServerOptions(host="127.0.0.1", http_port=0, grpc_port=0)
        server.session = ServerSession(
            server.config,
            options,
            dashboard=include_dashboard,
            num_cpus=num_cpus,
            dashboard_port=server.dashboard_port,
            ready_timeout_s=ready_timeout_s,
        )
        server.config = server.session.config  # as the session runs it (closed by default: see check_exposure)
        stack.enter_context(server.session)
        yield server


__all__ = ["serve_app", "RunningServer", "free_port"]
