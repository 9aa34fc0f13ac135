"""PeftModel at run time: generate with mixed batches, gradient checkpointing, attribute pass-through."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.core.layer import BASE_ADAPTER_NAME


def _two_adapter_model(kind: str) -> PeftModel:
    model = get_peft_model(make_model(kind), LoraConfig(r=4, init_lora_weights=False)).eval()
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=32, init_lora_weights=False))
    with torch.no_grad():  # strong adapters, so that greedy tokens differ and no comparison is vacuous
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return model


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_mixed_batch_equals_per_adapter_generate(kind: str, num_beams: int) -> None:
    model = _two_adapter_model(kind)
    inputs = make_inputs(kind, batch=3)
    inputs.pop("labels")
    names = ["other", BASE_ADAPTER_NAME, "default"]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams, "pad_token_id": 2}
    mixed = model.generate(**inputs, adapter_names=names, **kwargs)
    outputs = {}
    for row, name in enumerate(names):
        single = {k: v[row : row + 1] for k, v in inputs.items()}
        if name == BASE_ADAPTER_NAME:
            with model.disable_adapter():
                expected = model.generate(**single, **kwargs)
        else:
            model.set_adapter(name)
            expected = model.generate(**single, **kwargs)
        assert torch.equal(mixed[row, : expected.shape[1]], expected[0]), (name, mixed[row], expected[0])
        outputs[name] = expected[0]
    model.set_adapter("default")
    with model.disable_adapter():
        base_row0 = model.generate(**{k: v[:1] for k, v in inputs.items()}, **kwargs)[0]
    assert not torch.equal(outputs["other"], base_row0)  # the adapter really changes the tokens


def test_generate_uses_active_adapter() -> None:
    model = _two_adapter_model("gpt2")
    inputs = make_inputs("gpt2", batch=2)
    with model.disable_adapter():
        base = model.generate(input_ids=inputs["input_ids"], max_new_tokens=8, do_sample=False, pad_token_id=2)
    adapted = model.generate(input_ids=inputs["input_ids"], max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert not torch.equal(base, adapted)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_gradient_checkpointing_gives_same_gradients(kind: str) -> None:
    inputs = make_inputs(kind)
    grads = []
    for checkpointing in (False, True):
        base = make_model(kind)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False))
        model.train()
        for module in model.modules():  # dropout off so both runs see the same computation
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model(**inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert grads[1][name].abs().sum() > 0, f"{name} got no gradient under checkpointing"
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_attributes_pass_through_to_base_model() -> None:
    base = make_model("llama")
    model = get_peft_model(base, LoraConfig(r=4))
    assert model.config is base.config
    assert model.get_base_model() is base
    assert model.base_model.model is base
    assert model.get_input_embeddings() is base.get_input_embeddings()
    assert model.active_adapter == "default" and model.active_adapters == ["default"]


def test_get_peft_model_refuses_a_peft_model() -> None:
    model = get_peft_model(make_model("gpt2"), LoraConfig(r=4))
    with pytest.raises(ValueError, match="add_adapter"):
        get_peft_model(model, LoraConfig(r=4))


def test_several_active_adapters_add_up() -> None:
    model = _two_adapter_model("gpt2")
    inputs = make_inputs("gpt2")
    inputs.pop("labels")
    with torch.no_grad(), model.disable_adapter():
        base = model(**inputs).logits
    with torch.no_grad():
        model.set_adapter(["default", "other"])
        both = model(**inputs).logits
    assert model.active_adapters == ["default", "other"]
    model.merge_adapter()
    with torch.no_grad():
        merged = model(**inputs).logits
    torch.testing.assert_close(merged, both, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both, base)


def test_gradient_checkpointing_enabled_after_wrapping_still_trains_adapters() -> None:
    model = get_peft_model(make_model("llama"), LoraConfig(r=4, init_lora_weights=False))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    model(**make_inputs("llama")).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
