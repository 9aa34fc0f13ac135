"""``PeftModel``: a frozen base model plus named adapters, with HF peft's public API.

The base model sits at ``peft_model.base_model.model`` (as in HF peft) so parameter names, and with them the
checkpoint keys, are HF peft's. Nothing here knows a method by name: every method-specific decision is a
hook of the method class found in the registry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import warnings
import weakref
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.checkpointing import AdapterCheckpoints
from peftkit.core.config import PeftConfig, TaskType, TunerConfig
from peftkit.core.controls import AdapterControls
from peftkit.core.errors import AdapterNotFoundError, PeftConfigError
from peftkit.core.host import BaseModelHost
from peftkit.core.inject import adapter_layers, add_modules_to_save, inject_adapter, remove_adapter, replace_module
from peftkit.core.layer import BASE_ADAPTER_NAME, AdapterLayer, AdapterModule, AdapterModuleGroup
from peftkit.core.merging import merge_and_unload_layers, merge_layers
from peftkit.core.registry import ForwardCall, PeftMethod, method_for
from peftkit.integrations import trainer_hook
from peftkit.integrations.transformers import task_head_names

__all__ = ["PeftModel", "TASK_MODEL_CLASSES"]


class _BoundForward(functools.partial):
    """``peft_model.forward``, reporting the base model's signature (plus ``adapter_names``): the transformers
    Trainer keeps only the dataset columns that ``forward``'s signature names, and special-cases HF peft alone."""

    @property
    def __signature__(self) -> inspect.Signature:
        base = inspect.signature(self.args[0].base_model.model.forward)
        params = list(base.parameters.values())
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None))
        return base.replace(parameters=params)


class _ForwardDescriptor:
    def __get__(self, obj: PeftModel | None, objtype: type | None = None) -> Any:
        return PeftModel._forward if obj is None else _BoundForward(PeftModel._forward, obj)


