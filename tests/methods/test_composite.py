"""Composite adapters (several methods under one name), MAM and UniPELT on tiny BERT and GPT-2.

References: a composite equals its members added as separate adapters and active together (exact: each member
computes what it would alone); MAM and UniPELT equal their formulas written out for one transformer layer, read
through hooks (LoRA ``W0 x + G·BAx``, the adapter ``G·A(u)``, attention with gated prefixes ``softmax(q [G P_K; K]ᵀ
/ √d) [G P_V; V]``, per example or per query token). Then gates, gradients, checkpoints, mixed batches, parameter
counts in closed form, merge errors, ``unload`` and config errors.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from conftest import make_inputs, make_model, model_logits
from safetensors.torch import load_file
from torch import nn

from peftkit import (
    AdaLoraConfig,
    AdapterConfig,
    CompositeConfig,
    IA3Config,
    LoraConfig,
    MAMConfig,
    NotMergeableError,
    ParallelAdapterConfig,
    PeftConfig,
    PeftConfigError,
    PeftModel,
    PrefixTuningConfig,
    TargetModuleError,
    UniPELTConfig,
    get_peft_model,
)
from peftkit.core.layer import BASE_ADAPTER_NAME
from peftkit.methods.prefix_tuning import PrefixTuning

KINDS = ["bert", "gpt2"]
D, L, H = 32, 2, 2  # tiny models' width, layers, heads (conftest)
# Per model: (LoRA-wrapped linear, serially adapted module, parallel-adapted FFN, attention module) of layer 0.
PATHS = {
    "bert": ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.output.LayerNorm",
             "bert.encoder.layer.0.output", "bert.encoder.layer.0.attention.self"),
    "gpt2": ("transformer.h.0.attn.c_attn", "transformer.h.0", "transformer.h.0.mlp", "transformer.h.0.attn"),
}


def _small_unipelt(**kw) -> UniPELTConfig:
    return UniPELTConfig(r=4, num_virtual_tokens=3, prefix_hidden_size=8, reduction_factor=4, **kw)


def _small_mam() -> MAMConfig:
    return MAMConfig(num_virtual_tokens=3, prefix_hidden_size=8, ffn_r=4)


def _peft(kind: str, config: PeftConfig, seed: int = 0) -> PeftModel:
    return get_peft_model(make_model(kind, seed), config).eval()


def _perturb(model: nn.Module, seed: int = 7, scale: float = 0.3) -> None:
    """Move every trainable tensor as training would, so that zero-initialised B / W_up act."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * scale)


@contextmanager
def _capture(model: PeftModel, paths: dict[str, str]):
    """Record ``(args, kwargs, output)`` of modules by name during the forward calls inside the block."""
    seen: dict[str, tuple] = {}
    handles = []
    for key, path in paths.items():
        module = model.base_model.model.get_submodule(path)

        def hook(mod, args, kwargs, out, key=key):
            seen[key] = (args, kwargs, out)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


# ---- hand-written pieces -------------------------------------------------------------------------------------------
def _gate(linear: nn.Linear, z: torch.Tensor, mode: str) -> torch.Tensor:
    g = torch.sigmoid(z @ linear.weight.T + linear.bias)  # (B, T, 1)
    return g.mean(dim=1, keepdim=True) if mode == "mean" else g


def _bottleneck(layer: nn.Module, u: torch.Tensor) -> torch.Tensor:
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    return layer.scaling["default"] * (torch.relu(u @ down.weight.T + down.bias) @ up.weight.T + up.bias)


