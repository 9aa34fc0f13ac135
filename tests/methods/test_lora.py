"""LoRA layers against hand-written references of their formulas, plus scaling, init, dropout, multi-adapter,
merging, bias training, half-precision bases and mixed batches, on tiny plain ``nn.Module`` models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LayerHolder
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import IA3Config, LoraConfig, PeftModel, get_peft_model


class _Stack(nn.Module):
    """Two targetable linears with a LayerNorm and an untargeted linear between them (all with biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.norm, self.mid, self.lin2 = nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 5), nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.mid(self.norm(self.lin1(x)))))


class _AllKinds(nn.Module):
    """Embedding -> Conv2d -> Conv1D (GPT-2) -> Linear, so one model holds every LoRA layer type."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.c1d = Conv1D(8, 12)
        self.lin = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(ids).unsqueeze(1))  # (B, 2, T, 6)
        h = h.permute(0, 2, 1, 3).flatten(2)  # (B, T, 12)
        return self.lin(torch.tanh(self.c1d(h)))


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 4, 6)),
    "conv1d_gpt2": (lambda: Conv1D(5, 6), lambda: torch.randn(3, 4, 6)),
    "embedding": (lambda: nn.Embedding(11, 5), lambda: torch.randint(0, 11, (3, 4))),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 7, 7)),
}


def _wrap(layer: nn.Module, adapter_name: str = "default", **cfg) -> PeftModel:
    cfg.setdefault("init_lora_weights", False)
    return get_peft_model(LayerHolder(layer), LoraConfig(target_modules=["layer"], **cfg), adapter_name=adapter_name)


def _ab(layer: nn.Module, name: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(layer, "lora_embedding_A"):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _randomize(model: PeftModel, std: float = 0.5) -> None:
    """Give every adapter tensor a clearly non-zero value so formula errors show up above the tolerance."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=std)


def _reference(kind: str, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float, x: torch.Tensor):
    """The LoRA formula of each layer type, written out from the paper / HF peft, independent of peftkit."""
    with torch.no_grad():
        if kind == "linear":
            return x @ base.weight.T + base.bias + scale * (x @ a.T) @ b.T
        if kind == "conv1d_gpt2":  # weight stored (in, out)
            return x @ base.weight + base.bias + scale * (x @ a.T) @ b.T
        if kind == "embedding":  # A (r, num_embeddings), B (dim, r)
            return base.weight[x] + scale * a[:, x].permute(*range(1, x.dim() + 1), 0) @ b.T
        conv = F.conv1d if kind == "conv1d" else F.conv2d
        kw = {"stride": base.stride, "padding": base.padding}
        return conv(x, base.weight, base.bias, **kw) + scale * conv(conv(x, a, **kw), b)


# ---- each layer type against its formula -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(
    ("r", "alpha", "rslora", "scale"), [(2, 6, False, 3.0), (4, 8, True, 4.0), (3, 3, False, 1.0)]
)
def test_forward_matches_formula_for_each_layer_type(kind, r, alpha, rslora, scale) -> None:
    make_layer, make_x = LAYERS[kind]
    base = make_layer()
    model = _wrap(base, r=r, lora_alpha=alpha, use_rslora=rslora).eval()
    layer = model.base_model.model.layer
    a, b = _ab(layer)
    assert b.abs().sum() > 0, "init_lora_weights=False must give a non-zero B"
    _randomize(model)
    assert layer.scaling["default"] == pytest.approx(scale)
    x = make_x()
    torch.testing.assert_close(model(x), _reference(kind, base, a, b, scale, x))


