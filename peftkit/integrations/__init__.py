"""Optional integrations with other libraries, imported lazily by the core and the methods.

Names listed in ``_LAZY`` are resolved on first access, so ``import peftkit`` never imports an optional
dependency (bitsandbytes is imported only by the functions that need it).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["dequantize_model", "model_nbytes", "prepare_model_for_kbit_training", "quantize_model"]

_LAZY = {name: "peftkit.integrations.bitsandbytes" for name in __all__}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
