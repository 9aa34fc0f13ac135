"""Benchmark peftkit's DoRA (``LoraConfig(use_dora=True)``) against Hugging Face ``peft``'s, in one process.

Targets (issue 14, item 1): training step <= 0.90x HF peft's time; unmerged inference extra time over the base
model <= 0.80x HF peft's extra time; merged inference = the base model.

Method: as ``bench_lora.py`` (whose helpers this imports): GPT-2-shaped (6 layers, 512 wide, ``c_attn``, batch 8 x
256) and SmolLM2-135M (``q_proj``/``v_proj``, batch 4 x 128) with r=8, alpha=16. Each library gets a deepcopy of
one base, seeded; peftkit, HF peft and the base model are timed *interleaved* (the order rotates every round),
median of ``--repeats`` rounds after ``--warmup``, with a 90% bootstrap CI over rounds. Training: fwd+bwd+AdamW on
``inputs_embeds``; inference: eval + ``inference_mode`` on ``input_ids``, with seeded non-zero A, B and magnitude
(HF's values copied into peftkit through the checkpoint keys, so both compute the same function; the JSON records
the logit difference). HF peft recomputes ``‖W + s·B A‖`` on every call (its ``ENABLE_DORA_CACHING`` is off by
default); peftkit caches it in eval mode and expands it in training (see ``peftkit/methods/dora.py``).

Run from the repo root::

    .venv/bin/python benchmarks/bench_dora.py                  # GPT-2-shaped + SmolLM2-135M, ~5 min
    .venv/bin/python benchmarks/bench_dora.py --quick          # tiny smoke config, < 60 s
"""
from __future__ import annotations

import argparse
import copy
import pathlib
import platform
import random
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench_lora as bl  # noqa: E402  (timing, load gate, workloads and model building are shared)

TARGETS = {"train": 0.90, "infer_unmerged_extra": 0.80, "infer_merged": 1.01}


def dora_config(lib: Any, wl: bl.Workload) -> Any:
    kw: dict[str, Any] = dict(r=bl.R, lora_alpha=bl.ALPHA, lora_dropout=0.0, target_modules=list(wl.targets),
                              use_dora=True, task_type="CAUSAL_LM")
    if wl.fan_in_fan_out:
        kw["fan_in_fan_out"] = True
    return lib.LoraConfig(**kw)


def make_pair(libs: dict[str, Any], base: nn.Module, wl: bl.Workload) -> dict[str, nn.Module]:
    """peftkit and HF DoRA models on copies of ``base``; HF's randomised adapter copied into peftkit's."""
    models = {}
    for key, lib in libs.items():
        torch.manual_seed(0)
        models[key] = lib.get_peft_model(copy.deepcopy(base), dora_config(lib, wl))
    import peft

    gen = torch.Generator().manual_seed(7)
    hf = models["hf"]
    with torch.no_grad():
        for name, param in sorted(hf.named_parameters()):
            if param.requires_grad:  # A, B ~ N(0, 0.05²); magnitude moved by up to ±10%
                noise = torch.randn(param.shape, generator=gen)
                param.copy_(param * (1 + 0.1 * noise.tanh()) if "magnitude" in name else noise * 0.05)
        if "peftkit" in models:
            live = models["peftkit"].get_adapter_state_dict("default", live=True)
            for key, value in peft.get_peft_model_state_dict(hf).items():
                live[key].copy_(value)
    return models


