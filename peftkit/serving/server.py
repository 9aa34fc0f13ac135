"""``peftkit serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over an adapter pool.

The app is thin: it validates requests, turns text into token ids and back, and hands
:class:`~peftkit.serving.engine.GenerationRequest` objects to the :class:`~peftkit.serving.engine.BatchEngine`,
whose thread owns the model and batches every running request, whatever its adapter. ``model`` in a request names
an adapter, or the base model's served name. Routes follow OpenAI's and vLLM's names so that their clients work:

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream`` as server-sent events, ending in ``[DONE]``);
- ``GET /v1/models``; ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``;
- ``GET /metrics`` (Prometheus), ``GET /health``.

Errors are OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``): 400 names the offending field,
404 lists the served models. A request can fail; the server does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftkit.core.layer import BASE_ADAPTER_NAME
from peftkit.serving.engine import BatchEngine, GenerationRequest, UnknownAdapterError
from peftkit.serving.errors import AdapterInUseError, PoolFullError
from peftkit.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    SamplingRequest,
    TextStream,
    UnloadLoraRequest,
    validation_param,
)

__all__ = ["APIError", "create_app"]

logger = logging.getLogger(__name__)

_CLIENT_GONE = 499  # nginx's "client closed request", for the status label of streams cut short
_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _ClientGone(Exception):
    """The client of a non-streaming request disconnected."""


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class _Metrics:
    """Prometheus metrics in a registry of their own (several apps can live in one process, as in tests)."""

    def __init__(self, engine: BatchEngine) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("peftkit_requests", "Generation requests by model and HTTP status (499: the client "
                                "left)", ["model", "status"], registry=registry)
        self.prompt_tokens = Counter("peftkit_prompt_tokens", "Prompt tokens processed", ["model"], registry=registry)
        self.completion_tokens = Counter("peftkit_completion_tokens", "Tokens generated", ["model"],
                                         registry=registry)
        self.latency = Histogram("peftkit_request_latency_seconds", "End-to-end request latency", ["model"],
                                 registry=registry)
        self.first_token = Histogram("peftkit_time_to_first_token_seconds", "Time to first token", ["model"],
                                     registry=registry)
        self.rows = Histogram("peftkit_batch_rows", "Rows per model forward", ["phase"], buckets=_COUNTS,
                              registry=registry)
        self.adapters = Histogram("peftkit_batch_adapters", "Distinct adapters (base included) per model forward",
                                  ["phase"], buckets=_COUNTS, registry=registry)
        self.step = Histogram("peftkit_step_seconds", "Time per model forward", ["phase"], registry=registry)
        registry.register(_EngineGauges(engine))

    def on_step(self, phase: str, rows: int, adapters: int, seconds: float) -> None:
        self.rows.labels(phase).observe(rows)
        self.adapters.labels(phase).observe(adapters)
        self.step.labels(phase).observe(seconds)

    def record(self, model: str, status: int, seconds: float, prompt: int, completion: int,
               first_token: float | None) -> None:
        self.requests.labels(model, str(status)).inc()
        self.prompt_tokens.labels(model).inc(prompt)
        self.completion_tokens.labels(model).inc(completion)
        self.latency.labels(model).observe(seconds)
        if first_token is not None:
            self.first_token.labels(model).observe(first_token)

    def record_rejected(self, status: int) -> None:
        # Not labelled by the requested model: a client could fill the label set with made-up names.
        self.requests.labels("", str(status)).inc()


class _EngineGauges:
    """Gauges read from the engine at scrape time."""

    def __init__(self, engine: BatchEngine) -> None:
        self.engine = engine

    def describe(self) -> list:
        return []  # scrape-time values: nothing to check for duplicates at registration

    def collect(self) -> list[GaugeMetricFamily]:
        stats = self.engine.stats()
        values = {
            "peftkit_requests_running": ("Requests in the running batch", stats.running),
            "peftkit_requests_waiting": ("Requests queued for the batch", stats.waiting),
            "peftkit_adapters_running": ("Distinct adapters in the running batch", len(stats.running_adapters)),
            "peftkit_adapters_waiting": ("Distinct adapters of queued requests", len(stats.waiting_adapters)),
            "peftkit_adapters_loaded": ("Adapters served", stats.served_adapters),
        }
        families = [GaugeMetricFamily(name, doc, value=value) for name, (doc, value) in values.items()]
        pool_stats = getattr(self.engine.pool, "stats", None)  # slots, host cache, cold / warm loads, evictions
        for key, value in (pool_stats() if pool_stats else {}).items():
            if isinstance(value, (int, float)):
                families.append(GaugeMetricFamily(f"peftkit_pool_{key}", f"AdapterPool.stats()['{key}']",
                                                  value=value))
        return families


@dataclass
class _Call:
    """One HTTP generation request: its engine requests (one per prompt), their events, and its metrics."""

    model: str
    streams: list[TextStream]
    requests: list[GenerationRequest]
    queue: asyncio.Queue
    started: float = field(default_factory=time.perf_counter)
    finished: dict[int, tuple[str, BaseException | None]] = field(default_factory=dict)


class _Server:
    """State shared by the routes: the engine, the tokenizer, the base model's served name and the metrics."""

    def __init__(self, engine: BatchEngine, tokenizer: object, base_name: str, max_model_len: int | None,
                 vocab_size: int) -> None:
        self.engine, self.tokenizer, self.base_name = engine, tokenizer, base_name
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.metrics = _Metrics(engine)
        engine.on_step = self.metrics.on_step
        self.created = int(time.time())

    # ---- naming -------------------------------------------------------------------------------------------
    def adapter_for(self, model: str) -> str:
        if model in (self.base_name, BASE_ADAPTER_NAME):
            return BASE_ADAPTER_NAME
        if model in self.engine.adapters:
            return model
        raise self.not_found(model, "model")

    def not_found(self, name: str, param: str) -> APIError:
        available = [self.base_name, *sorted(self.engine.adapters)]
        return APIError(404, f"The model {name!r} does not exist. Available models: {', '.join(available)}.",
                        param=param, code="model_not_found")

    # ---- prompts ------------------------------------------------------------------------------------------
    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [self.tokenizer(prompt)["input_ids"]]
        elif prompt and isinstance(prompt[0], str):
            prompts = [self.tokenizer(p)["input_ids"] for p in prompt]
        elif prompt and isinstance(prompt[0], int):
            prompts = [list(prompt)]
        else:
            prompts = [list(p) for p in prompt]
        for ids in prompts:
            if not ids:
                raise APIError(400, "prompt: a prompt is empty (no tokens).", param="prompt")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}).",
                               param="prompt")
        if not prompts:
            raise APIError(400, "prompt: no prompt given.", param="prompt")
        return prompts

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "messages: the tokenizer has no chat template; use /v1/completions instead.",
                           param="messages")
        messages = [m.as_template_dict() for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises whatever the template's raise_exception says
            raise APIError(400, f"messages: the chat template refused them: {exc}", param="messages") from exc
        # The template writes BOS itself where the model wants one.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise APIError(400, "messages: the rendered prompt is empty.", param="messages")
        return ids

    def max_tokens(self, requested: int | None, default: int | None, prompts: list[list[int]], param: str) -> int:
        longest = max(len(p) for p in prompts)
        room = None if self.max_model_len is None else self.max_model_len - longest
        if room is not None and room < 1:
            raise APIError(400, f"{param}: the prompt has {longest} tokens; this model's maximum context length is "
                                f"{self.max_model_len}.", param=param)
        wanted = requested if requested is not None else (default if default is not None else room)
        if wanted is None:
            wanted = 16
        if room is not None and wanted > room:
            raise APIError(400, f"max_tokens: {wanted} tokens after a {longest}-token prompt exceed this model's "
                                f"maximum context length of {self.max_model_len}; ask for at most {room}.",
                           param="max_tokens")
        return wanted

    # ---- running a call -----------------------------------------------------------------------------------
    def start(self, model: str, adapter: str, prompts: list[list[int]], body: SamplingRequest,
              max_tokens: int) -> _Call:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def push(event: tuple) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is exiting
                loop.call_soon_threadsafe(queue.put_nowait, event)

        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        streams = [TextStream(i, self.tokenizer, stops, push, deltas=body.stream) for i in range(len(prompts))]
        requests = [GenerationRequest(ids, adapter, max_tokens, temperature=body.temperature, top_p=body.top_p,
                                      seed=body.seed, ignore_eos=body.ignore_eos, on_token=s.on_token,
                                      on_finish=s.on_finish) for ids, s in zip(prompts, streams)]
        try:
            for request in requests:
                self.engine.submit(request)
        except UnknownAdapterError as exc:  # unloaded between the name check and now
            self._cancel(requests)
            raise self.not_found(exc.name, "model") from exc
        except RuntimeError as exc:
            self._cancel(requests)
            raise APIError(503, str(exc), kind="server_error") from exc
        return _Call(model, streams, requests, queue)

    def _cancel(self, requests: list[GenerationRequest]) -> None:
        for request in requests:
            if request.finish_reason is None:
                self.engine.cancel(request)

    async def events(self, call: _Call, request: Request | None) -> AsyncIterator[tuple]:
        """The call's events until every prompt finished; with ``request``, also poll for a client that left.

        Polled only for non-streaming calls, which receive nothing but the finish events (sse-starlette watches
        streaming clients itself, and a second reader of the connection would steal its disconnect message).
        """
        while len(call.finished) < len(call.requests):
            try:
                event = await asyncio.wait_for(call.queue.get(), timeout=1.0 if request is not None else None)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise _ClientGone from None
                continue
            if event[0] == "finish":
                call.finished[event[1]] = (event[2], event[4])
            yield event

    def close(self, call: _Call, status: int) -> None:
        """Drop what is still running (a client that left frees its rows) and record the call's metrics."""
        self._cancel(call.requests)
        prompt = sum(len(r.prompt_ids) for r in call.requests)
        completion = sum(len(r.output_ids) for r in call.requests)
        firsts = [s.first_token_at for s in call.streams if s.first_token_at is not None]
        self.metrics.record(call.model, status, time.perf_counter() - call.started, prompt, completion,
                            min(firsts) - call.started if firsts else None)

    def usage(self, call: _Call) -> dict[str, int]:
        prompt = sum(len(r.prompt_ids) for r in call.requests)
        completion = sum(len(r.output_ids) for r in call.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def failure(self, call: _Call) -> APIError | None:
        reasons = [reason for reason, _ in call.finished.values()]
        errors = [error for _, error in call.finished.values() if error is not None]
        if errors:
            return APIError(500, f"Generation failed: {errors[0]}", kind="server_error")
        if "shutdown" in reasons:
            return APIError(503, "The server is shutting down.", kind="server_error")
        return None


def _choice(chat: bool, index: int, text: str | None, finish: str | None, *, chunk: bool) -> dict:
    if not chat:
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    if chunk:
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish}


async def _generate(server: _Server, request: Request, body: SamplingRequest, adapter: str,
                    prompts: list[list[int]], max_tokens: int, chat: bool) -> Response:
    call = server.start(body.model, adapter, prompts, body, max_tokens)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        return EventSourceResponse(_sse(server, call, head, chat, body), sep="\n", ping=15)
    status = _CLIENT_GONE
    try:
        async for _ in server.events(call, request):
            pass
        error = server.failure(call)
        status = error.status if error else 200
        if error:
            return error.response()
        choices = [_choice(chat, i, s.final_text, call.finished[i][0], chunk=False)
                   for i, s in enumerate(call.streams)]
        return JSONResponse({**head, "choices": choices, "usage": server.usage(call)})
    except _ClientGone:
        return Response(status_code=_CLIENT_GONE)  # nobody reads it
    finally:
        server.close(call, status)


async def _sse(server: _Server, call: _Call, head: dict, chat: bool, body: SamplingRequest) -> AsyncIterator[dict]:
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(**extra: object) -> dict:
        return {"data": json.dumps({**head, **extra})}

    # Set only once [DONE] went out: a stream cut short by the client (sse-starlette cancels this generator) or
    # by shutdown leaves 499, and close() frees its rows in the engine.
    status = _CLIENT_GONE
    try:
        if chat:
            yield chunk(choices=[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for i in range(len(call.requests))])
        async for event in server.events(call, None):
            if event[0] == "delta":
                yield chunk(choices=[_choice(chat, event[1], event[2], None, chunk=True)])
            elif event[2] in ("stop", "length"):
                if event[3]:
                    yield chunk(choices=[_choice(chat, event[1], event[3], None, chunk=True)])
                yield chunk(choices=[_choice(chat, event[1], None if chat else "", event[2], chunk=True)])
        error = server.failure(call)
        if error is not None:
            body_ = {"message": error.message, "type": error.kind, "param": None, "code": None}
            yield {"data": json.dumps({"error": body_})}
        elif body.stream_options is not None and body.stream_options.include_usage:
            yield chunk(choices=[], usage=server.usage(call))
        yield {"data": "[DONE]"}
        status = error.status if error else 200
    finally:
        server.close(call, status)


def create_app(engine: BatchEngine, tokenizer: object, *, base_name: str, max_model_len: int | None = None,
               vocab_size: int | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``; its lifespan starts the engine and stops it on shutdown.

    Args:
        engine: The batching engine over the pool (started here if it is not yet).
        tokenizer: A transformers tokenizer; its ``chat_template`` renders chat requests.
        base_name: The base model's name in ``/v1/models`` and in requests' ``model``.
        max_model_len: Prompt plus completion tokens at most; None for no check.
        vocab_size: Token ids accepted in token prompts (default ``len(tokenizer)``).
    """
    server = _Server(engine, tokenizer, base_name, max_model_len, vocab_size or len(tokenizer))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="peftkit", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        if request.url.path.endswith("completions"):
            server.metrics.record_rejected(exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI clients expect 400 with the field named, not FastAPI's 422 list.
        param, message = validation_param(exc.errors())
        return await api_error(request, APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind=kind).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unhandled error in %s", request.url.path)
        return await api_error(request, APIError(500, f"Internal error: {exc}", kind="server_error"))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        def card(name: str, root: str, parent: str | None) -> dict:
            return {"id": name, "object": "model", "created": server.created, "owned_by": "peftkit", "root": root,
                    "parent": parent}

        data = [card(base_name, base_name, None)]
        data += [card(name, source, base_name) for name, source in sorted(engine.adapters.items())]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        adapter = server.adapter_for(body.model)
        prompts = server.completion_prompts(body)
        max_tokens = server.max_tokens(body.max_tokens, 16, prompts, "prompt")
        return await _generate(server, request, body, adapter, prompts, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        adapter = server.adapter_for(body.model)
        prompts = [server.chat_prompt(body)]
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = server.max_tokens(requested, None, prompts, "messages")
        return await _generate(server, request, body, adapter, prompts, max_tokens, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest) -> Response:
        if body.lora_name in (base_name, BASE_ADAPTER_NAME):
            raise APIError(400, f"lora_name: {body.lora_name!r} is the base model's name.", param="lora_name")
        try:
            future = engine.load_adapter(body.lora_name, body.lora_path, replace=body.load_inplace)
        except UnknownAdapterError as exc:
            raise server.not_found(body.lora_name, "lora_name") from exc
        except ValueError as exc:
            raise APIError(400, f"lora_name: {exc}", param="lora_name") from exc
        try:
            await asyncio.wrap_future(future)
        except (ValueError, OSError, KeyError) as exc:  # peftkit's config / checkpoint errors are ValueErrors
            raise APIError(400, f"lora_path: cannot load {body.lora_path!r} as {body.lora_name!r}: {exc}",
                           param="lora_path") from exc
        except (PoolFullError, AdapterInUseError) as exc:
            raise APIError(409, str(exc), param="lora_name", code="adapter_busy") from exc
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest) -> Response:
        try:
            future = engine.unload_adapter(body.lora_name)
        except UnknownAdapterError as exc:
            raise server.not_found(body.lora_name, "lora_name") from exc
        await asyncio.wrap_future(future)  # waits for the adapter's running requests to finish
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run_server(app_factory: Callable[[], FastAPI], host: str, port: int, log_level: str = "info") -> None:
    """Serve with uvicorn until SIGINT / SIGTERM; open streams get a few seconds to finish."""
    import uvicorn

    uvicorn.run(app_factory(), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
