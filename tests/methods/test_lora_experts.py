"""LoRA on MoE expert parameters (``LoraConfig.target_parameters``) against a hand-written formula and HF peft.

Tiny random Mixtral and Qwen2-MoE models from transformers 5 configs: their experts are 3-D parameters
(``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``), adapted with one low-rank update per expert.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

import peftkit
from peftkit.core.errors import CheckpointError, PeftConfigError, TargetModuleError
from peftkit.methods.lora_experts import LoraParamWrapper

peft = pytest.importorskip("peft")

E, H, I_MIX, I_QWEN, VOCAB = 4, 32, 48, 24, 64
PARAMS = ["gate_up_proj", "down_proj", "gate.weight"]


def tiny_mixtral(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=I_MIX, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=2, max_position_embeddings=64)).eval()


def tiny_qwen_moe(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=48, moe_intermediate_size=I_QWEN,
        shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=E, num_experts_per_tok=2, max_position_embeddings=64)).eval()


MODELS = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen_moe}
IDS = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, **kw).logits


def _perturb(model: nn.Module, seed: int = 5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def _config(lib, **kw):
    return lib.LoraConfig(**{"r": 2, "lora_alpha": 6, "target_modules": [], "target_parameters": PARAMS,
                             "init_lora_weights": False, **kw})


@pytest.mark.parametrize("kind", MODELS)
def test_experts_are_3d_parameters(kind) -> None:
    experts = MODELS[kind]().model.layers[0].mlp.experts
    assert experts.gate_up_proj.dim() == 3 and experts.down_proj.dim() == 3
    assert not any(isinstance(m, nn.Linear) for m in experts.modules())


@pytest.mark.parametrize("kind", MODELS)
def test_hf_checkpoint_loads_with_hf_logits(kind, tmp_path) -> None:
    hf = peft.get_peft_model(MODELS[kind](), _config(peft))
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(MODELS[kind](), tmp_path).eval()
    want = _logits(hf)
    assert (want - _logits(MODELS[kind]())).abs().max() > 1e-2
    assert (_logits(ours) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", MODELS)
def test_peftkit_checkpoint_loads_into_hf_with_same_logits_and_keys(kind, tmp_path) -> None:
    ours = peftkit.get_peft_model(MODELS[kind](), _config(peftkit, rank_pattern={"down_proj": 3}))
    _perturb(ours)
    ours.save_pretrained(tmp_path / "pk")
    hf = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "pk")
    assert (_logits(hf) - _logits(ours.eval())).abs().max() <= 1e-5
    peft.get_peft_model(MODELS[kind](), _config(peft, rank_pattern={"down_proj": 3})).save_pretrained(tmp_path / "hf")
    shapes = {d: {k: tuple(v.shape) for k, v in load_file(tmp_path / d / "adapter_model.safetensors").items()}
              for d in ("pk", "hf")}
    assert shapes["pk"] == shapes["hf"]
    assert shapes["pk"]["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"] == (E * 2, H)
    assert shapes["pk"]["base_model.model.model.layers.0.mlp.experts.lora_B.weight"] == (H, 3 * E)  # down, r=3


def _reference(model: nn.Module, tensors: dict[str, torch.Tensor], scale: dict[str, float]) -> nn.Module:
    """The base model with W'[e] = W[e] + s·B_e A_e written in, read out of HF's layout one element at a time:
    A_e = rows e·r … e·r+r-1 of lora_A, B_e[:, j] = column j·E + e of lora_B."""
    with torch.no_grad():
        for layer_index, layer in enumerate(model.model.layers):
            prefix = f"base_model.model.model.layers.{layer_index}.mlp"
            for param, key in (("gate_up_proj", "experts.base_layer"), ("down_proj", "experts")):
                a, b = tensors[f"{prefix}.{key}.lora_A.weight"], tensors[f"{prefix}.{key}.lora_B.weight"]
                r = a.shape[0] // E
                weight = getattr(layer.mlp.experts, param)
                for e in range(E):
                    a_e = torch.stack([a[e * r + j] for j in range(r)])  # (r, in)
                    b_e = torch.stack([b[:, j * E + e] for j in range(r)], dim=1)  # (out, r)
                    weight[e] += scale[param] * b_e @ a_e
            a, b = tensors[f"{prefix}.gate.lora_A.weight"], tensors[f"{prefix}.gate.lora_B.weight"]
            layer.mlp.gate.weight += scale["gate"] * b @ a
    return model


@pytest.mark.parametrize("kind", MODELS)
def test_update_equals_hand_written_per_expert_formula(kind) -> None:
    ours = peftkit.get_peft_model(MODELS[kind](), _config(peftkit, rank_pattern={"gate_up_proj": 4}, lora_alpha=8))
    _perturb(ours)
    tensors = ours.get_adapter_state_dict("default")
    reference = _reference(MODELS[kind](), tensors, {"gate_up_proj": 8 / 4, "down_proj": 8 / 2, "gate": 8 / 2})
    assert (_logits(ours.eval()) - _logits(reference)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", MODELS)
def test_merge_unmerge_and_merge_and_unload_are_exact(kind) -> None:
    ours = peftkit.get_peft_model(MODELS[kind](), _config(peftkit)).eval()
    _perturb(ours)
    original = {n: p.detach().clone() for n, p in MODELS[kind]().named_parameters()}
    unmerged = _logits(ours)
    ours.merge_adapter()
    assert (_logits(ours) - unmerged).abs().max() <= 1e-5
    ours.merge_adapter()  # idempotent
    assert (_logits(ours) - unmerged).abs().max() <= 1e-5
    ours.unmerge_adapter()
    experts = ours.get_base_model().model.layers[1].mlp.experts.base_layer
    torch.testing.assert_close(experts.gate_up_proj, original["model.layers.1.mlp.experts.gate_up_proj"],
                               atol=1e-6, rtol=0)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, LoraParamWrapper) for m in merged.modules())
    assert (_logits(merged) - unmerged).abs().max() <= 1e-5


def test_unload_gives_back_the_original_module_and_weights() -> None:
    base = tiny_mixtral()
    experts = base.model.layers[0].mlp.experts
    before = experts.down_proj.detach().clone()
    model = peftkit.get_peft_model(base, _config(peftkit))
    _perturb(model)
    plain = model.unload()
    assert plain.model.layers[0].mlp.experts is experts
    assert torch.equal(experts.down_proj, before)


def test_mixed_batch_rows_equal_single_adapter_runs() -> None:
    model = peftkit.get_peft_model(tiny_mixtral(), _config(peftkit))
    model.add_adapter("other", _config(peftkit, lora_alpha=3))
    _perturb(model)
    model.eval()
    model.set_adapter("other")
    other = _logits(model)
    model.set_adapter("default")
    default = _logits(model)
    with model.disable_adapter():
        base = _logits(model)
    mixed = _logits(model, adapter_names=["other", "__base__", "default"])
    torch.testing.assert_close(mixed, torch.stack([other[0], base[1], default[2]]), atol=1e-5, rtol=0)


def test_training_updates_only_the_adapters_and_works_with_gradient_checkpointing() -> None:
    base = tiny_mixtral()
    base.gradient_checkpointing_enable()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=2, target_modules=[], target_parameters=PARAMS))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    lora_b = model.get_adapter_state_dict("default")["base_model.model.model.layers.0.mlp.experts.lora_B.weight"]
    assert lora_b.abs().sum() > 0  # B started at zero: gradients reached it through the checkpointed blocks
    for name, param in model.get_base_model().named_parameters():
        clean = name.replace("base_layer.", "")
        if clean in frozen:
            assert torch.equal(param, frozen[clean]), name


# ---- transformers 4 per-expert checkpoints -----------------------------------------------------------------------
def _v4_checkpoint(directory, kind: str, r: int = 2, alpha: int = 6) -> dict[str, torch.Tensor]:
    """An adapter as HF peft wrote it for transformers 4, whose experts were nn.Linear modules per expert."""
    gen = torch.Generator().manual_seed(11)
    block, names, inter = ("block_sparse_moe", {"w1": "up", "w3": "up", "w2": "down"}, I_MIX) if kind == "mixtral" \
        else ("mlp", {"gate_proj": "up", "up_proj": "up", "down_proj": "down"}, I_QWEN)
    tensors = {}
    for layer in range(2):
        modules = [(f"experts.{e}.{n}", io) for e in range(E) for n, io in names.items()]
        if kind == "qwen2_moe":  # the v4 targets also matched the shared expert's linears
            modules += [(f"shared_expert.{n}", io) for n, io in names.items()]
        for module, io in modules:
            fan_in, fan_out = (H, inter) if io == "up" else (inter, H)
            if module.startswith("shared_expert"):
                fan_in, fan_out = (H, 40) if io == "up" else (40, H)
            key = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * 0.3
    save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(names)}))
    return tensors


def _v4_reference(kind: str, tensors: dict[str, torch.Tensor], scale: float) -> nn.Module:
    """W'[e] = W[e] + s·B A per old per-expert linear, written into the fused stacks (gate rows, then up rows)."""
    model = MODELS[kind]()
    block = "block_sparse_moe" if kind == "mixtral" else "mlp"
    first, second, down = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            def delta(module: str) -> torch.Tensor:
                key = f"base_model.model.model.layers.{index}.{block}.{module}"
                return scale * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]

            experts, inter = layer.mlp.experts, layer.mlp.experts.down_proj.shape[-1]
            for e in range(E):
                experts.gate_up_proj[e, :inter] += delta(f"experts.{e}.{first}")
                experts.gate_up_proj[e, inter:] += delta(f"experts.{e}.{second}")
                experts.down_proj[e] += delta(f"experts.{e}.{down}")
            if kind == "qwen2_moe":
                for name in (first, second, down):
                    getattr(layer.mlp.shared_expert, name).weight += delta(f"shared_expert.{name}")
    return model


