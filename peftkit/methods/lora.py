"""LoRA: low-rank updates beside frozen linear, embedding and convolution layers.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685.
Reference behaviour and checkpoint layout: Hugging Face peft (keys ``<path>.lora_A.weight`` etc.)::

    x ──► W0 (frozen) ──────────────┐
    └──► dropout ─► A (r×in) ─► B (out×r) ─► ·(α/r) ─► + ─► h

Merging folds ``(α/r)·B A`` into ``W0``; after that the layer costs exactly the base layer. With ``gate`` set
(UniPELT, :mod:`peftkit.methods.gating`) a learned gate ``G(x)`` takes the place of ``α/r``; such a LoRA cannot merge.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.config import PeftConfig
from peftkit.core.errors import NotMergeableError, TargetModuleError
from peftkit.core.layer import AdapterLayer, ModulesToSaveWrapper, base_layer_of
from peftkit.core.registry import PeftMethod, register
from peftkit.core.targets import candidate_modules
from peftkit.integrations.default_targets import LORA_TARGETS, default_targets
from peftkit.methods import lora_init
from peftkit.methods.dora import attach_variant, merge_layer, unmerge_layer
from peftkit.methods.gating import gate, gate_values, new_gate, record
from peftkit.methods.lora_config import LoraConfig

__all__ = ["LoraConfig", "LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv", "LoraMethod"]

# HF peft's defaults per model_type (the LoRA paper, Sec. 7.1: Wq+Wv do as well as all four projections); an
# architecture no table knows gets its attention's query/value projections, found in the module tree.
DEFAULT_TARGETS = LORA_TARGETS


@torch.no_grad()
def _orthogonal_pair(lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """A and B both non-zero with ``B A = 0`` (HF peft's ``"orthogonal"`` init): A's rows lie in the span of
    one half of the rows of a random orthogonal r×r matrix Q and B's columns in the other half, so every product
    term pairs two orthogonal rows of Q. Training starts from a zero delta but with gradients into both factors."""
    r = lora_a.shape[0]
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a = torch.randn(lora_a[0].numel(), r // 2) @ q[0::2]  # convolutions: A (r, in, k, k) read as (r, in·k·k)
    b = torch.randn(lora_b.shape[0], r // 2) @ q[1::2]
    lora_a.copy_((a.T / 10.0).reshape(lora_a.shape))
    lora_b.copy_((b / 10.0).reshape(lora_b.shape))


class LoraLayer(AdapterLayer):
    """Shared bookkeeping of LoRA layers: per-adapter A, B, dropout and scale ``α/r`` (or ``α/√r``), or the gate
    ``G(x)`` (``lora_gate``, a ``Linear(in, 1)``) that replaces the scale of a gated adapter."""

    adapter_param_names = ("lora_A", "lora_B", "lora_gate", "lora_magnitude_vector")
    adapter_attr_names = ("lora_dropout", "r", "lora_alpha", "scaling", "unscaled", "gate_reduce", "gate_values",
                          "lora_variant", "variant_cache")
    merge_state_attrs = ("variant_merged",)
    method_name = "LoRA"
    weight_effect = "add"

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer)
        self.module_name = module_name  # for error messages
        # LoraLinear's per-active-adapter view for forward (see _refresh_slots there).
        self._slots: tuple = ()
        self._slot_names: tuple[str, ...] = ()
        for attr in self.adapter_param_names:
            tensors = attr.startswith(("lora_embedding", "lora_magnitude"))  # held as parameters, not modules
            setattr(self, attr, nn.ParameterDict() if tensors else nn.ModuleDict())
        self.lora_gate = nn.ModuleDict()  # gated adapters only (LoraMethod refuses gates on other than linears)
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.gate_reduce: dict[str, str] = {}
        self.gate_values: dict[str, torch.Tensor] = {}  # the last forward's gates, for gate_values()
        self.unscaled: dict[str, float] = {}  # the configured scale of adapters set_scale has changed
        # Variants (DoRA, peftkit/methods/dora.py) replace plain LoRA's forward and merge for their adapters.
        self.lora_variant: dict[str, Any] = {}
        self.variant_cache: dict[Any, Any] = {}  # eval-mode norms, keyed on the tensors' versions
        self.variant_merged: dict[str, torch.Tensor] = {}  # what undoes a variant's merge

    def train(self, mode: bool = True) -> LoraLayer:
        if mode != self.training:  # DoRA's cached norms (peftkit/methods/dora.py) start afresh in the new mode
            self.variant_cache.clear()
        return super().train(mode)

    def adapter_scale(self, adapter_name: str) -> float | None:
        if adapter_name not in self.scaling:
            return None
        unscaled = self.unscaled.get(adapter_name, self.scaling[adapter_name])
        return self.scaling[adapter_name] / unscaled if unscaled else 1.0

    def set_scale(self, adapter_name: str, scale: float) -> None:
        if adapter_name not in self.scaling:
            return  # HF peft's rule: an adapter this layer does not hold is left alone
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"Adapter {adapter_name!r} is merged into {self.module_name}; unmerge it before "
                               "changing its scale (the merged weights would keep the old one).")
        unscaled = self.unscaled.setdefault(adapter_name, self.scaling[adapter_name])
        self.scaling[adapter_name] = unscaled * scale
        self._refresh_slots()

    def _active_changed(self) -> None:
        self._refresh_slots()

    def _refresh_slots(self) -> None:
        """Rebuild what ``forward`` reads per active adapter; called whenever the active set or a scale changes."""

    def _make_pair(self, r: int) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError(f"{type(self).__name__} must define _make_pair (the A and B modules for rank r).")

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        r, alpha = config.rank_and_alpha(module_name)
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, alpha
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        lora_a, lora_b = self._make_pair(r)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = lora_a, lora_b
        self.reset_adapter_parameters(adapter_name, config.init_lora_weights, config)
        weight = self.get_base_layer().weight
        # Half-precision bases keep fp32 adapters (HF peft's autocast_adapter_dtype): updates of size lr·grad
        # vanish when rounded to bf16.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        for container in (self.lora_A, self.lora_B):
            container[adapter_name].to(device=weight.device, dtype=dtype)
        if config.gate is not None:
            self.lora_gate[adapter_name] = new_gate(lora_a.weight.shape[1], like=lora_a.weight)
            self.gate_reduce[adapter_name] = config.gate
        attach_variant(self, adapter_name, config)
        self._refresh_slots()

    def reset_adapter_parameters(self, adapter_name: str, init: bool | str, config: LoraConfig | None = None) -> None:
        """B = 0 so the delta is zero at step 0 (LoRA paper Sec. 4.1); A as in loralib / HF peft."""
        if lora_init.is_base_init(init):  # PiSSA, OLoRA, LoftQ, CorDA: A, B from W, and W ← W − s·B A
            lora_init.init_from_base(self, adapter_name, init, config)
            return
        lora_a, lora_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init is False:
            nn.init.normal_(lora_b, std=0.02)
            return
        if init == "gaussian":
            nn.init.normal_(lora_a, std=1 / self.r[adapter_name])
        elif init == "orthogonal":
            _orthogonal_pair(lora_a, lora_b)
            return
        else:
            # kaiming_uniform with a=sqrt(5) is nn.Linear's own init, which loralib uses for A. "eva" starts the same
            # way until initialize_lora_eva_weights replaces A from data; B = 0 below.
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        nn.init.zeros_(lora_b)

    def _adapter_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = x.to(lora_a.weight.dtype)
        return lora_b(lora_a(self.lora_dropout[name](x))) * self._scale(name, x)

    def _apply_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        variant = self.lora_variant.get(name)
        if variant is not None:  # DoRA rescales the output, so it takes the running result, not just a delta
            return variant.forward(self, name, x, result)
        return result + self._adapter_delta(name, x).reshape(result.shape).to(result.dtype)

    def _scale(self, name: str, x: torch.Tensor) -> float | torch.Tensor:
        """``α/r``, or a gated adapter's ``G(x)``: ``(B, 1, ..., 1)`` (``"mean"``) or ``(B, ..., 1)`` (``"token"``)."""
        if name not in self.lora_gate:
            return self.scaling[name]
        g = gate(self.lora_gate[name], x, self.gate_reduce[name])
        record(self.gate_values, name, g)
        return g

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(x, result)
        if self._skip_adapters():
            return result
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = self._apply_adapter(name, x, result)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        for name, rows in self.rows_per_adapter(x.shape[0]).items():
            if name in self.r:
                rows = rows.to(x.device)
                result = result.index_copy(0, rows, self._apply_adapter(name, x[rows], result[rows]))
        return result

    def merge_blocker(self, adapter_names: list[str]) -> str | None:
        gated = [n for n in adapter_names if n in self.lora_gate]
        if gated:
            return (f"they are gated (gate={self.gate_reduce[gated[0]]!r}, UniPELT), and h = W0 x + G(x)·B A x "
                    "depends on the input through G, so it has no weight form; keep them unmerged or unload()")
        return None

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        self._refuse_gated(self._to_merge(adapter_names))
        if not self.lora_variant:
            return super().check_merge(adapter_names)
        merge_layer(self, self._to_merge(adapter_names), write=False)

    def merge(self, adapter_names: list[str] | None = None, safe: bool = False) -> None:
        self._refuse_gated(self._to_merge(adapter_names))
        # DoRA's W' = f ⊙ (W + ΔW) is not W + ΔW; with a variant on the layer every merge goes through dora.py.
        if not self.lora_variant:
            return super().merge(adapter_names, safe)
        merge_layer(self, self._to_merge(adapter_names))

    def unmerge(self) -> None:
        if not self.lora_variant:
            return super().unmerge()
        unmerge_layer(self)

    def _refuse_gated(self, names: list[str]) -> None:
        # Whether LoRA may merge through the layers it is nested with is the core's structural check
        # (peftkit/core/merging.py), which every merge path runs first; a gate rules out a weight form on its own.
        reason = self.merge_blocker(names)
        if reason:
            where = self.module_name or type(self).__name__
            raise NotMergeableError(f"Cannot merge LoRA adapter(s) {names} into {where}: {reason}. Nothing merged.")

    def _delta_dtype(self) -> torch.dtype:
        # CPU half-precision matmul is slow and loses precision; compute the delta in fp32 and cast once.
        weight = self.get_base_layer().weight
        return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` or transformers ``Conv1D``: ``h = W0 x + (α/r) · B A dropout(x)``.

    Args:
        base_layer: The frozen layer; ``Conv1D`` stores ``W0`` as ``(in, out)`` (``fan_in_fan_out``).
        adapter_name: Name of the first adapter.
        config: Its ``LoraConfig``.
        module_name: Full module name, for ``rank_pattern`` / ``alpha_pattern``.

    Shapes: ``x (..., in)`` → ``h (..., out)``; ``A (r, in)``, ``B (out, r)``.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        super().__init__(base_layer, module_name)
        base = base_layer_of(base_layer)
        self.fan_in_fan_out = not isinstance(base, nn.Linear)
        self.in_features, self.out_features = (
            tuple(base.weight.shape) if self.fan_in_fan_out else (base.in_features, base.out_features)
        )
        self.update_layer(adapter_name, config, module_name)

    def _make_pair(self, r: int) -> tuple[nn.Module, nn.Module]:
        return nn.Linear(self.in_features, r, bias=False), nn.Linear(r, self.out_features, bias=False)

    def _refresh_slots(self) -> None:
        # torch.compile guards on every Python value forward reads: adapter names read there (and ModuleDict
        # lookups by them) would compile the model again for each new active set. forward reads these slots
        # instead; Dynamo lifts the modules' weights as graph inputs, so switching among loaded adapters of the
        # same shapes and scale reuses the compiled graph. Holding the modules, not their parameters, keeps the
        # slots right when a wrapper (FSDP) swaps parameters.
        names = [n for n in self.active_adapters if n in self.lora_A]
        self._slot_names = tuple(names)  # kept apart: a name inside a slot would be guarded on with it
        self._slots = tuple(
            (self.lora_A[n], self.lora_B[n], self.lora_dropout[n], self.scaling[n],
             n in self.lora_gate or n in self.lora_variant) for n in names
        )

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        self._refuse_gated([n for n in (adapter_name,) if n in self.lora_gate])  # a gated update has no weight form
        dtype = self._delta_dtype()
        a, b = self.lora_A[adapter_name].weight.to(dtype), self.lora_B[adapter_name].weight.to(dtype)
        delta = (b @ a) * self.scaling[adapter_name]  # (out, in)
        # Left in fp32 for a half-precision weight: AdapterLayer.merge adds it in fp32 and rounds once.
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(x, result)
        slots, names = self._slots, self._slot_names
        if self.merged_adapters:  # names are read (and guarded on) only while something is merged
            kept = [i for i, n in enumerate(names) if n not in self.merged_adapters]
            slots, names = tuple(slots[i] for i in kept), tuple(names[i] for i in kept)
        if self.disable_adapters or not slots:  # merged: exactly the base layer's cost
            return result
        out_shape = result.shape
        result = result.reshape(-1, self.out_features)
        for i, (lora_a, lora_b, dropout, scale, gated) in enumerate(slots):
            if gated:  # G(x) per example or token, or a variant (DoRA), replaces the fused addmm below
                result = self._apply_adapter(names[i], x, result)
                continue
            a, b = lora_a.weight, lora_b.weight
            hidden = F.linear(dropout(x.to(a.dtype)), a).reshape(-1, a.shape[0])
            if isinstance(scale, torch.Tensor):  # peftkit.hotswap: a tensor, so a swap changes a value, not the graph
                hidden, scale = hidden * scale, 1
            # addmm adds B·hidden and applies the scale inside one GEMM, sparing two passes over the output.
            result = torch.addmm(result, hidden.to(result.dtype), b.T.to(result.dtype), alpha=scale)
        return result.view(out_shape)

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # One batched matmul with per-row (A, B) is cheaper than gathering and scattering each adapter's rows;
        # rows for the base model (or adapters absent here) get zero weights. Ranks are zero-padded to the max.
        names = self.batch_adapter_names or []
        repeat = x.shape[0] // len(names)
        present = [n for n in dict.fromkeys(names) if n in self.r]
        if not present:
            return result
        if any(n in self.lora_gate or n in self.lora_variant for n in present):  # per row group (gates, DoRA)
            return super()._mixed_batch_forward(x, result)
        r_max = max(self.r[n] for n in present)
        dtype = self.lora_A[present[0]].weight.dtype
        a_stack = x.new_zeros((len(present) + 1, r_max, self.in_features), dtype=dtype)
        b_stack = x.new_zeros((len(present) + 1, self.out_features, r_max), dtype=dtype)
        for i, name in enumerate(present):
            a_stack[i, : self.r[name]] = self.lora_A[name].weight
            b_stack[i, :, : self.r[name]] = self.lora_B[name].weight * self.scaling[name]
        slot = {n: i for i, n in enumerate(present)}
        row_slot = torch.tensor([slot.get(n, len(present)) for n in names], device=x.device).repeat_interleave(repeat)
        x3 = x.reshape(x.shape[0], -1, self.in_features).to(dtype)  # (B, T, in)
        delta = torch.bmm(torch.bmm(x3, a_stack[row_slot].transpose(1, 2)), b_stack[row_slot].transpose(1, 2))
        return result + delta.reshape(result.shape).to(result.dtype)


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ``E[x] + (α/r) · (A[:, x])ᵀ Bᵀ``, ``A (r, num_embeddings)``, ``B (dim, r)``.

    A starts at zero and B Gaussian (HF peft's choice for embeddings), so the delta is zero at step 0.
    """

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        super().__init__(base_layer, module_name)
        self.update_layer(adapter_name, config, module_name)

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        r, alpha = config.rank_and_alpha(module_name)
        base = self.get_base_layer()
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, alpha
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        kw = {"device": base.weight.device, "dtype": dtype}
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, base.num_embeddings, **kw))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(base.embedding_dim, r, **kw))
        if config.init_lora_weights is not False:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])
        attach_variant(self, adapter_name, config)

    def _adapter_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        after_a = F.embedding(x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)  # (..., r)
        return (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        dtype = self._delta_dtype()
        a, b = self.lora_embedding_A[adapter_name].to(dtype), self.lora_embedding_B[adapter_name].to(dtype)
        return (b @ a).T * self.scaling[adapter_name]  # fp32 for a half-precision weight, as in LoraLinear


class LoraConv(LoraLayer):
    """LoRA on ``nn.Conv1d`` / ``nn.Conv2d``: A is a conv with the base kernel, B a 1×1 conv.

    ``ΔW[o, i, k...] = (α/r) Σ_j B[o, j] A[j, i, k...]``.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        super().__init__(base_layer, module_name)
        base = base_layer_of(base_layer)
        if base.groups != 1:
            raise TargetModuleError(
                f"LoRA on grouped convolutions is not supported ({module_name}: groups={base.groups})."
            )
        self.update_layer(adapter_name, config, module_name)

    def _make_pair(self, r: int) -> tuple[nn.Module, nn.Module]:
        base = self.get_base_layer()
        conv = type(base)
        lora_a = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
        return lora_a, conv(r, base.out_channels, 1, 1, bias=False)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        dtype, weight = self._delta_dtype(), self.get_base_layer().weight
        a, b = self.lora_A[adapter_name].weight.to(dtype), self.lora_B[adapter_name].weight.to(dtype)
        return (b.flatten(1) @ a.flatten(1)).reshape(weight.shape) * self.scaling[adapter_name]  # fp32 if half


@register(LoraConfig)
class LoraMethod(PeftMethod):
    """Wraps linear, Conv1D, embedding and convolution layers with LoRA layers."""

    @classmethod
    def merge_blocker(cls, config: PeftConfig) -> str | None:
        if getattr(config, "gate", None) is not None:
            return f"a gated LoRA (gate={config.gate!r}) adds G(x)·BAx, which depends on the input, not a fixed delta"
        return None

    layer_class = LoraLayer
    model_api = ("gate_values", "add_weighted_adapter")

    @classmethod
    def default_target_modules(cls, model: nn.Module) -> list[str] | str | None:
        return default_targets(model, DEFAULT_TARGETS)

    @classmethod
    def layer_for(cls, target: nn.Module, config: LoraConfig, adapter_name: str, module_name: str) -> AdapterLayer:
        base = base_layer_of(target)
        _check_gated_target(base, config, module_name)
        if type(base).__module__.startswith("bitsandbytes"):
            # Quantised layers subclass nn.Linear, so they are claimed before that branch; the integration (and
            # bitsandbytes) is imported only when such a layer is present.
            from peftkit.integrations.bitsandbytes import LORA_DISPATCHERS

            for dispatch in LORA_DISPATCHERS:
                layer = dispatch(target, config, adapter_name, module_name)
                if layer is not None:
                    return layer
        if isinstance(base, nn.Linear) or (type(base).__name__ == "Conv1D" and hasattr(base, "nf")):
            return LoraLinear(target, adapter_name, config, module_name)
        if isinstance(base, nn.Embedding):
            return LoraEmbedding(target, adapter_name, config, module_name)
        if isinstance(base, (nn.Conv1d, nn.Conv2d)):
            return LoraConv(target, adapter_name, config, module_name)
        raise TargetModuleError(
            f"LoRA cannot wrap {module_name} ({type(base).__name__}); supported: nn.Linear, transformers Conv1D, "
            "nn.Embedding, nn.Conv1d, nn.Conv2d. Remove it from target_modules."
        )

    @classmethod
    def update_layer(cls, layer: AdapterLayer, config: LoraConfig, adapter_name: str, module_name: str) -> None:
        _check_gated_target(layer.get_base_layer(), config, module_name)
        super().update_layer(layer, config, adapter_name, module_name)

    gate_values = staticmethod(gate_values)  # model.gate_values(): the gates of the last forward call

    # target_parameters (MoE experts) and trainable_token_indices: lora_experts.py, which imports this module.
    @classmethod
    def prepare_config(cls, model: nn.Module, config: LoraConfig) -> LoraConfig:
        from peftkit.methods import lora_experts

        # PiSSA & co. rewrite base weights: every target is checked before the first is (lora_init.py).
        return lora_init.check_base_init_targets(model, lora_experts.prepare_lora_config(model, config))

    @classmethod
    def inject_beyond_modules(cls, model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
        from peftkit.methods import lora_experts

        return lora_experts.inject_beyond_modules(model, config, adapter_name)

    @classmethod
    def convert_checkpoint(cls, model: nn.Module, config: LoraConfig, weights: dict[str, torch.Tensor]
                           ) -> dict[str, torch.Tensor]:
        from peftkit.methods import lora_moe_convert

        return lora_moe_convert.convert_moe_checkpoint(model, weights)

    # save_pretrained(path_initial_model_for_weight_conversion=...): PiSSA & co. as a LoRA on the original base.
    convert_for_initial_model = staticmethod(lora_init.convert_for_initial_model)

    @classmethod
    def add_weighted_adapter(cls, peft_model: nn.Module, *args: Any, **kwargs: Any) -> None:
        """``model.add_weighted_adapter(...)``: see :func:`peftkit.methods.lora_arithmetic.add_weighted_adapter`."""
        from peftkit.methods.lora_arithmetic import add_weighted_adapter  # it imports this module

        add_weighted_adapter(peft_model, *args, **kwargs)

    @classmethod
    def trainable_base_parameters(cls, model: nn.Module, config: LoraConfig) -> list[str]:
        if config.bias == "none":
            return []
        names, heads = [], []
        for module_name, module in [("", model), *candidate_modules(model)]:
            if isinstance(module, ModulesToSaveWrapper):  # a head trained whole: its copy holds the bias
                heads.append(module_name)
            if any(module_name == h or module_name.startswith(h + ".") for h in heads):
                continue
            wrapped = _holds_lora(module)
            if config.bias == "lora_only" and not wrapped:
                continue
            if isinstance(getattr(base_layer_of(module), "bias", None), nn.Parameter):
                # Keys name modules as the user sees them, plus HF peft's one ``base_layer`` hop for the bias of a
                # module LoRA wraps, however many other layers nest there: a key that followed the nesting would
                # change when another method is added to the module, and the checkpoint would no longer load.
                # The name resolves through every nesting order (AdapterLayer forwards ``bias``).
                key = "base_layer.bias" if wrapped else "bias"
                names.append(f"{module_name}.{key}" if module_name else key)
        return sorted(set(names))


def _check_gated_target(base: nn.Module, config: LoraConfig, module_name: str) -> None:
    # The gate lives in LoraLayer's generic path; quantised layers, embeddings and convolutions have their own
    # forward and merge code that would ignore it, so a gated adapter there is refused rather than run ungated.
    plain = type(base) is nn.Linear or (type(base).__name__ == "Conv1D" and hasattr(base, "nf"))
    if config.gate is not None and not plain:
        raise TargetModuleError(
            f"Gated LoRA (gate={config.gate!r}) wraps nn.Linear and transformers Conv1D layers only; {module_name} is "
            f"{type(base).__name__}. Remove it from target_modules or use gate=None."
        )


def _holds_lora(module: nn.Module) -> bool:
    while isinstance(module, AdapterLayer):
        if isinstance(module, LoraLayer):
            return True
        module = module.base_layer
    return False
