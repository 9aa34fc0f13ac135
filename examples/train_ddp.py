"""Train a LoRA adapter with PyTorch DistributedDataParallel, on CPUs (gloo) or GPUs (nccl).

    torchrun --standalone --nproc_per_node 2 examples/train_ddp.py --steps 20 --output /tmp/ddp-adapter

Every process holds a full replica of the model. DDP all-reduces the gradients of the parameters that require
grad; in a peftkit model those are the active adapter and the ``modules_to_save`` copies (here ``lm_head``), so
the frozen base weights never enter a DDP bucket and cost no communication. A second adapter that is loaded but
not active is frozen too, so it is not in a bucket either, and DDP needs no ``find_unused_parameters=True``.
The script prints how many parameters each step all-reduces, checks that the replicas are identical at the
end, and saves the adapter once (rank 0 writes, the others wait).

The model is a small Llama built from a config with random weights and the data random tokens, so the script
runs offline in seconds; put your model and data loader in ``build_model`` and ``global_batches``. Running it
without torchrun trains the same model in one process on the whole global batch: the adapter it saves matches
the distributed one up to floating-point rounding (``tests/training/test_ddp.py`` checks exactly that).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.integrations.training import save_adapter

VOCAB, SEQ = 128, 16


def build_model(seed: int = 0) -> PeftModel:
    """Same weights on every rank: DDP broadcasts rank 0's at wrap time anyway, but the seed keeps runs comparable."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["lm_head"]))
    # A second adapter, loaded but inactive: frozen, so DDP leaves it out of its buckets.
    model.add_adapter("inactive", LoraConfig(r=4, target_modules=["o_proj"]))
    return model


def global_batches(steps: int, global_batch: int, seed: int = 1) -> list[torch.Tensor]:
    """The token ids of each step's whole batch, across all ranks: (global_batch, SEQ) per step."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (global_batch, SEQ), generator=gen) for _ in range(steps)]


def train(model: torch.nn.Module, batches: list[torch.Tensor], lr: float, rank: int = 0, world_size: int = 1
          ) -> list[float]:
    """Plain training loop; each rank takes its contiguous share of every global batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for batch in batches:
        ids = batch.chunk(world_size)[rank]  # (global_batch / world_size, SEQ)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # under DDP this all-reduces (averages) the adapter gradients across ranks
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _flat_trainable(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=8, help="rows per step summed over all ranks")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", default="ddp-adapter", help="where rank 0 saves the adapter")
    parser.add_argument("--report", help="write a JSON report here (rank 0), for tests")
    args = parser.parse_args()

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if args.global_batch % world_size:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the world size {world_size}.")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if distributed and torch.cuda.is_available() \
        else torch.device("cpu")

    model = build_model().to(device)
    names = {id(p): n for n, p in model.named_parameters()}
    reduced: set[str] = set()
    wrapped: torch.nn.Module = model
    if distributed:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        # No annotations: DDP checks them against dist.GradBucket, and ``from __future__ import annotations`` makes
        # them strings.
        def recording_allreduce(state, bucket):  # noqa: ANN001, ANN202
            reduced.update(names[id(p)] for p in bucket.parameters())
            return allreduce_hook(state, bucket)

        wrapped.register_comm_hook(None, recording_allreduce)

    batches = [b.to(device) for b in global_batches(args.steps, args.global_batch)]
    losses = train(wrapped, batches, args.lr, rank, world_size)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    replica_diff = 0.0
    if distributed:  # every replica must hold the same adapter after the same averaged updates
        mine = _flat_trainable(model)
        everyone = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(everyone, mine)
        replica_diff = max((t - everyone[0]).abs().max().item() for t in everyone)
    save_adapter(wrapped, args.output)  # every rank calls it; rank 0 writes

    if rank == 0:
        print(f"world size {world_size}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; all-reduced {trainable:,d} of "
              f"{total:,d} parameters per step; max difference between replicas {replica_diff:.2e}; "
              f"adapter saved to {args.output}")
        if args.report:
            with open(args.report, "w") as fh:
                json.dump({"losses": losses, "reduced": sorted(reduced), "replica_diff": replica_diff,
                           "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
                           "world_size": world_size}, fh)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
