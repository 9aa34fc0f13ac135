"""transformers ``Trainer`` with a peftkit model: trains, evaluates, and every file it writes for the model is the
adapter (``save_model``, checkpoints); resuming and ``load_best_model_at_end`` load the adapter back in place."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import SEQ, VOCAB, make_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.integrations.trainer import PeftTrainer


def _dataset(rows: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(rows):
        ids = torch.randint(3, VOCAB, (SEQ,), generator=gen)
        data.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids.clone()})
    return data


def _args(tmp_path, **kw) -> TrainingArguments:
    defaults = {"output_dir": str(tmp_path), "use_cpu": True, "report_to": [], "save_strategy": "no",
                "per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_steps": 4, "logging_steps": 1,
                "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0, "lr_scheduler_type": "constant"}
    return TrainingArguments(**{**defaults, **kw})


def _model(seed: int = 0, **kw) -> PeftModel:
    model = get_peft_model(make_model("gpt2", seed=0), LoraConfig(r=4, lora_alpha=8, **kw))
    torch.manual_seed(seed)  # a different seed gives different starting adapter weights (A is random)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.02)
    return model


def _adapter(model: PeftModel, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.get_adapter_state_dict(name).items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tol, msg=key)


def test_save_model_writes_the_adapter_not_the_base_model(tmp_path) -> None:
    model = _model()
    trainer = PeftTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    _assert_same(saved, _adapter(model), rtol=0, atol=0)
    reloaded = PeftModel.from_pretrained(make_model("gpt2", seed=0), tmp_path / "final")
    _assert_same(_adapter(reloaded), _adapter(model), rtol=0, atol=0)


def test_plain_trainer_saves_the_adapter_even_with_tied_embeddings(tmp_path) -> None:
    # Trainer special-cases HF peft's class only; for other models it would write the whole state dict (Llama) or,
    # after training, fail outright on GPT-2's tied embeddings (safetensors refuses shared memory). peftkit wraps the
    # three model-file methods of Trainer itself, so the stock Trainer writes adapter files too.
    model = _model()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
                      train_dataset=_dataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for directory in (tmp_path / "checkpoint-2", tmp_path / "final"):
        files = set(os.listdir(directory))
        assert {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}
    reloaded = PeftModel.from_pretrained(make_model("gpt2", seed=0), tmp_path / "final")
    _assert_same(_adapter(reloaded), _adapter(model), rtol=0, atol=0)
    llama = get_peft_model(make_model("llama", seed=0), LoraConfig(r=4))
    Trainer(model=llama, args=_args(tmp_path)).save_model(str(tmp_path / "llama"))
    assert "model.safetensors" not in os.listdir(tmp_path / "llama")


def test_trainer_support_is_installed_whichever_is_imported_first() -> None:
    script = textwrap.dedent("""
        import sys
        import peftkit
        from transformers import GPT2Config, GPT2LMHeadModel
        assert not [m for m in sys.modules if m == "transformers.trainer" or m.partition(".")[0] == "trl"]
        base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
        model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=2))
        assert "transformers.trainer" not in sys.modules  # building a PeftModel does not import the Trainer
        import transformers
        Trainer = transformers.Trainer  # first import of transformers.trainer, after the model exists
        from peftkit.integrations.trainer import enable_trainer_support
        enable_trainer_support()
        wrapped = Trainer.__dict__["_save"]
        assert wrapped.__peftkit_original__ is not None and not hasattr(wrapped.__peftkit_original__,
                                                                         "__peftkit_original__")
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


def test_checkpoints_hold_adapters_and_resuming_continues_identically(tmp_path) -> None:
    args = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3}
    straight = _model()
    PeftTrainer(model=straight, args=_args(tmp_path / "a", **args), train_dataset=_dataset()).train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert "model.safetensors" not in files

    resumed = _model(seed=1)  # different starting weights: the checkpoint must overwrite them
    params_before = [p for p in resumed.parameters() if p.requires_grad]
    trainer = PeftTrainer(model=resumed, args=_args(tmp_path / "b", **args), train_dataset=_dataset())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6
    assert [p for p in resumed.parameters() if p.requires_grad] == params_before  # loaded in place
    _assert_same(_adapter(resumed), _adapter(straight), rtol=1e-5, atol=1e-6)


def test_resuming_restores_every_adapter_of_a_multi_adapter_model(tmp_path) -> None:
    model = _model()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["c_proj"], init_lora_weights=False))
    other_before = _adapter(model, "other")
    PeftTrainer(model=model, args=_args(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2),
                train_dataset=_dataset()).train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "other" / "adapter_model.safetensors").is_file()
    _assert_same(_adapter(model, "other"), other_before, rtol=0, atol=0)  # inactive: frozen, not trained

    fresh = _model(seed=1)
    fresh.add_adapter("other", LoraConfig(r=2, target_modules=["c_proj"]))
    trainer = PeftTrainer(model=fresh, args=_args(tmp_path / "b", max_steps=2), train_dataset=_dataset())
    trainer._load_from_checkpoint(str(checkpoint))
    _assert_same(_adapter(fresh), _adapter(model), rtol=0, atol=0)
    _assert_same(_adapter(fresh, "other"), other_before, rtol=0, atol=0)
    assert fresh.active_adapters == ["default"]


@pytest.mark.parametrize("trainer_cls", [PeftTrainer, Trainer], ids=["PeftTrainer", "Trainer"])
@pytest.mark.parametrize("greater_is_better", [True])
def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path, greater_is_better: bool,
                                                                   trainer_cls: type[Trainer]) -> None:
    # greater_is_better=True on eval_loss makes the *worst* (first) checkpoint the best one: the reload must then
    # visibly move the weights away from the last step's.
    model = _model()
    args = _args(tmp_path, max_steps=4, learning_rate=5e-2, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                 save_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                 greater_is_better=greater_is_better, per_device_eval_batch_size=8)
    trainer = trainer_cls(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(8, seed=1))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-4")
    _assert_same(_adapter(model), load_file(os.path.join(best, "adapter_model.safetensors")), rtol=0, atol=0)
    last = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    assert any(not torch.equal(last[k], v) for k, v in _adapter(model).items())
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-5)


def test_trainer_activation_checkpointing_reentrant_trains_the_adapter(tmp_path) -> None:
    # Trainer calls model.activation_checkpointing_enable: it must reach PeftModel (input gradients), or reentrant
    # checkpointing would leave every adapter inside a checkpointed block without a gradient.
    model = _model()
    before = _adapter(model)
    args = _args(tmp_path, max_steps=2, activation_checkpointing=True,
                 activation_checkpointing_kwargs={"use_reentrant": True})
    PeftTrainer(model=model, args=args, train_dataset=_dataset()).train()
    assert model.get_base_model().is_activation_checkpointing
    after = _adapter(model)
    assert all(not torch.equal(after[k], before[k]) for k in after)
