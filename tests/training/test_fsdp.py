"""FSDP on the CPU (gloo, ``torchrun --nproc_per_node 2``): FSDP2 ``fully_shard`` and FSDP1 with
``use_orig_params=True`` train a model whose units mix frozen base weights and trainable adapters; ``save_pretrained``
refuses sharded tensors (no empty or partial checkpoint); ``save_adapter`` gathers full tensors that match a
single-process run. The worker is ``fsdp_worker.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from torchrun_helpers import GLOBAL_BATCH, LR, STEPS, assert_matches_single_process, run_torchrun

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_and_fsdp1_train_mixed_units_and_save_full_adapters(tmp_path) -> None:
    run_torchrun(WORKER, "--out", str(tmp_path), "--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH),
                 "--lr", str(LR))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fsdp2_sharded"] == "DTensor"  # the live adapter really is sharded
    assert "is sharded (a DTensor" in report["fsdp2_refusal"]
    assert "FSDP1" in report["fsdp1_refusal"]
    assert not (tmp_path / "refused1").exists() and not (tmp_path / "refused2").exists()
    for engine in ("fsdp2", "fsdp1"):
        assert len(report[f"{engine}_losses"]) == STEPS
        assert_matches_single_process(load_file(tmp_path / engine / "adapter_model.safetensors"))
        assert (tmp_path / engine / "inactive" / "adapter_model.safetensors").is_file()