def test_transformers4_mixtral_checkpoint_converts_like_hf(tmp_path) -> None:
    tensors = _v4_checkpoint(tmp_path, "mixtral")
    ours = peftkit.PeftModel.from_pretrained(tiny_mixtral(), tmp_path).eval()
    config = ours.peft_config["default"]
    assert config.target_parameters == ["down_proj", "gate_up_proj"] and config.target_modules == []
    assert config.rank_pattern == {r".*\.gate_up_proj": 4} and config.alpha_pattern == {r".*\.gate_up_proj": 12}
    want = _logits(_v4_reference("mixtral", tensors, 6 / 2))
    assert (want - _logits(tiny_mixtral())).abs().max() > 1e-2
    assert (_logits(ours) - want).abs().max() <= 1e-5
    hf = peft.PeftModel.from_pretrained(tiny_mixtral(), tmp_path)
    assert (_logits(hf) - _logits(ours)).abs().max() <= 1e-5
    ours.save_pretrained(tmp_path / "converted")  # saved in the fused layout, which HF reads as it is
    again = peft.PeftModel.from_pretrained(tiny_mixtral(), tmp_path / "converted")
    assert (_logits(again) - want).abs().max() <= 1e-5


def test_transformers4_qwen_moe_checkpoint_keeps_shared_expert_updates(tmp_path) -> None:
    # HF peft drops the shared expert's tensors here (its conversion retargets "gate_proj" & co. to the experts
    # only); peftkit keeps the names that still match linear layers, so the v4 adapter computes what it did.
    tensors = _v4_checkpoint(tmp_path, "qwen2_moe")
    ours = peftkit.PeftModel.from_pretrained(tiny_qwen_moe(), tmp_path).eval()
    want = _logits(_v4_reference("qwen2_moe", tensors, 6 / 2))
    assert (_logits(ours) - want).abs().max() <= 1e-5


