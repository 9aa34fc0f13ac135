"""Low-memory loading: adapters injected into a model built on the meta device, then given storage and weights,
give exactly the normal path's model; ``get_peft_model`` on a Llama-7B-shaped model on the meta device is fast."""

from __future__ import annotations

import time

import pytest
import torch
from accelerate import init_empty_weights
from conftest import make_inputs, make_model, model_logits
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import CheckpointError, LoraConfig, PeftModel, get_peft_model
from peftkit.integrations.training import load_base_weights, materialize_meta_tensors

CONFIGS = {
    "llama": lambda: LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                modules_to_save=["lm_head"]),
    "gpt2": lambda: LoraConfig(r=4, init_lora_weights=False),  # tied input/output embeddings
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_meta_injection_then_loading_equals_the_normal_path(tmp_path, kind: str) -> None:
    trained = get_peft_model(make_model(kind, seed=0), CONFIGS[kind]())
    trained.save_pretrained(tmp_path)
    normal = PeftModel.from_pretrained(make_model(kind, seed=0), tmp_path)

    config = make_model(kind).config
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) stay real
        empty = type(make_model(kind))(config)
    empty.tie_weights()  # init_empty_weights re-creates parameters one by one, which unties GPT-2's embeddings
    model = get_peft_model(empty, CONFIGS[kind]())
    assert all(p.is_meta for p in model.parameters())
    materialize_meta_tensors(model)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    load_base_weights(model, make_model(kind, seed=0).state_dict())
    model.hotswap_adapter(tmp_path)

    inputs = make_inputs(kind)
    torch.testing.assert_close(model_logits(model.eval(), inputs), model_logits(normal, inputs), rtol=0, atol=0)
    if kind == "gpt2":
        base = model.get_base_model()
        assert base.lm_head.weight is base.transformer.wte.weight
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in trained.named_parameters() if p.requires_grad}


def test_loading_an_adapter_into_meta_tensors_raises_instead_of_doing_nothing(tmp_path) -> None:
    get_peft_model(make_model("llama"), CONFIGS["llama"]()).save_pretrained(tmp_path)
    with init_empty_weights():
        empty = LlamaForCausalLM(make_model("llama").config)
    with pytest.raises(CheckpointError, match="meta device"):
        PeftModel.from_pretrained(empty, tmp_path)
    assert not any(type(m).__name__.startswith("Lora") for m in empty.modules())  # left unchanged


def test_load_base_weights_lists_missing_and_unexpected_keys() -> None:
    model = get_peft_model(make_model("llama"), CONFIGS["llama"]())
    state = make_model("llama").state_dict()
    state.pop("model.norm.weight")
    state["not.a.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight(.|\n)*not\.a\.weight"):
        load_base_weights(model, state)


LLAMA_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096}


def test_get_peft_model_on_a_meta_llama_7b_takes_well_under_a_second() -> None:
    with torch.device("meta"):
        base = LlamaForCausalLM(LlamaConfig(**LLAMA_7B))
    assert sum(p.numel() for p in base.parameters()) > 6.7e9
    start = time.perf_counter()
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    seconds = time.perf_counter() - start
    # Measured 0.05-0.1 s on 2 CPU cores (benchmarks/bench_meta_init.py, docs/benchmarks.md); 1 s leaves room
    # for a loaded CI machine.
    assert seconds < 1.0, seconds
    assert all(p.is_meta for p in model.parameters())
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 32 * 4 * (8 * 4096 * 2)
