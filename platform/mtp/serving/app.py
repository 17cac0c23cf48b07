"""The Ray Serve application: ``ModelServer`` replicas behind an OpenAI-style ``Ingress``.

``ModelServer`` holds one engine, stepped on one engine thread while it has
work. Every request, streamed or not, is submitted to the engine's scheduler
and joins its running batch as a row frees (continuous batching), so a long
stream does not hold up other requests. ``Ingress`` owns HTTP: auth, body
limits, validation, fan-out of prompts x n, timeouts and error bodies.
``serve run serve/config.yaml`` uses ``build_app``.
"""

# No ``from __future__ import annotations`` here: FastAPI must see the real ``Request``
# annotation on the ingress methods, or it treats ``request`` as a query parameter.
import asyncio
import hmac
import logging
import os
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtp.decoding import Engine, Generation, RequestError, SamplingParams
from mtp.serving.card import model_card
from mtp.serving.config import API_KEY_ENV, ServeConfig
from mtp.serving.engine_thread import EngineRunner
from mtp.serving.metrics import EngineMetrics, IngressMetrics
from mtp.serving.protocol import (
    SSE_DONE,
    APIError,
    CompletionRequest,
    Usage,
    chunk_body,
    completion_body,
    new_completion_id,
    parse_completion_request,
    sse,
    stream_choice,
)
from mtp.tracking.registry import resolve_checkpoint

logger = logging.getLogger("ray.serve")

HEALTH_TIMEOUT_S = 10.0


PARAMS = {"max_new_tokens": "max_tokens"}  # engine field -> request field, where the names differ


