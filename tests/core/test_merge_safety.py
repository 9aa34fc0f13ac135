"""Merging is exact or refused, and all or nothing: the structural check (peftkit/core/merging.py) and the rollback.

Nested layers share one weight. LoRA added after (IA)³ on a module computes ``l ⊙ (W x) + ΔW x``; (IA)³ added after
LoRA computes ``l ⊙ (W x + ΔW x)``. Merging both, innermost first, is exact either way; merging one of them while the
other stays unmerged is not, and must be refused with the model unchanged. A failure half-way through a merge (an
exception, a non-finite sum) must leave every weight bit-identical and the merged state as it was.
"""

from __future__ import annotations

import pytest
import torch
from conftest import LayerHolder, make_inputs, make_model, model_logits
from torch import nn

import peftkit
from peftkit import AdapterConfig, CompositeConfig, IA3Config, LoraConfig, NotMergeableError, PeftModel, get_peft_model
from peftkit.core.layer import AdapterLayer
from peftkit.core.merging import _merge_order

TOL = {"atol": 1e-5, "rtol": 1e-5}
# On BERT, (IA)³ scales the value projection's output and the FFN output's input; LoRA on both modules nests with it.
IA3 = {"target_modules": ["value", "output.dense"], "feedforward_modules": ["output.dense"], "init_ia3_weights": False}
LORA = {"r": 4, "target_modules": ["value", "output.dense"], "init_lora_weights": False}


def _nested(first: str) -> PeftModel:
    """(IA)³ and LoRA on the same modules of a tiny BERT, ``first`` added first (and so wrapped by the other)."""
    configs = {"ia3": IA3Config(**IA3), "lora": LoraConfig(**LORA)}
    second = "lora" if first == "ia3" else "ia3"
    model = get_peft_model(make_model("bert"), configs[first], adapter_name=first).eval()
    model.add_adapter(second, configs[second])
    model.set_adapter(["ia3", "lora"])
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    # Not state_dict(): bitsandbytes' state-dict hook re-lays out a 4-bit weight the CPU kernel has packed.
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {k: v.detach().clone() for k, v in named}


def _merged(model: PeftModel) -> dict[str, list[str]]:
    return {n: list(m.merged_adapters) for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _assert_unchanged(model: PeftModel, state: dict[str, torch.Tensor], merged: dict[str, list[str]]) -> None:
    after = _state(model)
    assert after.keys() == state.keys()
    changed = [k for k in state if not torch.equal(after[k], state[k])]
    assert not changed, f"changed by a refused or failed merge: {changed[:5]}"
    assert _merged(model) == merged


@pytest.mark.parametrize("first", ["ia3", "lora"])
@pytest.mark.parametrize("alone", ["ia3", "lora"])
def test_nested_ia3_and_lora_merge_alone_is_refused_and_changes_nothing(first: str, alone: str) -> None:
    model, inputs = _nested(first), make_inputs("bert")
    logits, state, merged = model_logits(model, inputs), _state(model), _merged(model)
    other = "lora" if alone == "ia3" else "ia3"
    kind = {"ia3": r"\(IA\)³", "lora": "LoRA"}
    if alone == first:  # the inner one merges under the other's unmerged layer: exact (the outer sees its output)
        model.merge_adapter([alone])
        torch.testing.assert_close(model_logits(model, inputs), logits, **TOL)
        return
    with pytest.raises(NotMergeableError, match=rf"{kind[alone]} adapter\(s\) \['{alone}'\] into .*value.*: added "
                                                rf"after the {kind[other]} adapter\(s\) \['{other}'\]"):
        model.merge_adapter([alone], safe_merge=True)
    _assert_unchanged(model, state, merged)
    torch.testing.assert_close(model_logits(model, inputs), logits, rtol=0, atol=0)


@pytest.mark.parametrize("first", ["ia3", "lora"])
def test_nested_ia3_and_lora_merge_together_exactly(first: str) -> None:
    model, inputs = _nested(first), make_inputs("bert")
    logits = model_logits(model, inputs)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.merge_adapter()
    torch.testing.assert_close(model_logits(model, inputs), logits, **TOL)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=1e-6)
    plain = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(model_logits(plain, inputs), logits, **TOL)


@pytest.mark.parametrize("first", ["ia3", "lora"])
def test_merge_and_unload_of_one_nested_adapter_gives_that_adapter_alone(first: str) -> None:
    # merge_and_unload drops the adapters it does not merge, so the other layer's unmerged state does not matter.
    for kept in ("ia3", "lora"):
        model, inputs = _nested(first), make_inputs("bert")
        model.set_adapter(kept)
        alone = model_logits(model, inputs)
        plain = model.merge_and_unload(adapter_names=[kept])
        torch.testing.assert_close(model_logits(plain, inputs), alone, **TOL)


