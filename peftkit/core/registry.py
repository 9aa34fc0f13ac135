"""One registry keyed on the config class; the core looks methods up here and never by name.

A method module defines a config dataclass and a :class:`PeftMethod` subclass decorated with
``@register(MyConfig)``. Importing the module (one line in ``peftkit/methods/__init__.py``) is all it takes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.config import PeftConfig
from peftkit.core.errors import PeftConfigError
from peftkit.core.layer import AdapterLayer, AdapterModule

__all__ = ["ForwardCall", "PeftMethod", "register", "method_for", "config_class_for", "registered_peft_types"]

_METHODS: dict[type[PeftConfig], type[PeftMethod]] = {}
_CONFIGS_BY_TYPE: dict[str, type[PeftConfig]] = {}


@dataclass
class ForwardCall:
    """One ``PeftModel.forward`` or ``generate`` call as a method's ``forward_context`` sees it.

    Attributes:
        model: The base model about to run.
        kwargs: Every input by name (positional ones bound to the base model's signature); a method may rewrite
            them, e.g. insert virtual tokens and extend ``attention_mask`` and ``labels`` to match.
        batch_adapter_names: One adapter name per row in a mixed batch, else None.
        generating: True inside ``generate``.
        output_hooks: Functions applied in order to what the base model returns, e.g. to drop virtual positions.
    """

    model: nn.Module
    kwargs: dict[str, Any]
    batch_adapter_names: list[str] | None = None
    generating: bool = False
    output_hooks: list[Callable[[Any], Any]] = field(default_factory=list)


class PeftMethod:
    """The hooks the core calls for one method. All are classmethods; a method holds no state of its own.

    Attributes:
        layer_class: Base class of this method's layers; a module that is an instance already gets the new
            adapter added to it instead of a second wrapper.
        mergeable: Whether ``merge_and_unload`` can fold the method into the base weights.
        supports_mixed_batch: Whether ``forward(adapter_names=...)`` can route rows through this method.
    """

    config_class: ClassVar[type[PeftConfig]]
    layer_class: ClassVar[type[AdapterLayer]]
    mergeable: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    # Names of classmethods ``fn(peft_model, *args)`` reachable as ``peft_model.fn(*args)``.
    model_api: ClassVar[tuple[str, ...]] = ()
    # Prefix of checkpoint keys naming model paths. HF peft wraps the model in a tuner for most methods
    # (``base_model.model.<path>``) but holds it directly for prompt learning (``base_model.<path>``).
    checkpoint_prefix: ClassVar[str] = "base_model.model."

    @classmethod
    def name(cls) -> str:
        return cls.config_class.peft_type

    @classmethod
    def merge_blocker(cls, config: PeftConfig) -> str | None:
        """Why an adapter with ``config`` cannot be merged into the base weights, or None when it can: the
        ``mergeable`` flag, unless an option rules merging out (a gate)."""
        return None if cls.mergeable else f"{config.peft_type} adapters compute on activations, not weights"

    @classmethod
    def members(cls, config: PeftConfig) -> list[PeftConfig]:
        """The configs an adapter of this method consists of: ``[config]``, or a composite's members. The core runs
        each member's hooks on its own, all under the adapter's one name."""
        return [config]

    @classmethod
    def with_members(cls, config: PeftConfig, members: list[PeftConfig]) -> PeftConfig:
        """``config`` with its members replaced by completed ones (the same list ``members`` gave)."""
        return members[0]

    @classmethod
    def default_target_modules(cls, model: nn.Module) -> list[str] | str | None:
        """Targets used when the config gives none (names, or a regex), or None when none can be found."""
        return None

    @classmethod
    def prepare_config(cls, model: nn.Module, config: PeftConfig) -> PeftConfig:
        """Fill config fields that depend on the model and on other fields (e.g. targets chosen by a variant
        field), before the core applies ``default_target_modules``. Returns the config, changed or not."""
        return config

    @classmethod
    def layer_for(cls, target: nn.Module, config: PeftConfig, adapter_name: str, module_name: str) -> AdapterLayer:
        """Wrap ``target`` in a new layer holding ``adapter_name``.

        Raises:
            TargetModuleError: the module type is not supported (the message lists the supported ones).
        """
        raise NotImplementedError(f"{cls.__name__} must implement layer_for to wrap target modules.")

    @classmethod
    def update_layer(cls, layer: AdapterLayer, config: PeftConfig, adapter_name: str, module_name: str) -> None:
        """Add ``adapter_name`` to a layer of this method that already exists."""
        layer.update_layer(adapter_name, config, module_name)  # type: ignore[operator]

    @classmethod
    def inject_beyond_modules(cls, model: nn.Module, config: PeftConfig, adapter_name: str) -> list[str]:
        """Wrap what ``config`` targets besides ``target_modules`` (parameters a module holds directly, rows of an
        embedding) and return the names of the modules wrapped. The walker calls it after wrapping
        ``target_modules``, which may then be empty (HF peft's ``target_modules=[]``)."""
        return []

    @classmethod
    def convert_checkpoint(cls, model: nn.Module, config: PeftConfig, weights: dict[str, torch.Tensor]
                           ) -> dict[str, torch.Tensor]:
        """Checkpoint tensors written for an older layout of ``model``, rekeyed (and reshaped) for the current one;
        called before an adapter's tensors are checked and loaded. Returns ``weights`` unchanged by default."""
        return weights

    @classmethod
    def convert_for_initial_model(cls, config: PeftConfig, tensors: dict[str, torch.Tensor], directory: str
                                  ) -> tuple[dict[str, torch.Tensor], PeftConfig]:
        """``save_pretrained(path_initial_model_for_weight_conversion=directory)``: the checkpoint tensors and config
        of an adapter whose init rewrote the base weights, converted to apply to the original base; ``directory``
        holds the adapter as saved before training. Methods without such inits refuse."""
        raise PeftConfigError(
            f"path_initial_model_for_weight_conversion converts adapters whose init rewrote the base weights; "
            f"{config.peft_type} adapters never do. Drop the argument."
        )

    @classmethod
    def trainable_base_parameters(cls, model: nn.Module, config: PeftConfig) -> list[str]:
        """Names (in ``model``) of existing base parameters the method trains and saves, e.g. biases."""
        return []

    @classmethod
    def before_forward(cls, peft_model: nn.Module, adapter_name: str) -> None:
        """Called by ``PeftModel.forward`` for each active adapter before the base model runs: the place for a
        per-step random draw that every layer must share (checkpointed recomputation does not call it again)."""
        return None

    @classmethod
    def adapter_module(cls, peft_model: nn.Module, config: PeftConfig, adapter_name: str) -> AdapterModule | None:
        """The adapter's parameters that live beside the base model (a prompt table), or None for methods whose
        parameters all sit in wrapped layers."""
        return None

    @classmethod
    @contextlib.contextmanager
    def forward_context(cls, peft_model: nn.Module, adapter_names: list[str], call: ForwardCall) -> Iterator[None]:
        """Wraps one forward or generate call of a model that holds adapters of this method.

        ``adapter_names`` are this method's adapters the call uses (the active ones, or those a mixed batch
        names), empty when adapters are disabled. The method may rewrite ``call.kwargs`` and add output hooks.
        """
        yield

    @classmethod
    def auxiliary_loss(cls, peft_model: nn.Module, adapter_name: str) -> torch.Tensor | None:
        """A regulariser added to the training loss while ``adapter_name`` is active, or None."""
        return None


def register(config_class: type[PeftConfig]) -> Callable[[type[PeftMethod]], type[PeftMethod]]:
    """Class decorator binding a method to its config class.

    Raises:
        ValueError: the config has no ``peft_type`` or it is registered already.
    """

    def decorate(method: type[PeftMethod]) -> type[PeftMethod]:
        peft_type = config_class.peft_type
        if not peft_type or peft_type != peft_type.upper():
            raise ValueError(f"{config_class.__name__}.peft_type must be an upper-case name, got {peft_type!r}.")
        if peft_type in _CONFIGS_BY_TYPE or config_class in _METHODS:
            raise ValueError(f"peft_type {peft_type!r} is registered twice ({config_class.__name__}).")
        method.config_class = config_class
        _METHODS[config_class] = method
        _CONFIGS_BY_TYPE[peft_type] = config_class
        return method

    return decorate


def method_for(config: PeftConfig) -> type[PeftMethod]:
    for klass in type(config).__mro__:
        if klass in _METHODS:
            return _METHODS[klass]
    raise PeftConfigError(
        f"{type(config).__name__} is not a registered method config; use one of "
        f"{sorted(c.__name__ for c in _METHODS)}."
    )


def config_class_for(peft_type: str) -> type[PeftConfig]:
    import peftkit.methods  # noqa: F401  (fills the registry)

    if peft_type not in _CONFIGS_BY_TYPE:
        raise PeftConfigError(f"Unknown peft_type {peft_type!r}; peftkit knows {registered_peft_types()}.")
    return _CONFIGS_BY_TYPE[peft_type]


def registered_peft_types() -> list[str]:
    return sorted(_CONFIGS_BY_TYPE)
