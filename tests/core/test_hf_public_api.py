"""HF peft's public names behave as in HF peft: a script ported by changing its import runs and computes the same.

Where HF peft is the reference (state-dict keys, rescaled logits, EVA / orthogonal checkpoints) the test builds
the same adapter in both libraries and compares; elsewhere it checks the behaviour the name promises.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import make_inputs, make_model, model_logits

import peftkit
from peftkit import (
    CheckpointError,
    LoraConfig,
    PeftConfigError,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForSequenceClassification,
    PeftType,
    TaskType,
    get_peft_model,
)

peft = pytest.importorskip("peft")


def _perturb(model: torch.nn.Module, seed: int = 7) -> None:
    """Move every trainable tensor as training would, so the adapter changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))


def _trained(kind: str = "gpt2", **kw) -> PeftModel:
    model = get_peft_model(make_model(kind), LoraConfig(r=4, lora_alpha=8, **kw))
    _perturb(model)
    return model.eval()


# ---- enums and task classes --------------------------------------------------------------------------------------
def test_task_type_and_peft_type_are_string_enums_that_save_as_plain_strings(tmp_path: Path) -> None:
    config = LoraConfig(task_type=TaskType.CAUSAL_LM)
    assert config.task_type == "CAUSAL_LM" and LoraConfig(task_type="CAUSAL_LM").task_type is TaskType.CAUSAL_LM
    assert config.peft_type == PeftType.LORA and PeftType("IA3") is PeftType.IA3
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and saved["peft_type"] == "LORA"
    assert peft.LoraConfig.from_pretrained(str(tmp_path)).task_type == "CAUSAL_LM"  # HF reads it
    assert set(PeftType) >= {PeftType.LORA, PeftType.ADALORA, PeftType.IA3, PeftType.PROMPT_TUNING}
    with pytest.raises(PeftConfigError, match="TaskType"):
        LoraConfig(task_type="CAUSAL")


@pytest.mark.parametrize("task_type, cls", [
    ("CAUSAL_LM", peftkit.PeftModelForCausalLM), ("SEQ_CLS", peftkit.PeftModelForSequenceClassification),
    ("SEQ_2_SEQ_LM", peftkit.PeftModelForSeq2SeqLM), ("TOKEN_CLS", peftkit.PeftModelForTokenClassification),
    ("QUESTION_ANS", peftkit.PeftModelForQuestionAnswering),
    ("FEATURE_EXTRACTION", peftkit.PeftModelForFeatureExtraction), (None, PeftModel),
])
def test_get_peft_model_returns_hf_peft_s_class_for_the_task_type(task_type, cls, tmp_path: Path) -> None:
    kind = {"SEQ_CLS": "bert", "TOKEN_CLS": "bert", "QUESTION_ANS": "bert", "SEQ_2_SEQ_LM": "t5"}.get(task_type,
                                                                                                  "gpt2")
    targets = {"bert": ["query", "value"], "t5": ["q", "v"], "gpt2": ["c_attn"]}[kind]
    model = get_peft_model(make_model(kind), LoraConfig(task_type=task_type, target_modules=targets))
    assert type(model) is cls and isinstance(model, PeftModel)
    assert peftkit.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type, PeftModel) is cls
    model.save_pretrained(tmp_path)
    assert type(PeftModel.from_pretrained(make_model(kind), tmp_path)) is cls


def test_task_class_fills_a_missing_task_type_and_trains_the_head() -> None:
    model = PeftModelForSequenceClassification(make_model("bert"), LoraConfig(target_modules=["query", "value"]))
    assert model.peft_config["default"].task_type == "SEQ_CLS"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save.default" in n for n in trainable)


def test_task_class_refuses_a_config_of_another_task_and_leaves_the_model_as_it_was() -> None:
    base = make_model("gpt2")
    before = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(PeftConfigError, match="CAUSAL_LM.*SEQ_CLS|SEQ_CLS"):
        PeftModelForCausalLM(base, LoraConfig(task_type="SEQ_CLS", target_modules=["c_attn"]))
    assert {n: p.requires_grad for n, p in base.named_parameters()} == before
    assert not any("lora" in n for n, _ in base.named_modules())


