"""Saving and loading adapters: the checkpoint half of ``PeftModel``, kept in its own file.

Delta-only checkpoints in HF peft's layout (see :mod:`peftkit.core.checkpoint` for the files themselves): keys are
the adapter tensors of every layer under the wrapped module's name, base parameters a method trains, and the
``checkpoint_tensors`` of the adapter's module. Loading validates everything before it writes anything and leaves
the model as it was on any error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftkit.core import checkpoint as ckpt
from peftkit.core.config import CONFIG_NAME, PeftConfig
from peftkit.core.embeddings import embedding_layer_tensors, embedding_load_targets
from peftkit.core.errors import CheckpointError, PeftConfigError, TargetModuleError
from peftkit.core.registry import method_for
from peftkit.core.targets import logical_name
from peftkit.integrations import hub

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from peftkit.core.model import PeftModel

__all__ = ["AdapterCheckpoints"]


class AdapterCheckpoints:
    """``PeftModel``'s checkpoint methods (HF peft's names): state dicts, ``save_pretrained``, ``push_to_hub``,
    ``from_pretrained``, ``load_adapter``, ``hotswap_adapter``.

    Loaders take a local directory or a Hub repo id, with the Hub arguments of
    :class:`peftkit.integrations.hub.HubOptions` (``revision``, ``subfolder``, ``token``, ``cache_dir``,
    ``force_download``, ``local_files_only``) as keywords. An argument peftkit does not honour raises ``TypeError``
    naming it, rather than being ignored.
    """

    def get_adapter_state_dict(self, adapter_name: str, live: bool = False) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed as in the checkpoint (``base_model.model.<path>...``)."""
        self._check_known([adapter_name])
        out = self._adapter_tensors(adapter_name, materialize=live)
        return out if live else {k: v.detach() for k, v in out.items()}

    def _adapter_tensors(self, adapter_name: str, materialize: bool) -> dict[str, torch.Tensor]:
        """The live tensors (the parameter objects themselves) behind ``get_adapter_state_dict``."""
        config = self.peft_config[adapter_name]
        method = method_for(config)
        prefix = method.checkpoint_prefix
        out: dict[str, torch.Tensor] = {}
        for path, layer in self._layers():
            # Keys use the wrapped module's name, so they do not depend on which other layers nest around it.
            path = _without_wrapper_hops(logical_name(path))
            for key, tensor in layer.adapter_tensors(adapter_name).items():
                out[f"{prefix}{path}.{key}"] = tensor
        model = self.base_model.model
        for leaf_method, leaf in self._leaves(adapter_name):
            for name in leaf_method.trainable_base_parameters(model, leaf):
                out[prefix + name] = model.get_parameter(name)
        if adapter_name in self.adapter_modules:
            if materialize:  # a checkpoint holds the module's inference form; loading goes into that form
                self.adapter_modules[adapter_name].materialize()
            out.update(self.adapter_modules[adapter_name].checkpoint_tensors())
        return out

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        *,
        safe_serialization: bool = True,
        save_embedding_layers: bool | str = "auto",
        push_to_hub: bool = False,
        repo_id: str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        tags: list[str] | None = None,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        **kwargs: object,
    ) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors``.

        The "default" adapter goes into ``save_directory``, others into ``save_directory/<name>`` (HF layout).

        Args:
            is_main_process: False on the ranks of a distributed run that must not write (HF's argument).
            state_dict: A full model state dict gathered elsewhere, keyed like ``self.state_dict()`` (FSDP's
                ``FULL_STATE_DICT``, DeepSpeed ZeRO-3's consolidated weights); adapter tensors are read from it
                instead of from the live parameters, which may be shards.
            safe_serialization: Only True: peftkit writes safetensors.
            save_embedding_layers: True: also save the input and output embedding matrices (a resized
                vocabulary); ``"auto"`` (HF's default): when the base model's ``config.json`` has another
                ``vocab_size`` (:mod:`peftkit.core.embeddings`); False: never.
            push_to_hub: Then upload the adapter files and a model card (``README.md``, merged into one already in
                ``save_directory``) to ``repo_id`` (default: the directory's name); the other keywords are
                :meth:`push_to_hub`'s.
            path_initial_model_for_weight_conversion: For adapters whose init rewrote the base weights: the
                directory holding the adapter as saved before training. The adapter is then written in a form that
                applies to the original base weights (HF peft's argument; see the method's
                ``convert_for_initial_model``).

        Raises:
            CheckpointError: an adapter tensor is a shard (a DTensor, or the empty placeholder FSDP1 and ZeRO-3
                leave on a rank); writing it would give an empty or partial checkpoint. Nothing is written.
        """
        hub.refuse_kwargs("PeftModel.save_pretrained", kwargs, accepted=(
            "selected_adapters", "is_main_process", "state_dict", "safe_serialization", "save_embedding_layers",
            "push_to_hub", "repo_id", "commit_message", "commit_description", "private", "token", "revision",
            "create_pr", "tags", "path_initial_model_for_weight_conversion"))
        if safe_serialization is not True:
            raise ValueError("peftkit writes safetensors only; drop safe_serialization=False.")
        if save_embedding_layers not in ("auto", True, False):
            raise ValueError(f"save_embedding_layers must be True, False or 'auto', got {save_embedding_layers!r}.")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        self._check_known(names)
        if not is_main_process:
            return
        if state_dict is None and any(type(m).__name__ == "FullyShardedDataParallel" for m in self.modules()):
            raise CheckpointError(
                "The model holds FSDP1 (FullyShardedDataParallel) units whose parameters are flattened shards outside "
                "forward; nothing was written. Call peftkit.integrations.training.save_adapter(model, directory) on "
                "every rank, or pass a gathered state_dict=."
            )
        by_id = None
        if state_dict is not None:  # named_parameters, not state_dict(): FSDP's state-dict hooks may communicate
            named = [*self.named_parameters(remove_duplicate=False), *self.named_buffers(remove_duplicate=False)]
            by_id = {id(t): _without_wrapper_hops(n) for n, t in named}
        writes = []  # every adapter is read (and converted) before the first file is written
        for name in names:
            tensors = self._adapter_tensors(name, materialize=False)
            tensors.update(embedding_layer_tensors(self, name, save_embedding_layers))
            if by_id is not None:  # the gathered copy of each parameter, found through the live parameter's name
                tensors = {k: state_dict.get(by_id.get(id(t), ""), t) for k, t in tensors.items()}
            _refuse_shards(tensors, name)
            saved_config = self._saved_config(name)
            if path_initial_model_for_weight_conversion is not None:
                tensors, saved_config = method_for(saved_config).convert_for_initial_model(
                    saved_config, tensors, os.fspath(path_initial_model_for_weight_conversion))
            directory = os.path.join(save_directory, "" if name == "default" else name)
            writes.append((directory, {k: v.detach() for k, v in tensors.items()}, saved_config.to_json_string()))
        for directory, tensors, saved in writes:
            ckpt.write_adapter_files(directory, tensors, saved)
        if push_to_hub:
            hub.upload_adapters(
                os.fspath(save_directory), {name: self._saved_config(name) for name in names},
                repo_id or os.path.basename(os.path.normpath(save_directory)), commit_message=commit_message,
                commit_description=commit_description, private=private, token=token, revision=revision,
                create_pr=create_pr, tags=tags,
            )

    def _saved_config(self, name: str) -> PeftConfig:
        config = self.peft_config[name]
        base_name = config.base_model_name_or_path or getattr(getattr(self, "config", None), "name_or_path", None)
        return dataclasses.replace(config, inference_mode=True, base_model_name_or_path=base_name or None)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        tags: list[str] | None = None,
        selected_adapters: list[str] | None = None,
        **kwargs: object,
    ) -> CommitInfo:
        """Upload the adapters (HF's layout: "default" at the top, others in ``<name>/``) and a model card to the
        Hub repo ``repo_id``, creating it if needed. The base model is never uploaded.

        Args:
            repo_id: ``"name"`` (under your account) or ``"namespace/name"``.
            private: For a new repo; an existing repo keeps its visibility.
            revision: Branch to commit to (created from main if missing).
            create_pr: Open a pull request instead of committing to the branch.
            tags: Extra model card tags.
            selected_adapters: The adapters to upload (default: all).

        Returns:
            huggingface_hub's ``CommitInfo`` (``.commit_url``, ``.pr_url``).
        """
        hub.refuse_kwargs("PeftModel.push_to_hub", kwargs, accepted=(
            "commit_message", "commit_description", "private", "token", "revision", "create_pr", "tags",
            "selected_adapters"))
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, selected_adapters=names)
            return hub.upload_adapters(
                folder, {name: self._saved_config(name) for name in names}, repo_id, commit_message=commit_message,
                commit_description=commit_description, private=private, token=token, revision=revision,
                create_pr=create_pr, tags=tags,
            )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: object,
    ) -> PeftModel:
        """Load a saved adapter onto ``model``. On any error ``model`` is left exactly as it was.

        Called on ``PeftModel``, returns the class for the config's ``task_type`` (``PeftModelForCausalLM``, ...).

        Args:
            model_id: The directory ``save_pretrained`` wrote, or a Hub repo id (``"user/adapter"``).
            config: Use this config instead of the saved one; the weights still come from ``model_id``.
            autocast_adapter_dtype: True: adapters of fp16/bf16 weights are kept in fp32 (HF peft's default).
                False: in the dtype of the weight they adapt.
            ephemeral_gpu_offload: Only False (peftkit has no ephemeral offload).
            low_cpu_mem_usage: Only False (see the error True raises).
            key_mapping: ``{regex: replacement}`` applied to each checkpoint key without its
                ``base_model.model.`` prefix, first matching pattern only (HF peft's argument): for a model whose
                modules were renamed since the adapter was saved.
            **kwargs: Hub arguments: ``revision``, ``subfolder``, ``token``, ``cache_dir``, ``force_download``,
                ``local_files_only``.

        Raises:
            PeftConfigError, CheckpointError: missing, corrupt or ill-fitting files, or a Hub id that cannot be
                fetched; the message lists every problem found.
            TypeError: a keyword argument peftkit does not honour.
        """
        options = hub.hub_options("PeftModel.from_pretrained", kwargs)
        _refuse_loader_options(ephemeral_gpu_offload, low_cpu_mem_usage)
        source, saved, weights, mismatch = _read_adapter(model_id, options, key_mapping, need_config=config is None)
        from_file = config is None
        config = dataclasses.replace(config or saved, inference_mode=not is_trainable)
        with _naming_the_config(source.label if from_file else None):
            peft_model = cls.class_for(config)(model, config, adapter_name,
                                               autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            peft_model._load_weights(adapter_name, weights, source.label, mismatch)
        except BaseException:
            peft_model.unload()
            raise
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: object,
    ) -> None:
        """Load a saved adapter next to the ones present (inactive until ``set_adapter``).

        Loading into a name already present overwrites its weights in place, as HF peft does (``Trainer`` resumes
        this way), with :meth:`hotswap_adapter`'s checks. Arguments as in :meth:`from_pretrained`.
        """
        options = hub.hub_options("PeftModel.load_adapter", kwargs)
        _refuse_loader_options(ephemeral_gpu_offload, low_cpu_mem_usage)
        source, saved, weights, mismatch = _read_adapter(model_id, options, key_mapping)
        if adapter_name in self.peft_config:
            self._hotswap(adapter_name, source, saved, weights, mismatch)
            return
        with _naming_the_config(source.label):
            self.add_adapter(adapter_name, dataclasses.replace(saved, inference_mode=not is_trainable))
        try:
            if not autocast_adapter_dtype:
                self._cast_adapter_to_base_dtype(adapter_name)
            self._load_weights(adapter_name, weights, source.label, mismatch)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        self.set_adapter(self._active or [adapter_name])

    def hotswap_adapter(self, model_id: str | os.PathLike, adapter_name: str = "default", **kwargs: object) -> None:
        """Overwrite the weights of the loaded adapter ``adapter_name`` in place with those saved in ``model_id``.

        The parameters stay the same objects, so an optimizer, a DDP or FSDP wrapper and a ``torch.compile``d
        model keep working, and nothing recompiles. The saved config must equal the loaded one except for
        ``inference_mode``, ``base_model_name_or_path`` and ``revision`` (same targets, ranks, scales); HF peft's
        ``peft.utils.hotswap.hotswap_adapter`` does the same. Fields that only pick initial values (``init_*``,
        ``*_init``) may differ: the loaded weights replace them. ``kwargs`` are the Hub arguments of
        :meth:`from_pretrained`.

        Raises:
            AdapterNotFoundError: ``adapter_name`` is not loaded (use ``load_adapter`` to add it).
            PeftConfigError, CheckpointError: the saved adapter differs in config or shapes; nothing changes.
        """
        options = hub.hub_options("PeftModel.hotswap_adapter", kwargs)
        self._check_known([adapter_name])
        self._hotswap(adapter_name, *_read_adapter(model_id, options))

    def _hotswap(self, adapter_name: str, source: hub.AdapterSource, saved: PeftConfig,
                 weights: dict[str, torch.Tensor], mismatch: list[str]) -> None:
        ours, theirs = self.peft_config[adapter_name].to_dict(), saved.to_dict()
        differ = sorted(
            k for k in ours.keys() | theirs.keys()
            if not _HOTSWAP_IGNORED.search(k) and ours.get(k) != theirs.get(k)
        )
        if differ:
            raise PeftConfigError(
                f"Cannot hot-swap {source.label} into adapter {adapter_name!r}: the configs differ in {differ}. "
                "Load it under a new name with load_adapter instead."
            )
        self._load_weights(adapter_name, weights, source.label, mismatch)

    def _base_overrides(self, keys: list[str]) -> dict[str, nn.Parameter]:
        """Checkpoint keys naming base parameters of wrapped modules, e.g. the full embedding matrix HF peft saves
        with ``save_embedding_layers`` (new tokens); they are loaded into the base, and ``unload()`` restores it."""
        model, layer_paths = self.base_model.model, {path for path, _ in self._layers()}
        found = {}
        for key in keys:
            name = key[len(ckpt.KEY_PREFIX):] if key.startswith(ckpt.KEY_PREFIX) else key
            owner, sep, _ = name.partition(".base_layer.")
            if sep and owner in layer_paths:
                with contextlib.suppress(AttributeError):
                    found[key] = model.get_parameter(name)
        return found

    def _load_weights(self, adapter_name: str, weights: dict[str, torch.Tensor], where: str,
                      mismatch: list[str] | None = None) -> None:
        for method, leaf in self._leaves(adapter_name):  # checkpoints written for an older layout of the model
            weights = method.convert_checkpoint(self.base_model.model, leaf, weights)
        expected = self.get_adapter_state_dict(adapter_name, live=True)
        overrides = self._base_overrides([k for k in weights if k not in expected])
        base_names = {k: k[len(ckpt.KEY_PREFIX):] for k in overrides}
        extra, extra_base = embedding_load_targets(self, adapter_name)  # save_embedding_layers, tied copies
        overrides.update({k: t for k, t in extra.items() if k in weights and k not in expected})
        base_names.update({k: n for k, n in extra_base.items() if k in overrides})
        expected_all = {**expected, **overrides}
        on_meta = sorted(k for k, t in expected_all.items() if t.is_meta)
        if on_meta:  # copy_ into a meta tensor is a silent no-op: the adapter would keep no weights
            raise CheckpointError(
                f"{len(on_meta)} adapter tensor(s) are on the meta device (e.g. {on_meta[0]}); nothing was loaded. "
                "Give the model real storage first: peftkit.integrations.training.materialize_meta_tensors(model)."
            )
        problems = ckpt.check_against_model(weights, expected_all, where) + (mismatch or [])
        if problems:
            raise CheckpointError(
                f"The checkpoint in {where} does not fit this model ({len(problems)} problem(s)); nothing was "
                "loaded:\n  - " + "\n  - ".join(problems)
            )
        with torch.no_grad():
            for key, target in expected_all.items():
                if key in base_names:
                    self._base_snapshot.setdefault(base_names[key], target.detach().clone())
                target.copy_(weights[key].to(dtype=target.dtype, device=target.device))


# Config fields a hot-swap may change: bookkeeping, and the choice of initial values the loaded weights replace.

_HOTSWAP_IGNORED = re.compile(r"^(inference_mode|base_model_name_or_path|revision)$|(^|_)init($|_)")

# Module names torch's wrappers insert (FSDP1 units, activation-checkpoint wrappers); their state dicts, and
# peftkit's checkpoint keys, leave them out.
_WRAPPER_HOPS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _without_wrapper_hops(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_HOPS)


def _refuse_shards(tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Raise if a tensor is only this rank's piece of a parameter: saving it would write a partial checkpoint
    (HF peft users get empty adapter files under DeepSpeed ZeRO-3)."""
    for key, tensor in tensors.items():
        if type(tensor).__name__ == "DTensor":  # by name: torch.distributed may be absent from the build
            raise CheckpointError(
                f"Adapter {adapter_name!r}: {key} is sharded (a DTensor, e.g. under FSDP2 fully_shard); nothing was "
                "written. Call peftkit.integrations.training.save_adapter(model, directory) on every rank, or pass "
                "state_dict= a gathered full state dict."
            )
        # ZeRO-3 keeps the full size in ``ds_numel``; FSDP1's flat-parameter views of other ranks' shards are (0,).
        partitioned = getattr(tensor, "ds_numel", tensor.numel()) != tensor.numel()
        if tensor.is_meta or partitioned or (tensor.dim() == 1 and tensor.numel() == 0):
            raise CheckpointError(
                f"Adapter {adapter_name!r}: {key} holds no data on this rank (shape {tuple(tensor.shape)}: a meta "
                "tensor, or a parameter sharded away by FSDP1 or DeepSpeed ZeRO-3); nothing was written. Gather the "
                "weights first and pass them as state_dict= (see docs/training.md)."
            )


def _read_adapter(
    model_id: str | os.PathLike, options: hub.HubOptions, key_mapping: dict[str, str] | None = None,
    need_config: bool = True,
) -> tuple[hub.AdapterSource, PeftConfig | None, dict[str, torch.Tensor], list[str]]:
    """The adapter's files, from a local directory or the Hub: where they are, the config, the weights, and how
    the config differs from the one the weights were saved with (one line per field; see ``_config_mismatch``)."""
    source = hub.resolve_adapter(model_id, options)
    with ckpt.directory_lock(source.directory, shared=True):  # no writer changes the pair while it is read
        resumed = ckpt.interrupted_save_config(source.directory) if need_config else None
        if resumed is not None:  # a save killed between its renames: its weights are complete, take their config
            config = PeftConfig.from_dict(json.loads(resumed))
        else:
            config = PeftConfig.from_pretrained(source.directory) if need_config else None
        weights, saved_text = ckpt.read_adapter_files(source.directory)
    mismatch = _config_mismatch(config, saved_text, source.label) if config is not None else []
    if key_mapping:  # HF peft's semantics: keys without the prefix, the first pattern that matches wins
        remapped = {}
        for key, tensor in weights.items():
            prefix = ckpt.KEY_PREFIX if key.startswith(ckpt.KEY_PREFIX) else ""
            name = key[len(prefix):]
            for pattern, replacement in key_mapping.items():
                name, count = re.subn(pattern, replacement, name)
                if count:
                    break
            remapped[prefix + name] = tensor
        weights = remapped
    return source, config, weights, mismatch


def _config_mismatch(config: PeftConfig, saved_text: str | None, where: str) -> list[str]:
    """How ``adapter_config.json`` differs from the config text peftkit stored in the weights file when it saved
    them: a config from another save (two writers without peftkit's lock, files copied together from two places)
    or edited since. Bookkeeping and init-only fields (those a hot-swap ignores) may differ."""
    if saved_text is None:  # another writer (HF peft): nothing to compare against
        return []
    try:
        saved = PeftConfig.from_dict(json.loads(saved_text)).to_dict()
    except (ValueError, TypeError) as exc:  # the checksum covers this text, so only a newer writer gets here
        return [f"the config stored in the weights file of {where} cannot be read ({exc})"]
    ours = config.to_dict()
    differ = sorted(k for k in ours.keys() | saved.keys()
                    if not _HOTSWAP_IGNORED.search(k) and ours.get(k) != saved.get(k))
    if not differ:
        return []
    fields = ", ".join(f"{k}: {ours.get(k)!r} in adapter_config.json, {saved.get(k)!r} saved with the weights"
                       for k in differ)
    return [f"adapter_config.json does not belong to these weights ({fields}): the two files come from different "
            "saves, or the config was edited after saving. Save the adapter again; to use another config with "
            "these weights on purpose, pass config= to from_pretrained"]


def _refuse_loader_options(ephemeral_gpu_offload: bool, low_cpu_mem_usage: bool) -> None:
    from peftkit.core.model import _refuse_low_cpu_mem_usage

    if ephemeral_gpu_offload:
        raise ValueError(
            "ephemeral_gpu_offload=True is not supported: peftkit has no ephemeral GPU offload (HF peft uses it to "
            "set up weight-decomposed adapters on offloaded weights). Drop the argument."
        )
    _refuse_low_cpu_mem_usage(low_cpu_mem_usage)


@contextlib.contextmanager
def _naming_the_config(where: str | None) -> Iterator[None]:
    """A saved config that does not fit the model (``target_modules``, ``modules_to_save`` naming modules it lacks)
    raises with the file named, so the user knows the checkpoint, not their code, holds the bad value."""
    try:
        yield
    except (PeftConfigError, TargetModuleError) as exc:
        if where is None:
            raise
        raise type(exc)(f"{exc} (from {CONFIG_NAME} in {where})") from exc
