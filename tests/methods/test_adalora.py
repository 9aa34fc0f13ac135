"""AdaLoRA against hand-written references: the SVD-form layer, the budget schedule, masking, the orthogonality
penalty, checkpoints of pruned adapters, and Hugging Face peft checkpoints in both directions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LayerHolder, make_inputs, make_model, model_logits
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import AdaLoraConfig, PeftConfigError, PeftModel, get_peft_model
from peftkit.methods.adalora import AdaLoraLinear, RankAllocator

TOL = 1e-5




def _config(**kw) -> AdaLoraConfig:
    defaults = {"init_r": 4, "target_r": 2, "total_step": 8, "tfinal": 2}
    return AdaLoraConfig(**{**defaults, **kw})


def _gpt2(seed: int = 0, **kw) -> PeftModel:
    return get_peft_model(make_model("gpt2", seed), _config(**kw))


def _without_dropout(model: nn.Module) -> nn.Module:
    """GPT-2 has dropout 0.1; a loss compared across two forwards in training mode must not draw masks."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _layers(model: PeftModel) -> list[AdaLoraLinear]:
    return [m for m in model.modules() if isinstance(m, AdaLoraLinear)]


def _train(model: PeftModel, steps: int, lr: float = 1e-2, start: int = 1) -> list[float]:
    """HF peft's loop: backward, optimizer.step(), update_and_allocate(step), zero_grad()."""
    inputs = make_inputs("gpt2")
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(start, start + steps):
        loss = model(**inputs).loss
        loss.backward()
        optim.step()
        model.update_and_allocate(step)
        optim.zero_grad()
        losses.append(loss.item())
    return losses


def _pruned() -> PeftModel:
    """A gpt2 adapter trained through the whole schedule (total_step=8, tfinal=2), so its mask is final."""
    model = _gpt2(init_lora_weights=False, lora_alpha=2)
    _train(model, steps=8)
    return model.eval()


# ---- config --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kw", "field"), [
    ({"total_step": None}, "total_step"),
    ({"total_step": 5, "tinit": 3, "tfinal": 2}, "total_step"),
    ({"target_r": 13}, "target_r"),
    ({"init_r": 0}, "init_r"),
    ({"beta1": 1.0}, "beta1"),
    ({"orth_reg_weight": -0.1}, "orth_reg_weight"),
    ({"bias": "all"}, "bias"),
    ({"rank_pattern": {"x.lora_E": [1, 0]}}, "rank_pattern"),
])
def test_config_rejects_bad_field_naming_it(kw: dict, field: str) -> None:
    with pytest.raises(PeftConfigError, match=field):
        AdaLoraConfig(**{"total_step": 10, **kw})


def test_config_defaults_are_hf_peft_and_r_is_ignored_with_warning() -> None:
    config = AdaLoraConfig(total_step=10)
    assert (config.init_r, config.target_r, config.tinit, config.tfinal, config.deltaT) == (12, 8, 0, 0, 1)
    assert (config.beta1, config.beta2, config.orth_reg_weight, config.rank_pattern) == (0.85, 0.85, 0.5, None)
    with pytest.warns(UserWarning, match="init_r"):
        AdaLoraConfig(total_step=10, r=4)


# ---- layer formula -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2"])
def test_layer_matches_svd_formula_and_merges(kind: str) -> None:
    layer = nn.Linear(6, 5) if kind == "linear" else Conv1D(5, 6)
    config = _config(target_modules=["layer"], init_lora_weights=False, lora_alpha=3)
    model = get_peft_model(LayerHolder(layer), config)
    x = torch.randn(2, 3, 6)
    ada = model.base_model.model.layer
    q, lam, p = ada.lora_A["default"], ada.lora_E["default"], ada.lora_B["default"]
    assert (q.shape, lam.shape, p.shape) == ((4, 6), (4, 1), (5, 4))
    with torch.no_grad():
        expected = layer(x) + (x @ (q * lam).T @ p.T) * 3 / (4 + 1e-5)  # h = W0 x + P (λ ⊙ Q x) α / (r0 + 1e-5)
        torch.testing.assert_close(model(x), expected)
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_default_init_leaves_outputs_unchanged_with_hf_statistics() -> None:
    torch.manual_seed(0)
    model = get_peft_model(LayerHolder(nn.Linear(64, 64)), _config(target_modules=["layer"]))
    layer = model.base_model.model.layer
    assert torch.count_nonzero(layer.lora_E["default"]) == 0
    assert abs(layer.lora_A["default"].std().item() - 0.02) < 4e-3
    x = torch.randn(3, 64)
    torch.testing.assert_close(model(x), layer.base_layer(x))


