"""Bottleneck adapters: serial (Houlsby, Pfeiffer) and parallel, with AdapterDrop.

Houlsby et al. 2019 (https://arxiv.org/abs/1902.00751), Pfeiffer et al. 2021 (https://arxiv.org/abs/2005.00247),
He et al. 2022 (https://arxiv.org/abs/2110.04366), AdapterDrop: Rücklé et al. 2021 (https://arxiv.org/abs/2010.11918).
Reference behaviour: AdapterHub ``adapters`` (``DoubleSeqBnConfig``, ``SeqBnConfig``, ``ParBnConfig``).

Every adapter is the bottleneck ``A(u) = s · W_up f(W_down u + b_down) + b_up``. It attaches by wrapping a named module
of the model, never by copying model code; what it computes depends on the kind of module it wraps::

    serial, any module      y = M(...)            →  y + A(y)             Houlsby: M = attention/FFN output projection
    serial, a norm module   z = x + h (its input) →  LN(z + A(LN(z)))     Pfeiffer on post-LN models: M = that LN
    parallel, sub-layer     y = M(z)              →  y + s·A(z)           M = the FFN / attention module
    parallel, BERT output   M(h, input_tensor=x)  →  M(h, x + s·A(x)) = LN(x + h + s·A(x))

On pre-LN models (GPT-2, Llama, T5, OPT) Pfeiffer wraps the residual block whose output is ``x + h``, giving
``x + h + A(x + h)`` (AdapterHub passes no layer norm there either). Several active adapters add up. This module
holds the shared bottleneck layer, the serial variants and AdapterDrop; :mod:`peftkit.methods.parallel_adapter` the
parallel variant and :mod:`peftkit.methods.fusion` AdapterFusion.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.config import PeftConfig, TunerConfig
from peftkit.core.errors import NotMergeableError, PeftConfigError, TargetModuleError
from peftkit.core.inject import adapter_layers
from peftkit.core.layer import AdapterLayer, ModulesToSaveWrapper, base_layer_of
from peftkit.core.registry import PeftMethod, register
from peftkit.core.targets import candidate_modules, is_linear_like, layer_index, logical_name, match_targets
from peftkit.integrations.transformers import model_type

__all__ = ["AdapterConfig", "BottleneckLayer", "SerialAdapterLayer", "BottleneckMethod", "PLACEMENTS",
           "set_skip_layers"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "gelu_new": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
    "swish": nn.SiLU, "tanh": nn.Tanh, "leakyrelu": nn.LeakyReLU,
}
_INITS = (True, False, "bert", "houlsby")
_LAYER_LISTS = ("layers", "layer", "h", "block", "blocks")  # as peftkit.core.targets.layer_index guesses them

# Where each placement attaches, per model_type: target_modules values (dotted suffixes, or a full-match regex).
# "houlsby"/"pfeiffer" are the serial variants, "ffn"/"attn" the parallel adapter's sub-layers.
_POST_LN = {"houlsby": ["attention.output.dense", "output.dense"], "pfeiffer": r".*\.layer\.\d+\.output\.LayerNorm",
            "ffn": r".*\.layer\.\d+\.output", "attn": ["attention.output"]}
_LLAMA = {"houlsby": ["self_attn.o_proj", "mlp.down_proj"], "pfeiffer": r".*\.layers\.\d+", "ffn": ["mlp"],
          "attn": ["self_attn"]}
PLACEMENTS: dict[str, dict[str, list[str] | str]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _POST_LN),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma"), _LLAMA),
    "gpt2": {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": r".*\.h\.\d+", "ffn": ["mlp"], "attn": ["attn"]},
    # OPT's FFN is no module of its own (fc1/fc2 sit in the decoder layer), so it has no parallel "ffn" placement.
    "opt": {"houlsby": ["self_attn.out_proj", "fc2"], "pfeiffer": r".*\.layers\.\d+", "attn": ["self_attn"]},
    **dict.fromkeys(("t5", "mt5"), {
        "houlsby": ["SelfAttention.o", "DenseReluDense.wo"],
        "pfeiffer": r"(.*\.)?(encoder\.block\.\d+\.layer\.1|decoder\.block\.\d+\.layer\.2)",
        "ffn": ["DenseReluDense"], "attn": ["SelfAttention"]}),
}


@dataclass(kw_only=True)
class _BottleneckConfig(TunerConfig):
    """Fields shared by serial and parallel adapters (documented on the public subclasses)."""

    r: int | None = None
    reduction_factor: float = 16
    non_linearity: str | None = "relu"
    adapter_dropout: float = 0.0
    scaling: float = 1.0
    init_weights: bool | str = True
    drop_lowest_layers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.r is not None and (not isinstance(self.r, int) or self.r <= 0):
            raise PeftConfigError(f"{name}.r must be a positive integer or None (reduction_factor), got {self.r!r}.")
        if not self.reduction_factor > 0:
            raise PeftConfigError(f"{name}.reduction_factor must be positive, got {self.reduction_factor!r}.")
        if self.non_linearity not in _ACTIVATIONS:
            raise PeftConfigError(f"{name}.non_linearity={self.non_linearity!r}; use one of {sorted(_ACTIVATIONS)}.")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise PeftConfigError(f"{name}.adapter_dropout must be in [0, 1), got {self.adapter_dropout!r}.")
        if self.init_weights not in _INITS:
            raise PeftConfigError(f"{name}.init_weights={self.init_weights!r}; use one of {list(_INITS)}.")
        if not isinstance(self.drop_lowest_layers, int) or self.drop_lowest_layers < 0:
            raise PeftConfigError(f"{name}.drop_lowest_layers must be an int >= 0, got {self.drop_lowest_layers!r}.")

    def bottleneck_size(self, hidden: int) -> int:
        return self.r if self.r is not None else max(1, int(hidden // self.reduction_factor))

    def placement(self) -> str:
        raise NotImplementedError


@dataclass(kw_only=True)
class AdapterConfig(_BottleneckConfig):
    """A serial bottleneck adapter: ``A(u) = s · W_up f(W_down u + b_down) + b_up`` inserted after a sub-layer.

    Houlsby: after the attention output projection and after the FFN output, ``out = LN(x + h + A(h))``.
    Pfeiffer: after the FFN only, ``out = LN(x + h + A(LN(x + h)))``; on pre-LN models ``x + h + A(x + h)``.

    Args:
        variant: ``"houlsby"`` or ``"pfeiffer"`` (default, AdapterHub's ``SeqBnConfig``); picks the default targets.
        r: Bottleneck width m. None: ``hidden_size // reduction_factor``.
        reduction_factor: d / m when ``r`` is None (default 16).
        non_linearity: f: ``"relu"``, ``"gelu"``, ``"gelu_new"``, ``"silu"``/``"swish"``, ``"tanh"``, ``"leakyrelu"``.
            None: the variant's AdapterHub default (``"swish"`` for Houlsby, ``"relu"`` for Pfeiffer).
        adapter_dropout: Dropout on the adapter's output (default 0).
        scaling: s (default 1).
        init_weights: True: ``W_down`` Kaiming-uniform, ``W_up`` and biases zero, so ``A = 0`` at step 0 (He et al.'s
            and AdapterHub's "mam_adapter" init); ``"bert"``: N(0, 0.02) weights (AdapterHub's default); ``"houlsby"``:
            truncated N(0, 0.01²); False: ``nn.Linear``'s random init for both (the adapter acts at once; for tests).
        train_layer_norms: Train (and save) the layer norms of every transformer layer holding the adapter, as
            Houlsby et al. do. None: True for Houlsby, False for Pfeiffer. They are base parameters shared by all
            adapters of the model, so switching adapters does not switch them and mixed batches refuse them.
        drop_lowest_layers: Robust AdapterDrop: each training step (each ``PeftModel.forward`` in training mode)
            skips the adapters of the lowest k layers, k drawn uniformly from ``[0, drop_lowest_layers]`` (default 0:
            off). Keep it below the number of layers unless something else (a head) trains. Never drops in eval.

    Raises:
        PeftConfigError: a field is out of range; the message names it.
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    variant: str = "pfeiffer"
    non_linearity: str | None = None
    train_layer_norms: bool | None = None

    def __post_init__(self) -> None:
        if self.variant not in ("houlsby", "pfeiffer"):
            raise PeftConfigError(f"AdapterConfig.variant must be 'houlsby' or 'pfeiffer', got {self.variant!r}.")
        if self.non_linearity is None:
            self.non_linearity = "swish" if self.variant == "houlsby" else "relu"
        if self.train_layer_norms is None:
            self.train_layer_norms = self.variant == "houlsby"
        super().__post_init__()

    def placement(self) -> str:
        return self.variant


# ---- module introspection ------------------------------------------------------------------------------------------
def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _linear_sizes(module: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of ``module`` or of each linear inside it, in registration order (adapter weights excluded)."""
    sizes = []
    for _, sub in [("", module), *candidate_modules(module)]:
        if is_linear_like(sub):
            base = base_layer_of(sub)
            linear = isinstance(base, nn.Linear)
            # Conv1D stores its weight as (in, out).
            sizes.append((base.in_features, base.out_features) if linear else tuple(base.weight.shape))
    return sizes


def _input_name(module: nn.Module) -> str | None:
    params = list(inspect.signature(module.forward).parameters)
    return params[0] if params else None


def _first_input(args: tuple, kwargs: dict, name: str | None) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _add_to_output(out: Any, delta: torch.Tensor) -> Any:
    # Attention modules return (output, weights): the adapter changes the output only.
    if isinstance(out, tuple):
        return (out[0] + delta.to(out[0].dtype), *out[1:])
    return out + delta.to(out.dtype)


# ---- layers --------------------------------------------------------------------------------------------------------
class BottleneckLayer(AdapterLayer):
    """Per-adapter bottlenecks ``A(u) = s · W_up f(W_down u + b_down) + b_up`` and AdapterDrop state.

    Shapes: ``u (..., in_features)`` → ``A(u) (..., out_features)``; ``W_down (m, in)``, ``W_up (out, m)``.
    Subclasses decide where ``A`` reads and writes. ``skipped`` (inference AdapterDrop) makes the layer the base
    module; ``drop_below[name] = k`` (robust AdapterDrop, training only) skips ``name`` when ``layer_idx < k``.
    """

    adapter_param_names = ("adapter_down", "adapter_up")
    adapter_attr_names = ("non_linearity", "adapter_dropout", "scaling", "drop_below")
    method_name = "Bottleneck adapter"

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, layer_idx: int | None) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.layer_idx = in_features, out_features, layer_idx
        self.adapter_down, self.adapter_up = nn.ModuleDict(), nn.ModuleDict()
        self.non_linearity, self.adapter_dropout = nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.drop_below: dict[str, int] = {}
        self.skipped = False
        self._input_name = _input_name(base_layer_of(base_layer))

    def __getattr__(self, name: str) -> Any:
        # Model code may read attributes off the module it owns (e.g. a decoder layer's ``attention_type``).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or "base_layer" not in self._modules:
                raise
            return getattr(self._modules["base_layer"], name)

    def update_layer(self, adapter_name: str, config: _BottleneckConfig, module_name: str) -> None:
        m = config.bottleneck_size(self.in_features)
        self.adapter_down[adapter_name] = nn.Linear(self.in_features, m)
        self.adapter_up[adapter_name] = nn.Linear(m, self.out_features)
        self.non_linearity[adapter_name] = _ACTIVATIONS[config.non_linearity]()
        p = config.adapter_dropout
        self.adapter_dropout[adapter_name] = nn.Dropout(p) if p else nn.Identity()
        self.scaling[adapter_name] = config.scaling
        self.reset_adapter_parameters(adapter_name, config.init_weights)
        ref = next(base_layer_of(self).parameters(), None)
        if ref is not None:
            # Half-precision bases keep fp32 adapters: updates of size lr·grad vanish when rounded to bf16.
            dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
            for container in (self.adapter_down, self.adapter_up):
                container[adapter_name].to(device=ref.device, dtype=dtype)

    def reset_adapter_parameters(self, adapter_name: str, init: bool | str) -> None:
        """``W_up = 0`` (He et al. 2022, AdapterHub "mam_adapter"): ``A = 0``, the model is unchanged at step 0."""
        down, up = self.adapter_down[adapter_name], self.adapter_up[adapter_name]
        if init is False:
            return  # nn.Linear's own random init: the adapter changes the outputs at once (tests)
        for lin in (down, up):
            nn.init.zeros_(lin.bias)
        if init is True:
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))  # nn.Linear's init, as AdapterHub's mam_adapter
            nn.init.zeros_(up.weight)
        elif init == "bert":
            nn.init.normal_(down.weight, std=0.02)
            nn.init.normal_(up.weight, std=0.02)
        else:  # Houlsby et al. Sec. 2.1: near-identity, small truncated normal weights
            for lin in (down, up):
                nn.init.trunc_normal_(lin.weight, std=1e-2, a=-2e-2, b=2e-2)

    def bottleneck(self, adapter_name: str, u: torch.Tensor) -> torch.Tensor:
        down, up = self.adapter_down[adapter_name], self.adapter_up[adapter_name]
        hidden = self.non_linearity[adapter_name](down(u.to(down.weight.dtype)))  # (..., m)
        return self.adapter_dropout[adapter_name](up(hidden) * self.scaling[adapter_name])  # (..., out)

    def _delta(self, adapter_name: str, u: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(adapter_name, u)

    def _running(self) -> list[str]:
        """Active adapters this forward applies, after AdapterDrop."""
        if self.disable_adapters or self.skipped:
            return []
        if not self.training or self.layer_idx is None:
            return list(self.active_adapters)
        return [n for n in self.active_adapters if self.layer_idx >= self.drop_below.get(n, 0)]

    def _batch_delta(self, u: torch.Tensor) -> torch.Tensor:
        """The summed adapter outputs of a mixed batch: each row gets its own adapter's, base rows zero."""
        delta = u.new_zeros((*u.shape[:-1], self.out_features))
        held = set(self.adapter_names)
        for name, rows in self.rows_per_adapter(u.shape[0]).items():
            if name in held:
                rows = rows.to(u.device)
                delta = delta.index_add(0, rows, self._delta(name, u[rows]).to(delta.dtype))
        return delta

    # Adapters compute a nonlinear function of the activations: nothing can be folded into a weight.
    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        if self._to_merge(adapter_names):
            raise NotMergeableError(f"{self.method_name}s cannot be merged into weights; keep them or unload().")

    def merge(self, adapter_names: list[str] | None = None, safe: bool = False) -> None:
        self.check_merge(adapter_names)

    def unmerge(self) -> None:
        return None


class SerialAdapterLayer(BottleneckLayer):
    """Serial adapter (Houlsby / Pfeiffer) around one module; also holds AdapterFusion modules over its adapters.

    Wrapping a norm module (``LayerNorm``, ``RMSNorm``, ``T5LayerNorm``), whose input is ``z = x + h``:
    ``out = LN(z + Σ A(LN(z)))``. Any other module, with output ``y`` (first element when a tuple):
    ``out = y + Σ A(y)``. The sum runs over the active adapters; a fusion contributes its attention-weighted mix.

    Args:
        base_layer: The wrapped module: an output projection, a post-residual norm, or a residual block.
        adapter_name, config, module_name: The first adapter, its config and the module's full name (its layer
            index drives AdapterDrop).

    Raises:
        TargetModuleError: the hidden size cannot be read off the module (it holds no linear layer).
    """

    adapter_param_names = ("adapter_down", "adapter_up", "adapter_fusion")
    adapter_attr_names = (*BottleneckLayer.adapter_attr_names, "train_layer_norms")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdapterConfig, module_name: str) -> None:
        base = base_layer_of(base_layer)
        post_norm = _is_norm(base)
        if post_norm:
            size = base.weight.shape[-1] if getattr(base, "weight", None) is not None else base.normalized_shape[-1]
        else:
            sizes = _linear_sizes(base)
            if not sizes:
                raise TargetModuleError(
                    f"A serial adapter cannot read the hidden size of {module_name} ({type(base).__name__}): wrap an "
                    "output projection, a norm after a residual add, or a block that contains linear layers."
                )
            size = sizes[-1][1]
        super().__init__(base_layer, size, size, layer_index(module_name, config.layers_pattern))
        self.post_norm = post_norm
        self.adapter_fusion = nn.ModuleDict()  # AdapterFusion modules (peftkit/methods/fusion.py), keyed by name
        self.train_layer_norms: dict[str, bool] = {}
        self.update_layer(adapter_name, config, module_name)

    def update_layer(self, adapter_name: str, config: AdapterConfig, module_name: str) -> None:
        super().update_layer(adapter_name, config, module_name)
        self.train_layer_norms[adapter_name] = bool(config.train_layer_norms)

    def delete_adapter(self, adapter_name: str) -> None:
        users = [f for f, fusion in self.adapter_fusion.items() if adapter_name in fusion.adapters]
        if users:
            raise ValueError(f"Adapter {adapter_name!r} is fused by {users}; delete those fusions first.")
        super().delete_adapter(adapter_name)

    def _delta(self, adapter_name: str, u: torch.Tensor) -> torch.Tensor:
        if adapter_name in self.adapter_fusion:
            fusion = self.adapter_fusion[adapter_name]
            outputs = torch.stack([self.bottleneck(n, u) for n in fusion.adapters], dim=-2)  # (..., N, d)
            return fusion(u.to(outputs.dtype), outputs)
        return self.bottleneck(adapter_name, u)

    def _split(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
        """Run the base module up to the adapter: (adapter input u, function taking Σ A(u) to the layer output)."""
        if self.post_norm:
            z = _first_input(args, kwargs, self._input_name)
            return self.base_layer(z), lambda delta: self.base_layer(z + delta.to(z.dtype))
        out = self.base_layer(*args, **kwargs)
        return (out[0] if isinstance(out, tuple) else out), lambda delta: _add_to_output(out, delta)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(args, kwargs)
        names = self._running()
        if not names:
            return self.base_layer(*args, **kwargs)
        u, finish = self._split(args, kwargs)
        return finish(sum(self._delta(name, u) for name in names))

    def _mixed_batch_forward(self, args: tuple, kwargs: dict) -> Any:
        if self.disable_adapters or self.skipped:
            return self.base_layer(*args, **kwargs)
        shared = sorted(n for n, on in self.train_layer_norms.items() if on)
        if shared:
            raise NotImplementedError(
                f"Adapter(s) {shared} train the model's shared layer norms (train_layer_norms=True), so rows cannot "
                "see different norms; use train_layer_norms=False for mixed batches."
            )
        u, finish = self._split(args, kwargs)
        return finish(self._batch_delta(u))


# ---- methods -------------------------------------------------------------------------------------------------------
def _bottleneck_layers(peft_model: nn.Module) -> Iterable[BottleneckLayer]:
    return [layer for _, layer in adapter_layers(peft_model.base_model.model) if isinstance(layer, BottleneckLayer)]


def set_skip_layers(peft_model: nn.Module, layers: Iterable[int] | None) -> None:
    """AdapterDrop at inference: adapters (and fusions) of these transformer layers are skipped, which then run the
    base computation only. ``None`` or ``[]`` restores them. Applies to every bottleneck adapter of the model."""
    skip = set(layers or ())
    for layer in _bottleneck_layers(peft_model):
        layer.skipped = layer.layer_idx in skip


def _block_prefix(name: str, layers_pattern: list[str] | str | None) -> str | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or _LAYER_LISTS)
    alternatives = "|".join(re.escape(p) for p in patterns if p)
    found = re.search(rf"^(.*?(?:^|\.)(?:{alternatives})\.\d+)(?:\.|$)", name)
    return found.group(1) if found else None


class _BottleneckMethodBase(PeftMethod):
    mergeable = False

    @classmethod
    def prepare_config(cls, model: nn.Module, config: PeftConfig) -> PeftConfig:
        assert isinstance(config, _BottleneckConfig)
        if config.target_modules is not None:
            return config
        arch = model_type(model) or ""
        targets = PLACEMENTS.get(arch, {}).get(config.placement())
        if targets is None and arch in PLACEMENTS:
            raise PeftConfigError(
                f"{type(config).__name__}: {arch} has no module for the {config.placement()!r} placement (its FFN is "
                "not one module); pick another placement or pass target_modules."
            )
        return dataclasses.replace(config, target_modules=targets) if targets is not None else config

    @classmethod
    def before_forward(cls, peft_model: nn.Module, adapter_name: str) -> None:
        # Robust AdapterDrop draws k once per step here, not in the layers: every layer must see the same k, and
        # checkpointed recomputation (which re-runs the layers) must not redraw it.
        config = peft_model.peft_config[adapter_name]
        if not config.drop_lowest_layers:
            return
        k = int(torch.randint(0, config.drop_lowest_layers + 1, ())) if peft_model.training else 0
        for layer in _bottleneck_layers(peft_model):
            if adapter_name in layer.scaling:
                layer.drop_below[adapter_name] = k

    @classmethod
    def set_skip_layers(cls, peft_model: nn.Module, layers: Iterable[int] | None) -> None:
        set_skip_layers(peft_model, layers)


@register(AdapterConfig)
class BottleneckMethod(_BottleneckMethodBase):
    """Serial adapters: wraps each target in a :class:`SerialAdapterLayer`; Houlsby's layer norms train too."""

    layer_class = SerialAdapterLayer
    model_api = ("set_skip_layers", "add_fusion")

    @classmethod
    def layer_for(cls, target: nn.Module, config: AdapterConfig, adapter_name: str, module_name: str) -> AdapterLayer:
        return SerialAdapterLayer(target, adapter_name, config, module_name)

    @classmethod
    def trainable_base_parameters(cls, model: nn.Module, config: AdapterConfig) -> list[str]:
        if not config.train_layer_norms:
            return []
        try:
            targets = match_targets(model, config.target_modules or [], config.exclude_modules,
                                    config.layers_to_transform, config.layers_pattern)
        except TargetModuleError:
            return []
        blocks = {p for p in (_block_prefix(t, config.layers_pattern) for t in targets) if p}
        heads = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
        names = []
        for module_name, module in model.named_modules():
            logical = logical_name(module_name)
            if not _is_norm(module) or not any(logical.startswith(b + ".") for b in blocks):
                continue
            if any(module_name.startswith(h + ".") for h in heads):
                continue
            names += [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        return sorted(names)

    @classmethod
    def add_fusion(
        cls, peft_model: nn.Module, adapters: list[str], fusion_name: str = "fusion", **kwargs: Any
    ) -> None:
        """``model.add_fusion(["a", "b"], "fusion")``: add an AdapterFusion over serial adapters; ``set_adapter``
        it to train it (only the fusion trains). ``kwargs`` are :class:`AdapterFusionConfig` fields."""
        from peftkit.methods.fusion import AdapterFusionConfig

        peft_model.add_adapter(fusion_name, AdapterFusionConfig(adapters=list(adapters), **kwargs))
