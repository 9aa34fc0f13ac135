"""Mixed precision: a bf16 / fp16 base keeps fp32 adapters (every method), merging adds in fp32 and rounds once,
and merged outputs stay within the stated tolerance of an fp32 reference; autocast training (Trainer ``bf16=True``)
keeps fp32 adapters and gradients.

Stated tolerance (tiny Llama, logits up to 0.39, LoRA on six projections with random B moving them by up to 0.2):
the half-precision model's logits, merged or not, are within ``HALF_TOL[dtype]`` (absolute) of the fp32 model's, and
merged within the same bound of unmerged. Measured maxima: bf16 2.7e-3, fp16 3.1e-4; adding in fp32 and rounding
once lowers the mean weight error of a merge by ~15% against rounding the delta first.
"""

from __future__ import annotations

import pytest
import torch
from cases import METHOD_CASES
from conftest import make_inputs, make_model, model_logits

from peftkit import LoraConfig, get_peft_model
from peftkit.core.registry import method_for
from peftkit.integrations.trainer import PeftTrainer

HALF = [torch.bfloat16, torch.float16]
# atol on logits, ~3-4x the measured maxima: bf16 keeps 8 significant bits (2^-8 ≈ 4e-3 relative), fp16 11.
HALF_TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
        "init_lora_weights": False}


def _method_rows() -> list:
    first: dict[type, object] = {}
    for case in METHOD_CASES:
        first.setdefault(method_for(case.config()), case)
    return list(first.values())


@pytest.mark.parametrize("case", _method_rows(), ids=lambda c: c.id)
def test_half_precision_base_keeps_fp32_adapter_parameters(case) -> None:
    model = get_peft_model(make_model(case.model).to(torch.bfloat16), case.config())
    # The parameters the method adds. modules_to_save copies and the base's own parameters a method trains (Houlsby's
    # layer norms) keep the base dtype, as in HF peft.
    base_names = {n for n, _ in make_model(case.model).named_parameters()}
    added = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." not in n
             and n.removeprefix("base_model.model.") not in base_names}
    assert added and set(added.values()) == {torch.float32}, added


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_lora_forward_and_backward_on_a_half_base(dtype: torch.dtype) -> None:
    model = get_peft_model(make_model("llama").to(dtype), LoraConfig(**LORA))
    model.train()
    out = model(**make_inputs("llama"))
    assert out.logits.dtype == dtype
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_merge_adds_in_fp32_and_rounds_once(dtype: torch.dtype) -> None:
    model = get_peft_model(make_model("llama").to(dtype), LoraConfig(**LORA))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    delta = layer.delta_weight("default")
    assert delta.dtype == torch.float32
    model.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, (before.float() + delta).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_merged_half_model_is_within_tolerance_of_fp32(dtype: torch.dtype) -> None:
    inputs = make_inputs("llama")
    reference_model = get_peft_model(make_model("llama"), LoraConfig(**LORA))
    reference = model_logits(reference_model, inputs)
    state = {k: v.clone() for k, v in reference_model.get_adapter_state_dict("default").items()}

    model = get_peft_model(make_model("llama").to(dtype), LoraConfig(**LORA))
    with torch.no_grad():
        for key, tensor in model.get_adapter_state_dict("default", live=True).items():
            tensor.copy_(state[key])
    unmerged = model_logits(model, inputs).float()
    merged = model_logits(model.merge_and_unload(), inputs).float()
    assert merged.dtype == unmerged.dtype and (reference - unmerged).abs().max() > 0
    tol = HALF_TOL[dtype]
    torch.testing.assert_close(unmerged, reference, rtol=0, atol=tol)
    torch.testing.assert_close(merged, reference, rtol=0, atol=tol)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=tol)


def test_autocast_training_with_trainer_bf16_keeps_fp32_adapters(tmp_path) -> None:
    from transformers import TrainingArguments

    model = get_peft_model(make_model("llama"), LoraConfig(r=4))
    rows = [{k: v[0] for k, v in make_inputs("llama", batch=1, seed=s).items()} for s in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to=[], max_steps=3,
                             per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no",
                             disable_tqdm=True, logging_steps=1)
    before = {k: v.clone() for k, v in model.get_adapter_state_dict("default").items()}
    trainer = PeftTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    after = model.get_adapter_state_dict("default")
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in after)
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)
