"""``PeftType``: HF peft's string enum of method names, built from the methods registered in peftkit.

Built from the registry rather than written out, so it lists exactly the methods peftkit implements (a method
HF peft has and peftkit lacks is absent, not a name that fails later) and a new method file adds its member.
A member equals its string: ``config.peft_type == PeftType.LORA`` and ``PeftType("LORA")`` both work.
"""

from __future__ import annotations

import enum

from peftkit import methods  # noqa: F401  (registers every method)
from peftkit.core.registry import registered_peft_types

__all__ = ["PeftType"]


class _StrEnum(str, enum.Enum):
    def __str__(self) -> str:
        return self.value


PeftType = _StrEnum("PeftType", {name: name for name in registered_peft_types()})
PeftType.__doc__ = "The peft_type of every method peftkit implements (HF peft's names where HF has the method)."
