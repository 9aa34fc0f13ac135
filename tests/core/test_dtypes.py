"""Every method on half-precision (bf16, fp16) base models on the CPU: forward, a training step, save/load, merge.

One row per method (taken from tests/cases.py, plus AdapterFusion), each on a tiny model cast to the dtype:

* forward: finite logits in the base dtype; adapter parameters stay fp32 (``autocast_adapter_dtype``);
* a training step: finite loss, every trainable gradient finite and some non-zero, finite parameters after SGD;
* save/load: a fresh base of the same dtype with the saved adapters gives bit-identical logits;
* merge (mergeable methods): every merged weight equals the fp32 merge rounded once to the dtype (the delta is
  accumulated in fp32, never rounded first), and merged logits equal unmerged ones within the dtype's tolerance.

fp16 runs everywhere bf16 does on the CPU (torch ≥ 2.1 has fp16 CPU kernels for every op these models use), so no
method refuses a half-precision base; the one dtype refusal is (IA)³ on bitsandbytes' quantised storage.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from cases import METHOD_CASES
from conftest import make_inputs, make_model, model_logits

from peftkit import (
    AdapterConfig,
    CompositeConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    TargetModuleError,
    get_peft_model,
)
from peftkit.core.registry import registered_peft_types

DTYPES = [torch.bfloat16, torch.float16]
_BY_ID = {case.id: case for case in METHOD_CASES}
# (method, contract row): one per method, chosen to cover the layer kinds each has (embeddings, Conv1D, span taps,
# added biases, trained layer norms, LSTM prompt encoders, grouped-query prefixes).
ROWS = {
    "lora": "lora-llama-embedding-and-mlp",
    "lora-conv1d": "lora-gpt2-default-targets",
    "adalora": "adalora-gpt2-default-targets",
    "ia3": "ia3-llama-default-targets",
    "bitfit": "bitfit-llama-add-missing-with-lm-head",
    "houlsby": "adapter-houlsby-bert-seqcls",
    "pfeiffer": "adapter-pfeiffer-llama-block",
    "parallel": "parallel-adapter-opt-ffn-span",
    "prompt-tuning": "prompt-tuning-gpt2",
    "p-tuning": "prompt-encoder-llama-lstm",
    "prefix-tuning": "prefix-tuning-llama-gqa",
    "p-tuning-v2": "p-tuning-v2-bert-seqcls",
    "mam": "mam-gpt2",
    "unipelt": "unipelt-bert-seqcls",
    "trainable-tokens": "trainable-tokens-gpt2-tied",
    "lora-experts": "lora-mixtral-experts",
}
# Merged vs unmerged logits, in units of the dtype's eps times the largest logit: (W + ΔW) x rounds W + ΔW to the
# dtype, W x + ΔW x does not, and the difference grows through the layers. Measured maxima 2.6 eps (bf16, AdaLoRA's
# standard-normal test init) and 4.0 eps (fp16, the same); LoRA, (IA)³ and BitFit stay under 0.8 eps.
MERGE_EPS = 8


def _composite() -> PeftConfig:  # a mergeable one: LoRA on the attention, (IA)³ on the FFN input
    return CompositeConfig(members=[LoraConfig(r=4, init_lora_weights=False), IA3Config(
        target_modules=["c_fc"], feedforward_modules=["c_fc"], init_ia3_weights=False)])


def _build(method: str, dtype: torch.dtype) -> tuple[PeftModel, str, bool]:
    """(model in eval mode, model kind, mergeable) for one method on a base cast to ``dtype``."""
    if method == "composite":
        return get_peft_model(make_model("gpt2").to(dtype), _composite()).eval(), "gpt2", True
    if method == "fusion":
        model = get_peft_model(make_model("bert").to(dtype), AdapterConfig(r=4, init_weights=False), adapter_name="a")
        model.add_adapter("b", AdapterConfig(r=4, init_weights=False))
        model.add_fusion(["a", "b"], "fusion")
        model.set_adapter("fusion")
        return model.eval(), "bert", False
    case = _BY_ID[ROWS[method]]
    return get_peft_model(make_model(case.model).to(dtype), case.config()).eval(), case.model, case.mergeable


def _reload(model: PeftModel, kind: str, dtype: torch.dtype, directory) -> PeftModel:
    names = list(model.peft_config)
    path: Callable[[str], object] = lambda name: directory if name == "default" else directory / name  # noqa: E731
    loaded = PeftModel.from_pretrained(make_model(kind).to(dtype), path(names[0]), adapter_name=names[0])
    for name in names[1:]:
        loaded.load_adapter(path(name), name)
    loaded.set_adapter(model.active_adapters)
    return loaded.eval()


def _base_parameters(model: PeftModel) -> dict[str, torch.Tensor]:
    adapter = {id(p) for name in model.peft_config for p in model.get_adapter_state_dict(name, live=True).values()}
    return {n: p for n, p in model.base_model.model.named_parameters() if id(p) not in adapter}


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", [*ROWS, "fusion", "composite"])
def test_method_on_half_precision_base(method: str, dtype: torch.dtype, tmp_path) -> None:
    model, kind, mergeable = _build(method, dtype)
    inputs = make_inputs(kind)
    base_dtypes = {p.dtype for p in _base_parameters(model).values()}
    assert base_dtypes == {dtype}, f"the base weights changed dtype: {base_dtypes}"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    adapter_only = {n: p for n, p in trainable.items() if p.dtype != dtype}
    assert adapter_only and all(p.dtype == torch.float32 for p in adapter_only.values())

    # One training step.
    model.train()
    loss = model(**inputs).loss
    assert torch.isfinite(loss), f"loss {loss}"
    loss.backward()
    grads = {n: p.grad for n, p in trainable.items()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().max() > 0 for g in grads.values())
    with torch.no_grad():
        for param in trainable.values():
            param -= 1e-2 * param.grad
    assert all(torch.isfinite(p).all() for p in trainable.values())
    model.zero_grad()
    model.eval()
    logits = model_logits(model, inputs)
    assert logits.dtype == dtype and torch.isfinite(logits).all()

    # Save / load: bit-identical logits from a fresh base of the same dtype.
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(model_logits(_reload(model, kind, dtype, tmp_path), inputs), logits, rtol=0, atol=0)

    if not mergeable:
        return
    reference = copy.deepcopy(model).float()  # the base upcast exactly; adapters are fp32 already
    model.merge_adapter(safe_merge=True)
    reference.merge_adapter()
    merged = _base_parameters(model)
    want = {n: p.to(dtype) for n, p in _base_parameters(reference).items()}
    assert merged.keys() == want.keys()
    rounded_twice = [n for n in merged if not torch.equal(merged[n], want[n])]
    assert not rounded_twice, f"merged weights not fp32-accumulated and rounded once: {rounded_twice[:4]}"
    tolerance = MERGE_EPS * torch.finfo(dtype).eps * logits.abs().max().item()
    torch.testing.assert_close(model_logits(model, inputs).float(), logits.float(), rtol=0, atol=tolerance)


def test_ia3_refuses_a_quantized_base_with_a_clear_error() -> None:
    # The one method that cannot run on a dtype: (IA)³ would scale bitsandbytes' packed uint8 storage.
    pytest.importorskip("bitsandbytes")
    import peftkit

    base = peftkit.quantize_model(make_model("llama"), quant_type="nf4")
    before = {n: type(m) for n, m in base.named_modules()}
    with pytest.raises(TargetModuleError, match=r"\(IA\)³ does not support quantized layers.*use LoRA"):
        get_peft_model(base, IA3Config())
    assert {n: type(m) for n, m in base.named_modules()} == before


def test_rows_cover_every_registered_method() -> None:
    covered = {_BY_ID[row].config().peft_type for row in ROWS.values()} | {"ADAPTER_FUSION", _composite().peft_type}
    assert covered == set(registered_peft_types())