@pytest.mark.parametrize(
    ("kind", "a_shape", "b_shape", "a_name"),
    [
        ("linear", (2, 6), (5, 2), "lora_A.weight"),
        ("conv1d_gpt2", (2, 6), (5, 2), "lora_A.weight"),
        ("embedding", (2, 11), (5, 2), "lora_embedding_A"),
        ("conv1d", (2, 3, 3), (4, 2, 1), "lora_A.weight"),
        ("conv2d", (2, 3, 3, 3), (4, 2, 1, 1), "lora_A.weight"),
    ],
)
def test_adapter_shapes_and_checkpoint_names_follow_hf_for_each_layer_type(kind, a_shape, b_shape, a_name, tmp_path):
    model = _wrap(LAYERS[kind][0](), r=2)
    a, b = _ab(model.base_model.model.layer)
    assert (tuple(a.shape), tuple(b.shape)) == (a_shape, b_shape)
    if kind == "conv1d_gpt2":
        assert model.base_model.model.layer.fan_in_fan_out  # detected from Conv1D without any config flag
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.layer.{a_name}", f"base_model.model.layer.{a_name.replace('A', 'B')}"}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_wrapped_layer_exposes_base_weight_and_bias_for_model_code(kind) -> None:
    # Model code reads attributes of the layers it owns (T5's DenseReluDense checks ``self.wo.weight.dtype``);
    # HF peft's layers forward ``weight``/``bias`` to the base layer, so a wrapped layer must too.
    base = LAYERS[kind][0]()
    layer = _wrap(base, r=2).base_model.model.layer
    assert layer.weight is base.weight
    assert getattr(layer, "bias", None) is getattr(base, "bias", None)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_merged_delta_weight_equals_unmerged_output_for_each_layer_type(kind) -> None:
    make_layer, make_x = LAYERS[kind]
    model = _wrap(make_layer(), r=3, lora_alpha=5).eval()
    _randomize(model)
    x = make_x()
    unmerged = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    plain = model.merge_and_unload()
    assert type(plain.layer) is type(make_layer())
    torch.testing.assert_close(plain(x), unmerged, atol=1e-5, rtol=1e-5)


# ---- patterns and init -------------------------------------------------------------------------------------------
def test_rank_and_alpha_patterns_apply_per_module() -> None:
    cfg = LoraConfig(target_modules=["lin1", "mid", "lin2"], r=4, lora_alpha=8, init_lora_weights=False,
                     rank_pattern={"lin1": 2, r"m.d": 6}, alpha_pattern={"lin2": 2, "mid": 3})
    model = get_peft_model(_Stack(), cfg).eval()
    net = model.base_model.model
    expected = {"lin1": (2, 8 / 2), "mid": (6, 3 / 6), "lin2": (4, 2 / 4)}
    for name, (r, scale) in expected.items():
        layer = getattr(net, name)
        assert layer.r["default"] == r and layer.lora_A["default"].weight.shape[0] == r
        assert layer.scaling["default"] == pytest.approx(scale)
    _randomize(model)
    x = torch.randn(3, 6)
    a1, b1 = _ab(net.lin1)
    h = _reference("linear", net.lin1.base_layer, a1, b1, 4.0, x)
    am, bm = _ab(net.mid)
    h = torch.relu(_reference("linear", net.mid.base_layer, am, bm, 0.5, net.norm(h)))
    a2, b2 = _ab(net.lin2)
    torch.testing.assert_close(model(x), _reference("linear", net.lin2.base_layer, a2, b2, 0.5, h))


def test_init_true_gives_zero_b_kaiming_a_and_unchanged_output() -> None:
    base = nn.Linear(256, 7)
    x = torch.randn(4, 256)
    expected = base(x).detach()
    model = _wrap(base, r=16, init_lora_weights=True)
    a, b = _ab(model.base_model.model.layer)
    assert torch.count_nonzero(b) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert a.abs().max() <= bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_init_gaussian_gives_a_std_one_over_r_and_zero_b() -> None:
    model = _wrap(nn.Linear(512, 5), r=8, init_lora_weights="gaussian")
    a, b = _ab(model.base_model.model.layer)
    assert torch.count_nonzero(b) == 0
    assert a.std().item() == pytest.approx(1 / 8, rel=0.1)
    assert a.mean().abs().item() < 0.02


# ---- dropout ---------------------------------------------------------------------------------------------------
def test_dropout_active_in_train_mode_only() -> None:
    base = nn.Linear(6, 5)
    model = _wrap(base, r=4, lora_dropout=0.5)
    _randomize(model)
    a, b = _ab(model.base_model.model.layer)
    x = torch.randn(8, 6)
    reference = _reference("linear", base, a, b, 2.0, x)
    model.train()
    first, second = model(x), model(x)
    assert not torch.allclose(first, second) and not torch.allclose(first, reference)
    model.eval()
    torch.testing.assert_close(model(x), reference)
    torch.testing.assert_close(model(x), reference)


