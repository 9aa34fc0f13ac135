"""Saving and loading in place, single process: ``save_pretrained`` refuses shards (never an empty or partial
checkpoint), takes tensors from a gathered ``state_dict``; ``hotswap_adapter`` and ``load_adapter_checkpoint``."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model, model_logits
from safetensors.torch import load_file
from torch import nn

from peftkit import CheckpointError, LoraConfig, PeftConfigError, get_peft_model
from peftkit.integrations.training import load_adapter_checkpoint, unwrap_model


def _model(**kw):
    return get_peft_model(make_model("llama"), LoraConfig(r=4, init_lora_weights=False, **kw))


def _lora_a(model) -> nn.Linear:
    return model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"]


@pytest.mark.parametrize("shard", ["flat-empty", "meta", "zero3"])
def test_save_pretrained_refuses_a_sharded_or_empty_tensor(tmp_path, shard: str) -> None:
    model = _model()
    lora_a = _lora_a(model)
    shape = lora_a.weight.shape
    if shard == "flat-empty":  # what FSDP1 leaves on a rank that does not own the parameter
        lora_a.weight = nn.Parameter(torch.empty(0))
    elif shard == "meta":
        lora_a.weight = nn.Parameter(torch.empty(shape, device="meta"))
    else:  # DeepSpeed ZeRO-3: an empty local tensor that remembers its full size
        lora_a.weight = nn.Parameter(torch.empty(0))
        lora_a.weight.ds_numel = shape.numel()
    with pytest.raises(CheckpointError, match="q_proj.lora_A.weight"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_save_pretrained_reads_a_gathered_state_dict(tmp_path) -> None:
    model = _model()
    gathered = {k: v.detach() + 1.0 for k, v in model.state_dict().items()}  # stands in for a full gather
    _lora_a(model).weight = nn.Parameter(torch.empty(0))  # the live tensor is a shard now
    model.save_pretrained(tmp_path, state_dict=gathered)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    path = "base_model.model.model.layers.0.self_attn.q_proj.lora_A"
    torch.testing.assert_close(saved[f"{path}.weight"], gathered[f"{path}.default.weight"])


def test_save_pretrained_on_other_ranks_writes_nothing(tmp_path) -> None:
    _model().save_pretrained(tmp_path / "out", is_main_process=False)
    assert not (tmp_path / "out").exists()


def test_hotswap_replaces_values_in_place_and_refuses_another_config(tmp_path) -> None:
    source, target = _model(), _model()
    with torch.no_grad():
        for tensor in source.get_adapter_state_dict("default", live=True).values():
            tensor.mul_(-2.0)
    source.save_pretrained(tmp_path / "a")
    params = list(target.parameters())
    target.hotswap_adapter(tmp_path / "a")
    assert list(target.parameters()) == params
    inputs = make_inputs("llama")
    torch.testing.assert_close(model_logits(target, inputs), model_logits(source, inputs))

    get_peft_model(make_model("llama"), LoraConfig(r=4, lora_alpha=32)).save_pretrained(tmp_path / "b")
    with pytest.raises(PeftConfigError, match="lora_alpha"):
        target.hotswap_adapter(tmp_path / "b")
    torch.testing.assert_close(model_logits(target, inputs), model_logits(source, inputs))  # unchanged


def test_load_adapter_checkpoint_swaps_known_adapters_and_adds_new_ones(tmp_path) -> None:
    source = _model()
    source.add_adapter("extra", LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    source.save_pretrained(tmp_path)
    target = _model()
    assert sorted(load_adapter_checkpoint(target, tmp_path)) == ["default", "extra"]
    for name in ("default", "extra"):
        for key, value in source.get_adapter_state_dict(name).items():
            torch.testing.assert_close(target.get_adapter_state_dict(name)[key], value, rtol=0, atol=0)
    assert target.active_adapters == ["default"]


def test_unwrap_model_sees_through_compile() -> None:
    model = _model()
    assert unwrap_model(torch.compile(model)) is model
    assert unwrap_model(model) is model
