"""Serial (Houlsby, Pfeiffer) and parallel bottleneck adapters against hand-written references of their formulas,
plus placement defaults, layer-norm training, AdapterDrop, checkpointing and the Trainer (nesting with LoRA:
test_adapters_with_lora.py)."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model, model_logits
from safetensors.torch import load_file
from torch import nn
from transformers import OPTForCausalLM

from peftkit import (
    AdapterConfig,
    LoraConfig,
    NotMergeableError,
    ParallelAdapterConfig,
    PeftConfig,
    PeftConfigError,
    PeftModel,
    get_peft_model,
)
from peftkit.core.errors import TargetModuleError
from peftkit.core.layer import BASE_ADAPTER_NAME, AdapterLayer
from peftkit.core.targets import get_module
from peftkit.methods.adapters import SerialAdapterLayer
from peftkit.methods.bottleneck import BottleneckLayer
from peftkit.methods.parallel_adapter import ParallelAdapterLayer, ParallelAdapterTap

ACT = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu}


def _A(layer: BottleneckLayer, name: str, u: torch.Tensor, act: str) -> torch.Tensor:
    """The bottleneck written out: s · (W_up f(W_down u + b_down) + b_up)."""
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    return layer.scaling[name] * (ACT[act](u @ down.weight.T + down.bias) @ up.weight.T + up.bias)


def _layers(model: PeftModel, cls: type = BottleneckLayer) -> dict[str, BottleneckLayer]:
    return {n.replace(".base_layer", ""): m for n, m in model.base_model.model.named_modules() if isinstance(m, cls)}


def _reference_hooks(reference: nn.Module, peft: PeftModel, act: str, name: str = "default") -> None:
    """Put each formula on the plain model with forward hooks, reading weights from the peft model's layers."""
    for path, layer in _layers(peft).items():
        target = get_module(reference, path)
        if isinstance(layer, SerialAdapterLayer) and layer.post_norm:
            def norm_hook(mod, inp, out, layer=layer):  # LN(z + A(LN(z))), the same pretrained LN twice
                z = inp[0]
                return F.layer_norm(z + _A(layer, name, out, act), mod.normalized_shape, mod.weight, mod.bias, mod.eps)
            target.register_forward_hook(norm_hook)
        elif isinstance(layer, SerialAdapterLayer):
            def out_hook(mod, inp, out, layer=layer):  # y + A(y)
                y = out[0] if isinstance(out, tuple) else out
                y = y + _A(layer, name, y, act)
                return (y, *out[1:]) if isinstance(out, tuple) else y
            target.register_forward_hook(out_hook)
        elif layer.span:  # a sub-layer inside the block: s·A(z) on the write end's output, z = the read end's input
            seen = {}
            read, write = (get_module(target, n) for n in layer.span)
            read.register_forward_pre_hook(lambda mod, args, seen=seen: seen.update(z=args[0]))
            write.register_forward_hook(lambda mod, inp, out, seen=seen, layer=layer:
                                        out + _A(layer, name, seen["z"], act))
        elif layer.residual_arg:  # BERT output block: LN(x + h + s·A(x)), x = input_tensor
            seen = {}
            target.register_forward_pre_hook(lambda mod, args, seen=seen: seen.update(x=args[1]))
            target.dense.register_forward_hook(lambda mod, inp, out, seen=seen, layer=layer:
                                               out + _A(layer, name, seen["x"], act))
        else:  # sub-layer: M(z) + s·A(z)
            def par_hook(mod, args, kwargs, out, layer=layer):
                z = args[0] if args else kwargs["hidden_states"]
                y = out[0] if isinstance(out, tuple) else out
                y = y + _A(layer, name, z, act)
                return (y, *out[1:]) if isinstance(out, tuple) else y
            target.register_forward_hook(par_hook, with_kwargs=True)


