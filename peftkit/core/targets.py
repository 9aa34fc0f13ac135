"""Which modules of a model a config targets: exact names, dotted suffixes, regexes, ``"all-linear"``.

Matching runs on the names a user sees in ``model.named_modules()``; modules inside an adapter layer (its
``base_layer`` and adapter weights) are not candidates, so adding a second adapter finds the same names.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterator

from torch import nn

from peftkit.core.errors import TargetModuleError
from peftkit.core.layer import AdapterLayer, base_layer_of

__all__ = [
    "ALL_LINEAR", "candidate_modules", "get_module", "logical_name", "match_targets", "layer_index", "is_linear_like",
]

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
_DEFAULT_LAYER_PATTERNS = ("layers", "layer", "h", "block", "blocks")


def candidate_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` under the names the user sees: an adapter layer is yielded under the name of the module
    it wraps, its own weights are skipped, and the children of the wrapped module keep their names (a layer that
    wraps a whole block must not hide the block's linears from a second method)."""
    for name, child in base_layer_of(model).named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        yield from candidate_modules(child, full)


def logical_name(name: str) -> str:
    """A ``named_modules()`` name with the ``base_layer`` hops of adapter layers removed."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule`` that also accepts names as :func:`candidate_modules` gives them, stepping through
    adapter layers where the next name part belongs to the module they wrap."""
    module = model
    for part in name.split(".") if name else []:
        while part not in module._modules and isinstance(module, AdapterLayer):
            module = module.base_layer
        if part not in module._modules:
            raise AttributeError(f"{type(module).__name__} has no submodule {part!r} (looking up {name!r}).")
        module = module._modules[part]
    return module


def is_linear_like(module: nn.Module) -> bool:
    base = base_layer_of(module)
    if isinstance(base, nn.Linear):
        return True
    # GPT-2's Conv1D is a linear layer with a transposed weight; matched by name to avoid importing transformers.
    return type(base).__name__ == "Conv1D" and hasattr(base, "nf")


def _matches(name: str, pattern: list[str] | str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or _DEFAULT_LAYER_PATTERNS)
    alternatives = "|".join(re.escape(p) for p in patterns)
    found = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def _close_names(key: str, names: list[str]) -> list[str]:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return difflib.get_close_matches(key, leaves, n=5, cutoff=0.5) or difflib.get_close_matches(key, names, n=3)


def match_targets(
    model: nn.Module,
    target_modules: list[str] | str,
    exclude_modules: list[str] | str | None = None,
    layers_to_transform: list[int] | None = None,
    layers_pattern: list[str] | str | None = None,
    skip: set[str] | None = None,
) -> list[str]:
    """Return the names of the modules to wrap, in model order.

    A list needs only one entry that matches (HF peft's rule); the entries that match nothing are logged at debug
    level.

    Raises:
        TargetModuleError: no entry of a target list matches (close names are listed), or nothing is left after
            ``exclude_modules`` / ``layers_to_transform``.
    """
    candidates = list(candidate_modules(model))
    names = [n for n, _ in candidates]
    skip = skip or set()
    if target_modules == ALL_LINEAR:
        head = _output_head_name(model)
        selected = [n for n, m in candidates if is_linear_like(m) and n != head]
    else:
        selected = [n for n in names if _matches(n, target_modules)]
        if isinstance(target_modules, list):
            # HF peft's rule: a list needs one entry that matches. Recipes and checkpoints made for several
            # architectures name modules a given model lacks; wrapping what exists computes what HF peft does.
            missing = [key for key in target_modules if not any(_matches(n, [key]) for n in names)]
            if not selected:
                hints = "; ".join(f"{key!r}: close names {_close_names(key, names)}" for key in missing)
                raise TargetModuleError(
                    f"target_modules {missing} match no module of {type(model).__name__} ({hints}). "
                    "Fix the names; model.named_modules() lists what exists."
                )
            if missing:
                logger.debug("target_modules %s match no module of %s; wrapping the modules the other entries match.",
                             missing, type(model).__name__)
    if exclude_modules:
        selected = [n for n in selected if not _matches(n, exclude_modules)]
    if layers_to_transform is not None:
        selected = [n for n in selected if layer_index(n, layers_pattern) in layers_to_transform]
    selected = [n for n in selected if n not in skip and not any(n.startswith(s + ".") for s in skip)]
    if not selected:
        raise TargetModuleError(
            f"No module of {type(model).__name__} is selected by target_modules={target_modules!r}, "
            f"exclude_modules={exclude_modules!r}, layers_to_transform={layers_to_transform!r}. "
            "Loosen the selection; model.named_modules() lists what exists."
        )
    return selected


def _output_head_name(model: nn.Module) -> str | None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    for name, module in candidate_modules(model):
        if module is head or base_layer_of(module) is head:
            return name
    return None