# ---- get_peft_model's arguments ----------------------------------------------------------------------------------
def test_get_peft_model_honours_hf_keyword_arguments(tmp_path: Path) -> None:
    mixed = get_peft_model(make_model("gpt2"), LoraConfig(task_type="CAUSAL_LM"), mixed=True)
    assert type(mixed) is PeftModel
    mixed.add_adapter("ia3", peftkit.IA3Config(target_modules=["c_fc"], feedforward_modules=[]))
    mixed.set_adapter(["default", "ia3"])  # adapters of two methods active together, as PeftMixedModel allows

    with_revision = get_peft_model(make_model("gpt2"), LoraConfig(), revision="v1.2")
    with_revision.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["revision"] == "v1.2"

    with pytest.raises(ValueError, match="low_cpu_mem_usage"):
        get_peft_model(make_model("gpt2"), LoraConfig(), low_cpu_mem_usage=True)
    with pytest.raises(TypeError, match="save_embedding_layers"):
        get_peft_model(make_model("gpt2"), LoraConfig(), save_embedding_layers=True)


@pytest.mark.parametrize("autocast, dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_autocast_adapter_dtype_decides_the_dtype_of_adapters_on_a_bf16_base(autocast, dtype) -> None:
    base = make_model("llama").to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                           autocast_adapter_dtype=autocast)
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes == {dtype}
    loss = model(**make_inputs("llama")).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


