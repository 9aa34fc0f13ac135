"""AdapterFusion against hand-written references, plus training, regulariser, checkpoints, inspection and pruning."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model, model_logits

from peftkit import (
    AdapterConfig,
    AdapterFusionConfig,
    ParallelAdapterConfig,
    PeftConfigError,
    PeftModel,
    TargetModuleError,
    get_peft_model,
)
from peftkit.core.layer import BASE_ADAPTER_NAME
from peftkit.core.targets import get_module
from peftkit.methods.adapters import SerialAdapterLayer
from peftkit.methods.fusion import AdapterFusionAttention

ADAPTERS = ["a", "b", "c"]


def _fused_model(kind: str = "bert", names: list[str] = ADAPTERS, **fusion_kw) -> PeftModel:
    """Three random-init Pfeiffer adapters and a fusion over ``names``, the fusion active."""
    model = get_peft_model(make_model(kind), AdapterConfig(r=4, init_weights=False), adapter_name="a")
    for name in ("b", "c"):
        model.add_adapter(name, AdapterConfig(r=4, init_weights=False))
    model.add_fusion(names, "fusion", **fusion_kw)
    model.set_adapter("fusion")
    return model.eval()


def _serial_layers(model: PeftModel) -> dict[str, SerialAdapterLayer]:
    return {n.replace(".base_layer", ""): m for n, m in model.base_model.model.named_modules()
            if isinstance(m, SerialAdapterLayer)}


def _A(layer: SerialAdapterLayer, name: str, u: torch.Tensor) -> torch.Tensor:
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    return F.relu(u @ down.weight.T + down.bias) @ up.weight.T + up.bias


def _fusion_reference(reference: torch.nn.Module, model: PeftModel, weights_only_mean: bool = False) -> None:
    """Hooks that compute the fusion formula by hand on a plain model, reading the trained weights."""
    for path, layer in _serial_layers(model).items():
        fusion = layer.adapter_fusion["fusion"]

        def hook(mod, inp, out, layer=layer, fusion=fusion):
            z, u = inp[0], out  # post-LN Pfeiffer: u = LN(z)
            a = torch.stack([_A(layer, n, u) for n in fusion.adapters], dim=-2)  # (B, T, N, d)
            v = a @ fusion.value.weight.T
            if weights_only_mean:
                o = v.mean(dim=-2)
            else:
                q = u @ fusion.query.weight.T + fusion.query.bias  # (B, T, d)
                k = a @ fusion.key.weight.T + fusion.key.bias  # (B, T, N, d)
                p = torch.softmax(torch.einsum("btd,btnd->btn", q, k) / fusion.temperature, dim=-1)
                o = torch.einsum("btn,btnd->btd", p, v)
            return F.layer_norm(z + o, mod.normalized_shape, mod.weight, mod.bias, mod.eps)
        get_module(reference, path).register_forward_hook(hook)


def test_equal_attention_gives_mean_of_value_projected_adapters() -> None:
    model = _fused_model()
    with torch.no_grad():
        for layer in _serial_layers(model).values():
            fusion = layer.adapter_fusion["fusion"]
            for lin in (fusion.query, fusion.key):
                lin.weight.zero_()
                lin.bias.zero_()
            fusion.value.weight.normal_(std=0.3)  # not the identity, so W_V really enters
    reference = make_model("bert")
    _fusion_reference(reference, model, weights_only_mean=True)
    inputs = make_inputs("bert")
    torch.testing.assert_close(model_logits(model, inputs), model_logits(reference, inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_fusion_equals_hand_written_reference(temperature: float) -> None:
    model = _fused_model(temperature=temperature)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_fusion" in name:
                param.normal_(std=0.3)
    reference = make_model("bert")
    _fusion_reference(reference, model)
    inputs = make_inputs("bert")
    expected = model_logits(reference, inputs)
    torch.testing.assert_close(model_logits(model, inputs), expected, atol=1e-5, rtol=1e-4)
    with model.disable_adapter():
        assert not torch.allclose(model_logits(model, inputs), expected)


def test_fusion_on_pre_ln_blocks_starts_as_mean_of_adapters() -> None:
    # GPT-2: Pfeiffer wraps the residual blocks; at init W_V = I and Q/K are small, so o ≈ mean of adapter outputs.
    model = _fused_model("gpt2", names=["a", "b"])
    inputs = make_inputs("gpt2")
    for layer in _serial_layers(model).values():
        assert torch.equal(layer.adapter_fusion["fusion"].value.weight, torch.eye(32))
        assert layer.adapter_fusion["fusion"].value.bias is None
    mean_model = _fused_model("gpt2", names=["a", "b"])
    with torch.no_grad():
        for layer in _serial_layers(mean_model).values():
            for lin in (layer.adapter_fusion["fusion"].query, layer.adapter_fusion["fusion"].key):
                lin.weight.zero_()
    torch.testing.assert_close(model_logits(model, inputs), model_logits(mean_model, inputs), atol=1e-3, rtol=1e-3)


def test_only_fusion_and_head_train() -> None:
    model = get_peft_model(make_model("bert"), AdapterConfig(r=4, task_type="SEQ_CLS", init_weights=False),
                           adapter_name="a")
    model.add_adapter("b", AdapterConfig(r=4, task_type="SEQ_CLS", init_weights=False))
    model.add_fusion(["a", "b"], "fusion", task_type="SEQ_CLS")
    model.set_adapter("fusion")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("adapter_fusion" in n or "modules_to_save.fusion" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**make_inputs("bert")).loss.backward()
        optim.step()
        optim.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_value_regulariser_is_added_to_the_loss() -> None:
    model = _fused_model(value_reg_weight=0.5)
    model.train()
    inputs = make_inputs("bert")
    assert model.fusion_regularization_loss("fusion").item() == 0.0  # W_V = I at init
    with torch.no_grad():
        for layer in _serial_layers(model).values():
            layer.adapter_fusion["fusion"].value.weight.add_(0.1)
    expected = sum(0.5 * (0.1 ** 2) * 32 * 32 for _ in _serial_layers(model))
    reg = model.fusion_regularization_loss()
    torch.testing.assert_close(reg, torch.tensor(expected), rtol=1e-4, atol=1e-6)
    for module in model.modules():  # dropout off, so both passes compute the same loss
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with_reg = model(**inputs).loss
    model.peft_config["fusion"].value_reg_weight = 0.0
    torch.testing.assert_close(with_reg - model(**inputs).loss, reg.detach(), rtol=1e-4, atol=1e-5)


def test_save_and_load_fusion_on_its_own(tmp_path) -> None:
    model = _fused_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_fusion" in name:
                param.normal_(std=0.3)
    inputs = make_inputs("bert")
    expected = model_logits(model, inputs)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "fusion" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTER_FUSION" and config["adapters"] == ADAPTERS
    fusion_keys = model.get_adapter_state_dict("fusion")
    assert fusion_keys and all(".adapter_fusion." in k for k in fusion_keys)

    loaded = PeftModel.from_pretrained(make_model("bert"), tmp_path / "a", adapter_name="a")
    for name in ("b", "c"):
        loaded.load_adapter(tmp_path / name, name)
    loaded.load_adapter(tmp_path / "fusion", "fusion")
    loaded.set_adapter("fusion")
    torch.testing.assert_close(model_logits(loaded, inputs), expected, atol=0, rtol=0)

    bare = PeftModel.from_pretrained(make_model("bert"), tmp_path / "a", adapter_name="a")
    with pytest.raises(TargetModuleError, match=r"lacks the fused adapter\(s\) \['b', 'c'\]; load them first"):
        bare.load_adapter(tmp_path / "fusion", "fusion")
    assert list(bare.peft_config) == ["a"]


def test_record_fusion_attention_returns_weights_per_layer() -> None:
    model = _fused_model()
    inputs = make_inputs("bert")
    with model.record_fusion_attention("fusion") as attention:
        model_logits(model, inputs)
    assert set(attention) == set(_serial_layers(model))
    for probs in attention.values():
        assert probs.shape == (3, 8, 3)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, 8))
    assert all(m.last_attention is None for m in model.modules() if isinstance(m, AdapterFusionAttention))


def test_prune_fusion_equals_fusion_over_the_rest(tmp_path) -> None:
    model = _fused_model()
    state = dict(model.state_dict())
    model.prune_fusion("fusion", ["b"])
    assert model.peft_config["fusion"].adapters == ["a", "c"]
    smaller = _fused_model(names=["a", "c"])
    smaller.load_state_dict(state)
    inputs = make_inputs("bert")
    torch.testing.assert_close(model_logits(model, inputs), model_logits(smaller, inputs))
    model.save_pretrained(tmp_path, selected_adapters=["fusion"])
    assert json.loads((tmp_path / "fusion" / "adapter_config.json").read_text())["adapters"] == ["a", "c"]
    with pytest.raises(ValueError, match="cannot remove"):
        model.prune_fusion("fusion", ["a", "c"])


def test_skip_layers_skip_fusion_layers_too() -> None:
    model = _fused_model()
    inputs = make_inputs("bert")
    model.set_skip_layers([0, 1])
    torch.testing.assert_close(model_logits(model, inputs), model_logits(make_model("bert"), inputs))


def test_mixed_batch_routes_rows_to_fusion_and_adapters() -> None:
    model = _fused_model()
    inputs = make_inputs("bert", batch=4)
    names = ["fusion", "a", BASE_ADAPTER_NAME, "fusion"]
    mixed = model_logits(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        if name == BASE_ADAPTER_NAME:
            expected = model_logits(make_model("bert"), inputs)
        else:
            model.set_adapter(name)
            expected = model_logits(model, inputs)
        torch.testing.assert_close(mixed[row], expected[row], atol=1e-5, rtol=1e-4)


def test_errors_name_the_fix() -> None:
    model = get_peft_model(make_model("bert"), AdapterConfig(r=4), adapter_name="a")
    model.add_adapter("p", ParallelAdapterConfig(r=4))
    with pytest.raises(PeftConfigError, match="serial adapters"):
        model.add_fusion(["a", "p"], "fusion")
    with pytest.raises(PeftConfigError, match="distinct"):
        AdapterFusionConfig(adapters=["a", "a"])
    model.add_adapter("b", AdapterConfig(r=4))
    model.add_fusion(["a", "b"], "fusion")
    with pytest.raises(ValueError, match="delete those fusions first"):
        model.delete_adapter("a")
    model.delete_adapter("fusion")
    model.delete_adapter("a")
    assert sorted(model.peft_config) == ["b", "p"]
