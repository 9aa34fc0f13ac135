"""All-or-nothing merges: one structural check before any weight changes, and a rollback if a layer fails anyway.

Adapter layers of different methods nest on one module (each wraps whatever sits at that name), so a stack of
layers shares one weight ``W``. Merging an adapter folds it into ``W``, and every layer between it and ``W`` then
computes with the changed weight. What each layer does to the module it wraps (``AdapterLayer.weight_effect``)::

    add      out = inner(x) + D(x)                     merged as W ← W + ΔW (or b ← b + δ)   low-rank, bias updates
    scale    out = l ⊙ inner(x)  or  inner(l ⊙ x)      merged as rows / columns of W · l      rescaling vectors
    opaque   out = f(inner(x), x), f nonlinear        no weight form                          serial / parallel MLPs

A merge is exact when the layers it crosses commute with it, and only two "add" layers do. So, for a layer ``L``
merging adapters now (stacks are merged innermost first):

1. ``L`` itself must have a weight form (``merge_blocker``: opaque layers, input-dependent gates).
2. Every layer inside ``L`` that keeps unmerged adapters must commute with ``L``. An additive layer added after a
   scaling one computes ``l ⊙ (W x) + ΔW x``; merged alone it would give ``l ⊙ ((W + ΔW) x)``. Merged together,
   the scaling first, it is ``(l ⊙ W + ΔW) x``: exact. ``merge_and_unload`` drops what it does not merge, so there
   rule 2 does not apply.
3. Every layer outside ``L`` holding merged adapters must commute with ``L``: ``L``'s merge would land beneath
   theirs, and ``unmerge_adapter``, which takes outer layers off first, could not give ``W`` back (an additive layer
   merged over a scaling one holds ``l ⊙ W + ΔW``; a second vector ``k`` merged now gives ``k ⊙ (l ⊙ W + ΔW)``,
   from which subtracting ``ΔW`` and dividing by ``k ⊙ l`` is not ``W``).

Unmerged layers outside ``L`` never matter: an exact merge leaves ``L``'s output, all they see, unchanged.

The check reads the structure only, so it refuses before any tensor is touched and names every blocking layer. A
failure it cannot foresee (an exception or a non-finite sum in one layer half-way) is undone from restore points
taken just before each layer changed (``AdapterLayer.merge_restore_point``), so weights come back bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from peftkit.core.errors import NotMergeableError
from peftkit.core.inject import adapter_layers, replace_module
from peftkit.core.layer import AdapterLayer, base_layer_of
from peftkit.core.targets import logical_name

if TYPE_CHECKING:
    from peftkit.core.model import PeftModel

__all__ = ["check_methods_mergeable", "check_merge_structure", "merge_layers", "merge_and_unload_layers"]


def check_methods_mergeable(peft_model: PeftModel, names: list[str]) -> None:
    """Raise if a method of an adapter in ``names`` (a composite's member) has no weight form at all.

    Raises:
        NotMergeableError: naming the adapter and its refusing members.
    """
    for name in names:
        leaves = peft_model._leaves(name)
        reasons = {leaf.peft_type: method.merge_blocker(leaf) for method, leaf in leaves}
        refusing = {kind: why for kind, why in reasons.items() if why}
        if not refusing:
            continue
        if len(leaves) == 1:
            what = next(iter(refusing.values()))
        else:
            mergeable = [kind for kind, why in reasons.items() if not why]
            kind = peft_model.peft_config[name].peft_type
            what = (f"it is a {kind} adapter whose member(s) {list(refusing)} cannot be merged "
                    f"({'; '.join(refusing.values())}); mergeable: {mergeable or 'none'}")
        raise NotMergeableError(
            f"Adapter {name!r} cannot be merged into the base weights: {what}. Use unload() to remove it, or keep "
            "it unmerged."
        )


def _stacks(model: nn.Module) -> list[list[tuple[str, AdapterLayer]]]:
    """Every chain of adapter layers nested through ``base_layer`` on one module, innermost first."""
    layers = list(adapter_layers(model))
    inner = {id(layer.base_layer) for _, layer in layers}
    stacks = []
    for path, layer in layers:
        if id(layer) in inner:
            continue
        chain: list[tuple[str, AdapterLayer]] = []
        module: nn.Module = layer
        while isinstance(module, AdapterLayer):
            chain.append((path, module))
            path, module = f"{path}.base_layer", module.base_layer
        stacks.append(chain[::-1])
    return stacks


def _named(layer: AdapterLayer, names: list[str]) -> str:
    kind = layer.method_name or type(layer).__name__
    return f"{kind}{'' if kind.lower().endswith('adapter') else ' adapter'}(s) {names}"


def _commute(a: AdapterLayer, b: AdapterLayer) -> bool:
    return a.weight_effect == "add" and b.weight_effect == "add"


def _stack_blockers(stack: list[tuple[str, AdapterLayer]], names: list[str], unloading: bool
                    ) -> list[tuple[str, str, str]]:
    """(what would merge, where, why it may not) for each problem of one stack."""
    pending = [layer.pending_merges(names) for _, layer in stack]
    problems = []
    for i, (path, layer) in enumerate(stack):
        if not pending[i]:
            continue
        what, where = _named(layer, pending[i]), logical_name(path)
        reason = layer.merge_blocker(pending[i])
        if reason:
            problems.append((what, where, reason))
            continue
        for j, (_, inner) in enumerate(stack[:i]):
            left = [n for n in inner.adapter_names if n not in inner.merged_adapters and n not in pending[j]]
            if left and not unloading and not _commute(layer, inner):
                problems.append((what, where, (
                    f"added after the {_named(inner, left)} ({type(inner).__name__}) on the same module, it sees "
                    "their output; they stay unmerged, so merging it alone would change what they compute. Merge "
                    "them in the same call, delete them first, or use merge_and_unload (which drops the adapters it "
                    "does not merge)"
                )))
        for outer in (layer for _, layer in stack[i + 1:]):
            if outer.merged_adapters and not _commute(layer, outer):
                problems.append((what, where, (
                    f"the {_named(outer, outer.merged_adapters)} ({type(outer).__name__}) wrapping it on the same "
                    "module are merged already, and this merge would land beneath theirs. Call unmerge_adapter(), "
                    "then merge them all in one call"
                )))
    return problems


def check_merge_structure(model: nn.Module, names: list[str], unloading: bool = False) -> None:
    """Raise if merging ``names`` would not give exactly the unmerged outputs; reads no tensor, changes nothing.

    Args:
        model: The base model holding the adapter layers.
        names: The adapters to merge.
        unloading: ``merge_and_unload``: the adapters left unmerged are dropped with their layers.

    Raises:
        NotMergeableError: naming every blocking layer and why.
    """
    grouped: dict[tuple[str, str], list[str]] = {}
    for stack in _stacks(model):
        for what, where, why in _stack_blockers(stack, names, unloading):
            grouped.setdefault((what, why), []).append(where)
    if grouped:
        lines = [f"{what} into {_show(wheres)}: {why}" for (what, why), wheres in grouped.items()]
        raise NotMergeableError(
            f"Cannot merge adapter(s) {names}; {sum(map(len, grouped.values()))} layer(s) would compute something "
            "else merged:\n  - " + "\n  - ".join(lines) + "\nNothing was merged; every weight is unchanged."
        )


def _check_no_shared_parameter_written(peft_model: PeftModel, names: list[str]) -> None:
    """Raise if merging ``names`` would write a base parameter that another adapter trains and saves as its own
    (e.g. layer norms): that adapter's tensors, and its next checkpoint, would then hold the merged delta."""
    model = peft_model.base_model.model
    written = {id(param): f"{logical_name(path)}.{key}" for path, layer in adapter_layers(model)
               if layer.pending_merges(names) for key, param in base_layer_of(layer).named_parameters(recurse=False)}
    clashes: dict[str, list[str]] = {}
    for other in (n for n in peft_model.peft_config if n not in names):
        for method, leaf in peft_model._leaves(other):
            for name in method.trainable_base_parameters(model, leaf):
                where = written.get(id(model.get_parameter(name)))
                if where is not None:
                    clashes.setdefault(other, []).append(where)
    if clashes:
        other, wheres = next(iter(clashes.items()))
        raise NotMergeableError(
            f"Cannot merge adapter(s) {names}: the merge would write {_show(sorted(wheres))}, base parameter(s) that "
            f"adapter(s) {sorted(clashes)} train and save as their own, so their tensors and checkpoints would "
            f"then hold the merged update. Delete {other!r} first, merge_and_unload() (which drops the adapters it "
            "does not merge), or keep them unmerged. Nothing was merged; every weight is unchanged."
        )


def _show(paths: list[str], limit: int = 4) -> str:
    return ", ".join(paths[:limit]) + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")


def _merge_order(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    # ``named_modules`` lists a module before its children: reversed, every layer comes after those it wraps, so an
    # outer layer merges into a weight that already holds the inner merges (rule 2 of the module docstring).
    return list(reversed(list(adapter_layers(model))))


def _all_or_nothing(model: nn.Module, names: list[str], safe: bool,
                    step: Callable[[str, AdapterLayer], nn.Module]) -> None:
    """Run ``step`` (which merges one layer and returns the module now holding its weights) on every layer, innermost
    first; if any raises, put every layer back. ``safe``: a non-finite merged weight raises too (the per-layer
    checks before ran on each layer alone; stacked layers compose here)."""
    restores: list[Callable[[], None]] = []
    done: list[tuple[str, AdapterLayer]] = []
    path = ""
    try:
        for path, layer in _merge_order(model):
            pending = layer.pending_merges(names)
            if pending:
                restores.append(layer.merge_restore_point())
            merged = step(path, layer)
            done.append((path, layer))
            if safe and pending and not all(p.isfinite().all() for p in merged.parameters(recurse=False)):
                raise ValueError(f"Merging {pending} into {logical_name(path)} gives non-finite weights (stacked "
                                 "adapters overflow the dtype). Nothing was merged.")
    except BaseException as exc:
        for done_path, layer in reversed(done):  # merge_and_unload: put the layers back where they were
            if _module_at(model, done_path) is not layer:
                replace_module(model, done_path, layer)
        for restore in reversed(restores):
            restore()
        exc.add_note(f"peftkit: merging {names} failed in {logical_name(path)}; every layer was put back as it "
                     "was, nothing is merged.")
        raise


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def merge_layers(peft_model: PeftModel, names: list[str], safe: bool = False) -> None:
    """Fold ``names`` into the weights of every layer holding them (``merge_adapter``), or change nothing.

    Raises:
        NotMergeableError: a method or a layer blocks the merge (the checks above), before anything changes.
        ValueError: ``safe`` and an adapter gives non-finite weights; nothing changes.
    """
    check_methods_mergeable(peft_model, names)
    model = peft_model.base_model.model
    check_merge_structure(model, names)
    _check_no_shared_parameter_written(peft_model, names)
    if safe:  # every sum checked before the first write
        for _, layer in _merge_order(model):
            layer.check_merge(names)
    def merge(path: str, layer: AdapterLayer) -> nn.Module:
        layer.merge(names)
        return layer.get_base_layer()

    _all_or_nothing(model, names, safe, merge)


def merge_and_unload_layers(peft_model: PeftModel, names: list[str], safe: bool = False, dequantize: bool = False
                            ) -> None:
    """Replace every adapter layer by its base module with ``names`` merged (``merge_and_unload``), or change nothing.

    Raises:
        NotMergeableError, ValueError: as :func:`merge_layers`.
    """
    check_methods_mergeable(peft_model, names)
    model = peft_model.base_model.model
    check_merge_structure(model, names, unloading=True)
    if safe:
        for _, layer in _merge_order(model):
            layer.check_merge(names)

    def unwrap(path: str, layer: AdapterLayer) -> nn.Module:
        module = layer.merged_module(names, dequantize=dequantize)
        replace_module(model, path, module)
        return base_layer_of(module)

    _all_or_nothing(model, names, safe, unwrap)