def ratio_ci(num: list[float], den: list[float], base: list[float] | None = None, n: int = 2000
             ) -> tuple[float, float, float]:
    """median ratio and its 90% bootstrap CI; with ``base``: of the extra times (num - base) / (den - base)."""
    rng, idx = random.Random(0), range(len(num))

    def est(pick: list[int]) -> float:
        a, b = (statistics.median(v[i] for i in pick) for v in (num, den))
        if base is None:
            return a / b
        c = statistics.median(base[i] for i in pick)
        return (a - c) / (b - c)

    boot = sorted(est(rng.choices(idx, k=len(num))) for _ in range(n))
    return est(list(idx)), boot[n // 20], boot[n - 1 - n // 20]


def bench_workload(wl: bl.Workload, libs: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    base = bl.build_base(wl, args.quick)
    ids, embeds = bl.make_inputs(base, wl)
    rows: list[dict[str, Any]] = []

    def run(fns: dict[str, Any]) -> dict[str, list[float]]:
        return bl.interleaved(fns, args.repeats, args.warmup, args.max_foreign)[0]

    # 1. training step (fwd + bwd + AdamW), vs HF peft's
    base.train()
    models = {k: m.train() for k, m in make_pair(libs, base, wl).items()}
    s = run({"base": bl.timed(bl.train_step_fn(base, embeds, ids))}
            | {k: bl.timed(bl.train_step_fn(m, embeds, ids)) for k, m in models.items()})
    rows.append(dict(workload=wl.name, row="train step", target_key="train", samples=s,
                     ratio=ratio_ci(s["peftkit"], s["hf"]), ratio_name="peftkit / hf"))
    base.eval()

    # 2. unmerged inference: extra time over the base, vs HF peft's extra time
    models = {k: m.eval() for k, m in make_pair(libs, base, wl).items()}
    outs = {k: bl.infer_fn(m, ids)() for k, m in models.items()}
    base_out = bl.infer_fn(base, ids)()
    fns = {"base": bl.timed(bl.infer_fn(base, ids))} | {k: bl.timed(bl.infer_fn(m, ids)) for k, m in models.items()}
    s = run(fns)
    rows.append(dict(workload=wl.name, row="infer unmerged, extra over base", target_key="infer_unmerged_extra",
                     samples=s, ratio=ratio_ci(s["peftkit"], s["hf"], s["base"]),
                     ratio_name="(peftkit - base) / (hf - base)",
                     checks={"maxdiff_peftkit_vs_hf": bl.maxdiff(outs["peftkit"], outs["hf"]),
                             "maxdiff_hf_vs_base": bl.maxdiff(outs["hf"], base_out)}))

    # 3. merged inference vs the base model
    for m in models.values():
        m.merge_adapter()
    merged = {k: bl.maxdiff(bl.infer_fn(m, ids)(), outs[k]) for k, m in models.items()}
    s = run(fns)
    rows.append(dict(workload=wl.name, row="infer merged / base", target_key="infer_merged", samples=s,
                     ratio=ratio_ci(s["peftkit"], s["base"]), ratio_name="peftkit / base",
                     checks={"maxdiff_merged_vs_unmerged": merged}))
    return rows


def summarize(rows: list[dict[str, Any]]) -> str:
    head = (f"{'workload':<13} {'row':<32} {'peftkit':>9} {'hf':>9} {'base':>9}  {'ratio':<30} {'value':>6} "
            f"{'CI90':>13}  target")
    lines = [head, "-" * len(head)]
    for r in rows:
        med = {k: statistics.median(v) for k, v in r["samples"].items()}
        r["median"] = med
        value, lo, hi = r["ratio"]
        target = TARGETS[r["target_key"]]
        r["met"] = value <= target
        cells = [f"{med.get(k, float('nan')) * 1e3:.1f}" for k in ("peftkit", "hf", "base")]
        lines.append(f"{r['workload']:<13} {r['row']:<32} {cells[0]:>9} {cells[1]:>9} {cells[2]:>9}  "
                     f"{r['ratio_name']:<30} {value:6.3f} {lo:6.3f}-{hi:6.3f}  <= {target:.2f} "
                     f"{'met' if r['met'] else 'NOT met'}")
    return "\n".join(lines)


def main() -> None:
    ap = bl.timing_parser("bench_dora.json", "samples per variant")
    args = bl.parse_timing_args(ap)
    t0, meter = time.perf_counter(), bl.LoadMeter()
    libs, err = bl.load_libs()
    if err:
        raise SystemExit(f"peftkit failed to import: {err}")
    rows: list[dict[str, Any]] = []
    for wl in bl.workloads(args).values():
        print(f"[{time.perf_counter() - t0:6.1f}s] {wl}", file=sys.stderr)
        rows += bench_workload(wl, libs, args)
    elapsed, foreign = time.perf_counter() - t0, meter.foreign()
    print(summarize(rows))
    for r in rows:
        if r.get("checks"):
            print(f"{r['workload']:<13} {r['row']:<32} checks: {r['checks']}")
    print(f"\ntimes: ms, median of {args.repeats} interleaved rounds; {args.threads} torch threads; total "
          f"{elapsed:.0f} s; other processes took {foreign:.1%} of the CPU")
    if args.quick:
        print("NOTE: --quick is a smoke test of the code paths; its ratios mean nothing.")
    import peft
    import transformers

    meta = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                threads=args.threads, cpu=platform.processor() or platform.machine(), repeats=args.repeats,
                warmup=args.warmup, quick=args.quick, argv=sys.argv, elapsed_s=elapsed,
                foreign_cpu_fraction=foreign, max_foreign=args.max_foreign)
    bl.write_results(args.out, meta, rows)


if __name__ == "__main__":
    main()
