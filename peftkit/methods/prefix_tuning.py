"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): learned keys and values in every attention.

Each attention module ``i`` gets ``P_K^i, P_V^i ∈ R^{n×d}`` in front of its keys and values,
``softmax(q [P_K; K]ᵀ / √d) [P_V; V]``, and the attention mask gains n always-visible columns. With
``prefix_projection`` the prefixes are ``MLP(P′)`` (Linear–Tanh–Linear) while training; the checkpoint stores the
MLP's output only (HF peft's ``prompt_embeddings``), so a loaded adapter needs no MLP.

How it attaches: transformers 5 models call one attention function through its ``AttentionInterface``, after the
key/value projections, rotary embeddings and the cache. Each attention module found gets a private copy of its
config naming peftkit's attention function, which concatenates the module's prefix and calls the model's own
implementation (``eager`` or ``sdpa``). This needs no cache, so it works where HF peft's past-key-values route
does not (encoders such as BERT, encoder self-attention of T5/BART) and under gradient checkpointing, and it
leaves the model's cache holding real tokens only.

Positions: the real tokens of a decoder-only or encoder model take positions ``n, n+1, ...`` as if the prefix
were n earlier tokens, which is what HF peft's past-key-values route (and P-tuning v2's reference code) gives, so
checkpoints give the same logits in both libraries. Encoder-decoder models keep their positions (T5's relative
bias gives the prefix columns no bias).

Gated prefixes (``gate``, UniPELT): ``P_K, P_V ← G(x)·P_K, G(x)·P_V`` with ``G(x) = σ(W_g x + b_g)`` of the attention
module's input ``x``, one ``Linear(d, 1)`` per attention module. A forward pre-hook on each attention module (installed
while a gated prefix is attached) computes the gate before the module's attention runs (:mod:`peftkit.methods.gating`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.errors import PeftConfigError
from peftkit.core.layer import AdapterModule
from peftkit.core.registry import ForwardCall, PeftMethod, register
from peftkit.core.targets import logical_name
from peftkit.integrations.transformers import forward_position_ids
from peftkit.methods.gating import (
    GateGroup,
    check_gate,
    column_scale,
    gate,
    gate_values,
    new_gate,
    record,
    row_gates,
    span_gates,
    token_gated_attention,
    without_unset_gate,
)
from peftkit.methods.prompt_learning import (
    PromptLearningConfig,
    accepts_input,
    acquire_router,
    model_dims,
    release_router,
)

__all__ = ["PrefixTuningConfig", "PTuningV2Config", "PrefixEncoder", "attention_modules"]

PREFIX_ATTENTION = "peftkit_prefix"
_ROUTER_ATTR = "_peftkit_prefix_router"
_SUPPORTED_IMPLEMENTATIONS = (None, "eager", "sdpa")


@dataclass(kw_only=True)
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning.

    Args:
        num_virtual_tokens: Prefix length n (METHODS.md default 20).
        prefix_projection: Train through the Linear–Tanh–Linear reparametrisation.
        encoder_hidden_size: Hidden width of that MLP (None: ``token_dim``).
        init_weights: None (N(0, 1), as ``nn.Embedding``) or ``"zero"`` (zero prefixes, or a zero last MLP layer),
            HF peft's two options.
        gate: None (default), ``"mean"`` or ``"token"``: scale each attention module's prefix keys and values by
            UniPELT's learned gate ``G(x) = σ(W_g x + b_g)`` of the module's input (averaged over tokens, or per query
            token). Left out of the saved config when None.
    """

    peft_type = "PREFIX_TUNING"

    encoder_hidden_size: int | None = 512
    prefix_projection: bool = False
    init_weights: str | None = None
    gate: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise PeftConfigError(f"init_weights={self.init_weights!r}; use None (random) or 'zero'.")
        check_gate(type(self).__name__, self.gate)

    def to_dict(self) -> dict[str, Any]:
        return without_unset_gate(super().to_dict())


@dataclass(kw_only=True)
class PTuningV2Config(PrefixTuningConfig):
    """P-tuning v2: deep prompts (prefix keys/values in every layer) without reparametrisation, for NLU with the
    model's own head: sequence classification on [CLS] / the pooled output (``task_type="SEQ_CLS"``), sequence
    labelling on every token (``"TOKEN_CLS"``; no positions are added, so labels stay aligned)."""

    peft_type = "P_TUNING_V2"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefix_projection:
            raise PeftConfigError(
                "P-tuning v2 has no reparametrisation; use PrefixTuningConfig(prefix_projection=True) for that."
            )


@functools.cache
def _calls_attention_interface(klass: type) -> bool:
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(klass.forward)
    except (OSError, TypeError):
        return False


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that run attention through transformers' attention interface, in model order."""
    from transformers import PretrainedConfig, PreTrainedModel

    return [
        (name, module) for name, module in model.named_modules()
        if not isinstance(module, PreTrainedModel)
        and isinstance(getattr(module, "config", None), PretrainedConfig)
        and _calls_attention_interface(type(module))
    ]


