"""LoRA initialisations from the base weight (PiSSA, OLoRA, LoftQ, CorDA) and from data (EVA), against hand-written
references of each formula and against Hugging Face peft 0.21 on the same models; the save-time conversion that
makes such an adapter apply to the original base, loaded in both libraries."""

from __future__ import annotations

import inspect
import json
import math
import textwrap

import pytest
import torch
from conftest import make_inputs, make_model, model_logits
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import CheckpointError, PeftConfigError, TargetModuleError

peft = pytest.importorskip("peft")

TOL = 1e-5
LLAMA_TARGETS = ["q_proj", "k_proj", "down_proj"]  # 32→32, 32→16, 64→32: square, wide and tall weights


def _config(lib, init_lora_weights, **kw):
    kw = {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS, **kw}
    return lib.LoraConfig(init_lora_weights=init_lora_weights, **kw)


def _layers(model) -> dict[str, torch.nn.Module]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}


def _weight(layer) -> torch.Tensor:
    """The base weight as (out, in), whatever the layout."""
    w = layer.get_base_layer().weight.detach()
    return w.T if type(layer.get_base_layer()).__name__ == "Conv1D" else w


def _perturb(model, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)


def _original_weights(kind: str) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in make_model(kind).named_modules() if hasattr(m, "weight")}


# ---- step 0: outputs unchanged, W_res + s·B A = W -------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
@pytest.mark.parametrize("kind,targets", [("llama", LLAMA_TARGETS), ("gpt2", ["c_attn", "c_fc"])])
def test_init_keeps_outputs_at_step_0(kind, targets, init):
    inputs, original = make_inputs(kind), _original_weights(kind)
    base_logits = model_logits(make_model(kind), inputs)
    model = peftkit.get_peft_model(make_model(kind), _config(peftkit, init, target_modules=targets))
    torch.testing.assert_close(model_logits(model, inputs), base_logits, rtol=0, atol=TOL)
    for name, layer in _layers(model).items():
        w0 = original[name].T if kind == "gpt2" else original[name]
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        assert (_weight(layer) - w0).abs().max() > 1e-2, "the base was not rewritten: vacuous"
        torch.testing.assert_close(_weight(layer) + delta, w0, rtol=0, atol=TOL)


def test_pissa_factors_are_the_top_singular_triplets():
    original = _original_weights("llama")
    model = peftkit.get_peft_model(make_model("llama"), _config(peftkit, "pissa", lora_alpha=2))
    for name, layer in _layers(model).items():
        u, s, vh = torch.linalg.svd(original[name], full_matrices=False)
        root = torch.sqrt(s[:4] / 0.5)  # s = alpha / r = 0.5: s·B A = U_r S_r V_rᵀ
        torch.testing.assert_close(layer.lora_A["default"].weight, root[:, None] * vh[:4], rtol=0, atol=TOL)
        torch.testing.assert_close(layer.lora_B["default"].weight, u[:, :4] * root, rtol=0, atol=TOL)
        # What stays frozen is the minor part: its top singular value is the (r+1)-th of W.
        torch.testing.assert_close(torch.linalg.svdvals(_weight(layer))[0], s[4], rtol=1e-5, atol=TOL)


def test_pissa_niter_is_torch_svd_lowrank_on_the_same_seed():
    original, base = _original_weights("llama")["model.layers.0.self_attn.q_proj"], make_model("llama")
    torch.manual_seed(3)
    config = _config(peftkit, "pissa_niter_3", target_modules=["layers.0.self_attn.q_proj"])
    model = peftkit.get_peft_model(base, config)
    torch.manual_seed(3)
    torch.nn.Linear(32, 4, bias=False), torch.nn.Linear(4, 32, bias=False)  # A and B are drawn first, as in HF
    u, s, v = torch.svd_lowrank(original, 4, niter=3)
    layer = _layers(model)["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(layer.lora_A["default"].weight, torch.sqrt(s / 2)[:, None] * v.T, rtol=0, atol=TOL)
    torch.testing.assert_close(layer.lora_B["default"].weight, u * torch.sqrt(s / 2), rtol=0, atol=TOL)


def test_olora_factors_are_the_qr_leading_block():
    original = _original_weights("llama")
    model = peftkit.get_peft_model(make_model("llama"), _config(peftkit, "olora"))
    for name, layer in _layers(model).items():
        q, r = torch.linalg.qr(original[name])
        torch.testing.assert_close(layer.lora_A["default"].weight, r[:4], rtol=0, atol=TOL)
        torch.testing.assert_close(layer.lora_B["default"].weight, q[:, :4], rtol=0, atol=TOL)
        torch.testing.assert_close(_weight(layer), original[name] - 2.0 * q[:, :4] @ r[:4], rtol=0, atol=TOL)


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
def test_init_matches_hf_peft(init):
    torch.manual_seed(5)
    ours = peftkit.get_peft_model(make_model("llama"), _config(peftkit, init))
    torch.manual_seed(5)
    theirs = peft.get_peft_model(make_model("llama"), _config(peft, init))
    hf_layers = _layers(theirs)
    for name, layer in _layers(ours).items():
        for attr in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, attr)["default"].weight,
                                       getattr(hf_layers[name], attr)["default"].weight, rtol=0, atol=TOL)
        torch.testing.assert_close(_weight(layer), _weight(hf_layers[name]), rtol=0, atol=TOL)


