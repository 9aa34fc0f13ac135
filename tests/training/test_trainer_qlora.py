"""The canonical QLoRA recipe through transformers' ``Trainer``, on the CPU:

``from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4))`` →
``prepare_model_for_kbit_training`` → ``get_peft_model`` → ``PeftTrainer`` or the stock ``Trainer``: trains (loss goes
down on a memorisable batch), checkpoints hold the adapter only, resuming continues the same run, and
``PeftModel.from_pretrained`` on a freshly quantized base reproduces the trained model's logits exactly.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import SEQ, VOCAB, make_inputs, make_model, model_logits
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

import peftkit
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.integrations.trainer import PeftTrainer

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", seed=0).save_pretrained(path)
    return str(path)


def _quantized(path: str) -> torch.nn.Module:
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)


def _qlora(path: str, seed: int = 0) -> PeftModel:
    model = peftkit.prepare_model_for_kbit_training(_quantized(path))
    torch.manual_seed(seed)  # another seed, other starting adapters: resuming must overwrite them
    return get_peft_model(model, LoraConfig(**LORA))


def _rows() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, VOCAB, (SEQ,), generator=gen) for _ in range(4)]  # one batch, to memorise
    return [{"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids.clone()}
            for ids in sequences]


def _args(output_dir, **kw) -> TrainingArguments:
    defaults = {"output_dir": str(output_dir), "use_cpu": True, "report_to": [], "per_device_train_batch_size": 4,
                "learning_rate": 5e-3, "lr_scheduler_type": "constant", "max_steps": 4, "logging_steps": 1,
                "save_strategy": "steps", "save_steps": 2, "disable_tqdm": True, "seed": 0}
    return TrainingArguments(**{**defaults, **kw})


def _adapter(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.get_adapter_state_dict("default").items()}


@pytest.mark.parametrize("trainer_cls", [PeftTrainer, Trainer], ids=["PeftTrainer", "Trainer"])
def test_qlora_recipe_trains_checkpoints_resumes_and_reloads(llama_dir, tmp_path, trainer_cls) -> None:
    model = _qlora(llama_dir)
    assert model.get_base_model().is_quantized  # transformers' own bitsandbytes path, not peftkit.quantize_model
    trainer = trainer_cls(model=model, args=_args(tmp_path / "a"), train_dataset=_rows())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses
    for step in (2, 4):
        files = set(os.listdir(tmp_path / "a" / f"checkpoint-{step}"))
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}
    saved = load_file(tmp_path / "a" / "checkpoint-4" / "adapter_model.safetensors")
    assert saved.keys() == _adapter(model).keys()

    resumed = _qlora(llama_dir, seed=1)
    trainer = trainer_cls(model=resumed, args=_args(tmp_path / "b"), train_dataset=_rows())
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    resumed_losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert resumed_losses == pytest.approx(losses, rel=1e-4)  # steps 1-2 from the checkpoint, then the same run
    expected = _adapter(model)
    for key, value in _adapter(resumed).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5, msg=key)

    reloaded = PeftModel.from_pretrained(_quantized(llama_dir), tmp_path / "a" / "checkpoint-4")
    inputs = make_inputs("llama")
    assert torch.equal(model_logits(reloaded.eval(), inputs), model_logits(model.eval(), inputs))


def test_plain_trainer_leaves_non_peftkit_models_to_its_own_code(tmp_path) -> None:
    # The adapter path is taken for peftkit models only: a plain model is still saved whole, as transformers does.
    trainer = Trainer(model=make_model("llama"), args=_args(tmp_path, max_steps=1))
    trainer.save_model(str(tmp_path / "plain"))
    assert "model.safetensors" in os.listdir(tmp_path / "plain")
