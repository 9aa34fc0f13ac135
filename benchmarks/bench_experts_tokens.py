"""Benchmark LoRA on MoE experts (``target_parameters``) and trainable tokens against Hugging Face ``peft``.

Experts: a random Mixtral (transformers 5 layout, 4 layers, 256 wide, 8 experts of 512, top-2, ``grouped_mm``),
batch 4 x 128, LoRA r=8 on ``gate_up_proj`` + ``down_proj``. HF's checkpoint is loaded into peftkit so both compute
the same function (the JSON records the logit difference). Timed interleaved (order rotating each round), median of
``--repeats`` rounds: eval forward (``inference_mode``) and a training step (fwd+bwd+AdamW), and the base model;
and, less noisy, one MoE block alone (eval forward; fwd+bwd into the adapters, the base block frozen).

Trainable tokens: a Llama with SmolLM2-135M's embedding (49152 x 576, tied) and one layer, resized by two tokens as
TRL does for a chat template; adapter file sizes for ``trainable_token_indices`` (rows only), the same plus the
matrices (``save_embedding_layers``, which ``"auto"`` picks after a resize), and ``modules_to_save`` of the
embedding (the alternative without trainable tokens); and the eval forward time of both libraries vs the base.

Run from the repo root::

    .venv/bin/python benchmarks/bench_experts_tokens.py              # ~2 min on 2 cores
    .venv/bin/python benchmarks/bench_experts_tokens.py --block-only --out /tmp/block.json  # one MoE block
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import peftkit


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for i in range(repeats):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            times[key].append(_time(fns[key]))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def bench_experts(repeats: int) -> dict[str, object]:
    import peft

    torch.manual_seed(0)
    base = MixtralForCausalLM(MixtralConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)).eval()
    kw = {"r": 8, "lora_alpha": 16, "target_modules": [], "target_parameters": ["gate_up_proj", "down_proj"],
          "init_lora_weights": False}
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), directory, is_trainable=True)
    ids = torch.randint(0, 1024, (4, 128), generator=torch.Generator().manual_seed(1))
    models = {"peftkit": ours, "hf": hf, "base": base}
    for m in models.values():
        m.eval()
    with torch.inference_mode():
        diff = (ours(ids).logits - hf(ids).logits).abs().max().item()

    def infer(model: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return model(ids).logits
        return run

    forward = _interleaved({k: infer(m) for k, m in models.items()}, repeats)
    steps = {}
    for key in ("peftkit", "hf"):
        model = models[key].train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        steps[key] = step
    train = _interleaved(steps, max(3, repeats // 2), warmup=1)
    return {"max_abs_logit_diff": diff, "forward_ms": forward, "train_step_ms": train,
            "forward_extra_ratio": (forward["peftkit"] - forward["base"]) / (forward["hf"] - forward["base"]),
            "train_ratio": train["peftkit"] / train["hf"]}


def bench_expert_block(repeats: int) -> dict[str, object]:
    """One MoE block of the same Mixtral on (4, 128, 256) hidden states: less noise than the whole model."""
    import peft

    torch.manual_seed(0)
    base = MixtralForCausalLM(MixtralConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)).eval()
    kw = {"r": 8, "lora_alpha": 16, "target_modules": [], "target_parameters": ["gate_up_proj", "down_proj"],
          "init_lora_weights": False}
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**kw))
    blocks = {"peftkit": ours.get_base_model().model.layers[0].mlp, "hf": hf.base_model.model.model.layers[0].mlp}
    hidden = torch.randn(4, 128, 256, generator=torch.Generator().manual_seed(1))

    def train(block: torch.nn.Module) -> Callable[[], object]:
        return lambda: block(hidden.clone().requires_grad_()).sum().backward()

    def infer(block: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return block(hidden)
        return run

    frozen = copy.deepcopy(base).requires_grad_(False).model.layers[0].mlp
    forward = _interleaved({**{k: infer(b) for k, b in blocks.items()}, "base": infer(frozen)}, repeats * 2)
    step = _interleaved({**{k: train(b) for k, b in blocks.items()}, "base": train(frozen)}, repeats * 2)
    return {"forward_ms": forward, "train_fwd_bwd_ms": step,
            "forward_extra_ratio": (forward["peftkit"] - forward["base"]) / (forward["hf"] - forward["base"]),
            "train_extra_ratio": (step["peftkit"] - step["base"]) / (step["hf"] - step["base"]),
            "train_ratio": step["peftkit"] / step["hf"]}


def bench_tokens(repeats: int) -> dict[str, object]:
    import peft

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    new = [49152, 49153]
    sizes = {}
    with tempfile.TemporaryDirectory() as directory:
        LlamaForCausalLM(config).save_pretrained(os.path.join(directory, "base"))

        def resized() -> torch.nn.Module:
            model = LlamaForCausalLM.from_pretrained(os.path.join(directory, "base")).eval()
            model.resize_token_embeddings(49154, mean_resizing=False)
            return model

        variants = {
            "rows_only": ({"trainable_token_indices": new}, False),
            "rows_plus_matrices_auto": ({"trainable_token_indices": new}, "auto"),
            "modules_to_save_embedding": ({"modules_to_save": ["embed_tokens"]}, False),
        }
        for name, (kw, save_embeddings) in variants.items():
            model = peftkit.get_peft_model(resized(), peftkit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                                         **kw))
            out = os.path.join(directory, name)
            model.save_pretrained(out, save_embedding_layers=save_embeddings)
            sizes[name] = os.path.getsize(os.path.join(out, "adapter_model.safetensors"))
        base = resized()
        ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.TrainableTokensConfig(token_indices=new)).eval()
        hf = peft.get_peft_model(copy.deepcopy(base), peft.TrainableTokensConfig(token_indices=new)).eval()
    ids = torch.randint(0, 49154, (4, 128), generator=torch.Generator().manual_seed(1))

    def infer(model: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return model(ids).logits
        return run

    forward = _interleaved({"peftkit": infer(ours), "hf": infer(hf), "base": infer(base)}, repeats)
    return {"adapter_file_bytes": sizes, "forward_ms": forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/experts_tokens.json")
    parser.add_argument("--block-only", action="store_true", help="only the single MoE block (~1 min)")
    args = parser.parse_args()
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
               "expert_block": bench_expert_block(args.repeats)}
    if not args.block_only:
        results.update(experts=bench_experts(args.repeats), tokens=bench_tokens(args.repeats))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