def test_only_the_factors_train_and_merge_is_exact():
    inputs = make_inputs("llama")
    model = peftkit.get_peft_model(make_model("llama"), _config(peftkit, "pissa"))
    model.train()
    model(**inputs).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_A." in n or ".lora_B." in n for n in grads)
    model.eval()
    _perturb(model)
    unmerged = model_logits(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(model_logits(model, inputs), unmerged, rtol=0, atol=TOL)
    model.unmerge_adapter()
    torch.testing.assert_close(model_logits(model, inputs), unmerged, rtol=0, atol=TOL)


# ---- refusals leave the model as it was -----------------------------------------------------------------------------
@pytest.mark.parametrize("targets,match", [(["q_proj", "embed_tokens"], "embed_tokens"), (["q_proj", "k_proj"], None)])
def test_refused_target_changes_nothing(targets, match):
    model, original = make_model("llama"), _original_weights("llama")
    rank = {"r": 4} if match else {"r": 4, "rank_pattern": {"k_proj": 20}}  # k_proj is 16×32: r=20 cannot be
    with pytest.raises(TargetModuleError, match=match or "r <= min"):
        peftkit.get_peft_model(model, _config(peftkit, "pissa", target_modules=targets, **rank))
    for name, module in model.named_modules():
        assert not hasattr(module, "lora_A")
        if hasattr(module, "weight"):
            assert torch.equal(module.weight, original[name]), name


def test_init_on_quantised_base_is_refused():
    pytest.importorskip("bitsandbytes")
    model = peftkit.quantize_model(make_model("llama"))
    with pytest.raises(TargetModuleError, match="quantis"):
        peftkit.get_peft_model(model, _config(peftkit, "pissa"))


@pytest.mark.parametrize("kw,match", [
    ({"init_lora_weights": "loftq"}, "loftq_config"),
    ({"init_lora_weights": "pissa_niter_x"}, "not supported"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 3}}, "loftq_bits"),
    ({"init_lora_weights": "eva", "eva_config": {"rho": 0.5}}, "rho"),
    ({"init_lora_weights": "corda", "corda_config": {"corda_method": "x"}}, "corda_method"),
    ({"init_lora_weights": "olora", "gate": "mean"}, "gate"),
    ({"init_lora_weights": "pissa", "total_step": 10}, "AdaLoraConfig layers would ignore it"),
])
def test_bad_init_config_is_refused(kw, match):
    with pytest.raises(PeftConfigError, match=match):
        (peftkit.AdaLoraConfig if "total_step" in kw else peftkit.LoraConfig)(**kw)


def test_init_config_round_trips_through_json(tmp_path):
    config = peftkit.LoraConfig(init_lora_weights="loftq", loftq_config=peftkit.LoftQConfig(loftq_iter=2))
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2} and saved["eva_config"] is None
    assert peftkit.PeftConfig.from_pretrained(tmp_path) == config
    eva = peftkit.LoraConfig(init_lora_weights="eva", eva_config={"rho": 1.5})
    assert eva.eva_config == peftkit.EvaConfig(rho=1.5) and eva.to_dict()["eva_config"]["rho"] == 1.5
    eva.save_pretrained(tmp_path / "eva")
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "eva")).eva_config == peft.EvaConfig(rho=1.5)
    assert peftkit.PeftConfig.from_pretrained(tmp_path / "eva") == eva


