"""Adapter arithmetic on a real model: merge two task adapters into one and measure both tasks.

all-MiniLM-L6-v2 with two LoRA adapters trained on Rotten Tomatoes sentences (shipped as pip packages, so no
network is needed): "polarity" (fresh vs rotten review) and "subjectivity" (plot synopsis vs review). Each task
keeps its own small classification head on mean-pooled features (task arithmetic merges the shared body, as in
Ilharco et al. 2022); the two LoRA adapters are then combined with ``add_weighted_adapter`` into one adapter, with
several combination types, and each merged adapter is scored on both tasks with that task's head.

Run with ``python examples/merge_task_adapters.py`` (about 4 minutes on 2 idle CPU cores). Pass ``--quick`` for a
smaller run (a smoke test, about 2 minutes).
"""

from __future__ import annotations

import os

# Must be set before transformers is imported, or it may try to reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import random
import sys
import time

import torch
from _data import MODEL_DIR, SEED, Example, accuracy, load_tasks, logits_of, train
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers import logging as hf_logging
from transformers.modeling_outputs import SequenceClassifierOutput

from peftkit import LoraConfig, get_peft_model

LR = 1e-3
# (name, add_weighted_adapter keywords): exact ones (cat, full-rank svd), a rank-8 svd, and the sparsifying ones.
COMBINATIONS = [
    ("cat", {"combination_type": "cat"}),
    ("svd", {"combination_type": "svd", "svd_rank": 8}),
    ("linear", {"combination_type": "linear"}),
    ("ties", {"combination_type": "ties", "density": 0.5}),
    ("dare_ties", {"combination_type": "dare_ties", "density": 0.5}),
    ("magnitude_prune", {"combination_type": "magnitude_prune", "density": 0.5}),
]

torch.set_num_threads(2)
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


class TaskModel(nn.Module):
    """The shared (adapted) encoder, mean pooling, and one task's head: ``logits = W_t · mean_i h_i + b_t``."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                **_: torch.Tensor) -> SequenceClassifierOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))  # (B, 2)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def main(quick: bool = False) -> None:
    start = time.perf_counter()
    random.seed(SEED)
    torch.manual_seed(SEED)
    tasks = load_tasks()
    n_train, n_test = (600, 200) if quick else (1500, 400)
    data: dict[str, tuple[list[Example], list[Example]]] = {}
    for task, (train_set, test_set) in tasks.items():
        # Balanced subsets: the lists are class 1 then class 0, so take from both ends.
        data[task] = (train_set[: n_train // 2] + train_set[-n_train // 2:],
                      test_set[: n_test // 2] + test_set[-n_test // 2:])
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    encoder = AutoModel.from_pretrained(MODEL_DIR)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.1)
    model = get_peft_model(encoder, config, adapter_name="polarity")
    model.add_adapter("subjectivity", config)
    heads = {task: nn.Linear(encoder.config.hidden_size, 2) for task in data}

    def score(adapter: str) -> dict[str, float]:
        """Accuracy on each task's test set with ``adapter`` and the task's head."""
        model.set_adapter(adapter)
        return {task: accuracy(logits_of(TaskModel(model, heads[task]), tok, test), test)
                for task, (_, test) in data.items()}

    print("== 1. Train one LoRA adapter and one head per task ==")
    for task, (train_set, _) in data.items():
        model.set_adapter(task)  # only this adapter's A and B require grad
        train(TaskModel(model, heads[task]), tok, train_set, epochs=1, desc=task, lr=LR)
    results = {f"{task} adapter only": score(task) for task in data}

    print("\n== 2. Merge the two adapters (weights 1, 1) ==")
    for name, kwargs in COMBINATIONS:
        torch.manual_seed(SEED)  # dare_* draws random masks
        model.add_weighted_adapter(["polarity", "subjectivity"], [1.0, 1.0], name, **kwargs)
        results[f"merged: {name}"] = score(name)
        model.delete_adapter(name)  # the two task adapters stay as they were

    print(f"\n{'adapter':<34}{'polarity':>10}{'subjectivity':>14}")
    for label, accs in results.items():
        print(f"{label:<34}{accs['polarity']:>10.3f}{accs['subjectivity']:>14.3f}")
    print(f"(test sets: {n_test} sentences per task, balanced: chance is 0.5; {time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
