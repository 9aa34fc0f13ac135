"""The contract table: one row per (method, model) that every generic contract test runs over.

A new method adds rows here. ``config`` must make the adapter change the outputs at once (e.g. LoRA with
``init_lora_weights=False``) so equivalence checks are not vacuous; ``zero_init`` is the config whose fresh
adapter leaves the outputs unchanged, or None when the method has no such init.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from peftkit import AdaLoraConfig, LoraConfig, PeftConfig


@dataclass(frozen=True)
class MethodCase:
    id: str
    model: str
    config: Callable[[], PeftConfig]
    zero_init: Callable[[], PeftConfig] | None = None
    mergeable: bool = True
    mixed_batch: bool = True
    lr: float = 1e-2


def _lora(**kw) -> tuple[Callable[[], PeftConfig], Callable[[], PeftConfig]]:
    return (lambda: LoraConfig(init_lora_weights=False, **kw)), (lambda: LoraConfig(**kw))


def _adalora_case(case_id: str, model: str, **kw) -> MethodCase:
    # init_lora_weights=False keeps HF peft's standard-normal P, λ, Q (λ starts at zero otherwise); a small
    # lora_alpha keeps that delta small enough for the merge round trip's 1e-6 weight tolerance.
    return MethodCase(case_id, model, lambda: AdaLoraConfig(init_lora_weights=False, **kw),
                      lambda: AdaLoraConfig(**kw))


def _lora_case(case_id: str, model: str, **kw) -> MethodCase:
    config, zero = _lora(**kw)
    return MethodCase(case_id, model, config, zero)


METHOD_CASES: list[MethodCase] = [
    _lora_case("lora-gpt2-default-targets", "gpt2", r=4, lora_alpha=8),
    _lora_case("lora-gpt2-all-linear-dropout", "gpt2", r=4, target_modules="all-linear", lora_dropout=0.1),
    _lora_case("lora-bert-seqcls", "bert", r=4, task_type="SEQ_CLS"),
    _lora_case("lora-roberta-seqcls-rslora", "roberta", r=4, task_type="SEQ_CLS", use_rslora=True),
    _lora_case("lora-llama-qkvo-rank-pattern", "llama", r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
               rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 16}),
    _lora_case("lora-llama-embedding-and-mlp", "llama", r=4,
               target_modules=["embed_tokens", "gate_proj", "down_proj"]),
    _lora_case("lora-t5-default-targets", "t5", r=4),
    _lora_case("lora-opt-layers-to-transform", "opt", r=4, target_modules=["q_proj", "v_proj", "fc1"],
               layers_to_transform=[1]),
    _adalora_case("adalora-gpt2-default-targets", "gpt2", init_r=4, target_r=2, total_step=20, lora_alpha=2),
    _adalora_case("adalora-bert-seqcls-dropout", "bert", init_r=4, target_r=2, total_step=20, task_type="SEQ_CLS",
                  lora_alpha=2, lora_dropout=0.1),
]
