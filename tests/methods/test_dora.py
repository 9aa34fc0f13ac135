"""DoRA (``LoraConfig(use_dora=True)``): the formula, Hugging Face peft parity both ways, merges, mixed batches,
gradients, gradient checkpointing, 4-bit bases, and the eval-mode weight-norm cache never serving a stale norm.

Reference formula (Liu et al. 2024, arXiv:2402.09353; HF peft ``tuners/lora/dora.py``), per output row o:
``h = m ⊙ (W x + s·B A x) / ‖W + s·B A‖_c + b``, the norm detached from autograd (paper Sec. 4.3).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import LayerHolder, make_inputs, make_model
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.core.errors import PeftConfigError
from peftkit.methods import dora

peft = pytest.importorskip("peft")

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


class ConvNet(nn.Module):
    """A tiny image model with Conv2d and Conv1d layers (HF peft wraps both with DoRA)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.seq = nn.Conv1d(6, 5, 3)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(2)  # (B, 6, H·W)
        return self.head(torch.relu(self.seq(h)).mean(-1))


def _convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet().eval()


# id -> (model factory, LoraConfig kwargs shared by both libraries, inputs)
CASES = {
    "gpt2-conv1d": (lambda: make_model("gpt2"), {"target_modules": ["c_attn", "c_fc"]}),
    "llama-linear": (lambda: make_model("llama"), {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "llama-embedding": (lambda: make_model("llama"), {"target_modules": ["embed_tokens", "o_proj"]}),
    "conv2d-conv1d": (_convnet, {"target_modules": ["conv", "seq"]}),
}
IDS = list(CASES)


def _inputs(case: str) -> dict[str, torch.Tensor]:
    if case.startswith("conv"):
        return {"x": torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(3))}
    return make_inputs(case.split("-")[0])


def _out(model: nn.Module, inputs: dict[str, torch.Tensor], **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, **kw)
    return out if isinstance(out, torch.Tensor) else out.logits


def _perturb(model: nn.Module, seed: int = 7, std: float = 0.1) -> None:
    """Move every trainable tensor (A, B and the magnitude) as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * std)


def _pk(case: str, **kw) -> PeftModel:
    factory, base_kw = CASES[case]
    return get_peft_model(factory(), LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                                **base_kw, **kw))


def _hf(case: str):
    factory, base_kw = CASES[case]
    return peft.get_peft_model(factory(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                                          **base_kw))


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, peftkit.methods.lora.LoraLayer)]


# ---- parity with Hugging Face peft ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", IDS)
def test_hf_checkpoint_loads_into_peftkit_with_same_outputs(case, tmp_path) -> None:
    hf = _hf(case)
    _perturb(hf)
    hf.save_pretrained(tmp_path, save_embedding_layers=False)
    ours = PeftModel.from_pretrained(CASES[case][0](), tmp_path)
    inputs = _inputs(case)
    want, got = _out(hf.eval(), inputs), _out(ours.eval(), inputs)
    assert (want - _out(CASES[case][0](), inputs)).abs().max() > 1e-3, "vacuous: the adapter changes nothing"
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("case", IDS)
def test_peftkit_checkpoint_loads_into_hf_with_same_outputs_and_keys(case, tmp_path) -> None:
    ours = _pk(case)
    _perturb(ours)
    ours.save_pretrained(tmp_path / "pk")
    _hf(case).save_pretrained(tmp_path / "hf", save_embedding_layers=False)
    def keys(where: str) -> dict[str, torch.Size]:  # whole embedding matrices (save_embedding_layers) aside
        tensors = load_file(tmp_path / where / "adapter_model.safetensors")
        return {k: v.shape for k, v in tensors.items() if ".base_layer." not in k}

    assert keys("pk") == keys("hf")
    assert any(k.endswith(".lora_magnitude_vector") for k in keys("pk"))
    assert json.loads((tmp_path / "pk" / "adapter_config.json").read_text())["use_dora"] is True
    hf = peft.PeftModel.from_pretrained(CASES[case][0](), tmp_path / "pk")
    inputs = _inputs(case)
    torch.testing.assert_close(_out(hf.eval(), inputs), _out(ours.eval(), inputs), atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["llama-linear", "gpt2-conv1d"])
def test_training_forward_and_gradients_match_hf_with_norm_detached(case) -> None:
    hf, ours = _hf(case), _pk(case)
    _perturb(hf)
    with torch.no_grad():
        live = ours.get_adapter_state_dict("default", live=True)
        for key, value in peft.get_peft_model_state_dict(hf).items():
            live[key].copy_(value)
    inputs = _inputs(case)
    losses = []
    for model in (hf, ours):
        torch.manual_seed(5)  # GPT-2's dropout: both models draw the same masks
        losses.append(model.train()(**inputs).loss)
        losses[-1].backward()
    torch.testing.assert_close(losses[1], losses[0], atol=TOL, rtol=0)
    grads_hf = {n.replace("vector.default.weight", "vector").replace(".default", ""): p.grad
                for n, p in hf.named_parameters() if p.requires_grad}
    grads_pk = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads_pk.keys() == grads_hf.keys()
    for name, grad in grads_pk.items():  # equal only if both treat ‖W + sBA‖ as a constant (paper Sec. 4.3)
        torch.testing.assert_close(grad, grads_hf[name], atol=1e-5, rtol=1e-4, msg=name)


def test_two_active_adapters_match_hf_in_order() -> None:
    """HF peft applies active adapters in turn, DoRA rescaling the running output; merging keeps that."""
    kw = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ["q_proj", "v_proj"]}
    hf = peft.get_peft_model(make_model("llama"), peft.LoraConfig(use_dora=True, **kw))
    hf.add_adapter("plain", peft.LoraConfig(**kw))
    ours = get_peft_model(make_model("llama"), LoraConfig(use_dora=True, **kw))
    ours.add_adapter("plain", LoraConfig(**kw))
    _perturb(hf)
    hf.base_model.set_adapter(["default", "plain"])
    ours.set_adapter(["default", "plain"])
    with torch.no_grad():
        for name in ("default", "plain"):
            live = ours.get_adapter_state_dict(name, live=True)
            for key, value in peft.get_peft_model_state_dict(hf, adapter_name=name).items():
                live[key].copy_(value)
    inputs = make_inputs("llama")
    want = _out(hf.eval(), inputs)
    torch.testing.assert_close(_out(ours.eval(), inputs), want, atol=TOL, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(_out(ours, inputs), want, atol=TOL, rtol=0)


# ---- the formula, by hand ---------------------------------------------------------------------------------------
def _wrapped(base: nn.Module, **kw) -> tuple[PeftModel, nn.Module]:
    model = get_peft_model(LayerHolder(base), LoraConfig(r=3, lora_alpha=6, use_dora=True, init_lora_weights=False,
                                                         target_modules=["layer"], **kw))
    _perturb(model)
    return model, model.base_model.model.layer


@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_equals_hand_written_formula(bias) -> None:
    model, layer = _wrapped(nn.Linear(6, 5, bias=bias))
    w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m, s = layer.lora_magnitude_vector["default"], layer.scaling["default"]
    x = torch.randn(4, 6)
    merged = w + s * b @ a
    want = (m / merged.norm(dim=1)) * (x @ merged.T) + (layer.base_layer.bias if bias else 0)
    torch.testing.assert_close(model.eval()(x), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6)])  # (batch, seq, in): the layer flattens its output rows
def test_linear_dropout_in_training_follows_hf_formula(shape: tuple[int, ...]) -> None:
    model, layer = _wrapped(nn.Linear(6, 5), lora_dropout=0.5)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m, s = layer.lora_magnitude_vector["default"], layer.scaling["default"]
    x = torch.randn(*shape)
    torch.manual_seed(3)
    got = model.train()(x)
    torch.manual_seed(3)
    xd = F.dropout(x, 0.5, training=True)
    f = m / (w + s * b @ a).norm(dim=1)
    want = x @ w.T + bias + (f - 1) * (xd @ w.T) + f * s * (xd @ a.T @ b.T)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_embedding_forward_equals_hand_written_formula() -> None:
    model, layer = _wrapped(nn.Embedding(10, 4))
    e, a, b = layer.base_layer.weight, layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    m, s = layer.lora_magnitude_vector["default"], layer.scaling["default"]
    ids = torch.tensor([[1, 7, 3], [9, 0, 7]])
    merged = e + s * (b @ a).T  # (num, dim): the norm runs over the vocabulary, one per embedding dim
    want = (m / merged.norm(dim=0)) * merged[ids]
    torch.testing.assert_close(model.eval()(ids), want, atol=1e-6, rtol=1e-6)


def test_conv2d_forward_equals_hand_written_formula() -> None:
    model, layer = _wrapped(nn.Conv2d(3, 4, 3, padding=1))
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m, s = layer.lora_magnitude_vector["default"], layer.scaling["default"]
    assert m.shape == (1, 4, 1, 1)  # HF peft's layout for convolutions
    merged = w + s * (b.flatten(1) @ a.flatten(1)).view(w.shape)
    merged = merged * (m.view(-1) / merged.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(model.eval()(x), F.conv2d(x, merged, bias, padding=1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", IDS)
def test_default_init_leaves_outputs_exactly_unchanged(case) -> None:
    factory, kw = CASES[case]
    model = get_peft_model(factory(), LoraConfig(r=4, use_dora=True, **kw))
    inputs = _inputs(case)
    assert torch.equal(_out(model.eval(), inputs), _out(factory(), inputs))  # m = ‖W‖_c, so f = 1 exactly


# ---- merging, mixed batches ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["gpt2-conv1d", "llama-linear", "conv2d-conv1d", "llama-embedding"])
def test_merge_unmerge_and_merge_and_unload_are_exact(case) -> None:
    model = _pk(case)
    _perturb(model)
    targets = CASES[case][1]["target_modules"]
    model.add_adapter("plain", LoraConfig(r=2, init_lora_weights=False, target_modules=targets))
    _perturb(model, seed=9)
    model.set_adapter(["default", "plain"])
    inputs = _inputs(case)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = _out(model.eval(), inputs)
    model.merge_adapter()
    torch.testing.assert_close(_out(model, inputs), want, atol=TOL, rtol=0)
    model.merge_adapter()  # idempotent
    torch.testing.assert_close(_out(model, inputs), want, atol=TOL, rtol=0)
    model.unmerge_adapter()
    for name, param in model.named_parameters():  # W = W'/f − ΔW: exact up to fp32 rounding of W + ΔW
        torch.testing.assert_close(param, before[name], atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(_out(model, inputs), want, atol=TOL, rtol=0)
    torch.testing.assert_close(_out(model.merge_and_unload(), inputs), want, atol=TOL, rtol=0)


def test_mixed_batch_rows_equal_each_adapter_alone() -> None:
    model = _pk("llama-linear")
    kw = CASES["llama-linear"][1]
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, use_dora=True, init_lora_weights=False, **kw))
    model.add_adapter("plain", LoraConfig(r=4, init_lora_weights=False, **kw))
    _perturb(model)
    inputs = make_inputs("llama", batch=4)
    names = ["default", "plain", "__base__", "other"]
    got = _out(model.eval(), inputs, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                want = _out(model, inputs)
        else:
            model.set_adapter(name)
            want = _out(model, inputs)
        torch.testing.assert_close(got[row], want[row], atol=TOL, rtol=0, msg=name)


def test_merged_dora_is_the_base_model_cost_and_unload_restores_base() -> None:
    model = _pk("llama-linear")
    _perturb(model)
    inputs = make_inputs("llama")
    want = _out(model.eval(), inputs)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, peftkit.methods.lora.LoraLayer) for m in merged.modules())
    torch.testing.assert_close(_out(merged, inputs), want, atol=TOL, rtol=0)
    fresh = _pk("llama-linear")
    assert torch.equal(_out(fresh.unload(), inputs), _out(make_model("llama"), inputs))


# ---- training ------------------------------------------------------------------------------------------------
def test_only_adapter_parameters_train_and_magnitude_gets_gradients() -> None:
    model = _pk("llama-linear")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(k in n for k in ("lora_A", "lora_B", "lora_magnitude_vector")) for n in trainable)
    assert any("lora_magnitude_vector" in n for n in trainable)
    model.train()(**make_inputs("llama")).loss.backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if "lora_magnitude_vector" in n or "lora_A" in n)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    inputs = make_inputs("llama")
    grads = []
    for checkpointing in (False, True):
        model = _pk("llama-linear")
        _perturb(model)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": True})
        loss = model.train()(**inputs).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, msg=name)


def test_loss_goes_down_training_magnitude_and_low_rank_factors() -> None:
    model = _pk("gpt2-conv1d")
    inputs = make_inputs("gpt2")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model.train()(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


# ---- the eval-mode weight-norm cache --------------------------------------------------------------------------
def _fresh_out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The output with every cached norm dropped: what an uncached DoRA computes."""
    for layer in _layers(model):
        layer.variant_cache.clear()
    return _out(model, inputs)


def test_eval_mode_reuses_the_norm_and_training_mode_recomputes(monkeypatch) -> None:
    model = _pk("llama-linear").eval()
    calls = []
    real = dora.weight_norm
    monkeypatch.setattr(dora, "weight_norm", lambda *a: calls.append(1) or real(*a))
    inputs = make_inputs("llama")
    first = _out(model, inputs)
    n_layers = len(_layers(model))
    assert len(calls) == n_layers
    assert torch.equal(_out(model, inputs), first) and len(calls) == n_layers  # second eval call: all cached
    with torch.no_grad():
        model.train()(**inputs)
    assert len(calls) == 2 * n_layers  # training mode never reads the cache


@pytest.mark.parametrize("change", ["optimizer_step", "in_place_write", "data_swap", "set_scale", "load_adapter",
                                    "merge_other_adapter", "base_weight_write", "train_then_eval"])
def test_stale_norm_is_never_used(change, tmp_path) -> None:
    model = _pk("llama-linear")
    model.add_adapter("plain", LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"]))
    _perturb(model)
    inputs = make_inputs("llama")
    before = _out(model.eval(), inputs)  # fills the cache
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    b = layer.lora_B["default"].weight
    if change == "optimizer_step":
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model.train()(**inputs).loss.backward()
        opt.step()
        model.eval()
    elif change == "in_place_write":
        with torch.no_grad():
            b.mul_(3.0)
    elif change == "data_swap":
        b.data = b.data * 3.0
    elif change == "set_scale":
        model.set_scale("default", 3.0) if hasattr(model, "set_scale") else layer.set_scale("default", 3.0)
    elif change == "load_adapter":
        other = _pk("llama-linear")
        _perturb(other, seed=11)
        other.save_pretrained(tmp_path)
        model.load_adapter(tmp_path, adapter_name="default")
    elif change == "merge_other_adapter":
        model.merge_adapter(["plain"])
    elif change == "base_weight_write":
        with torch.no_grad():
            layer.get_base_layer().weight.mul_(1.5)
    elif change == "train_then_eval":  # a write through .data moves no version counter: train() must clear
        model.train()
        b.data.mul_(3.0)
    got = _out(model.eval(), inputs)
    assert not torch.allclose(got, before), "vacuous: the change did not change the output"
    if change == "merge_other_adapter":
        model.unmerge_adapter()
        model.set_adapter(["default", "plain"])
        got = _out(model, inputs)  # unmerged and both active: a stale norm would now differ from a fresh one
    torch.testing.assert_close(got, _fresh_out(model, inputs), atol=0, rtol=0)


def test_cache_entries_go_with_a_deleted_adapter() -> None:
    model = _pk("llama-linear")
    model.add_adapter("other", LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    model.set_adapter("other")
    _out(model.eval(), make_inputs("llama"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "other" in layer.variant_cache
    model.set_adapter("default")
    model.delete_adapter("other")
    assert "other" not in layer.variant_cache and "other" not in layer.lora_magnitude_vector


# ---- configs and errors ------------------------------------------------------------------------------------------
def test_hf_config_with_use_dora_loads_and_round_trips(tmp_path) -> None:
    hf = _hf("llama-linear")
    hf.save_pretrained(tmp_path)
    config = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert config.use_dora is True and "use_dora" not in LoraConfig.hf_unsupported_fields
    assert LoraConfig().use_dora is False  # HF peft's default


@pytest.mark.parametrize("kwargs", [{"use_dora": True, "gate": "mean"}])
def test_dora_with_a_gate_is_refused(kwargs) -> None:
    with pytest.raises(PeftConfigError, match="use_dora"):
        LoraConfig(**kwargs)


def test_adalora_refuses_use_dora() -> None:
    with pytest.raises(PeftConfigError, match="use_dora=True"):
        peftkit.AdaLoraConfig(total_step=10, use_dora=True)


def test_safe_merge_of_a_non_finite_dora_adapter_changes_nothing() -> None:
    model = _pk("llama-linear")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_magnitude_vector["default"][0] = float("inf")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert not any(layer.merged_adapters for layer in _layers(model))


def test_deepcopy_keeps_working() -> None:
    model = _pk("llama-linear")
    _perturb(model)
    inputs = make_inputs("llama")
    want = _out(model.eval(), inputs)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(_out(clone, inputs), want, atol=0, rtol=0)


# ---- bitsandbytes 4-bit bases -------------------------------------------------------------------------------------
def _hf_dora_on_quantized(quant_type: str, targets: list[str], tmp_path) -> tuple[nn.Module, PeftModel]:
    """HF peft's DoRA adapter (perturbed) on a quantised Llama, and peftkit's load of its checkpoint."""
    pytest.importorskip("bitsandbytes")
    ours_base, hf_base = (peftkit.quantize_model(make_model("llama"), quant_type=quant_type) for _ in range(2))
    kw = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": targets}
    hf = peft.get_peft_model(hf_base, peft.LoraConfig(use_dora=True, **kw))
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    return hf, PeftModel.from_pretrained(ours_base, tmp_path, is_trainable=True)


@pytest.mark.filterwarnings("ignore:.*re-quantises:UserWarning")
def test_4bit_base_matches_hf_and_merges_exactly_when_dequantized(tmp_path) -> None:
    hf, ours = _hf_dora_on_quantized("nf4", ["q_proj", "v_proj", "down_proj"], tmp_path)
    assert type(ours.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "LoraLinear4bit"
    inputs = make_inputs("llama")
    with torch.no_grad():  # train mode: bitsandbytes dequantises and runs an fp32 matmul, as for plain LoRA
        want, got = hf.train()(**inputs).logits, ours.train()(**inputs).logits
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    # Before any eval pass: bitsandbytes' CPU eval kernel (bf16) would round the unmerged side.
    merged = copy.deepcopy(ours).merge_and_unload(dequantize=True)  # float layers: f ⊙ (dequant(W) + s·B A)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(merged.train()(**inputs).logits, got, atol=TOL, rtol=0)
    ours(**inputs).loss.backward()
    assert all(p.grad is not None for n, p in ours.named_parameters() if "lora_magnitude_vector" in n)
    ours.eval()
    unmerged = _out(ours, inputs)
    assert torch.equal(_out(ours, inputs), unmerged)  # the cached norm (no dequantisation) gives the same outputs


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_8bit_base_matches_hf(tmp_path) -> None:
    hf, ours = _hf_dora_on_quantized("int8", ["q_proj", "v_proj"], tmp_path)
    assert type(ours.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "LoraLinear8bitLt"
    inputs = make_inputs("llama")
    with torch.no_grad():
        want, got = hf.train()(**inputs).logits, ours.train()(**inputs).logits
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    ours(**inputs).loss.backward()
    assert all(p.grad is not None for n, p in ours.named_parameters() if "lora_magnitude_vector" in n)
