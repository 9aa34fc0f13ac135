"""Training engines around a ``PeftModel``: transformers ``Trainer``, accelerate, DDP, FSDP, meta-device loading.

What each engine needs from peftkit, and why it lives here rather than in the core:

- transformers ``Trainer``: ``peftkit.integrations.trainer.PeftTrainer`` (its own module: importing ``Trainer``
  takes seconds); it uses :func:`load_adapter_checkpoint` here to resume.
- DDP, FSDP and DeepSpeed wrap the model; :func:`unwrap_model` finds the ``PeftModel`` inside.
- Sharded parameters must be gathered on every rank before rank 0 writes: :func:`save_adapter`.
- FSDP1 flattens parameters per unit: :func:`fsdp_auto_wrap_policy`; FSDP2: :func:`fully_shard_model`.
- A model built on the meta device gets storage and weights with :func:`materialize_meta_tensors` and
  :func:`load_base_weights`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from peftkit.core.checkpoint import WEIGHTS_NAME
from peftkit.core.errors import CheckpointError
from peftkit.core.inject import adapter_layers
from peftkit.core.model import PeftModel
from peftkit.core.targets import logical_name

__all__ = [
    "fsdp_auto_wrap_policy",
    "fully_shard_model",
    "load_adapter_checkpoint",
    "load_base_weights",
    "materialize_meta_tensors",
    "save_adapter",
    "unwrap_model",
]

# Wrappers that hold the real model as ``.module`` (DDP, DataParallel, FSDP1, DeepSpeed) or ``._orig_mod``
# (torch.compile). Matched by name so that none of their packages is imported.
_WRAPPERS = {"DistributedDataParallel": "module", "DataParallel": "module", "FullyShardedDataParallel": "module",
             "DeepSpeedEngine": "module", "OptimizedModule": "_orig_mod"}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The ``PeftModel`` inside DDP / FSDP1 / DeepSpeed / ``torch.compile`` wrappers (FSDP2 wraps nothing), or
    ``model`` itself when there is none."""
    while not isinstance(model, PeftModel) and type(model).__name__ in _WRAPPERS:
        model = getattr(model, _WRAPPERS[type(model).__name__])
    return model


def _peft(model: nn.Module) -> PeftModel:
    inner = unwrap_model(model)
    if not isinstance(inner, PeftModel):
        raise TypeError(f"Expected a peftkit PeftModel (possibly wrapped by DDP/FSDP/compile), got {type(model)}.")
    return inner


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---- saving ------------------------------------------------------------------------------------------------------
def save_adapter(
    model: nn.Module, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None
) -> None:
    """Save adapters from a model under any engine. Call it on every rank: sharded tensors are gathered
    collectively, then rank 0 writes (``save_pretrained``'s layout) and every rank waits for the files.

    - DDP, accelerate, a single process: the replicas are identical; rank 0 writes its own.
    - FSDP2 (``fully_shard``): each adapter tensor is a DTensor, gathered with ``full_tensor()``.
    - FSDP1: ``summon_full_params`` unshards the units (the whole model, briefly); the adapter tensors are copied.
    """
    peft_model = _peft(model)
    names = list(peft_model.peft_config) if selected_adapters is None else list(selected_adapters)

    def adapter_ids() -> set[int]:
        # Only adapter tensors are gathered, never the base model. ``_adapter_tensors`` is the core's list behind
        # ``get_adapter_state_dict``, without its ``detach()`` (which would hide the parameters' identity).
        return {id(t) for name in names for t in peft_model._adapter_tensors(name, materialize=False).values()}

    if type(model).__name__ == "FullyShardedDataParallel":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            wanted = adapter_ids()
            gathered = {n: t.detach().clone() for n, t in _named_tensors(peft_model) if id(t) in wanted}
    else:
        wanted = adapter_ids()
        # Every rank, in the same (named_parameters) order: full_tensor() is a collective.
        gathered = {n: t.full_tensor().detach() for n, t in _named_tensors(peft_model)
                    if id(t) in wanted and type(t).__name__ == "DTensor"}
    peft_model.save_pretrained(save_directory, selected_adapters=names, is_main_process=_rank() == 0,
                               state_dict=gathered or None)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody reads the files before rank 0 has written them


def _named_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    hops = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        yield ".".join(p for p in name.split(".") if p not in hops), tensor


