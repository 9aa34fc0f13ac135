"""Prompt-learning checkpoints (prompt tuning, P-tuning, prefix tuning) move between peftkit and Hugging Face peft
0.21 in both directions with the same logits, and both libraries write the same tensor keys.

Inputs are unpadded or right-padded: for left-padded rows HF numbers positions differently in forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SEQ, make_inputs, make_model, model_logits
from safetensors.torch import load_file

import peftkit
from peftkit.methods.p_tuning import PromptEncoderConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig

peft = pytest.importorskip("peft")

TOL = 1e-5
TASKS = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "bert": "SEQ_CLS"}

# id -> (model kind, config class name shared by both libraries, kwargs shared by both libraries)
CASES: dict[str, tuple[str, str, dict]] = {}
for _kind in ("gpt2", "llama", "bert"):
    CASES[f"{_kind}-prompt-tuning"] = (_kind, "PromptTuningConfig", {})
    for _encoder in ("MLP", "LSTM"):
        CASES[f"{_kind}-p-tuning-{_encoder.lower()}"] = (
            _kind, "PromptEncoderConfig", {"encoder_reparameterization_type": _encoder, "encoder_hidden_size": 16})
for _kind in ("gpt2", "llama"):
    CASES[f"{_kind}-prefix"] = (_kind, "PrefixTuningConfig", {})
    CASES[f"{_kind}-prefix-projection"] = (_kind, "PrefixTuningConfig",
                                           {"prefix_projection": True, "encoder_hidden_size": 16})
IDS = list(CASES)
OURS = {"PromptTuningConfig": PromptTuningConfig, "PromptEncoderConfig": PromptEncoderConfig,
        "PrefixTuningConfig": PrefixTuningConfig}


def _kw(case: str) -> dict:
    kind, _, kw = CASES[case]
    return {"num_virtual_tokens": 4, "task_type": TASKS[kind], **kw}


def _hf_model(case: str):
    kind, name, _ = CASES[case]
    return peft.get_peft_model(make_model(kind, seed=0), getattr(peft, name)(**_kw(case)))


def _pk_model(case: str) -> peftkit.PeftModel:
    kind, name, _ = CASES[case]
    return peftkit.get_peft_model(make_model(kind, seed=0), OURS[name](**_kw(case)))


def _perturb(model: torch.nn.Module, seed: int = 7) -> None:
    """Move every trainable tensor (prompt tables, encoders, head copies) as a few training steps would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)


def _inputs(kind: str) -> list[dict[str, torch.Tensor]]:
    """An unpadded batch and a right-padded one (no labels: the two libraries report different loss details)."""
    plain = make_inputs(kind)
    plain.pop("labels")
    padded = {k: v.clone() for k, v in plain.items()}
    padded["attention_mask"][1, 5:] = 0
    padded["attention_mask"][2, 3:] = 0
    padded["input_ids"][padded["attention_mask"] == 0] = 0
    return [plain, padded]


def _compare(case: str, ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    kind = CASES[case][0]
    base = make_model(kind, seed=0)
    for inputs in _inputs(kind):
        got, want = model_logits(ours.eval(), inputs), model_logits(theirs.eval(), inputs)
        assert got.shape == want.shape
        real = want[:, -SEQ:] if want.dim() == 3 else want
        reference = model_logits(base, inputs)
        assert (real - reference).abs().max() > 1e-3, "the adapter leaves the logits unchanged: vacuous test"
        if want.dim() == 3:  # per-token logits: compare attended positions (pad positions' logits mean nothing)
            mask = inputs["attention_mask"].bool()
            mask = torch.cat([mask.new_ones(mask.shape[0], want.shape[1] - SEQ), mask], 1)
            got, want = got[mask], want[mask]
        assert (got - want).abs().max().item() <= TOL


def _keys(directory: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(directory / "adapter_model.safetensors").items()}


@pytest.mark.parametrize("case", IDS)
def test_peftkit_checkpoint_loads_into_hf_with_same_logits(case: str, tmp_path) -> None:
    ours = _pk_model(case)
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_model(CASES[case][0], seed=0), tmp_path)
    _compare(case, ours, theirs)


@pytest.mark.parametrize("case", IDS)
def test_hf_checkpoint_loads_into_peftkit_with_same_logits(case: str, tmp_path) -> None:
    theirs = _hf_model(case)
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(make_model(CASES[case][0], seed=0), tmp_path)
    _compare(case, ours, theirs)


@pytest.mark.parametrize("case", IDS)
def test_safetensors_key_sets_identical(case: str, tmp_path) -> None:
    _hf_model(case).save_pretrained(tmp_path / "hf")
    _pk_model(case).save_pretrained(tmp_path / "pk")
    assert _keys(tmp_path / "pk") == _keys(tmp_path / "hf")
    assert "prompt_embeddings" in _keys(tmp_path / "pk")


@pytest.mark.parametrize("case", ["bert-prompt-tuning", "llama-p-tuning-lstm", "gpt2-prefix-projection"])
def test_saved_config_fields_read_the_same_by_both_libraries(case: str, tmp_path) -> None:
    _hf_model(case).save_pretrained(tmp_path / "hf")
    _pk_model(case).save_pretrained(tmp_path / "pk")
    ours = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    fields = ["peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
              "num_attention_heads", "num_layers", *_kw(case)]
    for key in dict.fromkeys(fields):
        assert ours[key] == theirs[key], key
