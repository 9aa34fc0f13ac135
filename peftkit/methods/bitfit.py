"""BitFit: fine-tune only the bias terms of a model (plus the task head).

Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models", https://arxiv.org/abs/2106.10199. Hugging Face peft has no BitFit; ``peft_type`` is "BITFIT".

Each selected module gets a per-adapter bias ``b_a``, a copy of its own bias ``b₀`` (zeros for a bias added with
``add_missing_biases``); ``b₀`` stays frozen, so adapters stay independent and can be disabled, mixed per row,
deleted and unloaded bit-identically::

    x ──► module (frozen W, b₀) ──► + (b_a − b₀) ──► h          (linear layer: h = W x + b_a)

The checkpoint is the chosen biases themselves, under their own names (``base_model.model.<path>.bias``).
Merging writes ``b_a`` into the module's bias (giving a bias-less ``nn.Linear`` one); unmerging restores ``b₀``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.config import TunerConfig
from peftkit.core.errors import PeftConfigError, TargetModuleError
from peftkit.core.layer import AdapterLayer, ModulesToSaveWrapper, base_layer_of
from peftkit.core.registry import PeftMethod, register
from peftkit.core.targets import candidate_modules, is_linear_like
from peftkit.integrations.transformers import task_head_names

__all__ = ["BitFitConfig", "BitFitLayer", "BitFitMethod"]

logger = logging.getLogger(__name__)

# Where a module adds its bias: the last dims (features) or dim 1 (channels).
_LAST_DIM_TYPES = (nn.Linear, nn.LayerNorm)
_CHANNEL_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_HALF = (torch.float16, torch.bfloat16)


@dataclass(kw_only=True)
class BitFitConfig(TunerConfig):
    """BitFit settings (peftkit's own method; ``peft_type`` "BITFIT").

    Args:
        bias_names: Which biases train. None: every bias of the model outside the task head. A list selects the
            bias of each module whose path contains an entry as whole dot-separated components: ``"query"``
            selects ``encoder.layer.0.attention.self.query`` (not ``query_proj``), ``"attention.output"`` both
            ``attention.output.dense`` and ``attention.output.LayerNorm``, ``"intermediate"`` the
            ``intermediate.dense`` inside it. An entry that selects no module is an error.
        add_missing_biases: Give the selected linear layers that have no bias a zero-initialised one (Llama, T5);
            without it, selecting only bias-less layers is an error. The output head (``lm_head``) gets one only
            when a ``bias_names`` entry selects it (a learned logit prior), never with ``bias_names=None``.
        init_bitfit_weights: True: each adapter starts as the model's own biases (outputs unchanged). False: plus
            N(0, 0.02²) noise, so that tests see a changed model at once.
        target_modules: Left None, filled with the exact paths of the selected modules and saved, so a reload
            wraps the same modules. Given, it is used as it is (``TunerConfig`` rules) and ``bias_names`` is not.
        exclude_modules, layers_to_transform, layers_pattern: ``TunerConfig``'s, applied to the selection.
        modules_to_save: Trained in full (the task head of ``task_type`` is added); BitFit skips their biases.

    Raises:
        PeftConfigError: ``bias_names`` is not a list of names.
    """

    peft_type: ClassVar[str] = "BITFIT"

    bias_names: list[str] | None = None
    add_missing_biases: bool = False
    init_bitfit_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.bias_names, (set, tuple)):
            self.bias_names = sorted(self.bias_names)
        names = self.bias_names
        if names is not None and (
            not isinstance(names, list) or not names
            or not all(isinstance(n, str) and n and not n.startswith(".") and not n.endswith(".") for n in names)
        ):
            raise PeftConfigError(
                f"BitFitConfig.bias_names must be None or a non-empty list of module-path components such as "
                f"['query', 'intermediate'], got {names!r}."
            )


def _has_components(path: str, name: str) -> bool:
    """Whether ``name`` occurs in ``path`` as whole dot-separated components (``"a.b"`` in ``"x.a.b.y"``)."""
    return f".{name}." in f".{path}."


def _bias_axis(module: nn.Module) -> int | None:
    """The output dim the module adds its bias along (-1: trailing features, 1: channels), None if unsupported."""
    if isinstance(module, _LAST_DIM_TYPES) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf")):
        return -1
    return 1 if isinstance(module, _CHANNEL_TYPES) else None


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


class BitFitLayer(AdapterLayer):
    """Per-adapter bias of one module; https://arxiv.org/abs/2106.10199.

    ``h = f(x) − b₀ + b_a``: for a linear layer ``h = W x + b_a``, for a LayerNorm ``h = γ ⊙ x̂ + b_a``. Several
    active adapters add their ``b_a − b₀``.

    Args:
        base_layer: A module with a bias (``nn.Linear``, transformers ``Conv1D``, ``nn.LayerNorm``,
            ``nn.Conv1d/2d/3d``, ``nn.GroupNorm``, ``nn.BatchNorm*d``), or a bias-less linear layer when the config
            adds missing biases.
        adapter_name: Name of the first adapter.
        config: Its ``BitFitConfig``.
        module_name: Full module name, for messages.

    Shapes: ``b_a`` has the bias's shape, ``(C,)``; it is added along the last dims of the output (linear layers,
    LayerNorm) or along dim 1 (convolutions, GroupNorm, BatchNorm).

    Raises:
        TargetModuleError: the module type has no supported bias.
        PeftConfigError: the module has no bias and the config does not add missing ones.
    """

    adapter_param_names = ("bitfit_bias",)
    method_name = "BitFit"
    weight_effect = "add"  # b ← b + (b_a − b₀): commutes with other additive merges
    merge_state_attrs = ("_unmerged_bias",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BitFitConfig, module_name: str) -> None:
        super().__init__(base_layer)
        base = base_layer_of(base_layer)
        self.bias_axis = _bias_axis(base)
        if self.bias_axis is None or not (_has_bias(base) or is_linear_like(base)):
            raise TargetModuleError(
                f"BitFit cannot train the bias of {module_name} ({type(base).__name__}); supported: nn.Linear, "
                "transformers Conv1D, nn.LayerNorm, nn.Conv1d/2d/3d, nn.GroupNorm, nn.BatchNorm*d. Leave it out of "
                "bias_names / target_modules."
            )
        # A bias-less linear layer gets its bias from BitFit; b₀ is then zero and merging creates the parameter.
        self.adds_bias = not _has_bias(base)
        out_features = base.out_features if isinstance(base, nn.Linear) else base.weight.shape[-1]  # Conv1D: (in, out)
        self.bias_shape = (out_features,) if self.adds_bias else tuple(base.bias.shape)
        source = base.weight if self.adds_bias else base.bias
        # Half-precision (or quantized) bases keep fp32 biases, as LoRA's adapters: lr·grad steps vanish in bf16.
        half_or_int = source.dtype in _HALF or not source.dtype.is_floating_point
        self.dtype = torch.float32 if half_or_int else source.dtype
        self.bitfit_bias = nn.ParameterDict()
        self._unmerged_bias: torch.Tensor | None = None  # b₀ while adapters are merged; unmerge restores it exactly
        self.update_layer(adapter_name, config, module_name)

    def update_layer(self, adapter_name: str, config: BitFitConfig, module_name: str) -> None:
        if self.adds_bias and not config.add_missing_biases:
            raise PeftConfigError(
                f"{module_name} has no bias for BitFit to train. Pass add_missing_biases=True to add a "
                "zero-initialised one, or leave the module out of bias_names / target_modules."
            )
        device = self.get_base_layer().weight.device
        self.bitfit_bias[adapter_name] = nn.Parameter(torch.empty(self.bias_shape, device=device, dtype=self.dtype))
        self.reset_adapter_parameters(adapter_name, config.init_bitfit_weights)

    def reset_adapter_parameters(self, adapter_name: str, init: bool) -> None:
        """``b_a = b₀``: BitFit fine-tunes the pretrained biases (paper Sec. 2), so the model is unchanged at step 0.
        ``init=False`` adds N(0, 0.02²) noise for tests."""
        with torch.no_grad():
            bias = self.bitfit_bias[adapter_name]
            bias.copy_(self._reference_bias())
            if not init:
                bias.add_(torch.randn_like(bias) * 0.02)

    def _reference_bias(self) -> torch.Tensor:
        """``b₀``: the module's bias before any adapter was merged (zeros for an added bias)."""
        if self.adds_bias:
            return torch.zeros(self.bias_shape, device=self.get_base_layer().weight.device, dtype=self.dtype)
        return self._unmerged_bias if self.merged_adapters else self.get_base_layer().bias

    def _delta(self, name: str) -> torch.Tensor:
        bias = self.bitfit_bias[name]
        return bias if self.adds_bias else bias - self._reference_bias().to(bias.dtype)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        # Keyed "bias", not "bitfit_bias": the checkpoint is then literally the fine-tuned model's biases under
        # their own names, which a plain model can load with load_state_dict(strict=False).
        return {"bias": self.bitfit_bias[adapter_name]} if adapter_name in self.bitfit_bias else {}

    # ---- forward -------------------------------------------------------------------------------------------
    def _broadcast(self, delta: torch.Tensor, ndim: int) -> torch.Tensor:
        """``delta`` (*bias_shape), or per row (B, *bias_shape), shaped to broadcast over an ``ndim``-dim output."""
        lead = delta.shape[: delta.dim() - len(self.bias_shape)]  # () or (B,)
        if self.bias_axis == 1:  # channels right after the batch dim: (B, C, *spatial)
            return delta.reshape(*lead, *self.bias_shape, *[1] * (ndim - 2))
        return delta.reshape(*lead, *[1] * (ndim - len(lead) - len(self.bias_shape)), *self.bias_shape)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(result)
        if self._skip_adapters():
            return result
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = result + self._broadcast(self._delta(name), result.dim()).to(result.dtype)
        return result

    def _mixed_batch_forward(self, result: torch.Tensor) -> torch.Tensor:
        # One delta row per example (zeros for base rows and adapters this layer lacks): a single add.
        dtype = next(iter(self.bitfit_bias.values())).dtype
        per_row = torch.zeros((result.shape[0], *self.bias_shape), device=result.device, dtype=dtype)
        for name, rows in self.rows_per_adapter(result.shape[0]).items():
            if name in self.bitfit_bias:
                per_row[rows.to(result.device)] = self._delta(name)
        return result + self._broadcast(per_row, result.dim()).to(result.dtype)

    # ---- merging: the bias is replaced, so the additive delta_weight contract does not apply ------------------
    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        for name in self._to_merge(adapter_names):
            if not torch.isfinite(self.bitfit_bias[name]).all():
                raise ValueError(f"Adapter {name!r} holds non-finite biases in {type(self).__name__}; nothing merged.")

    def merge(self, adapter_names: list[str] | None = None, safe: bool = False) -> None:
        names = self._to_merge(adapter_names)
        if not names:
            return
        if safe:
            self.check_merge(names)
        base = self.get_base_layer()
        with torch.no_grad():
            delta = sum(self._delta(n) for n in names)  # relative to b₀: computed before the bias changes
            if not self.merged_adapters and not self.adds_bias:
                self._unmerged_bias = base.bias.detach().clone()
            if base.bias is None:  # an added bias: the merged linear layer gets a real one
                dtype = base.weight.dtype if base.weight.is_floating_point() else self.dtype
                base.bias = nn.Parameter(delta.to(dtype), requires_grad=False)
            else:  # summed in fp32 (at least) and rounded once: a half-precision delta would round twice
                acc = torch.promote_types(base.bias.dtype, torch.float32)
                base.bias.copy_(base.bias.to(acc) + delta.to(acc))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        base = self.get_base_layer()
        if self.adds_bias:
            base.bias = None  # the module had no bias: unload leaves it exactly as it was
        else:
            with torch.no_grad():
                base.bias.copy_(self._unmerged_bias)
        self._unmerged_bias = None
        self.merged_adapters.clear()


