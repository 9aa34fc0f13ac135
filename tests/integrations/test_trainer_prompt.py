"""transformers ``Trainer`` trains peftkit models as they are (prompt tuning in detail, then the other families):
with the default ``remove_unused_columns=True``
the Trainer keeps the dataset columns that ``forward``'s signature names, so that signature must be the base
model's (plus ``adapter_names``), not ``(*args, **kwargs)``."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import SEQ, VOCAB, make_model
from transformers import Trainer, TrainingArguments

from peftkit import (
    AdapterConfig,
    ParallelAdapterConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PTuningV2Config,
    get_peft_model,
)
from peftkit.methods.prompt_tuning import PromptTuningConfig

TASKS = {"gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def _dataset(kind: str, rows: int = 8) -> list[dict]:
    """A tiny in-memory dataset; ``example_id`` and ``text`` are columns the model does not take."""
    gen = torch.Generator().manual_seed(0)
    data = []
    for row in range(rows):
        ids = torch.randint(3, VOCAB, (SEQ,), generator=gen)
        label = ids.clone() if kind == "gpt2" else torch.tensor(row % 2)
        data.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": label,
                     "example_id": row, "text": f"example {row}"})
    return data


def _args(tmp_path, **kw) -> TrainingArguments:
    defaults = {"output_dir": str(tmp_path), "use_cpu": True, "report_to": [], "save_strategy": "no",
                "per_device_train_batch_size": 4, "learning_rate": 0.1, "max_steps": 8, "logging_steps": 1,
                "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0}
    return TrainingArguments(**{**defaults, **kw})


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_trainer_trains_prompt_and_leaves_base_unchanged(kind: str, tmp_path) -> None:
    model = get_peft_model(make_model(kind, seed=0), PromptTuningConfig(num_virtual_tokens=4, task_type=TASKS[kind]))
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    head = "classifier" if kind == "bert" else None
    prompt_before = model.adapter_modules["default"].embedding.weight.detach().clone()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(kind))
    assert trainer.args.remove_unused_columns
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and result.global_step == 8
    assert min(losses[-3:]) < losses[0]
    prompt_after = model.adapter_modules["default"].embedding.weight.detach()
    assert not torch.equal(prompt_after, prompt_before)
    state = model.get_base_model().state_dict()
    changed = [k for k, v in base_before.items() if not torch.equal(state[k], v)]
    if head is None:
        assert changed == []
    else:  # the task head trains as a separate copy (modules_to_save); the original weights stay
        assert all(".modules_to_save." in k for k in changed), changed


def test_forward_signature_is_the_base_models_plus_adapter_names() -> None:
    model = get_peft_model(make_model("gpt2", seed=0), PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    ours = inspect.signature(model.forward).parameters
    base = inspect.signature(model.get_base_model().forward).parameters
    named = [n for n, p in base.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert list(ours)[: len(named)] == named
    assert {"input_ids", "attention_mask", "labels"} <= set(ours)
    assert ours["adapter_names"].default is None
    assert "example_id" not in ours and "text" not in ours


def test_trainer_drops_columns_the_model_does_not_take(tmp_path) -> None:
    model = get_peft_model(make_model("bert", seed=0), PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"))
    seen: list[set[str]] = []
    model.get_base_model().register_forward_pre_hook(lambda mod, args, kwargs: seen.append(set(kwargs)),
                                                     with_kwargs=True)
    Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_dataset("bert")).train()
    assert seen and {"input_ids", "attention_mask", "labels"} <= seen[0]
    assert not seen[0] & {"example_id", "text"}


FAMILIES = {
    "prefix-gpt2": ("gpt2", lambda: PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")),
    "p-tuning-gpt2": ("gpt2", lambda: PromptEncoderConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")),
    "p-tuning-v2-bert": ("bert", lambda: PTuningV2Config(num_virtual_tokens=4, task_type="SEQ_CLS")),
    "pfeiffer-bert": ("bert", lambda: AdapterConfig(variant="pfeiffer", r=8, task_type="SEQ_CLS")),
    "parallel-gpt2": ("gpt2", lambda: ParallelAdapterConfig(r=8, task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trainer_trains_other_method_families_with_default_arguments(family: str, tmp_path) -> None:
    kind, config = FAMILIES[family]
    model = get_peft_model(make_model(kind, seed=0), config())
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    Trainer(model=model, args=_args(tmp_path, max_steps=3, learning_rate=1e-2), train_dataset=_dataset(kind)).train()
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n], before) for n, before in trainable.items())
    assert all(torch.equal(params[n], before) for n, before in frozen.items())
