"""Checkpoints move between peftkit and Hugging Face peft 0.21 in both directions with the same logits (fp32).

Every test builds fresh base models: HF's ``get_peft_model`` mutates the model it is given, so the two libraries
never share a module. Adapters are perturbed after creation (as training would) so that B, the task head copy
and every pattern-specific rank actually change the logits.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from conftest import make_inputs, make_model, model_logits
from safetensors.torch import load_file

import peftkit

peft = pytest.importorskip("peft")

TOL = 1e-5

# id -> (model kind, LoraConfig kwargs shared by both libraries)
CASES: dict[str, tuple[str, dict]] = {
    "gpt2-default-targets": ("gpt2", {"r": 4, "lora_alpha": 8}),
    "bert-seqcls": ("bert", {"r": 4, "lora_alpha": 8, "task_type": "SEQ_CLS"}),
    "llama-attn-mlp": ("llama", {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "t5-default-targets": ("t5", {"r": 4, "lora_alpha": 8}),
    "opt-attn-fc1": ("opt", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "fc1"]}),
    "gpt2-embedding": ("gpt2", {"r": 4, "lora_alpha": 8, "target_modules": ["wte", "c_attn", "c_fc"]}),
    "llama-embedding": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}),
    "llama-rank-alpha-pattern": ("llama", {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "rank_pattern": {"k_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        "alpha_pattern": {"o_proj": 16, "v_proj": 3},
    }),
    "opt-rslora": ("opt", {"r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]}),
    "t5-rslora-pattern": ("t5", {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q", "v", "wo"],
                                 "rank_pattern": {"wo": 8}}),
}
IDS = list(CASES)


def _hf_model(kind: str, kw: dict, adapter_name: str = "default"):
    return peft.get_peft_model(make_model(kind, seed=0), peft.LoraConfig(init_lora_weights=False, **kw),
                               adapter_name=adapter_name)


def _pk_model(kind: str, kw: dict, adapter_name: str = "default") -> peftkit.PeftModel:
    return peftkit.get_peft_model(make_model(kind, seed=0), peftkit.LoraConfig(init_lora_weights=False, **kw),
                                  adapter_name=adapter_name)


def _perturb(model: torch.nn.Module, seed: int = 7) -> None:
    """Move every trainable tensor (LoRA A/B, head copies) as a few training steps would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


@cache
def _base_logits(kind: str) -> torch.Tensor:
    return model_logits(make_model(kind, seed=0), make_inputs(kind))


def _compare(kind: str, ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    inputs = make_inputs(kind)
    got, want = model_logits(ours.eval(), inputs), model_logits(theirs.eval(), inputs)
    assert (want - _base_logits(kind)).abs().max() > 1e-3, "the adapter leaves the logits unchanged: vacuous test"
    assert (got - want).abs().max().item() <= TOL


def _keys(directory: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(directory / "adapter_model.safetensors").items()}


# ---- both directions -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", IDS)
def test_hf_checkpoint_loads_into_peftkit_with_same_logits(case, tmp_path) -> None:
    kind, kw = CASES[case]
    hf = _hf_model(kind, kw)
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(make_model(kind, seed=0), tmp_path)
    _compare(kind, ours, hf)


@pytest.mark.parametrize("case", IDS)
def test_peftkit_checkpoint_loads_into_hf_with_same_logits(case, tmp_path) -> None:
    kind, kw = CASES[case]
    ours = _pk_model(kind, kw)
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(make_model(kind, seed=0), tmp_path)
    _compare(kind, hf, ours)


@pytest.mark.parametrize("case", IDS)
def test_safetensors_key_sets_identical_for_same_config(case, tmp_path) -> None:
    kind, kw = CASES[case]
    # HF peft also copies whole base embedding matrices of "embed_tokens"/"lm_head" targets by default
    # (save_embedding_layers="auto"); that optional extra is checked by the loading tests, not here.
    _hf_model(kind, kw).save_pretrained(tmp_path / "hf", save_embedding_layers=False)
    _pk_model(kind, kw).save_pretrained(tmp_path / "pk")
    hf_keys, pk_keys = _keys(tmp_path / "hf"), _keys(tmp_path / "pk")
    assert sorted(pk_keys) == sorted(hf_keys)
    assert pk_keys == hf_keys  # and the shapes (ranks from rank_pattern) agree


@pytest.mark.parametrize("case", ["bert-seqcls", "llama-rank-alpha-pattern", "opt-rslora"])
def test_saved_config_fields_read_the_same_by_both_libraries(case, tmp_path) -> None:
    kind, kw = CASES[case]
    _pk_model(kind, kw).save_pretrained(tmp_path / "pk")
    _hf_model(kind, kw).save_pretrained(tmp_path / "hf")
    ours = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert ours["peft_type"] == theirs["peft_type"] == "LORA"
    fields = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "task_type", "bias", "fan_in_fan_out")
    for key in fields:
        assert ours[key] == theirs[key], key
    assert set(ours["target_modules"]) == set(theirs["target_modules"])
    assert set(ours["modules_to_save"] or []) <= set(theirs["modules_to_save"] or [])


# ---- several adapters and the subfolder layout ---------------------------------------------------------------------
OTHER_KW = {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_proj"]}


def test_non_default_adapter_saved_in_subfolder_loads_into_hf(tmp_path) -> None:
    ours = _pk_model("gpt2", CASES["gpt2-default-targets"][1])
    ours.add_adapter("other", peftkit.LoraConfig(init_lora_weights=False, **OTHER_KW))
    _perturb(ours)
    ours.set_adapter("other")
    _perturb(ours, seed=8)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_config.json").is_file()

    hf = peft.PeftModel.from_pretrained(make_model("gpt2", seed=0), tmp_path)
    hf.load_adapter(tmp_path / "other", adapter_name="other")
    for name in ("default", "other"):
        ours.set_adapter(name)
        hf.set_adapter(name)
        _compare("gpt2", ours, hf)


def test_hf_non_default_adapter_subfolder_loads_into_peftkit(tmp_path) -> None:
    hf = _hf_model("gpt2", CASES["gpt2-default-targets"][1])
    hf.add_adapter("other", peft.LoraConfig(init_lora_weights=False, **OTHER_KW))
    _perturb(hf)
    hf.set_adapter("other")
    _perturb(hf, seed=8)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()

    ours = peftkit.PeftModel.from_pretrained(make_model("gpt2", seed=0), tmp_path)
    ours.load_adapter(tmp_path / "other", adapter_name="other")
    also = peftkit.PeftModel.from_pretrained(make_model("gpt2", seed=0), tmp_path, adapter_name="other",
                                             subfolder="other")
    for name in ("default", "other"):
        ours.set_adapter(name)
        hf.set_adapter(name)
        _compare("gpt2", ours, hf)
    _compare("gpt2", also, hf)


def test_subfolder_key_sets_identical_for_both_libraries(tmp_path) -> None:
    for lib, build, config in (("hf", _hf_model, peft.LoraConfig), ("pk", _pk_model, peftkit.LoraConfig)):
        model = build("gpt2", CASES["gpt2-default-targets"][1])
        model.add_adapter("other", config(init_lora_weights=False, **OTHER_KW))
        model.save_pretrained(tmp_path / lib)
    for sub in ("", "other"):
        assert _keys(tmp_path / "pk" / sub) == _keys(tmp_path / "hf" / sub)
