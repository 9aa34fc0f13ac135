"""``torch.compile`` of a peftkit model: outputs and gradients match eager, and the number of compilations is
counted by a backend that records every graph Dynamo hands it.

Measured and asserted here (LoRA on a tiny Llama, one graph per compile, no graph breaks):
- first call: 1 compilation; further calls: 0;
- ``hotswap_adapter`` (new weights, same shapes, into the active adapter): 0 recompilations;
- ``set_adapter`` to other loaded LoRA adapters (as many as before, same shapes and scale): 0 recompilations, the
  layers' forward reads no adapter name (``LoraLinear._refresh_slots``); a set of another size: 1, once per size.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model

from peftkit import LoraConfig, PeftModel, get_peft_model

LORA = {"r": 4, "init_lora_weights": False, "target_modules": ["q_proj", "v_proj", "down_proj"]}


class CountingBackend:
    """A Dynamo backend that counts the graphs it compiles and runs them with ``aot_eager`` (AOTAutograd traced,
    no code generation: fast, and it exercises the functionalized graph and its backward)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model() -> PeftModel:
    model = get_peft_model(make_model("llama"), LoraConfig(**LORA))
    model.add_adapter("other", LoraConfig(**LORA))
    return model.eval()


def _ids() -> torch.Tensor:
    return make_inputs("llama")["input_ids"]


def test_inductor_compiled_model_matches_eager() -> None:
    model, ids = _model(), _ids()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model)(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compiled_training_step_matches_eager_gradients() -> None:
    inputs = make_inputs("llama")
    grads = {}
    for mode in ("eager", "compiled"):
        model = _model().train()
        run = torch.compile(model, backend=CountingBackend()) if mode == "compiled" else model
        run(**inputs).loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["eager"].keys() == grads["compiled"].keys()
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["compiled"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_recompile_counts_for_hotswap_and_adapter_switching(tmp_path) -> None:
    model, ids = _model(), _ids()
    model.add_adapter("third", LoraConfig(**LORA))  # loaded before compiling: adding one changes the graph's inputs
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return compiled(input_ids=ids).logits

    first = run()
    assert backend.graphs == 1  # the whole model is one graph: no graph break in the adapter layers
    run()
    assert backend.graphs == 1

    # Hot-swap: other weights of the same shapes into the active adapter -> new outputs, no recompilation.
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    model.hotswap_adapter(tmp_path / "other", "default")
    swapped = run()
    assert backend.graphs == 1
    assert not torch.allclose(swapped, first)
    with torch.no_grad():
        torch.testing.assert_close(swapped, model(input_ids=ids).logits)

    # set_adapter among loaded adapters: the graph does not depend on which ones are active, only on how many.
    for active in ("other", "third", "default", "third"):
        model.set_adapter(active)
        with torch.no_grad():
            torch.testing.assert_close(run(), model(input_ids=ids).logits)
    assert backend.graphs == 1
    for active in (["default", "other"], ["other", "third"], ["third", "default"]):
        model.set_adapter(active)
        with torch.no_grad():
            torch.testing.assert_close(run(), model(input_ids=ids).logits)
    assert backend.graphs == 2  # one more graph for sets of two
