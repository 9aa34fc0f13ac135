"""The adapter-layer contract every method's layers follow, and the ``modules_to_save`` wrapper.

An :class:`AdapterLayer` wraps one module of the base model (``self.base_layer``) and never copies its
weights. Per-adapter tensors live in ``nn.ModuleDict`` / ``nn.ParameterDict`` attributes listed in
``adapter_param_names``; per-adapter scalars in plain dicts listed in ``adapter_attr_names``. Trainability,
checkpoint filtering and deletion are all derived from those two tuples, never from substring matching.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from peftkit.core.errors import NotMergeableError, PeftConfigError

__all__ = ["AdapterLayer", "AdapterModule", "AdapterModuleGroup", "ModulesToSaveWrapper", "base_layer_of",
           "BASE_ADAPTER_NAME"]

# Name a mixed batch uses for rows that should see the base model only (HF peft's spelling).
BASE_ADAPTER_NAME = "__base__"


def base_layer_of(module: nn.Module) -> nn.Module:
    """Follow ``base_layer`` links through nested adapter layers down to the original module."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


class AdapterLayer(nn.Module):
    """Base class of every module peftkit puts into a model.

    Subclasses implement ``update_layer`` (add one adapter), ``forward`` and, when the method can be merged,
    ``delta_weight``. The merge contract: ``merge(adapter_names, safe)`` folds the named (default: active)
    adapters into the base weight, skipping ones already merged; ``unmerge()`` subtracts them in reverse order.

    Attributes:
        active_adapters: Adapters applied by ``forward`` (several at once add up).
        disable_adapters: When True, ``forward`` is the base layer's.
        merged_adapters: Adapters currently folded into the base weights.
        batch_adapter_names: Set by ``PeftModel`` during a mixed batch: one adapter name per row.
    """

    adapter_param_names: tuple[str, ...] = ()
    adapter_attr_names: tuple[str, ...] = ()
    method_name: str = ""
    # How the layer's output relates to the module it wraps, for the structural merge check (core/merging.py):
    # "add": ``out = inner(x) + D(x)`` with D independent of the wrapped module, merged as ``W ← W + ΔW`` (or ``b``);
    # "scale": inputs or outputs rescaled, merged by rescaling ``W``; "opaque": a function of the wrapped module's
    # output that has no weight form. Only "add" layers commute, so only they merge through each other.
    weight_effect: str = "opaque"
    # Per-layer merge bookkeeping (beyond ``merged_adapters`` and the base module's parameters) that a rolled-back
    # merge must put back as it was.
    merge_state_attrs: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._active_adapters: list[str] = []
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        self.batch_adapter_names: list[str] | None = None

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return self._active_adapters

    @active_adapters.setter
    def active_adapters(self, names: list[str]) -> None:
        self._active_adapters = list(names)
        self._active_changed()

    def _active_changed(self) -> None:
        """Called whenever the active set changes: layers that cache per-adapter state for ``forward`` (so that a
        compiled model does not specialise on adapter names) rebuild it here."""

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in self.adapter_param_names:
            names.update(dict.fromkeys(getattr(self, attr).keys()))
        return list(names)

    def get_base_layer(self) -> nn.Module:
        return base_layer_of(self)

    # Model code reads these off the modules it owns (T5 checks ``self.wo.weight.dtype``); HF peft forwards them.
    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    def set_adapter(self, adapter_names: list[str]) -> None:
        self.active_adapters = [n for n in adapter_names if n in self.adapter_names]

    def set_trainable(self, adapter_name: str, trainable: bool) -> None:
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if adapter_name in container:
                container[adapter_name].requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it.")
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        for attr in self.adapter_attr_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Live tensors of one adapter keyed as in the checkpoint, relative to this layer, name stripped."""
        out: dict[str, torch.Tensor] = {}
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                out[attr] = item
            else:
                out.update({f"{attr}.{k}": v for k, v in item.state_dict(keep_vars=True).items()})
        return out

    def load_aliases(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Tensors this layer also accepts on load under other keys (relative to it) that it never saves, e.g. a
        tied copy another library writes; optional in a checkpoint."""
        return {}

    def checkpoint_base_prefix(self, adapter_name: str) -> str:
        """Where checkpoints that hold the wrapped module's own weights (``save_embedding_layers``) put them,
        relative to this layer: HF peft's ``base_layer.`` hop."""
        return "base_layer."

    def iter_adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if adapter_name in container:
                item = container[adapter_name]
                yield from [item] if isinstance(item, nn.Parameter) else item.parameters()

    # ---- per-adapter scale ---------------------------------------------------------------------------------
    def adapter_scale(self, adapter_name: str) -> float | None:
        """The factor ``set_scale`` put on ``adapter_name``'s update (1.0 until set), or None when this method's
        layers have no scale to change."""
        return None

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """Multiply ``adapter_name``'s update by ``scale`` relative to its configured scale (HF peft's
        ``set_scale``); methods without a scalar scale raise."""
        raise NotImplementedError(f"{self.method_name or type(self).__name__} layers have no adapter scale to set.")

    # ---- mixed batches -------------------------------------------------------------------------------------
    def rows_per_adapter(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Row indices of each adapter of the current mixed batch (beam search repeats each row)."""
        names = self.batch_adapter_names or []
        if batch_size % len(names):
            raise ValueError(f"A mixed batch has {len(names)} adapter names for {batch_size} rows; pass one per row.")
        repeat = batch_size // len(names)
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            rows.setdefault(name, []).extend(range(i * repeat, (i + 1) * repeat))
        return {name: torch.tensor(idx, dtype=torch.long) for name, idx in rows.items()}

    # ---- merging -------------------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The change to ``get_base_layer().weight`` that merging ``adapter_name`` makes, in the weight's layout;
        in the weight's dtype, or fp32 for a half-precision weight (the merge then rounds once)."""
        raise NotMergeableError(f"{self.method_name or type(self).__name__} adapters cannot be merged into weights.")

    def _to_merge(self, adapter_names: list[str] | None) -> list[str]:
        names = self.active_adapters if adapter_names is None else adapter_names
        return [n for n in names if n not in self.merged_adapters and n in self.adapter_names]

    def pending_merges(self, adapter_names: list[str] | None) -> list[str]:
        """The adapters ``merge(adapter_names)`` would fold into the weight now (held here, not merged yet)."""
        return self._to_merge(adapter_names)

    def merge_blocker(self, adapter_names: list[str]) -> str | None:
        """Why this layer cannot fold ``adapter_names`` into its weight, or None when it can."""
        if self.weight_effect == "opaque":
            return f"{self.method_name or type(self).__name__} adapters compute on activations and have no weight form"
        return None

    def merge_restore_point(self) -> Callable[[], None]:
        """A function that puts this layer and the module it wraps back exactly as they are now.

        An all-or-nothing merge takes one before it changes the layer and calls it if a later layer fails. It holds
        a copy of the base module's parameters (on the CPU: host memory is the larger pool when the weights sit on
        an accelerator) and the objects themselves, since a merge may replace a parameter (a bias created, a
        weight re-quantised) rather than write into it.
        """
        base = self.get_base_layer()
        params = {name: (p, None if p is None or p.is_meta else p.detach().to("cpu", copy=True))
                  for name, p in base._parameters.items()}
        merged = list(self.merged_adapters)
        state = {attr: copy.copy(getattr(self, attr)) for attr in self.merge_state_attrs}

        def restore() -> None:
            with torch.no_grad():
                for name, (param, data) in params.items():
                    base._parameters[name] = param
                    if data is not None:
                        param.data.copy_(data)
            self.merged_adapters = merged
            for attr, value in state.items():
                setattr(self, attr, value)

        return restore

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise if merging would give non-finite weights; computed on a copy, nothing is written."""
        names = self._to_merge(adapter_names)
        if not names:
            return
        weight = self.get_base_layer().weight.detach()
        merged = weight.to(_merge_dtype(weight.dtype), copy=True)
        for name in names:
            merged += self.delta_weight(name)
            if not torch.isfinite(merged.to(weight.dtype)).all():  # fp16 overflows where fp32 does not
                raise ValueError(
                    f"Merging adapter {name!r} into {type(self).__name__} gives non-finite weights (the adapter holds "
                    "NaN/inf or overflows the dtype). Nothing was merged."
                )

    def merge(self, adapter_names: list[str] | None = None, safe: bool = False) -> None:
        if safe:
            self.check_merge(adapter_names)
        weight = self.get_base_layer().weight
        for name in self._to_merge(adapter_names):
            _add_in_place(weight, self.delta_weight(name), 1.0)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            _add_in_place(weight, self.delta_weight(self.merged_adapters.pop()), -1.0)

    def merged_module(self, adapter_names: list[str] | None, dequantize: bool = False) -> nn.Module:
        """What ``merge_and_unload`` puts back in place of this layer: the base layer with the adapters merged."""
        self.merge(adapter_names)
        return self.base_layer

    def _skip_adapters(self) -> bool:
        return self.disable_adapters or not self.active_adapters


def _merge_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _add_in_place(weight: torch.Tensor, delta: torch.Tensor, sign: float) -> None:
    """``weight += sign·delta``; a half-precision weight is summed in fp32 and rounded once. ``delta_weight`` may be
    fp32 for such weights: rounding it to bf16 first (8 mantissa bits) and then the sum would round twice."""
    if weight.dtype == _merge_dtype(weight.dtype):
        weight.data.add_(delta, alpha=sign)
    else:
        weight.data.copy_(weight.data.float().add_(delta.float(), alpha=sign))


class ModulesToSaveWrapper(AdapterLayer):
    """A full trainable copy of a module per adapter (e.g. the classification head).

    ``forward`` runs the copy of the first active adapter that has one, else the original module. The
    checkpoint stores the copy under the original module's name, as HF peft does.
    """

    adapter_param_names = ("modules_to_save",)
    method_name = "modules_to_save"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def update_layer(self, adapter_name: str) -> None:
        trained = copy.deepcopy(self.get_base_layer())
        self.modules_to_save[adapter_name] = trained

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[adapter_name].state_dict(keep_vars=True))

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        return None

    def pending_merges(self, adapter_names: list[str] | None) -> list[str]:
        return []  # nothing folds into a weight: merge_and_unload swaps the trained copy in

    def merge(self, adapter_names: list[str] | None = None, safe: bool = False) -> None:
        # The copy replaces the original in merge_and_unload; nothing to fold in place.
        return None

    def unmerge(self) -> None:
        return None

    def merged_module(self, adapter_names: list[str] | None, dequantize: bool = False) -> nn.Module:
        names = [n for n in (adapter_names or self.active_adapters) if n in self.modules_to_save]
        return self.modules_to_save[names[0]] if names else self.base_layer

    def module_in_use(self) -> nn.Module:
        """The module ``forward`` runs: the active adapter's copy, or the original while adapters are off."""
        return self.base_layer if self._skip_adapters() else self.modules_to_save[self.active_adapters[0]]

    # Code that reads the wrapped module's attributes directly, as TRL's fused LM head reads ``lm_head.weight``,
    # gets those of the module in use, so it computes (and trains) what forward would (HF peft's behaviour).
    @property
    def weight(self) -> torch.Tensor:
        return self.module_in_use().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module_in_use(), "bias", None)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "modules_to_save" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self.module_in_use(), name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(x, *args, **kwargs)
        return self.module_in_use()(x, *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, rows in self.rows_per_adapter(x.shape[0]).items():
            rows = rows.to(x.device)
            module = self.modules_to_save[name] if name in self.modules_to_save else self.base_layer
            outputs.append((rows, module(x[rows], *args, **kwargs)))
        first = outputs[0][1]
        result = first.new_empty((x.shape[0], *first.shape[1:]))
        for rows, out in outputs:
            result[rows] = out
        return result


class AdapterModule(nn.Module):
    """One adapter's parameters that live beside the base model rather than inside a wrapped module: a soft
    prompt table, a prefix encoder. ``PeftModel`` keeps it at ``adapter_modules[<adapter name>]``.

    The module reaches into the base model through hooks it installs in ``attach`` and removes in ``detach``,
    so the model's module tree, and with it every parameter name, stays as it was.
    """

    def attach(self, model: nn.Module) -> None:
        """Install whatever the module needs on ``model`` (hooks); called once when the adapter is added."""

    def detach(self, model: nn.Module) -> None:
        """Undo ``attach``; called when the adapter is deleted or the model unloaded."""

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds, under their checkpoint keys: the module's inference form (a training-time
        reparametrisation is evaluated and left out). After ``materialize`` these are the live parameters."""
        raise NotImplementedError(f"{type(self).__name__} must define checkpoint_tensors.")

    def materialize(self) -> None:
        """Switch to the form ``checkpoint_tensors`` describes, so a checkpoint can be loaded into it."""

    def member(self, method_name: str) -> AdapterModule:
        """The module of member method ``method_name`` (a peft type); a single method's module is its own."""
        return self


