"""Contract tests every method must pass, run over ``tests/cases.py::METHOD_CASES``."""

from __future__ import annotations

import os

import pytest
import torch
from cases import METHOD_CASES, MethodCase
from conftest import make_inputs, make_model, model_logits
from safetensors.torch import load_file

from peftkit import AdapterLayer, PeftModel, get_peft_model
from peftkit.core.layer import BASE_ADAPTER_NAME

CASES = [pytest.param(c, id=c.id) for c in METHOD_CASES]
MERGEABLE = [pytest.param(c, id=c.id) for c in METHOD_CASES if c.mergeable]
MIXED = [pytest.param(c, id=c.id) for c in METHOD_CASES if c.mixed_batch]


def _wrap(case: MethodCase, config=None, seed: int = 0) -> PeftModel:
    return get_peft_model(make_model(case.model, seed), config or case.config()).eval()


def _train(model: PeftModel, inputs: dict, steps: int, lr: float) -> list[float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    return losses


def _adapter_param_ids(model: PeftModel) -> set[int]:
    ids = set()
    for name in model.peft_config:
        ids |= {id(t) for t in model.get_adapter_state_dict(name, live=True).values()}
    return ids


@pytest.mark.parametrize("case", CASES)
def test_only_adapter_parameters_train(case: MethodCase) -> None:
    model = _wrap(case)
    adapter_ids = _adapter_param_ids(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable and trainable <= adapter_ids
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, make_inputs(case.model), steps=3, lr=case.lr)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == param.requires_grad, f"{name}: changed={changed}, requires_grad={param.requires_grad}"


@pytest.mark.parametrize("case", [c for c in CASES if c.values[0].zero_init is not None])
def test_zero_init_gives_base_outputs(case: MethodCase) -> None:
    inputs = make_inputs(case.model)
    base = model_logits(make_model(case.model), inputs)
    torch.testing.assert_close(model_logits(_wrap(case, case.zero_init()), inputs), base)


@pytest.mark.parametrize("case", CASES)
def test_loss_goes_down(case: MethodCase) -> None:
    model = _wrap(case, case.zero_init() if case.zero_init else None)
    inputs = make_inputs(case.model)
    if case.constant_labels:
        inputs["labels"] = torch.full_like(inputs["labels"], 5)
    losses = _train(model, inputs, steps=20, lr=3 * case.lr)
    assert losses[-1] < losses[0] * case.loss_ratio, losses


@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_matches_and_unmerge_restores(case: MethodCase) -> None:
    model, inputs = _wrap(case), make_inputs(case.model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = model_logits(model, inputs)
    model.merge_adapter()
    model.merge_adapter()  # idempotent: a second merge must not add the delta twice
    torch.testing.assert_close(model_logits(model, inputs), unmerged, atol=1e-5, rtol=1e-4)
    model.unmerge_adapter()
    torch.testing.assert_close(model_logits(model, inputs), unmerged, atol=1e-5, rtol=1e-4)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_and_unload_returns_plain_model(case: MethodCase) -> None:
    model, inputs = _wrap(case), make_inputs(case.model)
    expected = model_logits(model, inputs)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert type(plain) is type(make_model(case.model))
    torch.testing.assert_close(model_logits(plain, inputs), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_unload_restores_bit_identical_base(case: MethodCase) -> None:
    original = make_model(case.model)
    reference = {k: v.clone() for k, v in original.state_dict().items()}
    types = [type(m) for m in original.modules()]
    model = get_peft_model(original, case.config())
    _train(model, make_inputs(case.model), steps=2, lr=case.lr)
    base = model.unload()
    assert base is original
    assert [type(m) for m in base.modules()] == types
    state = base.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


@pytest.mark.parametrize("case", CASES)
def test_save_load_gives_identical_outputs(case: MethodCase, tmp_path) -> None:
    model, inputs = _wrap(case), make_inputs(case.model)
    _train(model, inputs, steps=2, lr=case.lr)
    model.eval()
    expected = model_logits(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert set(saved) == set(model.get_adapter_state_dict("default"))  # delta only
    assert sum(t.numel() for t in saved.values()) < sum(p.numel() for p in model.parameters()) / 2
    loaded = PeftModel.from_pretrained(make_model(case.model), tmp_path)
    torch.testing.assert_close(model_logits(loaded, inputs), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(make_model(case.model), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize("case", CASES)
def test_several_adapters_set_and_delete(case: MethodCase) -> None:
    model, inputs = _wrap(case), make_inputs(case.model)
    first = model_logits(model, inputs)
    torch.manual_seed(99)
    model.add_adapter("other", case.config())
    torch.testing.assert_close(model_logits(model, inputs), first)  # a new adapter is inactive
    model.set_adapter("other")
    second = model_logits(model, inputs)
    assert not torch.allclose(first, second)
    assert model.active_adapters == ["other"]
    model.set_adapter("default")
    torch.testing.assert_close(model_logits(model, inputs), first)
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"] and model.active_adapters == ["other"]
    torch.testing.assert_close(model_logits(model, inputs), second)


@pytest.mark.parametrize("case", CASES)
def test_disable_adapter_gives_base_outputs(case: MethodCase) -> None:
    inputs = make_inputs(case.model)
    base = model_logits(make_model(case.model), inputs)
    model = _wrap(case)
    adapted = model_logits(model, inputs)
    # Prompt methods return logits for their virtual positions too (as HF peft): a different shape differs.
    assert adapted.shape != base.shape or not torch.allclose(adapted, base)
    with model.disable_adapter():
        torch.testing.assert_close(model_logits(model, inputs), base)
    torch.testing.assert_close(model_logits(model, inputs), adapted)


@pytest.mark.parametrize("case", MIXED)
def test_mixed_batch_equals_per_adapter_rows(case: MethodCase) -> None:
    model = _wrap(case)
    torch.manual_seed(7)
    model.add_adapter("second", case.config())
    inputs = make_inputs(case.model, batch=4)
    names = ["second", BASE_ADAPTER_NAME, "default", "second"]
    mixed = model_logits(model, inputs, adapter_names=names)
    per_adapter = {}
    for name in ("default", "second"):
        model.set_adapter(name)
        per_adapter[name] = model_logits(model, inputs)
    with model.disable_adapter():
        per_adapter[BASE_ADAPTER_NAME] = model_logits(model, inputs)
    for row, name in enumerate(names):
        # A row with a shorter prompt than the batch's longest ends in masked fill: compare its own positions.
        expected = per_adapter[name][row]
        torch.testing.assert_close(mixed[row][: expected.shape[0]], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_module_casts_reach_the_adapters(case: MethodCase) -> None:
    # ``.to()``/``.double()`` go through ``nn.Module._apply``: an adapter must not shadow it, and must follow.
    model, inputs = _wrap(case), make_inputs(case.model)
    want = model_logits(model, inputs).double()
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    torch.testing.assert_close(model_logits(model, inputs), want, atol=1e-4, rtol=1e-4)
