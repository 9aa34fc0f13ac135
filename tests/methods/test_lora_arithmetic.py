"""Adapter arithmetic (``add_weighted_adapter`` and :mod:`peftkit.merge_utils`) against Hugging Face peft 0.21 and
against hand-written formulas.

Deterministic combination types give HF peft's logits (<= 1e-5) from the same saved source adapters; the DARE
types draw random masks, so they are checked for repeatability under a seed and for their distribution (kept
fraction, unbiasedness). Errors leave the model exactly as it was.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LayerHolder, make_inputs, make_model, model_logits
from torch import nn

import peftkit
from peftkit import merge_utils
from peftkit.core.errors import AdapterNotFoundError, PeftConfigError

peft = pytest.importorskip("peft")

TOL = 1e-5
WEIGHTS = [0.7, -0.4]
DETERMINISTIC = ["svd", "cat", "linear", "ties", "magnitude_prune", "ties_svd", "magnitude_prune_svd"]
# Source adapters: different alphas, and b also targets o_proj (a layer a lacks); embeddings included.
KW_A = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"], "init_lora_weights": False}
KW_B = {**KW_A, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj", "embed_tokens"]}


def _density(combination_type: str) -> dict:
    return {} if combination_type in ("svd", "cat", "linear") else {"density": 0.5}


@pytest.fixture(scope="module")
def saved_sources(tmp_path_factory) -> object:
    """Two LoRA adapters written by HF peft (a, b) on a tiny Llama."""
    path = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    hf = peft.get_peft_model(make_model("llama"), peft.LoraConfig(**KW_A), adapter_name="a")
    hf.add_adapter("b", peft.LoraConfig(**KW_B))
    hf.save_pretrained(path)
    return path


def _hf(path) -> torch.nn.Module:
    model = peft.PeftModel.from_pretrained(make_model("llama"), path / "a", adapter_name="a")
    model.load_adapter(path / "b", adapter_name="b")
    return model


def _ours(path) -> peftkit.PeftModel:
    model = peftkit.PeftModel.from_pretrained(make_model("llama"), path / "a", adapter_name="a")
    model.load_adapter(path / "b", adapter_name="b")
    return model.eval()


@pytest.fixture(scope="module")
def shared(saved_sources) -> dict[str, torch.nn.Module]:
    """One model per library holding a and b; each test adds adapters under its own names."""
    return {"hf": _hf(saved_sources), "ours": _ours(saved_sources)}


def _lora(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return dict(model.named_modules())[name]


def _reference_delta(layer: torch.nn.Module, adapters: list[str], weights: list[float]) -> torch.Tensor:
    """Σ_t w_t s_t B_t A_t in the (out, in) layout, written out by hand."""
    total = 0
    for name, w in zip(adapters, weights):
        if name in layer.lora_A:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            total = total + w * layer.scaling[name] * (b.flatten(1) @ a.flatten(1))
    return total


# ---- equal to HF peft ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("combination_type", DETERMINISTIC)
def test_deterministic_types_give_hf_logits(shared, combination_type) -> None:
    hf, ours = shared["hf"], shared["ours"]
    kwargs, mix = _density(combination_type), f"mix_{combination_type}"
    hf.add_weighted_adapter(["a", "b"], WEIGHTS, mix, combination_type=combination_type, **kwargs)
    ours.add_weighted_adapter(["a", "b"], WEIGHTS, mix, combination_type=combination_type, **kwargs)
    hf.set_adapter(mix)
    ours.set_adapter(mix)
    inputs = make_inputs("llama")
    want, got = model_logits(hf, inputs), model_logits(ours, inputs)
    assert (want - model_logits(make_model("llama"), inputs)).abs().max() > 1e-3, "vacuous: mix changes nothing"
    assert (got - want).abs().max().item() <= TOL
    # and the merged deltas themselves, layer by layer (embedding and a layer only b targets included)
    for path in ("model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"):
        theirs = _lora(hf.base_model.model, path).get_delta_weight(mix)
        torch.testing.assert_close(_lora(ours.base_model.model, path).delta_weight(mix), theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("combination_type", ["svd", "cat", "linear", "ties"])
def test_gpt2_conv1d_and_conv2d_match_hf(combination_type) -> None:
    torch.manual_seed(3)
    kw = {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_fc"], "init_lora_weights": False}
    models = {}
    for lib in (peft, peftkit):
        model = lib.get_peft_model(make_model("gpt2"), lib.LoraConfig(**kw), adapter_name="a")
        model.add_adapter("b", lib.LoraConfig(**{**kw, "lora_alpha": 2}))
        models[lib.__name__] = model
    models["peftkit"].load_state_dict(models["peft"].state_dict())  # same source weights (same parameter names)
    for model in models.values():
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type=combination_type,
                                   **_density(combination_type))
        model.set_adapter("mix")
    inputs = make_inputs("gpt2")
    torch.testing.assert_close(model_logits(models["peftkit"], inputs), model_logits(models["peft"], inputs),
                               atol=TOL, rtol=0)

    convs = {}
    for lib in (peft, peftkit):
        torch.manual_seed(4)
        model = lib.get_peft_model(LayerHolder(nn.Conv2d(3, 6, 3, padding=1)).eval(),
                                   lib.LoraConfig(r=2, target_modules=["layer"], init_lora_weights=False),
                                   adapter_name="a")
        model.add_adapter("b", lib.LoraConfig(r=2, lora_alpha=5, target_modules=["layer"], init_lora_weights=False))
        convs[lib.__name__] = model
    convs["peftkit"].load_state_dict(convs["peft"].state_dict())
    for model in convs.values():
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type=combination_type,
                                   **_density(combination_type))
        model.set_adapter("mix")
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        with convs["peft"].disable_adapter():
            base = convs["peft"](x)
        assert (convs["peft"](x) - base).abs().max() > 1e-3
        torch.testing.assert_close(convs["peftkit"](x), convs["peft"](x), atol=TOL, rtol=0)


# ---- against the formulas -----------------------------------------------------------------------------------------
def test_cat_and_full_rank_svd_equal_the_weighted_sum_of_deltas(saved_sources) -> None:
    model = _ours(saved_sources)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "cat", combination_type="cat")
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "svd8", combination_type="svd", svd_rank=8)
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"):
        layer = _lora(model.base_model.model, path)
        want = _reference_delta(layer, ["a", "b"], WEIGHTS)
        torch.testing.assert_close(layer.delta_weight("cat"), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.delta_weight("svd8"), want, atol=1e-5, rtol=0)  # rank(want) <= 8
    q = _lora(model.base_model.model, "model.layers.0.self_attn.q_proj")
    assert (q.r["cat"], q.scaling["cat"]) == (8, 1.0)
    o = _lora(model.base_model.model, "model.layers.1.self_attn.o_proj")  # only b is there: rank 4, not 8
    assert o.lora_A["cat"].weight.shape[0] == 4 and o.scaling["cat"] == 1.0


def test_low_rank_svd_is_the_best_rank_k_approximation(saved_sources) -> None:
    model = _ours(saved_sources)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "svd2", combination_type="svd", svd_rank=2)
    layer = _lora(model.base_model.model, "model.layers.0.self_attn.v_proj")
    want = _reference_delta(layer, ["a", "b"], WEIGHTS)
    u, s, vh = torch.linalg.svd(want)
    best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]  # Eckart–Young
    torch.testing.assert_close(layer.delta_weight("svd2"), best, atol=1e-5, rtol=0)


def test_linear_combines_factors_with_signed_square_root_weights(saved_sources) -> None:
    model = _ours(saved_sources)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "lin", combination_type="linear")
    layer = _lora(model.base_model.model, "model.layers.0.self_attn.q_proj")
    c = [w * layer.scaling[n] for n, w in zip(["a", "b"], WEIGHTS)]
    a = sum(math.copysign(math.sqrt(abs(ci)), ci) * layer.lora_A[n].weight for ci, n in zip(c, ["a", "b"]))
    b = sum(math.sqrt(abs(ci)) * layer.lora_B[n].weight for ci, n in zip(c, ["a", "b"]))
    torch.testing.assert_close(layer.lora_A["lin"].weight, a)
    torch.testing.assert_close(layer.lora_B["lin"].weight, b)


def test_rslora_sources_combine_exactly() -> None:
    # HF peft 0.21 keeps use_rslora on the new adapter (alpha = r then scales by √r instead of 1); peftkit's new
    # adapter has scale 1, so the combination is the exact weighted sum.
    kw = {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj"], "init_lora_weights": False}
    model = peftkit.get_peft_model(make_model("llama"), peftkit.LoraConfig(**kw), adapter_name="a")
    model.add_adapter("b", peftkit.LoraConfig(**kw))
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "cat", combination_type="cat")
    layer = _lora(model.base_model.model, "model.layers.0.self_attn.q_proj")
    torch.testing.assert_close(layer.delta_weight("cat"), _reference_delta(layer, ["a", "b"], [1.0, 1.0]))


def test_merge_utils_on_hand_computed_tensors() -> None:
    t1 = torch.tensor([3.0, -1.0, 0.5, -4.0])
    t2 = torch.tensor([-2.0, 2.0, 0.25, 1.0])
    w = torch.tensor([1.0, 0.5])
    torch.testing.assert_close(merge_utils.task_arithmetic([t1, t2], w), torch.tensor([2.0, 0.0, 0.625, -3.5]))
    # density 0.5 keeps the two largest |x| of each: t1 -> [3, 0, 0, -4], t2 -> [-2, 2, 0, 0]
    torch.testing.assert_close(merge_utils.magnitude_prune([t1, t2], w, 0.5), torch.tensor([2.0, 1.0, 0.0, -4.0]))
    # elected signs ("total", on the trimmed tensors): [+, +, +(0), -]; agreeing weighted entries averaged
    torch.testing.assert_close(merge_utils.ties([t1, t2], w, 0.5), torch.tensor([3.0, 1.0, 0.0, -4.0]))
    # "frequency" votes: one + and one - on entries 0, 1, 3 -> 0 -> +; both + on entry 2
    stacked = torch.stack([t1, t2])
    assert merge_utils.calculate_majority_sign_mask(stacked, "frequency").tolist() == [
        [True, False, True, False], [False, True, True, True]]
    torch.testing.assert_close(merge_utils.disjoint_merge(stacked, stacked > 0), torch.tensor([3.0, 2.0, 0.375, 1.0]))
    with pytest.raises(PeftConfigError, match="total.*frequency"):
        merge_utils.calculate_majority_sign_mask(stacked, "mean")
    with pytest.warns(UserWarning, match="no pruning"):
        assert merge_utils.prune(t1, 1.0, "magnitude") is t1


# ---- random types: seeded, and right in distribution --------------------------------------------------------------
def test_dare_is_repeatable_under_a_seed_and_unbiased() -> None:
    t1, t2 = torch.randn(200, 50), torch.randn(200, 50)
    w = torch.tensor([0.6, 0.4])
    torch.manual_seed(11)
    first = merge_utils.dare_linear([t1, t2], w, 0.3)
    torch.manual_seed(11)
    torch.testing.assert_close(merge_utils.dare_linear([t1, t2], w, 0.3), first)
    # Each entry survives with probability 0.3 per task: P(both dropped) = 0.49.
    zero = (first == 0).float().mean().item()
    assert abs(zero - 0.49) < 0.02
    # Rescaling by 1/density keeps the expectation: the mean over draws approaches task arithmetic.
    mean = torch.stack([merge_utils.dare_linear([t1, t2], w, 0.3) for _ in range(400)]).mean(0)
    err = (mean - merge_utils.task_arithmetic([t1, t2], w)).abs().mean().item()
    assert err < 0.06, err


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_types_match_hf_in_distribution(shared, combination_type) -> None:
    stats = {}
    for lib, model in shared.items():
        zeros, norms = [], []
        for seed in range(4):
            torch.manual_seed(seed)
            name = f"{combination_type}_{seed}"
            model.add_weighted_adapter(["a", "b"], WEIGHTS, name, combination_type=combination_type, density=0.4)
            layer = _lora(model.base_model.model, "model.layers.0.self_attn.q_proj")
            delta = layer.get_delta_weight(name) if lib == "hf" else layer.delta_weight(name)
            zeros.append((layer.lora_A[name].weight == 0).float().mean().item())
            norms.append(delta.norm().item())
        stats[lib] = (sum(zeros) / len(zeros), sum(norms) / len(norms))
    (hf_zero, hf_norm), (zero, norm) = stats["hf"], stats["ours"]
    assert abs(zero - hf_zero) < 0.05
    assert abs(norm - hf_norm) / hf_norm < 0.25, (norm, hf_norm)
    if not combination_type.endswith("svd"):  # factor-wise: a merged entry is zero when every task dropped it
        assert abs(zero - 0.6 ** 2) < 0.1


def test_cat_on_a_4bit_base_is_the_exact_sum() -> None:
    pytest.importorskip("bitsandbytes")
    kw = {"r": 4, "target_modules": ["q_proj"], "init_lora_weights": False}
    model = peftkit.get_peft_model(peftkit.quantize_model(make_model("llama")), peftkit.LoraConfig(**kw),
                                   adapter_name="a")
    model.add_adapter("b", peftkit.LoraConfig(**kw, lora_alpha=16))
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "cat", combination_type="cat")
    layer = _lora(model.base_model.model, "model.layers.0.self_attn.q_proj")
    assert "4bit" in type(layer).__name__
    torch.testing.assert_close(layer.delta_weight("cat"), _reference_delta(layer, ["a", "b"], WEIGHTS))


# ---- lifecycle ----------------------------------------------------------------------------------------------------
def test_weighted_adapter_saves_loads_in_hf_and_deletes_cleanly(saved_sources, tmp_path) -> None:
    model = _ours(saved_sources)
    inputs = make_inputs("llama")
    before = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        before[name] = model_logits(model, inputs)
    keys_before = set(model.state_dict())
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "cat", combination_type="cat")
    model.set_adapter("cat")
    mixed = model_logits(model, inputs)
    model.save_pretrained(tmp_path, selected_adapters=["cat"])
    hf = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "cat", adapter_name="cat")
    torch.testing.assert_close(model_logits(hf, inputs), mixed, atol=TOL, rtol=0)
    # one row per adapter in a mixed batch, the merged one included
    names = ["a", "cat", "__base__"]
    rows = model_logits(model, inputs, adapter_names=names)
    torch.testing.assert_close(rows[1], mixed[1], atol=TOL, rtol=0)
    model.merge_adapter(["cat"])
    torch.testing.assert_close(model_logits(model, inputs), mixed, atol=1e-5, rtol=0)
    model.unmerge_adapter()

    model.delete_adapter("cat")
    assert set(model.peft_config) == {"a", "b"} and set(model.state_dict()) == keys_before
    for name, logits in before.items():
        model.set_adapter(name)
        torch.testing.assert_close(model_logits(model, inputs), logits)


def test_single_adapter_combines_linearly_and_existing_name_is_left_alone(saved_sources) -> None:
    model = _ours(saved_sources)
    model.add_weighted_adapter(["b"], [2.0], "twice", combination_type="svd")  # one adapter: linear, as HF
    layer = _lora(model.base_model.model, "model.layers.0.self_attn.q_proj")
    torch.testing.assert_close(layer.delta_weight("twice"), 2.0 * layer.delta_weight("b"))
    with pytest.warns(UserWarning, match="exists already"):
        model.add_weighted_adapter(["a"], [1.0], "twice")
    torch.testing.assert_close(layer.delta_weight("twice"), 2.0 * layer.delta_weight("b"))


# ---- clear errors that change nothing -----------------------------------------------------------------------------
def _state(model: peftkit.PeftModel) -> tuple:
    return set(model.peft_config), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", ["other-method", "factor-ranks", "layer-ranks", "density", "type", "unknown",
                                  "weights", "gated", "heads"])
def test_refused_combinations_raise_and_change_nothing(case) -> None:
    kw = {"target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    model = peftkit.get_peft_model(make_model("llama"), peftkit.LoraConfig(r=4, **kw), adapter_name="a")
    second = {
        "other-method": peftkit.IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
        "factor-ranks": peftkit.LoraConfig(r=2, **kw),
        "layer-ranks": peftkit.LoraConfig(r=4, rank_pattern={"v_proj": 2}, **kw),
        "gated": peftkit.LoraConfig(r=4, gate="mean", **kw),
        "heads": peftkit.LoraConfig(r=4, modules_to_save=["lm_head"], **kw),
    }.get(case, peftkit.LoraConfig(r=4, **kw))
    if case == "heads":
        model.add_adapter("extra", peftkit.LoraConfig(r=4, modules_to_save=["lm_head"], **kw))
    model.add_adapter("b", second)
    call = {
        "other-method": ({}, PeftConfigError, "LoRA adapters only.*IA3"),
        "factor-ranks": ({"combination_type": "ties", "density": 0.5}, PeftConfigError, "one rank.*'cat'"),
        "layer-ranks": ({"combination_type": "linear"}, PeftConfigError, r"v_proj.*different ranks"),
        "density": ({"combination_type": "dare_ties"}, PeftConfigError, "needs density"),
        "type": ({"combination_type": "mean"}, PeftConfigError, "not known"),
        "unknown": ({"adapters": ["a", "nope"]}, AdapterNotFoundError, "nope"),
        "weights": ({"weights": [1.0]}, PeftConfigError, "one weight per adapter"),
        "gated": ({"combination_type": "cat"}, PeftConfigError, "gate"),
        "heads": ({"adapters": ["b", "extra"]}, PeftConfigError, "lm_head"),
    }[case]
    kwargs, error, message = call
    args = {"adapters": ["a", "b"], "weights": [1.0, 1.0], "adapter_name": "mix", **kwargs}
    names, tensors = _state(model)
    with pytest.raises(error, match=message):
        model.add_weighted_adapter(**args)
    after_names, after = _state(model)
    assert after_names == names and after.keys() == tensors.keys()
    assert all(torch.equal(after[k], tensors[k]) for k in tensors)