# ---- several adapters ------------------------------------------------------------------------------------------
def _two_adapters(layer: nn.Module) -> PeftModel:
    model = _wrap(layer, adapter_name="a", r=2, lora_alpha=4)
    model.add_adapter("b", LoraConfig(target_modules=["layer"], r=3, lora_alpha=9, init_lora_weights=False))
    _randomize(model)
    return model.eval()


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "embedding", "conv2d"])
def test_active_adapters_add_up_when_several_are_set(kind) -> None:
    make_layer, make_x = LAYERS[kind]
    base = make_layer()
    model = _two_adapters(base)
    layer, x = model.base_model.model.layer, make_x()
    model.set_adapter(["a", "b"])
    ref_a = _reference(kind, base, *_ab(layer, "a"), 2.0, x)
    ref_b = _reference(kind, base, *_ab(layer, "b"), 3.0, x)
    with torch.no_grad():
        plain = base(x)
    torch.testing.assert_close(model(x), ref_a + ref_b - plain)


def test_merge_subset_then_unmerge_restores_weights() -> None:
    base = nn.Linear(6, 5)
    original = base.weight.detach().clone()
    model = _two_adapters(base)
    model.set_adapter(["a", "b"])
    x = torch.randn(3, 6)
    both = model(x)
    model.merge_adapter(["a"])
    layer = model.base_model.model.layer
    assert layer.merged_adapters == ["a"]
    a, b = _ab(layer, "a")
    torch.testing.assert_close(base.weight, original + 2.0 * (b @ a).detach())
    torch.testing.assert_close(model(x), both, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert layer.merged_adapters == []
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), both, atol=1e-5, rtol=1e-5)


def test_merge_is_idempotent_when_called_twice() -> None:
    base = nn.Linear(6, 5)
    original = base.weight.detach().clone()
    model = _wrap(base, r=2).eval()
    _randomize(model)
    x = torch.randn(3, 6)
    unmerged = model(x)
    model.merge_adapter()
    once = base.weight.detach().clone()
    model.merge_adapter()
    model.merge_adapter(["default"])
    torch.testing.assert_close(base.weight, once, rtol=0, atol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)


@pytest.mark.parametrize("poisoned", ["lin1", "lin2"])
@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_with_nan_adapter_raises_naming_it_and_leaves_weights_unchanged(poisoned, how) -> None:
    cfg = LoraConfig(target_modules=["lin1", "mid", "lin2"], r=2, init_lora_weights=False)
    model = get_peft_model(_Stack(), cfg, adapter_name="broken").eval()
    net = model.base_model.model
    before = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        getattr(net, poisoned).lora_B["broken"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="broken"):
        if how == "merge_adapter":
            model.merge_adapter(safe_merge=True)
        else:
            model.merge_and_unload(safe_merge=True)
    after = dict(net.named_parameters())
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=f"{name} changed by a failed safe merge")
    assert all(not getattr(net, n).merged_adapters for n in ("lin1", "mid", "lin2"))


# ---- bias training ---------------------------------------------------------------------------------------------
BIAS_CASES = {
    "all": ["lin1.base_layer.bias", "norm.bias", "mid.bias", "lin2.base_layer.bias"],
    "lora_only": ["lin1.base_layer.bias", "lin2.base_layer.bias"],
}


@pytest.mark.parametrize("bias", list(BIAS_CASES))
def test_bias_training_marks_saves_and_unload_restores_biases(bias, tmp_path) -> None:
    net = _Stack()
    original = {n: p.detach().clone() for n, p in net.named_parameters()}
    model = get_peft_model(net, LoraConfig(target_modules=["lin1", "lin2"], r=2, bias=bias))
    trainable = {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == set(BIAS_CASES[bias])
    model.train()
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.randn(8, 6), torch.randn(8, 4)
    for _ in range(3):
        optim.zero_grad()
        F.mse_loss(model(x), y).backward()
        optim.step()
    trained = {n: p.detach().clone() for n, p in model.base_model.model.named_parameters()}
    assert not torch.equal(trained[BIAS_CASES[bias][0]], original["lin1.bias"])
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for name in BIAS_CASES[bias]:
        torch.testing.assert_close(saved[f"base_model.model.{name}"], trained[name], rtol=0, atol=0)
    plain = model.unload()
    assert type(plain.lin1) is nn.Linear and type(plain.lin2) is nn.Linear
    for name, param in plain.named_parameters():
        assert torch.equal(param, original[name]), f"unload() did not restore {name}"


def test_bias_all_stays_trainable_for_active_adapter_when_another_is_loaded() -> None:
    cfg = LoraConfig(target_modules=["lin1"], r=2, bias="all")
    model = get_peft_model(_Stack(), cfg, adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=["lin1"], r=2, bias="all"))
    model.set_adapter("a")
    grads = {n.removeprefix("base_model.model."): p.requires_grad for n, p in model.named_parameters()}
    assert grads["norm.bias"] and grads["mid.bias"] and grads["lin1.base_layer.bias"]
    assert grads["lin1.lora_A.a.weight"] and not grads["lin1.lora_A.b.weight"]