def engine_error(exc: BaseException) -> APIError:
    """The engine rejects impossible requests with RequestError, naming the field (the client's
    fault); anything else is ours."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), PARAMS.get(exc.field, exc.field), code=exc.code)
    if isinstance(exc, ValueError):
        return APIError(400, f"the engine rejected the request: {exc}", code="invalid_value")
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error", code="engine_error")


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
class ModelServer:
    """One replica: the model, its tokenizer and the engine, whose continuous batch every request joins."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = ServeConfig.from_args(config)
        directory = resolve_checkpoint(self.cfg.model, self.cfg.tracking_uri)
        self.engine = Engine.from_checkpoint(str(directory), self.cfg.engine)
        warm_up_s = self.engine.warm_up()  # every step kind compiled now: no request waits for it
        logger.info("engine warmed up in %.1fs (%s)", warm_up_s, self.cfg.engine)
        self.card = model_card(self.cfg.served_name, str(self.cfg.model), directory, str(self.engine.device))
        self.runner = EngineRunner()
        self.metrics = EngineMetrics()
        self._driver: asyncio.Task | None = None

    def info(self) -> dict[str, Any]:
        """The model card plus which replica answered (a replaced replica gets a new id)."""
        return {**self.card, "replica": serve.get_replica_context().replica_id.unique_id}

    def check_health(self) -> None:
        """Serve replaces the replica when this raises: an engine step that never returns."""
        busy = self.runner.busy_for()
        if busy > self.cfg.stuck_after_s:
            raise RuntimeError(f"an engine step has been running for {busy:.0f}s (limit {self.cfg.stuck_after_s}s)")

    async def complete(self, prompt: str, params: SamplingParams) -> Generation:
        """One choice, decoded in the engine's running batch with every other request."""
        async with aclosing(self._events(prompt, params, stream=False)) as events:
            async for event in events:
                return event
        raise RuntimeError("the engine ended a request without a result")

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[str | Generation]:
        """Text deltas as the engine accepts tokens, then the final Generation."""
        async with aclosing(self._events(prompt, params, stream=True)) as events:
            async for event in events:
                yield event

    async def _events(self, prompt: str, params: SamplingParams, stream: bool) -> AsyncIterator[str | Generation]:
        """Submit one request to the engine's scheduler and relay what its listener hears.

        The listener runs on the engine thread and only hands events to this event
        loop. When the caller goes away (client disconnect, timeout), the request is
        cancelled and its row freed at the next step.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        try:  # the engine checks the request (context length included) before queueing it
            request = self.engine.submit(self.engine.tokenizer.encode(prompt), params, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e), stream)
        except ValueError as exc:
            raise engine_error(exc) from None
        self._drive()
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise engine_error(event)
                if isinstance(event, Generation):
                    self.metrics.record(event, params.speculative)
                yield event
                if isinstance(event, Generation):
                    return
        finally:
            request.cancel()

    def _drive(self) -> None:
        """Make sure one task is stepping the engine (on the engine thread) while it has work."""
        if self._driver is None or self._driver.done():
            self._driver = asyncio.ensure_future(self._step_while_busy())

    async def _step_while_busy(self) -> None:
        """Step the engine on its thread until it is idle. The idle check that ends this task
        runs on the event loop, like every submit, so a request submitted as the engine
        thread stops is seen here, or finds this task done and starts a new one."""
        if self.cfg.batch_wait_timeout_s:  # let requests arriving together share the first prefill
            await asyncio.sleep(self.cfg.batch_wait_timeout_s)
        while self.engine.has_work():
            try:
                await self.runner.run_until_idle(self.engine.step)
            except Exception as exc:  # noqa: BLE001 - the step's requests were failed; keep serving
                self.metrics.record_error(exc)
                logger.warning("an engine step failed; its requests got the error", exc_info=True)


# ----------------------------------------------------------------------------- ingress

api = FastAPI(title="mtp completions", docs_url=None, redoc_url=None)


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(error.body(), status_code=exc.status_code)


@api.middleware("http")
async def _count_requests(request: Request, call_next):
    """Request count and latency by route and status (streams: until the headers are sent)."""
    start = time.perf_counter()
    response = await call_next(request)
    metrics: IngressMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.record(request.url.path, response.status_code, time.perf_counter() - start)
    return response


def upstream_error(exc: BaseException) -> APIError:
    """Map what a handle call raised to what the client sees: never a hang, never a bare 500 page."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, APIError):
        exc = exc.cause
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, asyncio.TimeoutError):
        return APIError(504, "the request timed out", type="server_error", code="timeout")
    if isinstance(exc, (RayActorError, DeploymentUnavailableError, BackPressureError, RequestCancelledError)):
        return APIError(503, f"the model replica is unavailable ({type(exc).__name__}); retry", type="server_error",
                        code="unavailable")
    logger.warning("request failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    """A bug in this module still answers in the OpenAI error shape."""
    return JSONResponse(upstream_error(exc).body(), status_code=500)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (declared or streamed) with 413."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _cancel(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    """HTTP front: validates, fans each request out to ``ModelServer`` and shapes OpenAI responses."""

    def __init__(self, model: DeploymentHandle, config: dict[str, Any], api_key: str | None = None) -> None:
        self.model = model
        self.cfg = ServeConfig.from_args(config)
        self.api_key = api_key or None
        api.state.metrics = self.metrics = IngressMetrics()

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or invalid bearer token (Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")

    async def _call(self, response, timeout_s: float | None = None) -> Any:
        """Await a handle call with a deadline; whatever goes wrong becomes an APIError."""
        try:
            return await asyncio.wait_for(response, timeout_s or self.cfg.request_timeout_s)
        except Exception as exc:  # noqa: BLE001 - mapped to an HTTP error
            if isinstance(exc, asyncio.TimeoutError):
                response.cancel()
            raise upstream_error(exc) from None

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """Unauthenticated, for load balancers: 200 when a model replica answers."""
        try:
            card = await self._call(self.model.info.remote(), HEALTH_TIMEOUT_S)
        except APIError as error:
            return JSONResponse({"status": "unavailable", "error": error.message}, status_code=503)
        return JSONResponse({"status": "ok", "model": card["id"], "version": card["version"]})

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        card = await self._call(self.model.info.remote())
        return {"object": "list", "data": [card]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        body = await read_body(request, self.cfg.max_body_bytes)
        completion = parse_completion_request(body, self.cfg.max_tokens_cap, self.cfg.max_choices)
        if completion.model is not None and completion.model != self.cfg.served_name:
            raise APIError(404, f"model {completion.model!r} is not served here; this server has "
                           f"{self.cfg.served_name!r}", "model", code="model_not_found")
        if completion.stream:
            return await self._stream(completion)
        rows = completion.rows()
        generations = await self._call(asyncio.gather(*(self.model.complete.remote(p, s) for p, s in rows)))
        return completion_body(completion, self.cfg.served_name, generations, new_completion_id())

    async def _stream(self, completion: CompletionRequest) -> StreamingResponse:
        """SSE in OpenAI's chunk format; errors before the first chunk are still plain 4xx/5xx JSON."""
        rows = completion.rows()
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(i, p, s, queue)) for i, (p, s) in enumerate(rows)]
        deadline = asyncio.get_running_loop().time() + self.cfg.request_timeout_s
        started = time.perf_counter()

        async def next_event() -> tuple[int, Any]:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                return await asyncio.wait_for(queue.get(), max(remaining, 0.001))
            except asyncio.TimeoutError:
                return -1, APIError(504, "the request timed out", type="server_error", code="timeout")

        try:
            first = await next_event()
        except BaseException:
            _cancel(tasks)
            raise
        if isinstance(first[1], APIError):
            _cancel(tasks)
            raise first[1]

        completion_id, model = new_completion_id(), self.cfg.served_name

        async def events() -> AsyncIterator[str]:
            usage, done, event, text_seen = Usage(), 0, first, False
            try:
                while True:
                    index, item = event
                    if isinstance(item, APIError):
                        yield sse(item.body())
                        break
                    if isinstance(item, str):
                        if not text_seen:
                            text_seen = True
                            self.metrics.ttft.observe(time.perf_counter() - started)
                        yield sse(chunk_body(completion_id, model, [stream_choice(index, item)]))
                    else:
                        usage.add(item)
                        yield sse(chunk_body(completion_id, model, [stream_choice(index, "", item.finish_reason)]))
                        done += 1
                        if done == len(rows):
                            if completion.stream_options and completion.stream_options.include_usage:
                                yield sse(chunk_body(completion_id, model, [], usage.body(completion.speculative)))
                            break
                    event = await next_event()
                yield SSE_DONE
            finally:
                _cancel(tasks)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _pump(self, index: int, prompt: str, params: SamplingParams, queue: asyncio.Queue) -> None:
        """Forward one choice's stream into the shared queue; an error ends it with an APIError."""
        try:
            async for item in self.model.options(stream=True).stream.remote(prompt, params):
                await queue.put((index, item))
        except Exception as exc:  # noqa: BLE001 - becomes an error event for the client
            await queue.put((index, upstream_error(exc)))


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Application builder for ``serve run``/``serve deploy`` (``args`` from the config file).

    The API key is read here from ``MTP_SERVE_API_KEY`` (the shell of ``serve run``,
    or ``runtime_env.env_vars`` of the application) and handed to the ingress.
    """
    cfg = ServeConfig.from_args(args)
    # A default sized to the engine: its rows, plus three times as many waiting at the
    # replica to refill them as they finish. The deployment's max_ongoing_requests in
    # the Serve config, when given, wins over it.
    model = ModelServer.options(max_ongoing_requests=4 * cfg.engine.max_batch_size).bind(cfg.to_dict())
    return Ingress.bind(model, cfg.to_dict(), os.environ.get(API_KEY_ENV) or None)