def test_merging_beneath_an_already_merged_scale_layer_is_refused() -> None:
    # LoRA over (IA)³, both merged: W' = l ⊙ W + ΔW. A new (IA)³ vector merged now would scale ΔW too, and
    # unmerge_adapter, which takes the outer LoRA off first, could no longer give W back.
    model, inputs = _nested("ia3"), make_inputs("bert")
    weights = {n: p.detach().clone() for n, p in model.base_model.model.named_parameters()}
    model.merge_adapter()
    model.add_adapter("late", IA3Config(**IA3))
    model.set_adapter(["ia3", "lora", "late"])
    state, merged = _state(model), _merged(model)
    with pytest.raises(NotMergeableError, match=r"'late'\] into .*: the LoRA adapter\(s\) \['lora'\].* merged alre"):
        model.merge_adapter(["late"])
    _assert_unchanged(model, state, merged)
    model.unmerge_adapter()
    for name, param in model.base_model.model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=1e-6)
    logits = model_logits(model, inputs)
    model.merge_adapter()  # all together, innermost first: exact
    torch.testing.assert_close(model_logits(model, inputs), logits, **TOL)


def test_refusal_names_every_blocking_layer() -> None:
    model = get_peft_model(make_model("bert"), AdapterConfig(variant="houlsby", r=4, train_layer_norms=False))
    model.add_adapter("lora", LoraConfig(r=4, target_modules=["output.dense"]))
    with pytest.raises(NotMergeableError) as error:
        model.merge_adapter(["lora"])
    message = str(error.value)
    assert "4 layer(s)" in message
    for layer in (0, 1):
        assert f"bert.encoder.layer.{layer}.output.dense" in message
        assert f"bert.encoder.layer.{layer}.attention.output.dense" in message
    assert message.endswith("Nothing was merged; every weight is unchanged.")


# ---- all or nothing: a layer fails half-way ----------------------------------------------------------------------
def _lora_pair() -> PeftModel:
    model = get_peft_model(make_model("gpt2"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    model.set_adapter(["default", "b"])
    return model.eval()


def _composite() -> PeftModel:
    members = [LoraConfig(r=4, init_lora_weights=False),
               IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], init_ia3_weights=False)]
    return get_peft_model(make_model("gpt2"), CompositeConfig(members=members)).eval()


MODELS = {"lora": _lora_pair, "composite": _composite, "nested": lambda: _nested("ia3")}
PATHS = ["merge_adapter", "safe_merge_adapter", "merge_and_unload", "safe_merge_and_unload"]


def _run(model: PeftModel, path: str) -> None:
    if path.endswith("merge_adapter"):
        model.merge_adapter(safe_merge=path.startswith("safe"))
    else:
        model.merge_and_unload(safe_merge=path.startswith("safe"))


def _fail_after_writing(layer: AdapterLayer) -> None:
    """Make ``layer.merge`` raise after it has changed the weight: the worst moment to fail."""
    original = layer.merge

    def merge(adapter_names: list[str] | None = None, safe: bool = False) -> None:
        original(adapter_names, safe)
        raise RuntimeError("injected failure")

    layer.merge = merge


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_a_layer_failing_half_way_leaves_every_weight_bit_identical(kind: str, path: str) -> None:
    model = MODELS[kind]()
    inputs = make_inputs("bert" if kind == "nested" else "gpt2")
    logits = model_logits(model, inputs)
    names = model.active_adapters
    order = [(p, layer) for p, layer in _merge_order(model.base_model.model) if layer.pending_merges(names)]
    path_of_failure, victim = order[len(order) // 2]  # layers before it have merged when it fails
    _fail_after_writing(victim)
    state, merged = _state(model), _merged(model)
    modules = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="injected failure") as error:
        _run(model, path)
    assert any("nothing is merged" in note for note in error.value.__notes__)
    assert {n: type(m) for n, m in model.named_modules()} == modules  # merge_and_unload put every layer back
    _assert_unchanged(model, state, merged)
    torch.testing.assert_close(model_logits(model, inputs), logits, rtol=0, atol=0)
    del victim.merge  # the model works on: the same merge now succeeds
    _run(model, path)


