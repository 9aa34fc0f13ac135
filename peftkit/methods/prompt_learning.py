"""What the prompt-learning methods share: their config base, and virtual tokens.

A *virtual token* is an input position whose embedding comes from a learned table instead of the model's
vocabulary. Virtual token ``k`` of the active adapter has the id ``vocab_size + k`` (one past the model's
embedding rows), so it can sit anywhere in ``input_ids``, like a token added to the tokenizer: the embedding
layer's hooks look the ids up in the adapter's table. Prompt tuning and P-tuning without a template insert the
ids themselves, in front of each row's first real token (after left padding); an infix template places them
where it wants, e.g. ``[P0 P1 P2] x [P3 P4 P5] [MASK]``. Because the prompt is part of ``input_ids``,
``generate`` needs nothing special: the prompt goes through the model once and lives in the cache from then on,
beam search and left padding work as for any other token.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.config import PeftConfig
from peftkit.core.errors import PeftConfigError
from peftkit.core.layer import AdapterModule
from peftkit.core.registry import ForwardCall, PeftMethod

__all__ = [
    "PromptLearningConfig",
    "VirtualTokenModule",
    "VirtualTokenMethod",
    "virtual_token_ids",
    "model_dims",
    "accepts_input",
    "acquire_router",
    "release_router",
]

_ROUTER_ATTR = "_peftkit_virtual_tokens"


@dataclass(kw_only=True)
class PromptLearningConfig(PeftConfig):
    """Fields every prompt-learning method has (HF peft's ``PromptLearningConfig``).

    Args:
        num_virtual_tokens: Prompt length ``n``.
        token_dim: Width of a virtual token; None: the model's hidden size.
        num_transformer_submodules: 2 gives an encoder-decoder model a prompt for the encoder and one for the
            decoder (HF peft's default for ``SEQ_2_SEQ_LM``); None: chosen from ``task_type``.
        num_attention_heads, num_layers: Read from the model config when None (used by prefix methods).
    """

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise PeftConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}.")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise PeftConfigError(
                f"num_transformer_submodules must be 1, 2 or None, got {self.num_transformer_submodules!r}."
            )
        # They shape the prompt tensors (encoder_hidden_size: the reparametrisation's width, where there is one).
        for name in ("token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"):
            value = getattr(self, name, None)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise PeftConfigError(f"{type(self).__name__}.{name} must be a positive integer or None (read from "
                                      f"the model), got {getattr(self, name)!r}.")


def _config_value(model_config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(model_config, name, None)
        if value is not None:
            return value
    return None


def model_dims(model: nn.Module, config: PromptLearningConfig) -> PromptLearningConfig:
    """Fill ``token_dim``, ``num_layers``, ``num_attention_heads`` and ``num_transformer_submodules`` from the
    model config, as HF peft does, so the saved config describes the tensors exactly."""
    model_config = getattr(model, "config", None)
    model_config = getattr(model_config, "text_config", None) or model_config
    found = {
        "token_dim": _config_value(model_config, "hidden_size", "n_embd", "d_model"),
        "num_layers": _config_value(model_config, "num_hidden_layers", "num_layers", "n_layer"),
        "num_attention_heads": _config_value(
            model_config, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"
        ),
    }
    changes: dict[str, Any] = {}
    for name, value in found.items():
        if getattr(config, name) is None:
            if value is None:
                raise PeftConfigError(
                    f"{type(config).__name__}.{name} is None and {type(model).__name__} has no config to read it "
                    f"from; pass {name}=... ."
                )
            changes[name] = value
    if config.num_transformer_submodules is None:
        encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
        changes["num_transformer_submodules"] = 2 if encoder_decoder and config.task_type == "SEQ_2_SEQ_LM" else 1
    return dataclasses.replace(config, **changes) if changes else config


def accepts_input(model: nn.Module, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


def input_embedding(model: nn.Module) -> nn.Embedding:
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if getter is not None else None
    if not isinstance(embedding, nn.Embedding):
        raise PeftConfigError(
            f"Prompt methods need the model's input embedding (get_input_embeddings() returning an nn.Embedding); "
            f"{type(model).__name__} gives {type(embedding).__name__}."
        )
    return embedding


def virtual_token_ids(model: nn.Module, count: int, start: int = 0) -> torch.Tensor:
    """Ids of virtual tokens ``start .. start + count - 1``: put them into ``input_ids`` to place a prompt."""
    vocab = input_embedding(model).num_embeddings
    return torch.arange(vocab + start, vocab + start + count)


class VirtualTokenModule(AdapterModule):
    """An adapter whose parameters produce a table of virtual-token embeddings (one row per virtual token).

    Subclasses define ``prompt_table()``: ``(total_virtual_tokens, token_dim)``; rows ``[0, n)`` are the (first)
    encoder prompt, ``[n, 2n)`` the decoder prompt of an encoder-decoder model with two submodules.
    """

    def __init__(self, config: PromptLearningConfig, num_prompts: int = 1) -> None:
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.num_submodules = config.num_transformer_submodules or 1
        self.num_prompts = num_prompts
        self.task_type = config.task_type

    @property
    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens * self.num_submodules * self.num_prompts

    def prompt_table(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define prompt_table.")

    def attach(self, model: nn.Module) -> None:
        acquire_router(model, _ROUTER_ATTR, _VirtualTokenRouter)

    def detach(self, model: nn.Module) -> None:
        release_router(model, _ROUTER_ATTR)


def acquire_router(model: nn.Module, attr: str, build: Any) -> Any:
    """The model's shared router of one kind (hooks every adapter of the family uses), built by the first adapter
    and counted, so the last one to leave removes the hooks (``release_router``). Kept in ``model.__dict__``: a
    plain attribute, not a submodule, so the model's module tree and state dict do not change."""
    router = model.__dict__.get(attr)
    if router is None:
        router = build(model)
        model.__dict__[attr] = router
    router.users += 1
    return router


def release_router(model: nn.Module, attr: str) -> None:
    router = model.__dict__.get(attr)
    if router is not None:
        router.users -= 1
        if router.users == 0:
            router.remove()
            del model.__dict__[attr]


class _VirtualTokenRouter:
    """Hooks on the input embedding: ids ``>= vocab_size`` are looked up in the table the current call set.

    Every embedding module holding the input embedding's weight is hooked: encoder-decoder models (T5) give the
    encoder and the decoder their own module around the shared matrix.
    """

    def __init__(self, model: nn.Module) -> None:
        embedding = input_embedding(model)
        self.vocab_size = embedding.num_embeddings
        self.users = 0
        self.table: torch.Tensor | None = None  # (rows or 1, tokens, dim) for the current call
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        sharing = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is embedding.weight]
        self._handles = []
        for module in dict.fromkeys([embedding, *sharing]):
            self._handles.append(module.register_forward_pre_hook(self._before))
            self._handles.append(module.register_forward_hook(self._after))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _before(self, module: nn.Module, args: tuple) -> tuple | None:
        ids = args[0]
        virtual = ids >= self.vocab_size
        if not bool(virtual.any()):
            self._pending = None
            return None
        self._pending = (ids, virtual)
        return (ids.masked_fill(virtual, 0), *args[1:])

    def _after(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self._pending is None:
            return None
        ids, virtual = self._pending
        self._pending = None
        table = self.table
        if table is None:
            raise ValueError(
                "input_ids hold virtual token ids (>= the vocabulary size) but no prompt adapter is active; "
                "set_adapter(...) a prompt-tuning or P-tuning adapter, or remove those ids."
            )
        index = ids - self.vocab_size
        if bool((index[virtual] >= table.shape[1]).any()):
            raise ValueError(
                f"input_ids hold virtual token id(s) >= {self.vocab_size + table.shape[1]}, but the active prompt "
                f"has {table.shape[1]} virtual tokens (ids {self.vocab_size}..{self.vocab_size + table.shape[1] - 1})."
            )
        index = index.clamp(0, table.shape[1] - 1)
        rows = ids.shape[0]
        if table.shape[0] == 1:
            vectors = table[0][index]
        else:
            if rows % table.shape[0]:
                raise ValueError(f"A prompt table for {table.shape[0]} rows cannot serve a batch of {rows}.")
            # generate expands each row for beams / return sequences with repeat_interleave
            table = table.repeat_interleave(rows // table.shape[0], dim=0)
            vectors = torch.gather(table, 1, index.unsqueeze(-1).expand(-1, -1, table.shape[-1]))
        return torch.where(virtual.unsqueeze(-1), vectors.to(output.dtype), output)


def _insert_block(values: torch.Tensor, starts: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Insert ``block[r]`` (width w) into row r of ``values`` (B, L, ...) before column ``starts[r]``."""
    rows, length = values.shape[:2]
    width = block.shape[1]
    cols = torch.arange(length + width, device=values.device).unsqueeze(0)
    starts = starts.unsqueeze(1)
    source = torch.where(cols < starts, cols, cols - width).clamp(0, max(length - 1, 0))
    inside = (cols >= starts) & (cols < starts + width)
    trailing = values.shape[2:]
    gathered = torch.gather(values, 1, source.view(rows, -1, *([1] * len(trailing))).expand(rows, -1, *trailing))
    offset = (cols - starts).clamp(0, width - 1)
    placed = torch.gather(block, 1, offset.view(rows, -1, *([1] * len(trailing))).expand(rows, -1, *trailing))
    return torch.where(inside.view(rows, -1, *([1] * len(trailing))), placed.to(values.dtype), gathered)


class VirtualTokenMethod(PeftMethod):
    """Shared hooks of the methods whose adapter is a :class:`VirtualTokenModule` (prompt tuning, P-tuning)."""

    mergeable = False
    supports_mixed_batch = True
    checkpoint_prefix = "base_model."
    model_api = ("virtual_token_ids", "ensemble_predict")

    @classmethod
    def prepare_config(cls, model: nn.Module, config: PeftConfig) -> PeftConfig:
        assert isinstance(config, PromptLearningConfig)
        config = model_dims(model, config)
        width = input_embedding(model).embedding_dim
        if config.token_dim != width:
            raise PeftConfigError(
                f"token_dim={config.token_dim} but the model's input embeddings are {width} wide; leave token_dim "
                "None or set it to the embedding width."
            )
        return config

    @classmethod
    def virtual_token_ids(cls, peft_model: Any, adapter_name: str | None = None) -> torch.Tensor:
        """The ids of the (active) adapter's virtual tokens, for placing them in ``input_ids`` yourself."""
        name = adapter_name or peft_model.active_adapters[0]
        module = peft_model.adapter_module(name, cls)
        return virtual_token_ids(peft_model.get_base_model(), module.total_virtual_tokens)

    @classmethod
    def ensemble_predict(cls, peft_model: Any, reduce: str = "mean", **inputs: Any) -> torch.Tensor:
        """Combine the predictions of an ensemble of prompts (``num_prompts > 1``) for each input row.

        ``reduce="mean"``: the mean of the prompts' logits, shape ``(batch, ...)``. ``"vote"``: the class most
        prompts predict (argmax of the last axis; ties go to the lowest class id).
        """
        if reduce not in ("mean", "vote"):
            raise ValueError(f"reduce must be 'mean' or 'vote', got {reduce!r}.")
        module = peft_model.adapter_module(peft_model.active_adapters[0], cls)
        logits = peft_model(**inputs).logits
        prompts = getattr(module, "num_prompts", 1)
        logits = logits.view(-1, prompts, *logits.shape[1:])
        if reduce == "mean":
            return logits.mean(dim=1)
        votes = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).sum(dim=1)
        return votes.argmax(-1)

    @classmethod
    @contextlib.contextmanager
    def forward_context(cls, peft_model: Any, adapter_names: list[str], call: ForwardCall) -> Iterator[None]:
        router: _VirtualTokenRouter | None = call.model.__dict__.get(_ROUTER_ATTR)
        if router is None:
            yield
            return
        rows = call.batch_adapter_names
        if rows is None and len(adapter_names) > 1:
            raise ValueError(
                f"Prompt adapters {adapter_names} are active together; a model runs one prompt at a time. "
                "set_adapter one of them, or give each row its adapter with adapter_names=[...]."
            )
        modules = {name: peft_model.adapter_module(name, cls) for name in adapter_names}
        try:
            if modules:
                _PromptCall(router, modules, call).prepare()
            yield
        finally:
            router.table = None  # the base model called directly afterwards must not see this call's prompt


class _PromptCall:
    """Rewrites one call's inputs so every row carries its adapter's virtual tokens."""

    def __init__(self, router: _VirtualTokenRouter, modules: dict[str, VirtualTokenModule], call: ForwardCall):
        self.router = router
        self.modules = modules
        self.call = call
        self.kwargs = call.kwargs
        self.prompts = next(iter(modules.values())).num_prompts

    def row_names(self, rows: int) -> list[str | None]:
        names = self.call.batch_adapter_names
        if names is None:
            return [next(iter(self.modules))] * rows
        return [n if n in self.modules else None for n in names]

    def prepare(self) -> None:
        kwargs = self.kwargs
        if self.prompts > 1:
            if self.call.batch_adapter_names is not None:
                raise ValueError("Prompt ensembles (num_prompts > 1) cannot run in a mixed batch.")
            if self.call.generating:
                raise ValueError("generate() with a prompt ensemble is not defined; use one prompt per adapter.")
            self._replicate_rows()
        ids = kwargs.get("input_ids")
        tables = {name: module.prompt_table() for name, module in self.modules.items()}
        rows = ids.shape[0] if ids is not None else kwargs["inputs_embeds"].shape[0]
        names = self.row_names(rows)
        self._set_table(tables, names)
        if ids is not None and bool((ids >= self.router.vocab_size).any()):
            return  # an infix template: the user placed the virtual tokens
        if ids is None:
            self._prepend_embeddings(tables, names)
            return
        self._insert_ids(names, encoder=True)
        decoder_model = bool(getattr(getattr(self.call.model, "config", None), "is_encoder_decoder", False))
        if decoder_model and next(iter(self.modules.values())).num_submodules == 2:
            self._insert_decoder_ids(names)

    def _set_table(self, tables: dict[str, torch.Tensor], names: list[str | None]) -> None:
        if len(set(names)) == 1 and names[0] is not None:
            self.router.table = tables[names[0]].unsqueeze(0)
            return
        width = max(t.shape[0] for t in tables.values())
        template = next(iter(tables.values()))
        stacked = template.new_zeros(len(names), width, template.shape[1])
        for row, name in enumerate(names):
            if name is not None:
                stacked[row, : tables[name].shape[0]] = tables[name]
        self.router.table = stacked

    def _replicate_rows(self) -> None:
        # Each example runs once per prompt of the ensemble, rows ordered example-major (r * prompts + e).
        for key, value in list(self.kwargs.items()):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and key != "past_key_values":
                self.kwargs[key] = value.repeat_interleave(self.prompts, dim=0)

    def _row_virtual_ids(self, names: list[str | None], submodule: int, device: torch.device) -> torch.Tensor:
        """(rows, width) virtual ids per row, -1 where a row has none (left of its ids, like left padding)."""
        vocab = self.router.vocab_size
        lengths = [self.modules[name].num_virtual_tokens if name is not None else 0 for name in names]
        width = max(lengths)
        ids = torch.full((len(names), width), -1, dtype=torch.long, device=device)
        for row, (name, length) in enumerate(zip(names, lengths)):
            if not length:
                continue
            prompt = row % self.prompts if self.prompts > 1 else 0
            module = self.modules[name]
            first = (prompt * module.num_submodules + submodule) * length
            ids[row, width - length:] = torch.arange(vocab + first, vocab + first + length, device=device)
        return ids

    def _insert_ids(self, names: list[str | None], encoder: bool) -> None:
        kwargs = self.kwargs
        ids = kwargs["input_ids"]
        block = self._row_virtual_ids(names, 0, ids.device)
        if block.shape[1] == 0:
            return
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            # The prompt goes right before each row's first real token, so left padding stays in front.
            starts = torch.where(mask.any(dim=1), mask.int().argmax(dim=1), torch.zeros_like(mask[:, 0].long()))
        else:
            starts = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        present = block >= 0
        kwargs["input_ids"] = _insert_block(ids, starts, block.clamp(min=0))
        if mask is not None:
            kwargs["attention_mask"] = _insert_block(mask, starts, present.to(mask.dtype))
        elif not bool(present.all()):
            ones = torch.ones_like(ids)
            kwargs["attention_mask"] = _insert_block(ones, starts, present.long())
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == ids.shape[1]:
            kwargs["labels"] = _insert_block(labels, starts, torch.full_like(block, -100))
        token_types = kwargs.get("token_type_ids")
        if token_types is not None:
            kwargs["token_type_ids"] = _insert_block(token_types, starts, torch.zeros_like(block))
        positions = kwargs.get("position_ids")
        if positions is not None:
            # The prompt takes the positions in front of the first real token; the real tokens move up by the row's
            # own prompt length n (0 for a row without one in a mixed batch: position ids a prefix adapter set for
            # it must stay as in its single run). The fill in front of a shorter prompt is masked and moved away.
            first = torch.gather(positions, 1, starts.unsqueeze(1))
            own_length = present.sum(dim=1, keepdim=True)
            shifted = torch.where(torch.arange(positions.shape[1], device=ids.device) >= starts.unsqueeze(1),
                                  positions + own_length, positions)
            own = (first + torch.arange(block.shape[1], device=ids.device) - (block.shape[1] - own_length)).clamp(0)
            kwargs["position_ids"] = _insert_block(shifted, starts, own)
        untouched = torch.zeros_like(ids, dtype=torch.bool)
        inserted = _insert_block(untouched, starts, torch.ones_like(present))
        if not bool(present.all()):
            inserted = self._place_fill(_insert_block(untouched, starts, ~present), inserted)
        self._strip_outputs(inserted)

    def _place_fill(self, fill: torch.Tensor, inserted: torch.Tensor) -> torch.Tensor:
        """Place the masked fill of rows with shorter prompts (mixed batches) so each row equals its single run.

        A forward moves the fill to the end of the row, where right padding does nothing to the real tokens (and a
        first-token pooler still sees the row's first token). ``generate`` appends after the last token, so there
        the fill stays in front of the prompt and positions are numbered past it.
        """
        kwargs = self.kwargs
        if self.call.generating:
            if kwargs.get("position_ids") is None and accepts_input(self.call.model, "position_ids"):
                kwargs["position_ids"] = (kwargs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
            return inserted
        order = torch.argsort(fill.int(), dim=1, stable=True)
        for key in ("input_ids", "attention_mask", "labels", "token_type_ids", "position_ids"):
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == fill.shape:
                kwargs[key] = torch.gather(value, 1, order)
        return torch.gather(inserted, 1, order)

    def _insert_decoder_ids(self, names: list[str | None]) -> None:
        kwargs = self.kwargs
        model = self.call.model
        decoder_ids = kwargs.get("decoder_input_ids")
        if decoder_ids is None:
            labels = kwargs.get("labels")
            if labels is not None:
                decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
            elif self.call.generating:
                start = model.generation_config.decoder_start_token_id
                rows = kwargs["input_ids"].shape[0]
                decoder_ids = torch.full((rows, 1), start, dtype=torch.long, device=kwargs["input_ids"].device)
            else:
                return
        block = self._row_virtual_ids(names, 1, decoder_ids.device)
        if not bool((block >= 0).all()):
            raise ValueError("Decoder prompts cannot run in a mixed batch with rows that have none.")
        starts = torch.zeros(decoder_ids.shape[0], dtype=torch.long, device=decoder_ids.device)
        kwargs["decoder_input_ids"] = _insert_block(decoder_ids, starts, block)
        if kwargs.get("decoder_attention_mask") is not None:
            dmask = kwargs["decoder_attention_mask"]
            kwargs["decoder_attention_mask"] = _insert_block(dmask, starts, torch.ones_like(block, dtype=dmask.dtype))
        labels = kwargs.get("labels")
        if labels is not None:
            kwargs["labels"] = _insert_block(labels, starts, torch.full_like(block, -100))
        if self.call.generating:
            # generate puts decoder_start_token_id in front of decoder ids that do not begin with it.
            kwargs["decoder_start_token_id"] = int(block[0, 0])
            width = block.shape[1]
            self.call.output_hooks.append(lambda out: _drop_leading(out, width))

    def _prepend_embeddings(self, tables: dict[str, torch.Tensor], names: list[str | None]) -> None:
        kwargs = self.kwargs
        embeds = kwargs["inputs_embeds"]
        if any(name is None for name in names):
            raise ValueError("inputs_embeds with prompt adapters cannot mix rows that have no prompt.")
        prompts = []
        if len({self.modules[name].num_virtual_tokens for name in names}) > 1:
            raise ValueError("inputs_embeds in a mixed batch needs prompt adapters of one length; pass input_ids.")
        for row, name in enumerate(names):
            prompt = row % self.prompts if self.prompts > 1 else 0
            n = self.modules[name].num_virtual_tokens
            prompts.append(tables[name][prompt * self.modules[name].num_submodules * n:][:n])
        block = torch.stack(prompts).to(embeds.dtype)
        starts = torch.zeros(embeds.shape[0], dtype=torch.long, device=embeds.device)
        kwargs["inputs_embeds"] = _insert_block(embeds, starts, block)
        width = block.shape[1]
        ones = torch.ones(embeds.shape[0], width, dtype=torch.long, device=embeds.device)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = _insert_block(kwargs["attention_mask"], starts,
                                                     ones.to(kwargs["attention_mask"].dtype))
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == embeds.shape[1]:
            kwargs["labels"] = _insert_block(labels, starts, torch.full_like(ones, -100))
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = _insert_block(kwargs["token_type_ids"], starts, torch.zeros_like(ones))
        inserted = torch.zeros(embeds.shape[0], embeds.shape[1] + width, dtype=torch.bool, device=embeds.device)
        inserted[:, :width] = True
        self._strip_outputs(inserted)

    def _strip_outputs(self, inserted: torch.Tensor) -> None:
        """Outputs that must line up with the caller's tokens lose the inserted positions."""
        if self.call.generating:
            # A seq2seq model returns decoder tokens only: the encoder's prompt is not in them.
            if not getattr(getattr(self.call.model, "config", None), "is_encoder_decoder", False):
                self.call.output_hooks.append(lambda out: _drop_columns(out, inserted))
            return
        task = next(iter(self.modules.values())).task_type
        if task == "TOKEN_CLS":
            self.call.output_hooks.append(lambda out: _drop_logit_positions(out, inserted))


def _drop_columns(output: Any, inserted: torch.Tensor) -> Any:
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    rows = sequences.shape[0]
    mask = inserted.repeat_interleave(rows // inserted.shape[0], dim=0)
    extra = sequences.shape[1] - mask.shape[1]
    keep = torch.cat([~mask, mask.new_ones(rows, extra)], dim=1) if extra >= 0 else ~mask[:, : sequences.shape[1]]
    kept = sequences[keep].view(rows, -1)
    if isinstance(output, torch.Tensor):
        return kept
    output.sequences = kept
    return output


def _drop_leading(output: Any, width: int) -> Any:
    if isinstance(output, torch.Tensor):
        return output[:, width:]
    output.sequences = output.sequences[:, width:]
    return output


def _drop_logit_positions(output: Any, inserted: torch.Tensor) -> Any:
    logits = output.logits
    rows = logits.shape[0]
    output.logits = logits[~inserted].view(rows, -1, *logits.shape[2:])
    return output

