"""The contract table: one row per (method, model) that every generic contract test runs over.

A new method adds rows here. ``config`` must make the adapter change the outputs at once (e.g. LoRA with
``init_lora_weights=False``) so equivalence checks are not vacuous; ``zero_init`` is the config whose fresh
adapter leaves the outputs unchanged, or None when the method has no such init.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from peftkit import (
    AdaLoraConfig,
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    LoraConfig,
    ParallelAdapterConfig,
    PeftConfig,
)


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


def _ia3_case(case_id: str, model: str, lr: float = 0.1, **kw) -> MethodCase:
    # init_ia3_weights=False draws the vectors from N(0, 1) (HF peft), so every check sees a changed model. A few
    # hundred scales of order one need a larger rate than LoRA to move a random tiny model's loss.
    return MethodCase(case_id, model, lambda: IA3Config(init_ia3_weights=False, **kw), lambda: IA3Config(**kw),
                      lr=lr)


def _bitfit_case(case_id: str, model: str, **kw) -> MethodCase:
    # init_bitfit_weights=False adds N(0, 0.02²) to the copied biases; BitFit trains with large rates (paper: 1e-3
    # to 1e-4 where full fine-tuning uses 2e-5), and only a few thousand parameters move here.
    return MethodCase(case_id, model, lambda: BitFitConfig(init_bitfit_weights=False, **kw),
                      lambda: BitFitConfig(**kw), lr=3e-2)


def _adapter_case(case_id: str, model: str, parallel: bool = False, mixed_batch: bool = True, **kw) -> MethodCase:
    # init_weights=False gives W_up nn.Linear's random init, so the adapter acts at once; adapters never merge.
    # Houlsby rows that train the model's (shared) layer norms cannot serve mixed batches. From W_up = 0 a small
    # bottleneck moves a random tiny model's loss slowly, hence the larger rate.
    cls = ParallelAdapterConfig if parallel else AdapterConfig
    return MethodCase(case_id, model, lambda: cls(init_weights=False, **kw), lambda: cls(**kw), mergeable=False,
                      mixed_batch=mixed_batch, lr=3e-2)


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
    _ia3_case("ia3-gpt2-default-targets", "gpt2"),
    _ia3_case("ia3-bert-seqcls", "bert", task_type="SEQ_CLS"),
    _ia3_case("ia3-llama-default-targets", "llama", lr=0.2),
    _ia3_case("ia3-t5-default-targets", "t5"),
    _ia3_case("ia3-opt-regex-feedforward", "opt", target_modules=["k_proj", "v_proj", "fc1", "fc2"],
              feedforward_modules=r".*\.fc2", layers_to_transform=[1]),
    _bitfit_case("bitfit-bert-seqcls-all-biases", "bert", task_type="SEQ_CLS"),
    _bitfit_case("bitfit-roberta-seqcls-subset", "roberta", task_type="SEQ_CLS", bias_names=["query", "intermediate"]),
    _bitfit_case("bitfit-gpt2-all-biases", "gpt2"),
    _bitfit_case("bitfit-opt-attention", "opt", bias_names=["self_attn", "final_layer_norm"]),
    _bitfit_case("bitfit-llama-add-missing-with-lm-head", "llama", add_missing_biases=True,
                 bias_names=["self_attn", "mlp", "lm_head"]),
    _bitfit_case("bitfit-t5-add-missing", "t5", add_missing_biases=True),
    _adapter_case("adapter-houlsby-bert-seqcls", "bert", variant="houlsby", r=8, task_type="SEQ_CLS",
                  mixed_batch=False),
    _adapter_case("adapter-pfeiffer-roberta-seqcls-gelu-dropout", "roberta", r=8, task_type="SEQ_CLS",
                  non_linearity="gelu", adapter_dropout=0.1),
    _adapter_case("adapter-houlsby-gpt2-gelu", "gpt2", variant="houlsby", r=16, non_linearity="gelu",
                  mixed_batch=False),
    _adapter_case("adapter-pfeiffer-gpt2-block", "gpt2", r=8),
    _adapter_case("adapter-houlsby-llama-frozen-norms", "llama", variant="houlsby", r=8, train_layer_norms=False),
    _adapter_case("adapter-pfeiffer-llama-block", "llama", r=8, non_linearity="silu"),
    _adapter_case("adapter-pfeiffer-t5", "t5", r=8),
    _adapter_case("adapter-houlsby-opt-layer1", "opt", variant="houlsby", reduction_factor=4, layers_to_transform=[1],
                  mixed_batch=False),
    _adapter_case("parallel-adapter-bert-ffn-seqcls", "bert", parallel=True, r=8, task_type="SEQ_CLS"),
    _adapter_case("parallel-adapter-gpt2-attn", "gpt2", parallel=True, r=8, target="attn"),
    _adapter_case("parallel-adapter-llama-ffn", "llama", parallel=True, r=8),
    _adapter_case("parallel-adapter-t5-ffn", "t5", parallel=True, r=8),
    _adapter_case("parallel-adapter-opt-attn", "opt", parallel=True, r=8, target="attn"),
]