FORMULA_CASES = [
    ("bert", AdapterConfig(variant="houlsby", r=4, init_weights=False, train_layer_norms=False)),
    ("bert", AdapterConfig(variant="pfeiffer", r=4, init_weights=False, non_linearity="gelu")),
    ("bert", ParallelAdapterConfig(r=4, init_weights=False)),
    ("bert", ParallelAdapterConfig(r=4, target="attn", scaling=2.0, init_weights=False)),
    ("gpt2", AdapterConfig(variant="houlsby", r=4, init_weights=False)),
    ("gpt2", AdapterConfig(variant="pfeiffer", r=4, init_weights=False)),
    ("gpt2", ParallelAdapterConfig(r=4, init_weights=False, non_linearity="gelu")),
    ("gpt2", ParallelAdapterConfig(r=4, target="attn", init_weights=False)),
    ("llama", AdapterConfig(variant="pfeiffer", r=4, init_weights=False)),
    ("llama", ParallelAdapterConfig(r=4, init_weights=False)),
    ("opt", AdapterConfig(variant="houlsby", r=4, init_weights=False)),
    ("opt", AdapterConfig(variant="pfeiffer", r=4, init_weights=False)),
    ("opt", ParallelAdapterConfig(r=4, init_weights=False)),  # the FFN span fc1 → fc2 inside each decoder layer
    ("opt", ParallelAdapterConfig(r=4, target="attn", init_weights=False)),
]


@pytest.mark.parametrize(("kind", "config"), FORMULA_CASES,
                         ids=[f"{k}-{type(c).__name__}-{getattr(c, 'variant', getattr(c, 'target', ''))}"
                              for k, c in FORMULA_CASES])
def test_adapter_equals_hand_written_reference(kind: str, config: PeftConfig) -> None:
    inputs = make_inputs(kind)
    model = get_peft_model(make_model(kind), config).eval()
    reference = make_model(kind)
    _reference_hooks(reference, model, config.non_linearity)
    expected = model_logits(reference, inputs)
    assert not torch.allclose(expected, model_logits(make_model(kind), inputs))  # the adapters do something
    torch.testing.assert_close(model_logits(model, inputs), expected, atol=1e-5, rtol=1e-4)


