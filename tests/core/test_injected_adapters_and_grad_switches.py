"""HF peft's functional helpers on models given adapters without a ``PeftModel`` (``inject_adapter_in_model``), and
gradient switches per adapter: what a script ported from HF peft relies on beyond ``tests/core/test_hf_public_api.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model, model_logits

import peftkit
from peftkit import LoraConfig, PeftConfigError, PromptTuningConfig

TARGETS = ["c_attn"]


def _injected(*names: str) -> torch.nn.Module:
    model = make_model("gpt2")
    for name in names:
        peftkit.inject_adapter_in_model(LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False), model,
                                        adapter_name=name)
    return model


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_get_peft_config_builds_the_method_s_config_from_an_adapter_config_dict() -> None:
    config = peftkit.get_peft_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": TARGETS})
    assert config == LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    prompt = peftkit.get_peft_config({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "task_type": "CAUSAL_LM"})
    assert isinstance(prompt, PromptTuningConfig) and prompt.num_virtual_tokens == 3
    with pytest.raises(PeftConfigError, match=r"Unknown peft_type 'NOPE'; peftkit knows \[.*'LORA'"):
        peftkit.get_peft_config({"peft_type": "NOPE"})


def test_set_requires_grad_switches_one_injected_adapter_and_nothing_else() -> None:
    model = _injected("a", "b")
    of = {name: {n for n, _ in model.named_parameters() if f".{name}." in n} for name in ("a", "b")}
    assert of["a"] and of["b"]
    peftkit.set_requires_grad(model, "a", requires_grad=True)
    peftkit.set_requires_grad(model, ["b"], requires_grad=False)
    assert _trainable(model) == of["a"]
    peftkit.set_requires_grad(model, ["a", "b"])
    assert _trainable(model) == of["a"] | of["b"]  # base weights stay frozen throughout


def test_set_requires_grad_on_an_injected_model_refuses_unknown_names_and_changes_nothing() -> None:
    model = _injected("a")
    before = _trainable(model)
    with pytest.raises(ValueError, match=r"Adapter\(s\) \['nope'\] not found"):
        peftkit.set_requires_grad(model, ["a", "nope"], requires_grad=False)
    assert _trainable(model) == before


def test_state_dict_helpers_on_injected_models_round_trip_and_refuse_what_they_cannot_do() -> None:
    source, target = _injected("default"), _injected("default")
    inputs = make_inputs("gpt2")
    state = peftkit.get_peft_model_state_dict(source)
    # HF peft's keys for an injected model: the model's own module names, no adapter name
    assert sorted(state) == [f"transformer.h.{i}.attn.c_attn.lora_{m}.weight" for i in (0, 1) for m in "AB"]
    peftkit.set_peft_model_state_dict(target, state)
    torch.testing.assert_close(model_logits(target, inputs), model_logits(source, inputs))
    with pytest.raises(ValueError, match="holds no adapter 'default'"):
        peftkit.get_peft_model_state_dict(make_model("gpt2"))
    with pytest.raises(ValueError, match="save_embedding_layers=True needs a PeftModel"):
        peftkit.get_peft_model_state_dict(source, save_embedding_layers=True)
    with pytest.raises(ValueError, match="ignore_mismatched_sizes=True is not supported"):
        peftkit.set_peft_model_state_dict(target, state, ignore_mismatched_sizes=True)


def test_inject_into_a_peft_model_is_refused_pointing_to_add_adapter() -> None:
    model = peftkit.get_peft_model(make_model("gpt2"), LoraConfig(r=2, target_modules=TARGETS))
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=r"PeftModel already; use model.add_adapter"):
        peftkit.inject_adapter_in_model(LoraConfig(r=2, target_modules=TARGETS), model, adapter_name="other")
    assert [n for n, _ in model.named_modules()] == names


def test_inject_with_a_state_dict_that_does_not_fit_leaves_the_model_as_it_was() -> None:
    model, inputs = make_model("gpt2"), make_inputs("gpt2")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    state = peftkit.get_peft_model_state_dict(_injected("default"))
    state[next(iter(state))] = torch.zeros(1)  # a wrong shape
    with pytest.raises(peftkit.CheckpointError, match="nothing was loaded"):
        peftkit.inject_adapter_in_model(LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False), model,
                                        state_dict=state)
    assert [n for n, _ in model.named_modules()] == names
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    torch.testing.assert_close(model_logits(model, inputs), model_logits(make_model("gpt2"), inputs))


def test_set_requires_grad_reaches_prompt_tables_of_inactive_adapters() -> None:
    model = peftkit.get_peft_model(make_model("gpt2"), PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    model.add_adapter("other", PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    table = {name: model.adapter_modules[name].prompt_table() for name in ("default", "other")}
    assert table["default"].requires_grad and not table["other"].requires_grad
    model.set_requires_grad("other")
    assert table["other"].requires_grad and model.active_adapters == ["default"]
    model.set_requires_grad(["default", "other"], requires_grad=False)
    assert _trainable(model) == set()


def test_print_trainable_parameters_prints_hf_peft_s_line(capsys) -> None:
    import peft

    config = {"r": 4, "target_modules": TARGETS}
    peftkit.get_peft_model(make_model("gpt2"), LoraConfig(**config)).print_trainable_parameters()
    ours = capsys.readouterr().out
    peft.get_peft_model(make_model("gpt2"), peft.LoraConfig(**config)).print_trainable_parameters()
    assert ours == capsys.readouterr().out
    assert ours.startswith("trainable params: 1,024 || all params: ")  # 2 layers × r · (32 + 96)