@pytest.mark.parametrize("path", ["safe_merge_adapter", "safe_merge_and_unload"])
def test_a_non_finite_delta_half_way_is_refused_by_safe_merge(path: str) -> None:
    model = _lora_pair()
    order = [layer for _, layer in _merge_order(model.base_model.model) if layer.pending_merges(["default"])]
    victim = order[len(order) // 2]
    victim.delta_weight = lambda name: torch.full_like(victim.get_base_layer().weight, float("nan"))
    state, merged = _state(model), _merged(model)
    with pytest.raises(ValueError, match="non-finite"):
        _run(model, path)
    _assert_unchanged(model, state, merged)


def test_safe_merge_catches_an_overflow_only_the_stacked_layers_give() -> None:
    # fp16: l ⊙ W = 1e4 and W + ΔW = 6e4 are finite each (the per-layer checks pass), l ⊙ W + ΔW = 7e4 is not.
    base = nn.Linear(4, 4, bias=False).half()
    nn.init.constant_(base.weight, 10.0)
    model = get_peft_model(LayerHolder(base), IA3Config(target_modules=["layer"], feedforward_modules=[]), "ia3")
    model.add_adapter("lora", LoraConfig(r=1, lora_alpha=1, target_modules=["layer"]))
    layer = model.base_model.model.layer
    with torch.no_grad():
        layer.base_layer.ia3_l["ia3"].fill_(1e3)
        layer.lora_A["lora"].weight.fill_(1.0)
        layer.lora_B["lora"].weight.fill_(6e4)
    model.set_adapter(["ia3", "lora"])
    state, merged = _state(model), _merged(model)
    with pytest.raises(ValueError, match=r"\['lora'\] into layer gives non-finite weights"):
        model.merge_adapter(safe_merge=True)
    _assert_unchanged(model, state, merged)


def test_rollback_keeps_what_was_merged_before() -> None:
    model, inputs = _lora_pair(), make_inputs("gpt2")
    model.merge_adapter(["b"])
    logits, state, merged = model_logits(model, inputs), _state(model), _merged(model)
    _fail_after_writing(model.base_model.model.transformer.h[1].mlp.c_proj)
    with pytest.raises(RuntimeError, match="injected failure"):
        model.merge_adapter(["default"])
    _assert_unchanged(model, state, merged)
    assert {n for names in merged.values() for n in names} == {"b"}
    torch.testing.assert_close(model_logits(model, inputs), logits, rtol=0, atol=0)


# ---- quantised layers (bitsandbytes) -----------------------------------------------------------------------------
def _quantized_bert(houlsby: bool) -> PeftModel:
    pytest.importorskip("bitsandbytes")
    base = peftkit.quantize_model(make_model("bert"), quant_type="nf4")
    if not houlsby:
        return get_peft_model(base, LoraConfig(**LORA)).eval()
    model = get_peft_model(base, AdapterConfig(variant="houlsby", r=4, init_weights=False, train_layer_norms=False))
    model.add_adapter("lora", LoraConfig(**LORA))
    model.set_adapter(["default", "lora"])
    return model.eval()


def _quantized_logits(model: PeftModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    # bitsandbytes re-lays a 4-bit weight out for its CPU kernel on the first eval forward (numerics change a little).
    model_logits(model, inputs)
    return model_logits(model, inputs)


@pytest.mark.filterwarnings("ignore:.*re-quantises:UserWarning")
@pytest.mark.parametrize("path", ["merge_adapter", "safe_merge_adapter"])
def test_quantized_lora_over_an_adapter_refuses_to_merge(path: str) -> None:
    # LoraLinear4bit overrides check_merge / merge; the core's structural check still runs first.
    model, inputs = _quantized_bert(houlsby=True), make_inputs("bert")
    logits, state, merged = _quantized_logits(model, inputs), _state(model), _merged(model)
    with pytest.raises(NotMergeableError, match=r"LoRA adapter\(s\) \['lora'\] into .*output\.dense.*: added after "
                                                r"the Bottleneck adapter\(s\) \['default'\]"):
        model.merge_adapter(["lora"], safe_merge=path.startswith("safe"))
    _assert_unchanged(model, state, merged)
    torch.testing.assert_close(model_logits(model, inputs), logits, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:.*re-quantises:UserWarning")
@pytest.mark.parametrize("dequantize", [False, True])
def test_quantized_merge_failing_half_way_restores_the_quantized_weights(dequantize: bool) -> None:
    model, inputs = _quantized_bert(houlsby=False), make_inputs("bert")
    logits = _quantized_logits(model, inputs)
    order = [layer for _, layer in _merge_order(model.base_model.model) if layer.pending_merges(["default"])]
    victim = order[len(order) // 2]
    victim._merged_weight = lambda names: (_ for _ in ()).throw(RuntimeError("injected failure"))
    state, merged = _state(model), _merged(model)
    quant = {n: m.weight for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")}
    with pytest.raises(RuntimeError, match="injected failure"):
        model.merge_and_unload(dequantize=dequantize)
    _assert_unchanged(model, state, merged)
    now = {n: m.weight for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")}
    assert all(now[n] is w for n, w in quant.items())  # the very Params4bit objects, quant_state and all
    torch.testing.assert_close(model_logits(model, inputs), logits, rtol=0, atol=0)