def test_bert_sublayer_formulas_written_out() -> None:
    # One post-LN output block, three variants, each formula spelled out with functional ops.
    block = make_model("bert").bert.encoder.layer[0].output  # BertOutput: LN(dropout(dense(h)) + x)
    hidden, x = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    ln = block.LayerNorm

    def LN(t: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(t, (32,), ln.weight, ln.bias, ln.eps)

    h = hidden @ block.dense.weight.T + block.dense.bias
    host = nn.ModuleDict({"output": block})
    for config, formula in [
        (AdapterConfig(variant="houlsby", r=4, target_modules=["dense"], init_weights=False),
         lambda A: LN(x + h + A(h))),
        (AdapterConfig(variant="pfeiffer", r=4, target_modules=["LayerNorm"], init_weights=False),
         lambda A: LN(x + h + A(LN(x + h)))),
        (ParallelAdapterConfig(r=4, target_modules=["output"], init_weights=False),
         lambda A: LN(x + h + A(x))),
    ]:
        model = get_peft_model(copy.deepcopy(host), config).eval()
        layer = next(iter(_layers(model).values()))
        with torch.no_grad():
            got = model.base_model.model["output"](hidden, x)
            expected = formula(lambda u, layer=layer, c=config: _A(layer, "default", u, c.non_linearity))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def _opt(post_ln: bool) -> nn.Module:
    """The tiny OPT, or its post-LN flavour (OPT-350m's ``do_layer_norm_before=False``)."""
    model = make_model("opt")
    if not post_ln:
        return model
    config = copy.deepcopy(model.config)
    config.do_layer_norm_before = False
    torch.manual_seed(0)
    return OPTForCausalLM(config).eval()


@pytest.mark.parametrize("post_ln", [False, True], ids=["pre-ln", "post-ln"])
def test_opt_decoder_layer_formulas_written_out(post_ln: bool) -> None:
    # One OPT decoder layer, the default placements, each formula spelled out with functional ops. x: the layer
    # input; x1: the FFN's residual input (after attention); z: what the FFN receives; h: the FFN's output.
    x = torch.randn(2, 5, 32)
    for config, formula in [
        (ParallelAdapterConfig(r=4, init_weights=False),
         lambda A, x1, z, h, LN: LN(x1 + h + A(z)) if post_ln else x1 + h + A(z)),
        (AdapterConfig(r=4, init_weights=False),
         lambda A, x1, z, h, LN: LN(x1 + h + A(LN(x1 + h))) if post_ln else x1 + h + A(x1 + h)),
    ]:
        model = get_peft_model(_opt(post_ln), config).eval()
        layer = next(iter(_layers(model).values()))
        block = _opt(post_ln).model.decoder.layers[0]  # the same seed: the same weights, without the adapter
        ln1, ln2 = block.self_attn_layer_norm, block.final_layer_norm

        def LN(t: torch.Tensor, ln: nn.LayerNorm = ln2) -> torch.Tensor:
            return F.layer_norm(t, (32,), ln.weight, ln.bias, ln.eps)

        def A(u: torch.Tensor, layer: BottleneckLayer = layer, act: str = config.non_linearity) -> torch.Tensor:
            return _A(layer, "default", u, act)

        with torch.no_grad():
            attn = block.self_attn(hidden_states=x if post_ln else LN(x, ln1))[0]
            x1 = LN(x + attn, ln1) if post_ln else x + attn
            z = x1 if post_ln else LN(x1)
            h = F.relu(z @ block.fc1.weight.T + block.fc1.bias) @ block.fc2.weight.T + block.fc2.bias
            got = model.base_model.model.model.decoder.layers[0](x)
            got = got[0] if isinstance(got, tuple) else got
        torch.testing.assert_close(got, formula(A, x1, z, h, LN), atol=1e-5, rtol=1e-4)


# ---- configuration, placement, init ------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "config", "leaves", "count"), [
    ("bert", AdapterConfig(variant="houlsby"), {"attention.output.dense", "0.output.dense", "1.output.dense"}, 4),
    ("bert", AdapterConfig(), {"output.LayerNorm"}, 2),  # the FFN's post-residual norm only
    ("gpt2", AdapterConfig(), {"h.0", "h.1"}, 2),  # pre-LN: the residual blocks
    ("llama", AdapterConfig(variant="houlsby"), {"self_attn.o_proj", "mlp.down_proj"}, 4),
    ("t5", AdapterConfig(), {"layer.1", "layer.2"}, 4),  # the FF sub-layer: encoder layer.1, decoder layer.2
    ("llama", ParallelAdapterConfig(), {"0.mlp", "1.mlp"}, 2),
    ("opt", ParallelAdapterConfig(target="attn"), {"0.self_attn", "1.self_attn"}, 2),
    ("opt", AdapterConfig(variant="houlsby"), {"self_attn.out_proj", "fc2"}, 4),
    ("opt", AdapterConfig(), {"layers.0", "layers.1"}, 2),  # pre-LN: the decoder layers
    ("opt", ParallelAdapterConfig(), {"layers.0", "layers.1"}, 2),  # the decoder layers, spanning fc1 → fc2
    ("opt-post-ln", AdapterConfig(), {"0.final_layer_norm", "1.final_layer_norm"}, 2),  # the FFN's post-residual LN
])
def test_default_placements_per_architecture(kind: str, config: PeftConfig, leaves: set[str], count: int) -> None:
    base = _opt(post_ln=True) if kind == "opt-post-ln" else make_model(kind)
    model = get_peft_model(base, config)
    names = list(_layers(model))
    assert len(names) == count
    assert all(any(n.endswith("." + leaf) for leaf in leaves) for n in names), names
    if kind == "t5":
        assert all(("encoder" in n) == n.endswith("layer.1") for n in names)
    if kind == "opt" and isinstance(config, ParallelAdapterConfig) and config.target == "ffn":
        assert model.peft_config["default"].span == ["fc1", "fc2"]
        taps = {n.replace(".base_layer", "") for n, m in model.named_modules() if isinstance(m, ParallelAdapterTap)}
        assert taps == {f"base_model.model.model.decoder.layers.{i}.{end}" for i in (0, 1) for end in ("fc1", "fc2")}


