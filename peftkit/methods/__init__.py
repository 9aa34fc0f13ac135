"""Every method module; importing one registers it (adding a method = one line here)."""

from __future__ import annotations

from peftkit.methods import adalora, adapters, bitfit, bottleneck, fusion, ia3, lora, parallel_adapter

__all__ = ["adalora", "adapters", "bitfit", "bottleneck", "fusion", "ia3", "lora", "parallel_adapter"]
