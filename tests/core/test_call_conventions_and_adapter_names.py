"""How a ``PeftModel`` with a prompt adapter takes its inputs (by position as the base model's ``forward`` names them,
``generate(inputs=...)``), and adapter names it refuses: each refusal a clear error that changes nothing."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import make_inputs, make_model

from peftkit import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from peftkit.core.model import BASE_ADAPTER_NAME


def _prompt_model() -> PeftModel:
    model = get_peft_model(make_model("gpt2"), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    with torch.no_grad():
        model.adapter_modules["default"].prompt_table().normal_()
    return model.eval()


def test_inputs_by_position_follow_the_base_model_s_forward_signature() -> None:
    model, inputs = _prompt_model(), make_inputs("gpt2")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        by_name = model(input_ids=ids, attention_mask=mask).logits
        # The mask's place in GPT2LMHeadModel.forward differs between transformers versions: ask the signature.
        names = list(inspect.signature(model.base_model.model.forward).parameters)
        args = [None] * (names.index("attention_mask") + 1)
        args[names.index("input_ids")], args[-1] = ids, mask
        by_position = model(*args).logits
    torch.testing.assert_close(by_position, by_name)


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, ids: m(ids, input_ids=ids), "Input 'input_ids' given both by position and by name"),
    (lambda m, ids: m(*[None] * 200), r"Too many positional arguments \(200\); pass the inputs by name"),
])
def test_ambiguous_positional_inputs_are_refused(call, message: str) -> None:
    model, ids = _prompt_model(), make_inputs("gpt2")["input_ids"]
    with pytest.raises(TypeError, match=message), torch.no_grad():
        call(model, ids)


def test_generate_takes_the_prompt_as_inputs_like_transformers() -> None:
    model, ids = _prompt_model(), make_inputs("gpt2")["input_ids"][:1]
    options = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = model.generate(input_ids=ids, **options)
        torch.testing.assert_close(model.generate(inputs=ids, **options), want)
        torch.testing.assert_close(model.generate(ids, **options), want)
    assert want.shape == (1, ids.shape[1] + 3)  # the virtual tokens are not in the returned sequence


@pytest.mark.parametrize(("name", "message"), [
    ("", "must be a non-empty string without '.'"),
    ("a.b", "must be a non-empty string without '.'"),
    (3, "must be a non-empty string without '.'"),
    (BASE_ADAPTER_NAME, "is reserved for base-model rows of a mixed batch"),
    ("default", "exists already; delete_adapter it first or pick a new name"),
])
def test_add_adapter_refuses_bad_names_and_changes_nothing(name: object, message: str) -> None:
    model = get_peft_model(make_model("gpt2"), LoraConfig(r=2, target_modules=["c_attn"]))
    modules = [n for n, _ in model.named_modules()]
    state = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        model.add_adapter(name, LoraConfig(r=2, target_modules=["c_attn"]))
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert [n for n, _ in model.named_modules()] == modules
    assert all(torch.equal(state[n], t) for n, t in model.state_dict().items())
