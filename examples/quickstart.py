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

import pathlib
import random
import tempfile
import time

import torch

# examples/_data.py: the model, the two tasks, encoding, evaluation and the training loop the examples share.
from _data import MODEL_DIR, SEED, accuracy, encode, load_base, load_tasks, logits_of, train
from transformers import AutoTokenizer
from transformers import logging as hf_logging

from peftkit import LoraConfig, PeftModel, get_peft_model

LR = 1e-3
POLARITY = "default"  # get_peft_model's name; save_pretrained writes it at the checkpoint root
SUBJECTIVITY = "subjectivity"

torch.set_num_threads(2)  # the demo's target is a 2-core machine
hf_logging.set_verbosity_error()  # silence "classifier newly initialized": that's intended
hf_logging.disable_progress_bar()  # keep tqdm output for the training loops only


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
    train(model, tok, pol_train, epochs=2, desc="polarity", lr=LR)
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
    train(model, tok, subj_train, epochs=1, desc="subjectivity", lr=LR)
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
