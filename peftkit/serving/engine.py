"""Continuous batching over an :class:`~peftkit.serving.AdapterPool`: one thread owns the model and steps every
running request at once, whatever adapter each row uses.

The running batch is one left-padded, right-aligned KV cache (:class:`~peftkit.serving.batch.RaggedBatch`): a
length per row is all its attention mask needs. At each step boundary the engine

1. runs queued control commands (load / unload an adapter) on the model's own thread, so they never race a forward;
2. admits waiting requests (first come, first served) while the batch has room (``max_batch_size`` rows, at most
   ``max_loras`` distinct adapters): they are prefilled together, left-padded, then their caches are left-padded to
   the batch's length and concatenated onto it along the batch dimension;
3. otherwise runs one decode step for every running row: ``input_ids (B, 1)``, ``position_ids (B, 1)`` = each row's
   own length (so a row sees positions ``0..n-1`` exactly as when it runs alone), inside ``pool.rows(names)`` so
   that each row reads its own adapter's slot;
4. drops finished and cancelled rows (a client that went away frees its row here) and trims columns that became
   padding for every remaining row.

Padding is masked, so a row's logits match a lone run up to float rounding (masked columns add exact zeros, but
the reduction length differs); greedy outputs are equal. New requests are prefilled in their own forward while the
running rows wait one step (prefill first, as in vLLM's first scheduler), which bounds their time to first token.

Caches the engine cannot re-pad (anything but transformers' plain ``DynamicLayer``, e.g. the sliding-window layers
of Mistral or Gemma) are never merged: there, requests that arrive together are batched, and a later one waits
until the running batch drains.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from transformers import DynamicCache

from peftkit.core.layer import BASE_ADAPTER_NAME
from peftkit.serving.batch import RaggedBatch

__all__ = ["BatchEngine", "EngineStats", "GenerationRequest", "UnknownAdapterError"]

logger = logging.getLogger(__name__)

# Finish reasons beyond OpenAI's "stop" and "length".
CANCELLED, ERROR, SHUTDOWN = "cancelled", "error", "shutdown"


class _Pool(Protocol):
    """The part of :class:`peftkit.serving.AdapterPool` the engine calls, always from its own thread."""

    def load_adapter(self, name: str, path: str, *, replace: bool = False) -> None: ...
    def unload_adapter(self, name: str) -> None: ...
    def rows(self, adapter_names: list[str]) -> contextlib.AbstractContextManager: ...


class UnknownAdapterError(KeyError):
    """A request or command names an adapter that is not served (or is being unloaded)."""

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(name)
        self.name, self.available = name, available

    def __str__(self) -> str:
        return f"Adapter {self.name!r} is not loaded; available: {self.available}."


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to continue. The callbacks run on the engine thread and must be quick.

    Args:
        prompt_ids: The prompt's token ids (at least one).
        adapter: A served adapter name, or ``"__base__"`` for the bare base model.
        max_tokens: Tokens to generate at most (EOS included).
        temperature: 0 is greedy (argmax, as ``generate(do_sample=False)``); otherwise logits are divided by it.
        top_p: Nucleus sampling mass in ``(0, 1]``.
        seed: Seeds this request's own generator, so its samples do not depend on what it was batched with.
        ignore_eos: Keep generating past EOS (benchmarks, tests).
        on_token: Called with each generated token except EOS; returning True ends the request (a stop string).
        on_finish: Called once with the finish reason (``"stop"``, ``"length"``, ``"cancelled"``, ``"error"``,
            ``"shutdown"``) and the exception for ``"error"``.
    """

    prompt_ids: list[int]
    adapter: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    on_token: Callable[[int], bool] = lambda token: False
    on_finish: Callable[[str, BaseException | None], None] = lambda reason, error: None
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("GenerationRequest.prompt_ids is empty; pass at least one token.")
        if self.max_tokens < 1:
            raise ValueError(f"GenerationRequest.max_tokens must be >= 1, got {self.max_tokens}.")


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics: request counts and the adapters they use (``"__base__"`` excluded)."""

    running: int
    waiting: int
    running_adapters: frozenset[str]
    waiting_adapters: frozenset[str]
    served_adapters: int


class _Row:
    """A running request and its sampling generator (created on first use, seeded per request)."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.generator: torch.Generator | None = None
        self.done = False