class PeftModel(AdapterCheckpoints, AdapterControls, nn.Module):
    """A base model with one or more adapters injected.

    Args:
        model: Any ``nn.Module``; transformers models get architecture defaults and task heads.
        peft_config: The first adapter's config.
        adapter_name: The first adapter's name.

    Raises:
        TargetModuleError, PeftConfigError: the config does not fit the model; the model is left unchanged.
    """

    # The task a subclass serves (``PeftModelForCausalLM``: ``CAUSAL_LM``); ``get_peft_model`` and
    # ``PeftModel.from_pretrained`` pick the subclass registered for a config's ``task_type``.
    task_type: ClassVar[TaskType | None] = None

    # Trainer integration: transformers' Trainer refuses a quantized model (QLoRA) unless this says adapters are
    # attached; its own PEFT integration sets it on the models it adapts, and nothing else reads it off a model that
    # is not a PreTrainedModel. ``__init__`` arms adapter-only Trainer checkpoints (integrations/trainer_hook.py).
    _hf_peft_config_loaded: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("task_type") is not None:
            TASK_MODEL_CLASSES.setdefault(TaskType(cls.task_type), cls)

    @classmethod
    def class_for(cls, config: PeftConfig) -> type[PeftModel]:
        """The class to build for ``config``: ``cls`` itself, or, called on ``PeftModel``, the subclass registered
        for ``config.task_type`` (HF peft's ``MODEL_TYPE_TO_PEFT_MODEL_MAPPING``)."""
        if cls is PeftModel and config.task_type is not None:
            return TASK_MODEL_CLASSES.get(TaskType(config.task_type), cls)
        return cls

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        _refuse_low_cpu_mem_usage(low_cpu_mem_usage)
        super().__init__()
        self.base_model = BaseModelHost(model)
        self.base_model.__dict__["_owner"] = weakref.ref(self)  # a plain attribute: no module cycle
        self.adapter_modules = nn.ModuleDict()
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self._before_forward: tuple[tuple[type[PeftMethod], str], ...] = ()  # see _refresh_step_hooks
        self._aux_losses: tuple[tuple[type[PeftMethod], str], ...] = ()
        self._adapters_disabled = False
        self._base_snapshot: dict[str, torch.Tensor] = {}
        self._requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        self._freeze_active = False  # set_adapter(..., inference_mode=True)
        model.requires_grad_(False)
        try:
            self.add_adapter(adapter_name, peft_config)
        except BaseException:
            self._restore_requires_grad()
            raise
        self.set_adapter(adapter_name)
        if not autocast_adapter_dtype:
            self._cast_adapter_to_base_dtype(adapter_name)
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing:
            self._inputs_require_grads()
        trainer_hook.arm()  # Trainer integration

    def _inputs_require_grads(self) -> None:
        # Reentrant checkpointing drops the gradients of a block whose inputs do not require grad, and with a
        # frozen embedding they never do: the adapters inside the block would silently get no gradient.
        model = self.base_model.model
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Enable checkpointing on the base model, and make its inputs carry gradients so adapters train.

        ``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint`` (``{"use_reentrant": True}``).
        """
        model = self.base_model.model
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs,
                                                  **kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
        self._inputs_require_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any
                                        ) -> None:
        """transformers 5's name for ``gradient_checkpointing_enable``, which ``Trainer`` calls; defined here so
        that the call does not pass through to the base model and skip the input gradients."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    # ---- pass-through --------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
        bound = self._model_api(name)
        return bound if bound is not None else getattr(self.base_model.model, name)

    def _model_api(self, name: str) -> Any:
        """A model-level call a method offers (e.g. a rank allocator's update step), bound to this model."""
        for config in self.__dict__.get("peft_config", {}).values():
            method = method_for(config)
            if name in method.model_api:
                return functools.partial(getattr(method, name), self)
        return None

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    forward = _ForwardDescriptor()

    def _forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward. In training, methods' auxiliary losses are added to ``outputs.loss``."""
        for method, name in self._before_forward:
            method.before_forward(self, name)
        model = self.base_model.model
        with self._mixed_batch(adapter_names, args, kwargs), self._call_context(adapter_names, args, kwargs) as call:
            if call is None:
                outputs = model(*args, **kwargs)
            else:
                outputs = model(**call.kwargs)
                for hook in call.output_hooks:
                    outputs = hook(outputs)
        if self.training and getattr(outputs, "loss", None) is not None:
            extra = self.auxiliary_loss()
            if extra is not None:
                outputs.loss = outputs.loss + extra
        return outputs

    def auxiliary_loss(self) -> torch.Tensor | None:
        """Sum of the active adapters' regularisers (e.g. an orthogonality penalty), or None.

        ``forward`` adds it to ``outputs.loss`` in training mode; a training loop that computes its own loss
        from the logits adds ``model.auxiliary_loss()`` itself.
        """
        total = None
        for method, name in self._aux_losses:
            term = method.auxiliary_loss(self, name)
            if term is not None:
                total = term if total is None else total + term
        return total

    def _refresh_step_hooks(self) -> None:
        # forward reads these instead of the active names: a compiled model guards on every Python value forward
        # reads, and adapters whose methods have no such hook (most) then leave no name for it to guard on.
        pairs = [(method, name) for name in self._active for method, _ in self._leaves(name)]
        self._before_forward = tuple(p for p in pairs if _overrides(p[0], "before_forward"))
        self._aux_losses = tuple(p for p in pairs if _overrides(p[0], "auxiliary_loss"))

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        model = self.base_model.model
        with self._mixed_batch(adapter_names, args, kwargs):
            with self._call_context(adapter_names, args, kwargs, generating=True) as call:
                if call is None:
                    return model.generate(*args, **kwargs)
                outputs = model.generate(**call.kwargs)
                for hook in call.output_hooks:
                    outputs = hook(outputs)
                return outputs

    @contextlib.contextmanager
    def _call_context(
        self, adapter_names: list[str] | None, args: tuple, kwargs: dict, generating: bool = False
    ) -> Iterator[ForwardCall | None]:
        """Let methods with a ``forward_context`` rewrite the inputs; None when no method has one (the fast path)."""
        methods: dict[type[PeftMethod], list[str]] = {}
        for name in self.peft_config:
            for method, _ in self._leaves(name):
                if method.forward_context.__func__ is not PeftMethod.forward_context.__func__:
                    methods.setdefault(method, [])
                    in_play = name in adapter_names if adapter_names is not None else name in self._active
                    if in_play and not self._adapters_disabled:
                        methods[method].append(name)
        if not methods:
            yield None
            return
        call = ForwardCall(self.base_model.model, self._named_inputs(args, kwargs, generating), adapter_names,
                           generating)
        with contextlib.ExitStack() as stack:
            for method, names in methods.items():
                stack.enter_context(method.forward_context(self, names, call))
            yield call

    def _named_inputs(self, args: tuple, kwargs: dict, generating: bool) -> dict[str, Any]:
        kwargs = dict(kwargs)
        if generating:  # generate(inputs, generation_config, ...): the first argument is the prompt
            if "inputs" in kwargs:
                kwargs.setdefault("input_ids", kwargs.pop("inputs"))
            names = ["input_ids", "generation_config"]
        else:
            names = list(inspect.signature(self.base_model.model.forward).parameters)
        if len(args) > len(names):
            raise TypeError(f"Too many positional arguments ({len(args)}); pass the inputs by name.")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"Input {name!r} given both by position and by name.")
            kwargs[name] = value
        return kwargs

    # ---- adapters ------------------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def _layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        return adapter_layers(self.base_model.model)

    def _leaves(self, adapter_name: str) -> list[tuple[type[PeftMethod], PeftConfig]]:
        """The (method, config) pairs an adapter consists of: one, or a composite's members."""
        config = self.peft_config[adapter_name]
        return [(method_for(m), m) for m in method_for(config).members(config)]

    def member_config(self, adapter_name: str, method: type[PeftMethod]) -> PeftConfig:
        """``method``'s config in ``adapter_name``: the adapter's own, or its member's when it is a composite."""
        for leaf_method, leaf in self._leaves(adapter_name):
            if leaf_method is method:
                return leaf
        raise AdapterNotFoundError(f"Adapter {adapter_name!r} has no {method.name()} part.")

    def adapter_module(self, adapter_name: str, method: type[PeftMethod]) -> AdapterModule:
        """``method``'s module of ``adapter_name`` (a member's module when the adapter is a composite)."""
        return self.adapter_modules[adapter_name].member(method.name())

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Inject a new adapter (inactive until ``set_adapter``). On any error the model is left as it was."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"Adapter name {adapter_name!r} must be a non-empty string without '.'.")
        if adapter_name == BASE_ADAPTER_NAME:
            raise ValueError(f"{BASE_ADAPTER_NAME!r} is reserved for base-model rows of a mixed batch.")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} exists already; delete_adapter it first or pick a new name.")
        if type(self).task_type is not None:
            peft_config = self._with_own_task_type(peft_config)
        method = method_for(peft_config)
        config = self._complete_config(peft_config, method)
        model = self.base_model.model
        try:
            leaves = [(method_for(m), m) for m in method.members(config)]
            modules: dict[str, AdapterModule] = {}
            for leaf_method, leaf in leaves:
                inject_adapter(model, leaf_method, leaf, adapter_name)
                module = leaf_method.adapter_module(self, leaf, adapter_name)
                if module is not None:
                    modules[leaf_method.name()] = module
            if modules:
                module = next(iter(modules.values())) if len(modules) == 1 else AdapterModuleGroup(modules)
                module.train(self.training)
                self.adapter_modules[adapter_name] = module
                module.attach(model)
            if config.modules_to_save:
                add_modules_to_save(model, config.modules_to_save, adapter_name)
            for leaf_method, leaf in leaves:
                for name in leaf_method.trainable_base_parameters(model, leaf):
                    self._base_snapshot.setdefault(name, model.get_parameter(name).detach().clone())
        except BaseException:
            self._remove_adapter_module(adapter_name)
            remove_adapter(model, adapter_name)
            raise
        self.peft_config[adapter_name] = config
        for _, layer in self._layers():  # new layers follow the model's active set; the new adapter stays inactive
            layer.set_adapter(self._active)
            layer.disable_adapters = self._adapters_disabled  # and its disable_adapter_layers(): base model only
        self._apply_trainability()

    def _with_own_task_type(self, config: PeftConfig) -> PeftConfig:
        """A config without ``task_type`` gets this class's (so ``PeftModelForSequenceClassification`` trains the
        classifier, as in HF peft); one naming another task is refused rather than served by the wrong class."""
        if config.task_type is None:
            return dataclasses.replace(config, task_type=type(self).task_type)
        if TaskType(config.task_type) is not type(self).task_type:
            raise PeftConfigError(
                f"{type(self).__name__} serves task_type={type(self).task_type.value!r} but the config has "
                f"task_type={config.task_type.value!r}; use PeftModel / get_peft_model, which pick the class from the "
                "config, or change the config's task_type."
            )
        return config

    def _cast_adapter_to_base_dtype(self, adapter_name: str) -> None:
        """HF peft's ``autocast_adapter_dtype=False``: adapter weights in the dtype of the weight they adapt, also
        for fp16/bf16 bases (peftkit otherwise keeps those adapters in fp32, where small updates survive)."""
        for _, layer in self._layers():
            base_weight = getattr(layer.get_base_layer(), "weight", None)
            if base_weight is None or base_weight.dtype not in (torch.float16, torch.bfloat16):
                continue
            for param in layer.iter_adapter_parameters(adapter_name):
                if param.is_floating_point():
                    param.data = param.data.to(base_weight.dtype)

    def _remove_adapter_module(self, adapter_name: str) -> None:
        if adapter_name in self.adapter_modules:
            self.adapter_modules[adapter_name].detach(self.base_model.model)
            del self.adapter_modules[adapter_name]

    def _complete_config(self, config: PeftConfig, method: type[PeftMethod], heads: bool = True) -> PeftConfig:
        """Fill what the user left to defaults: targets for the architecture, the task head (added once, for the
        whole adapter, when it has members)."""
        model = self.base_model.model
        members = method.members(config)
        if len(members) != 1 or members[0] is not config:
            config = method.with_members(config, [self._complete_config(m, method_for(m), False) for m in members])
        else:
            config = method.prepare_config(model, config)
        changes: dict[str, Any] = {}
        if isinstance(config, TunerConfig) and config.target_modules is None:
            defaults = method.default_target_modules(model)
            if defaults is None:  # no table entry, and no attention block to derive targets from
                from peftkit.integrations.default_targets import describe_candidates

                raise PeftConfigError(
                    f"{type(config).__name__}.target_modules is None and peftkit has no default for "
                    f"{type(model).__name__}: no table knows its model_type and it has no attention block to take "
                    f"the projections from. Its linear layers: {describe_candidates(model)}; pass target_modules "
                    "(names from model.named_modules(), or 'all-linear')."
                )
            changes["target_modules"] = defaults
        if not heads:
            return dataclasses.replace(config, **changes) if changes else config
        absent = task_head_names(model, config.task_type, present=False)
        kept = [m for m in config.modules_to_save or [] if m not in absent]
        heads = [h for h in task_head_names(model, config.task_type) if h not in kept]
        if heads or len(kept) != len(config.modules_to_save or []):
            changes["modules_to_save"] = (kept + heads) or None
        return dataclasses.replace(config, **changes) if changes else config

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make one adapter, or several that add up, active; only active adapters are trainable, and with
        ``inference_mode=True`` not even those (HF peft's argument)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_known(names)
        leaving = sorted({n for _, layer in self._layers() for n in layer.merged_adapters} - set(names))
        if leaving:  # left merged, they would keep changing the outputs of a model that says they are inactive
            warnings.warn(f"Adapter(s) {leaving} are merged and not in the new active set {names}: unmerging the "
                          "model first, as HF peft does. Call merge_adapter() again to merge the new set.",
                          stacklevel=2)
            self.unmerge_adapter()
        for _, layer in self._layers():
            layer.set_adapter(names)
        self._active = names
        self._refresh_step_hooks()
        self._freeze_active = inference_mode
        self._apply_trainability()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove one adapter. Base parameters it trained (layer norms, biases) get their original
        values back, as ``unload()`` gives them, unless another adapter still trains them (they are shared)."""
        self._check_known([adapter_name])
        merged = [name for name, layer in self._layers() if adapter_name in layer.merged_adapters]
        if merged:  # checked before anything is removed: a refusal changes nothing
            raise RuntimeError(f"Adapter {adapter_name!r} is merged into {len(merged)} layer(s) (e.g. {merged[0]}); "
                               "call unmerge_adapter() before deleting it. Nothing was changed.")
        released = {id(t) for t in self._released_base_parameters(adapter_name).values()}
        model = self.base_model.model
        snapshot = {name: (_parameter(model, name), original) for name, original in self._base_snapshot.items()}
        self._remove_adapter_module(adapter_name)
        remove_adapter(model, adapter_name)
        del self.peft_config[adapter_name]
        # Snapshot names may pass through layers just removed: re-key what is kept by the parameters' current names.
        current = {id(t): name for name, t in model.named_parameters(remove_duplicate=False)}
        self._base_snapshot = {}
        with torch.no_grad():
            for name, (param, original) in snapshot.items():
                if id(param) in released:
                    param.copy_(original)
                    param.requires_grad_(False)  # frozen again, like every base parameter no adapter trains
                else:
                    self._base_snapshot[current.get(id(param), name)] = original
        remaining = [n for n in self._active if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        if remaining:
            self.set_adapter(remaining)
        else:
            self._active = []
            self._refresh_step_hooks()

    def _released_base_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """Base parameters ``adapter_name`` trains and no other adapter does."""
        model = self.base_model.model

        def claimed(name: str) -> dict[str, nn.Parameter]:
            return {p: model.get_parameter(p) for m, leaf in self._leaves(name)
                    for p in m.trainable_base_parameters(model, leaf)}

        # By identity: two methods may spell one parameter's name differently.
        kept = {id(t) for other in self.peft_config if other != adapter_name for t in claimed(other).values()}
        return {name: t for name, t in claimed(adapter_name).items() if id(t) not in kept}

    def _check_known(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterNotFoundError(f"Adapter(s) {unknown} not loaded; loaded adapters: {list(self.peft_config)}.")

    def _apply_trainability(self) -> None:
        model = self.base_model.model
        layers = [layer for _, layer in self._layers()]
        shared: dict[str, bool] = {}  # base parameters (biases) several adapters may train: trainable if any is
        for name, config in self.peft_config.items():
            trainable = name in self._active and not config.inference_mode and not self._freeze_active
            for layer in layers:
                layer.set_trainable(name, trainable)
            if name in self.adapter_modules:
                self.adapter_modules[name].requires_grad_(trainable)
            for method, leaf in self._leaves(name):
                for param_name in method.trainable_base_parameters(model, leaf):
                    shared[param_name] = shared.get(param_name, False) or trainable
        for param_name, trainable in shared.items():
            model.get_parameter(param_name).requires_grad_(trainable)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: list[str] | None, args: tuple, kwargs: dict) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        self._check_mixed_batch(list(adapter_names), args, kwargs)
        if self._adapters_disabled:  # every row is the base model's, as in HF peft and for prompt methods here
            yield
            return
        layers = [layer for _, layer in self._layers()]
        try:
            for layer in layers:
                layer.batch_adapter_names = list(adapter_names)
            yield
        finally:
            for layer in layers:
                layer.batch_adapter_names = None

    def _check_mixed_batch(self, names: list[str], args: tuple, kwargs: dict) -> None:
        if self.training:
            raise ValueError("Mixed-batch inference (adapter_names=...) needs eval mode; call model.eval() first.")
        self._check_known([n for n in dict.fromkeys(names) if n != BASE_ADAPTER_NAME])
        merged = sorted({n for _, layer in self._layers() for n in layer.merged_adapters})
        if merged:
            raise ValueError(f"Adapter(s) {merged} are merged; call unmerge_adapter() before a mixed batch.")
        for name in dict.fromkeys(names):
            if name == BASE_ADAPTER_NAME:
                continue
            refusing = [leaf.peft_type for method, leaf in self._leaves(name) if not method.supports_mixed_batch]
            if refusing:
                raise NotImplementedError(f"Adapter {name!r}: {refusing} adapters do not support mixed batches.")
        first = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] != len(names):
            raise ValueError(
                f"adapter_names has {len(names)} entries for a batch of {first.shape[0]}; pass one per row."
            )

    # ---- merging -------------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights; ``unmerge_adapter`` undoes it.

        Raises:
            ValueError: adapters are disabled (``disable_adapter_layers`` or inside ``disable_adapter()``), where
                the model must compute the base model's outputs; merged weights would change them.
        """
        names = self._active if adapter_names is None else list(adapter_names)
        self._check_known(names)
        if self._adapters_disabled:
            raise ValueError(
                "Adapters are disabled, so the model computes the base model; merging now would change its outputs. "
                "Call enable_adapter_layers() (or leave the disable_adapter() block) first."
            )
        merge_layers(self, names, safe=safe_merge)  # all or nothing (core/merging.py)

    def unmerge_adapter(self) -> None:
        for _, layer in self._layers():
            layer.unmerge()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        dequantize: bool = False,
    ) -> nn.Module:
        """Merge adapters into the weights and return the plain base model (trained heads included).

        Args:
            dequantize: Layers over a quantized base become float layers holding the exact merged weight,
                instead of being re-quantized (which rounds).
        """
        names = self._active if adapter_names is None else list(adapter_names)
        self._check_known(names)
        merge_and_unload_layers(self, names, safe=safe_merge, dequantize=dequantize)  # all or nothing
        return self.base_model.model

    def unload(self) -> nn.Module:
        """Remove every adapter and return the base model with its original modules and weights."""
        model = self.base_model.model
        with torch.no_grad():  # before unwrapping: the names run through the adapter layers
            for name, original in self._base_snapshot.items():
                model.get_parameter(name).copy_(original)
        self._base_snapshot = {}
        for name in list(self.adapter_modules):
            self._remove_adapter_module(name)
        for name, layer in reversed(list(self._layers())):
            layer.unmerge()
            replace_module(model, name, layer.base_layer)
        self._restore_requires_grad()
        return model

    def _restore_requires_grad(self) -> None:
        for name, param in self.base_model.model.named_parameters():
            if name in self._requires_grad_before:
                param.requires_grad_(self._requires_grad_before[name])

def _parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def _overrides(method: type[PeftMethod], hook: str) -> bool:
    return getattr(method, hook).__func__ is not getattr(PeftMethod, hook).__func__


# ``PeftModel`` subclass per task type, filled as the subclasses are defined (peftkit.core.task_models).
TASK_MODEL_CLASSES: dict[TaskType, type[PeftModel]] = {}


def _refuse_low_cpu_mem_usage(low_cpu_mem_usage: bool) -> None:
    if low_cpu_mem_usage:
        raise ValueError(
            "low_cpu_mem_usage=True is not supported: peftkit allocates each adapter's weights once, in place (they "
            "are small), and PeftModel.from_pretrained copies the saved ones into them. Drop the argument; to avoid "
            "materialising a large base twice, build it on the meta device (docs/training.md, meta-device init)."
        )
