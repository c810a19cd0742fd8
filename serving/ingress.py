"""The ingress deployment: every front end's one way in, and the only serving process that opens the user store.

It authenticates, validates each generation request against the model's limits (defaults,
sizes, steps, guidance, prompt and its token count with the model's own tokenizer, from a
generator's `ModelInfo`: it loads no model), resolves the user (serving/users.py; it runs on the
Ray head, the store's node) and answers a failed lookup itself; it admits at most a bounded number
of generation requests (above the bound it answers 503 with Retry-After at once, never letting a
request time out in a queue) and sends a valid `ImageRequest` to the Generator deployment, which
batches across users. It records metrics, serves user reads and DELETE, and submits fit jobs to a
stateless FitJobManager (state lives in the Ray Jobs API and the store).

The routes live in one module per surface: serving/api_v1.py (/v1 generation, health, metrics),
serving/api_users.py (users and fit jobs), serving/api_kserve.py (KServe v2 over HTTP), each on
the app of serving/http_api.py; serving/grpc_kserve.py holds the KServe v2 gRPC methods (a mixin:
Ray Serve's gRPC proxy calls them on this class by RPC name).
"""

import asyncio
import dataclasses
import logging
import random
import time
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

import serving.api_kserve  # noqa: F401 - registers the /v2 routes on `api`
import serving.api_users  # noqa: F401 - registers the users and fit routes
import serving.api_v1  # noqa: F401 - registers /v1, health and metrics
from premier.requests import GenerationRequest, GenerationSettings, check_prompt_tokens
from serving.config import ServeConfig
from serving.fitting import FitJobManager
from serving.grpc_kserve import KServeGRPC
from serving.http_api import api
from serving.metrics import ServeMetrics
from serving.protocol import (
    REQUEST_ERRORS,
    GenerateParams,
    ImageRequest,
    ImageResult,
    ModelInfo,
    Outcome,
    RequestError,
    busy,
    error_for,
)
from serving.users import UserDirectory

log = logging.getLogger("ray.serve")


READY_CACHE_S = 1.0  # how long a readiness answer is reused (probes and scrapes may come often)
READY_PROBE_S = 5.0


async def _awaited(response: Any) -> Any:
    return await response


def _running_generators() -> int:
    """Generator replicas in the RUNNING state, as Serve's controller reports them."""
    from serving.config import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    deployment = app.deployments.get("Generator") if app is not None else None
    return int(deployment.replica_states.get("RUNNING", 0)) if deployment is not None else 0


