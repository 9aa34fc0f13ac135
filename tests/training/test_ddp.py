"""PyTorch DDP under ``torchrun --nproc_per_node 2`` on the CPU (gloo), through ``examples/train_ddp.py``.

One launch checks: training runs past the first step without DDP's "unused parameters" error although the model
has ``modules_to_save`` and an inactive second adapter; exactly the trainable parameters (active adapter and the
head copy) are all-reduced; the replicas end identical; the adapter rank 0 saved equals a single-process run on
the same global batches.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from torchrun_helpers import DDP_EXAMPLE, GLOBAL_BATCH, LR, STEPS, assert_matches_single_process, run_torchrun


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_two_processes_match_a_single_process_run(tmp_path) -> None:
    report_file = tmp_path / "report.json"
    run_torchrun(DDP_EXAMPLE, "--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH), "--lr", str(LR),
                 "--output", str(tmp_path / "ddp"), "--report", str(report_file))
    report = json.loads(report_file.read_text())
    assert report["world_size"] == 2 and len(report["losses"]) == STEPS

    # Only what requires grad went through DDP's all-reduce: adapter "default" and the lm_head copy.
    assert report["reduced"] == report["trainable"]
    assert any(".lora_A.default." in n for n in report["reduced"])
    assert any(".modules_to_save.default." in n for n in report["reduced"])
    assert not any(".base_layer." in n or ".inactive." in n for n in report["reduced"])
    assert report["replica_diff"] == 0.0

    assert_matches_single_process(load_file(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert (tmp_path / "ddp" / "inactive" / "adapter_model.safetensors").is_file()
