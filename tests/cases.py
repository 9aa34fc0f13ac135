"""The contract table: one row per (method, model) that every generic contract test runs over.

A new method adds rows here. ``config`` must make the adapter change the outputs at once (e.g. LoRA with
``init_lora_weights=False``) so equivalence checks are not vacuous; ``zero_init`` is the config whose fresh
adapter leaves the outputs unchanged, or None when the method has no such init.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from peftkit import (
    AdaLoraConfig,
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    LoraConfig,
    MAMConfig,
    ParallelAdapterConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PTuningV2Config,
    TrainableTokensConfig,
    UniPELTConfig,
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
    # The loss after 20 steps must fall below this fraction of the first one.
    loss_ratio: float = 0.97
    # Train on one constant next token instead of random ones (methods that only steer the input).
    constant_labels: bool = False


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


_PROMPT_TASKS = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "opt": "CAUSAL_LM", "bert": "SEQ_CLS",
                 "roberta": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def _prompt_case(case_id: str, model: str, cls: type[PeftConfig], lr: float = 3e-2, mixed_batch: bool = True,
                 loss_ratio: float = 0.97, constant_labels: bool = False, **kw) -> MethodCase:
    # Prompt methods add virtual tokens or key/value prefixes: a fresh prompt changes the outputs at once and none
    # leaves them unchanged (zero prefixes still take attention weight), nothing merges. A few hundred prompt
    # entries need a larger rate than LoRA to move a random tiny model's loss, and the tiny LMs' small tied output
    # embedding (std 0.02) a larger one still.
    return MethodCase(case_id, model, lambda: cls(num_virtual_tokens=4, task_type=_PROMPT_TASKS[model], **kw),
                      mergeable=False, mixed_batch=mixed_batch, lr=lr, loss_ratio=loss_ratio,
                      constant_labels=constant_labels)


def _input_prompt_case(case_id: str, model: str, cls: type[PeftConfig], **kw) -> MethodCase:
    # Four input vectors cannot teach a frozen random LM random next tokens (the loss stays near 0.99 of the start
    # whatever the rate); a constant next token they can. The 2-layer, 32-wide GPT-2/OPT move least (~0.97).
    ratio = 0.985 if model in ("gpt2", "opt") else 0.97
    return _prompt_case(case_id, model, cls, loss_ratio=ratio, constant_labels=True, **kw)


def _acting_member(member: PeftConfig) -> PeftConfig:
    if isinstance(member, LoraConfig):
        return dataclasses.replace(member, init_lora_weights=False)
    if isinstance(member, (AdapterConfig, ParallelAdapterConfig)):
        return dataclasses.replace(member, init_weights=False)
    return member


def _composite_case(case_id: str, model: str, cls: type[PeftConfig], **kw) -> MethodCase:
    # LoRA and adapter members get their random (acting) inits, so every member's routing is checked, not only the
    # prefix's; the prefix leaves no zero init and nothing merges (prefixes, gated LoRA). Prefix, LoRA and adapter
    # together move the loss at LoRA's rate; the prompt rows' 3e-2 makes tiny BERT's loss oscillate back up.
    def config() -> PeftConfig:
        composite = cls(task_type=_PROMPT_TASKS[model], **kw)
        return dataclasses.replace(composite, members=[_acting_member(m) for m in composite.members])

    return MethodCase(case_id, model, config, mergeable=False)


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
    # Every other token id trains (the contract inputs are random ids, so they occur); GPT-2's head is tied to them.
    _lora_case("lora-llama-trainable-token-rows", "llama", r=4, trainable_token_indices=list(range(3, 64, 2))),
    MethodCase("trainable-tokens-gpt2-tied", "gpt2", lambda: TrainableTokensConfig(
        token_indices=list(range(3, 64, 2)), init_weights=False), lambda: TrainableTokensConfig(
        token_indices=list(range(3, 64, 2)))),
    MethodCase("lora-mixtral-experts", "mixtral", *_lora(r=2, target_modules=["q_proj"],
                                                         target_parameters=["gate_up_proj", "down_proj"])),
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
    _adapter_case("parallel-adapter-opt-ffn-span", "opt", parallel=True, r=8),
    _prompt_case("prefix-tuning-gpt2", "gpt2", PrefixTuningConfig, lr=0.3),
    _prompt_case("prefix-tuning-llama-gqa", "llama", PrefixTuningConfig, lr=0.3),
    _prompt_case("prefix-tuning-bert-seqcls-projection", "bert", PrefixTuningConfig, prefix_projection=True,
                 encoder_hidden_size=16),
    _prompt_case("prefix-tuning-t5", "t5", PrefixTuningConfig),
    _prompt_case("p-tuning-v2-bert-seqcls", "bert", PTuningV2Config),
    _prompt_case("p-tuning-v2-roberta-seqcls", "roberta", PTuningV2Config),
    _input_prompt_case("prompt-tuning-gpt2", "gpt2", PromptTuningConfig, lr=0.3),
    _prompt_case("prompt-tuning-bert-seqcls", "bert", PromptTuningConfig),
    # A decoder prompt (SEQ_2_SEQ_LM's second submodule) cannot share a batch with rows that have none.
    _input_prompt_case("prompt-tuning-t5", "t5", PromptTuningConfig, lr=0.3, mixed_batch=False),
    _input_prompt_case("prompt-tuning-opt", "opt", PromptTuningConfig, lr=0.3),
    _input_prompt_case("prompt-encoder-gpt2-mlp", "gpt2", PromptEncoderConfig, lr=0.1, encoder_hidden_size=16),
    _input_prompt_case("prompt-encoder-llama-lstm", "llama", PromptEncoderConfig, lr=0.1,
                       encoder_reparameterization_type="LSTM", encoder_hidden_size=16),
    _composite_case("mam-gpt2", "gpt2", MAMConfig, num_virtual_tokens=4, prefix_hidden_size=16, ffn_r=8),
    _composite_case("mam-bert-seqcls", "bert", MAMConfig, num_virtual_tokens=4, prefix_hidden_size=16, ffn_r=8),
    _composite_case("unipelt-gpt2", "gpt2", UniPELTConfig, r=4, num_virtual_tokens=4, prefix_hidden_size=16,
                    reduction_factor=4),
    _composite_case("unipelt-bert-seqcls", "bert", UniPELTConfig, r=4, num_virtual_tokens=4, prefix_hidden_size=16,
                    reduction_factor=4),
    _composite_case("unipelt-gpt2-token-gates", "gpt2", UniPELTConfig, r=4, num_virtual_tokens=4,
                    prefix_hidden_size=16, reduction_factor=4, gate_reduce="token"),
]
