"""QLoRA: LoRA on bitsandbytes 4-bit (NF4, FP4) and 8-bit layers, on the CPU (bitsandbytes ≥ 0.45).

Reference for every numeric check is LoRA on the *dequantised* float weights (``dequantize_model``), built with
the same seed so A and B are identical. Tolerances (fp32, tiny random Llama and OPT):
* train mode: bitsandbytes dequantises and runs an fp32 matmul, so 4-bit agrees to ``TRAIN_TOL`` = 1e-5;
* eval without grad: bitsandbytes' CPU inference kernels are less precise (4-bit layers whose shapes allow it
  run a bf16 kernel on AVX512-BF16 CPUs; 8-bit quantises the activations, LLM.int8()), so ``EVAL_TOL`` =
  5e-3 (4-bit) / 2e-2 (8-bit); the tiny models' logits are below 1.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import make_inputs, make_model, model_logits
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import LoraConfig, PeftModel, get_peft_model

bnb = pytest.importorskip("bitsandbytes")
from peftkit.integrations.bitsandbytes import (  # noqa: E402
    LoraLinear4bit,
    LoraLinear8bitLt,
    dequantize_model,
    dequantize_weight,
    model_nbytes,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"),  # bitsandbytes' CPU int8 path, every call
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),  # read by HF peft
]

TRAIN_TOL = 1e-5
EVAL_TOL = {"nf4": 5e-3, "fp4": 5e-3, "int8": 2e-2}
LAYER = {"nf4": LoraLinear4bit, "fp4": LoraLinear4bit, "int8": LoraLinear8bitLt}
QUANT_TYPES = list(LAYER)
LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False}


def _quantized(kind: str = "llama", quant_type: str = "nf4") -> nn.Module:
    return peftkit.quantize_model(make_model(kind, seed=0), quant_type=quant_type)


def _pair(quant_type: str, kind: str = "llama") -> tuple[PeftModel, PeftModel]:
    """LoRA on the quantised model, and the same LoRA (same seed) on its exact float dequantisation."""
    quantized = _quantized(kind, quant_type)
    floating = dequantize_model(copy.deepcopy(quantized))
    torch.manual_seed(0)
    ours = get_peft_model(quantized, LoraConfig(**LORA))
    torch.manual_seed(0)
    return ours, get_peft_model(floating, LoraConfig(**LORA))


@torch.no_grad()
def _train_mode_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    torch.manual_seed(5)  # OPT has dropout: both models draw the same masks
    return model.train()(**inputs).logits


def _linear4bit(in_f: int, out_f: int, quant_type: str = "nf4", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return peftkit.quantize_model(nn.Sequential(nn.Linear(in_f, out_f)), quant_type=quant_type)[0]


# ---- quantising ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_model_converts_linears_and_keeps_the_head_in_float(quant_type) -> None:
    model = _quantized("llama", quant_type)
    kind = bnb.nn.Linear8bitLt if quant_type == "int8" else bnb.nn.Linear4bit
    body = [m for n, m in model.named_modules() if n.endswith("_proj")]
    assert body and all(isinstance(m, kind) for m in body)
    assert type(model.lm_head) is nn.Linear
    assert getattr(model, "is_loaded_in_8bit" if quant_type == "int8" else "is_loaded_in_4bit")
    if quant_type != "int8":
        assert {m.weight.quant_type for m in body} == {quant_type}


def test_nf4_double_quant_costs_about_half_a_byte_per_parameter() -> None:
    layer = _linear4bit(512, 512)
    per_param = model_nbytes(layer) / (512 * 512)
    # 4 bits + absmax in 8 bit per 64 + fp32 absmax-of-absmax per 256·64 + the two code tables: ≈ 4.127 bits.
    assert 0.515 < per_param < 0.53, per_param
    assert model_nbytes(_linear4bit(512, 512)) < model_nbytes(nn.Linear(512, 512, bias=False)) / 7


def test_peftkit_without_bitsandbytes_imports_runs_lora_and_explains_quantization() -> None:
    script = textwrap.dedent("""
        import sys

        class NoBitsandbytes:  # behaves as if bitsandbytes were not installed, and records every attempt
            attempts = 0

            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "bitsandbytes":
                    NoBitsandbytes.attempts += 1
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, NoBitsandbytes())
        import torch
        from torch import nn
        import peftkit
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        peft_model = peftkit.get_peft_model(model, peftkit.LoraConfig(r=2, target_modules=["0", "2"]))
        peft_model(torch.randn(3, 8)).sum().backward()
        peftkit.prepare_model_for_kbit_training(nn.Sequential(nn.Linear(4, 4)), use_gradient_checkpointing=False)
        print("ATTEMPTS:", NoBitsandbytes.attempts)
        try:
            peftkit.quantize_model(nn.Sequential(nn.Linear(8, 8)))
        except ImportError as exc:
            print("ERROR:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ATTEMPTS: 0" in out.stdout  # LoRA on a float model never even tries to import bitsandbytes
    assert "pip install bitsandbytes" in out.stdout and "pip install peftkit[bnb]" in out.stdout


# ---- forward and training ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_lora_on_quantized_matches_lora_on_dequantized_weights(quant_type, kind) -> None:
    ours, ref = _pair(quant_type, kind)
    layers = [m for m in ours.modules() if isinstance(m, LAYER[quant_type])]
    assert len(layers) == len([m for m in ref.modules() if isinstance(m, peftkit.methods.lora.LoraLinear)])
    inputs = make_inputs(kind)
    base = model_logits(_quantized(kind, quant_type), inputs)
    train_ours, train_ref = _train_mode_logits(ours, inputs), _train_mode_logits(ref, inputs)
    assert (train_ref - base).abs().max() > 1e-2, "the adapter leaves the logits unchanged: vacuous test"
    torch.testing.assert_close(train_ours, train_ref, atol=TRAIN_TOL, rtol=0)
    eval_ours, eval_ref = model_logits(ours.eval(), inputs), model_logits(ref.eval(), inputs)
    torch.testing.assert_close(eval_ours, eval_ref, atol=EVAL_TOL[quant_type], rtol=0)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_training_lowers_loss_and_touches_only_the_adapters(quant_type) -> None:
    model = peftkit.prepare_model_for_kbit_training(_quantized("llama", quant_type))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).train()
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    inputs, losses = make_inputs("llama"), []
    for _ in range(6):
        loss = peft_model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, param in peft_model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_half_compute_keeps_fp32_adapters_and_half_output() -> None:
    model = make_model("llama").to(torch.bfloat16)
    peftkit.quantize_model(model, compute_dtype=torch.bfloat16)
    peftkit.prepare_model_for_kbit_training(model)
    assert model.model.norm.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    assert model.is_activation_checkpointing and not any(p.requires_grad for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).train()
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    peft_model(**make_inputs("llama")).loss.backward()
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_eval_pass_on_cpu_kernel_does_not_cut_gradients_later() -> None:
    # 64×64 layers qualify for bitsandbytes' packed bf16 CPU kernel, which has no autograd (see the module).
    def build() -> PeftModel:
        torch.manual_seed(0)
        model = peftkit.quantize_model(nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)))
        torch.manual_seed(1)
        return get_peft_model(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))

    x = torch.randn(4, 64)

    def grad(model: PeftModel) -> torch.Tensor:
        model.train()
        model(x).pow(2).sum().backward()
        return model.base_model.model[0].lora_A["default"].weight.grad

    fresh, evaluated = build(), build()
    with torch.no_grad():
        evaluated.eval()(x)
    torch.testing.assert_close(grad(evaluated), grad(fresh), atol=1e-2, rtol=1e-2)