# ---- state dicts -------------------------------------------------------------------------------------------------
def test_get_peft_model_state_dict_gives_hf_peft_s_keys_and_the_saved_tensors(tmp_path: Path) -> None:
    model = _trained("llama", target_modules=["q_proj", "v_proj"])
    ours = peftkit.get_peft_model_state_dict(model)
    hf_model = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4, lora_alpha=8,
                                                                        target_modules=["q_proj", "v_proj"]))
    assert set(ours) == set(peft.get_peft_model_state_dict(hf_model))
    model.save_pretrained(tmp_path)
    saved = peftkit.load_peft_weights(tmp_path)
    assert set(saved) == set(ours) and all(torch.equal(saved[k], ours[k]) for k in ours)
    full = peftkit.get_peft_model_state_dict(model, save_embedding_layers=True)  # HF's keys for the matrices
    assert set(full) - set(ours) == {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
    assert set(full) - set(ours) == set(peft.get_peft_model_state_dict(hf_model, save_embedding_layers=True)) - set(
        ours)


def test_set_peft_model_state_dict_loads_into_a_fresh_adapter_and_refuses_what_does_not_fit() -> None:
    source = _trained("gpt2")
    inputs = make_inputs("gpt2")
    target = get_peft_model(make_model("gpt2"), LoraConfig(r=4, lora_alpha=8)).eval()
    result = peftkit.set_peft_model_state_dict(target, peftkit.get_peft_model_state_dict(source))
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(model_logits(target, inputs), model_logits(source, inputs), rtol=0, atol=0)

    other = get_peft_model(make_model("gpt2"), LoraConfig(r=2, lora_alpha=8)).eval()
    expected = model_logits(other, inputs)
    with pytest.raises(CheckpointError, match="shape of"):
        peftkit.set_peft_model_state_dict(other, peftkit.get_peft_model_state_dict(source))
    torch.testing.assert_close(model_logits(other, inputs), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):
        peftkit.set_peft_model_state_dict(other, {}, ignore_mismatched_sizes=True)


def test_inject_adapter_in_model_adapts_the_bare_model_with_hf_peft_s_keys() -> None:
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    inputs = make_inputs("llama")
    base_logits = model_logits(make_model("llama"), inputs)
    model = peftkit.inject_adapter_in_model(LoraConfig(**config), make_model("llama"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n}
    assert not torch.allclose(model_logits(model, inputs), base_logits)
    hf = peft.inject_adapter_in_model(peft.LoraConfig(**config), make_model("llama"))
    ours = peftkit.get_peft_model_state_dict(model)
    assert set(ours) == set(peft.get_peft_model_state_dict(hf))
    # HF's tensors loaded into ours give HF's logits
    peftkit.set_peft_model_state_dict(model, peft.get_peft_model_state_dict(hf))
    torch.testing.assert_close(model_logits(model, inputs), model_logits(hf, inputs), rtol=0, atol=1e-6)


def test_inject_adapter_in_model_refuses_prompt_methods_and_leaves_the_model_unchanged() -> None:
    model = make_model("gpt2")
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(PeftConfigError, match="get_peft_model"):
        peftkit.inject_adapter_in_model(peftkit.PromptTuningConfig(num_virtual_tokens=4), model)
    assert [n for n, _ in model.named_modules()] == names
    assert all(p.requires_grad for p in model.parameters())


# ---- status, enabling, gradients, scales -------------------------------------------------------------------------
def test_layer_and_model_status_report_what_each_layer_holds() -> None:
    model = _trained("gpt2")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"]))
    layers = peftkit.get_layer_status(model)
    assert [s.name for s in layers] == ["model.transformer.h.0.attn.c_attn", "model.transformer.h.1.attn.c_attn"]
    assert layers[0].available_adapters == ["default", "other"] and layers[0].active_adapters == ["default"]
    assert layers[0].requires_grad == {"default": True, "other": False}
    status = model.get_model_status()
    assert status.peft_types == {"default": "LORA", "other": "LORA"} and status.num_adapter_layers == 2
    assert status.active_adapters == ["default"] and status.merged_adapters == [] and status.enabled is True
    assert status.trainable_params == model.get_nb_trainable_parameters()[0]
    # one layer merged by hand: the model's report says so instead of picking one layer's answer
    model.base_model.model.transformer.h[0].attn.c_attn.merge(["default"])
    assert model.get_model_status().merged_adapters == "irregular"


def test_disable_adapter_layers_gives_the_base_model_until_enabled_again_merged_or_not() -> None:
    inputs = make_inputs("gpt2")
    base_logits = model_logits(make_model("gpt2"), inputs)
    model = _trained("gpt2")
    adapted = model_logits(model, inputs)
    model.merge_adapter()
    model.base_model.disable_adapter_layers()  # HF scripts call it on the tuner
    torch.testing.assert_close(model_logits(model, inputs), base_logits, rtol=0, atol=1e-6)
    assert not model.get_model_status().enabled and model.get_model_status().merged_adapters == []
    model.enable_adapter_layers()
    torch.testing.assert_close(model_logits(model, inputs), adapted, rtol=0, atol=1e-6)


def test_set_requires_grad_and_set_adapter_inference_mode() -> None:
    model = _trained("gpt2")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"]))

    def trainable() -> set[str]:
        return {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}

    assert trainable() == {"default"}
    model.set_requires_grad("other")
    assert trainable() == {"default", "other"}
    peftkit.set_requires_grad(model, ["default", "other"], requires_grad=False)
    assert trainable() == set()
    model.set_adapter("other")
    assert trainable() == {"other"}
    model.set_adapter("other", inference_mode=True)
    assert trainable() == set()
    with pytest.raises(peftkit.AdapterNotFoundError, match="nope"):
        model.set_requires_grad("nope")


def test_rescale_adapter_scale_matches_hf_peft_and_restores_the_scale() -> None:
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    inputs = make_inputs("llama")
    ours = get_peft_model(make_model("llama"), LoraConfig(**kw)).eval()
    hf = peft.get_peft_model(make_model("llama"), peft.LoraConfig(**kw)).eval()
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf))
    full = model_logits(ours, inputs)
    with peftkit.rescale_adapter_scale(ours, 0.5), peft.helpers.rescale_adapter_scale(hf, 0.5):
        half = model_logits(ours, inputs)
        torch.testing.assert_close(half, model_logits(hf, inputs), rtol=0, atol=1e-5)
    assert not torch.allclose(half, full)
    torch.testing.assert_close(model_logits(ours, inputs), full, rtol=0, atol=0)
    with peftkit.rescale_adapter_scale(ours, 0):
        torch.testing.assert_close(model_logits(ours, inputs), model_logits(make_model("llama"), inputs),
                                   rtol=0, atol=1e-6)
    ours.merge_adapter()
    with pytest.raises(ValueError, match="merged"), peftkit.rescale_adapter_scale(ours, 0.5):
        pass
    with pytest.raises(ValueError, match="no adapter layer with a scale"), peftkit.rescale_adapter_scale(
            get_peft_model(make_model("gpt2"), peftkit.IA3Config()), 0.5):
        pass