# ---- allocation ----------------------------------------------------------------------------------------------
def test_budget_follows_cubic_schedule() -> None:
    model = _gpt2(init_r=12, target_r=8, tinit=2, tfinal=3, total_step=12, deltaT=2)
    alloc = RankAllocator(model, "default")
    b0, bt = 12 * 2, 8 * 2  # two c_attn matrices
    assert (alloc.init_bgt, alloc.target_bgt) == (b0, bt)
    for step in range(0, 15):
        if step <= 2:
            want = (b0, False)
        elif step > 12 - 3:
            want = (bt, True)
        else:
            want = (int(bt + (b0 - bt) * (1 - (step - 2) / (12 - 2 - 3)) ** 3), step % 2 == 0)
        assert alloc.budget(step) == want, step
    assert alloc.budget(6)[0] == int(16 + 8 * (3 / 7) ** 3) == 16  # truncated, as in HF peft


def test_total_rank_follows_budget_then_equals_target_after_tfinal() -> None:
    model = _gpt2(init_lora_weights=False, lora_alpha=2, total_step=10, tinit=1, tfinal=3)
    alloc = RankAllocator(model, "default")
    for step in range(1, 14):
        _train(model, steps=1, start=step)
        ranks = model.current_ranks()
        budget, masked = alloc.budget(step)
        if step > 1:  # step 1 <= tinit: warm-up, nothing masked
            assert masked and sum(ranks.values()) == budget, step
        pattern = model.peft_config["default"].rank_pattern
        assert pattern is None or {k[: -len(".lora_E")]: sum(v) for k, v in pattern.items()} == ranks
    assert sum(ranks.values()) == 2 * 2  # target_r × matrices
    assert set(ranks) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}


def test_masked_triplets_contribute_nothing_whatever_the_call_order() -> None:
    model, inputs = _pruned(), make_inputs("gpt2")
    expected = model_logits(model, inputs)
    masks = {id(layer): ~layer.kept("default") for layer in _layers(model)}
    assert sum(int(m.sum()) for m in masks.values()) == 2 * (4 - 2)
    with torch.no_grad():
        for layer in _layers(model):
            gone = masks[id(layer)]
            assert torch.count_nonzero(layer.lora_E["default"][gone]) == 0
            layer.lora_E["default"][gone] = 5.0  # a λ moved by the optimizer after masking
            layer.lora_A["default"][gone] = torch.randn_like(layer.lora_A["default"][gone])
    torch.testing.assert_close(model_logits(model, inputs), expected)
    _train(model, steps=2, start=9)  # after tfinal: fixed mask, λ zeroed again
    for layer in _layers(model):
        assert torch.equal(~layer.kept("default"), masks[id(layer)])
        assert torch.count_nonzero(layer.lora_E["default"][masks[id(layer)]]) == 0


def test_update_and_allocate_needs_gradients() -> None:
    model = _gpt2()
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        model.update_and_allocate(1)


def test_training_with_update_and_allocate_lowers_loss() -> None:
    model = _gpt2(total_step=20, tinit=4, tfinal=4)
    losses = _train(model, steps=20, lr=3e-2)
    assert losses[-1] < losses[0] * 0.9, losses
    assert sum(model.current_ranks().values()) == 4


# ---- orthogonal regulariser ----------------------------------------------------------------------------------
def _hand_orth(model: PeftModel, gamma: float) -> torch.Tensor:
    norms = []
    for layer in _layers(model):
        q, p = layer.lora_A["default"], layer.lora_B["default"]
        norms.append(((q @ q.T - torch.eye(q.shape[0])) ** 2).sum().sqrt())
        norms.append(((p.T @ p - torch.eye(p.shape[1])) ** 2).sum().sqrt())
    return gamma * sum(norms) / len(norms)


