"""BitFit against hand-written references of its formula, the bias selection rule, what training changes, missing
biases (Llama, T5), checkpoint contents, merging and the trainable fraction of BERT-base."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import LayerHolder, make_inputs, make_model, model_logits
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertModel
from transformers.pytorch_utils import Conv1D

from peftkit import AdapterLayer, BitFitConfig, PeftConfigError, PeftModel, TargetModuleError, get_peft_model
from peftkit.methods.bitfit import BitFitLayer

LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 4, 6)),
    "conv1d_gpt2": (lambda: Conv1D(5, 6), lambda: torch.randn(3, 4, 6)),
    "layernorm": (lambda: nn.LayerNorm(6), lambda: torch.randn(3, 4, 6)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 5, 5)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), lambda: torch.randn(2, 4, 5)),
}


def _reference(kind: str, base: nn.Module, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each module's own formula with the adapter's bias in place of its own."""
    with torch.no_grad():
        if kind == "linear":
            return x @ base.weight.T + bias
        if kind == "conv1d_gpt2":  # weight stored (in, out)
            return x @ base.weight + bias
        if kind == "layernorm":
            return F.layer_norm(x, base.normalized_shape, base.weight, bias, base.eps)
        if kind == "conv2d":
            return F.conv2d(x, base.weight, bias, padding=1)
        return F.group_norm(x, base.num_groups, base.weight, bias, base.eps)


def _wrap(layer: nn.Module, **kw) -> PeftModel:
    return get_peft_model(LayerHolder(layer), BitFitConfig(init_bitfit_weights=False, **kw)).eval()


@pytest.mark.parametrize("kind", list(LAYERS))
def test_forward_matches_formula_for_each_layer_type(kind: str) -> None:
    make_layer, make_x = LAYERS[kind]
    base = make_layer()
    with torch.no_grad():
        base.bias.normal_()
    original = base.bias.detach().clone()
    model = _wrap(base)
    bias = model.base_model.model.layer.bitfit_bias["default"]
    assert not torch.equal(bias, original)  # init_bitfit_weights=False: b₀ plus noise
    x = make_x()
    torch.testing.assert_close(model(x), _reference(kind, base, bias, x))
    assert torch.equal(base.bias, original)  # b₀ itself is never written


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_two_active_adapters_add_their_bias_changes(kind: str) -> None:
    make_layer, make_x = LAYERS[kind]
    base = make_layer()
    model = _wrap(base)
    model.add_adapter("second", BitFitConfig(init_bitfit_weights=False))
    model.set_adapter(["default", "second"])
    layer, x = model.base_model.model.layer, make_x()
    bias = layer.bitfit_bias["default"] + layer.bitfit_bias["second"] - base.bias
    torch.testing.assert_close(model(x), _reference(kind, base, bias, x))


def _targets(model: PeftModel) -> list[str]:
    return model.peft_config["default"].target_modules


def test_bias_names_select_modules_by_whole_path_components() -> None:
    model = get_peft_model(make_model("bert"), BitFitConfig(bias_names=["query", "intermediate"]))
    assert _targets(model) == [f"bert.encoder.layer.{i}.{m}" for i in (0, 1)
                               for m in ("attention.self.query", "intermediate.dense")]
    model = get_peft_model(make_model("bert"), BitFitConfig(bias_names=["attention.output"]))
    assert _targets(model) == [f"bert.encoder.layer.{i}.attention.output.{m}" for i in (0, 1)
                               for m in ("dense", "LayerNorm")]


def test_default_selects_every_bias_outside_the_task_head() -> None:
    model = get_peft_model(make_model("bert"), BitFitConfig(task_type="SEQ_CLS"))
    expected = [n for n, m in make_model("bert").named_modules()
                if getattr(m, "bias", None) is not None and not n.startswith("classifier")]
    assert _targets(model) == expected and len(expected) == 1 + 2 * 8 + 1  # emb LN, 8 per layer, pooler
    assert model.peft_config["default"].modules_to_save == ["classifier"]


def test_unknown_bias_name_lists_close_names_and_leaves_model_unchanged() -> None:
    base = make_model("bert")
    with pytest.raises(PeftConfigError, match=r"'querry': close names \['query'\]"):
        get_peft_model(base, BitFitConfig(bias_names=["querry"]))
    with pytest.raises(PeftConfigError, match="'out'"):  # whole components only: "out" is not "output"
        get_peft_model(base, BitFitConfig(bias_names=["out"]))
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())


def test_bias_names_must_be_a_list() -> None:
    with pytest.raises(PeftConfigError, match="bias_names"):
        BitFitConfig(bias_names="query")


def test_training_changes_selected_biases_only() -> None:
    original = make_model("bert")
    reference = {k: v.clone() for k, v in original.state_dict().items()}
    model = get_peft_model(original, BitFitConfig(bias_names=["query", "intermediate"], task_type="SEQ_CLS"))
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**make_inputs("bert")).loss.backward()
        optim.step()
        optim.zero_grad()
    merged = model.merge_and_unload().state_dict()
    selected = {f"bert.encoder.layer.{i}.{m}.bias" for i in (0, 1)
                for m in ("attention.self.query", "intermediate.dense")}
    for key, value in reference.items():
        changed = not torch.equal(merged[key], value)
        assert changed == (key in selected or key.startswith("classifier.")), key


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_model_without_biases_gets_a_clear_error(kind: str) -> None:
    base = make_model(kind)
    with pytest.raises(PeftConfigError, match="add_missing_biases=True"):
        get_peft_model(base, BitFitConfig())
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())


