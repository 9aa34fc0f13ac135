"""accelerate: ``Accelerator.prepare`` on a peftkit model trains it (fp32 and bf16 autocast) and ``save_adapter``
on the prepared model writes the adapter, which reloads to the same outputs."""

from __future__ import annotations

import os

import pytest
import torch
from accelerate import Accelerator
from conftest import make_inputs, make_model, model_logits

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.integrations.training import save_adapter, unwrap_model


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    # accelerate keeps one process-wide state; a second Accelerator with another mixed_precision must start clean.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerator_prepare_trains_and_saves_the_adapter(tmp_path, mixed_precision: str) -> None:
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    model = get_peft_model(make_model("llama"), LoraConfig(r=4, modules_to_save=["lm_head"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows = [{k: v[0] for k, v in make_inputs("llama", batch=1, seed=s).items()} for s in range(8)]
    loader = torch.utils.data.DataLoader(rows, batch_size=4)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    assert unwrap_model(prepared) is model
    before = {k: v.clone() for k, v in model.get_adapter_state_dict("default").items()}
    prepared.train()
    for batch in loader:
        loss = prepared(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    after = model.get_adapter_state_dict("default")
    assert all(v.dtype == torch.float32 for v in after.values())
    assert sum(not torch.equal(after[k], before[k]) for k in after) > len(after) // 2

    save_adapter(prepared, tmp_path)
    assert set(os.listdir(tmp_path)) == {"adapter_config.json", "adapter_model.safetensors"}
    reloaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    for key, value in reloaded.get_adapter_state_dict("default").items():
        torch.testing.assert_close(value, after[key], rtol=0, atol=0)
    if mixed_precision == "no":  # prepare() wraps forward in autocast otherwise
        inputs = make_inputs("llama")
        torch.testing.assert_close(model_logits(reloaded, inputs), model_logits(model.eval(), inputs))