@serve.deployment
@serve.ingress(api)
class Ingress(KServeGRPC):
    def __init__(self, generator: Any, args: dict[str, Any]):
        from serving import auth

        self.config = ServeConfig.model_validate(args)
        self.generator = generator
        auth.set_key(self.config.api_key.get_secret_value() if self.config.api_key else None, self.config.public_docs)
        self.admitted = 0
        self.bound = self.config.admission_bound
        self.metrics = ServeMetrics(fit_counts=self._fit_counts)
        self.users = UserDirectory(self.config)
        self.users.prepare()  # here, not where the app is built: only the store's node opens it
        self._fit: FitJobManager | None = None
        self._fit_error: str | None = None
        self._info: ModelInfo | None = None
        self._ready, self._ready_checked = False, -1e9

    # ------------------------------------------------------------------ the model, as a generator describes it
    async def model_info(self, timeout_s: float = 30.0) -> ModelInfo:
        if self._info is None:
            self._info = await asyncio.wait_for(self.generator.info.remote(), timeout_s)
        return self._info

    async def is_ready(self) -> bool:
        """Live: a generator replica is RUNNING now (Serve's controller says so; asked at most once a second)
        and one has described the model. Losing the last replica turns this false within seconds."""
        now = time.monotonic()
        if now - self._ready_checked < READY_CACHE_S:
            return self._ready
        try:
            running = await asyncio.wait_for(asyncio.to_thread(_running_generators), READY_PROBE_S)
            ready = running > 0
            if ready:
                await self.model_info(timeout_s=5.0)
        except Exception:  # not ready, whatever the reason
            ready = False
        self._ready, self._ready_checked = ready, time.monotonic()
        return ready

    # ------------------------------------------------------------------ generation, for every protocol
    async def run_generation(
        self, params: GenerateParams, protocol: str, client_timeout_s: float | None = None
    ) -> Outcome:
        """Validate, resolve the user, admit (or refuse at once) and forward to a generator. Never raises
        (but a cancelled caller, a client that went away, cancels the generator's request too).

        The request's deadline is the server's `request_timeout_s` or the client's own (gRPC), if sooner.
        """
        try:
            info = await self.model_info(timeout_s=10.0)
        except Exception:  # not ready, whatever the reason
            result: Outcome = busy("no generator replica is ready yet; retry later")
            self.metrics.refused(protocol, result.status)
            return result
        # Refuse first, before any work: under overload every refusal must cost next to nothing (a slot is
        # held while the request is validated, so validation cannot let more than the bound in).
        if self.admitted >= self.bound:
            result = busy(f"server busy: {self.admitted} requests queued or running (bound {self.bound}); retry later")
            self.metrics.refused(protocol, result.status)
            return result
        self.admitted += 1
        self.metrics.queue_depth.set(self.admitted)
        received_at = time.time()
        try:
            if params.user_id:  # a store lookup may touch the disk: off the event loop
                prepared = await asyncio.to_thread(self.prepare_request, params, info, received_at)
            else:
                prepared = self.prepare_request(params, info, received_at)
        except BaseException:
            self._release()
            raise
        if isinstance(prepared, RequestError):
            self._release()
            self.metrics.refused(protocol, prepared.status)
            return prepared
        timeout_s = self.config.request_timeout_s
        if client_timeout_s is not None:
            timeout_s = max(0.0, min(timeout_s, client_timeout_s))
        prepared = dataclasses.replace(prepared, deadline=received_at + timeout_s)
        response = None
        try:
            response = self.generator.generate.remote(prepared)
            result = await asyncio.wait_for(_awaited(response), timeout_s)
        except asyncio.CancelledError:  # the client went away: so does its request
            if response is not None:
                response.cancel()
            self.metrics.dropped.labels("disconnected").inc()
            raise
        except BackPressureError:
            result = busy("server busy: the generators' queues are full; retry later")
        except RayActorError as e:
            log.warning("generator replica lost: %s", type(e).__name__)
            result = busy("a generator replica was lost; retry (it is being replaced)")
        except asyncio.TimeoutError:
            if response is not None:
                response.cancel()
            result = busy(f"generation took longer than {timeout_s:g}s; retry later")
        finally:
            self._release()
        if isinstance(result, RequestError):
            self.metrics.refused(protocol, result.status)
            if result.reason:
                self.metrics.dropped.labels(result.reason).inc()
        return result

    def _release(self) -> None:
        self.admitted -= 1
        self.metrics.queue_depth.set(self.admitted)

    def prepare_request(
        self, params: GenerateParams, info: ModelInfo, received_at: float
    ) -> ImageRequest | RequestError:
        """The checks in the order they always ran (settings, prompt and seed, token count, user), then the request."""
        p = info.profile
        d = info.default_settings()
        seed = random.randrange(2**31) if params.seed is None else params.seed
        try:
            settings = GenerationSettings(
                height=d.height if params.height is None else params.height,
                width=d.width if params.width is None else params.width,
                steps=d.steps if params.steps is None else params.steps,
                guidance=d.guidance if params.guidance is None else params.guidance,
            ).validate(p)
            GenerationRequest(params.prompt, None, seed).validate_basic()
            if info.tokenizer is not None:
                check_prompt_tokens(info.tokenizer, params.prompt, p.max_sequence_length)
            user, cache = self.users.resolve(params.user_id)
        except REQUEST_ERRORS as e:
            return error_for(e)
        return ImageRequest(
            prompt=params.prompt, seed=seed, settings=settings, user=user, user_cache=cache, received_at=received_at
        )

    def finish(self, result: ImageResult, protocol: str, started: float) -> dict[str, float]:
        """Final timings (end to end including encoding, server overhead) and the metrics of a success."""
        t = dict(result.timings)
        t["end_to_end_s"] = time.perf_counter() - started
        t["server_overhead_s"] = max(0.0, t["end_to_end_s"] - t["pipeline_s"])
        t["batch_size"] = result.batch_size
        self.metrics.observe(protocol, result, t["end_to_end_s"])
        return t

    def retry_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.config.retry_after_s)}

    def headers_for(self, error: RequestError) -> dict[str, str] | None:
        return self.retry_headers() if error.retryable else None

    # ------------------------------------------------------------------ users and fitting
    def store(self):
        return self.users.store()

    def check_health(self) -> None:
        """Ray Serve calls this periodically: a store that stopped answering is reopened on next use."""
        self.users.check()

    def fit_manager(self) -> FitJobManager | None:
        """The fit-job manager, or None (the reason in `_fit_error`) where fitting is not available; retried per call."""
        if self._fit is None:
            try:
                c = self.config
                self._fit = FitJobManager(
                    c.fitting,
                    store_path=c.store,
                    model=c.model,
                    checkpoint=c.checkpoint,
                    store_resource=c.store_resource,
                )
            except Exception as e:  # reported as 503 on the fit routes
                self._fit_error = f"fitting is not available: {e}"
        return self._fit

    def _fit_counts(self) -> dict[str, int] | None:
        manager = self.fit_manager()  # job state lives in the Jobs API: a new ingress still counts old jobs
        return manager.counts() if manager is not None else None


__all__ = ["Ingress", "api"]