# ---- LoftQ ----------------------------------------------------------------------------------------------------------
def _hf_on_cpu(function):
    """HF peft's LoftQ function with its compute device ("cuda"/"xpu", hard-coded) replaced by the CPU."""
    from peft.utils import loftq_utils

    namespace = dict(vars(loftq_utils))
    exec(textwrap.dedent(inspect.getsource(function)).replace('"cuda"', '"cpu"'), namespace)  # noqa: S102
    return namespace[function.__name__]


def _error(w: torch.Tensor, approx: torch.Tensor) -> float:
    return (w - approx).norm().item()


@pytest.mark.parametrize("bits,iters", [(4, 1), (4, 3), (8, 1)])
def test_loftq_reduces_quantisation_error_and_matches_hf(bits, iters):
    pytest.importorskip("bitsandbytes")
    from peft.utils import loftq_utils

    from peftkit.methods.lora_loftq import _quantise_roundtrip

    original = _original_weights("llama")
    loftq = peftkit.LoftQConfig(loftq_bits=bits, loftq_iter=iters)
    # lora_alpha == r: HF peft sets A = R, B = L whatever the scale, so only s = 1 compares factor by factor.
    model = peftkit.get_peft_model(make_model("llama"), _config(peftkit, "loftq", lora_alpha=4, loftq_config=loftq))
    hf_loftq = _hf_on_cpu(loftq_utils.loftq_init)
    for name, layer in _layers(model).items():
        w, q = original[name], _weight(layer)
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        plain = _quantise_roundtrip(w, bits)  # QLoRA's start: Q(W), B = 0
        assert _error(w, q + delta) < 0.9 * _error(w, plain), name
        hf_q, hf_a, hf_b = hf_loftq(w, num_bits=bits, reduced_rank=4, num_iter=iters)
        torch.testing.assert_close(q, hf_q, rtol=0, atol=TOL)
        torch.testing.assert_close(layer.lora_A["default"].weight, hf_a, rtol=0, atol=TOL)
        torch.testing.assert_close(layer.lora_B["default"].weight, hf_b, rtol=0, atol=TOL)


def test_loftq_accounts_for_the_scale():
    pytest.importorskip("bitsandbytes")
    original = _original_weights("llama")
    model = peftkit.get_peft_model(make_model("llama"), _config(
        peftkit, "loftq", lora_alpha=16, loftq_config=peftkit.LoftQConfig()))
    for name, layer in _layers(model).items():
        residual = original[name] - _weight(layer)  # W − Q
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        best = u[:, :4] * s[:4] @ vh[:4]  # the rank-4 optimum of ‖W − Q − s·B A‖
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        torch.testing.assert_close(delta, best, rtol=0, atol=TOL)


