"""(IA)³ against hand-written references of its formula (layer and model level), merging, architecture defaults,
config checks and Hugging Face peft interop in both directions."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import LayerHolder, make_inputs, make_model, model_logits
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import IA3Config, PeftConfigError, PeftModel, TargetModuleError, get_peft_model
from peftkit.methods.ia3 import DEFAULT_FEEDFORWARD, DEFAULT_TARGETS, IA3Layer

LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 4, 6)),
    "conv1d_gpt2": (lambda: Conv1D(5, 6), lambda: torch.randn(3, 4, 6)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 5, 5)),
}


def _wrap(layer: nn.Module, feedforward: bool, adapter_name: str = "default") -> PeftModel:
    config = IA3Config(target_modules=["layer"], feedforward_modules=["layer"] if feedforward else [],
                       init_ia3_weights=False)
    return get_peft_model(LayerHolder(layer), config, adapter_name=adapter_name).eval()


def _reference(kind: str, base: nn.Module, scale: torch.Tensor, feedforward: bool, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula, written out: ``W (l ⊙ x) + b`` or ``l ⊙ (W x + b)``, per feature (or channel)."""
    with torch.no_grad():
        if kind == "conv2d":
            shaped = scale.view(1, -1, 1, 1)
            if feedforward:
                return F.conv2d(x * shaped, base.weight, base.bias, padding=1)
            return F.conv2d(x, base.weight, base.bias, padding=1) * shaped
        weight = base.weight if kind == "conv1d_gpt2" else base.weight.T  # (in, out)
        if feedforward:
            return (x * scale) @ weight + base.bias
        return (x @ weight + base.bias) * scale


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("feedforward", [False, True])
def test_forward_matches_formula_for_each_layer_type(kind: str, feedforward: bool) -> None:
    make_layer, make_x = LAYERS[kind]
    base = make_layer()
    model = _wrap(base, feedforward)
    layer = model.base_model.model.layer
    vector = layer.ia3_l["default"]
    expected_shape = {("conv2d", True): (1, 3, 1, 1), ("conv2d", False): (1, 4, 1, 1)}.get(
        (kind, feedforward), (1, 6) if feedforward else (5, 1))
    assert tuple(vector.shape) == expected_shape  # HF peft's layout, so checkpoints interoperate
    x = make_x()
    torch.testing.assert_close(model(x), _reference(kind, base, vector.flatten(), feedforward, x))


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("feedforward", [False, True])
def test_two_active_adapters_multiply_their_vectors(kind: str, feedforward: bool) -> None:
    make_layer, make_x = LAYERS[kind]
    base = make_layer()
    model = _wrap(base, feedforward)
    model.add_adapter("second", IA3Config(target_modules=["layer"], feedforward_modules=["layer"] if feedforward
                                          else [], init_ia3_weights=False))
    model.set_adapter(["default", "second"])
    layer, x = model.base_model.model.layer, make_x()
    scale = (layer.ia3_l["default"] * layer.ia3_l["second"]).flatten()
    torch.testing.assert_close(model(x), _reference(kind, base, scale, feedforward, x))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_mixed_batch_scales_each_row_by_its_adapter(kind: str, feedforward: bool) -> None:
    make_layer, make_x = LAYERS[kind]
    base = make_layer()
    model = _wrap(base, feedforward)
    model.add_adapter("second", IA3Config(target_modules=["layer"], feedforward_modules=["layer"] if feedforward
                                          else [], init_ia3_weights=False))
    layer, x = model.base_model.model.layer, torch.cat([make_x(), make_x()])[:3]
    mixed = model(x, adapter_names=["second", "__base__", "default"])
    size = layer.in_features if feedforward else layer.out_features
    for row, name in enumerate(["second", None, "default"]):
        scale = layer.ia3_l[name].flatten() if name else torch.ones(size)
        torch.testing.assert_close(mixed[row:row + 1], _reference(kind, base, scale, feedforward, x[row:row + 1]))


def _hooked_reference(kind: str, peft_model: PeftModel) -> nn.Module:
    """The same base weights with (IA)³ applied by forward hooks from the vectors: an independent formula."""
    reference = make_model(kind)
    for name, layer in peft_model.base_model.model.named_modules():
        if not isinstance(layer, IA3Layer):
            continue
        vector = layer.ia3_l["default"].detach().flatten()
        module = reference.get_submodule(name)
        if layer.is_feedforward:
            module.register_forward_pre_hook(lambda _m, args, v=vector: (args[0] * v, *args[1:]))
        else:
            module.register_forward_hook(lambda _m, _args, out, v=vector: out * v)
    return reference


@pytest.mark.parametrize(
    ("kind", "feedforward"),
    [
        # HF's str.endswith rule marks BERT's attention.output.dense as feed-forward too (input side).
        ("bert", ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
                  "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense"]),
        ("gpt2", ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]),  # Conv1D: weight stored (in, out)
    ],
)
def test_model_logits_match_hooked_reference(kind: str, feedforward: list[str]) -> None:
    model = get_peft_model(make_model(kind), IA3Config(init_ia3_weights=False)).eval()
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, IA3Layer)}
    assert [n for n, m in layers.items() if m.is_feedforward] == feedforward
    inputs = make_inputs(kind)
    base = model_logits(make_model(kind), inputs)
    expected = model_logits(_hooked_reference(kind, model), inputs)
    assert (expected - base).abs().max() > 1e-4  # the vectors do change the model (tiny BERT logits are ~1e-2)
    torch.testing.assert_close(model_logits(model, inputs), expected)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "roberta", "llama", "t5", "opt"])
