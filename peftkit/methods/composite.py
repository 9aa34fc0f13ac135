"""Several methods under one adapter name, and the MAM adapter built from them.

A composite adapter is a list of member configs. Each member is injected as if it were added alone, under the
composite's adapter name, and keeps its own parameters; the core runs every member's hooks itself (see
``PeftMethod.members``), so a composite needs no code of its own beyond naming its members. One checkpoint holds
all members' tensors, and ``adapter_config.json`` holds the members' configs nested::

    {"peft_type": "COMPOSITE", "members": [{"peft_type": "LORA", ...}, {"peft_type": "PREFIX_TUNING", ...}]}

MAM adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"): prefix tuning on
every attention, ``n = 30`` virtual tokens reparametrised by one Linear–Tanh–Linear MLP of width 800 while
training, plus a parallel adapter beside every FFN, ``h ← h + s · W_up ReLU(W_down x)`` with ``r = 512``,
``s = 4``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftkit.core.config import PeftConfig
from peftkit.core.errors import PeftConfigError
from peftkit.core.registry import PeftMethod, method_for, register
from peftkit.methods.gating import gate_values
from peftkit.methods.parallel_adapter import ParallelAdapterConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig

__all__ = ["CompositeConfig", "MAMConfig"]


@dataclass(kw_only=True)
class CompositeConfig(PeftConfig):
    """Member configs trained, saved and loaded together as one adapter.

    Args:
        members: The member configs (or their dicts, as read from JSON). Two members of one method would share
            that method's layers under one adapter name, so each method appears once; composites do not nest.
        task_type: Given to every member that has none; the task head is added once, for the composite.
    """

    peft_type: ClassVar[str] = "COMPOSITE"

    members: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        members = [PeftConfig.from_dict(m) if isinstance(m, dict) else m for m in self.members]
        if not members:
            raise PeftConfigError(f"{type(self).__name__} needs at least one member config.")
        for member in members:
            if not isinstance(member, PeftConfig):
                raise PeftConfigError(f"Composite members must be method configs, got {type(member).__name__}.")
            if isinstance(member, CompositeConfig):
                raise PeftConfigError("Composites do not nest; list the inner composite's members instead.")
        kinds = [method_for(m).__name__ for m in members]
        repeated = sorted({k for k in kinds if kinds.count(k) > 1})
        if repeated:
            raise PeftConfigError(
                f"A composite holds each method once (repeated: {repeated}); two members of one method would share "
                "its layers under one adapter name. Use two adapters instead."
            )
        self.members = [
            dataclasses.replace(m, task_type=self.task_type) if m.task_type is None and self.task_type else m
            for m in members
        ]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["members"] = [m.to_dict() for m in self.members]
        return out


@register(CompositeConfig)
class Composite(PeftMethod):
    """A composite adapter's hooks are its members' (run by the core); it only names them."""

    model_api = ("gate_values",)  # gated members (UniPELT)

    @classmethod
    def members(cls, config: PeftConfig) -> list[PeftConfig]:
        assert isinstance(config, CompositeConfig)
        return list(config.members)

    @classmethod
    def with_members(cls, config: PeftConfig, members: list[PeftConfig]) -> PeftConfig:
        return dataclasses.replace(config, members=list(members))

    gate_values = staticmethod(gate_values)  # model.gate_values(): the gates of the last forward call


@dataclass(kw_only=True)
class MAMConfig(CompositeConfig):
    """MAM adapter: prefix tuning (``n`` tokens, Tanh-MLP reparametrisation) on attention and a parallel adapter
    (``r``, scale ``s``) on the FFN.

    Args:
        num_virtual_tokens: Prefix length (30 in the paper).
        prefix_hidden_size: Width of the prefix MLP (800).
        ffn_r: Parallel adapter bottleneck width (512; use less on small models).
        scaling: Parallel adapter scale ``s`` (4).
        members: Filled from the fields above when empty (a saved MAM config lists them).
    """

    peft_type: ClassVar[str] = "MAM"

    num_virtual_tokens: int = 30
    prefix_hidden_size: int = 800
    ffn_r: int = 512
    scaling: float = 4.0

    def __post_init__(self) -> None:
        for name in ("num_virtual_tokens", "prefix_hidden_size", "ffn_r"):  # named here, not as a member's field
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PeftConfigError(f"MAMConfig.{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise PeftConfigError(f"MAMConfig.scaling must be a finite number, got {self.scaling!r}.")
        if not self.members:
            self.members = [
                PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens, prefix_projection=True,
                                   encoder_hidden_size=self.prefix_hidden_size),
                ParallelAdapterConfig(r=self.ffn_r, scaling=self.scaling, target="ffn"),
            ]
        super().__post_init__()


@register(MAMConfig)
class MAM(Composite):
    pass
