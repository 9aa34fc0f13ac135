"""``peft_model.base_model``: the holder that makes parameter names read ``base_model.model.<path>`` as in HF peft,
and answers the tuner calls HF scripts make on it."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["BaseModelHost"]


class BaseModelHost(nn.Module):
    """Holds the user's model as ``.model`` so names read ``base_model.model.<path>`` as in HF peft."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
        # HF scripts call the tuner's API on ``peft_model.base_model`` (``update_and_allocate``,
        # ``disable_adapter_layers``, ``merge_and_unload``, ...); in peftkit the PeftModel holds it.
        owner = self.__dict__.get("_owner")
        peft_model = owner() if owner is not None else None
        if peft_model is not None:
            if name in _TUNER_API:
                return getattr(peft_model, name)
            bound = peft_model._model_api(name)
            if bound is not None:
                return bound
        return getattr(self.model, name)


# What HF peft's tuner (``peft_model.base_model``) offers that peftkit keeps on the PeftModel itself.
_TUNER_API = frozenset({
    "active_adapter", "active_adapters", "peft_config", "add_adapter", "set_adapter", "delete_adapter",
    "enable_adapter_layers", "disable_adapter_layers", "merge_adapter", "unmerge_adapter", "merge_and_unload",
    "unload", "set_requires_grad", "get_layer_status", "get_model_status",
})
