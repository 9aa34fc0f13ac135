"""Shared by the multi-process tests: launch torchrun on 2 CPU processes, and the single-process reference run of
``examples/train_ddp.py``'s model that every engine's saved adapter must match."""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[2]
DDP_EXAMPLE = ROOT / "examples" / "train_ddp.py"
STEPS, GLOBAL_BATCH, LR = 3, 8, 1e-2


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_ddp_example", DDP_EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_torchrun(script: Path, *args: str, timeout: int = 240) -> str:
    """Run ``script`` on 2 CPU processes (gloo) and return its output; raise with the output's tail when it fails.

    torchrun and its workers get their own process group, so a hang is ended by killing the group: killing torchrun
    alone would leave the workers running.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"torchrun timed out after {timeout} s:\n{output[-4000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{output[-4000:]}")
    return output


@functools.lru_cache(maxsize=1)
def single_process_adapter() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial, trained) adapter of one process training on the whole global batch of every step."""
    example = load_example()
    initial = {k: v.clone() for k, v in example.build_model().get_adapter_state_dict("default").items()}
    model = example.build_model()
    example.train(model, example.global_batches(STEPS, GLOBAL_BATCH), LR)
    return initial, model.get_adapter_state_dict("default")


def assert_matches_single_process(saved: dict[str, torch.Tensor]) -> None:
    initial, reference = single_process_adapter()
    assert saved.keys() == reference.keys()
    # Measured: max |difference| 5e-6 on values up to 0.14 (gradients are summed across ranks in another order, and
    # AdamW divides by the small early second moments).
    for key, value in reference.items():
        assert saved[key].shape == value.shape, key
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=2e-5, msg=key)
    # Training moved most tensors, so this does not compare two copies of the initial state.
    assert sum(not torch.equal(reference[k], initial[k]) for k in reference) > len(reference) // 2
