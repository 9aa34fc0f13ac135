"""Gradient checkpointing, reentrant and not, for every registered method: the loss and every trainable
parameter's gradient equal those of the same step without checkpointing, with no input-gradient setup by the user.

One row per method family: the first ``METHOD_CASES`` row of each config class, so a new method is covered by
adding its contract rows; AdapterFusion, which needs adapters to fuse, has its own test.
"""

from __future__ import annotations

import pytest
import torch
from cases import METHOD_CASES, MethodCase
from conftest import make_inputs, make_model

from peftkit import AdapterConfig, AdapterFusionConfig, get_peft_model
from peftkit.core.registry import method_for

_FIRST_PER_METHOD: dict[type, MethodCase] = {}
for _case in METHOD_CASES:
    _FIRST_PER_METHOD.setdefault(method_for(_case.config()), _case)
CASES = list(_FIRST_PER_METHOD.values())


def _step(case: MethodCase, reentrant: bool | None, entry: str = "peft") -> tuple[torch.Tensor, dict]:
    """One forward/backward in train mode; ``reentrant`` None means no checkpointing."""
    base = make_model(case.model, seed=0)
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    if reentrant is not None and entry == "base-before-wrapping":
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs["gradient_checkpointing_kwargs"])
    model = get_peft_model(base, case.config())
    if reentrant is not None and entry == "peft":
        model.gradient_checkpointing_enable(**kwargs)
    model.train()
    torch.manual_seed(0)  # dropout draws: checkpointing replays the RNG state, so both runs see the same masks
    loss = model(**make_inputs(case.model)).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_checkpointed_step_matches_plain_step(case: MethodCase, reentrant: bool) -> None:
    loss, grads = _step(case, None)
    loss_ckpt, grads_ckpt = _step(case, reentrant)
    assert grads.keys() == grads_ckpt.keys() and grads
    missing = sorted(n for n, g in grads_ckpt.items() if g is None)
    assert not missing, f"no gradient under checkpointing: {missing[:4]}"
    torch.testing.assert_close(loss_ckpt, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointing_enabled_on_the_base_before_wrapping_still_trains_adapters() -> None:
    case = CASES[0]
    _, grads = _step(case, None)
    _, grads_ckpt = _step(case, True, entry="base-before-wrapping")
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_enable_is_routed_through_the_peft_model() -> None:
    # transformers 5's Trainer calls activation_checkpointing_enable; it must reach PeftModel's own method (input
    # gradients) rather than pass through to the base model. ViT's input is pixel_values, for which transformers
    # itself does not make the inputs require grad.
    model = get_peft_model(make_model("gpt2"), CASES[0].config())
    called = []
    model._inputs_require_grads = lambda: called.append(True)
    model.activation_checkpointing_enable({"use_reentrant": True})
    assert called and model.get_base_model().is_activation_checkpointing


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_adapter_fusion_step_matches_plain_step(reentrant: bool) -> None:
    def step(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = get_peft_model(make_model("bert", seed=0), AdapterConfig(r=4, init_weights=False), adapter_name="a")
        model.add_adapter("b", AdapterConfig(r=4, init_weights=False))
        model.add_adapter("fusion", AdapterFusionConfig(adapters=["a", "b"]))
        model.set_adapter("fusion")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        torch.manual_seed(0)
        model(**make_inputs("bert")).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = step(False), step(True)
    assert plain.keys() == checkpointed.keys() and any(".adapter_fusion.fusion." in n for n in plain)
    for name, grad in plain.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)
