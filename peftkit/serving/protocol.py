"""The OpenAI wire format for ``peftkit serve``: request schemas, 400 messages that name the field, and the
incremental detokenizer that turns a request's tokens into text deltas and applies ``stop`` strings.

The schemas forbid unknown fields, so a typo (``max_token``) is a 400 that names it instead of a silent default.
Fields that OpenAI clients send by default but this server does not implement (``n``, penalties, ``logit_bias``,
``logprobs``, ``echo``) are accepted at their neutral value only.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "LoadLoraRequest",
    "SamplingRequest",
    "StreamOptions",
    "TextStream",
    "UnloadLoraRequest",
    "validation_param",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class SamplingRequest(_Strict):
    """Fields shared by completions and chat completions (OpenAI's names and defaults).

    ``temperature`` 0 is greedy decoding, equal to ``generate(do_sample=False)``; ``seed`` makes sampling
    reproducible whatever the request is batched with; ``ignore_eos`` is vLLM's extension.
    """

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    ignore_eos: bool = False
    user: str | None = None
    n: Literal[1] = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported; leave it at 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported; leave it empty")
        return value


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings (one choice each) or token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: Literal[False] = False
    logprobs: Literal[0] | None = None
    suffix: None = None
    best_of: Literal[1] | None = None


class TextPart(_Strict):
    """A text part of a message's ``content`` list."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One chat message; list-form ``content`` is joined into one string for the chat template."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, str]:
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``: ``messages`` rendered by the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None
    top_logprobs: Literal[0] | None = None


class LoadLoraRequest(_Strict):
    """``POST /v1/load_lora_adapter`` (vLLM's route and fields): a directory or Hub id; ``load_inplace`` replaces
    the weights of a served adapter of that name."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadLoraRequest(_Strict):
    """``POST /v1/unload_lora_adapter``; vLLM's ``lora_int_id`` is accepted and ignored."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


# Union members and wrappers that pydantic puts in an error's location between field names.
_TAG = re.compile(r"^(str|int|float|bool|none|[A-Z]\w*)$|[\[(]")


def validation_param(errors: list[dict]) -> tuple[str, str]:
    """``(param, message)`` for the first of FastAPI's validation errors, e.g. ``("messages[0].role", ...)``."""
    error = errors[0]
    if error.get("type") == "json_invalid":
        return "body", f"Malformed JSON body: {error.get('ctx', {}).get('error', error['msg'])}."
    loc = list(error["loc"][1:] if error["loc"] and error["loc"][0] == "body" else error["loc"])
    tag = next((i for i, part in enumerate(loc) if isinstance(part, str) and _TAG.search(part)), None)
    more = len({tuple(e["loc"][:2]) for e in errors if e["loc"][:2] != error["loc"][:2]})
    extra = f" ({more} more problem(s) in other fields)" if more else ""
    if tag is not None:  # a union: every alternative failed, and the first one's message would mislead
        param = _path(loc[:tag])
        return param, f"{param}: {_short(error.get('input'))} matches none of the accepted types{extra}."
    param = _path(loc)
    if error.get("type") == "extra_forbidden":
        return param, f"{param}: unknown field; remove it (see the OpenAI API reference for the valid ones)."
    if error.get("type") == "missing":
        return param, f"{param}: field required."
    message = error["msg"].removeprefix("Value error, ")
    return param, f"{param}: {message} (got {_short(error.get('input'))}){extra}."


def _path(loc: list[str | int]) -> str:
    """``["messages", 0, "role"]`` → ``"messages[0].role"``; the request body itself is ``"body"``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class TextStream:
    """Detokenizes one request incrementally and applies its ``stop`` strings; runs on the engine thread.

    Text is decoded over a sliding window of ids (as TGI does), so a token that completes a multi-byte character
    or a word joins the text only when it decodes cleanly. Text that could be the start of a stop string is held
    back until it is known not to be one; text from a stop string on is dropped, as OpenAI does.

    Args:
        index: The choice index this stream feeds.
        tokenizer: A transformers tokenizer.
        stop: Stop strings.
        push: Thread-safe sink for ``("delta", index, text)`` and
            ``("finish", index, reason, last_text, error)`` events.
        deltas: Push deltas as they come (streaming); otherwise only the finish event, with all the text.
    """

    def __init__(self, index: int, tokenizer: object, stop: list[str], push: Callable[[tuple], None],
                 deltas: bool = True) -> None:
        self.index, self.tokenizer, self.stop, self.push, self.deltas = index, tokenizer, stop, push, deltas
        self.ids: list[int] = []
        self.text = ""  # decoded so far (after a stop string: cut at it)
        self.sent = 0  # characters of text already pushed
        self.stopped = False
        self.first_token_at: float | None = None
        self._prefix = self._read = 0
        self._longest_stop = max((len(s) for s in stop), default=0)

    @property
    def final_text(self) -> str:
        return self.text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def on_token(self, token: int) -> bool:
        """Add a token; True when a stop string appeared (the engine then ends the request)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):  # an incomplete character: wait for more
            return False
        self._prefix, self._read = self._read, len(self.ids)
        self.text += after[len(before):]
        if self._cut_at_stop(len(after) - len(before)):
            return True
        self._send(len(self.text) - self._held_back())
        return False

    def on_finish(self, reason: str, error: BaseException | None) -> None:
        if reason in ("stop", "length") and not self.stopped:
            full = self._decode(self.ids)  # the sliding window can leave an incomplete character behind
            if full.startswith(self.text):
                added = len(full) - len(self.text)
                self.text = full
                self._cut_at_stop(added)
        tail = self.text[self.sent:] if reason in ("stop", "length") else ""
        self.sent = len(self.text)
        self.push(("finish", self.index, reason, tail, error))

    def _cut_at_stop(self, added: int) -> bool:
        if not self.stop:
            return False
        start = max(0, len(self.text) - added - self._longest_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        self.stopped = True
        return True

    def _held_back(self) -> int:
        """Characters at the end of the text that begin some stop string."""
        for size in range(min(self._longest_stop - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0

    def _send(self, upto: int) -> None:
        if upto > self.sent and self.deltas:
            self.push(("delta", self.index, self.text[self.sent:upto]))
            self.sent = upto