def test_bias_less_module_in_target_modules_gets_a_clear_error() -> None:
    with pytest.raises(PeftConfigError, match="no bias"):
        get_peft_model(LayerHolder(nn.Linear(4, 3, bias=False)), BitFitConfig(target_modules=["layer"]))
    with pytest.raises(TargetModuleError, match="nn.LayerNorm"):
        get_peft_model(LayerHolder(nn.Embedding(5, 3)), BitFitConfig(target_modules=["layer"]))


def test_added_biases_start_at_zero_merge_into_the_linear_and_unload_cleanly() -> None:
    original = make_model("llama")
    keys, inputs = set(original.state_dict()), make_inputs("llama")
    base_logits = model_logits(original, inputs)
    model = get_peft_model(original, BitFitConfig(add_missing_biases=True, bias_names=["mlp"]))
    assert len(_targets(model)) == 2 * 3  # gate, up, down per layer; the LM head is not added by default
    torch.testing.assert_close(model_logits(model, inputs), base_logits)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.bitfit_bias["default"].normal_()
    adapted = model_logits(model, inputs)
    model.merge_adapter()
    assert torch.equal(layer.get_base_layer().bias, layer.bitfit_bias["default"])
    torch.testing.assert_close(model_logits(model, inputs), adapted)
    model.unmerge_adapter()
    assert layer.get_base_layer().bias is None
    unloaded = model.unload()
    assert set(unloaded.state_dict()) == keys and unloaded.model.layers[0].mlp.down_proj.bias is None


def test_checkpoint_holds_the_chosen_biases_under_their_own_names(tmp_path) -> None:
    model = get_peft_model(make_model("gpt2"), BitFitConfig(init_bitfit_weights=False, bias_names=["ln_f", "c_fc"]))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    names = ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc", "transformer.ln_f"]
    assert sorted(saved) == [f"base_model.model.{n}.bias" for n in names]
    for name in names:
        torch.testing.assert_close(saved[f"base_model.model.{name}.bias"],
                                   model.base_model.model.get_submodule(name).bitfit_bias["default"].detach())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT" and config["target_modules"] == names
    plain = make_model("gpt2")  # the checkpoint is a partial state dict of the fine-tuned model
    plain.load_state_dict({k.removeprefix("base_model.model."): v for k, v in saved.items()}, strict=False)
    inputs = make_inputs("gpt2")
    torch.testing.assert_close(model_logits(plain, inputs), model_logits(model.eval(), inputs))


def test_merge_writes_adapter_bias_and_unmerge_restores_bit_identical() -> None:
    model, inputs = get_peft_model(make_model("opt"), BitFitConfig(init_bitfit_weights=False)), make_inputs("opt")
    model.eval()
    layer = model.base_model.model.model.decoder.layers[0].fc1
    original = layer.get_base_layer().bias.detach().clone()
    expected = model_logits(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(layer.get_base_layer().bias, layer.bitfit_bias["default"].detach())
    torch.testing.assert_close(model_logits(model, inputs), expected, atol=1e-6, rtol=1e-5)
    model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().bias, original)


def test_mixed_batch_on_channel_biases() -> None:
    base = nn.Conv2d(3, 4, 3, padding=1)
    model = _wrap(base)
    model.add_adapter("second", BitFitConfig(init_bitfit_weights=False))
    x = torch.randn(3, 3, 5, 5)
    mixed = model(x, adapter_names=["second", "__base__", "default"])
    layer = model.base_model.model.layer
    for row, bias in enumerate([layer.bitfit_bias["second"], base.bias, layer.bitfit_bias["default"]]):
        torch.testing.assert_close(mixed[row:row + 1], _reference("conv2d", base, bias, x[row:row + 1]))


def test_trainable_fraction_of_bert_base_is_about_a_tenth_of_a_percent() -> None:
    # The real BERT-base shapes (12 layers, hidden 768) on the meta device: counted exactly, nothing allocated.
    with torch.device("meta"):
        model = get_peft_model(BertModel(BertConfig()), BitFitConfig())
    trainable, total = model.get_nb_trainable_parameters()
    biases_per_layer = 4 * 768 + 3072 + 768 + 2 * 768  # q, k, v, attention out; FFN in, out; two LayerNorms
    assert trainable == 12 * biases_per_layer + 768 + 768  # + embedding LayerNorm and pooler
    assert 0.0008 < trainable / (total - trainable) < 0.001  # of the base model's 109.5M parameters
    assert all(isinstance(m, BitFitLayer) for n, m in model.named_modules() if n.endswith(".intermediate.dense"))


def test_half_precision_base_keeps_fp32_biases() -> None:
    model = _wrap(nn.Linear(6, 5).to(torch.bfloat16))
    assert model.base_model.model.layer.bitfit_bias["default"].dtype == torch.float32
    assert model(torch.randn(2, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16