@register(BitFitConfig)
class BitFitMethod(PeftMethod):
    """Selects biases by ``bias_names`` and wraps their modules in ``BitFitLayer``s."""

    layer_class = BitFitLayer

    @classmethod
    def prepare_config(cls, model: nn.Module, config: BitFitConfig) -> BitFitConfig:
        """Turn ``bias_names`` into the exact module paths to wrap (``target_modules``).

        Raises:
            PeftConfigError: an entry selects nothing, or the selection has no bias and none may be added.
        """
        if config.target_modules is not None:
            return config
        heads = set(config.modules_to_save or []) | set(task_head_names(model, config.task_type))
        get_head = getattr(model, "get_output_embeddings", None)
        output_head = get_head() if callable(get_head) else None
        with_bias, without_bias, unsupported, seen, copied = [], [], [], [], []
        for name, module in candidate_modules(model):
            base = base_layer_of(module)
            if isinstance(module, ModulesToSaveWrapper):  # a head another adapter trains in full, with its children
                copied.append(name)
            in_copied_head = any(name == c or name.startswith(c + ".") for c in copied)
            if in_copied_head or any(_has_components(name, h) for h in heads):
                continue
            if not (_has_bias(base) or is_linear_like(base)):
                continue
            seen.append(name)
            if config.bias_names is not None and not any(_has_components(name, n) for n in config.bias_names):
                continue
            if _has_bias(base):
                (with_bias if _bias_axis(base) is not None else unsupported).append(name)
            elif base is not output_head or config.bias_names is not None:  # the LM head only when named
                without_bias.append(name)
        _check_names(config.bias_names or [], seen, model)
        if unsupported:
            logger.warning("BitFit skips biases of module types it does not support: %s", ", ".join(unsupported))
        selected = with_bias + without_bias if config.add_missing_biases else with_bias
        if not selected:
            hint = f" (e.g. {without_bias[0]})" if without_bias else ""
            raise PeftConfigError(
                f"{type(model).__name__} has no bias terms in the modules BitFit selects{hint}, so there is nothing "
                "to train. Pass add_missing_biases=True to add zero-initialised biases to the selected linear "
                "layers, or select other modules with bias_names."
            )
        order = {n: i for i, n in enumerate(seen)}
        return dataclasses.replace(config, target_modules=sorted(selected, key=order.__getitem__))

    @classmethod
    def layer_for(cls, target: nn.Module, config: BitFitConfig, adapter_name: str, module_name: str) -> AdapterLayer:
        return BitFitLayer(target, adapter_name, config, module_name)


def _check_names(names: list[str], paths: list[str], model: nn.Module) -> None:
    missing = [n for n in names if not any(_has_components(p, n) for p in paths)]
    if missing:
        parts = sorted({part for p in paths for part in p.split(".") if not part.isdigit()})
        hints = "; ".join(f"{n!r}: close names {difflib.get_close_matches(n, parts, n=5, cutoff=0.5)}"
                          for n in missing)
        raise PeftConfigError(
            f"BitFitConfig.bias_names {missing} select no module with a bias (or linear layer) in "
            f"{type(model).__name__} ({hints}). Fix or remove them; model.named_modules() lists the paths."
        )