# ---- clear errors that change nothing ----------------------------------------------------------------------------
def test_unknown_parameter_is_refused_with_close_names() -> None:
    base = tiny_mixtral()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(TargetModuleError, match="gate_up_proj"):
        peftkit.get_peft_model(base, peftkit.LoraConfig(target_modules=[], target_parameters=["gate_up_prj"]))
    assert [n for n, _ in base.named_modules()] == names


@pytest.mark.parametrize("kw, match", [({"lora_dropout": 0.1}, "lora_dropout"), ({"use_dora": True}, "use_dora"),
                                       ({"init_lora_weights": "orthogonal"}, "init_lora_weights")])
def test_options_without_a_weight_form_are_refused(kw, match) -> None:
    base = tiny_mixtral()
    with pytest.raises(PeftConfigError, match=match):
        peftkit.get_peft_model(base, _config(peftkit, **kw))
    assert not any(isinstance(m, LoraParamWrapper) for m in base.modules())


def test_second_adapter_must_target_the_same_parameters() -> None:
    model = peftkit.get_peft_model(tiny_mixtral(), _config(peftkit))
    keys = sorted(model.state_dict())
    with pytest.raises(PeftConfigError, match="same parameters"):
        model.add_adapter("other", _config(peftkit, target_parameters=["down_proj"]))
    assert sorted(model.state_dict()) == keys and list(model.peft_config) == ["default"]


def test_half_of_a_fused_pair_cannot_be_converted() -> None:
    with pytest.raises(PeftConfigError, match="w3"):
        peftkit.get_peft_model(tiny_mixtral(), peftkit.LoraConfig(target_modules=["w1", "w2"]))


def test_v4_checkpoint_missing_an_expert_is_refused(tmp_path) -> None:
    tensors = _v4_checkpoint(tmp_path, "mixtral")
    del tensors["base_model.model.model.layers.1.block_sparse_moe.experts.2.w2.lora_B.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = tiny_mixtral()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(CheckpointError, match="experts"):
        peftkit.PeftModel.from_pretrained(base, tmp_path)
    assert [n for n, _ in base.named_modules()] == names
