"""``peftkit serve`` as users run it: a real subprocess on a free local port, queried over HTTP by concurrent clients.

A tiny random Llama (saved with ``save_pretrained``, with a WordLevel tokenizer built in code and a chat
template) and LoRA adapters of different ranks and targets are written to a temporary directory. Every greedy
answer of the server must equal what that adapter alone produces with ``PeftModel.from_pretrained(...).generate(
do_sample=False)``, whatever the requests it was batched with. A few engine tests run in-process for what HTTP
cannot pin down (a request joining a batch mid-decode, the ``max_loras`` limit, deferred unloads).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

for _module in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client", "httpx"):  # the `serve` extra
    pytest.importorskip(_module)

import httpx  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from peftkit import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftkit.serving import AdapterPool  # noqa: E402
from peftkit.serving.engine import BatchEngine, GenerationRequest  # noqa: E402

VOCAB = 64
BASE_NAME = "tiny-llama"
# Role words are vocabulary words, so a rendered chat prompt has no unknown tokens.
CHAT_TEMPLATE = ("<s> {% for m in messages %}{{ 'w10' if m['role'] == 'user' else 'w11' }} {{ m['content'] }} "
                 "{% endfor %}{% if add_generation_prompt %}w12{% endif %}")
PROMPTS = ["w4 w5 w9 w10", "w20 w21", "w33 w7 w7 w8 w40 w41", "w60", "w13 w14 w15 w16 w17"]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _llama(hidden: int = 32) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=2))


def _save_adapter(base: torch.nn.Module, path: Path, seed: int, **config: object) -> None:
    torch.manual_seed(seed)
    # B is random (init_lora_weights=False) and alpha large, so each adapter visibly changes the greedy output.
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(path)
    model.unload()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    base = _llama().eval()
    base.save_pretrained(root / "base")
    _tokenizer().save_pretrained(root / "base")
    _save_adapter(base, root / "a4", 4, r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    _save_adapter(base, root / "a8", 8, r=8, lora_alpha=64,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    _save_adapter(base, root / "late", 2, r=2, lora_alpha=16, target_modules=["o_proj", "down_proj"])
    _save_adapter(base, root / "r32", 32, r=32, lora_alpha=32, target_modules=["q_proj"])  # > --max-lora-rank
    torch.manual_seed(0)
    _save_adapter(_llama(hidden=48).eval(), root / "wide", 1, r=4, target_modules=["q_proj"])  # another base
    return root


MAX_NEW = 16  # references are generated once at this length; a shorter greedy answer is a prefix of it


class References:
    """Greedy continuations of one adapter alone (``None``: the base model), as HF-style ``generate`` gives them."""

    def __init__(self, root: Path) -> None:
        self.root, self.models, self.lock = root, {}, threading.Lock()
        self.tok = AutoTokenizer.from_pretrained(root / "base")
        self.cache: dict[tuple[str | None, tuple[int, ...]], list[int]] = {}

    def model(self, adapter: str | None) -> torch.nn.Module:
        if adapter not in self.models:
            base = AutoModelForCausalLM.from_pretrained(self.root / "base").eval()
            self.models[adapter] = base if adapter is None else PeftModel.from_pretrained(base, self.root / adapter)
        return self.models[adapter]

    def ids(self, adapter: str | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
        assert max_tokens <= MAX_NEW
        key = (adapter, tuple(prompt_ids))
        with self.lock, torch.no_grad():
            if key not in self.cache:
                ids = torch.tensor([prompt_ids])
                out = self.model(adapter).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                   max_new_tokens=MAX_NEW, pad_token_id=2)
                self.cache[key] = out[0, len(prompt_ids):].tolist()
        return self.cache[key][:max_tokens]

    def text(self, adapter: str | None, prompt_ids: list[int], max_tokens: int) -> str:
        return self.tok.decode(self.ids(adapter, prompt_ids, max_tokens), skip_special_tokens=True)

    def completion(self, adapter: str | None, prompt: str, max_tokens: int) -> str:
        return self.text(adapter, self.tok(prompt)["input_ids"], max_tokens)

    def chat(self, adapter: str | None, messages: list[dict], max_tokens: int) -> str:
        rendered = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.text(adapter, self.tok(rendered, add_special_tokens=False)["input_ids"], max_tokens)


@pytest.fixture(scope="module")
def refs(artifacts: Path) -> References:
    return References(artifacts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command() -> list[str]:
    script = Path(sys.executable).with_name("peftkit")  # the console script of this venv
    return [str(script)] if script.exists() else [sys.executable, "-m", "peftkit"]


class Server:
    """A ``peftkit serve`` subprocess; its output goes to a file shown when a test fails."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        args = ["serve", "--base-model", str(root / "base"), "--served-model-name", BASE_NAME,
                "--adapter", f"a4={root / 'a4'}", "--adapter", f"a8={root / 'a8'}", "--host", "127.0.0.1",
                "--port", str(self.port), "--max-loras", "4", "--max-lora-rank", "16", "--max-cpu-loras", "8",
                "--max-batch-size", "8", "--log-level", "info"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(_command() + args, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"peftkit serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"peftkit serve not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text()[-5000:]

    def metrics(self) -> str:
        return self.client.get("/metrics").text

    def stop(self) -> int | None:
        """SIGTERM, then wait; None if it had to be killed."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(artifacts: Path, refs: References) -> Server:
    started = Server(artifacts)
    try:
        # While the server imports and loads (seconds), compute the references the concurrent test needs.
        for adapter in (None, "a4", "a8"):
            for prompt in PROMPTS:
                refs.completion(adapter, prompt, MAX_NEW)
            refs.chat(adapter, [{"role": "user", "content": PROMPTS[2]}], MAX_NEW)
        started.wait_ready()
        yield started
    finally:
        started.stop()


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _stream(client: httpx.Client, path: str, body: dict) -> tuple[str, list[dict]]:
    """POST a streaming request; the text of choice 0 and every JSON event (``[DONE]`` checked to end it)."""
    events = []
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]" and "[DONE]" not in lines[:-1]
    events = [json.loads(line) for line in lines[:-1]]
    chat = events[0]["object"] == "chat.completion.chunk"
    text = "".join(c["delta"].get("content") or "" if chat else c["text"] for e in events for c in e["choices"])
    return text, events


# ---- the server, over HTTP ---------------------------------------------------------------------------------------
def test_models_lists_base_and_adapters(server: Server, artifacts: Path) -> None:
    data = server.client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [BASE_NAME, "a4", "a8"]
    assert data[0]["parent"] is None
    assert [(m["parent"], m["root"]) for m in data[1:]] == [(BASE_NAME, str(artifacts / n)) for n in ("a4", "a8")]


def test_concurrent_mixed_clients_match_single_adapter_generate(server: Server, refs: References) -> None:
    jobs = []
    for i in range(24):  # good requests: every adapter, both endpoints, streamed or not, several lengths
        adapter = [None, "a4", "a8"][i % 3]
        model = adapter or BASE_NAME
        prompt = PROMPTS[i % len(PROMPTS)]
        max_tokens = 4 + (i * 5) % 13
        stream = i % 4 == 1
        if i % 5 == 2:
            messages = [{"role": "user", "content": prompt}]
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
            jobs.append(("chat", body, stream, lambda a=adapter, m=messages, n=max_tokens: refs.chat(a, m, n)))
        else:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            jobs.append(("cmpl", body, stream, lambda a=adapter, p=prompt, n=max_tokens: refs.completion(a, p, n)))
    bad = [  # (body or raw bytes, path, status, param)
        ({"model": "nope", "prompt": "w4", "max_tokens": 2}, "/v1/completions", 404, "model"),
        ({"model": "a4", "prompt": "w4", "temperature": 5}, "/v1/completions", 400, "temperature"),
        (b'{"model": "a4", "prompt": ', "/v1/completions", 400, "body"),
        ({"model": "a4", "prompt": "w4", "max_token": 3}, "/v1/completions", 400, "max_token"),
        ({"model": "a8", "messages": [{"role": "wizard", "content": "w5"}]}, "/v1/chat/completions", 400,
         "messages[0].role"),
        ({"model": "a8", "messages": []}, "/v1/chat/completions", 400, "messages"),
        ({"model": "a4", "prompt": [999]}, "/v1/completions", 400, "prompt"),
        ({"model": "a4", "prompt": "w4", "max_tokens": 5000}, "/v1/completions", 400, "max_tokens"),
    ]

    def run_good(job: tuple) -> tuple[str, str]:
        kind, body, stream, _ = job
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        with httpx.Client(base_url=server.url, timeout=60) as client:
            if stream:
                return _stream(client, path, body)[0], body["model"]
            response = client.post(path, json=body)
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            return (choice["message"]["content"] if kind == "chat" else choice["text"]), body["model"]

    def run_bad(case: tuple) -> dict:
        body, path, status, _ = case
        with httpx.Client(base_url=server.url, timeout=60) as client:
            if isinstance(body, bytes):
                response = client.post(path, content=body, headers={"content-type": "application/json"})
            else:
                response = client.post(path, json=body)
        assert response.status_code == status, response.text
        return response.json()["error"]

    before = server.metrics()
    with ThreadPoolExecutor(8) as executor:  # 8 clients at once, bad requests mixed in
        good = [executor.submit(run_good, job) for job in jobs]
        errors = [executor.submit(run_bad, case) for case in bad]
        answers = [f.result(timeout=120) for f in good]
        errors = [f.result(timeout=120) for f in errors]
    for job, (text, model) in zip(jobs, answers):
        assert text == job[3](), (job[0], job[1])
    assert len({text for text, _ in answers}) > 3  # the adapters do change the answers
    for case, error in zip(bad, errors):
        assert error["param"] == case[3] and set(error) == {"message", "type", "param", "code"}, error
    assert errors[0]["code"] == "model_not_found" and "a4" in errors[0]["message"] and "a8" in errors[0]["message"]

    def delta(name: str, **labels: str) -> float:
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    # A streamed response's last event can reach the client before the server's bookkeeping for it has run.
    for _ in range(400):  # up to 20 s
        after = server.metrics()
        served = {m: delta("peftkit_requests_total", model=m, status="200") for m in (BASE_NAME, "a4", "a8")}
        if sum(served.values()) >= len(jobs) and not _metric(after, "peftkit_requests_running"):
            break
        time.sleep(0.05)
    assert served == {BASE_NAME: 8, "a4": 8, "a8": 8}
    assert delta("peftkit_requests_total", status="400") == 7
    assert _metric(after, "peftkit_completion_tokens_total", model="a4") > 0
    # Requests of different adapters shared decode steps.
    steps = _metric(after, "peftkit_batch_rows_count", phase="decode")
    assert _metric(after, "peftkit_batch_rows_bucket", phase="decode", le="1.0") < steps
    assert _metric(after, "peftkit_batch_adapters_bucket", phase="decode", le="1.0") < steps
    assert _metric(after, "peftkit_requests_running") == 0


def test_streaming_format_and_usage(server: Server, refs: References) -> None:
    messages = [{"role": "user", "content": "w30 w31"}]
    body = {"model": "a8", "messages": messages, "max_tokens": 6, "temperature": 0,
            "stream_options": {"include_usage": True}}
    text, events = _stream(server.client, "/v1/chat/completions", body)
    assert text == refs.chat("a8", messages, 6)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    assert all(e["model"] == "a8" and e["id"] == events[0]["id"] for e in events)


def test_stop_string_cuts_the_answer(server: Server, refs: References) -> None:
    full = refs.completion("a4", PROMPTS[0], 10)
    words = full.split()
    stop = words[3]
    expected = full[:full.index(stop)]
    body = {"model": "a4", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0, "stop": [stop, "w999"]}
    choice = server.client.post("/v1/completions", json=body).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (expected, "stop")
    assert _stream(server.client, "/v1/completions", body)[0] == expected


def test_seeded_sampling_repeats(server: Server) -> None:
    body = {"model": "a8", "prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0.9, "top_p": 0.8, "seed": 7}
    with ThreadPoolExecutor(3) as executor:  # batched with each other: the seed still decides alone
        texts = list(executor.map(lambda _: server.client.post("/v1/completions", json=body).json(), range(3)))
    assert len({t["choices"][0]["text"] for t in texts}) == 1
    assert texts[0]["usage"]["completion_tokens"] <= 12


def test_load_and_unload_adapters_at_runtime(server: Server, refs: References, artifacts: Path) -> None:
    client = server.client
    ids = lambda: [m["id"] for m in client.get("/v1/models").json()["data"]]  # noqa: E731
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(artifacts / "late")})
    assert response.status_code == 200, response.text
    assert ids() == [BASE_NAME, "a4", "a8", "late"]
    body = {"model": "late", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == refs.completion(
        "late", PROMPTS[1], 8)

    for name, path, param in [("late", artifacts / "a4", "lora_name"),  # taken
                              ("wide", artifacts / "wide", "lora_path"),  # shapes of another base
                              ("r32", artifacts / "r32", "lora_path"),  # rank above --max-lora-rank
                              ("ghost", artifacts / "missing", "lora_path")]:
        response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    assert ids() == [BASE_NAME, "a4", "a8", "late"]  # unchanged
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "x"}).json()["error"]["param"] == "lora_path"

    # vLLM's load_inplace: new weights under the same name (here a8's).
    replace = {"lora_name": "late", "lora_path": str(artifacts / "a8"), "load_inplace": True}
    assert client.post("/v1/load_lora_adapter", json=replace).status_code == 200
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == refs.completion(
        "a8", PROMPTS[1], 8)

    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    assert ids() == [BASE_NAME, "a4", "a8"]
    assert client.post("/v1/completions", json=body).status_code == 404
    missing = client.post("/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "lora_name"
    assert _metric(server.metrics(), "peftkit_adapters_loaded") == 2


def test_client_disconnect_mid_stream_frees_its_row(server: Server) -> None:
    text = server.metrics()
    before = _metric(text, "peftkit_requests_total", model="a4", status="499")
    tokens_before = _metric(text, "peftkit_completion_tokens_total", model="a4")
    body = {"model": "a4", "prompt": PROMPTS[3], "max_tokens": 4000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        # Leaving the block closes the connection mid-stream, thousands of tokens early.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = server.metrics()
        if _metric(text, "peftkit_requests_total", model="a4", status="499") > before:
            break
        time.sleep(0.05)
    assert _metric(text, "peftkit_requests_total", model="a4", status="499") == before + 1
    assert _metric(text, "peftkit_completion_tokens_total", model="a4") - tokens_before < 4000
    while _metric(server.metrics(), "peftkit_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server.metrics(), "peftkit_requests_running") == 0
    assert time.monotonic() - started < 15

    # A non-streaming client that gives up is noticed too (the server polls for it while it waits).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=0.5)
    while _metric(server.metrics(), "peftkit_requests_total", model="a4", status="499") < before + 2:
        assert time.monotonic() < deadline, "the abandoned request still runs"
        time.sleep(0.05)
    assert server.client.get("/health").status_code == 200  # and the server is fine


def test_sigterm_stops_the_server(server: Server) -> None:
    # uvicorn shuts down gracefully, then re-raises the signal so that the exit status says SIGTERM.
    assert server.stop() in (0, -signal.SIGTERM), server.output()
    log = server.output()
    assert "Application shutdown complete" in log and "Traceback" not in log, log


# ---- the engine, in-process ----------------------------------------------------------------------------------
def _tiny_gpt2(root: Path) -> tuple[torch.nn.Module, dict[str, Path]]:
    torch.manual_seed(1)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=1)).eval()
    dirs = {}
    for name, r in (("g4", 4), ("g8", 8)):
        dirs[name] = root / name
        _save_adapter(base, dirs[name], r, r=r, lora_alpha=8 * r, target_modules=["c_attn", "c_proj", "c_fc"])
    return base, dirs


def _reference(base: torch.nn.Module, path: Path, prompt: list[int], n: int) -> list[int]:
    model = PeftModel.from_pretrained(base, path)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, pad_token_id=2)
    model.unload()
    return out[0, len(prompt):].tolist()


def _run(engine: BatchEngine, request: GenerationRequest, done: threading.Event) -> GenerationRequest:
    finish = request.on_finish

    def on_finish(reason: str, error: BaseException | None) -> None:
        finish(reason, error)
        done.set()

    request.on_finish = on_finish
    engine.submit(request)
    return request


def test_engine_request_joins_a_running_batch_mid_decode(tmp_path: Path) -> None:
    base, dirs = _tiny_gpt2(tmp_path)
    prompts = {"g4": [5, 6, 7, 8, 9, 10, 11], "g8": [20, 21]}
    expected = {name: _reference(base, dirs[name], prompts[name], 12) for name in dirs}
    pool = AdapterPool(base, max_loras=2, max_lora_rank=8)
    for name, path in dirs.items():
        pool.load_adapter(name, str(path))
    steps: list[tuple[str, int, int]] = []
    engine = BatchEngine(pool.base_model, pool, adapters={k: str(v) for k, v in dirs.items()}, max_batch_size=4,
                         max_loras=2, on_step=lambda phase, rows, adapters, s: steps.append((phase, rows, adapters)))
    engine.start()
    done = {name: threading.Event() for name in dirs}
    late = GenerationRequest(prompts["g8"], "g8", 12)

    def on_token(token: int) -> bool:  # engine thread: g8 arrives while g4 is 4 tokens into its decode
        if len(first.output_ids) == 4:
            _run(engine, late, done["g8"])
        return False

    first = _run(engine, GenerationRequest(prompts["g4"], "g4", 12, on_token=on_token), done["g4"])
    try:
        assert all(event.wait(30) for event in done.values())
    finally:
        engine.stop()
    assert first.output_ids == expected["g4"] and late.output_ids == expected["g8"]
    assert first.finish_reason == late.finish_reason == "length"
    assert ("decode", 2, 2) in steps  # both rows, two adapters, one forward
    assert engine.stats().running == 0


def test_engine_respects_max_loras_and_defers_unload(tmp_path: Path) -> None:
    base, dirs = _tiny_gpt2(tmp_path)
    pool = AdapterPool(base, max_loras=1, max_lora_rank=8)
    for name, path in dirs.items():
        pool.load_adapter(name, str(path))
    steps: list[tuple[str, int, int]] = []
    engine = BatchEngine(pool.base_model, pool, adapters={k: str(v) for k, v in dirs.items()}, max_batch_size=8,
                         max_loras=1, on_step=lambda phase, rows, adapters, s: steps.append((phase, rows, adapters)))
    names = ["g4", "g8", "g4", "__base__", "g8"]
    events = [threading.Event() for _ in names]
    requests = [_run(engine, GenerationRequest([5 + i, 6, 7], n, 6), e) for i, (n, e) in enumerate(zip(names, events))]
    unloaded = engine.unload_adapter("g8")  # g8 requests are queued: it waits for them
    assert "g8" not in engine.adapters
    engine.start()
    try:
        assert all(e.wait(30) for e in events)
        unloaded.result(timeout=30)
    finally:
        engine.stop()
    assert [r.finish_reason for r in requests] == ["length"] * 5
    assert all(adapters <= 2 for _, _, adapters in steps)  # one adapter (plus base rows) per forward
    assert pool.adapters == ["g4"]


class _FlakyPool:
    """The real pool, except that the first batch it is asked for raises (a stand-in for any failing step)."""

    def __init__(self, pool: AdapterPool) -> None:
        self.pool, self.failures = pool, 1

    def rows(self, names: list[str]) -> object:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("boom")
        return self.pool.rows(names)

    def __getattr__(self, name: str) -> object:
        return getattr(self.pool, name)


def test_engine_survives_a_failing_step(tmp_path: Path) -> None:
    base, dirs = _tiny_gpt2(tmp_path)
    expected = _reference(base, dirs["g4"], [5, 6, 7], 5)
    pool = AdapterPool(base, max_loras=2, max_lora_rank=8)
    pool.load_adapter("g4", str(dirs["g4"]))
    engine = BatchEngine(pool.base_model, _FlakyPool(pool), adapters={"g4": str(dirs["g4"])})
    engine.start()
    try:
        failed, fine = threading.Event(), threading.Event()
        first = _run(engine, GenerationRequest([5, 6, 7], "g4", 5), failed)
        assert failed.wait(30)
        second = _run(engine, GenerationRequest([5, 6, 7], "g4", 5), fine)
        assert fine.wait(30)
    finally:
        engine.stop()
    assert first.finish_reason == "error"
    assert (second.finish_reason, second.output_ids) == ("length", expected)


def test_engine_sliding_window_cache_batches_arrivals_together(tmp_path: Path) -> None:
    # A sliding-window cache drops columns once its window is full, so it cannot be re-padded: requests that arrive
    # together share the batch, a later one waits for it to drain, and every answer still equals generate's.
    torch.manual_seed(0)
    base = MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=6, bos_token_id=0, eos_token_id=1,
        pad_token_id=2)).eval()
    _save_adapter(base, tmp_path / "m4", 4, r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21], [22, 23, 24]]
    expected = [_reference(base, tmp_path / "m4", p, 10) for p in prompts]
    pool = AdapterPool(base, max_loras=2, max_lora_rank=8)
    pool.load_adapter("m4", str(tmp_path / "m4"))
    steps: list[tuple[str, int]] = []
    engine = BatchEngine(pool.base_model, pool, adapters={"m4": "m4"},
                         on_step=lambda phase, rows, adapters, s: steps.append((phase, rows)))
    events = [threading.Event() for _ in prompts]
    requests = [_run(engine, GenerationRequest(p, "m4", 10), e) for p, e in zip(prompts[:2], events)]
    engine.start()
    try:
        while not steps:
            time.sleep(0.001)
        requests.append(_run(engine, GenerationRequest(prompts[2], "m4", 10), events[2]))
        assert all(e.wait(30) for e in events)
    finally:
        engine.stop()
    assert [r.output_ids for r in requests] == expected
    assert steps[0] == ("prefill", 2) and max(rows for _, rows in steps) == 2


def test_cli_rejects_a_malformed_adapter_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from peftkit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--base-model", "x", "--adapter", "no-equals-sign"])
    assert exit_info.value.code == 2
    assert "NAME=DIR_OR_HUB_ID" in capsys.readouterr().err



def test_cli_refuses_to_start_with_an_adapter_that_does_not_fit(artifacts: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from peftkit.cli import main

    args = ["serve", "--base-model", str(artifacts / "base"), "--adapter", f"wide={artifacts / 'wide'}"]
    assert main(args) == 1  # before listening: nothing to serve a broken deployment with
    assert "adapter 'wide'" in capsys.readouterr().err
