"""LoRA and bottleneck adapters on one model: side by side, nested on one module, and merging only when it is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model, model_logits
from test_adapters import _A, _layers  # the bottleneck formula and layer lookup the reference tests use

from peftkit import (
    AdapterConfig,
    LoraConfig,
    NotMergeableError,
    PeftModel,
    get_peft_model,
)
from peftkit.core.layer import AdapterLayer
from peftkit.core.targets import get_module


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_on_attention_and_adapter_on_ffn(lora_first: bool, tmp_path) -> None:
    lora = LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)
    adapter = AdapterConfig(r=4, init_weights=False)  # Pfeiffer on GPT-2 wraps whole blocks (c_attn inside)
    inputs = make_inputs("gpt2")
    first, second = (lora, adapter) if lora_first else (adapter, lora)
    model = get_peft_model(make_model("gpt2"), first).eval()
    model.add_adapter("other", second)
    model.set_adapter(["default", "other"])
    both = model_logits(model, inputs)
    lora_name, adapter_name = ("default", "other") if lora_first else ("other", "default")
    model.save_pretrained(tmp_path)

    # Each method alone, from its own checkpoint (keys do not depend on the nesting), then both at once.
    alone = {}
    for name in (lora_name, adapter_name):
        path = tmp_path if name == "default" else tmp_path / name
        alone[name] = PeftModel.from_pretrained(make_model("gpt2"), path, adapter_name=name)
        model.set_adapter(name)
        torch.testing.assert_close(model_logits(alone[name], inputs), model_logits(model, inputs))
    alone[lora_name].load_adapter(tmp_path if adapter_name == "default" else tmp_path / adapter_name, "ad")
    alone[lora_name].set_adapter([lora_name, "ad"])
    torch.testing.assert_close(model_logits(alone[lora_name], inputs), both, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both, model_logits(model, inputs))


def test_lora_and_houlsby_nest_on_the_same_module() -> None:
    model = get_peft_model(make_model("bert"), AdapterConfig(variant="houlsby", r=4, init_weights=False,
                                                             train_layer_norms=False)).eval()
    model.add_adapter("lora", LoraConfig(r=4, target_modules=["output.dense"], init_lora_weights=False))
    model.set_adapter(["default", "lora"])
    inputs = make_inputs("bert")
    # LoRA, added second, wraps the adapter layer: out = (h + A(h)) + (α/r)·B A x with h = W0 x.
    serial = _layers(model)
    loras = {n.replace(".base_layer", ""): m for n, m in model.named_modules() if type(m).__name__ == "LoraLinear"}
    assert serial.keys() == {n.removeprefix("base_model.model.") for n in loras}
    reference = make_model("bert")
    for path, layer in serial.items():
        lora = loras["base_model.model." + path]

        def hook(mod, inp, out, layer=layer, lora=lora):
            delta = inp[0] @ lora.lora_A["lora"].weight.T @ lora.lora_B["lora"].weight.T * lora.scaling["lora"]
            return out + _A(layer, "default", out, "swish") + delta
        get_module(reference, path).register_forward_hook(hook)
    torch.testing.assert_close(model_logits(model, inputs), model_logits(reference, inputs), atol=1e-5, rtol=1e-4)
    # The LoRA checkpoint keys are those of LoRA alone: nesting does not leak into them.
    alone = get_peft_model(make_model("bert"), LoraConfig(r=4, target_modules=["output.dense"]))
    assert set(model.get_adapter_state_dict("lora")) == set(alone.get_adapter_state_dict("default"))


@pytest.mark.parametrize("how", ["merge_adapter", "safe_merge_adapter"])
@pytest.mark.parametrize(("kind", "lora_targets"), [("bert", ["output.dense", "query"]),
                                                   ("gpt2", ["c_proj", "c_attn"])])
def test_lora_over_an_adapter_refuses_to_merge_and_changes_nothing(kind: str, lora_targets: list[str],
                                                                    how: str) -> None:
    # LoRA added after Houlsby on the same projection wraps it: (h + A(h)) + B A x. Merged, B A would pass through A.
    model = get_peft_model(make_model(kind), AdapterConfig(variant="houlsby", r=4, init_weights=False,
                                                           train_layer_norms=False)).eval()
    model.add_adapter("lora", LoraConfig(r=4, target_modules=lora_targets, init_lora_weights=False))
    model.set_adapter(["default", "lora"])
    inputs = make_inputs(kind)
    logits = model_logits(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotMergeableError, match=r"LoRA adapter\(s\) \['lora'\] into \S+\.(c_proj|output\.dense)\b.*: "
                                                r"added after the Bottleneck adapter\(s\) \['default'\]") as error:
        model.merge_adapter(["lora"], safe_merge=how == "safe_merge_adapter")
    assert "Nothing was merged; every weight is unchanged." in str(error.value)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m.merged_adapters for m in model.modules() if isinstance(m, AdapterLayer))
    torch.testing.assert_close(model_logits(model, inputs), logits, atol=0, rtol=0)


def test_merge_and_unload_of_lora_over_an_adapter_never_gives_a_wrong_model() -> None:
    # merge_and_unload drops the adapters it does not merge, so LoRA merges into the bare weight: the model is then
    # LoRA alone, exactly (the structural check knows the unmerged adapter in between goes away).
    model = get_peft_model(make_model("bert"), AdapterConfig(variant="houlsby", r=4, init_weights=False,
                                                             train_layer_norms=False)).eval()
    model.add_adapter("lora", LoraConfig(r=4, target_modules=["output.dense"], init_lora_weights=False))
    inputs = make_inputs("bert")
    model.set_adapter("lora")
    lora_alone = model_logits(model, inputs)
    plain = model.merge_and_unload(adapter_names=["lora"], safe_merge=True)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(model_logits(plain, inputs), lora_alone, atol=1e-5, rtol=1e-4)


def test_lora_beside_or_inside_an_adapter_still_merges() -> None:
    # "inner": LoRA added before Houlsby on output.dense, which then wraps it: (W0 x + B A x) + A(...); "beside": LoRA
    # on the query, which holds no adapter. Merging either folds B A into a weight the adapter reads, unchanged.
    inner = LoraConfig(r=4, target_modules=["output.dense"], init_lora_weights=False)
    model = get_peft_model(make_model("bert"), inner, adapter_name="inner").eval()
    model.add_adapter("default", AdapterConfig(variant="houlsby", r=4, init_weights=False, train_layer_norms=False))
    model.add_adapter("beside", LoraConfig(r=4, target_modules=["query"], init_lora_weights=False))
    model.set_adapter(["default", "inner", "beside"])
    inputs = make_inputs("bert")
    expected = model_logits(model, inputs)
    model.merge_adapter(["inner", "beside"], safe_merge=True)
    merged = {n for m in model.modules() if isinstance(m, AdapterLayer) for n in m.merged_adapters}
    assert merged == {"inner", "beside"}
    torch.testing.assert_close(model_logits(model, inputs), expected, atol=1e-5, rtol=1e-4)
    model.unmerge_adapter()
    model.set_adapter(["inner", "beside"])
    expected = model_logits(model, inputs)
    plain = model.merge_and_unload()
    torch.testing.assert_close(model_logits(plain, inputs), expected, atol=1e-5, rtol=1e-4)