class PrefixEncoder(AdapterModule):
    """Prefixes of every attention module: ``(n, slots · 2 · token_dim)``, or ``MLP(P′)`` with projection; with a
    gate, ``prefix_gate[i]`` (``Linear(hidden_size, 1)``, saved as ``prefix_gate.<i>.*``) of attention module ``i``.
    """

    def __init__(self, config: PrefixTuningConfig, slots: int, device: torch.device, hidden_size: int | None = None
                 ) -> None:
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.slots = slots
        self.num_heads = config.num_attention_heads
        self.head_dim = config.token_dim // config.num_attention_heads
        width = slots * 2 * config.token_dim
        self.transform: nn.Sequential | None = None
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or config.token_dim
            self.embedding = nn.Embedding(self.num_virtual_tokens, config.token_dim, device=device)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, hidden, device=device), nn.Tanh(), nn.Linear(hidden, width, device=device)
            )
            zeroed = [self.transform[-1].weight, self.transform[-1].bias]
        else:
            self.embedding = nn.Embedding(self.num_virtual_tokens, width, device=device)
            zeroed = [self.embedding.weight]
        if config.init_weights == "zero":
            for param in zeroed:
                nn.init.zeros_(param)
        self.gate_reduce = config.gate
        self.prefix_gate: nn.ModuleList | None = None
        if config.gate is not None:
            like = self.embedding.weight
            self.prefix_gate = nn.ModuleList(new_gate(hidden_size or config.token_dim, like) for _ in range(slots))
        self.slot_names: list[str] = []
        self.gate_values: dict[str, torch.Tensor] = {}  # the last forward's gates, for gate_values()

    def gate(self, slot: int, hidden: torch.Tensor) -> torch.Tensor:
        """``G(x)`` of attention module ``slot`` from its input ``x (B, T, d)``: ``(B, 1, 1)`` or ``(B, T, 1)``."""
        assert self.prefix_gate is not None and self.gate_reduce is not None
        g = gate(self.prefix_gate[slot], hidden, self.gate_reduce)
        record(self.gate_values, self.slot_names[slot] if self.slot_names else str(slot), g)
        return g.reshape(g.shape[0], -1, 1)

    def prefix_table(self) -> torch.Tensor:
        table = self.embedding.weight
        return table if self.transform is None else self.transform(table)

    def prefix_states(self) -> torch.Tensor:
        """``(slots · 2, heads, n, head_dim)``: entry ``2i`` is slot i's keys, ``2i + 1`` its values."""
        table = self.prefix_table()
        return table.view(self.num_virtual_tokens, self.slots * 2, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def slot_states(self, slot: int) -> torch.Tensor:
        """``(2, heads, n, head_dim)``: slot ``slot``'s keys and values, computed from the parameters alone.

        Reentrant gradient checkpointing runs a nested backward per layer through whatever the layer used; each
        layer computing its own slot (the projection's last layer restricted to the slot's rows) keeps those
        graphs apart, where one shared MLP output would be freed by the first layer's backward.
        """
        width = 2 * self.num_heads * self.head_dim
        rows = slice(slot * width, (slot + 1) * width)
        if self.transform is None:
            table = self.embedding.weight[:, rows]
        else:
            hidden = self.transform[1](self.transform[0](self.embedding.weight))
            last = self.transform[2]
            table = nn.functional.linear(hidden, last.weight[rows], last.bias[rows])
        return table.view(self.num_virtual_tokens, 2, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            table = {"prompt_embeddings": self.prefix_table()}
        if self.prefix_gate is not None:  # live parameters: loading copies into them
            table.update({f"prefix_gate.{k}": v for k, v in self.prefix_gate.state_dict(keep_vars=True).items()})
        return table

    def materialize(self) -> None:
        if self.transform is None:
            return
        with torch.no_grad():
            table = self.prefix_table().detach().clone()
        self.embedding = nn.Embedding.from_pretrained(table, freeze=not self.embedding.weight.requires_grad)
        self.transform = None

    def attach(self, model: nn.Module) -> None:
        router = acquire_router(model, _ROUTER_ATTR, _PrefixRouter)
        if len(router.slots) != self.slots:
            release_router(model, _ROUTER_ATTR)
            raise PeftConfigError(
                f"The prefix has {self.slots} attention slots but the model has {len(router.slots)} attention "
                "modules."
            )
        self.slot_names = [logical_name(name) for name, _, _ in router.slots]
        if self.prefix_gate is not None:
            router.watch_inputs(+1)

    def detach(self, model: nn.Module) -> None:
        router = model.__dict__.get(_ROUTER_ATTR)
        if router is not None and self.prefix_gate is not None:
            router.watch_inputs(-1)
        release_router(model, _ROUTER_ATTR)


@dataclass
class _PrefixState:
    slot: Callable[[int], torch.Tensor]  # slot index -> (rows or 1, 2, heads, n, head_dim)
    valid: torch.Tensor | None  # (rows, n) bool, None when every row sees the whole prefix
    # (slot index, attention input (rows, T, d)) -> gated column groups; None when no gated prefix is in play
    gates: Callable[[int, torch.Tensor], list[GateGroup]] | None = None


class _Slot:
    def __init__(self, router: _PrefixRouter, index: int, name: str, config: Any, eager: Callable) -> None:
        self.router, self.index, self.name, self.config, self.eager = router, index, name, config, eager
        self.gates: list[GateGroup] | None = None  # this call's gates, set by the router's input hook

    def implementation(self) -> Callable:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        impl = self.config._attn_implementation
        return self.eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]


class _PrefixRouter:
    """Points every attention module of one model at peftkit's attention function while prefixes are attached."""

    def __init__(self, model: nn.Module) -> None:
        _register_attention_function()
        found = attention_modules(model)
        if not found:
            raise PeftConfigError(
                f"{type(model).__name__} has no attention module that calls transformers' attention interface; "
                "prefix methods need a transformers 5 model."
            )
        unsupported = sorted({str(m.config._attn_implementation) for _, m in found}
                             - {str(i) for i in _SUPPORTED_IMPLEMENTATIONS})
        if unsupported:
            raise PeftConfigError(
                f"Prefix methods run with attn_implementation 'eager' or 'sdpa'; the model uses {unsupported}. "
                "Load it with attn_implementation='sdpa'."
            )
        self.users = 0
        self.gate_users = 0
        self.input_hooks: list[Any] = []
        self.state: _PrefixState | None = None
        self.slots: list[tuple[str, nn.Module, Any]] = []
        for index, (name, module) in enumerate(found):
            eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if eager is None and module.config._attn_implementation in (None, "eager"):
                raise PeftConfigError(f"{type(module).__name__} ({name}) has no eager attention function to wrap.")
            original = module.config
            view = copy.copy(original)
            object.__setattr__(view, "_attn_implementation_internal", PREFIX_ATTENTION)
            module.config = view
            module.__dict__["_peftkit_prefix_slot"] = _Slot(self, index, name, original, eager)
            self.slots.append((name, module, original))

    def watch_inputs(self, change: int) -> None:
        """Count gated prefixes; while there are any, a pre-hook on each attention module hands its input to them."""
        self.gate_users += change
        if self.gate_users > 0 and not self.input_hooks:
            self.input_hooks = [module.register_forward_pre_hook(self._gate_inputs, with_kwargs=True)
                                for _, module, _ in self.slots]
        elif self.gate_users == 0:
            for hook in self.input_hooks:
                hook.remove()
            self.input_hooks = []

    def _gate_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        slot: _Slot = module.__dict__["_peftkit_prefix_slot"]
        gates = None if self.state is None else self.state.gates
        slot.gates = None if gates is None else gates(slot.index, args[0] if args else kwargs["hidden_states"])

    def remove(self) -> None:
        self.watch_inputs(-self.gate_users)
        for _, module, original in self.slots:
            module.config = original
            module.__dict__.pop("_peftkit_prefix_slot", None)
        self.slots = []
        self.state = None


_registered = False


def _register_attention_function() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
        _registered = True


def prefix_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any,
) -> Any:
    """The model's own attention with this module's prefix in front of ``key`` and ``value``."""
    slot: _Slot = module.__dict__["_peftkit_prefix_slot"]
    attend = slot.implementation()
    state = slot.router.state
    if state is None:
        return attend(module, query, key, value, attention_mask, *args, **kwargs)
    rows, q_len, kv_len = key.shape[0], query.shape[2], key.shape[2]
    pair = _rows(state.slot(slot.index), rows)
    prefix_k, prefix_v = pair[:, 0], pair[:, 1]
    if prefix_k.shape[1] != key.shape[1] or prefix_k.shape[3] != key.shape[3]:
        raise ValueError(
            f"The prefix has {prefix_k.shape[1]} heads of width {prefix_k.shape[3]} but {slot.name} computes keys "
            f"with {key.shape[1]} heads of width {key.shape[3]}; set num_attention_heads and token_dim in the config."
        )
    n = prefix_k.shape[2]
    groups = (slot.gates or []) if state.gates is not None else []  # set by the router's input hook this call
    token_groups = [grp for grp in groups if grp[2].shape[1] > 1]  # per query: token_gated_attention below
    if len(token_groups) < len(groups):  # a gate per row scales its columns of P_K and P_V
        scale = column_scale([grp for grp in groups if grp[2].shape[1] == 1], n, prefix_k)  # (rows, n)
        prefix_k, prefix_v = prefix_k * scale[:, None, :, None], prefix_v * scale[:, None, :, None]
    key = torch.cat([prefix_k.to(key.dtype), key], dim=2)
    value = torch.cat([prefix_v.to(value.dtype), value], dim=2)
    valid = None if state.valid is None else _rows(state.valid, rows)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else causal
    additive = attend is slot.eager
    attention_mask = _extend_mask(attention_mask, valid, rows, n, q_len, kv_len, causal, additive, query)
    if kwargs.get("position_bias") is not None:
        kwargs["position_bias"] = nn.functional.pad(kwargs["position_bias"], (n, 0))
    if token_groups:
        return token_gated_attention(attend, module, query, key, value, attention_mask, token_groups, args, kwargs)
    return attend(module, query, key, value, attention_mask, *args, **kwargs)