def test_bottleneck_width_from_reduction_factor_or_r() -> None:
    model = get_peft_model(make_model("bert"), AdapterConfig(reduction_factor=8))
    layer = next(iter(_layers(model).values()))
    assert layer.adapter_down["default"].weight.shape == (4, 32)
    model.add_adapter("wide", AdapterConfig(r=12, non_linearity="tanh"))
    assert layer.adapter_up["wide"].weight.shape == (32, 12)
    assert isinstance(layer.non_linearity["wide"], nn.Tanh)


def test_init_weights_choices() -> None:
    model = get_peft_model(make_model("gpt2"), AdapterConfig(r=8))
    layer = next(iter(_layers(model).values()))
    assert not layer.adapter_up["default"].weight.any() and layer.adapter_down["default"].weight.any()
    model.add_adapter("h", AdapterConfig(r=8, init_weights="houlsby"))
    assert layer.adapter_up["h"].weight.abs().max() <= 2e-2 and layer.adapter_up["h"].weight.any()
    assert not layer.adapter_up["h"].bias.any()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"variant": "lora"}, "variant"), ({"r": 0}, r"\.r must"), ({"non_linearity": "softmax"}, "non_linearity"),
    ({"init_weights": "xavier"}, "init_weights"), ({"drop_lowest_layers": -1}, "drop_lowest_layers"),
    ({"adapter_dropout": 1.0}, "adapter_dropout"),
])
def test_config_errors_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(PeftConfigError, match=match):
        AdapterConfig(**kwargs)
    with pytest.raises(PeftConfigError, match="target"):
        ParallelAdapterConfig(target="both")


def test_config_json_round_trip_resolves_variant_defaults() -> None:
    config = AdapterConfig(variant="houlsby")
    assert config.non_linearity == "swish" and config.train_layer_norms is True
    data = config.to_dict()
    assert data["peft_type"] == "BOTTLENECK"
    assert PeftConfig.from_dict(data) == config
    assert PeftConfig.from_dict(ParallelAdapterConfig().to_dict()).peft_type == "PARALLEL_BOTTLENECK"


def test_architecture_without_placement_gives_clear_errors() -> None:
    with pytest.raises(PeftConfigError, match="pass target_modules"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), AdapterConfig())


