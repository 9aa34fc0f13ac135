"""(IA)³: learned vectors that rescale the keys, the values and the feed-forward activation.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
https://arxiv.org/abs/2205.05638. Reference behaviour and checkpoint layout: Hugging Face peft ``tuners/ia3``
(key ``<path>.ia3_l``, shape ``(out, 1)`` on the output side, ``(1, in)`` on the input side; ``(1, C, 1, ...)``
for convolutions)::

    key / value projection:   x ──► W ──► ⊙ l ──► h       h = l ⊙ (W x + b)
    FFN down-projection:      x ──► ⊙ l ──► W ──► h       h = W (l ⊙ x) + b,  x = f(W₁ x′) the FFN activation

Both forms fold into the weight (rows, resp. columns, of ``W`` scaled by ``l``), so a merged model costs exactly
the base model. Vectors start at one: the model is unchanged at step 0.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.config import TunerConfig, check_regex
from peftkit.core.errors import PeftConfigError, TargetModuleError
from peftkit.core.layer import AdapterLayer, base_layer_of
from peftkit.core.registry import PeftMethod, register
from peftkit.integrations.default_targets import (
    IA3_FEEDFORWARD,
    IA3_TARGETS,
    derive_key_value_feedforward,
    feedforward_entries,
    table_entry,
)

__all__ = ["IA3Config", "IA3Layer", "IA3Method"]

# HF peft's defaults per model_type: keys (or the fused qkv projection), values and the FFN down projection, whose
# input (the FFN activation) is rescaled. Elsewhere the same roles are found in the module tree.
DEFAULT_TARGETS = IA3_TARGETS
DEFAULT_FEEDFORWARD = IA3_FEEDFORWARD
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_HALF = (torch.float16, torch.bfloat16)


@dataclass(kw_only=True)
class IA3Config(TunerConfig):
    """(IA)³ settings, with Hugging Face peft's names and defaults.

    Args:
        target_modules: Modules that get a vector (``TunerConfig`` matching rules). None: HF peft's default for
            the architecture, e.g. ``["k_proj", "v_proj", "down_proj"]`` for Llama.
        feedforward_modules: Targets scaled on their input (``W (l ⊙ x)``) rather than their output. A string is a
            regex that must match the full module name; a list marks every target whose name *ends with* an
            entry (plain ``str.endswith``, HF peft's rule: the vector's shape depends on it, so both libraries
            must classify alike; e.g. BERT's ``"output.dense"`` also marks ``attention.output.dense``). A list
            must be a subset of a ``target_modules`` list. None: the architecture's default.
        fan_in_fan_out: Read by HF peft; peftkit takes the layout from the module (GPT-2's ``Conv1D`` stores
            ``(in, out)``), so the value is recorded but not used.
        init_ia3_weights: True: vectors of ones (outputs unchanged). False: standard normal, as HF peft (tests).
        modules_to_save: Modules trained in full and saved; the task head of ``task_type`` is added.

    Raises:
        PeftConfigError: ``feedforward_modules`` has the wrong type or is not a subset of ``target_modules``.
    """

    peft_type: ClassVar[str] = "IA3"

    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        ff = self.feedforward_modules
        if isinstance(ff, (set, tuple)):
            self.feedforward_modules = ff = sorted(ff)
        elif ff is not None and not isinstance(ff, (str, list)):
            raise PeftConfigError(f"IA3Config.feedforward_modules must be a list, a regex string or None, got {ff!r}.")
        elif isinstance(ff, str):
            check_regex("IA3Config.feedforward_modules", ff)
        if isinstance(ff, list) and isinstance(self.target_modules, list) and not set(ff) <= set(self.target_modules):
            raise PeftConfigError(
                f"IA3Config.feedforward_modules {sorted(set(ff) - set(self.target_modules))} are not in "
                f"target_modules {self.target_modules}; add them to target_modules or remove them."
            )

    def to_dict(self) -> dict[str, Any]:
        # HF peft's IA3Config has no layers_to_transform / layers_pattern and warns about unknown keys on load;
        # leave them out while unused (when set, HF ignores them: see docs/methods/ia3.md).
        out = super().to_dict()
        for key in ("layers_to_transform", "layers_pattern"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


def _is_feedforward(feedforward: list[str] | str, module_name: str) -> bool:
    # HF peft's rule, not the dotted-suffix rule of target_modules: the vector's shape depends on it, so a
    # checkpoint loads in either library only if both classify each module the same way.
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, module_name) is not None
    return any(module_name.endswith(key) for key in feedforward)


class IA3Layer(AdapterLayer):
    """(IA)³ on ``nn.Linear``, transformers ``Conv1D`` or ``nn.Conv1d/2d/3d``; https://arxiv.org/abs/2205.05638.

    ``h = l ⊙ (W x + b)`` for an attention target; ``h = W (l ⊙ x) + b`` for a feed-forward target. Several active
    adapters multiply their vectors. Merging scales the rows (output side, bias too) or the columns (input side)
    of ``W``; unmerging divides again, exact to fp32 rounding (a vector with zero entries is not invertible, so
    the weights before that merge are kept and restored instead).

    Args:
        base_layer: The frozen layer (``Conv1D`` stores ``W`` as ``(in, out)``; the layout is detected).
        adapter_name: Name of the first adapter.
        config: Its ``IA3Config`` (``feedforward_modules`` resolved).
        module_name: Full module name, matched against ``feedforward_modules``.

    Shapes: ``l`` is ``(out, 1)`` / ``(1, in)`` for linear layers, ``(1, C, 1, ...)`` for convolutions;
    ``x (..., in)`` → ``h (..., out)``, or ``(B, C_in, ...)`` → ``(B, C_out, ...)``.

    Raises:
        TargetModuleError: a grouped convolution as a feed-forward target, or adapters disagree on the side.
    """

    adapter_param_names = ("ia3_l",)
    method_name = "(IA)³"
    weight_effect = "scale"
    merge_state_attrs = ("_merge_backup",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: IA3Config, module_name: str) -> None:
        super().__init__(base_layer)
        base = base_layer_of(base_layer)
        self.is_conv = isinstance(base, _CONVS)
        self.fan_in_fan_out = not self.is_conv and not isinstance(base, nn.Linear)  # transformers Conv1D
        if self.is_conv:
            self.in_features, self.out_features = base.in_channels, base.out_channels
        elif self.fan_in_fan_out:
            self.in_features, self.out_features = tuple(base.weight.shape)
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.is_feedforward = _is_feedforward(config.feedforward_modules, module_name)
        if self.is_feedforward and self.is_conv and base.groups != 1:
            raise TargetModuleError(
                f"(IA)³ cannot scale the input of grouped convolution {module_name} (groups={base.groups}); "
                "remove it from feedforward_modules."
            )
        self.ia3_l = nn.ParameterDict()
        # Weights (and bias) from before merging a vector with zero entries, which division cannot undo.
        self._merge_backup: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.update_layer(adapter_name, config, module_name)

    def update_layer(self, adapter_name: str, config: IA3Config, module_name: str) -> None:
        if _is_feedforward(config.feedforward_modules, module_name) != self.is_feedforward:
            raise TargetModuleError(
                f"{module_name} is {'' if self.is_feedforward else 'not '}a feed-forward module for the adapters it "
                f"holds but {'not ' if self.is_feedforward else ''}for {adapter_name!r}; one (IA)³ layer scales one "
                "side. Use the same feedforward_modules for every adapter."
            )
        weight = self.get_base_layer().weight
        size = self.in_features if self.is_feedforward else self.out_features
        if self.is_conv:
            shape = (1, size) + (1,) * (weight.dim() - 2)
        else:
            shape = (1, size) if self.is_feedforward else (size, 1)
        # Half-precision bases keep fp32 vectors (HF peft's autocast_adapter_dtype): small updates vanish in bf16.
        dtype = torch.float32 if weight.dtype in _HALF else weight.dtype
        self.ia3_l[adapter_name] = nn.Parameter(torch.empty(shape, device=weight.device, dtype=dtype))
        self.reset_adapter_parameters(adapter_name, config.init_ia3_weights)

    def reset_adapter_parameters(self, adapter_name: str, init: bool) -> None:
        """Ones, so the model is unchanged at step 0 (paper Sec. 3.3); False: standard normal, as HF peft."""
        with torch.no_grad():
            vector = self.ia3_l[adapter_name]
            vector.fill_(1.0) if init else vector.normal_()

    # ---- forward -------------------------------------------------------------------------------------------
    def _feature_scale(self, names: list[str]) -> torch.Tensor:
        # Linear layers act on the last dim (flatten to (C,)); a conv vector's (1, C, 1, ...) already broadcasts.
        scale = self.ia3_l[names[0]]
        for name in names[1:]:
            scale = scale * self.ia3_l[name]
        return scale if self.is_conv else scale.flatten()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(x, *args, **kwargs)
        names = [] if self._skip_adapters() else [n for n in self.active_adapters if n not in self.merged_adapters]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        scale = self._feature_scale(names)
        if self.is_feedforward:
            return self.base_layer((x * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # One scale row per example (ones for base rows and adapters this layer lacks): one base-layer call.
        size = self.in_features if self.is_feedforward else self.out_features
        dtype = next(iter(self.ia3_l.values())).dtype
        rows_scale = torch.ones(x.shape[0], size, device=x.device, dtype=dtype)  # (B, C)
        for name, rows in self.rows_per_adapter(x.shape[0]).items():
            if name in self.ia3_l:
                rows_scale[rows.to(x.device)] = self.ia3_l[name].flatten()

        def per_row(t: torch.Tensor) -> torch.Tensor:
            ones = [1] * (t.dim() - 2)
            return rows_scale.view(-1, size, *ones) if self.is_conv else rows_scale.view(-1, *ones, size)

        if self.is_feedforward:
            return self.base_layer((x * per_row(x)).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * per_row(result)).to(result.dtype)

    # ---- merging (multiplicative, so the additive delta_weight contract does not apply) ------------------------
    def _weight_scale(self, name: str) -> torch.Tensor:
        """The vector shaped to multiply ``W`` in its stored layout: rows (output side) or columns (input side)."""
        vector = self.ia3_l[name]
        if self.is_conv:
            return vector if self.is_feedforward else vector.transpose(0, 1)  # (1, C_in, 1..) / (C_out, 1, 1..)
        return vector.T if self.fan_in_fan_out else vector

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        weight = base.weight.detach().float()
        bias = None if base.bias is None or self.is_feedforward else base.bias.detach().float()
        for name in self._to_merge(adapter_names):
            weight = weight * self._weight_scale(name).float()
            bias = None if bias is None else bias * self.ia3_l[name].flatten().float()
            finite = torch.isfinite(weight.to(base.weight.dtype)).all()
            if not finite or (bias is not None and not torch.isfinite(bias.to(base.bias.dtype)).all()):
                raise ValueError(
                    f"Merging adapter {name!r} into {type(self).__name__} gives non-finite weights (the vector holds "
                    "NaN/inf or overflows the dtype). Nothing was merged."
                )

    def merge(self, adapter_names: list[str] | None = None, safe: bool = False) -> None:
        if safe:
            self.check_merge(adapter_names)
        base = self.get_base_layer()
        scales_bias = base.bias is not None and not self.is_feedforward  # W(l ⊙ x) + b leaves b alone
        with torch.no_grad():
            for name in self._to_merge(adapter_names):
                if not bool((self.ia3_l[name] != 0).all()):
                    bias = base.bias.detach().clone() if scales_bias else None
                    self._merge_backup[name] = (base.weight.detach().clone(), bias)
                # In-place mul of a half weight by the fp32 vector computes in fp32 and rounds once.
                base.weight.mul_(self._weight_scale(name))
                if scales_bias:
                    base.bias.mul_(self.ia3_l[name].flatten())
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        scales_bias = base.bias is not None and not self.is_feedforward
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                backup = self._merge_backup.pop(name, None)
                if backup is not None:
                    base.weight.copy_(backup[0])
                    if backup[1] is not None:
                        base.bias.copy_(backup[1])
                    continue
                base.weight.div_(self._weight_scale(name))
                if scales_bias:
                    base.bias.div_(self.ia3_l[name].flatten())


@register(IA3Config)
class IA3Method(PeftMethod):
    """Wraps linear, Conv1D and convolution layers with (IA)³ vectors."""

    layer_class = IA3Layer

    @classmethod
    def default_target_modules(cls, model: nn.Module) -> list[str] | str | None:
        targets = table_entry(IA3_TARGETS, model)
        if targets is not None:
            return targets
        derived = derive_key_value_feedforward(model)
        return derived[0] if derived is not None else None

    @classmethod
    def prepare_config(cls, model: nn.Module, config: IA3Config) -> IA3Config:
        """Fill ``feedforward_modules`` from the architecture's default, as HF peft does; for an architecture no
        table knows, from the FFN down projections found in the module tree (with ``target_modules`` too)."""
        if config.feedforward_modules is not None:
            return config
        defaults = table_entry(IA3_FEEDFORWARD, model)
        if defaults is None and config.target_modules is None:
            derived = derive_key_value_feedforward(model)
            if derived is None:  # no attention: the core reports the missing targets, listing candidates
                return config
            return dataclasses.replace(config, target_modules=derived[0], feedforward_modules=derived[1])
        if defaults is None:
            defaults = feedforward_entries(model, config.target_modules)
            if defaults is None:
                raise PeftConfigError(
                    f"IA3Config.feedforward_modules is None and peftkit has no default for {type(model).__name__} "
                    "(no attention block to tell its feed-forward layers by); pass feedforward_modules (the targets "
                    "scaled on their input, e.g. the FFN down-projection; [] for none)."
                )
            return dataclasses.replace(config, feedforward_modules=defaults)
        if isinstance(config.target_modules, list):  # HF ignores defaults that are not targeted; keep it a subset
            defaults = [f for f in defaults if f in config.target_modules]
        return dataclasses.replace(config, feedforward_modules=defaults)

    @classmethod
    def layer_for(cls, target: nn.Module, config: IA3Config, adapter_name: str, module_name: str) -> AdapterLayer:
        base = base_layer_of(target)
        linear_like = isinstance(base, nn.Linear) or (type(base).__name__ == "Conv1D" and hasattr(base, "nf"))
        if type(base).__module__.startswith("bitsandbytes"):
            raise TargetModuleError(
                f"(IA)³ does not support quantized layers yet ({module_name}: {type(base).__name__}); load the "
                "model in float or use LoRA."
            )
        if linear_like or isinstance(base, _CONVS):
            return IA3Layer(target, adapter_name, config, module_name)
        raise TargetModuleError(
            f"(IA)³ cannot wrap {module_name} ({type(base).__name__}); supported: nn.Linear, transformers Conv1D, "
            "nn.Conv1d/2d/3d. Remove it from target_modules."
        )