def test_replace_lora_weights_loftq_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft.utils import loftq_utils

    from peftkit.integrations.bitsandbytes import dequantize_weight

    make_model("llama").save_pretrained(tmp_path / "float")  # model.safetensors with the unquantised weights
    original, inputs = _original_weights("llama"), make_inputs("llama")
    float_logits = model_logits(make_model("llama"), inputs)
    config = _config(peftkit, True, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    qlora = peftkit.get_peft_model(peftkit.quantize_model(make_model("llama"), double_quant=False), config)
    model = peftkit.get_peft_model(peftkit.quantize_model(make_model("llama"), double_quant=False), config)
    # Both before any forward: an eval forward on the CPU re-lays 4-bit weights out with a bf16 absmax (see
    # peftkit/integrations/bitsandbytes.py), which HF's plain dequantize_4bit call does not read.
    peftkit.replace_lora_weights_loftq(model, model_path=tmp_path / "float")
    hf_new = _hf_on_cpu(loftq_utils._loftq_init_new)
    for name, layer in _layers(model).items():
        q = dequantize_weight(layer.get_base_layer())
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert _error(original[name], q + delta) < _error(original[name], q), name
        hf_a, hf_b = hf_new(layer.get_base_layer().weight, original[name], num_bits=4, reduced_rank=4)
        torch.testing.assert_close(layer.lora_A["default"].weight, hf_a, rtol=0, atol=TOL)
        torch.testing.assert_close(layer.lora_B["default"].weight, hf_b, rtol=0, atol=TOL)
    assert _error(float_logits, model_logits(model, inputs)) < _error(float_logits, model_logits(qlora, inputs))


def test_replace_lora_weights_loftq_callback_rolls_back(tmp_path):
    pytest.importorskip("bitsandbytes")
    make_model("llama").save_pretrained(tmp_path)
    model = peftkit.get_peft_model(peftkit.quantize_model(make_model("llama")),
                                   _config(peftkit, True, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in model.get_adapter_state_dict("default").items()}
    seen = []
    peftkit.replace_lora_weights_loftq(model, tmp_path / "model.safetensors",
                                       callback=lambda m, name: seen.append(name) or name.endswith("v_proj"))
    after = model.get_adapter_state_dict("default")
    assert len(seen) == 4
    for key, value in after.items():
        assert torch.equal(value, before[key]) == (".q_proj." in key), key
    with pytest.raises(ValueError, match="model_path"):
        peftkit.replace_lora_weights_loftq(model, tmp_path / "missing")


# ---- EVA ---------------------------------------------------------------------------------------------------------
def _eva_batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    batches = []
    for seed in range(n):
        batch = make_inputs("llama", batch=4, seed=seed)
        batch["attention_mask"][0, 5:] = 0  # padding and prompt tokens must not count
        batch["labels"][1, :3] = -100
        batches.append(batch)
    return batches


def _collected_inputs(names, batches) -> dict[str, torch.Tensor]:
    """Each named layer's inputs at the attended, unmasked positions: the rows EVA must decompose."""
    model, rows = make_model("llama"), {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: rows[n].append(args[0].detach())) for n in names]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
            mask = batch["attention_mask"].bool() & (batch["labels"] != -100)
            for n in names:
                rows[n][-1] = rows[n][-1][mask]
    for handle in handles:
        handle.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def test_eva_a_rows_are_the_principal_components_of_the_inputs():
    batches, inputs = _eva_batches(), make_inputs("llama")
    base_logits = model_logits(make_model("llama"), inputs)
    reference = _collected_inputs(["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"], batches)
    config = _config(peftkit, "eva", eva_config=peftkit.EvaConfig(rho=1.0))  # rho = 1: every layer keeps r
    model = peftkit.get_peft_model(make_model("llama"), config)
    peftkit.initialize_lora_eva_weights(model, batches)
    torch.testing.assert_close(model_logits(model, inputs), base_logits, rtol=0, atol=TOL)  # B = 0
    layers = _layers(model)
    for name, x in reference.items():
        _, _, vh = torch.linalg.svd(x.double() - x.double().mean(0), full_matrices=False)
        a = layers[name].lora_A["default"].weight.double()
        cosines = (a * vh[:4]).sum(1).abs()  # unit rows, up to the sign of each component
        torch.testing.assert_close(cosines, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-4)
    assert model.peft_config["default"].rank_pattern == {}


def test_eva_redistributes_ranks_and_the_checkpoint_loads_in_hf(tmp_path):
    batches, inputs = _eva_batches(), make_inputs("llama")
    model = peftkit.get_peft_model(make_model("llama"), _config(peftkit, "eva"))  # rho = 2 by default
    peftkit.initialize_lora_eva_weights(model, batches)
    config = model.peft_config["default"]
    ranks = {n: layer.r["default"] for n, layer in _layers(model).items()}
    assert sum(ranks.values()) == 4 * 6 and len(set(ranks.values())) > 1  # the budget, unevenly spread
    assert max(ranks.values()) <= 8
    for name, rank in ranks.items():
        layer = _layers(model)[name]
        assert layer.lora_A["default"].weight.shape[0] == rank
        assert layer.scaling["default"] == pytest.approx(2.0)  # alpha scaled with the rank: alpha / r unchanged
        assert config.rank_and_alpha(name) == (rank, 2.0 * rank)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)
    _perturb(model)
    want = model_logits(model, inputs)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), str(tmp_path))
    torch.testing.assert_close(model_logits(theirs, inputs), want, rtol=0, atol=TOL)
    ours = peftkit.PeftModel.from_pretrained(make_model("llama"), tmp_path)
    torch.testing.assert_close(model_logits(ours, inputs), want, rtol=0, atol=TOL)