# ---- checkpoints ---------------------------------------------------------------------------------------------------
def test_save_load_identical_and_checkpoint_holds_no_quantized_base(tmp_path) -> None:
    ours, _ = _pair("nf4")
    ours.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    assert not any("base_layer" in k or "absmax" in k or "quant" in k for k in keys)
    assert sum(v.numel() for v in keys.values()) == sum(p.numel() for p in ours.parameters() if p.requires_grad)
    reloaded = PeftModel.from_pretrained(_quantized("llama", "nf4"), tmp_path)
    inputs = make_inputs("llama")
    assert torch.equal(model_logits(reloaded.eval(), inputs), model_logits(ours.eval(), inputs))


def test_hf_peft_and_peftkit_load_each_others_qlora_adapters(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.bnb import Linear4bit as HFLinear4bit

    inputs = make_inputs("llama")
    ours, _ = _pair("nf4")
    ours.save_pretrained(tmp_path / "pk")
    hf = peft.PeftModel.from_pretrained(_quantized("llama", "nf4"), tmp_path / "pk")
    assert isinstance(hf.base_model.model.model.layers[0].self_attn.q_proj, HFLinear4bit)
    torch.testing.assert_close(model_logits(hf.eval(), inputs), model_logits(ours.eval(), inputs), atol=1e-6, rtol=0)

    torch.manual_seed(3)
    hf = peft.get_peft_model(_quantized("llama", "nf4"), peft.LoraConfig(**LORA))
    hf.save_pretrained(tmp_path / "hf")
    assert (model_logits(hf.eval(), inputs) - model_logits(_quantized("llama", "nf4"), inputs)).abs().max() > 1e-2
    back = PeftModel.from_pretrained(_quantized("llama", "nf4"), tmp_path / "hf")
    torch.testing.assert_close(model_logits(back.eval(), inputs), model_logits(hf.eval(), inputs), atol=1e-6, rtol=0)


def test_transformers_bitsandbytes_config_gives_the_same_qlora(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_model("llama", seed=0).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.float32)
    torch.manual_seed(0)
    theirs = get_peft_model(loaded, LoraConfig(**LORA))
    assert isinstance(theirs.base_model.model.model.layers[1].mlp.down_proj, LoraLinear4bit)
    ours, _ = _pair("nf4")
    inputs = make_inputs("llama")
    torch.testing.assert_close(_train_mode_logits(theirs, inputs), _train_mode_logits(ours, inputs), atol=TRAIN_TOL,
                               rtol=0)


# ---- merging -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_merge_warns_requantizes_close_and_unmerge_restores_close(quant_type) -> None:
    torch.manual_seed(0)
    weight = torch.randn(64, 128) * 0.05
    linear = nn.Linear(128, 64, bias=False)
    linear.weight.data = weight.clone()
    model = peftkit.quantize_model(nn.Sequential(linear), quant_type=quant_type)
    quant_error = (dequantize_weight(model[0]) - weight).norm() / weight.norm()  # one rounding of this weight
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    layer = peft_model.base_model.model[0]
    before = dequantize_weight(layer.base_layer)
    exact = before + layer.delta_weight("default")
    with pytest.warns(UserWarning, match=f"{LAYER[quant_type].bits}-bit layer re-quantises"):
        peft_model.merge_adapter()
    assert layer.merged_adapters == ["default"]
    assert (dequantize_weight(layer.base_layer) - exact).norm() / exact.norm() <= 1.5 * quant_error
    x = torch.randn(5, 128)
    with torch.no_grad():
        merged_out = layer.train()(x)
        reference = x @ exact.T
    assert (merged_out - reference).norm() / reference.norm() <= 2 * quant_error
    with pytest.warns(UserWarning, match="Unmerging"):
        peft_model.unmerge_adapter()
    assert (dequantize_weight(layer.base_layer) - before).norm() / before.norm() <= 2.5 * quant_error


def test_merge_after_an_eval_pass_reads_the_cpu_packed_layout() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)  # shapes the packed CPU kernel accepts
    weight = linear.weight.detach().clone()
    model = peftkit.quantize_model(nn.Sequential(linear))
    quant_error = (dequantize_weight(model[0]) - weight).norm() / weight.norm()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)).eval()
    layer, x = peft_model.base_model.model[0], torch.randn(3, 128)
    before = dequantize_weight(layer.base_layer)
    with torch.no_grad():
        unmerged = peft_model(x)  # may re-lay the weight out for the bf16 kernel (AVX512-BF16 CPUs)
    # The packed layout keeps the block scales in bf16: the weight it computes with moves by that rounding only.
    torch.testing.assert_close(dequantize_weight(layer.base_layer), before, atol=0, rtol=2 ** -8)
    with pytest.warns(UserWarning, match="re-quantises"):
        peft_model.merge_adapter()
    with torch.no_grad():
        merged = peft_model(x)
    assert (merged - unmerged).norm() / unmerged.norm() < 2 * quant_error


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_merge_and_unload_dequantize_gives_exact_float_linears(quant_type) -> None:
    ours, ref = _pair(quant_type)
    wrapped = {n: m for n, m in ours.base_model.model.named_modules() if isinstance(m, LAYER[quant_type])}
    expected = {n: dequantize_weight(m.base_layer) + m.delta_weight("default") for n, m in wrapped.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no re-quantisation, so no rounding warning
        merged = ours.merge_and_unload(dequantize=True)
    for name, weight in expected.items():
        module = merged.get_submodule(name)
        assert type(module) is nn.Linear and torch.equal(module.weight, weight), name
    inputs = make_inputs("llama")
    ref_logits = model_logits(ref.merge_and_unload().eval(), inputs)
    torch.testing.assert_close(model_logits(merged.eval(), inputs), ref_logits, atol=TRAIN_TOL, rtol=0)


def test_other_bitsandbytes_layers_are_refused_with_the_supported_list() -> None:
    model = nn.Sequential(bnb.nn.StableEmbedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(peftkit.TargetModuleError, match="Linear4bit, Linear8bitLt"):
        get_peft_model(model, LoraConfig(target_modules=["0"]))