def test_orth_regulariser_is_in_training_loss_and_matches_hand_computation() -> None:
    model, inputs = _without_dropout(_gpt2(init_lora_weights=False, orth_reg_weight=0.3)), make_inputs("gpt2")
    model.train()
    with_reg = model(**inputs).loss
    aux = model.auxiliary_loss()
    torch.testing.assert_close(aux, _hand_orth(model, 0.3))
    model.peft_config["default"].orth_reg_weight = 0.0
    assert model.auxiliary_loss() is None
    torch.testing.assert_close(with_reg - model(**inputs).loss, aux)
    model.eval()  # only training losses carry it
    model.peft_config["default"].orth_reg_weight = 0.3
    torch.testing.assert_close(model(**inputs).loss, with_reg - aux)


# ---- checkpoints ---------------------------------------------------------------------------------------------
def test_save_load_and_merge_after_pruning(tmp_path) -> None:
    model, inputs = _pruned(), make_inputs("gpt2")
    expected, ranks = model_logits(model, inputs), model.current_ranks()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    for path, rank in ranks.items():  # only the kept triplets are stored, as HF peft does
        key = f"base_model.model.{path}"
        assert saved[f"{key}.lora_A"].shape[0] == saved[f"{key}.lora_E"].shape[0] == rank
        assert saved[f"{key}.lora_B"].shape[1] == rank and sum(pattern[f"{path}.lora_E"]) == rank
    loaded = PeftModel.from_pretrained(make_model("gpt2"), tmp_path, is_trainable=True)
    assert loaded.current_ranks() == ranks
    torch.testing.assert_close(model_logits(loaded, inputs), expected, atol=TOL, rtol=0)
    loaded.save_pretrained(tmp_path / "again")  # a pruned layer is not trimmed twice
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in saved.items()}
    merged = model.merge_and_unload()
    torch.testing.assert_close(model_logits(merged, inputs), expected, atol=TOL, rtol=1e-4)


def test_loaded_pruned_adapter_keeps_training_and_allocating(tmp_path) -> None:
    _pruned().save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("gpt2"), tmp_path, is_trainable=True)
    loaded.peft_config["default"].total_step = 20
    _train(loaded, steps=2, start=18)  # budget = target: the pattern stays relative to init_r for HF peft
    pattern = loaded.peft_config["default"].rank_pattern
    assert all(len(v) == 4 for v in pattern.values())
    assert sum(sum(v) for v in pattern.values()) == sum(loaded.current_ranks().values()) == 4


# ---- Hugging Face peft interop -------------------------------------------------------------------------------
def _hf_config(peft, **kw):
    return peft.AdaLoraConfig(**{"init_r": 4, "target_r": 2, "total_step": 8, "tfinal": 2, "lora_alpha": 2,
                                 "init_lora_weights": False, **kw})


def _check_vs(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    inputs = make_inputs("gpt2")
    got, want = model_logits(ours.eval(), inputs), model_logits(theirs.eval(), inputs)
    assert (want - model_logits(make_model("gpt2"), inputs)).abs().max() > 1e-3, "vacuous: adapter changes nothing"
    assert (got - want).abs().max().item() <= TOL


def test_hf_pruned_checkpoint_loads_with_same_logits(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(make_model("gpt2"), _hf_config(peft))
    inputs = make_inputs("gpt2")
    optim = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    theirs.train()
    for step in range(1, 9):
        theirs(**inputs).loss.backward()
        optim.step()
        theirs.base_model.update_and_allocate(step)
        optim.zero_grad()
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make_model("gpt2"), tmp_path)
    hf_pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert ours.current_ranks() == {k[: -len(".lora_E")]: sum(v) for k, v in hf_pattern.items()}
    _check_vs(ours, theirs)


def test_pruned_checkpoint_loads_in_hf_with_same_logits(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    ours = _pruned()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_model("gpt2"), tmp_path)
    ranks = {n[: -len(".lora_E.default")].removeprefix("base_model.model."): p.shape[0]
             for n, p in theirs.named_parameters() if n.endswith("lora_E.default")}
    assert ranks == ours.current_ranks()
    _check_vs(ours, theirs)


def test_training_loss_with_regulariser_equals_hf(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(_without_dropout(make_model("gpt2")), _hf_config(
        peft, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM"))  # HF's bare PeftModel skips the penalty
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(_without_dropout(make_model("gpt2")), tmp_path, is_trainable=True)
    inputs = make_inputs("gpt2")
    got, want = ours.train()(**inputs).loss, theirs.train()(**inputs).loss  # HF adds γ·penalty in forward
    assert abs(got.item() - want.item()) <= TOL * abs(want.item())