def _heads(t: torch.Tensor) -> torch.Tensor:
    return t.view(t.shape[0], t.shape[1], H, D // H).transpose(1, 2)  # (B, H, T, hd)


def _qkv(kind: str, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if kind == "bert":
        return _heads(attn.query(x)), _heads(attn.key(x)), _heads(attn.value(x))
    return tuple(_heads(t) for t in attn.c_attn(x).split(D, dim=2))


def _prefix_attention(kind: str, attn: nn.Module, x: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                      g: torch.Tensor | None) -> torch.Tensor:
    """``softmax(q [g P_K; K]ᵀ/√d) [g P_V; V]`` per query (``g``: (B, T or 1, 1) or None), then the output projection
    (GPT-2); BERT's self-attention returns the context itself. Causal over real tokens for GPT-2."""
    q, k, v = _qkv(kind, attn, x)
    b, t, n = x.shape[0], x.shape[1], pk.shape[1]
    gq = torch.ones(b, 1, 1, 1) if g is None else g[:, None]  # (B, 1, T or 1, 1): one gate per query
    scale = (D // H) ** -0.5
    real = q @ k.transpose(-1, -2) * scale
    if kind == "gpt2":
        real = real.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    prefix = gq * (q @ pk.transpose(-1, -2)) * scale
    weights = torch.softmax(torch.cat([prefix, real], -1), -1)
    context = gq * (weights[..., :n] @ pv) + weights[..., n:] @ v  # (B, H, T, hd)
    context = context.transpose(1, 2).reshape(b, t, D)
    return context if kind == "bert" else attn.c_proj(context)


def _slot_prefix(model: PeftModel, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    states = model.adapter_module("default", PrefixTuning).prefix_states()  # (slots·2, H, n, hd)
    return states[2 * slot], states[2 * slot + 1]


# ---- references ----------------------------------------------------------------------------------------------------
MEMBER_SETS = {
    "lora+prefix": lambda: [LoraConfig(r=4, init_lora_weights=False), PrefixTuningConfig(num_virtual_tokens=3)],
    "lora+pfeiffer": lambda: [LoraConfig(r=4, init_lora_weights=False), AdapterConfig(init_weights=False)],
    "mam": lambda: _small_mam().members,
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("members", list(MEMBER_SETS))
def test_composite_equals_its_members_as_separate_active_adapters(kind: str, members: str) -> None:
    composite = _peft(kind, CompositeConfig(members=MEMBER_SETS[members]()))
    _perturb(composite)
    separate = _peft(kind, MEMBER_SETS[members]()[0])
    separate.add_adapter("second", MEMBER_SETS[members]()[1])
    separate.set_adapter(["default", "second"])
    tensors = composite.get_adapter_state_dict("default")
    with torch.no_grad():
        for name in ("default", "second"):
            for key, target in separate.get_adapter_state_dict(name, live=True).items():
                target.copy_(tensors[key])  # every key of a member is the composite's key
    assert len(tensors) == sum(len(separate.get_adapter_state_dict(n)) for n in ("default", "second"))
    inputs = make_inputs(kind)
    want = model_logits(separate, inputs)
    assert (want - model_logits(make_model(kind), inputs)).abs().max() > 1e-3, "vacuous: members change nothing"
    torch.testing.assert_close(model_logits(composite, inputs), want)


@pytest.mark.parametrize("kind", KINDS)
def test_mam_layer_equals_hand_written_formula(kind: str) -> None:
    model = _peft(kind, _small_mam())
    _perturb(model)
    _, _, ffn_path, attn_path = PATHS[kind]
    with _capture(model, {"ffn": ffn_path, "attn": attn_path}) as seen, torch.no_grad():
        model(**make_inputs(kind))
        ffn = model.base_model.model.get_submodule(ffn_path)
        args, kwargs, out = seen["ffn"]
        if kind == "bert":  # BertOutput(h, x) = LN(dense(h) + x): the adapter reads x, the FFN's input
            h, x = args if len(args) == 2 else (args[0], kwargs["input_tensor"])
            base = ffn.base_layer
            want = base.LayerNorm(base.dense(h) + x + _bottleneck(ffn, x))
        else:  # mlp(x) + s·A(x)
            want = ffn.base_layer(args[0]) + _bottleneck(ffn, args[0])
        torch.testing.assert_close(out, want)
        args, kwargs, out = seen["attn"]
        x = args[0] if args else kwargs["hidden_states"]
        pk, pv = _slot_prefix(model, 0)
        torch.testing.assert_close(out[0], _prefix_attention(kind, model.base_model.model.get_submodule(attn_path),
                                                             x, pk, pv, None))


@pytest.mark.parametrize("mode", ["mean", "token"])
@pytest.mark.parametrize("kind", KINDS)
def test_unipelt_layer_equals_hand_written_formula(kind: str, mode: str) -> None:
    model = _peft(kind, _small_unipelt(gate_reduce=mode))
    _perturb(model)
    lora_path, adapter_path, _, attn_path = PATHS[kind]
    base = model.base_model.model
    adapter = base.get_submodule(adapter_path)
    paths = {"lora": lora_path, "adapter": adapter_path, "adapter_base": adapter_path + ".base_layer",
             "attn": attn_path}
    with _capture(model, paths) as seen, torch.no_grad():
        model(**make_inputs(kind))
        # LoRA: W0 x + G(x)·B A x, the gate in place of α/r
        lora = base.get_submodule(lora_path)
        (x,), _, out = seen["lora"]
        a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        want = lora.base_layer(x) + _gate(lora.lora_gate["default"], x, mode) * (x @ a.T @ b.T)
        torch.testing.assert_close(out, want)
        # Pfeiffer: the gate of the adapter's input u scales A(u)
        gate = adapter.adapter_gate["default"]
        if kind == "bert":  # post-LN: LN(z + G(u)·A(u)), u = LN(z)
            args, kwargs, out = seen["adapter"]
            z = args[0] if args else kwargs["hidden_states"]
            u = adapter.base_layer(z)
            want = adapter.base_layer(z + _gate(gate, u, mode) * _bottleneck(adapter, u))
        else:  # pre-LN block: y + G(y)·A(y)
            y = seen["adapter_base"][2][0] if isinstance(seen["adapter_base"][2], tuple) else seen["adapter_base"][2]
            want = y + _gate(gate, y, mode) * _bottleneck(adapter, y)
            out = seen["adapter"][2][0] if isinstance(seen["adapter"][2], tuple) else seen["adapter"][2]
        torch.testing.assert_close(out, want)
        # prefix: G(x) of the attention input scales P_K and P_V (per example, or per query token)
        args, kwargs, out = seen["attn"]
        x = args[0] if args else kwargs["hidden_states"]
        prefix_gate = model.adapter_module("default", PrefixTuning).prefix_gate[0]
        pk, pv = _slot_prefix(model, 0)
        want = _prefix_attention(kind, base.get_submodule(attn_path), x, pk, pv, _gate(prefix_gate, x, mode))
        torch.testing.assert_close(out[0], want)


@pytest.mark.parametrize("kind", KINDS)
def test_token_gates_equal_mean_gates_when_constant_over_tokens(kind: str) -> None:
    inputs = make_inputs(kind)
    logits = []
    for mode in ("mean", "token"):
        model = _peft(kind, _small_unipelt(gate_reduce=mode))
        _perturb(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "gate" in name and name.endswith("weight"):
                    param.zero_()  # σ(b): the same for every token, so the per-token form equals the mean
        logits.append(model_logits(model, inputs))
    torch.testing.assert_close(logits[1], logits[0])


# ---- gates and gradients -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mean", "token"])
@pytest.mark.parametrize("kind", KINDS)
def test_gates_in_unit_interval_and_gradients_reach_every_member(kind: str, mode: str) -> None:
    model = _peft(kind, _small_unipelt(gate_reduce=mode))
    _perturb(model)  # B = 0 and W_up = 0 would leave A's and W_down's gradients zero
    model.train()
    model(**make_inputs(kind)).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for part in ("lora_A", "lora_B", "lora_gate", "adapter_down", "adapter_up", "adapter_gate", "embedding",
                 "transform", "prefix_gate"):
        assert any(part in n for n in trainable), part
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    gates = model.gate_values()
    assert set(gates) == {"LORA", "PREFIX_TUNING", "BOTTLENECK"}
    assert {len(per_member) for per_member in gates.values()} >= {L}
    tokens = make_inputs(kind)["input_ids"].shape[1]
    for per_member in gates.values():
        for g in per_member.values():
            assert g.shape == (3, 1 if mode == "mean" else tokens)
            assert ((g > 0) & (g < 1)).all()


# ---- checkpoints, mixed batches, parameter counts ------------------------------------------------------------------
CHECKPOINTED = {
    "composite": lambda: CompositeConfig(members=[LoraConfig(r=4, init_lora_weights=False),
                                                  PrefixTuningConfig(num_virtual_tokens=3)]),
    "mam": _small_mam,
    "unipelt": _small_unipelt,
    "unipelt-token": lambda: _small_unipelt(gate_reduce="token"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CHECKPOINTED))
def test_save_load_round_trip_with_nested_config(kind: str, case: str, tmp_path) -> None:
    model = _peft(kind, CHECKPOINTED[case]())
    _perturb(model)
    inputs = make_inputs(kind)
    want = model_logits(model, inputs)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == CHECKPOINTED[case]().peft_type
    assert [m["peft_type"] for m in saved["members"]] == [m.peft_type for m in CHECKPOINTED[case]().members]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    if case.startswith("unipelt"):
        assert {"prefix_gate.0.weight", "prefix_gate.0.bias"} <= keys
        assert any(k.endswith(".lora_gate.weight") for k in keys)
        assert any(k.endswith(".adapter_gate.weight") for k in keys)
    loaded = PeftModel.from_pretrained(make_model(kind), tmp_path).eval()
    assert type(loaded.peft_config["default"]) is type(model.peft_config["default"])
    torch.testing.assert_close(model_logits(loaded, inputs), want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("composite", ["unipelt", "lora+pfeiffer"])
def test_composite_beside_a_plain_adapter_mixed_batch_and_switching(kind: str, composite: str) -> None:
    config = _small_unipelt() if composite == "unipelt" else CompositeConfig(members=MEMBER_SETS[composite]())
    model = _peft(kind, config)
    model.add_adapter("plain", LoraConfig(r=2, init_lora_weights=False))
    _perturb(model)
    inputs = make_inputs(kind)
    single = {}
    for name in ("default", "plain"):
        model.set_adapter(name)
        single[name] = model_logits(model, inputs)
    with model.disable_adapter():
        single[BASE_ADAPTER_NAME] = model_logits(model, inputs)
    assert (single["default"] - single["plain"]).abs().max() > 1e-3
    rows = ["plain", "default", BASE_ADAPTER_NAME]
    mixed = model_logits(model, inputs, adapter_names=rows)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], single[name][i])
    model.set_adapter("default")  # switching back gives the composite's outputs again
    torch.testing.assert_close(model_logits(model, inputs), single["default"])


def test_trainable_parameter_counts_equal_closed_forms() -> None:
    n, h, r = 3, 8, 4  # prefix length, prefix MLP width, LoRA rank / MAM adapter width
    prefix = n * D + (D * h + h) + (h * L * 2 * D + L * 2 * D)  # P′, Linear(d, h), Linear(h, L·2·d)
    mam = _peft("bert", _small_mam())
    assert mam.get_nb_trainable_parameters()[0] == prefix + L * (D * r + r + r * D + D)
    m = D // 4  # Pfeiffer width from reduction_factor
    gate = D + 1  # Linear(d, 1)
    lora = 2 * L * (r * D + D * r + gate)  # query and value of each layer
    adapter = L * (D * m + m + m * D + D + gate)
    unipelt = _peft("bert", _small_unipelt())
    assert unipelt.get_nb_trainable_parameters()[0] == lora + prefix + L * gate + adapter
    composite = _peft("bert", CHECKPOINTED["composite"]())
    assert composite.get_nb_trainable_parameters()[0] == 2 * L * (r * D + D * r) + n * L * 2 * D


# ---- merging, unload, deletion -------------------------------------------------------------------------------------
def test_merge_errors_name_the_members_that_cannot_merge() -> None:
    model = _peft("bert", _small_mam())
    with pytest.raises(NotMergeableError, match=r"MAM adapter.*\['PREFIX_TUNING', 'PARALLEL_BOTTLENECK'\].*none"):
        model.merge_adapter()
    model = _peft("bert", CompositeConfig(members=MEMBER_SETS["lora+pfeiffer"]()))
    with pytest.raises(NotMergeableError, match=r"\['BOTTLENECK'\].*mergeable: \['LORA'\]"):
        model.merge_and_unload()
    assert not any(layer.merged for _, layer in model._layers())
    with pytest.raises(NotMergeableError, match="PREFIX_TUNING"):
        _peft("gpt2", _small_unipelt()).merge_adapter()


@pytest.mark.parametrize("safe", [False, True])
def test_gated_lora_refuses_to_merge_and_changes_nothing(safe: bool) -> None:
    model = _peft("gpt2", LoraConfig(r=4, init_lora_weights=False, gate="mean"))
    before = {k: v.clone() for k, v in model.base_model.model.state_dict().items()}
    with pytest.raises(NotMergeableError, match="gated"):
        model.merge_adapter(safe_merge=safe)
    with pytest.raises(NotMergeableError, match="gated"):
        model.merge_and_unload()
    after = model.base_model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "gate" not in LoraConfig().to_dict() and "gate" not in PrefixTuningConfig().to_dict()  # HF layout kept


def test_mergeable_composite_merges_to_the_same_outputs() -> None:
    model = _peft("gpt2", CompositeConfig(members=[LoraConfig(r=4, init_lora_weights=False),
                                                   IA3Config(target_modules=["c_fc"], feedforward_modules=["c_fc"])]))
    _perturb(model)
    inputs = make_inputs("gpt2")
    want = model_logits(model, inputs)
    torch.testing.assert_close(model_logits(model.merge_and_unload(), inputs), want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["composite", "mam", "unipelt"])
def test_unload_restores_the_base_bit_identically(kind: str, case: str) -> None:
    reference = make_model(kind)
    model = _peft(kind, CHECKPOINTED[case]())
    _perturb(model)
    model(**make_inputs(kind))
    base = model.unload()
    assert [n for n, _ in base.named_modules()] == [n for n, _ in reference.named_modules()]
    want = reference.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in base.state_dict().items())
    assert all(not m._forward_pre_hooks for m in base.modules())  # the prefix gates' input hooks are gone
    torch.testing.assert_close(model_logits(base, make_inputs(kind)), model_logits(reference, make_inputs(kind)))


def test_delete_adapter_removes_gates_and_input_hooks() -> None:
    model = _peft("bert", LoraConfig(r=2))
    model.add_adapter("uni", _small_unipelt())
    attn = model.base_model.model.get_submodule(PATHS["bert"][3])
    assert attn._forward_pre_hooks
    model.delete_adapter("uni")
    assert not attn._forward_pre_hooks
    assert not any("gate" in n for n, _ in model.named_parameters())


# ---- config errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "match"), [
    (lambda: CompositeConfig(members=[]), "at least one member"),
    (lambda: CompositeConfig(members=[_small_mam()]), "do not nest"),
    (lambda: CompositeConfig(members=[LoraConfig(), LoraConfig(r=2)]), "each method once"),
    (lambda: CompositeConfig(members=["LORA"]), "must be method configs"),
    (lambda: MAMConfig(prefix_hidden_size=-1), "MAMConfig.prefix_hidden_size"),
    (lambda: MAMConfig(ffn_r=0), "MAMConfig.ffn_r"),
    (lambda: MAMConfig(scaling=float("nan")), "MAMConfig.scaling"),
    (lambda: PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=0), "encoder_hidden_size"),
    (lambda: UniPELTConfig(gate_reduce="max"), "gate_reduce"),
    (lambda: LoraConfig(gate="max"), "LoraConfig.gate"),
    (lambda: AdapterConfig(gate=True), "AdapterConfig.gate"),
    (lambda: ParallelAdapterConfig(gate="sum"), "ParallelAdapterConfig.gate"),
    (lambda: PrefixTuningConfig(gate="all"), "PrefixTuningConfig.gate"),
    (lambda: AdaLoraConfig(total_step=10, gate="mean"), "AdaLoraConfig.gate"),
])
def test_bad_configs_raise(make, match: str) -> None:
    with pytest.raises(PeftConfigError, match=match):
        make()


def test_gated_lora_on_an_embedding_is_refused() -> None:
    with pytest.raises(TargetModuleError, match="Gated LoRA"):
        _peft("gpt2", LoraConfig(target_modules=["wte"], gate="mean"))


def test_members_saving_the_same_checkpoint_key_are_refused_up_front() -> None:
    # Prompt tuning and prefix tuning both save HF's "prompt_embeddings": one checkpoint could not hold both.
    from peftkit import PromptTuningConfig

    model = make_model("gpt2")
    inputs = make_inputs("gpt2")
    before = model_logits(model, inputs)
    config = CompositeConfig(members=[PromptTuningConfig(num_virtual_tokens=2),
                                      PrefixTuningConfig(num_virtual_tokens=2)])
    with pytest.raises(PeftConfigError, match="both save the checkpoint key 'prompt_embeddings'.*two adapters"):
        get_peft_model(model, config)
    assert not model._forward_hooks and not model._forward_pre_hooks
    torch.testing.assert_close(model_logits(model, inputs), before, atol=0, rtol=0)