def test_eva_captures_at_least_the_variance_hf_peft_does():
    from peft.tuners.lora.eva import get_eva_state_dict as hf_eva

    batches = _eva_batches(4)
    config = _config(peftkit, "eva", eva_config=peftkit.EvaConfig(rho=1.0))
    ours = peftkit.get_eva_state_dict(make_model("llama"), batches, config, show_progress_bar=False)
    theirs = hf_eva(make_model("llama"), batches, _config(peft, "eva", eva_config=peft.EvaConfig(rho=1.0)),
                    show_progress_bar=False)
    assert set(ours) == set(theirs)
    collected = _collected_inputs(list(ours), batches)
    for name, a in ours.items():
        cov = torch.cov(collected[name].double().T)

        def captured(rows: torch.Tensor) -> float:
            return torch.trace(rows.double() @ cov @ rows.double().T).item()

        # HF's incremental low-rank PCA approximates the exact PCA, which captures the most variance in r directions.
        assert captured(theirs[name]) <= captured(a) * (1 + 1e-6), name
        assert captured(theirs[name]) > 0.9 * captured(a), name
        torch.testing.assert_close(a @ a.T, torch.eye(4), rtol=0, atol=1e-5)  # orthonormal rows


def test_eva_needs_its_init():
    model = peftkit.get_peft_model(make_model("llama"), _config(peftkit, True))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        peftkit.initialize_lora_eva_weights(model, _eva_batches(1))
    with pytest.raises(ValueError, match="empty"):
        peftkit.get_eva_state_dict(peftkit.get_peft_model(make_model("llama"), _config(peftkit, "eva")), [])


# ---- CorDA --------------------------------------------------------------------------------------------------------
@pytest.fixture
def hf_corda(monkeypatch):
    """HF peft's preprocess_corda. Its module imports ``dataclass`` from the ``attrs`` package (the name only, used
    as a plain dataclass decorator); without attrs installed, the standard library's stands in."""
    import dataclasses
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("attr") is None:
        monkeypatch.setitem(sys.modules, "attr", types.SimpleNamespace(dataclass=dataclasses.dataclass))
    from peft.tuners.lora.corda import preprocess_corda

    return preprocess_corda


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_hf_peft(method, tmp_path, hf_corda):
    hf_preprocess = hf_corda

    rows = [make_inputs("llama", batch=1, seed=s)["input_ids"] for s in range(6)]  # HF's hook wants batches of 1
    inputs, base_logits = make_inputs("llama"), model_logits(make_model("llama"), make_inputs("llama"))

    def prepared(lib, preprocess, corda_config_class, **files):
        model = make_model("llama")
        config = _config(lib, "corda", corda_config=corda_config_class(corda_method=method, **files))
        preprocess(model, config, run_model=lambda: [model(input_ids=r) for r in rows])
        return lib.get_peft_model(model, config)

    ours = prepared(peftkit, peftkit.preprocess_corda, peftkit.CordaConfig,
                    cache_file=str(tmp_path / "cache.safetensors"))
    theirs = prepared(peft, hf_preprocess, peft.tuners.lora.config.CordaConfig)
    torch.testing.assert_close(model_logits(ours, inputs), base_logits, rtol=0, atol=TOL)
    hf_layers = _layers(theirs)
    for name, layer in _layers(ours).items():
        for attr in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, attr)["default"].weight,
                                       getattr(hf_layers[name], attr)["default"].weight, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_weight(layer), _weight(hf_layers[name]), rtol=1e-4, atol=1e-4)
    # The cache (safetensors, no pickle) gives the same init without data.
    model = make_model("llama")
    config = _config(peftkit, "corda", corda_config=peftkit.CordaConfig(
        corda_method=method, cache_file=str(tmp_path / "cache.safetensors")))
    peftkit.preprocess_corda(model, config)
    cached = peftkit.get_peft_model(model, config)
    for name, layer in _layers(cached).items():
        assert torch.equal(layer.lora_A["default"].weight, _layers(ours)[name].lora_A["default"].weight)


def test_corda_without_preprocessing_is_refused():
    model, original = make_model("llama"), _original_weights("llama")
    with pytest.raises(PeftConfigError, match="preprocess_corda"):
        peftkit.get_peft_model(model, _config(peftkit, "corda"))
    assert all(torch.equal(m.weight, original[n]) for n, m in model.named_modules() if hasattr(m, "weight"))


