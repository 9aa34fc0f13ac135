"""Every method module; importing one registers it (adding a method = one line here)."""

from __future__ import annotations

from peftkit.methods import adalora, lora

__all__ = ["adalora", "lora"]