def test_set_scale_on_one_layer_scales_that_layer_s_update() -> None:
    model = _trained("gpt2")
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 3, 32)
    base = layer.base_layer(x)
    full = layer(x) - base
    layer.set_scale("default", 2.0)
    torch.testing.assert_close(layer(x) - base, 2 * full, rtol=1e-5, atol=1e-6)
    assert layer.adapter_scale("default") == pytest.approx(2.0)
    layer.set_scale("default", 1.0)
    torch.testing.assert_close(layer(x) - base, full, rtol=0, atol=1e-6)


# ---- lenient where the math is unchanged, strict where it is not -------------------------------------------------
def _hf_checkpoint(tmp_path: Path, **lora_kw) -> tuple[Path, torch.Tensor]:
    hf = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4, lora_alpha=8,
                                                                  target_modules=["q_proj", "v_proj"], **lora_kw))
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    return tmp_path, model_logits(hf.eval(), make_inputs("llama"))


def _rewrite(directory: Path, **fields) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_an_ordinary_hf_checkpoint_loads_without_a_warning(tmp_path: Path, caplog) -> None:
    directory, expected = _hf_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        model = PeftModel.from_pretrained(make_model("llama"), directory)
    assert [r for r in caplog.records if r.name.startswith("peftkit")] == []
    torch.testing.assert_close(model_logits(model, make_inputs("llama")), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fields", [{"enable_lora": None, "merge_weights": False}, {"some_future_field": None},
                                    {"future_flag": False, "future_options": {}}])
def test_unset_fields_of_other_peft_versions_load(tmp_path: Path, caplog, fields: dict) -> None:
    directory, expected = _hf_checkpoint(tmp_path)
    _rewrite(directory, **fields)
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        model = PeftModel.from_pretrained(make_model("llama"), directory)
    torch.testing.assert_close(model_logits(model, make_inputs("llama")), expected, rtol=0, atol=1e-5)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("peftkit")]
    known_to_hf = {"enable_lora", "merge_weights"}
    if set(fields) <= known_to_hf:
        assert warnings == []
    else:
        assert len(warnings) == 1 and all(name in warnings[0] for name in fields)


@pytest.mark.parametrize("fields", [{"some_future_field": True}, {"future_scale": 0.5}, {"enable_lora": [True]}])
def test_fields_that_would_change_the_computation_are_refused_and_the_model_is_unchanged(tmp_path: Path,
                                                                                         fields: dict) -> None:
    directory, _ = _hf_checkpoint(tmp_path)
    _rewrite(directory, **fields)
    base = make_model("llama")
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(PeftConfigError, match=next(iter(fields))):
        PeftModel.from_pretrained(base, directory)
    assert [n for n, _ in base.named_modules()] == names


@pytest.mark.parametrize("init", ["eva", "orthogonal"])
def test_eva_and_orthogonal_init_checkpoints_from_hf_load_with_hf_logits(tmp_path: Path, init: str) -> None:
    extra = {"eva_config": peft.EvaConfig(rho=2.0)} if init == "eva" else {}
    directory, expected = _hf_checkpoint(tmp_path, init_lora_weights=init, **extra)
    model = PeftModel.from_pretrained(make_model("llama"), directory)
    assert model.peft_config["default"].init_lora_weights == init
    torch.testing.assert_close(model_logits(model, make_inputs("llama")), expected, rtol=0, atol=1e-5)


def test_orthogonal_init_starts_from_a_zero_update_with_both_factors_non_zero() -> None:
    inputs = make_inputs("gpt2")
    model = get_peft_model(make_model("gpt2"), LoraConfig(r=4, init_lora_weights="orthogonal")).eval()
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.abs().min() > 0 and b.abs().sum() > 0
    torch.testing.assert_close(b @ a, torch.zeros(b.shape[0], a.shape[1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(model_logits(model, inputs), model_logits(make_model("gpt2"), inputs),
                               rtol=0, atol=1e-5)
    with pytest.raises(PeftConfigError, match="even rank"):
        LoraConfig(r=3, init_lora_weights="orthogonal")
    with pytest.raises(PeftConfigError, match="changes the base weights"):
        LoraConfig(init_lora_weights="lora_ga")  # PiSSA & co.: tests/methods/test_lora_init.py
