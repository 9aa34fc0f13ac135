"""Bottleneck adapters and AdapterFusion on one real pretrained BERT, fully offline.

all-MiniLM-L6-v2 and Rotten Tomatoes sentences (both shipped as pip packages; the data loading and
the training loop are examples/_data.py's):

1. Train a Pfeiffer adapter for polarity (fresh vs rotten) and one for subjectivity (plot vs review).
2. Freeze both and train an AdapterFusion over them for polarity; print each stage's accuracy and how much
   attention each layer gives each adapter.
3. Save the two adapters and the fusion separately, reload them onto a fresh base model, compare predictions.
4. AdapterDrop at inference: skip the adapters of the lowest layers and measure accuracy and time.

Run with `python examples/adapters_fusion.py` (about 4 minutes on 2 otherwise idle CPU cores).
"""

from __future__ import annotations

import os

# Must be set before transformers is imported, or it may try to reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pathlib
import random
import tempfile
import time

import torch

# examples/_data.py: the model, the two tasks, encoding, evaluation and the training loop the examples share.
from _data import MODEL_DIR, SEED, accuracy, load_base, load_tasks, logits_of, train
from transformers import AutoTokenizer
from transformers import logging as hf_logging

from peftkit import AdapterConfig, PeftModel, get_peft_model

LR = 2e-3  # adapters start at the identity (W_up = 0) and a few hundred steps need a brisk rate
FUSION_LR = 5e-4  # fusion's d×d Q/K/V are far larger than an adapter; AdapterHub trains them slower still
FUSION_TRAIN = 1000  # polarity sentences for stage 2: fusion is meant for a target task with little data

torch.set_num_threads(2)
hf_logging.set_verbosity_error()  # "classifier newly initialized" is intended
hf_logging.disable_progress_bar()


def main() -> None:
    start = time.perf_counter()
    random.seed(SEED)
    torch.manual_seed(SEED)
    tasks = load_tasks()
    (pol_train, pol_test), (subj_train, subj_test) = tasks["polarity"], tasks["subjectivity"]
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    acc: dict[str, float] = {}

    print("== 1. Two task adapters (Pfeiffer: one bottleneck after each FFN, reduction factor 16) ==")
    config = AdapterConfig(variant="pfeiffer", reduction_factor=16, task_type="SEQ_CLS")
    model = get_peft_model(load_base(), config, adapter_name="polarity")
    model.add_adapter("subjectivity", config)
    for name, data, test, epochs in (("polarity", pol_train, pol_test, 2), ("subjectivity", subj_train, subj_test, 1)):
        model.set_adapter(name)
        trainable, n_params = model.get_nb_trainable_parameters()
        print(f"{name}: {trainable:,d} trainable of {n_params:,d} ({100 * trainable / n_params:.2f}%, head included)")
        train(model, tok, data, epochs=epochs, desc=name, lr=LR)
        acc[name] = accuracy(logits_of(model, tok, test), test)
        print(f"{name} accuracy: {acc[name]:.3f} on {len(test)} held-out sentences")

    print(f"\n== 2. AdapterFusion over both, trained for polarity on {FUSION_TRAIN:,d} sentences (adapters frozen) ==")
    model.add_fusion(["polarity", "subjectivity"], "fusion", task_type="SEQ_CLS")
    # The fusion gets its own head copy; start it from the polarity adapter's trained head (same target task)
    # rather than the base's random one, so 32 steps go to learning the fusion, not a classifier from scratch.
    heads = model.get_base_model().classifier.modules_to_save
    heads["fusion"].load_state_dict(heads["polarity"].state_dict())
    model.set_adapter("fusion")
    trainable, _ = model.get_nb_trainable_parameters()
    print(f"fusion: {trainable:,d} trainable parameters (Q, K, V per layer and its own head copy)")
    fusion_train = random.Random(SEED).sample(pol_train, FUSION_TRAIN)
    train(model, tok, fusion_train, epochs=1, desc="fusion", lr=FUSION_LR)
    fusion_logits = logits_of(model, tok, pol_test)
    acc["fusion"] = accuracy(fusion_logits, pol_test)
    print(f"fusion polarity accuracy: {acc['fusion']:.3f} (polarity adapter alone: {acc['polarity']:.3f})")
    with model.record_fusion_attention("fusion") as attention:
        logits_of(model, tok, pol_test[:64] + pol_test[-64:], bs=128)
    for layer, probs in attention.items():
        share = probs.reshape(-1, probs.shape[-1]).mean(0).tolist()
        print(f"  {layer.split('encoder.')[-1]:<22} attention polarity {share[0]:.2f}, subjectivity {share[1]:.2f}")

    print("\n== 3. Save the adapters and the fusion separately, reload onto a fresh base ==")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        sizes = {p.name: sum(f.stat().st_size for f in p.iterdir()) / 1024 for p in pathlib.Path(tmp).iterdir()}
        print("on disk: " + ", ".join(f"{k} {v:.0f} KiB" for k, v in sorted(sizes.items())))
        reloaded = PeftModel.from_pretrained(load_base(), f"{tmp}/polarity", adapter_name="polarity")
        reloaded.load_adapter(f"{tmp}/subjectivity", "subjectivity")
        reloaded.load_adapter(f"{tmp}/fusion", "fusion")
        reloaded.set_adapter("fusion")
        diff = (logits_of(reloaded, tok, pol_test) - fusion_logits).abs().max().item()
    print(f"reloaded fusion: max abs logit difference {diff:.1e}")

    print("\n== 4. AdapterDrop at inference: skip the lowest layers' adapters ==")
    for skip in (0, 2, 4, 6):
        model.set_skip_layers(list(range(skip)))
        t0 = time.perf_counter()
        skipped_acc = accuracy(logits_of(model, tok, pol_test), pol_test)
        seconds = time.perf_counter() - t0
        print(f"skip {skip} of 6 layers: accuracy {skipped_acc:.3f}, {seconds:.1f}s for {len(pol_test):,d} sentences")
    model.set_skip_layers(None)

    print("\n== Summary ==")
    print(f"polarity adapter      {acc['polarity']:.3f}")
    print(f"subjectivity adapter  {acc['subjectivity']:.3f}")
    print(f"fusion (polarity)     {acc['fusion']:.3f}")
    print(f"reload identical      {diff == 0.0}")
    print(f"total time            {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
