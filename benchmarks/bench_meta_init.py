"""Time ``get_peft_model`` on a Llama-7B-shaped model on the meta device (no weights allocated), peftkit vs HF peft.

Method: for each repeat a fresh ``LlamaForCausalLM`` is built under ``torch.device("meta")`` (6.7 B parameters, no
storage; not timed), then ``get_peft_model`` with LoRA r=8 on q/k/v/o (128 layers wrapped) is timed with
``time.perf_counter``; peftkit and HF peft alternate within each round. Reported: median and min over rounds, and
the resident memory the process gained (``ru_maxrss``), which shows nothing of the 13 GB of bf16 weights was
allocated.

Run from the repo root::

    .venv/bin/python benchmarks/bench_meta_init.py            # 7 rounds, ~20 s
    .venv/bin/python benchmarks/bench_meta_init.py --repeats 3
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _meta_llama() -> torch.nn.Module:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA_7B))


def _peftkit(model: torch.nn.Module) -> torch.nn.Module:
    from peftkit import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, target_modules=TARGETS))


def _hf_peft(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, target_modules=TARGETS))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    variants = {"peftkit": _peftkit}
    try:
        import peft  # noqa: F401

        variants["hf peft"] = _hf_peft
    except ImportError:
        pass
    for run in variants.values():  # warm-up: imports, first-call caches
        run(_meta_llama())
    times: dict[str, list[float]] = {name: [] for name in variants}
    build: list[float] = []
    for i in range(args.repeats):
        order = list(variants.items())
        order = order[i % len(order):] + order[: i % len(order)]
        for name, run in order:
            start = time.perf_counter()
            model = _meta_llama()
            build.append(time.perf_counter() - start)
            start = time.perf_counter()
            model = run(model)
            times[name].append(time.perf_counter() - start)
            assert all(p.is_meta for p in model.parameters())
            del model
    rss_gain_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print(f"Llama-7B-shaped model on meta: build {statistics.median(build):.3f} s (median, not in the figures below)")
    for name, values in times.items():
        print(f"get_peft_model ({name}), LoRA r=8 on {'/'.join(TARGETS)}: median {statistics.median(values):.3f} s, "
              f"min {min(values):.3f} s over {len(values)} runs")
    print(f"peak resident memory gained: {rss_gain_mb:.0f} MB (the bf16 weights alone would be 13,000 MB)")


if __name__ == "__main__":
    main()