# ---- checkpoints: HF's pissa/olora files, and the conversion to a plain LoRA on the original base ---------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_hf_checkpoint_loads_onto_the_original_base(init, tmp_path):
    inputs = make_inputs("llama")
    theirs = peft.get_peft_model(make_model("llama"), _config(peft, init))
    _perturb(theirs)
    theirs.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    ours = peftkit.PeftModel.from_pretrained(make_model("llama"), tmp_path)  # re-runs the init, then loads A, B
    torch.testing.assert_close(model_logits(ours, inputs), model_logits(theirs, inputs), rtol=0, atol=TOL)
    ours.save_pretrained(tmp_path / "again")
    back = peft.PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "again"))
    torch.testing.assert_close(model_logits(back, inputs), model_logits(theirs, inputs), rtol=0, atol=TOL)


@pytest.mark.parametrize("kw", [
    {"init_lora_weights": "pissa"},
    {"init_lora_weights": "olora", "use_rslora": True},
    {"init_lora_weights": "pissa_niter_2", "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"k_proj": 4}},
])
def test_conversion_applies_to_the_original_base(kw, tmp_path):
    inputs = make_inputs("llama")
    model = peftkit.get_peft_model(make_model("llama"), _config(peftkit, **kw))
    model.save_pretrained(tmp_path / "init")  # step 0, before training
    _perturb(model)
    trained = model_logits(model, inputs)
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8
    assert saved["lora_alpha"] == pytest.approx(8 * (math.sqrt(2) if kw.get("use_rslora") else 2))
    assert saved["rank_pattern"] == {k: 2 * v for k, v in kw.get("rank_pattern", {}).items()}
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "lora" / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (8, 32)
    assert (model_logits(make_model("llama"), inputs) - trained).abs().max() > 1e-3  # not vacuous
    ours = peftkit.PeftModel.from_pretrained(make_model("llama"), tmp_path / "lora")
    torch.testing.assert_close(model_logits(ours, inputs), trained, rtol=0, atol=TOL)
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "lora"))
    torch.testing.assert_close(model_logits(theirs, inputs), trained, rtol=0, atol=TOL)
    # The trained model itself is untouched by the conversion: it still holds rank r over the residual.
    torch.testing.assert_close(model_logits(model, inputs), trained, rtol=0, atol=0)


def test_conversion_matches_hf_peft(tmp_path):
    inputs = make_inputs("llama")
    theirs = peft.get_peft_model(make_model("llama"), _config(peft, "pissa"))
    theirs.peft_config["default"].init_lora_weights = True  # HF's recipe before saving the initial adapter
    theirs.save_pretrained(str(tmp_path / "init"))
    _perturb(theirs)
    theirs.save_pretrained(str(tmp_path / "hf"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ours = peftkit.get_peft_model(make_model("llama"), _config(peftkit, "pissa"))
    ours.save_pretrained(tmp_path / "init_pk")
    _perturb(ours)
    ours.save_pretrained(tmp_path / "pk", path_initial_model_for_weight_conversion=tmp_path / "init_pk")
    hf_tensors, pk_tensors = load_file(tmp_path / "hf" / "adapter_model.safetensors"), load_file(
        tmp_path / "pk" / "adapter_model.safetensors")
    assert set(hf_tensors) == set(pk_tensors)
    for key, value in hf_tensors.items():
        torch.testing.assert_close(pk_tensors[key], value, rtol=0, atol=TOL)
    loaded = peftkit.PeftModel.from_pretrained(make_model("llama"), tmp_path / "hf")
    torch.testing.assert_close(model_logits(loaded, inputs), model_logits(theirs, inputs), rtol=0, atol=TOL)


def test_conversion_refusals_write_nothing(tmp_path):
    model = peftkit.get_peft_model(make_model("llama"), _config(peftkit, "pissa"))
    other = peftkit.get_peft_model(make_model("llama"), _config(peftkit, "pissa", r=2))
    other.save_pretrained(tmp_path / "r2")
    with pytest.raises(CheckpointError, match=r"\(2, 32\)"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "r2")
    with pytest.raises(CheckpointError, match="No adapter_model"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()
    ia3 = peftkit.get_peft_model(make_model("llama"), peftkit.IA3Config(target_modules=["q_proj"],
                                                                         feedforward_modules=[]))
    with pytest.raises(PeftConfigError, match="IA3"):
        ia3.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "r2")
    assert not (tmp_path / "out").exists()
