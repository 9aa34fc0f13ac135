"""Trainable tokens: train a few rows of an embedding matrix (new or re-purposed tokens), nothing else.

HF peft's ``TrainableTokensConfig`` (``peft_type="TRAINABLE_TOKENS"``) and LoRA's ``trainable_token_indices``, which
TRL sets when it adds chat-template tokens. The layer keeps the chosen rows as a trainable ``(n, dim)`` tensor and
runs the embedding with them written over the frozen matrix::

    E'[i] = Δ[k]  if i = token_indices[k],  else E[i]          E (vocab, dim), Δ (n, dim), initialised to E[indices]

so the adapter is a no-op until trained, and only ``Δ`` gets gradients. Replacing rows rather than adding deltas
keeps the result defined when a resized vocabulary's new rows are re-initialised at random (HF's reasoning).
An output layer tied to the input embedding (GPT-2's ``lm_head``) gets a tied layer that reads the same ``Δ``, so the
two stay tied. Checkpoint keys are HF's: ``<embedding>.trainable_tokens_delta`` for the standalone method,
``<embedding>.token_adapter.trainable_tokens_delta`` inside a LoRA adapter (HF's ``TrainableTokensWrapper``); a tied
layer saves the same tensor again standalone and nothing inside LoRA, as HF does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.config import PeftConfig, TunerConfig
from peftkit.core.errors import PeftConfigError, TargetModuleError
from peftkit.core.inject import replace_module
from peftkit.core.layer import AdapterLayer, base_layer_of
from peftkit.core.registry import PeftMethod, register
from peftkit.core.targets import candidate_modules, get_module

__all__ = ["TrainableTokensConfig", "TrainableTokensLayer", "TrainableTokensMethod", "inject_token_rows"]

# HF's TrainableTokensWrapper holds the layer as ``token_adapter``; LoRA checkpoints name it in their keys.
LORA_KEY_PREFIX = "token_adapter."


@dataclass(kw_only=True)
class TrainableTokensConfig(TunerConfig):
    """Trainable embedding rows, with HF peft's names and defaults.

    Args:
        token_indices: Rows (token ids) to train; the others stay frozen.
        target_modules: The embedding layer(s); None: the model's input embedding (``get_input_embeddings()``).
        init_weights: True (default): start from the current rows (a no-op until trained). False: random rows.

    Raises:
        PeftConfigError: ``token_indices`` is empty or holds negative or repeated ids.
    """

    peft_type: ClassVar[str] = "TRAINABLE_TOKENS"

    token_indices: list[int] = field(default_factory=list)
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_token_indices("TrainableTokensConfig.token_indices", self.token_indices)


def check_token_indices(field_name: str, indices: list[int]) -> None:
    """Raise ``PeftConfigError`` naming ``field_name`` unless ``indices`` is a non-empty list of distinct ids ≥ 0."""
    if not indices:
        raise PeftConfigError(f"{field_name} is empty; list the token ids whose embedding rows should train.")
    if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise PeftConfigError(f"{field_name} must hold distinct non-negative token ids, got {indices}.")


class TrainableTokensLayer(AdapterLayer):
    """Rows ``token_indices`` of an ``nn.Embedding`` (or of a tied ``nn.Linear`` head) replaced by trained ones.

    ``out = base(x)`` computed with ``E'`` (``E'[token_indices] = Δ``) in place of the weight ``E``; the base module's
    own forward runs (scaled embeddings keep their scale). Several adapters may be active at once when their rows
    do not overlap.

    Args:
        base_layer: The embedding (innermost: it must not be wrapped by another layer yet).
        module_name: Full module name, for messages.
        tied_to: The input embedding's layer, for an output layer sharing its weight: this layer then reads that
            layer's rows and trains nothing of its own.

    Shapes: ``trainable_tokens_delta[name] (n, dim)`` with ``dim`` the weight's second axis.

    Raises:
        TargetModuleError: the module is not an embedding or linear layer, or is wrapped already.
    """

    adapter_param_names = ("trainable_tokens_delta",)
    adapter_attr_names = ("token_indices", "checkpoint_keys")
    merge_state_attrs = ("merged_rows",)
    method_name = "trainable tokens"
    # The rows replace part of W; LoRA layers wrapping this one add on top and merge after it, so they commute.
    weight_effect = "add"

    def __init__(self, base_layer: nn.Module, module_name: str = "", tied_to: TrainableTokensLayer | None = None
                 ) -> None:
        if isinstance(base_layer, AdapterLayer):
            raise TargetModuleError(
                f"Trainable tokens on {module_name} must wrap the embedding itself, but it is wrapped already "
                f"({type(base_layer).__name__}); add the trainable-tokens adapter first, or remove {module_name} "
                "from the other adapter's target_modules."
            )
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise TargetModuleError(f"Trainable tokens train rows of an nn.Embedding (or a tied nn.Linear head); "
                                    f"{module_name} is {type(base_layer).__name__}. Target the embedding layer.")
        super().__init__(base_layer)
        self.module_name = module_name
        self._tied = [tied_to] if tied_to is not None else []  # a list: not registered as a submodule
        # A tied layer shares the source's containers (the same Parameter objects), as HF's tied adapter does.
        self.trainable_tokens_delta = tied_to.trainable_tokens_delta if tied_to else nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = tied_to.token_indices if tied_to else {}
        self.checkpoint_keys: dict[str, str] = {}  # per adapter: "" (standalone) or "token_adapter." (in a LoRA)
        self.merged_rows: dict[str, torch.Tensor] = {}  # what each merge overwrote, for unmerge

    @property
    def tied_to(self) -> TrainableTokensLayer | None:
        return self._tied[0] if self._tied else None

    def update_layer(self, adapter_name: str, token_indices: list[int], init_weights: bool = True,
                     key_prefix: str = "") -> None:
        """Add ``adapter_name`` training rows ``token_indices``; ``key_prefix`` is where its checkpoint keys sit:
        ``""`` for the standalone method, ``"token_adapter."`` inside a LoRA adapter."""
        self.checkpoint_keys[adapter_name] = key_prefix
        if self.tied_to is not None:
            return  # rows live in the source layer
        weight = self.get_base_layer().weight
        if max(token_indices) >= weight.shape[0]:
            raise PeftConfigError(
                f"Trainable token ids {sorted(i for i in token_indices if i >= weight.shape[0])} are out of range for "
                f"{self.module_name} ({weight.shape[0]} rows); resize the embeddings first "
                "(model.resize_token_embeddings)."
            )
        rows = weight.detach()[token_indices]
        # Half-precision bases keep fp32 rows (HF's autocast_adapter_dtype): small updates vanish in bf16.
        rows = rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows.clone()
        values = rows if init_weights else torch.randn_like(rows)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values)
        self.token_indices[adapter_name] = list(token_indices)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        prefix = self.checkpoint_keys.get(adapter_name)
        # A tied layer inside a LoRA saves nothing (HF: the source's rows are the tied rows); standalone, it saves
        # the same tensor under its own name, as HF's TrainableTokensModel does.
        if prefix is None or (prefix and self.tied_to is not None) or adapter_name not in self.trainable_tokens_delta:
            return {}
        return {f"{prefix}trainable_tokens_delta": self.trainable_tokens_delta[adapter_name]}

    def load_aliases(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Keys this layer accepts on load without saving them: HF saves a tied LoRA-side layer's rows again with
        ``save_embedding_layers=True`` (the same tensor)."""
        prefix = self.checkpoint_keys.get(adapter_name)
        if prefix and self.tied_to is not None and adapter_name in self.trainable_tokens_delta:
            return {f"{prefix}trainable_tokens_delta": self.trainable_tokens_delta[adapter_name]}
        return {}

    def checkpoint_base_prefix(self, adapter_name: str) -> str:
        return f"{self.checkpoint_keys.get(adapter_name, '')}base_layer."

    # ---- forward -------------------------------------------------------------------------------------------
    def _check_overlap(self, names: list[str]) -> None:
        seen: set[int] = set()
        for name in dict.fromkeys(self.merged_adapters + names):
            rows = set(self.token_indices[name])
            if rows & seen:
                raise ValueError(f"Trainable-token adapters {list(dict.fromkeys(self.merged_adapters + names))} "
                                 f"train the same rows ({sorted(rows & seen)}) of {self.module_name}; activate one "
                                 "of them at a time.")
            seen |= rows

    def _weight_with(self, names: list[str]) -> torch.Tensor:
        weight = self.get_base_layer().weight
        for name in names:
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight.dtype))
        return weight

    def _run(self, names: list[str], x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if not names:
            return self.base_layer(x, *args, **kwargs)
        self._check_overlap(names)
        # The module's own forward with E' bound for this call (embedding options, scaled embeddings kept).
        return torch.func.functional_call(self.base_layer, {"weight": self._weight_with(names)}, (x, *args), kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(x, *args, **kwargs)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.token_indices and n not in self.merged_adapters]
        return self._run(names, x, args, kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        parts = []
        for name, rows in self.rows_per_adapter(x.shape[0]).items():
            rows = rows.to(x.device)
            parts.append((rows, self._run([name] if name in self.token_indices else [], x[rows], args, kwargs)))
        result = parts[0][1].new_empty((x.shape[0], *parts[0][1].shape[1:]))
        for rows, out in parts:
            result[rows] = out
        return result

    # ---- merging -------------------------------------------------------------------------------------------
    def _writes(self) -> bool:
        # A tied layer's weight is the source's Parameter: the source writes the rows, once.
        tied = self.tied_to
        return tied is None or self.get_base_layer().weight is not tied.get_base_layer().weight

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return self._weight_with([adapter_name]).detach() - weight.detach()

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        names = self._to_merge(adapter_names)
        self._check_overlap(names)
        for name in names:
            if not torch.isfinite(self.trainable_tokens_delta[name]).all():
                raise ValueError(f"Merging adapter {name!r} into {self.module_name} gives non-finite weights (its "
                                 "rows hold NaN/inf). Nothing was merged.")

    def merge(self, adapter_names: list[str] | None = None, safe: bool = False) -> None:
        names = self._to_merge(adapter_names)
        if safe:
            self.check_merge(names)
        self._check_overlap(names)
        weight = self.get_base_layer().weight
        for name in names:
            if self._writes():
                index = torch.tensor(self.token_indices[name], device=weight.device)
                self.merged_rows[name] = weight.detach()[index].clone()
                with torch.no_grad():
                    weight.index_copy_(0, index, self.trainable_tokens_delta[name].detach().to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            saved = self.merged_rows.pop(name, None)
            if saved is not None:
                with torch.no_grad():
                    weight.index_copy_(0, torch.tensor(self.token_indices[name], device=weight.device), saved)


def _input_embedding_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    for name, module in candidate_modules(model):
        if embedding is not None and (module is embedding or base_layer_of(module) is base_layer_of(embedding)):
            return name
    return None


def _tied_names(model: nn.Module, source: str) -> list[str]:
    """Modules whose weight is the same Parameter as ``source``'s (an output layer tied to the input embedding)."""
    weight = base_layer_of(get_module(model, source)).weight
    return [name for name, module in candidate_modules(model)
            if name != source and getattr(base_layer_of(module), "weight", None) is weight]


def _wrap(model: nn.Module, name: str, adapter_name: str, indices: list[int], init_weights: bool,
          key_prefix: str, tied_to: TrainableTokensLayer | None = None) -> TrainableTokensLayer:
    module = get_module(model, name)
    layer = module if isinstance(module, TrainableTokensLayer) else None
    if layer is None:
        layer = TrainableTokensLayer(module, name, tied_to)
        layer.training = module.training
        replace_module(model, name, layer)
    layer.update_layer(adapter_name, indices, init_weights, key_prefix)
    return layer


def _match(model: nn.Module, key: str) -> list[str]:
    names = [n for n, _ in candidate_modules(model) if n == key or n.endswith("." + key)]
    if not names:
        raise TargetModuleError(f"trainable_token_indices names {key!r}, which matches no module of "
                                f"{type(model).__name__}; use a name from model.named_modules(), e.g. 'embed_tokens'.")
    return names


def inject_token_rows(model: nn.Module, targets: dict[str, list[int]] | list[int], adapter_name: str,
                      init_weights: bool = True, key_prefix: str = LORA_KEY_PREFIX,
                      explicit: list[str] | None = None) -> list[str]:
    """Wrap the modules ``targets`` names (a list: the input embedding) so rows of them train; return their names.

    An output layer tied to a wrapped input embedding gets a tied layer (HF peft's weight-tying), unless it is named
    explicitly with other ids. Standalone keys (``key_prefix=""``) save the tied rows again; LoRA's do not.

    Raises:
        TargetModuleError, PeftConfigError: a name matches nothing, ids are out of range, or a tied layer is named
            with other ids than the embedding it shares its weight with (the two could not stay tied).
    """
    if isinstance(targets, list):
        name = _input_embedding_name(model)
        if name is None:
            raise TargetModuleError(f"{type(model).__name__} has no input embedding (get_input_embeddings); pass "
                                    "trainable_token_indices as {module name: [ids]}.")
        targets = {name: targets}
    wrapped: dict[str, list[int]] = {}
    for key, indices in targets.items():
        check_token_indices(f"trainable_token_indices[{key!r}]", indices)
        for name in _match(model, key):
            wrapped[name] = indices
    source = _input_embedding_name(model)
    tied = _tied_names(model, source) if source in wrapped else []
    done = []
    for name, indices in wrapped.items():
        if name in tied:
            if indices != wrapped[source]:
                raise PeftConfigError(
                    f"{name} shares its weight with {source} (tied embeddings) but trainable_token_indices gives it "
                    f"other ids ({indices} vs {wrapped[source]}); the tied weight can hold one set of rows. Give "
                    "both the same ids, or name only the input embedding (its tied layers follow)."
                )
            continue
        _wrap(model, name, adapter_name, indices, init_weights, key_prefix)
        done.append(name)
    if tied:
        source_layer = get_module(model, source)
        for name in tied:
            _wrap(model, name, adapter_name, wrapped[source], init_weights, key_prefix, tied_to=source_layer)
            done.append(name)
    return done


@register(TrainableTokensConfig)
class TrainableTokensMethod(PeftMethod):
    """Wraps the embedding (and an output layer tied to it) with :class:`TrainableTokensLayer`."""

    layer_class = TrainableTokensLayer

    @classmethod
    def default_target_modules(cls, model: nn.Module) -> list[str] | str | None:
        name = _input_embedding_name(model)
        return name or "embed_tokens"  # HF's fallback name

    @classmethod
    def layer_for(cls, target: nn.Module, config: PeftConfig, adapter_name: str, module_name: str) -> AdapterLayer:
        layer = TrainableTokensLayer(target, module_name)
        layer.update_layer(adapter_name, config.token_indices, config.init_weights)
        return layer

    @classmethod
    def update_layer(cls, layer: AdapterLayer, config: PeftConfig, adapter_name: str, module_name: str) -> None:
        layer.update_layer(adapter_name, config.token_indices, config.init_weights)

    @classmethod
    def inject_beyond_modules(cls, model: nn.Module, config: PeftConfig, adapter_name: str) -> list[str]:
        source = _input_embedding_name(model)
        layer = get_module(model, source) if source else None
        if not isinstance(layer, TrainableTokensLayer) or adapter_name not in layer.token_indices:
            return []
        names = []
        for name in _tied_names(model, source):
            existing = get_module(model, name)
            if isinstance(existing, TrainableTokensLayer) and existing.tied_to is None:
                raise PeftConfigError(
                    f"{name} shares its weight with {source} (tied embeddings) and is a target of its own, so the two "
                    f"would train separate rows of one matrix. Target only {source}; its tied layers follow it."
                )
            _wrap(model, name, adapter_name, layer.token_indices[adapter_name], True, "", tied_to=layer)
            names.append(name)
        return names
