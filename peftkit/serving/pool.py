"""An adapter pool: many LoRA adapters served from one base model, any mix of them in one batch.

The design follows S-LoRA (https://arxiv.org/abs/2311.03285) and Punica (https://arxiv.org/abs/2310.18547):

* Every targeted linear of the base model is wrapped once in a :class:`~peftkit.serving.layer.LoraSlotLinear`
  whose slot tensors ``A (max_loras + 1, max_lora_rank, in)`` and ``B (max_loras + 1, out, max_lora_rank)`` are
  allocated up front. Loading an adapter copies its pairs into one slot (scale folded into B, rank zero-padded);
  nothing else is ever copied, so a forward costs the same whichever and however many adapters it mixes.
* A batch names one adapter per row. :meth:`AdapterPool.rows` turns the names into one slot index per row, once,
  and shares it with every layer through a single holder; each layer gathers its rows' pairs and runs two
  batched matmuls.
* Adapters in a running batch are pinned. When the slots are full, the least recently used unpinned adapter
  leaves its slot; its weights stay in a host LRU cache (``max_cpu_loras``, ``max_cpu_bytes``, never exceeded),
  from which it comes back with one copy, or from its files when the cache let it go.
* Slot writes are in place: under ``torch.compile`` loading, unloading and replacing adapters do not recompile.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from peftkit.core.errors import AdapterNotFoundError, TargetModuleError
from peftkit.core.layer import BASE_ADAPTER_NAME, AdapterLayer
from peftkit.core.targets import match_targets
from peftkit.integrations import hub
from peftkit.serving.cache import HostCache, SlotWeights
from peftkit.serving.errors import AdapterInUseError, PoolFullError
from peftkit.serving.layer import LoraSlotLinear, RowSlots, linear_shape
from peftkit.serving.loading import read_lora

__all__ = ["AdapterPool", "BASE"]

# The adapter name of rows that see the base model alone (HF peft's spelling).
BASE = BASE_ADAPTER_NAME


class AdapterPool:
    """LoRA adapters of one base model in preallocated slots, mixed freely per batch row.

    Row ``b`` of a batch computes, at every wrapped layer, ``h = W x + s·B_slot(b) A_slot(b) x``, where
    ``slot(b)`` is the slot of the adapter named for that row (an all-zero slot for :data:`BASE` rows), so each row
    equals that adapter alone. The pool is not a ``PeftModel``: it reads HF peft checkpoints (directories or Hub
    ids) and wraps the base model's linears in its own slot layers; :meth:`unload` puts the originals back.

    Args:
        base_model: A transformers model (or any ``nn.Module`` whose targeted layers are ``nn.Linear`` or
            ``Conv1D``), without adapters; it is switched to eval mode.
        max_loras: Adapters held in slots at once, hence the most distinct adapters one batch can mix (default 8).
        max_lora_rank: Largest rank an adapter may have; smaller ranks are zero-padded (default 16). Slot memory is
            ``(max_loras + 1) · max_lora_rank · (in + out)`` elements per wrapped layer.
        max_cpu_loras: Adapters kept in the host cache of loaded files (default 64; 0 keeps none).
        max_cpu_bytes: Byte budget of that cache (default None: no byte limit); never exceeded.
        target_modules: Wrap these modules now (names, suffixes or a regex, as ``LoraConfig.target_modules``).
            Otherwise each load wraps the modules its adapter targets, and a load that wraps new modules
            changes the model's graph (a compiled model recompiles once).

    Raises:
        ValueError: a limit is out of range, or ``base_model`` already holds adapter layers.
        TargetModuleError: ``target_modules`` matches nothing, or a module that is not linear.
    """

    def __init__(self, base_model: nn.Module, max_loras: int = 8, max_lora_rank: int = 16, max_cpu_loras: int = 64,
                 max_cpu_bytes: int | None = None, target_modules: list[str] | str | None = None) -> None:
        for name, value, low in (("max_loras", max_loras, 1), ("max_lora_rank", max_lora_rank, 1),
                                 ("max_cpu_loras", max_cpu_loras, 0), ("max_cpu_bytes", max_cpu_bytes or 0, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"AdapterPool({name}={value!r}): must be an integer >= {low}.")
        if any(isinstance(m, (AdapterLayer, LoraSlotLinear)) for m in base_model.modules()):
            raise ValueError("AdapterPool needs the plain base model, but this one already holds adapter layers "
                             "(a PeftModel, or another pool's); pass the model without adapters (unload() them).")
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.max_cpu_loras, self.max_cpu_bytes = max_cpu_loras, max_cpu_bytes
        self._model = base_model.eval()
        config = getattr(base_model, "config", None)
        self.base_model_name: str = getattr(config, "name_or_path", "") or type(base_model).__name__
        self._rows = RowSlots()
        self._layers: dict[str, LoraSlotLinear] = {}
        self._sources: dict[str, hub.AdapterSource] = {}  # every registered adapter, in load order
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # adapters in slots, least recently used first
        self._free = list(range(max_loras - 1, -1, -1))  # popped from the end: slot 0 first
        self._pins: Counter[str] = Counter()
        self._host = HostCache(max_cpu_loras, max_cpu_bytes)
        self._counts = {"loads_cold": 0, "loads_warm": 0, "slot_evictions": 0}
        self._lock = threading.RLock()  # pool state; held briefly
        self._running = threading.RLock()  # one batch at a time owns the shared slot index
        if target_modules is not None:
            names = match_targets(base_model, target_modules)
            not_linear = [n for n in names if linear_shape(base_model.get_submodule(n)) is None]
            if not_linear:
                raise TargetModuleError(f"AdapterPool wraps nn.Linear and Conv1D layers only; target_modules "
                                        f"{target_modules!r} also match {not_linear[:5]}.")
            self._install(names)

    # ---- what is loaded ------------------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """The base model, with the pool's slot layers in place of the targeted linears."""
        return self._model

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters, in load order."""
        with self._lock:
            return list(self._sources)

    @property
    def resident_adapters(self) -> list[str]:
        """Adapters now in slots, least recently used first (the next to be evicted, unless pinned)."""
        with self._lock:
            return list(self._slot_of)

    def __contains__(self, name: object) -> bool:
        return name in self._sources

    def stats(self) -> dict[str, int | None]:
        """Counters for monitoring: slots used, free and pinned; host cache entries and bytes; loads from files
        (cold) and from the host cache (warm); evictions from slots and from the cache."""
        with self._lock:
            return {
                "adapters": len(self._sources), "max_loras": self.max_loras, "max_lora_rank": self.max_lora_rank,
                "slots_used": len(self._slot_of), "slots_free": len(self._free),
                "slots_pinned": sum(1 for n in self._slot_of if self._pins[n]),
                "cpu_entries": len(self._host), "cpu_bytes": self._host.nbytes, "max_cpu_loras": self.max_cpu_loras,
                "max_cpu_bytes": self.max_cpu_bytes, **self._counts, "cpu_evictions": self._host.evictions,
            }

    # ---- load / unload -------------------------------------------------------------------------------------
    def load_adapter(self, name: str, model_id: str | os.PathLike, *, replace: bool = False,
                     **hub_kwargs: object) -> None:
        """Load the LoRA adapter ``model_id`` (a directory or a Hub id) under ``name``.

        The files are read and checked against the base model first; only then does the pool change. The adapter
        goes into the host cache and, if a slot is free (or it replaces an adapter that has one), into a slot.

        Args:
            name: The adapter's name in ``adapter_names``.
            model_id: A local directory (``save_pretrained``'s) or a Hub repo id.
            replace: Replace the adapter already loaded as ``name``, in its slot, in place.
            **hub_kwargs: ``revision``, ``subfolder``, ``token``, ``cache_dir``, ``force_download``,
                ``local_files_only``.

        Raises:
            PeftConfigError: the config is missing or not LoRA, or a rank exceeds ``max_lora_rank``.
            CheckpointError: the weights are missing, corrupt, or do not fit the base model (every problem listed).
            ValueError: ``name`` is taken (and ``replace`` is False) or is :data:`BASE`.
            AdapterInUseError: ``replace`` of an adapter a running batch uses.
        """
        if name == BASE or not isinstance(name, str) or not name:
            raise ValueError(f"{name!r} cannot name an adapter; {BASE!r} means the base model.")
        self._check_free_name(name, replace)
        source = hub.resolve_adapter(model_id, hub.hub_options("AdapterPool.load_adapter", hub_kwargs))
        weights = read_lora(source.directory, source.label, self._model, self.max_lora_rank, self._dtype())
        with self._lock:
            self._check_free_name(name, replace)
            if self._pins[name]:
                raise AdapterInUseError(f"Adapter {name!r} is in a running batch; replace it when the batch is done.")
            self._install([p for p in weights.pairs if p not in self._layers])
            self._sources[name] = source
            self._host.put(name, weights, self._pinned)
            self._counts["loads_cold"] += 1
            slot = self._slot_of.get(name)
            if slot is None and self._free:
                slot = self._free.pop()
                self._slot_of[name] = slot
            if slot is not None:
                self._write(slot, weights)

    def unload_adapter(self, name: str) -> None:
        """Forget ``name``: free its slot and its host cache entry.

        Raises:
            AdapterNotFoundError: no adapter of that name.
            AdapterInUseError: a running batch uses it.
        """
        with self._lock:
            self._check_known([name])
            if self._pins[name]:
                raise AdapterInUseError(f"Adapter {name!r} is in a running batch; unload it when the batch is done.")
            del self._sources[name]
            self._host.pop(name)
            slot = self._slot_of.pop(name, None)
            if slot is not None:
                self._free.append(slot)

    def unload(self) -> nn.Module:
        """Unload every adapter and put the original modules back; return the base model, as it was.

        Raises:
            AdapterInUseError: a batch is running.
        """
        with self._running, self._lock:
            if +self._pins:
                raise AdapterInUseError(f"Adapters {sorted(+self._pins)} are in a running batch.")
            for path, layer in self._layers.items():
                parent, _, child = path.rpartition(".")
                setattr(self._model.get_submodule(parent), child, layer.base_layer)
            self._layers.clear()
            self._sources.clear()
            self._slot_of.clear()
            self._free = list(range(self.max_loras - 1, -1, -1))
            self._host.clear()
            return self._model

    # ---- running batches -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def rows(self, adapter_names: Sequence[str]) -> Iterator[torch.Tensor]:
        """Within the block, every call of the base model applies ``adapter_names[b]`` to row ``b``.

        The adapters are pinned (kept in their slots and in the host cache) until the block ends; those not in a
        slot are copied in, evicting the least recently used unpinned ones. One block runs at a time: a second
        thread waits. Yields the ``(B,)`` slot index (the last slot, all zeros, for :data:`BASE` rows).

        Raises:
            AdapterNotFoundError: a name is not loaded (the message lists those that are).
            PoolFullError: the batch mixes more than ``max_loras`` adapters, or every slot is pinned by other
                batches.
            CheckpointError: an adapter the host cache let go cannot be read from its files any more.
        """
        names = list(adapter_names)
        with self._running:
            index, pinned = self._pin(names)
            previous, self._rows.index = self._rows.index, index
            try:
                yield index
            finally:
                self._rows.index = previous
                with self._lock:
                    self._pins.subtract(pinned)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward (its output object: ``.logits``, ``.past_key_values``) with one adapter per row.

        ``adapter_names=None`` runs the base model alone. Other keyword arguments (``past_key_values``,
        ``use_cache``, ``position_ids``, ``inputs_embeds``, ...) go to the base model.
        """
        batch = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        with torch.no_grad(), self._batch(adapter_names, batch):
            return self._model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 adapter_names: Sequence[str] | None = None, **generate_kwargs: Any) -> Any:
        """``base_model.generate`` with one adapter per prompt: greedy, sampling or beams, with the KV cache.

        Rows that ``generate`` repeats (``num_return_sequences``, ``num_beams``) keep their prompt's adapter.
        """
        batch = input_ids if input_ids is not None else generate_kwargs.get("inputs_embeds")
        with self._batch(adapter_names, batch):
            return self._model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    # ---- internals -----------------------------------------------------------------------------------------
    def _batch(self, adapter_names: Sequence[str] | None,
               batch: torch.Tensor | None) -> contextlib.AbstractContextManager[object]:
        if adapter_names is None:
            return contextlib.nullcontext()
        if isinstance(adapter_names, str):
            raise TypeError("adapter_names must be a list with one adapter name per row, not a string.")
        if batch is not None and len(adapter_names) != batch.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch.shape[0]} rows; "
                             "pass one name per row.")
        return self.rows(adapter_names)

    def _pin(self, names: list[str]) -> tuple[torch.Tensor, list[str]]:
        with self._lock:
            distinct = [n for n in dict.fromkeys(names) if n != BASE]
            self._check_known(distinct)
            if len(distinct) > self.max_loras:
                raise PoolFullError(
                    f"The batch mixes {len(distinct)} adapters, more than max_loras={self.max_loras} slots; split it "
                    "into batches of at most max_loras distinct adapters, or create the pool with more slots."
                )
            self._pins.update(distinct)
            try:
                for name in distinct:
                    if name in self._slot_of:
                        self._slot_of.move_to_end(name)
                    else:
                        self._fill_slot(name)
            except BaseException:
                self._pins.subtract(distinct)
                raise
            slots = [self._slot_of.get(n, self.max_loras) for n in names]
            return torch.tensor(slots, dtype=torch.long, device=self._device()), distinct

    def _fill_slot(self, name: str) -> None:
        """Put a pinned adapter into a slot: a free one, else the least recently used unpinned adapter's."""
        victim = None
        if not self._free:
            victim = next((n for n in self._slot_of if not self._pins[n]), None)
            if victim is None:
                raise PoolFullError(
                    f"Adapter {name!r} needs a slot, but all max_loras={self.max_loras} slots hold adapters of "
                    f"running batches ({sorted(self._slot_of)}). Retry when a batch finishes, or create the pool "
                    "with more slots."
                )
        weights = self._host.get(name)
        if weights is None:  # the cache let it go: read the files again (checked again, they may have changed)
            source = self._sources[name]
            weights = read_lora(source.directory, source.label, self._model, self.max_lora_rank, self._dtype())
            self._host.put(name, weights, self._pinned)
            self._counts["loads_cold"] += 1
        else:
            self._counts["loads_warm"] += 1
        if victim is not None:
            slot = self._slot_of.pop(victim)
            self._counts["slot_evictions"] += 1
        else:
            slot = self._free.pop()
        self._write(slot, weights)
        self._slot_of[name] = slot

    def _write(self, slot: int, weights: SlotWeights) -> None:
        # Every layer is written: the slot's previous adapter may have targeted modules this one does not.
        for path, layer in self._layers.items():
            layer.write_slot(slot, weights.pairs.get(path))

    def _install(self, names: list[str]) -> None:
        for path in names:
            if path in self._layers:
                continue
            parent, _, child = path.rpartition(".")
            base = self._model.get_submodule(path)
            layer = LoraSlotLinear(base, self._rows, self.max_loras, self.max_lora_rank)
            setattr(self._model.get_submodule(parent), child, layer)
            self._layers[path] = layer

    def _pinned(self, name: str) -> bool:
        return self._pins[name] > 0

    def _check_known(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self._sources]
        if unknown:
            raise AdapterNotFoundError(
                f"No adapter named {unknown[0]!r} in the pool; loaded: {list(self._sources)} (and {BASE!r} for the "
                "base model). Load it with load_adapter first."
            )

    def _check_free_name(self, name: str, replace: bool) -> None:
        if name in self._sources and not replace:
            raise ValueError(f"An adapter named {name!r} is already loaded; pass replace=True to replace it, or "
                             "unload_adapter it first.")

    def _dtype(self) -> torch.dtype:
        layer = next(iter(self._layers.values()), None)
        if layer is not None:
            return layer.lora_A.dtype
        return next((p.dtype for p in self._model.parameters() if p.is_floating_point()), torch.float32)

    def _device(self) -> torch.device:
        layer = next(iter(self._layers.values()), None)
        if layer is not None:
            return layer.lora_A.device
        return next((p.device for p in self._model.parameters()), torch.device("cpu"))
