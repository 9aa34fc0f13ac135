"""The bottleneck shared by every adapter of the family, its placements, and AdapterDrop.

``A(u) = s · (W_up f(W_down u + b_down) + b_up)`` per adapter, held by :class:`BottleneckLayer`; the serial variants
(:mod:`peftkit.methods.adapters`), the parallel one (:mod:`peftkit.methods.parallel_adapter`) and AdapterFusion
(:mod:`peftkit.methods.fusion`) decide where it reads and writes. AdapterDrop (Rücklé et al. 2021,
https://arxiv.org/abs/2010.11918) skips the adapters of chosen layers: ``set_skip_layers`` at inference, and a
per-step random ``k`` in training (``BottleneckMethodBase.before_forward``). A config's ``gate`` multiplies each
adapter's output by UniPELT's learned gate ``G(u)`` of its input (:mod:`peftkit.methods.gating`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.config import PeftConfig, TunerConfig
from peftkit.core.errors import NotMergeableError, PeftConfigError
from peftkit.core.inject import adapter_layers
from peftkit.core.layer import AdapterLayer, base_layer_of
from peftkit.core.registry import PeftMethod
from peftkit.core.targets import candidate_modules, is_linear_like
from peftkit.integrations.default_targets import derive_placements
from peftkit.integrations.transformers import model_type
from peftkit.methods.gating import check_gate, gate, gate_values, new_gate, record, without_unset_gate

__all__ = [
    "PLACEMENTS", "BottleneckConfigBase", "BottleneckLayer", "BottleneckMethodBase", "add_to_output",
    "bottleneck_layers", "first_input", "is_norm_module", "linear_sizes", "placement_key", "placements_for",
    "set_skip_layers",
]


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "gelu_new": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
    "swish": nn.SiLU, "tanh": nn.Tanh, "leakyrelu": nn.LeakyReLU,
}
_INITS = (True, False, "bert", "houlsby")

# Where each placement attaches, per model_type: target_modules values (dotted suffixes, or a full-match regex).
# "houlsby"/"pfeiffer" are the serial variants, "ffn"/"attn" the parallel adapter's sub-layers. "<placement>_span" is
# the parallel adapter's ``span`` for a sub-layer that is no module of its own (see ParallelAdapterConfig).
_POST_LN = {"houlsby": ["attention.output.dense", "output.dense"], "pfeiffer": r".*\.layer\.\d+\.output\.LayerNorm",
            "ffn": r".*\.layer\.\d+\.output", "attn": ["attention.output"]}
_LLAMA = {"houlsby": ["self_attn.o_proj", "mlp.down_proj"], "pfeiffer": r".*\.layers\.\d+", "ffn": ["mlp"],
          "attn": ["self_attn"]}
# OPT's FFN is no module of its own (fc1, fc2 sit in the decoder layer): the parallel adapter wraps the decoder layer
# and spans fc1 → fc2, reading fc1's input (the FFN's input) and adding to fc2's output.
_OPT = {"houlsby": ["self_attn.out_proj", "fc2"], "pfeiffer": r".*\.layers\.\d+", "ffn": r".*\.layers\.\d+",
        "ffn_span": ["fc1", "fc2"], "attn": ["self_attn"]}
PLACEMENTS: dict[str, dict[str, list[str] | str]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _POST_LN),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma"), _LLAMA),
    "gpt2": {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": r".*\.h\.\d+", "ffn": ["mlp"], "attn": ["attn"]},
    "opt": _OPT,
    # OPT-350m is post-LN (do_layer_norm_before=False): Pfeiffer wraps the FFN's post-residual norm, as on BERT.
    "opt-post-ln": {**_OPT, "pfeiffer": r".*\.layers\.\d+\.final_layer_norm"},
    **dict.fromkeys(("t5", "mt5"), {
        "houlsby": ["SelfAttention.o", "DenseReluDense.wo"],
        "pfeiffer": r"(.*\.)?(encoder\.block\.\d+\.layer\.1|decoder\.block\.\d+\.layer\.2)",
        "ffn": ["DenseReluDense"], "attn": ["SelfAttention"]}),
}


def placements_for(model: nn.Module) -> dict[str, list[str] | str]:
    """The :data:`PLACEMENTS` entry of ``model``, or for an architecture the table lacks, placements found in its
    module tree (:func:`peftkit.integrations.default_targets.derive_placements`)."""
    known = PLACEMENTS.get(placement_key(model))
    return known if known is not None else derive_placements(model)


def placement_key(model: nn.Module) -> str:
    """The :data:`PLACEMENTS` key of ``model``: its ``model_type``, with a suffix where one architecture comes in a
    pre-LN and a post-LN flavour (the serial adapter's placement differs)."""
    arch = model_type(model) or ""
    if arch == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        return "opt-post-ln"
    return arch


@dataclass(kw_only=True)
class BottleneckConfigBase(TunerConfig):
    """Fields shared by serial and parallel adapters (documented on the public subclasses)."""

    r: int | None = None
    reduction_factor: float = 16
    non_linearity: str | None = "relu"
    adapter_dropout: float = 0.0
    scaling: float = 1.0
    init_weights: bool | str = True
    drop_lowest_layers: int = 0
    gate: str | None = None

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
        check_gate(name, self.gate)

    def to_dict(self) -> dict[str, Any]:
        return without_unset_gate(super().to_dict())

    def bottleneck_size(self, hidden: int) -> int:
        return self.r if self.r is not None else max(1, int(hidden // self.reduction_factor))

    def placement(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} must say where its adapters attach (placement()).")



# ---- module introspection ------------------------------------------------------------------------------------------
def is_norm_module(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def linear_sizes(module: nn.Module) -> list[tuple[int, int]]:
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


def first_input(args: tuple, kwargs: dict, name: str | None) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def add_to_output(out: Any, delta: torch.Tensor) -> Any:
    # Attention modules return (output, weights): the adapter changes the output only.
    if isinstance(out, tuple):
        return (out[0] + delta.to(out[0].dtype), *out[1:])
    return out + delta.to(out.dtype)


# ---- layers --------------------------------------------------------------------------------------------------------
def refuse_merge(layer: AdapterLayer, adapter_names: list[str] | None = None, safe: bool = False) -> None:
    """``check_merge``/``merge`` of layers that compute a nonlinear function of the activations: nothing can be
    folded into a weight."""
    if layer._to_merge(adapter_names):
        raise NotMergeableError(f"{layer.method_name}s cannot be merged into weights; keep them or unload().")


class BottleneckLayer(AdapterLayer):
    """Per-adapter bottlenecks ``A(u) = s · (W_up f(W_down u + b_down) + b_up)`` and AdapterDrop state.

    A gated adapter (config ``gate``) computes ``G(u) · A(u)``, ``G(u) = σ(W_g u + b_g)`` (``adapter_gate``, a
    ``Linear(in, 1)``), averaged over tokens for ``"mean"`` (UniPELT).

    Shapes: ``u (..., in_features)`` → ``A(u) (..., out_features)``; ``W_down (m, in)``, ``W_up (out, m)``.
    Subclasses decide where ``A`` reads and writes. ``skipped`` (inference AdapterDrop) makes the layer the base
    module; ``drop_below[name] = k`` (robust AdapterDrop, training only) skips ``name`` when ``layer_idx < k``.
    """

    adapter_param_names = ("adapter_down", "adapter_up", "adapter_gate")
    adapter_attr_names = ("non_linearity", "adapter_dropout", "scaling", "drop_below", "gate_reduce", "gate_values")
    method_name = "Bottleneck adapter"

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, layer_idx: int | None) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.layer_idx = in_features, out_features, layer_idx
        self.adapter_down, self.adapter_up, self.adapter_gate = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.gate_reduce: dict[str, str] = {}
        self.gate_values: dict[str, torch.Tensor] = {}  # the last forward's gates, for gate_values()
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

    def update_layer(self, adapter_name: str, config: BottleneckConfigBase, module_name: str) -> None:
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
            # Half-precision bases keep fp32 adapters: updates of size lr·grad vanish when rounded to bf16. A quantised
            # base (bitsandbytes' uint8 / int8 storage) gets fp32 adapters too, as QLoRA's.
            low = ref.dtype in (torch.float16, torch.bfloat16) or not ref.dtype.is_floating_point
            dtype = torch.float32 if low else ref.dtype
            for container in (self.adapter_down, self.adapter_up):
                container[adapter_name].to(device=ref.device, dtype=dtype)
        if config.gate is not None:
            self.adapter_gate[adapter_name] = new_gate(self.in_features, like=self.adapter_down[adapter_name].weight)
            self.gate_reduce[adapter_name] = config.gate

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
        out = up(hidden) * self.scaling[adapter_name]  # (..., out)
        if adapter_name in self.adapter_gate:  # UniPELT: G(u) of the adapter's own input scales the branch
            g = gate(self.adapter_gate[adapter_name], u, self.gate_reduce[adapter_name])
            record(self.gate_values, adapter_name, g)
            out = out * g
        return self.adapter_dropout[adapter_name](out)

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

    check_merge = refuse_merge
    merge = refuse_merge

    def unmerge(self) -> None:
        return None


# ---- methods -------------------------------------------------------------------------------------------------------
def bottleneck_layers(peft_model: nn.Module) -> Iterable[BottleneckLayer]:
    return [layer for _, layer in adapter_layers(peft_model.base_model.model) if isinstance(layer, BottleneckLayer)]


def set_skip_layers(peft_model: nn.Module, layers: Iterable[int] | None) -> None:
    """AdapterDrop at inference: adapters (and fusions) of these transformer layers are skipped, which then run the
    base computation only. ``None`` or ``[]`` restores them. Applies to every bottleneck adapter of the model."""
    skip = set(layers or ())
    for layer in bottleneck_layers(peft_model):
        layer.skipped = layer.layer_idx in skip


class BottleneckMethodBase(PeftMethod):
    """Hooks shared by serial and parallel adapters: placement defaults, AdapterDrop, not mergeable."""

    mergeable = False

    gate_values = staticmethod(gate_values)  # model.gate_values(): the gates of the last forward call

    @classmethod
    def prepare_config(cls, model: nn.Module, config: PeftConfig) -> PeftConfig:
        assert isinstance(config, BottleneckConfigBase)
        if config.target_modules is not None:
            return config
        targets = placements_for(model).get(config.placement())
        return dataclasses.replace(config, target_modules=targets) if targets is not None else config

    @classmethod
    def before_forward(cls, peft_model: nn.Module, adapter_name: str) -> None:
        # Robust AdapterDrop draws k once per step here, not in the layers: every layer must see the same k, and
        # checkpointed recomputation (which re-runs the layers) must not redraw it.
        config = peft_model.member_config(adapter_name, cls)
        if not config.drop_lowest_layers:
            return
        k = int(torch.randint(0, config.drop_lowest_layers + 1, ())) if peft_model.training else 0
        for layer in bottleneck_layers(peft_model):
            if adapter_name in layer.scaling:
                layer.drop_below[adapter_name] = k

    @classmethod
    def set_skip_layers(cls, peft_model: nn.Module, layers: Iterable[int] | None) -> None:
        set_skip_layers(peft_model, layers)