def _rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(rows, *tensor.shape[1:])
    # generate repeats each row for beams and return sequences with repeat_interleave
    return tensor.repeat_interleave(rows // tensor.shape[0], dim=0)


def _extend_mask(
    mask: torch.Tensor | None, valid: torch.Tensor | None, rows: int, n: int, q_len: int, kv_len: int,
    causal: bool, additive: bool, query: torch.Tensor,
) -> torch.Tensor | None:
    if mask is None:
        if valid is None and not (causal and q_len > 1):
            return None  # every query sees every key, prefix included
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
        if causal:  # bottom-right aligned: the last query sees every key
            allowed = torch.tril(allowed, diagonal=kv_len - q_len)
        mask = allowed.expand(rows, 1, q_len, kv_len)
        if additive:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
    mask = mask[..., :kv_len]
    shape = (max(mask.shape[0], rows), mask.shape[1], mask.shape[2])
    seen = torch.ones(rows, n, dtype=torch.bool, device=mask.device) if valid is None else valid
    seen = seen[:, None, None, :].expand(*shape, n)
    if mask.dtype == torch.bool:
        prefix_part = seen
    else:
        prefix_part = torch.zeros(seen.shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~seen, torch.finfo(mask.dtype).min)
    return torch.cat([prefix_part, mask.expand(*shape, kv_len)], dim=-1)


def _past_length(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0


@register(PrefixTuningConfig)
class PrefixTuning(PeftMethod):
    mergeable = False
    supports_mixed_batch = True
    checkpoint_prefix = "base_model."
    model_api = ("gate_values",)

    @classmethod
    def prepare_config(cls, model: nn.Module, config: Any) -> Any:
        config = model_dims(model, config)
        model_config = getattr(model, "config", None)
        kv_heads = getattr(model_config, "num_key_value_heads", None)
        head_dim = getattr(model_config, "head_dim", None) or getattr(model_config, "d_kv", None)
        changes: dict[str, Any] = {}
        if head_dim and config.token_dim != head_dim * config.num_attention_heads:
            changes["token_dim"] = head_dim * config.num_attention_heads
        if kv_heads and kv_heads != config.num_attention_heads:  # grouped-query attention: prefixes per kv head
            head_dim = head_dim or config.token_dim // config.num_attention_heads
            changes.update(num_attention_heads=kv_heads, token_dim=head_dim * kv_heads)
        config = dataclasses.replace(config, **changes) if changes else config
        if config.token_dim % config.num_attention_heads:
            raise PeftConfigError(
                f"{type(config).__name__}: token_dim={config.token_dim} is not a multiple of num_attention_heads="
                f"{config.num_attention_heads}, so the prefix cannot be split into heads. Leave both None to read "
                "them from the model."
            )
        return config

    @classmethod
    def adapter_module(cls, peft_model: Any, config: PrefixTuningConfig, adapter_name: str) -> PrefixEncoder:
        model = peft_model.get_base_model()
        slots = len(attention_modules(model))
        device = next(model.parameters()).device
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)  # the attention input's width
        return PrefixEncoder(config, slots, device, hidden)

    gate_values = staticmethod(gate_values)  # model.gate_values(): the gates of the last forward call

    @classmethod
    @contextlib.contextmanager
    def forward_context(cls, peft_model: Any, adapter_names: list[str], call: ForwardCall) -> Iterator[None]:
        router: _PrefixRouter | None = call.model.__dict__.get(_ROUTER_ATTR)
        if router is None:
            yield
            return
        router.state, offsets = _build_state(peft_model, cls, adapter_names, call)
        if router.state is not None:
            _shift_positions(call, offsets)
        try:
            yield
        finally:
            # Gradient checkpointing recomputes attention during backward, after forward returned: a training
            # step keeps its prefixes until the next call. Anything else drops them now.
            if call.generating or not (call.model.training and torch.is_grad_enabled()):
                router.state = None


def _build_state(
    peft_model: Any, method: type[PeftMethod], adapter_names: list[str], call: ForwardCall
) -> tuple[_PrefixState | None, torch.Tensor | None]:
    if not adapter_names:
        return None, None
    modules = [peft_model.adapter_module(name, method) for name in adapter_names]
    rows = call.batch_adapter_names
    if rows is None:  # several active prefix adapters: their prefixes line up one after the other
        length = torch.tensor([sum(m.num_virtual_tokens for m in modules)])
        gates = span_gates(modules)
        if call.model.training and torch.is_grad_enabled():
            return _PrefixState(lambda i: torch.cat([m.slot_states(i) for m in modules], dim=2).unsqueeze(0),
                                None, gates), length
        states = torch.cat([m.prefix_states() for m in modules], dim=2)  # once per call, e.g. per generate
        return _PrefixState(lambda i: states[2 * i:2 * i + 2].unsqueeze(0), None, gates), length
    states = {name: module.prefix_states() for name, module in zip(adapter_names, modules)}
    width = max(s.shape[2] for s in states.values())
    template = next(iter(states.values()))
    kv = template.new_zeros(len(rows), template.shape[0], template.shape[1], width, template.shape[3])
    valid = torch.zeros(len(rows), width, dtype=torch.bool, device=template.device)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    for row, name in enumerate(rows):
        if name in states:
            n = states[name].shape[2]
            kv[row, :, :, width - n:] = states[name]
            valid[row, width - n:] = True
            lengths[row] = n
    gated = {name: m for name, m in zip(adapter_names, modules) if m.prefix_gate is not None}
    gates = functools.partial(row_gates, gated, rows, width) if gated else None
    return _PrefixState(lambda i: kv[:, 2 * i:2 * i + 2], valid, gates), lengths


def _shift_positions(call: ForwardCall, offsets: torch.Tensor) -> None:
    """Number the real tokens as if the prefix were n earlier tokens (see the module docstring)."""
    kwargs, model = call.kwargs, call.model
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) or kwargs.get("position_ids") is not None:
        return
    if not accepts_input(model, "position_ids"):
        return
    ids = kwargs.get("input_ids")
    inputs = ids if ids is not None else kwargs.get("inputs_embeds")
    if inputs is None:
        return
    length = inputs.shape[1]
    mask = kwargs.get("attention_mask")
    offsets = offsets.to(inputs.device).view(-1, 1)
    if call.generating and mask is not None and mask.dim() == 2:
        positions, counted = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0), None  # generate's numbering
    else:
        mask = mask if mask is not None and mask.dim() == 2 else None
        positions, counted = forward_position_ids(model, ids, mask, length, _past_length(kwargs))
        if counted is None and mask is not None:
            # The model counts up whatever the padding; rows with a prefix count real tokens instead, as generate
            # does, so training and generation agree and a left-padded row equals its unpadded run (the prefix keys
            # carry no rotary position, so absolute query positions matter).
            aware = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -length:]
            positions = torch.where(offsets > 0, aware, positions)
    shift = offsets if counted is None else offsets * counted
    # One row per input row: generate repeats them for beams and would otherwise keep a single row.
    kwargs["position_ids"] = (positions + shift).expand(inputs.shape[0], -1).contiguous()


@register(PTuningV2Config)
class PTuningV2(PrefixTuning):
    pass
