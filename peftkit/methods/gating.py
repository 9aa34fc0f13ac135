"""Learned gates on LoRA, bottleneck adapters and prefixes, as UniPELT uses them (Mao et al. 2022).

UniPELT (https://arxiv.org/abs/2110.07577, Sec. 3.2) multiplies each submodule by its own gate
``G = σ(W_g z + b_g) ∈ (0, 1)``, ``W_g ∈ R^{1×d}``, computed from that submodule's input ``z``:

    LoRA      h = W0 x + G(x)·B A x            (G replaces α/r, so a gated LoRA cannot be merged)
    adapter   A(u) ← G(u)·A(u)                 (u: the adapter's input)
    prefix    P_K, P_V ← G(x)·P_K, G(x)·P_V    (x: the attention module's input)

A member config turns its gate on with ``gate="mean"`` or ``gate="token"`` (None: no gate, the default). ``"mean"``
averages ``σ(W_g z + b_g)`` over the token positions of the forward call, one gate per example, as the authors' code
and AdapterHub ``adapters`` do; padding positions count, as there (the layers do not see the attention mask), and
with a KV cache only the new tokens do. ``"token"`` keeps one gate per token (the paper's equations): no padding
issue, and for a prefix each query scales the prefix keys and values it attends to by its own gate.

The gate ``nn.Linear(d, 1)`` of each wrapped module is one of the member's per-adapter parameters, so it trains,
saves, loads and is deleted with it. ``gate_values(model)`` returns the gates of the last forward call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftkit.core.errors import PeftConfigError
from peftkit.core.inject import adapter_layers
from peftkit.core.layer import AdapterModuleGroup
from peftkit.core.registry import PeftMethod, method_for
from peftkit.core.targets import logical_name

__all__ = [
    "GATE_REDUCTIONS", "GateGroup", "check_gate", "column_scale", "gate", "gate_values", "new_gate", "record",
    "row_gates", "span_gates", "token_gated_attention", "without_unset_gate",
]

GATE_REDUCTIONS = ("mean", "token")

# A column group of a prefix: columns [start, end) of the prefix scaled by gate (rows, tokens or 1, 1).
GateGroup = tuple[int, int, torch.Tensor]


def check_gate(owner: str, value: str | None) -> None:
    if value is not None and value not in GATE_REDUCTIONS:
        raise PeftConfigError(f"{owner}.gate={value!r}; use None (no gate), 'mean' or 'token'.")


def without_unset_gate(out: dict[str, Any]) -> dict[str, Any]:
    """A config dict without ``gate`` when it is off, so ungated checkpoints stay byte-for-byte what they were (and
    what Hugging Face peft writes)."""
    if out.get("gate", "") is None:
        del out["gate"]
    return out


def new_gate(in_features: int, like: torch.Tensor) -> nn.Linear:
    """``nn.Linear(in_features, 1)`` on ``like``'s device and dtype, with ``nn.Linear``'s init (the authors' code and
    AdapterHub's): ``G ≈ 0.5`` at step 0, and LoRA's ``B = 0`` / the adapter's ``W_up = 0`` still give a zero delta."""
    return nn.Linear(in_features, 1, device=like.device, dtype=like.dtype)


def gate(linear: nn.Linear, z: torch.Tensor, reduce: str) -> torch.Tensor:
    """``σ(W_g z + b_g)``: ``(B, ..., 1)`` for ``"token"``; for ``"mean"`` averaged over the token dims (all but the
    first and last) to ``(B, 1, ..., 1)``, which broadcasts over the submodule's output."""
    g = torch.sigmoid(linear(z.to(linear.weight.dtype)))  # (B, ..., 1)
    if reduce == "mean" and g.dim() > 2:
        g = g.mean(dim=tuple(range(1, g.dim() - 1)), keepdim=True)
    return g


def record(store: dict[Any, torch.Tensor], key: Any, g: torch.Tensor) -> None:
    """Keep the last forward's gate for ``gate_values`` (detached: inspection only)."""
    if not torch.compiler.is_compiling():
        store[key] = g.detach().reshape(g.shape[0], -1)


def gate_values(peft_model: nn.Module, adapter_name: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The gates of ``adapter_name`` (default: the first active adapter) in the last forward call.

    Returns ``{member peft_type: {module path: gate}}``, each gate ``(batch, 1)`` for ``"mean"`` or
    ``(batch, tokens)`` for ``"token"``, in ``(0, 1)``; the module path is the wrapped linear (LoRA), the wrapped
    module (adapter) or the attention module (prefix). Rows of a mixed batch that use another adapter are absent.
    """
    name = adapter_name if adapter_name is not None else peft_model.active_adapters[0]
    config = peft_model.peft_config[name]
    out: dict[str, dict[str, torch.Tensor]] = {}
    layers = list(adapter_layers(peft_model.base_model.model))
    for member in method_for(config).members(config):
        klass = getattr(method_for(member), "layer_class", None)
        for path, layer in layers:
            held = getattr(layer, "gate_values", {})
            if klass is not None and isinstance(layer, klass) and name in held:
                out.setdefault(member.peft_type, {})[logical_name(path)] = held[name]
    module = peft_model.adapter_modules[name] if name in peft_model.adapter_modules else None
    if isinstance(module, AdapterModuleGroup):
        modules = dict(module.members.items())
    else:  # one member has a module (or the adapter is that member): the core keeps it ungrouped
        owners = [m.peft_type for m in method_for(config).members(config)
                  if method_for(m).adapter_module.__func__ is not PeftMethod.adapter_module.__func__]
        modules = {owners[0] if owners else config.peft_type: module}
    for peft_type, mod in modules.items():
        if getattr(mod, "gate_values", None):
            out.setdefault(peft_type, {}).update(mod.gate_values)
    return out


# ---- prefixes: which prefix columns each gate scales ----------------------------------------------------------------
def span_gates(modules: list[Any]) -> Callable[[int, torch.Tensor], list[GateGroup]] | None:
    """Active prefix encoders sit one after another in the key columns: each gated one scales its own span."""
    spans, start = [], 0
    for module in modules:
        if module.prefix_gate is not None:
            spans.append((start, start + module.num_virtual_tokens, module))
        start += module.num_virtual_tokens
    if not spans:
        return None
    return lambda slot, hidden: [(s, e, m.gate(slot, hidden)) for s, e, m in spans]


def row_gates(gated: dict[str, Any], rows: list[str], width: int, slot: int, hidden: torch.Tensor) -> list[GateGroup]:
    """A mixed batch: each row's gate is its own adapter's (1 for others); a row sees only its prefix's columns, so
    one group spans them all."""
    repeat = hidden.shape[0] // len(rows)  # generate repeats each row for beams
    names = [name for name in rows for _ in range(repeat)]
    tokens = hidden.shape[1] if any(m.gate_reduce == "token" for m in gated.values()) else 1
    g = hidden.new_ones(hidden.shape[0], tokens, 1, dtype=torch.float32)
    for name, module in gated.items():
        idx = torch.tensor([r for r, n in enumerate(names) if n == name], device=hidden.device, dtype=torch.long)
        if len(idx):
            g[idx] = module.gate(slot, hidden[idx]).float().expand(-1, tokens, -1)
    return [(0, width, g)]


def column_scale(groups: list[GateGroup], n: int, like: torch.Tensor) -> torch.Tensor:
    """``(rows, n)``: each per-example gate on its group's prefix columns, 1 elsewhere."""
    rows = groups[0][2].shape[0]
    parts, at = [], 0
    for start, end, g in sorted(groups, key=lambda grp: grp[0]):
        parts += [like.new_ones(rows, start - at), g[:, 0].to(like.dtype).expand(rows, end - start)]
        at = end
    parts.append(like.new_ones(rows, n - at))
    return torch.cat(parts, dim=1)


def token_gated_attention(
    attend: Callable, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, groups: list[GateGroup], args: tuple, kwargs: dict[str, Any],
) -> Any:
    """``attend`` with per-query gates on prefix columns: query ``t`` sees prefix logits ``g_t·q_t·p_j`` and prefix
    values ``g_t·v_j`` for the columns ``j`` of each group, in one call of the model's own attention function.

    A per-query key scale is no attention the model can run, so the head dim is widened: block 0 pairs ``q`` with
    the keys and values not gated per token, block ``k`` pairs ``g_k·q`` with group ``k``'s prefix columns (zeros
    elsewhere), which gives exactly those logits; the output's block ``k`` is then scaled by ``g_k`` and the blocks
    summed. Costs ``(groups + 1)×`` the attention's matmuls.

    Shapes: ``query (B, H, T, D)``, ``key``/``value (B, H, n + S, D)`` with the prefix first, gates ``(B, T, 1)``.
    """
    d = query.shape[-1]
    if kwargs.get("scaling") is None:  # every implementation's default, from the unwidened head dim
        kwargs = {**kwargs, "scaling": d ** -0.5}
    columns = torch.arange(key.shape[2], device=key.device)
    masks = [(columns >= start) & (columns < end) for start, end, _ in groups]
    rest = ~torch.stack(masks).any(0)
    keys, values, queries = [key * rest[:, None]], [value * rest[:, None]], [query]
    for (_, _, g), cols in zip(groups, masks):
        queries.append(query * g[:, None].to(query.dtype))  # (B, 1, T, 1) scales each query
        keys.append(key * cols[:, None])
        values.append(value * cols[:, None])
    result = attend(module, torch.cat(queries, -1), torch.cat(keys, -1), torch.cat(values, -1), attention_mask,
                    *args, **kwargs)
    out, rest_out = (result[0], result[1:]) if isinstance(result, tuple) else (result, None)
    blocks = out.split(value.shape[-1], dim=-1)  # each (B, T, H, D)
    combined = blocks[0] + sum(g[:, :, None].to(out.dtype) * b for (_, _, g), b in zip(groups, blocks[1:]))
    return (combined, *rest_out) if rest_out is not None else combined
