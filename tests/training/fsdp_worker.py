"""Worker for ``test_fsdp.py``, run by ``torchrun --nproc_per_node 2`` on the CPU (gloo).

Trains ``examples/train_ddp.py``'s model (LoRA, a ``modules_to_save`` head and an inactive second adapter: frozen
base weights and trainable adapters mixed in every unit) under FSDP2 ``fully_shard`` and under FSDP1 with
``use_orig_params=True``, then saves with ``save_adapter``. Rank 0 writes a JSON report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from peftkit.core.errors import CheckpointError
from peftkit.integrations.training import fsdp_auto_wrap_policy, fully_shard_model, save_adapter, unwrap_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_ddp.py"


def _example():
    spec = importlib.util.spec_from_file_location("train_ddp_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refused(model: torch.nn.Module, directory: str) -> str:
    """What ``save_pretrained`` says when called on the live, sharded parameters (it must refuse)."""
    try:
        unwrap_model(model).save_pretrained(directory)
    except CheckpointError as exc:
        return str(exc)
    return ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    example = _example()
    batches = example.global_batches(args.steps, args.global_batch)
    report: dict[str, object] = {}

    from torch.distributed.device_mesh import init_device_mesh

    model = example.build_model()
    fully_shard_model(model, mesh=init_device_mesh("cpu", (world,)))
    report["fsdp2_losses"] = example.train(model, batches, args.lr, rank, world)
    report["fsdp2_sharded"] = type(model.get_adapter_state_dict("default")[
        next(iter(model.get_adapter_state_dict("default")))]).__name__
    report["fsdp2_refusal"] = _refused(model, os.path.join(args.out, "refused2"))
    save_adapter(model, os.path.join(args.out, "fsdp2"))

    from torch.distributed.fsdp import FullyShardedDataParallel

    model = example.build_model()
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True,
                                       device_id=torch.device("cpu"))
    report["fsdp1_losses"] = example.train(wrapped, batches, args.lr, rank, world)
    report["fsdp1_refusal"] = _refused(wrapped, os.path.join(args.out, "refused1"))
    save_adapter(wrapped, os.path.join(args.out, "fsdp1"))

    if rank == 0:
        Path(args.out, "report.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
