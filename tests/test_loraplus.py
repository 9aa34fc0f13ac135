"""LoRA+ (``create_loraplus_optimizer``): HF peft's parameter groups and learning rates, the update each group gets,
and a short ``transformers.Trainer`` run with the optimizer passed in."""

from __future__ import annotations

import pytest
import torch
from conftest import SEQ, VOCAB, make_inputs, make_model
from transformers import Trainer, TrainingArguments

import peftkit
from peftkit.optimizers import create_loraplus_optimizer

peft = pytest.importorskip("peft")

# Linear and embedding LoRA, LoRA-layer biases trained, and a trained head copy (matrix + bias).
KW = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "wte"], "bias": "lora_only", "modules_to_save": ["score"]}


def _model(lib) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    base = GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                                                    n_positions=64, num_labels=2, pad_token_id=0))
    return lib.get_peft_model(base, lib.LoraConfig(**KW))


def _groups(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[tuple[float, float, set[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["lr"], g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]


def test_groups_and_learning_rates_equal_hf_peft() -> None:
    from peft.optimizers import create_loraplus_optimizer as hf_create

    kwargs = {"lr": 1e-3, "loraplus_lr_ratio": 16.0, "loraplus_weight_decay": 0.1, "loraplus_lr_embedding": 1e-5}
    ours_model, hf_model = _model(peftkit), _model(peft)
    ours = _groups(create_loraplus_optimizer(ours_model, torch.optim.AdamW, **kwargs), ours_model)
    theirs = _groups(hf_create(hf_model, torch.optim.AdamW, **kwargs), hf_model)
    assert ours == theirs
    (lr_a, _, a), (lr_e, _, emb), (lr_b, wd_b, b), (lr_nd, wd_nd, b_no_decay) = ours
    assert (lr_a, lr_e, lr_b, lr_nd, wd_b, wd_nd) == (1e-3, 1e-5, 1.6e-2, 1.6e-2, 0.1, 0.0)
    assert all(".lora_A." in n or ".modules_to_save." in n for n in a) and a
    assert emb and all(".lora_embedding_" in n for n in emb)
    assert b and all(".lora_B." in n for n in b)
    assert b_no_decay and all(n.endswith("bias") for n in b_no_decay)  # LoRA-layer biases and the head's bias


def test_one_sgd_step_moves_b_by_ratio_times_the_rate_of_a() -> None:
    model = peftkit.get_peft_model(make_model("llama"), peftkit.LoraConfig(r=4, target_modules=["q_proj"],
                                                                           init_lora_weights=False))
    model.train()
    optimizer = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.01, loraplus_lr_ratio=8.0)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    before = {k: p.detach().clone() for k, p in (("A", q.lora_A["default"].weight), ("B", q.lora_B["default"].weight))}
    model(**make_inputs("llama")).loss.backward()
    grads = {"A": q.lora_A["default"].weight.grad.clone(), "B": q.lora_B["default"].weight.grad.clone()}
    optimizer.step()
    torch.testing.assert_close(q.lora_A["default"].weight, before["A"] - 0.01 * grads["A"])
    torch.testing.assert_close(q.lora_B["default"].weight, before["B"] - 0.08 * grads["B"])


def test_trainer_trains_with_the_loraplus_optimizer(tmp_path) -> None:
    model = peftkit.get_peft_model(make_model("gpt2"), peftkit.LoraConfig(r=4, lora_alpha=8))
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=5e-3, loraplus_lr_ratio=4.0)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, VOCAB, (SEQ,), generator=gen) for _ in range(8)]
    data = [{"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids} for ids in rows]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                             per_device_train_batch_size=4, max_steps=6, logging_steps=1, disable_tqdm=True,
                             lr_scheduler_type="constant", seed=0)
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()
    assert trainer.optimizer is optimizer or getattr(trainer.optimizer, "optimizer", None) is optimizer
    assert [g["lr"] for g in optimizer.param_groups if g["params"]] == [5e-3, 2e-2]  # A, then B (x4)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert all(not torch.equal(p, b_before[n]) for n, p in model.named_parameters() if n in b_before)


def test_model_without_trainable_parameters_is_refused() -> None:
    model = peftkit.get_peft_model(make_model("llama"), peftkit.LoraConfig(r=4, target_modules=["q_proj"],
                                                                           inference_mode=True))
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