@pytest.mark.parametrize("bias", list(BIAS_CASES))
def test_bias_keys_do_not_depend_on_nesting_and_load_into_either_order(bias, tmp_path) -> None:
    # The keys followed the base_layer hops: with (IA)³ added to lin1 first they read "lin1.base_layer.base_layer.bias"
    # (and "lin1.base_layer.bias" twice over for bias="all"), so the checkpoint no longer loaded where LoRA came first.
    lora = LoraConfig(target_modules=["lin1", "lin2"], r=2, bias=bias, init_lora_weights=False)
    ia3 = IA3Config(target_modules=["lin1"], feedforward_modules=[], init_ia3_weights=False)

    def build(first: str) -> PeftModel:
        torch.manual_seed(0)
        configs = {"ia3": ia3, "default": lora}
        second = "ia3" if first == "default" else "default"
        model = get_peft_model(_Stack(), configs[first], adapter_name=first)
        model.add_adapter(second, configs[second])
        return model.eval()

    expected = [f"base_model.model.{name}" for name in BIAS_CASES[bias]]
    x = torch.randn(3, 6)
    for saved_first, loaded_first in (("ia3", "default"), ("default", "ia3")):
        source = build(saved_first)
        assert sorted(k for k in source.get_adapter_state_dict("default") if "lora_" not in k) == sorted(expected)
        with torch.no_grad():
            for key in expected:
                source.get_parameter(key).add_(0.25)
        source.set_adapter("default")
        want = source(x)
        source.save_pretrained(tmp_path / saved_first, selected_adapters=["default"])
        target = build(loaded_first)
        target.load_adapter(tmp_path / saved_first, "loaded")
        target.set_adapter("loaded")
        torch.testing.assert_close(target(x), want, rtol=0, atol=0)


# ---- half-precision bases ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "embedding", "conv2d"])
def test_half_precision_base_keeps_fp32_adapters_and_forward_and_merge_work(kind, dtype) -> None:
    make_layer, make_x = LAYERS[kind]
    base = make_layer().to(dtype)
    model = _wrap(base, r=2).eval()
    _randomize(model, std=0.2)
    layer = model.base_model.model.layer
    a, b = _ab(layer)
    assert a.dtype == b.dtype == torch.float32 and base.weight.dtype == dtype
    x = make_x()
    x = x if kind == "embedding" else x.to(dtype)
    out = model(x)
    assert out.dtype == dtype
    ref_base = make_layer()
    ref_base.load_state_dict({k: v.float() for k, v in base.state_dict().items()})
    reference = _reference(kind, ref_base, a, b, 1.0 * 8 / 2, x if kind == "embedding" else x.float())
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(out.float(), reference, atol=tol, rtol=tol)
    model.merge_adapter()
    assert base.weight.dtype == dtype
    torch.testing.assert_close(model(x).float(), reference, atol=tol, rtol=tol)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x).float(), out.float(), atol=tol, rtol=tol)


# ---- mixed batches -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["emb"], ["conv"], ["c1d"], ["lin"], ["emb", "conv", "c1d", "lin"]])
def test_mixed_batch_equals_per_adapter_runs_row_by_row(targets) -> None:
    torch.manual_seed(0)
    model = get_peft_model(_AllKinds(), LoraConfig(target_modules=targets, r=2, lora_alpha=4,
                                                   init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=targets, r=5, lora_alpha=3, init_lora_weights=False))
    _randomize(model, std=0.3)
    model.eval()
    ids = torch.randint(0, 10, (5, 4))
    names = ["a", "__base__", "b", "a", "b"]
    mixed = model(ids, adapter_names=names)
    per_adapter = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        per_adapter[name] = model(ids)
    with model.disable_adapter():
        per_adapter["__base__"] = model(ids)
    assert not torch.allclose(per_adapter["a"], per_adapter["b"])
    assert not torch.allclose(per_adapter["a"], per_adapter["__base__"])
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], per_adapter[name][row], atol=1e-6, rtol=1e-5, msg=f"row {row} ({name})")
