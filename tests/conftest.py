"""Seeded tiny transformers models built from configs (random weights, no hub), shared by every test."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

torch.set_num_threads(2)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

VOCAB = 64
SEQ = 8


def tiny_gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=1))


def tiny_bert() -> nn.Module:
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3))


def tiny_roberta() -> nn.Module:
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, pad_token_id=1))


def tiny_llama() -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2))


def tiny_t5() -> nn.Module:
    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def tiny_opt() -> nn.Module:
    return OPTForCausalLM(OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=2))


def tiny_mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM  # transformers 5: experts are 3-D parameters

    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
        experts_implementation="eager"))  # the per-expert loop runs in any dtype (grouped_mm has no float64)


MODEL_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "gpt2": tiny_gpt2, "bert": tiny_bert, "roberta": tiny_roberta, "llama": tiny_llama, "t5": tiny_t5, "opt": tiny_opt,
    "mixtral": tiny_mixtral,
}


def make_model(kind: str, seed: int = 0) -> nn.Module:
    """A fresh tiny model in eval mode; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return MODEL_FACTORIES[kind]().eval()


def make_inputs(kind: str, batch: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch for the model kind, with labels so that ``model(**inputs).loss`` exists."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, SEQ), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind in ("bert", "roberta"):
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=gen)
    elif kind == "t5":
        inputs["labels"] = torch.randint(3, VOCAB, (batch, 5), generator=gen)
    else:
        inputs["labels"] = ids.clone()
    return inputs


def model_logits(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


class LayerHolder(nn.Module):
    """A model whose only module is ``layer``, so ``target_modules=["layer"]`` wraps exactly that."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)
