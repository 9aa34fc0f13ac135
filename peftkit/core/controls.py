"""Switches and reports of ``PeftModel`` (HF peft's names): enabling and disabling adapter layers, gradients per
adapter, parameter counts and layer status. Kept apart from ``model.py`` so that file holds the wrapper's
structure (adding, activating, routing and merging adapters) alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["AdapterControls"]


class AdapterControls:
    """``PeftModel``'s switches and reports; relies on its ``_layers``, ``_check_known``, ``adapter_modules`` and
    ``_adapters_disabled``."""

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters on or off, active or not (HF peft's ``set_requires_grad``).

        The next ``set_adapter`` / ``add_adapter`` resets trainability to "active adapters only", as in HF peft.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_known(names)
        for name in names:
            self._set_adapter_trainable(name, requires_grad)

    def _set_adapter_trainable(self, name: str, trainable: bool) -> None:
        for _, layer in self._layers():
            layer.set_trainable(name, trainable)
        if name in self.adapter_modules:
            self.adapter_modules[name].requires_grad_(trainable)

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers``: the active adapters apply again."""
        for _, layer in self._layers():
            layer.disable_adapters = False
        self._adapters_disabled = False

    def disable_adapter_layers(self) -> None:
        """Run the base model until ``enable_adapter_layers`` (the lasting form of ``with disable_adapter()``).

        Merged adapters are unmerged first, so the outputs really are the base model's.
        """
        for _, layer in self._layers():
            layer.unmerge()
            layer.disable_adapters = True
        self._adapters_disabled = True

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: ``with model.disable_adapter(): ...``. Merged adapters are unmerged inside."""
        layers = [layer for _, layer in self._layers()]
        previous = [(layer.disable_adapters, list(layer.merged_adapters)) for layer in layers]
        was_disabled = self._adapters_disabled
        try:
            for layer in layers:
                layer.unmerge()
                layer.disable_adapters = True
            self._adapters_disabled = True
            yield
        finally:
            self._adapters_disabled = was_disabled
            known = {id(layer) for layer in layers}
            for _, layer in self._layers():  # layers an add_adapter inside the block made follow the model again
                if id(layer) not in known:
                    layer.disable_adapters = was_disabled
            for layer, (was_disabled, merged) in reversed(list(zip(layers, previous))):
                layer.disable_adapters = was_disabled
                if merged:
                    layer.merge(merged)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; adapter copies of heads count, as in HF peft."""
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        return trainable, total

    def get_layer_status(self) -> list[Any]:
        """Per adapter layer: enabled, active / merged / available adapters, requires_grad, devices (HF's report)."""
        from peftkit.core.status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self) -> Any:
        """The layers' statuses folded into one; disagreeing layers read ``"irregular"`` (HF's report)."""
        from peftkit.core.status import get_model_status

        return get_model_status(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
