"""Compiled hot-swap across ranks and alphas (``peftkit.hotswap``): after ``prepare_model_for_compiled_hotswap``,
swapping adapters of other ranks and scales into a ``torch.compile``d model compiles nothing again, and every swap
gives the logits of the same adapter loaded normally. Compilations are counted by a backend that records every
graph Dynamo hands it (as in ``test_compile.py``)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model, model_logits

import peftkit
from peftkit.core.errors import CheckpointError, PeftConfigError
from peftkit.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

TARGETS = ["q_proj", "v_proj", "embed_tokens"]
# name -> (r, lora_alpha, targets): other ranks, other alphas, and one adapter that targets fewer modules.
ADAPTERS = {
    "r4": (4, 8, TARGETS),
    "r8": (8, 32, TARGETS),
    "r2": (2, 3, TARGETS),
    "q_only": (6, 6, ["q_proj"]),
}


class CountingBackend:
    """Counts the graphs Dynamo compiles and runs them as captured (recompiles are Dynamo's, whatever the backend;
    ``test_compile.py`` checks inductor's numerics)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        model = peftkit.get_peft_model(make_model("llama"), peftkit.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
        with torch.no_grad():  # embeddings start with A = 0; move everything as training would
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.1)
        model.save_pretrained(root / name)
    return root


def _reference(saved, name: str) -> torch.Tensor:
    model = peftkit.PeftModel.from_pretrained(make_model("llama"), saved / name)
    return model_logits(model, make_inputs("llama"))


def test_swaps_across_ranks_and_alphas_never_recompile(saved) -> None:
    model = peftkit.PeftModel.from_pretrained(make_model("llama"), saved / "r4")
    ids = make_inputs("llama")["input_ids"]
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return compiled(input_ids=ids).logits

    torch.testing.assert_close(run(), _reference(saved, "r4"), atol=1e-5, rtol=0)  # padding changes nothing
    assert backend.graphs == 1
    previous = None
    for name in ("r8", "r2", "q_only", "r4", "r8"):
        hotswap_adapter(compiled, saved / name, adapter_name="default")
        out = run()
        torch.testing.assert_close(out, _reference(saved, name), atol=1e-5, rtol=0, msg=name)
        assert previous is None or not torch.allclose(out, previous)  # each swap really changes the model
        previous = out
    assert backend.graphs == 1  # zero recompilations over five swaps


def test_without_preparation_a_new_alpha_recompiles_and_a_larger_rank_is_refused(saved) -> None:
    # The control for the test above: the counter sees recompiles when they happen.
    model = peftkit.PeftModel.from_pretrained(make_model("llama"), saved / "r4")
    ids = make_inputs("llama")["input_ids"]
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(input_ids=ids)
    hotswap_adapter(compiled, saved / "r2", adapter_name="default")  # smaller rank: fits, but α/r is a constant
    with torch.no_grad():
        out = compiled(input_ids=ids).logits
    assert backend.graphs > 1
    torch.testing.assert_close(out, _reference(saved, "r2"), atol=1e-5, rtol=0)
    before = {k: v.clone() for k, v in model.get_adapter_state_dict("default").items()}
    with pytest.raises(CheckpointError, match="larger target_rank"):
        hotswap_adapter(compiled, saved / "r8", adapter_name="default")
    after = model.get_adapter_state_dict("default")
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_uncompiled_model_takes_a_larger_rank(saved) -> None:
    model = peftkit.PeftModel.from_pretrained(make_model("llama"), saved / "r2")
    hotswap_adapter(model, saved / "r8", adapter_name="default")
    torch.testing.assert_close(model_logits(model, make_inputs("llama")), _reference(saved, "r8"), atol=1e-5, rtol=0)


def test_padding_keeps_mixed_batches_and_merging_exact(saved) -> None:
    model = peftkit.PeftModel.from_pretrained(make_model("llama"), saved / "r2", adapter_name="small")
    model.load_adapter(saved / "r8", adapter_name="large")
    model.eval()
    inputs = make_inputs("llama")
    names = ["small", "large", "__base__"]
    want = model_logits(model, inputs, adapter_names=names)
    config = model.peft_config["small"]
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=config)
    assert config.r == 8  # HF peft's behaviour for a config passed in
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["small"].weight.shape == (8, 32) and isinstance(q.scaling["small"], torch.Tensor)
    torch.testing.assert_close(model_logits(model, inputs, adapter_names=names), want, atol=1e-6, rtol=0)
    model.set_adapter("small")
    unmerged = model_logits(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(model_logits(model, inputs), unmerged, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(model_logits(model, inputs), unmerged, atol=1e-6, rtol=0)


def test_refusals_change_nothing(saved, tmp_path) -> None:
    model = peftkit.PeftModel.from_pretrained(make_model("llama"), saved / "q_only")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftConfigError, match="smaller than the rank"):
        prepare_model_for_compiled_hotswap(model, target_rank=4)
    with pytest.raises(CheckpointError, match="targets other modules"):  # r8 also targets v_proj, down_proj, ...
        hotswap_adapter(model, saved / "r8", adapter_name="default")
    other = peftkit.get_peft_model(make_model("llama"), peftkit.LoraConfig(r=6, target_modules=["q_proj"],
                                                                           use_rslora=True))
    other.save_pretrained(tmp_path)
    with pytest.raises(PeftConfigError, match="use_rslora"):
        hotswap_adapter(model, tmp_path, adapter_name="default")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    compiled = torch.compile(model, backend=CountingBackend())
    with pytest.raises(PeftConfigError, match="before torch.compile"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8)
    with pytest.warns(UserWarning, match="before torch.compile"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8, check_compiled="warn")