class AdapterModuleGroup(AdapterModule):
    """The modules of an adapter made of several methods (a composite), by member peft type."""

    def __init__(self, modules: dict[str, AdapterModule]) -> None:
        super().__init__()
        self.members = nn.ModuleDict(modules)
        owners: dict[str, str] = {}
        with torch.no_grad():  # refused before anything is attached, not at the first save
            for name, module in modules.items():
                for key in module.checkpoint_tensors():
                    if key in owners:
                        raise PeftConfigError(
                            f"Members {owners[key]} and {name} of one adapter both save the checkpoint key {key!r}, "
                            "so its checkpoint could hold only one of them. Add them as two adapters instead."
                        )
                    owners[key] = name

    def member(self, method_name: str) -> AdapterModule:
        return self.members[method_name]

    def attach(self, model: nn.Module) -> None:
        attached: list[AdapterModule] = []
        try:
            for module in self.members.values():
                module.attach(model)
                attached.append(module)
        except BaseException:
            for module in reversed(attached):
                module.detach(model)
            raise

    def detach(self, model: nn.Module) -> None:
        for module in reversed(list(self.members.values())):
            module.detach(model)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for module in self.members.values():  # keys are disjoint (checked in __init__)
            out.update(module.checkpoint_tensors())
        return out

    def materialize(self) -> None:
        for module in self.members.values():
            module.materialize()
