"""Regular tests for what the state machine of ``test_stateful.py`` found, each shrunk to the few steps that show it.

Each failed on the code before its fix.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model, model_logits

from peftkit import (
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    LoraConfig,
    NotMergeableError,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peftkit.core.layer import BASE_ADAPTER_NAME

from .test_stateful import TASKS, assert_same_state, model_state


def test_adapter_added_after_disable_adapter_layers_stays_disabled() -> None:
    # Found by the machine (T5: LoRA, disable_adapter_layers, add BitFit, delete the LoRA): layers made by a later
    # add_adapter were enabled, so the "disabled" model ran the new adapter.
    inputs = make_inputs("gpt2")
    expected = model_logits(make_model("gpt2"), inputs)
    model = get_peft_model(make_model("gpt2"), LoraConfig(target_modules=["c_attn"], init_lora_weights=False)).eval()
    model.disable_adapter_layers()
    model.add_adapter("b", LoraConfig(target_modules=["c_fc"], init_lora_weights=False))
    model.add_adapter("c", IA3Config(init_ia3_weights=False))
    model.set_adapter(["default", "b", "c"])
    torch.testing.assert_close(model_logits(model, inputs), expected, rtol=0, atol=0)
    model.enable_adapter_layers()
    with model.disable_adapter():  # one added inside the block follows the model once the block ends
        model.add_adapter("d", LoraConfig(target_modules=["mlp.c_proj"], init_lora_weights=False))
    model.set_adapter("d")
    assert not torch.equal(model_logits(model, inputs), expected)


@pytest.mark.parametrize("config", [LoraConfig(target_modules=["c_attn"], init_lora_weights=False),
                                    IA3Config(init_ia3_weights=False), BitFitConfig(init_bitfit_weights=False)],
                         ids=["lora", "ia3", "bitfit"])
def test_mixed_batch_of_a_disabled_model_is_the_base_model(config: PeftConfig) -> None:
    # Found by the machine: rows routed to a LoRA / (IA)³ / BitFit adapter ran it although adapters were disabled
    # (prompt adapters did not); disabled wins, as in HF peft.
    inputs = make_inputs("gpt2")
    model = get_peft_model(make_model("gpt2"), config).eval()
    model.disable_adapter_layers()
    got = model_logits(model, inputs, adapter_names=["default", BASE_ADAPTER_NAME, "default"])
    torch.testing.assert_close(got, model_logits(make_model("gpt2"), inputs), rtol=0, atol=0)


def test_merge_adapter_while_adapters_are_disabled_is_refused() -> None:
    # Found by the machine (BitFit, disable_adapter_layers, merge_adapter): the merge went into the weights the
    # disabled model computes with, so "the base model" silently became the merged one.
    inputs = make_inputs("gpt2")
    model = get_peft_model(make_model("gpt2"), BitFitConfig(init_bitfit_weights=False)).eval()
    model.disable_adapter_layers()
    expected, before = model_logits(model, inputs), model_state(model)
    with pytest.raises(ValueError, match="enable_adapter_layers"):
        model.merge_adapter()
    assert_same_state(before, model_state(model), "refused merge_adapter")
    with model.disable_adapter(), pytest.raises(ValueError, match="disabled"):
        model.merge_adapter()
    torch.testing.assert_close(model_logits(model, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("prefix_first", [True, False], ids=["prefix-added-first", "prompt-added-first"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_prefix_rows_beside_prompt_rows_equal_their_single_runs(kind: str, prefix_first: bool) -> None:
    # Found by the machine (UniPELT rows beside a prompt-tuning row): with the prefix adapter added first, its
    # position ids were moved up by the prompt's length in rows that have no prompt (logits off by up to 0.27).
    task = TASKS[kind]
    configs = [("prefix", PrefixTuningConfig(num_virtual_tokens=2, task_type=task)),
               ("prompt", PromptTuningConfig(num_virtual_tokens=3, task_type=task))]
    first, second = configs if prefix_first else configs[::-1]
    model = get_peft_model(make_model(kind), first[1], first[0]).eval()
    model.add_adapter(*second)
    inputs = make_inputs(kind)
    got = model_logits(model, inputs, adapter_names=["prompt", "prefix", "prefix"])
    for row, name in enumerate(["prompt", "prefix", "prefix"]):
        model.set_adapter(name)
        want = model_logits(model, inputs)[row]
        torch.testing.assert_close(got[row, :want.shape[0]] if want.dim() == 2 else got[row], want)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])  # GPT-2's Conv1D and nn.Linear
def test_dora_with_dropout_trains_on_batches_of_sequences(kind: str) -> None:
    targets = {"gpt2": ["c_attn"], "llama": ["q_proj"]}[kind]
    model = get_peft_model(make_model(kind), LoraConfig(r=1, target_modules=targets, lora_dropout=0.1, use_dora=True,
                                                        init_lora_weights=False, task_type=TASKS[kind]))
    loss = model.train()(**make_inputs(kind)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_magnitude_vector" in n)


def test_deleting_a_merged_adapter_with_a_task_head_is_refused_and_changes_nothing() -> None:
    # The head's trained copy (modules_to_save) used to be removed before the merged layer refused.
    model = get_peft_model(make_model("bert"), IA3Config(target_modules=["query"], init_ia3_weights=False,
                                                          task_type="SEQ_CLS")).eval()
    model.merge_adapter()
    before = model_state(model)
    with pytest.raises(RuntimeError, match="'default' is merged into .* Nothing was changed"):
        model.delete_adapter("default")
    assert_same_state(before, model_state(model), "refused delete_adapter")
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert not model.peft_config


def test_set_adapter_unmerges_merged_adapters_that_leave_the_active_set() -> None:
    # A merged (IA)³ adapter used to stay in the weights after set_adapter to another one (logits off by 2e-3).
    config = IA3Config(target_modules=["attention.output.dense", "query"], init_ia3_weights=False,
                       feedforward_modules=["attention.output.dense"], task_type="SEQ_CLS")
    model = get_peft_model(make_model("bert"), config, "a").eval()
    model.add_adapter("b", IA3Config(target_modules=["query"], init_ia3_weights=False, task_type="SEQ_CLS"))
    inputs = make_inputs("bert")
    model.set_adapter("b")
    only_b = model_logits(model, inputs)
    model.set_adapter("a")
    model.merge_adapter()
    model.set_adapter(["a", "b"])  # the merged adapter stays active: it stays merged
    assert all(layer.merged_adapters == ["a"] for _, layer in model._layers() if "a" in layer.adapter_names
               and layer.weight_effect != "opaque")
    with pytest.warns(UserWarning, match=r"\['a'\] are merged and not in the new active set"):
        model.set_adapter("b")
    assert not any(layer.merged_adapters for _, layer in model._layers())
    torch.testing.assert_close(model_logits(model, inputs), only_b, atol=1e-6, rtol=0)


def test_merge_writing_a_base_parameter_another_adapter_trains_is_refused() -> None:
    # BitFit merged into the layer norms' biases, which a Pfeiffer adapter trains and saves as its own
    # (train_layer_norms): that adapter's tensors and next checkpoint used to hold BitFit's update.
    model = get_peft_model(make_model("gpt2"), BitFitConfig(init_bitfit_weights=False), "a").eval()
    model.add_adapter("b", AdapterConfig(variant="pfeiffer", r=2, init_weights=False, train_layer_norms=True))
    model.set_adapter("a")
    before, saved_b = model_state(model), {k: v.clone() for k, v in model.get_adapter_state_dict("b").items()}
    with pytest.raises(NotMergeableError, match=r"ln_1\.bias.*adapter\(s\) \['b'\] train and save as their own"):
        model.merge_adapter()
    assert_same_state(before, model_state(model), "refused merge_adapter")
    assert all(torch.equal(v, saved_b[k]) for k, v in model.get_adapter_state_dict("b").items())
    inputs = make_inputs("gpt2")
    expected = model_logits(model, inputs)
    merged = model.merge_and_unload()  # drops "b": nothing is left to hold the update
    torch.testing.assert_close(model_logits(merged, inputs), expected, atol=1e-5, rtol=0)
