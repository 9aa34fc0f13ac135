"""Prompt tuning called with ``inputs_embeds`` instead of ``input_ids`` (as HF peft allows): the prompt goes in front
of the given embeddings, and the mask, labels and token types grow to match. Reference: the base model run on
``[P; X]`` with the extended inputs written out by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import SEQ, make_inputs, make_model
from torch import nn
from transformers import BertConfig, BertForTokenClassification

from peftkit import PeftModel, get_peft_model
from peftkit.core.model import BASE_ADAPTER_NAME
from peftkit.methods.prompt_tuning import PromptTuningConfig

N = 4  # virtual tokens


def _peft(base: nn.Module, task: str, n: int = N) -> PeftModel:
    # The task head's trainable copy starts equal to the head, so a second base of the same seed is the reference.
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=n, task_type=task)).eval()
    with torch.no_grad():  # a prompt unlike any token embedding, so a prompt in the wrong place shows
        model.adapter_modules["default"].prompt_table().normal_()
    return model


def _reference(base: nn.Module, embeds: torch.Tensor, prompt: torch.Tensor, **inputs: torch.Tensor):
    rows, n = embeds.shape[0], prompt.shape[0]
    ones = torch.ones(rows, n, dtype=torch.long)
    extended = {"inputs_embeds": torch.cat([prompt.expand(rows, -1, -1), embeds], dim=1)}
    if "attention_mask" in inputs:
        extended["attention_mask"] = torch.cat([ones, inputs["attention_mask"]], dim=1)
    if "token_type_ids" in inputs:
        extended["token_type_ids"] = torch.cat([0 * ones, inputs["token_type_ids"]], dim=1)
    labels = inputs.get("labels")
    if labels is not None:
        extended["labels"] = torch.cat([-100 * ones, labels], dim=1) if labels.dim() == 2 else labels
    with torch.no_grad():
        return base(**extended)


def _embeds(model: PeftModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(ids)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lm_with_inputs_embeds_equals_the_prompt_in_front(kind: str) -> None:
    model, base = _peft(make_model(kind), "CAUSAL_LM"), make_model(kind)
    inputs = make_inputs(kind)
    embeds = _embeds(model, inputs["input_ids"])
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["labels"])
    want = _reference(base, embeds, model.adapter_modules["default"].prompt_table().detach(),
                      attention_mask=inputs["attention_mask"], labels=inputs["labels"])
    assert out.logits.shape == (3, N + SEQ, want.logits.shape[-1])  # virtual positions kept, as in HF peft
    torch.testing.assert_close(out.logits, want.logits)
    torch.testing.assert_close(out.loss, want.loss)
    with torch.no_grad():  # the same rows given as ids
        from_ids = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(out.logits, from_ids)


def test_sequence_classifier_with_inputs_embeds_extends_token_types() -> None:
    model, base = _peft(make_model("bert"), "SEQ_CLS"), make_model("bert")
    inputs = make_inputs("bert")
    types = torch.zeros_like(inputs["input_ids"])
    types[:, SEQ // 2:] = 1  # a second segment: a zero-filled prefix must not shift it
    embeds = _embeds(model, inputs["input_ids"])
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], token_type_ids=types,
                    labels=inputs["labels"])
    want = _reference(base, embeds, model.adapter_modules["default"].prompt_table().detach(),
                      attention_mask=inputs["attention_mask"], token_type_ids=types, labels=inputs["labels"])
    torch.testing.assert_close(out.logits, want.logits)
    torch.testing.assert_close(out.loss, want.loss)


def test_token_classifier_with_inputs_embeds_returns_one_logit_row_per_given_position() -> None:
    def tagger() -> nn.Module:
        torch.manual_seed(0)
        return BertForTokenClassification(BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, num_labels=5)).eval()

    model, base = _peft(tagger(), "TOKEN_CLS"), tagger()
    inputs = make_inputs("gpt2")
    embeds = _embeds(model, inputs["input_ids"])
    labels = inputs["input_ids"] % 5
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=labels)
    want = _reference(base, embeds, model.adapter_modules["default"].prompt_table().detach(),
                      attention_mask=inputs["attention_mask"], labels=labels)
    assert out.logits.shape == (3, SEQ, 5)
    torch.testing.assert_close(out.logits, want.logits[:, N:])
    torch.testing.assert_close(out.loss, want.loss)


def test_mixed_batch_with_inputs_embeds_gives_each_row_its_own_prompt() -> None:
    model = _peft(make_model("gpt2"), "CAUSAL_LM")
    model.add_adapter("other", PromptTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM"))
    with torch.no_grad():
        model.adapter_modules["other"].prompt_table().normal_()
    inputs = make_inputs("gpt2")
    embeds, mask = _embeds(model, inputs["input_ids"]), inputs["attention_mask"]
    names = ["other", "default", "other"]
    with torch.no_grad():
        mixed = model(inputs_embeds=embeds, attention_mask=mask, adapter_names=names).logits
    for row, name in enumerate(names):
        model.set_adapter(name)
        with torch.no_grad():
            single = model(inputs_embeds=embeds[row:row + 1], attention_mask=mask[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], single)


@pytest.mark.parametrize(("second", "names", "message"), [
    (N, ["default", BASE_ADAPTER_NAME, "default"], "cannot mix rows that have no prompt"),
    (N + 2, ["default", "longer", "default"], "prompt adapters of one length; pass input_ids"),
])
def test_mixed_batch_with_inputs_embeds_refuses_what_it_cannot_line_up(second: int, names: list[str],
                                                                         message: str) -> None:
    model = _peft(make_model("gpt2"), "CAUSAL_LM")
    model.add_adapter("longer", PromptTuningConfig(num_virtual_tokens=second, task_type="CAUSAL_LM"))
    inputs = make_inputs("gpt2")
    embeds = _embeds(model, inputs["input_ids"])
    with torch.no_grad():
        before = model(inputs_embeds=embeds).logits
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], adapter_names=names)
    with torch.no_grad():  # the refused call left no hook or state behind
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, before)
    # ...and the same batch given as ids works: rows are padded to a common length per row.
    with torch.no_grad():
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], adapter_names=names)