class _CustomBlock(nn.Module):
    """A model peftkit knows nothing about: a post-LN residual FFN block."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(6, 12), nn.Linear(12, 6), nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(torch.relu(self.up(x))))


def test_any_model_by_naming_modules() -> None:
    # Houlsby on the output projection, Pfeiffer on the post-residual norm, parallel beside the whole block.
    base = nn.Sequential(_CustomBlock(), _CustomBlock())
    x = torch.randn(3, 6)
    model = get_peft_model(copy.deepcopy(base), AdapterConfig(r=2, target_modules=["down"], init_weights=False))
    model.add_adapter("pf", AdapterConfig(r=2, target_modules=["norm"], init_weights=False))
    model.add_adapter("par", ParallelAdapterConfig(r=2, target_modules=["0", "1"], init_weights=False))
    model.set_adapter(["default", "pf", "par"])
    layers = _layers(model)
    assert isinstance(layers["0"], ParallelAdapterLayer) and layers["0.norm"].post_norm
    assert layers["0"].layer_idx is None  # no layer list name: AdapterDrop never skips it
    with torch.no_grad():
        out = model(x)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base(x))
    assert not torch.allclose(out, base(x))


# ---- training, layer norms, checkpoints ----------------------------------------------------------------------------
def test_houlsby_trains_saves_and_restores_layer_norms(tmp_path) -> None:
    base = make_model("bert")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, AdapterConfig(variant="houlsby", r=4, task_type="SEQ_CLS"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n in trainable if "LayerNorm" in n}
    assert len(norms) == 2 * 2 * 2  # 2 layers x (attention, FFN) norms x (weight, bias); not the embedding norm
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**make_inputs("bert")).loss.backward()
    opt.step()
    model.eval()
    expected = model_logits(model, make_inputs("bert"))
    model.save_pretrained(tmp_path)
    keys = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert sum("LayerNorm" in k for k in keys) == 8
    loaded = PeftModel.from_pretrained(make_model("bert"), tmp_path)
    torch.testing.assert_close(model_logits(loaded, make_inputs("bert")), expected)
    restored = model.unload().state_dict()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_adapters_cannot_merge() -> None:
    model = get_peft_model(make_model("gpt2"), ParallelAdapterConfig(r=4))
    with pytest.raises(NotMergeableError, match="PARALLEL_BOTTLENECK"):
        model.merge_and_unload()
    with pytest.raises(NotMergeableError, match="BOTTLENECK"):
        get_peft_model(make_model("gpt2"), AdapterConfig()).merge_adapter()


def test_mixed_batch_refuses_shared_layer_norms() -> None:
    model = get_peft_model(make_model("bert"), AdapterConfig(variant="houlsby", r=4)).eval()
    with pytest.raises(NotImplementedError, match="train_layer_norms=False"):
        model_logits(model, make_inputs("bert", batch=2), adapter_names=["default", BASE_ADAPTER_NAME])


def test_two_houlsby_adapters_share_norms_refuse_mixed_batches_and_unload_restores_them() -> None:
    base = make_model("bert")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    norms = [k for k in original if ".encoder." in k and "LayerNorm" in k]
    model = get_peft_model(base, AdapterConfig(variant="houlsby", r=4), adapter_name="a")
    model.add_adapter("b", AdapterConfig(variant="houlsby", r=4))
    model.train()
    for name in ("a", "b"):  # each adapter in turn trains the same, shared norms
        model.set_adapter(name)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(**make_inputs("bert")).loss.backward()
        opt.step()
        model.zero_grad()
    assert all(not torch.equal(base.get_parameter(k), original[k]) for k in norms)
    model.eval()
    with pytest.raises(NotImplementedError, match=r"\['a', 'b'\] train the model's shared layer norms"):
        model_logits(model, make_inputs("bert", batch=2), adapter_names=["a", "b"])
    restored = model.unload().state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_delete_adapter_restores_houlsby_layer_norms_no_other_adapter_trains() -> None:
    # unload() restored the trained norms but delete_adapter() left them trained (and trainable): a model with the
    # adapter deleted then differed from the base outside any adapter.
    base = make_model("bert")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    norms = [k for k in original if ".encoder." in k and "LayerNorm" in k]
    model = get_peft_model(base, AdapterConfig(variant="houlsby", r=4), adapter_name="a")
    model.add_adapter("b", AdapterConfig(variant="houlsby", r=4))
    model.add_adapter("lora", LoraConfig(r=2))
    with torch.no_grad():
        for k in norms:
            base.get_parameter(k).add_(0.5)
    trained = {k: base.get_parameter(k).clone() for k in norms}
    model.delete_adapter("a")  # "b" still trains the shared norms: they stay as trained
    assert all(torch.equal(base.get_parameter(k), trained[k]) for k in norms)
    model.delete_adapter("b")
    assert all(torch.equal(base.get_parameter(k), original[k]) for k in norms)
    assert not any(base.get_parameter(k).requires_grad for k in norms)
    model.set_adapter("lora")
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    restored = model.unload().state_dict()
    assert all(torch.equal(restored[k], original[k]) for k in original)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_houlsby_norm_keys_do_not_depend_on_an_adapter_wrapping_the_norms(kind: str, tmp_path) -> None:
    # Pfeiffer, added first, wraps BERT's FFN LayerNorm and GPT-2's blocks: the norms Houlsby trains sit inside it.
    model = get_peft_model(make_model(kind), AdapterConfig(r=4, init_weights=False), adapter_name="pf")
    model.add_adapter("default", AdapterConfig(variant="houlsby", r=4, init_weights=False))
    alone = get_peft_model(make_model(kind), AdapterConfig(variant="houlsby", r=4))
    assert set(model.get_adapter_state_dict("default")) == set(alone.get_adapter_state_dict("default"))
    with torch.no_grad():
        for key, tensor in model.get_adapter_state_dict("default", live=True).items():
            if "adapter_" not in key:
                tensor.add_(0.1)  # the trained norms, so that loading them matters
    model.set_adapter("default")
    assert all(p.requires_grad for k, p in model.get_adapter_state_dict("default", live=True).items())
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    loaded = PeftModel.from_pretrained(make_model(kind), tmp_path)
    inputs = make_inputs(kind)
    torch.testing.assert_close(model_logits(loaded, inputs), model_logits(model, inputs))


def test_several_active_adapters_add_up() -> None:
    model = get_peft_model(make_model("gpt2"), ParallelAdapterConfig(r=4, init_weights=False)).eval()
    model.add_adapter("b", ParallelAdapterConfig(r=2, init_weights=False))
    model.set_adapter(["default", "b"])
    reference = make_model("gpt2")
    _reference_hooks(reference, model, "relu", "default")
    _reference_hooks(reference, model, "relu", "b")
    inputs = make_inputs("gpt2")
    torch.testing.assert_close(model_logits(model, inputs), model_logits(reference, inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("kind", "config"), [
    ("llama", AdapterConfig(variant="pfeiffer", r=4, init_weights=False)),
    ("llama", ParallelAdapterConfig(r=4, target="attn", init_weights=False)),
    ("opt", ParallelAdapterConfig(r=4, init_weights=False)),  # the taps run again in the checkpointed recomputation
], ids=["pfeiffer-block", "parallel-attn", "parallel-opt-ffn-span"])
def test_gradient_checkpointing_gives_same_gradients(kind: str, config: PeftConfig) -> None:
    grads = []
    for checkpointing in (False, True):
        base = make_model(kind)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        torch.manual_seed(0)
        model = get_peft_model(base, config).train()
        model(**make_inputs(kind)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert grads[1][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4)


def test_transformers_trainer_trains_adapter(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    inputs = make_inputs("bert", batch=8)
    rows = [{k: v[i] for k, v in inputs.items()} for i in range(8)]
    model = get_peft_model(make_model("bert"), AdapterConfig(r=4, task_type="SEQ_CLS"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # remove_unused_columns=False: the Trainer reads the columns off forward's signature, which only HF peft's own
    # PeftModel class gets special-cased for (PeftModel.forward takes **kwargs).
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no",
                             remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=rows).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed == {n for n, p in model.named_parameters() if p.requires_grad}


# ---- OPT's FFN: a parallel adapter spanning fc1 → fc2 -------------------------------------------------------------
def _taps(model: nn.Module) -> list[ParallelAdapterTap]:
    return [m for m in model.modules() if isinstance(m, ParallelAdapterTap)]


def test_opt_ffn_span_saves_loads_deletes_and_unloads_bit_identical(tmp_path) -> None:
    base = make_model("opt")
    modules = [(n, type(m)) for n, m in base.named_modules()]
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, ParallelAdapterConfig(r=4, init_weights=False)).eval()
    model.add_adapter("b", ParallelAdapterConfig(r=2, init_weights=False))
    inputs = make_inputs("opt")
    expected = model_logits(model, inputs)
    model.save_pretrained(tmp_path)
    assert not any("fc1" in k or "fc2" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(make_model("opt"), tmp_path)
    assert loaded.peft_config["default"].span == ["fc1", "fc2"]
    torch.testing.assert_close(model_logits(loaded, inputs), expected)

    model.delete_adapter("b")
    assert len(_taps(model)) == 4 and all(tap.adapter_names == ["default"] for tap in _taps(model))
    torch.testing.assert_close(model_logits(model, inputs), expected)
    model.add_adapter("b", ParallelAdapterConfig(r=2))
    plain = model.unload()
    assert [(n, type(m)) for n, m in plain.named_modules()] == modules  # no tap left inside the decoder layers
    assert all(torch.equal(v, original[k]) for k, v in plain.state_dict().items())
    deleted = get_peft_model(make_model("opt"), ParallelAdapterConfig(r=4), adapter_name="x")
    deleted.add_adapter("y", LoraConfig(r=4, target_modules=["q_proj"]))
    deleted.delete_adapter("x")
    assert not _taps(deleted) and not _layers(deleted)


def test_opt_ffn_span_mixed_batch_routes_rows() -> None:
    model = get_peft_model(make_model("opt"), ParallelAdapterConfig(r=4, init_weights=False)).eval()
    model.add_adapter("b", ParallelAdapterConfig(r=4, init_weights=False))
    inputs = make_inputs("opt")
    names = ["b", BASE_ADAPTER_NAME, "default"]
    mixed = model_logits(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        if name == BASE_ADAPTER_NAME:
            expected = model_logits(make_model("opt"), inputs)
        else:
            model.set_adapter(name)
            expected = model_logits(model, inputs)
        torch.testing.assert_close(mixed[row], expected[row], atol=1e-5, rtol=1e-4)


def test_opt_ffn_span_nests_with_lora_on_its_ends() -> None:
    model = get_peft_model(make_model("opt"), ParallelAdapterConfig(r=4, init_weights=False)).eval()
    model.add_adapter("lora", LoraConfig(r=4, target_modules=["fc1", "fc2"], init_lora_weights=False))
    model.set_adapter(["default", "lora"])
    reference = make_model("opt")
    _reference_hooks(reference, model, "relu")
    for path, lora in {n.replace(".base_layer", ""): m for n, m in model.base_model.model.named_modules()
                       if type(m).__name__ == "LoraLinear"}.items():
        def hook(mod, inp, out, lora=lora):
            return out + inp[0] @ lora.lora_A["lora"].weight.T @ lora.lora_B["lora"].weight.T * lora.scaling["lora"]
        get_module(reference, path).register_forward_hook(hook)
    inputs = make_inputs("opt")
    torch.testing.assert_close(model_logits(model, inputs), model_logits(reference, inputs), atol=1e-5, rtol=1e-4)
    assert set(model.get_adapter_state_dict("lora")) == set(
        get_peft_model(make_model("opt"), LoraConfig(r=4, target_modules=["fc1", "fc2"])).get_adapter_state_dict(
            "default"))
    model.delete_adapter("default")
    assert not _taps(model)
    torch.testing.assert_close(model.unload().state_dict(), make_model("opt").state_dict(), atol=0, rtol=0)


def test_span_errors_name_the_fix() -> None:
    blocks = r".*\.layers\.\d+"
    with pytest.raises(PeftConfigError, match="span must be two submodule names"):
        ParallelAdapterConfig(span=["fc1"])
    base = make_model("opt")
    with pytest.raises(TargetModuleError, match="no submodule 'fc3'"):
        get_peft_model(base, ParallelAdapterConfig(r=4, target_modules=blocks, span=["fc1", "fc3"]))
    with pytest.raises(TargetModuleError, match="or span two of them"):
        get_peft_model(base, ParallelAdapterConfig(r=4, target_modules=blocks, span=["final_layer_norm", "fc2"]))
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    model = get_peft_model(make_model("opt"), ParallelAdapterConfig(r=4))
    with pytest.raises(TargetModuleError, match="same one"):
        model.add_adapter("beside", ParallelAdapterConfig(r=4, target_modules=blocks))
    assert list(model.peft_config) == ["default"]
    assert all(tap.adapter_names == ["default"] for tap in _taps(model))


# ---- AdapterDrop ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "config"), [("gpt2", AdapterConfig(variant="houlsby", r=4, init_weights=False)),
                                             ("gpt2", ParallelAdapterConfig(r=4, init_weights=False)),
                                             ("opt", ParallelAdapterConfig(r=4, init_weights=False))],
                         ids=["houlsby", "parallel", "parallel-opt-ffn-span"])
def test_skip_layers_equals_model_without_those_layers_adapters(kind: str, config: PeftConfig) -> None:
    inputs = make_inputs(kind)
    model = get_peft_model(make_model(kind), config).eval()
    only_top = get_peft_model(make_model(kind), dataclasses.replace(config, layers_to_transform=[1])).eval()
    only_top.load_state_dict(model.state_dict(), strict=False)
    full = model_logits(model, inputs)
    model.set_skip_layers([0])
    torch.testing.assert_close(model_logits(model, inputs), model_logits(only_top, inputs))
    model.set_skip_layers([0, 1])
    torch.testing.assert_close(model_logits(model, inputs), model_logits(make_model(kind), inputs))
    model.set_skip_layers(None)
    torch.testing.assert_close(model_logits(model, inputs), full)


def test_robust_adapter_drop_skips_lowest_k_layers_per_step_and_never_in_eval() -> None:
    model = get_peft_model(make_model("gpt2"), AdapterConfig(r=4, init_weights=False, drop_lowest_layers=1))
    inputs = make_inputs("gpt2")
    layers = _layers(model)
    seen = set()
    model.train()
    for step in range(10):
        model.zero_grad()
        model(**inputs).loss.backward()
        k = {layer.drop_below["default"] for layer in layers.values()}
        assert len(k) == 1  # one draw per step, shared by every layer
        k = k.pop()
        seen.add(k)
        for layer in layers.values():
            grad = layer.adapter_up["default"].weight.grad
            assert (grad is not None and bool(grad.any())) == (layer.layer_idx >= k), (step, layer.layer_idx, k)
    assert seen == {0, 1}
    model.eval()
    full = get_peft_model(make_model("gpt2"), AdapterConfig(r=4, init_weights=False)).eval()
    full.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(model_logits(model, inputs), model_logits(full, inputs))


def test_generate_mixed_batch_through_block_level_adapters() -> None:
    # Pfeiffer wraps Llama's decoder layers, which receive the cache and position embeddings as keywords.
    model = get_peft_model(make_model("llama"), AdapterConfig(r=4, init_weights=False)).eval()
    model.add_adapter("other", AdapterConfig(r=4, init_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_up" in name:
                param.normal_(std=0.5)  # strong, so that greedy tokens differ
    ids = make_inputs("llama", batch=3)["input_ids"]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 2}
    names = ["other", BASE_ADAPTER_NAME, "default"]
    mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    for row, name in enumerate(names):
        if name == BASE_ADAPTER_NAME:
            with model.disable_adapter():
                expected = model.generate(input_ids=ids[row : row + 1], **kwargs)
        else:
            model.set_adapter(name)
            expected = model.generate(input_ids=ids[row : row + 1], **kwargs)
        assert torch.equal(mixed[row], expected[0])
    assert not torch.equal(mixed[0], mixed[2])


def test_half_precision_base_keeps_fp32_adapters() -> None:
    base = make_model("gpt2").to(torch.bfloat16)
    model = get_peft_model(base, AdapterConfig(r=4, init_weights=False))
    model.add_adapter("par", ParallelAdapterConfig(r=4, init_weights=False))
    model.set_adapter(["default", "par"])
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "adapter_" in n)
    logits = model_logits(model, make_inputs("gpt2"))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