def test_default_targets_and_feedforward_follow_hf(kind: str) -> None:
    model = get_peft_model(make_model(kind), IA3Config())
    config = model.peft_config["default"]
    model_type = model.config.model_type
    assert config.target_modules == DEFAULT_TARGETS[model_type]
    assert config.feedforward_modules == DEFAULT_FEEDFORWARD[model_type]


def test_default_tables_equal_hf_peft_mappings() -> None:
    constants = pytest.importorskip("peft.utils.constants")
    assert DEFAULT_TARGETS == constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    assert DEFAULT_FEEDFORWARD == constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING


def test_merge_parity_and_exact_unmerge_with_zero_entries() -> None:
    model, inputs = get_peft_model(make_model("bert"), IA3Config(init_ia3_weights=False)).eval(), make_inputs("bert")
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.key
    with torch.no_grad():
        layer.ia3_l["default"][:3] = 0.0  # not invertible by division: the pre-merge weights are kept
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = model_logits(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(model_logits(model, inputs), expected, atol=1e-5, rtol=1e-4)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=1e-6)
    assert torch.equal(layer.get_base_layer().weight, weights["base_model.model.bert.encoder.layer.0.attention."
                                                                "self.key.base_layer.weight"])


def test_safe_merge_of_non_finite_vector_raises_and_merges_nothing() -> None:
    model = get_peft_model(make_model("gpt2"), IA3Config(init_ia3_weights=False))
    layer = model.base_model.model.transformer.h[1].mlp.c_proj
    with torch.no_grad():
        layer.ia3_l["default"][0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="'default'"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not layer.merged


def test_feedforward_must_be_subset_of_targets() -> None:
    with pytest.raises(PeftConfigError, match="feedforward_modules"):
        IA3Config(target_modules=["k", "v"], feedforward_modules=["wo"])


def test_unknown_architecture_needs_explicit_feedforward_modules() -> None:
    with pytest.raises(PeftConfigError, match="feedforward_modules"):
        get_peft_model(LayerHolder(nn.Linear(4, 4)), IA3Config(target_modules=["layer"]))
    model = get_peft_model(LayerHolder(nn.Linear(4, 4)), IA3Config(target_modules=["layer"], feedforward_modules=[]))
    assert not model.base_model.model.layer.is_feedforward


def test_adapters_disagreeing_on_the_side_are_rejected() -> None:
    model = _wrap(nn.Linear(4, 3), feedforward=False)
    with pytest.raises(TargetModuleError, match="feed-forward"):
        model.add_adapter("other", IA3Config(target_modules=["layer"], feedforward_modules=["layer"]))
    assert model.base_model.model.layer.adapter_names == ["default"]


def test_unsupported_module_names_the_supported_ones() -> None:
    with pytest.raises(TargetModuleError, match="nn.Linear"):
        get_peft_model(LayerHolder(nn.Embedding(5, 3)), IA3Config(target_modules=["layer"], feedforward_modules=[]))


def test_half_precision_base_keeps_fp32_vectors() -> None:
    model = _wrap(nn.Linear(6, 5).to(torch.bfloat16), feedforward=True)
    layer = model.base_model.model.layer
    assert layer.ia3_l["default"].dtype == torch.float32
    assert model(torch.randn(2, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- Hugging Face peft interop -----------------------------------------------------------------------------------
INTEROP = {
    "gpt2-defaults": ("gpt2", {}),
    "bert-seqcls": ("bert", {"task_type": "SEQ_CLS"}),
    "llama-defaults": ("llama", {}),
    "t5-explicit": ("t5", {"target_modules": ["q", "v", "wi", "wo"], "feedforward_modules": ["wo"]}),
}


def _perturb(model: nn.Module, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def _check_close(kind: str, ours: nn.Module, theirs: nn.Module) -> None:
    inputs = make_inputs(kind)
    got, want = model_logits(ours.eval(), inputs), model_logits(theirs.eval(), inputs)
    assert (want - model_logits(make_model(kind), inputs)).abs().max() > 1e-3, "vacuous: the adapter does nothing"
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", list(INTEROP))
def test_peftkit_checkpoint_loads_in_hf_peft(case: str, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    kind, kw = INTEROP[case]
    ours = get_peft_model(make_model(kind), IA3Config(init_ia3_weights=False, **kw))
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    assert all(k.endswith(".ia3_l") or ".classifier." in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    theirs = peft.PeftModel.from_pretrained(make_model(kind), tmp_path)
    assert isinstance(theirs.peft_config["default"], peft.IA3Config)
    _check_close(kind, ours, theirs)


@pytest.mark.parametrize("case", list(INTEROP))
def test_hf_peft_checkpoint_loads_in_peftkit(case: str, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    kind, kw = INTEROP[case]
    theirs = peft.get_peft_model(make_model(kind), peft.IA3Config(init_ia3_weights=False, **kw))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "IA3"
    ours = PeftModel.from_pretrained(make_model(kind), tmp_path)
    assert isinstance(ours.peft_config["default"], IA3Config)
    want = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert {k: tuple(v.shape) for k, v in ours.get_adapter_state_dict("default").items()} == want
    _check_close(kind, ours, theirs)
