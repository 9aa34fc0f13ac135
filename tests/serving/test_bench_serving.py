"""benchmarks/bench_serving.py at toy size, so that its code keeps working; no timing is checked."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "benchmarks" / "bench_serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_at_toy_size(bench, tmp_path) -> None:
    args = argparse.Namespace(repeats=1, warmup=0, max_foreign=1.0)
    results = bench.run(bench.TOY, args, with_hf=False)  # HF peft's import alone takes seconds
    checks = results["cost_vs_k"]["checks"]
    assert all(v < 1e-4 for k, v in checks.items() if "vs base" not in k)  # the libraries agree
    assert checks[next(k for k in checks if "vs base" in k)] > 1e-4  # and the adapters do something
    assert set(results["generation"]["checks"].values()) == {0}  # greedy: every variant generates the same text
    assert results["registered"]["stats_many"]["adapters"] == bench.TOY.registered
    assert results["loading"]["stats_files"]["loads_cold"] > 2  # the file path really read files
    cost = results["cost_vs_k"]
    assert set(cost["ratio_samples"]) == {f"{lib} K={k}" for lib in ("pool", "peftkit") for k in bench.TOY.ks}
    assert all(len(v) == args.repeats and min(v) > 0 for v in cost["ratio_samples"].values())  # paired with base
    # at toy size a ratio of extra times can be negative (the pool within noise of the base): finite is the check
    assert results["ratios"] and all(math.isfinite(row["value"]) for row in results["ratios"].values())
    table = bench.markdown(results, bench.TOY)
    assert "| ratio |" in table and "tokens/s" in table
    pytest.importorskip("matplotlib")
    bench.plot(results, bench.TOY, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").stat().st_size > 1000
