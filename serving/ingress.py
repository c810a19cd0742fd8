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
from collections.abc import AsyncIterator
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
    Progress,
    RequestError,
    busy,
    error_for,
)
from serving.users import UserDirectory

log = logging.getLogger("ray.serve")


READY_CACHE_S = 1.0  # how long a readiness answer is reused (probes and scrapes may come often)
READY_PROBE_S = 5.0
STREAM_START_S = 10.0  # a streamed response not started by then (its client left first) frees its slot


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
        self.metrics = ServeMetrics(fit_counts=self._fit_counts, fit_latencies=self._fit_latencies)
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
        admitted = await self.admit(params, protocol, client_timeout_s)
        if isinstance(admitted, RequestError):
            return admitted
        request, timeout_s = admitted
        response = None
        try:
            response = self.generator.generate.remote(request)
            result = await asyncio.wait_for(_awaited(response), timeout_s)
        except asyncio.CancelledError:  # the client went away: so does its request
            if response is not None:
                response.cancel()
            self.metrics.dropped.labels("disconnected").inc()
            raise
        except asyncio.TimeoutError:
            if response is not None:
                response.cancel()
            result = busy(f"generation took longer than {timeout_s:g}s; retry later")
        except Exception as e:
            result = self._lost(e)
        finally:
            self._release()
        return self._counted(result, protocol)

    async def stream_generation(
        self, params: GenerateParams, protocol: str
    ) -> RequestError | AsyncIterator[Progress | Outcome]:
        """Like `run_generation`, but the generator's progress events come first, the answer last.

        A refusal or invalid input is returned at once (the route answers it with its status); otherwise
        the events' iterator, whose closing (the client went away) cancels the request.
        """
        admitted = await self.admit(params, protocol, None)
        if isinstance(admitted, RequestError):
            return admitted
        request, timeout_s = admitted
        slot = {"held": True, "started": False}

        def abandon() -> None:  # a response whose streaming never started (client gone first) gives its slot back
            if not slot["started"] and slot["held"]:
                slot["held"] = False
                self._release()

        asyncio.get_running_loop().call_later(STREAM_START_S, abandon)

        async def events() -> AsyncIterator[Progress | Outcome]:
            slot["started"] = True
            if not slot["held"]:
                yield self._counted(busy("the stream started too late; retry"), protocol)
                return
            stream = None
            finished = False
            try:
                stream = self.generator.options(stream=True).generate_stream.remote(request)
                deadline = time.monotonic() + timeout_s
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    try:
                        event = await asyncio.wait_for(stream.__anext__(), remaining)
                    except StopAsyncIteration:
                        break
                    if isinstance(event, Progress):
                        yield event
                    else:
                        finished = True
                        yield self._counted(event, protocol)
                        return
                finished = True
                yield self._counted(RequestError(500, "the generator ended the stream without an answer"), protocol)
            except asyncio.TimeoutError:
                finished = True
                if stream is not None:
                    stream.cancel()
                yield self._counted(busy(f"generation took longer than {timeout_s:g}s; retry later"), protocol)
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as e:
                finished = True
                yield self._counted(self._lost(e), protocol)
            finally:
                if not finished:  # the client went away mid-stream: so does its request
                    if stream is not None:
                        stream.cancel()
                    self.metrics.dropped.labels("disconnected").inc()
                slot["held"] = False
                self._release()

        return events()

    async def admit(
        self, params: GenerateParams, protocol: str, client_timeout_s: float | None
    ) -> tuple[ImageRequest, float] | RequestError:
        """The valid request and its timeout, holding an admission slot (`_release` frees it), or the refusal."""
        try:
            info = await self.model_info(timeout_s=10.0)
        except Exception:  # not ready, whatever the reason
            return self._counted(busy("no generator replica is ready yet; retry later"), protocol)
        # Refuse first, before any work: under overload every refusal must cost next to nothing (a slot is
        # held while the request is validated, so validation cannot let more than the bound in).
        if self.admitted >= self.bound:
            return self._counted(
                busy(f"server busy: {self.admitted} requests queued or running (bound {self.bound}); retry later"),
                protocol,
            )
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
            return self._counted(prepared, protocol)
        timeout_s = self.config.request_timeout_s
        if client_timeout_s is not None:
            timeout_s = max(0.0, min(timeout_s, client_timeout_s))
        return dataclasses.replace(prepared, deadline=received_at + timeout_s), timeout_s

    def _lost(self, e: Exception) -> RequestError:
        """What a failure to reach a generator becomes (never the client's fault)."""
        if isinstance(e, BackPressureError):
            return busy("server busy: the generators' queues are full; retry later")
        if isinstance(e, RayActorError):
            log.warning("generator replica lost: %s", type(e).__name__)
            return busy("a generator replica was lost; retry (it is being replaced)")
        log.error("generation failed outside the generator", exc_info=e)
        return RequestError(500, "internal error; it has been logged")

    def _counted(self, result: Outcome, protocol: str) -> Outcome:
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

    def _fit_latencies(self) -> list[tuple[str, str, float]]:
        manager = self.fit_manager()
        return manager.latencies() if manager is not None else []

    def _fit_counts(self) -> dict[str, int] | None:
        manager = self.fit_manager()  # job state lives in the Jobs API: a new ingress still counts old jobs
        return manager.counts() if manager is not None else None


__all__ = ["Ingress", "api"]