class BatchEngine:
    """Runs generation requests for many adapters in one continuously batched decode loop on its own thread.

    Args:
        model: The causal LM the pool adapts (the pool's ``base_model``); only the engine thread calls it.
        pool: The :class:`~peftkit.serving.AdapterPool`; only the engine thread calls it.
        adapters: Adapters already in the pool, name → source (shown by ``/v1/models``).
        max_batch_size: Rows decoded together at most.
        max_loras: Distinct adapters in the running batch at most (default: the pool's ``max_loras`` slots).
        eos_token_ids: Tokens that end a request (not returned to ``on_token``); default: the model's
            ``generation_config.eos_token_id``, as ``generate`` uses.
        on_step: Called after every forward with ``(phase, rows, distinct adapters, seconds)``, phase ``"prefill"`` or
            ``"decode"``.

    Raises:
        ValueError: ``max_batch_size`` < 1.
    """

    def __init__(self, model: nn.Module, pool: _Pool, *, adapters: dict[str, str] | None = None,
                 max_batch_size: int = 16, max_loras: int | None = None, eos_token_ids: tuple[int, ...] | None = None,
                 on_step: Callable[[str, int, int, float], None] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        self.model, self.pool = model, pool
        self.max_batch_size = max_batch_size
        self.max_loras = max_loras if max_loras is not None else getattr(pool, "max_loras", None)
        if eos_token_ids is None:
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            eos_token_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
        self.eos_token_ids = frozenset(eos_token_ids)
        self.on_step = on_step
        self._served: dict[str, str] = dict(adapters or {})
        self._loading: set[str] = set()
        self._replacing: set[str] = set()
        self._draining: set[str] = set()
        self._cond = threading.Condition()
        self._waiting: deque[GenerationRequest] = deque()
        self._commands: list[tuple[Callable[[], bool], Future]] = []
        self._running: list[GenerationRequest] = []  # mirror of the batch's rows, read by stats() under the lock
        self._batch: RaggedBatch[_Row] | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed past_key_values to cache (the old name is deprecated until 5.40).
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._positions = "position_ids" in params

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (a daemon: a crashed server process never hangs on it)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="peftkit-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish every request with ``"shutdown"`` and join the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- called from other threads -------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, str]:
        """Servable adapters, name → source; an adapter being unloaded is already gone from here."""
        with self._cond:
            return {k: v for k, v in self._served.items() if k not in self._draining}

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it joins the running batch at the next step boundary.

        Raises:
            UnknownAdapterError: its adapter is not served or is being unloaded (checked atomically with unloads, so a
                queued request keeps its adapter until it finishes).
            RuntimeError: the engine is stopped.
        """
        with self._cond:
            if self._stop:
                raise RuntimeError("The engine is shut down.")
            name = request.adapter
            if name != BASE_ADAPTER_NAME and (name not in self._served or name in self._draining):
                raise UnknownAdapterError(name, sorted(set(self._served) - self._draining))
            self._waiting.append(request)
            self._cond.notify_all()

    def cancel(self, request: GenerationRequest) -> None:
        """Drop a request (its client went away); it leaves the batch at the next step boundary."""
        with self._cond:
            request.cancelled = True
            self._cond.notify_all()

    def load_adapter(self, name: str, path: str, replace: bool = False) -> Future:
        """Load an adapter between steps; the future raises what ``pool.load_adapter`` raised (the pool unchanged).

        ``replace=True`` swaps the weights of a served adapter: its queued requests wait, its running ones finish
        on the old weights, then the new weights go into its slot in place.

        Raises:
            ValueError: the name is taken (and ``replace`` is False) or is the reserved ``"__base__"``.
            UnknownAdapterError: ``replace`` of an adapter that is not served.
        """
        with self._cond:
            busy = name in self._loading or name in self._replacing
            if name == BASE_ADAPTER_NAME or busy or (name in self._served and not replace):
                raise ValueError(f"Adapter {name!r} is already loaded; unload it first, or replace it in place.")
            if replace and (name not in self._served or name in self._draining):
                raise UnknownAdapterError(name, sorted(set(self._served) - self._draining))
            (self._replacing if replace else self._loading).add(name)  # new: reserved, not servable until loaded

        def run() -> bool:
            if replace:
                with self._cond:
                    if any(r.adapter == name for r in self._running):
                        return False  # retried at the next boundary; admission holds its new requests meanwhile
            try:
                self.pool.load_adapter(name, path, replace=replace)
                with self._cond:
                    self._served[name] = path
            finally:
                with self._cond:
                    (self._replacing if replace else self._loading).discard(name)
            return True

        return self._command(run)

    def unload_adapter(self, name: str) -> Future:
        """Stop accepting requests for ``name`` now, unload it once its queued and running requests are done.

        Raises:
            UnknownAdapterError: it is not served.
        """
        with self._cond:
            if name not in self._served or name in self._draining:
                raise UnknownAdapterError(name, sorted(set(self._served) - self._draining))
            self._draining.add(name)

        def run() -> bool:
            with self._cond:
                if any(r.adapter == name for r in self._running) or any(r.adapter == name for r in self._waiting):
                    return False  # still in use: retried at the next boundary
            try:
                self.pool.unload_adapter(name)
            finally:
                with self._cond:
                    self._draining.discard(name)
                    self._served.pop(name, None)
            return True

        return self._command(run)

    def stats(self) -> EngineStats:
        """Counts for ``/metrics``."""
        with self._cond:
            return EngineStats(
                running=len(self._running), waiting=len(self._waiting),
                running_adapters=frozenset(r.adapter for r in self._running) - {BASE_ADAPTER_NAME},
                waiting_adapters=frozenset(r.adapter for r in self._waiting) - {BASE_ADAPTER_NAME},
                served_adapters=len(self._served) - len(self._draining))

    def _command(self, run: Callable[[], bool]) -> Future:
        future: Future = Future()
        with self._cond:
            if self._stop:
                raise RuntimeError("The engine is shut down.")
            self._commands.append((run, future))
            self._cond.notify_all()
        return future

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stop or self._waiting or self._commands or self._batch):
                        self._cond.wait()
                    if self._stop:
                        break
                    commands, admitted = list(self._commands), self._admit()
                try:
                    self._run_commands(commands)
                    self._step(admitted)
                    self._retire()
                except Exception as exc:  # a bug, not a bad request: fail what is in flight, keep serving
                    rows = [r.request for r in self._batch.rows] if self._batch else []
                    self._batch = None
                    self._fail(admitted + rows, exc)
        self._shutdown()

    def _step(self, admitted: list[GenerationRequest]) -> None:
        """Prefill the admitted requests, else decode the batch; a failure fails those rows only."""
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as exc:  # e.g. a prompt the model cannot take: the running rows are untouched
                self._fail(admitted, exc)
        elif self._batch is not None:
            try:
                self._decode()
            except Exception as exc:
                rows, self._batch = [r.request for r in self._batch.rows], None  # its cache may be half-updated
                self._fail(rows, exc)

    def _fail(self, requests: list[GenerationRequest], error: Exception) -> None:
        logger.error("Generation step failed; failing its %d request(s)", len(requests), exc_info=error)
        for request in requests:
            self._finish(request, ERROR, error)
        with self._cond:
            self._running = [r for r in self._running if r.finish_reason is None]

    def _run_commands(self, commands: list[tuple[Callable[[], bool], Future]]) -> None:
        for run, future in commands:
            try:
                done = run()
            except Exception as exc:  # reported to the caller through the future
                done = True
                future.set_exception(exc)
            else:
                if done:
                    future.set_result(None)
            if done:
                with self._cond:
                    self._commands.remove((run, future))

    def _admit(self) -> list[GenerationRequest]:
        """Pop the waiting requests that fit the batch, in arrival order (called under the lock).

        When the oldest request does not fit (its adapter would exceed ``max_loras``), nothing more is admitted, so
        the batch drains and that adapter gets its turn instead of waiting behind a stream of newer requests.
        """
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._finish(request, CANCELLED)
        if self._batch is not None and not self._batch.mergeable:
            return []
        rows = len(self._batch.rows) if self._batch else 0
        in_use = {r.request.adapter for r in self._batch.rows} if self._batch else set()
        admitted: list[GenerationRequest] = []
        for request in self._waiting:
            if rows + len(admitted) >= self.max_batch_size:
                break
            if request.adapter in self._replacing:
                continue  # admitted once its new weights are in
            names = (in_use | {request.adapter}) - {BASE_ADAPTER_NAME}
            if self.max_loras is not None and len(names) > self.max_loras:
                break
            in_use.add(request.adapter)
            admitted.append(request)
        for request in admitted:
            self._waiting.remove(request)
        self._running.extend(admitted)
        return admitted

    def _forward(self, names: list[str], input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        """Last-position logits ``(B, V)`` in fp32; the cache grows in place."""
        kwargs = {"attention_mask": mask, self._cache_kw: cache, "use_cache": True, **self._extra}
        if self._positions:
            kwargs["position_ids"] = positions
        with self.pool.rows(names):
            logits = self.model(input_ids=input_ids, **kwargs).logits
        return logits[:, -1, :].float()

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        device = _device(self.model)
        started = time.perf_counter()
        lengths = torch.tensor([len(r.prompt_ids) for r in requests], device=device)
        width = int(lengths.max())
        ids = torch.zeros(len(requests), width, dtype=torch.long, device=device)  # pad id 0: masked anyway
        for i, request in enumerate(requests):
            ids[i, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids, device=device)
        mask = (torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        names = [r.adapter for r in requests]
        logits = self._forward(names, ids, mask, positions, cache)
        self._report("prefill", names, started)
        rows = [_Row(r) for r in requests]
        new = RaggedBatch(rows, cache, lengths, self._sample(rows, logits))
        if self._batch is None:
            self._batch = new
        else:
            self._batch.extend(new)
        self._emit(rows, new.next_ids.tolist())

    def _decode(self) -> None:
        batch = self._batch
        started = time.perf_counter()
        names = [r.request.adapter for r in batch.rows]
        logits = self._forward(names, batch.next_ids[:, None], batch.mask(1), batch.lengths[:, None], batch.cache)
        self._report("decode", names, started)
        batch.lengths = batch.lengths + 1
        batch.next_ids = self._sample(batch.rows, logits)
        self._emit(batch.rows, batch.next_ids.tolist())

    def _report(self, phase: str, names: list[str], started: float) -> None:
        if self.on_step is not None:
            self.on_step(phase, len(names), len(set(names)), time.perf_counter() - started)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Next token per row ``(B,)``: argmax for greedy rows, the row's own generator for sampled ones."""
        out = logits.argmax(-1)
        for i, row in enumerate(rows):
            request = row.request
            if request.temperature > 0:
                if row.generator is None:
                    row.generator = torch.Generator(device=logits.device)
                    if request.seed is None:
                        row.generator.seed()
                    else:
                        row.generator.manual_seed(request.seed)
                out[i] = _sample_top_p(logits[i] / request.temperature, request.top_p, row.generator)
        return out

    def _emit(self, rows: list[_Row], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens):
            request = row.request
            request.output_ids.append(token)
            if token in self.eos_token_ids and not request.ignore_eos:
                self._finish(request, "stop")
            else:
                try:
                    stop = request.on_token(token)
                except Exception as exc:  # a consumer bug fails its own request only
                    self._finish(request, ERROR, exc)
                    stop = False
                if stop:
                    self._finish(request, "stop")
                elif len(request.output_ids) >= request.max_tokens:
                    self._finish(request, "length")
            row.done = request.finish_reason is not None

    def _retire(self) -> None:
        """Drop finished and cancelled rows; trim columns that are padding for every remaining row."""
        batch = self._batch
        if batch is None:
            return
        for row in batch.rows:
            if row.request.cancelled and not row.done:
                self._finish(row.request, CANCELLED)
                row.done = True
        keep = [i for i, row in enumerate(batch.rows) if not row.done]
        if len(keep) == len(batch.rows):
            return
        with self._cond:
            self._running = [r.request for r in batch.rows if not r.done]
        if not keep:
            self._batch = None
            return
        batch.keep(keep)

    def _finish(self, request: GenerationRequest, reason: str, error: BaseException | None = None) -> None:
        if request.finish_reason is not None:
            return
        request.finish_reason = reason
        try:
            request.on_finish(reason, error)
        except Exception:
            logger.exception("on_finish callback failed")

    def _shutdown(self) -> None:
        with self._cond:
            pending = list(self._waiting) + [r.request for r in (self._batch.rows if self._batch else [])]
            self._waiting.clear()
            commands, self._commands = self._commands, []
            self._running = []
        self._batch = None
        for request in pending:
            self._finish(request, SHUTDOWN)
        for _, future in commands:
            future.set_exception(RuntimeError("The engine shut down before the command ran."))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sample_top_p(logits: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token from ``softmax(logits)`` restricted to the smallest set of tokens whose mass reaches ``top_p``."""
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep a token while the mass before it is below top_p, so the most likely token always stays.
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
        return order[choice[0]]
    return torch.multinomial(probs, 1, generator=generator)[0]