def load_adapter_checkpoint(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Load the adapters ``save_pretrained`` wrote into ``directory`` back into ``model`` in place.

    Loaded adapters get their weights overwritten (``hotswap_adapter``: same parameter objects, so optimizer state
    and wrappers stay valid); adapters the model lacks are added, inactive. Returns the adapter names loaded.
    """
    peft_model, directory = _peft(model), os.fspath(directory)
    found = {}
    if os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        found["default"] = directory
    for entry in sorted(os.listdir(directory)):
        if os.path.isfile(os.path.join(directory, entry, WEIGHTS_NAME)):
            found.setdefault(entry, os.path.join(directory, entry))
    if not found:
        raise CheckpointError(f"No {WEIGHTS_NAME} in {directory!r} or its subdirectories.")
    for name, path in found.items():
        if name in peft_model.peft_config:
            peft_model.hotswap_adapter(path, name)
        else:
            peft_model.load_adapter(path, name)
    return list(found)


# ---- FSDP --------------------------------------------------------------------------------------------------------
def _block_classes(model: nn.Module, classes: Iterable[type[nn.Module]] | None) -> set[type[nn.Module]]:
    if classes is not None:
        return set(classes)
    base = _peft(model).get_base_model()
    names = set(getattr(base, "_no_split_modules", None) or [])
    found = {type(m) for m in base.modules() if type(m).__name__ in names}
    if not found:
        raise ValueError(f"{type(base).__name__} names no transformer block (_no_split_modules); pass the classes.")
    return found


def fsdp_auto_wrap_policy(model: nn.Module, block_classes: Iterable[type[nn.Module]] | None = None) -> Callable:
    """FSDP1 ``auto_wrap_policy`` that makes one unit per transformer block (``_no_split_modules``).

    Use it with ``use_orig_params=True``: a block holds frozen base weights and trainable adapters, and FSDP1
    flattens a unit's parameters into one ``FlatParameter``, which needs uniform ``requires_grad`` unless
    ``use_orig_params=True``. HF peft instead wraps each adapter leaf in its own unit; peftkit's LoRA reads
    ``lora_A.weight`` directly in its fused forward, which a separate unit would leave sharded, so the adapters
    stay in their block's unit. FSDP2 (``fully_shard``, :func:`fully_shard_model`) shards per parameter and
    needs none of this.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=_block_classes(model, block_classes))


def fully_shard_model(
    model: nn.Module, block_classes: Iterable[type[nn.Module]] | None = None, **fsdp_kwargs: object
) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the whole ``PeftModel`` (the usual FSDP2 recipe).

    FSDP2 shards every parameter on its own (DTensor), so frozen base weights and trainable adapters mix freely
    in one unit. ``fsdp_kwargs`` go to ``fully_shard`` (``mesh``, ``mp_policy``, ``reshard_after_forward``).
    Save with :func:`save_adapter` on every rank.
    """
    from torch.distributed.fsdp import fully_shard

    classes = tuple(_block_classes(model, block_classes))
    for module in list(_peft(model).get_base_model().modules()):
        if isinstance(module, classes):
            fully_shard(module, **fsdp_kwargs)
    return fully_shard(model, **fsdp_kwargs)


# ---- meta device -------------------------------------------------------------------------------------------------
def materialize_meta_tensors(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Give every parameter and buffer on the meta device uninitialised storage on ``device``, in place.

    Unlike ``Module.to_empty`` it leaves tensors that have data alone (the non-persistent buffers that
    ``accelerate.init_empty_weights`` keeps real, e.g. rotary frequencies) and keeps tied parameters tied.
    Load the weights next: :func:`load_base_weights`, then ``hotswap_adapter`` for a saved adapter.
    """
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in done:
                    empty = torch.empty_like(tensor, device=device)
                    done[id(tensor)] = (
                        nn.Parameter(empty, requires_grad=tensor.requires_grad)
                        if isinstance(tensor, nn.Parameter) else empty
                    )
                table[name] = done[id(tensor)]


def load_base_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy the base model's weights (keys as in the unwrapped model's ``state_dict()``, e.g. a
    ``model.safetensors``) into a ``PeftModel``, where they sit under the adapter layers' ``base_layer``.

    Raises:
        CheckpointError: with ``strict``, a base tensor the state dict lacks or a key that names none (all listed),
            or a tensor still on the meta device (call :func:`materialize_meta_tensors` first).
    """
    base = _peft(model).get_base_model()
    adapter_ids = {  # adapter tensors (all adapters, active or not) and modules_to_save copies
        id(t) for _, layer in adapter_layers(base) for attr in layer.adapter_param_names
        for t in getattr(layer, attr).state_dict(keep_vars=True).values()
    }
    targets = {logical_name(n): t for n, t in base.state_dict(keep_vars=True).items() if id(t) not in adapter_ids}
    missing = sorted(n for n in targets if n not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in targets)
    on_meta = sorted(n for n, t in targets.items() if t.is_meta)
    problems = []
    if strict and missing:
        problems.append(f"missing base tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if strict and unexpected:
        problems.append(f"keys that name no base tensor: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if on_meta:
        problems.append(f"tensors on the meta device: {on_meta[:4]} (call materialize_meta_tensors first)")
    if problems:
        raise CheckpointError("Cannot load the base weights; nothing was loaded:\n  - " + "\n  - ".join(problems))
    with torch.no_grad():
        for key, value in state_dict.items():
            if key in targets:
                targets[key].copy_(value.to(dtype=targets[key].dtype))

