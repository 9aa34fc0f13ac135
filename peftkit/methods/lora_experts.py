"""LoRA on parameters held directly by a module: the 3-D expert stacks of transformers 5 MoE layers.

On transformers 5, Mixtral's and Qwen2-MoE's experts are no longer ``nn.Linear`` modules but one module holding
``gate_up_proj (E, 2·I, H)`` and ``down_proj (E, H, I)``. ``LoraConfig.target_parameters`` names such parameters
(HF peft's field, matched like ``target_modules`` entries: the full ``<module>.<parameter>`` name or a dotted
suffix of it) and every targeted parameter gets one low-rank update per expert::

    W'[e] = W[e] + (α/r) · B_e A_e          A_e (r, in), B_e (out, r), e = 0 … E-1

stored as HF peft's ``ParamWrapper`` stores them, so checkpoints move both ways: ``lora_A.weight (E·r, in)`` holds
``A_e`` in rows ``e·r … e·r+r-1`` and ``lora_B.weight (out, r·E)`` holds ``B_e`` in columns ``j·E + e``. HF wraps each
parameter of a module in its own nested wrapper (in the order the module registers them), so the last parameter's
tensors are keyed ``<module>.lora_A.weight`` and each earlier one gains a ``base_layer.`` hop
(``experts.base_layer.lora_A.weight`` is ``gate_up_proj``'s when ``down_proj`` is targeted too). peftkit wraps the
module once and writes the same keys.

The module's forward runs unchanged with ``W'`` bound in place of ``W`` (``torch.func.functional_call``), so any
expert kernel transformers picks (eager loop, ``grouped_mm``, ``batched_mm``) computes with the adapted weights.
2-D parameters (a router's ``gate.weight``) are the case ``E = 1``. Checkpoints written for transformers 4's
per-expert ``nn.Linear`` layout (``experts.<e>.w1`` ...) are converted on load, as HF peft does
(:mod:`peftkit.methods.lora_moe_convert`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.core.errors import PeftConfigError, TargetModuleError
from peftkit.core.layer import AdapterLayer, base_layer_of
from peftkit.core.targets import candidate_modules, get_module
from peftkit.methods.lora import LoraLayer

if TYPE_CHECKING:
    from peftkit.methods.lora import LoraConfig

__all__ = ["LoraParamWrapper", "inject_target_parameters", "inject_beyond_modules", "prepare_lora_config",
           "check_beyond_modules"]


class LoraParamWrapper(LoraLayer):
    """LoRA on the parameters a module holds directly (HF peft's ``ParamWrapper``), one update per expert.

    For a parameter ``W (E, out, in)`` (``F.linear(x, W[e])``; ``(E, in, out)`` on modules with
    ``is_transposed = True``) or ``W (out, in)`` (``E = 1``)::

        W'[e] = W[e] + s · B_e A_e,   s = α/r (or α/√r with rsLoRA)

    Args:
        base_layer: The module holding the parameters (e.g. ``MixtralExperts``).
        adapter_name: Name of the first adapter.
        config: Its ``LoraConfig``; ``rank_pattern`` / ``alpha_pattern`` are matched against
            ``<module>.<parameter>``.
        module_name: Full module name.
        parameter_names: The module's parameters to adapt.

    Shapes: ``lora_A[name][p].weight (E·r, in)``, ``lora_B[name][p].weight (out, r·E)``.

    Raises:
        PeftConfigError: ``lora_dropout`` or ``fan_in_fan_out`` is set (a weight update cannot see the input),
            or a parameter is not 2-D or 3-D.
    """

    adapter_param_names = ("lora_A", "lora_B")
    adapter_attr_names = ("lora_dropout", "r", "lora_alpha", "scaling", "scale_factor")
    method_name = "LoRA"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, module_name: str,
                 parameter_names: list[str]) -> None:
        super().__init__(base_layer, module_name)
        # The nesting order HF peft gives its wrappers: the module's registration order, first one innermost.
        order = list(base_layer_of(base_layer)._parameters)
        self.parameter_names = sorted(parameter_names, key=order.index)
        self.scale_factor: dict[str, float] = {}
        self.update_layer(adapter_name, config, module_name, parameter_names)

    # ---- shapes and keys -----------------------------------------------------------------------------------
    def _layout(self, param_name: str) -> tuple[int, int, int, bool]:
        """(experts, in, out, transposed) of one parameter; ``transposed``: stored ``(E, in, out)``."""
        module = self.get_base_layer()
        shape = tuple(getattr(module, param_name).shape)
        if len(shape) == 2:
            return 1, shape[1], shape[0], False
        if len(shape) != 3:
            raise PeftConfigError(f"target_parameters: {self.module_name}.{param_name} has shape {shape}; LoRA "
                                  "adapts 2-D and 3-D (experts, ., .) parameters only. Remove it.")
        if getattr(module, "is_transposed", False):  # transformers' flag for experts stored (E, in, out)
            return shape[0], shape[1], shape[2], True
        return shape[0], shape[2], shape[1], False

    def _key_prefix(self, param_name: str) -> str:
        # HF nests one wrapper per parameter, the last registered outermost: each earlier one sits a base_layer deeper.
        depth = len(self.parameter_names) - 1 - self.parameter_names.index(param_name)
        return "base_layer." * depth

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name not in self.lora_A:
            return {}
        out = {}
        for p in self.parameter_names:
            out[f"{self._key_prefix(p)}lora_A.weight"] = self.lora_A[adapter_name][p].weight
            out[f"{self._key_prefix(p)}lora_B.weight"] = self.lora_B[adapter_name][p].weight
        return out

    # ---- adapters ------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str,  # type: ignore[override]
                     parameter_names: list[str] | None = None) -> None:
        if parameter_names is None:  # reached through target_modules
            raise TargetModuleError(
                f"{module_name} is adapted through target_parameters already; it cannot also be a target_modules "
                "entry (LoRA cannot wrap it as a module). Remove it from target_modules."
            )
        if config.use_dora or config.gate is not None:
            raise PeftConfigError("target_parameters works with plain LoRA only: use_dora and gate change the "
                                  "output, not the weight (HF peft refuses variants here too). Drop them.")
        if config.lora_dropout:
            raise PeftConfigError("target_parameters needs lora_dropout=0: the update is folded into the weight, "
                                  "where no dropout of the input can be applied (HF peft refuses it too).")
        if config.fan_in_fan_out:
            raise PeftConfigError("target_parameters does not work with fan_in_fan_out=True; drop it.")
        if config.init_lora_weights not in (True, False, "gaussian"):
            raise PeftConfigError(f"target_parameters supports init_lora_weights True, False or 'gaussian', got "
                                  f"{config.init_lora_weights!r} (the other inits read a 2-D module weight).")
        if set(parameter_names) != set(self.parameter_names):
            raise PeftConfigError(
                f"Adapters that use target_parameters must all target the same parameters of {module_name}: "
                f"{sorted(self.parameter_names)} are adapted already, {adapter_name!r} targets "
                f"{sorted(parameter_names)}. Their checkpoint keys depend on that set (HF peft's rule); use one "
                "target_parameters list for every adapter."
            )
        base = self.get_base_layer()
        as_lists = {"A": {}, "B": {}}
        self.r[adapter_name], self.lora_alpha[adapter_name], self.scaling[adapter_name] = {}, {}, {}
        for p in self.parameter_names:
            experts, fan_in, fan_out, _ = self._layout(p)
            r, alpha = config.rank_and_alpha(f"{module_name}.{p}")
            self.r[adapter_name][p], self.lora_alpha[adapter_name][p] = r, alpha
            self.scaling[adapter_name][p] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
            weight = getattr(base, p)
            # Half-precision bases keep fp32 adapters, as for every LoRA layer (see LoraLayer.update_layer).
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
            kw = {"device": weight.device, "dtype": dtype}
            lora_a = nn.Linear(fan_in, r * experts, bias=False, **kw)
            lora_b = nn.Linear(r * experts, fan_out, bias=False, **kw)
            _init_pair(lora_a.weight, lora_b.weight, config.init_lora_weights, r)
            as_lists["A"][p], as_lists["B"][p] = lora_a, lora_b
        self.lora_A[adapter_name] = nn.ModuleDict(as_lists["A"])
        self.lora_B[adapter_name] = nn.ModuleDict(as_lists["B"])
        self.lora_dropout[adapter_name] = nn.Identity()
        self.scale_factor[adapter_name] = 1.0

    def adapter_scale(self, adapter_name: str) -> float | None:
        return self.scale_factor.get(adapter_name)

    def set_scale(self, adapter_name: str, scale: float) -> None:
        if adapter_name not in self.scale_factor:
            return
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"Adapter {adapter_name!r} is merged into {self.module_name}; unmerge it before "
                               "changing its scale (the merged weights would keep the old one).")
        self.scale_factor[adapter_name] = float(scale)

    # ---- the update ----------------------------------------------------------------------------------------
    def _factors(self, adapter_name: str, p: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(lhs, rhs, s)`` with the update ``s · lhs @ rhs`` in the parameter's layout (batched over experts)."""
        experts, _, _, transposed = self._layout(p)
        a, b = self.lora_A[adapter_name][p].weight, self.lora_B[adapter_name][p].weight
        scale = self.scaling[adapter_name][p] * self.scale_factor[adapter_name]
        if experts == 1 and getattr(self.get_base_layer(), p).dim() == 2:
            return b, a, scale
        r = a.shape[0] // experts
        a3 = a.reshape(experts, r, a.shape[1])  # (E, r, in): rows e·r … e·r+r-1
        b3 = b.reshape(b.shape[0], r, experts).permute(2, 0, 1)  # (E, out, r): columns j·E + e
        return (a3.transpose(1, 2), b3.transpose(1, 2), scale) if transposed else (b3, a3, scale)

    def _adapted(self, p: str, names: list[str]) -> torch.Tensor:
        """``W + Σ s·lhs@rhs`` over ``names``, differentiable in the adapter weights; in the parameter's dtype."""
        weight = getattr(self.get_base_layer(), p)
        # Half-precision weights are summed in fp32 and rounded once (the adapters are fp32 there).
        out = weight.to(torch.float32) if weight.dtype in (torch.float16, torch.bfloat16) else weight
        for name in names:
            lhs, rhs, scale = self._factors(name, p)
            fold = torch.addmm if out.dim() == 2 else torch.baddbmm
            out = fold(out, lhs.to(out.dtype), rhs.to(out.dtype), alpha=scale)
        return out.to(weight.dtype)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError(f"{self.module_name} holds one update per parameter; use "
                                  "parameter_delta(adapter_name, parameter_name).")

    def parameter_delta(self, adapter_name: str, param_name: str) -> torch.Tensor:
        """``W' - W`` of one parameter (fp32 for a half-precision one), in the parameter's layout."""
        weight = getattr(self.get_base_layer(), param_name)
        lhs, rhs, scale = self._factors(adapter_name, param_name)
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        return (lhs.to(dtype) @ rhs.to(dtype)) * scale

    # ---- forward -------------------------------------------------------------------------------------------
    def _run(self, names: list[str], x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        if not names:
            return self.base_layer(x, *args, **kwargs)
        hops, module = "", self.base_layer
        while isinstance(module, AdapterLayer):  # another method's layer between us and the module
            hops, module = hops + "base_layer.", module.base_layer
        adapted = {hops + p: self._adapted(p, names) for p in self.parameter_names}
        # The module's own forward, with W' bound in place of W for this call only (nothing is written to W).
        return torch.func.functional_call(self.base_layer, adapted, (x, *args), kwargs, strict=False)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(x, *args, **kwargs)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.lora_A and n not in self.merged_adapters]
        return self._run(names, x, args, kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        # The module's inputs are split along dim 0 in equal blocks, one per row of the batch: MoE blocks flatten
        # (B, T, H) to (B·T, H) before the router and the experts, so row i's tokens are block i. Every tensor
        # argument of that length (routing indices, weights) is split alongside.
        size, parts = x.shape[0], []
        for name, rows in self.rows_per_adapter(size).items():
            rows = rows.to(x.device)
            sub_args = tuple(_take_rows(a, rows, size) for a in args)
            sub_kwargs = {k: _take_rows(v, rows, size) for k, v in kwargs.items()}
            parts.append((rows, self._run([name] if name in self.lora_A else [], x[rows], sub_args, sub_kwargs)))
        return _scatter(parts, size)

    # ---- merging -------------------------------------------------------------------------------------------
    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        names = self._to_merge(adapter_names)
        for p in self.parameter_names if names else []:
            weight = getattr(self.get_base_layer(), p).detach()
            merged = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight.clone()
            for name in names:
                merged += self.parameter_delta(name, p)
                if not torch.isfinite(merged.to(weight.dtype)).all():
                    raise ValueError(f"Merging adapter {name!r} into {self.module_name}.{p} gives non-finite weights "
                                     "(the adapter holds NaN/inf or overflows the dtype). Nothing was merged.")

    def merge(self, adapter_names: list[str] | None = None, safe: bool = False) -> None:
        if safe:
            self.check_merge(adapter_names)
        for name in self._to_merge(adapter_names):
            for p in self.parameter_names:
                _add(getattr(self.get_base_layer(), p), self.parameter_delta(name, p), 1.0)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            for p in self.parameter_names:
                _add(getattr(self.get_base_layer(), p), self.parameter_delta(name, p), -1.0)


def _add(weight: torch.Tensor, delta: torch.Tensor, sign: float) -> None:
    with torch.no_grad():
        if weight.dtype in (torch.float16, torch.bfloat16):  # sum in fp32, round once
            weight.copy_(weight.float().add_(delta.float(), alpha=sign))
        else:
            weight.add_(delta, alpha=sign)


def _take_rows(value: Any, rows: torch.Tensor, size: int) -> Any:
    """``value[rows]`` for a tensor laid out like the input (first dimension ``size``), else ``value`` itself."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == size:
        return value[rows]
    return value


def _scatter(parts: list[tuple[torch.Tensor, Any]], size: int) -> Any:
    """Put each group's output back at its rows; outputs may be tensors or tuples of them (a router's). An output
    with ``k`` times the group's input rows (a router flattening (B, T, H) to (B·T, H)) takes ``k`` rows per input
    row, batch-major as the flattening orders them."""
    first = parts[0][1]
    if isinstance(first, tuple):
        return tuple(_scatter([(rows, out[i]) for rows, out in parts], size) for i in range(len(first)))
    per_row = {out.shape[0] // len(rows) if isinstance(out, torch.Tensor) and out.dim() else 0 for rows, out in parts}
    if len(per_row) != 1 or 0 in per_row or any(out.shape[0] % len(rows) for rows, out in parts):
        raise NotImplementedError("A mixed batch through target_parameters needs module outputs laid out along dim 0 "
                                  "like the inputs; run one adapter per batch instead.")
    k = per_row.pop()
    result = first.new_empty((size * k, *first.shape[1:]))
    for rows, out in parts:
        result[(rows[:, None] * k + torch.arange(k, device=rows.device)).flatten()] = out
    return result


@torch.no_grad()
def _init_pair(lora_a: torch.Tensor, lora_b: torch.Tensor, init: bool | str, r: int) -> None:
    # As LoraLayer.reset_adapter_parameters: B = 0 so the update is zero at step 0 (LoRA paper Sec. 4.1).
    if init is False:
        nn.init.normal_(lora_b, std=0.02)
        return
    if init == "gaussian":
        nn.init.normal_(lora_a, std=1 / r)
    else:
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    nn.init.zeros_(lora_b)


def check_beyond_modules(config: LoraConfig) -> None:
    """``LoraConfig.__post_init__``'s checks of ``target_parameters`` and ``trainable_token_indices``."""
    from peftkit.methods.trainable_tokens import check_token_indices

    if config.target_parameters is not None:
        config.target_parameters = sorted(set(config.target_parameters))  # HF may write a set; order is irrelevant
    indices = config.trainable_token_indices
    for key, ids in (indices.items() if isinstance(indices, dict) else [("", indices)] if indices is not None else []):
        check_token_indices(f"LoraConfig.trainable_token_indices{f'[{key!r}]' if key else ''}", ids)
        if key and key in (config.modules_to_save or []):
            raise PeftConfigError(f"{key!r} is both in modules_to_save (trained whole) and in "
                                  "trainable_token_indices (a few rows trained); choose one.")


def prepare_lora_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``LoraMethod.prepare_config``: retarget a transformers-4 MoE config (:func:`convert_moe_config`), and let a
    config that targets only parameters or token rows go without ``target_modules`` on a model with no default."""
    from peftkit.methods.lora import LoraMethod
    from peftkit.methods.lora_moe_convert import convert_moe_config  # it imports this module

    changes = convert_moe_config(model, config)

    beyond = config.target_parameters or config.trainable_token_indices is not None
    if beyond and config.target_modules is None and LoraMethod.default_target_modules(model) is None:
        changes["target_modules"] = []  # HF: target_modules may be absent when target_parameters is given
    return dataclasses.replace(config, **changes) if changes else config


def inject_beyond_modules(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """``LoraMethod.inject_beyond_modules``: the parameter targets, then the trainable token rows."""
    names = inject_target_parameters(model, config, adapter_name) if config.target_parameters else []
    if config.trainable_token_indices is not None:
        from peftkit.methods.trainable_tokens import inject_token_rows

        names += inject_token_rows(model, config.trainable_token_indices, adapter_name)
    return names


def inject_target_parameters(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Wrap every module holding a parameter ``config.target_parameters`` names; return the module names.

    Raises:
        TargetModuleError: nothing matches (close parameter names are listed), or a matched module is already
            wrapped by a layer of ``target_modules``.
    """
    targets = sorted(set(config.target_parameters or []))
    found: dict[str, list[str]] = {}
    all_names = []
    for name, module in candidate_modules(model):
        for pname, _ in base_layer_of(module).named_parameters(recurse=False):
            key = f"{name}.{pname}"
            all_names.append(key)
            if any(key == t or key.endswith("." + t) for t in targets):
                found.setdefault(name, []).append(pname)
    if not found:
        hints = {t: difflib.get_close_matches(t, all_names, n=3, cutoff=0.3) for t in targets}
        raise TargetModuleError(
            f"target_parameters={targets} match no parameter of {type(model).__name__} (close names: {hints}). "
            "Entries are '<module>.<parameter>' names from model.named_parameters(), or dotted suffixes of them."
        )
    for name, params in found.items():
        module = get_module(model, name)
        owned = module if isinstance(module, LoraParamWrapper) else None
        if owned is None and isinstance(module, AdapterLayer):
            raise TargetModuleError(
                f"{name} is wrapped already ({type(module).__name__}); its parameters {params} cannot also be "
                "targeted with target_parameters. Remove it from target_modules or from target_parameters."
            )
        if owned is not None:
            owned.update_layer(adapter_name, config, name, params)
        else:
            owned = LoraParamWrapper(module, adapter_name, config, name, params)
            from peftkit.core.inject import replace_module

            replace_module(model, name, owned)
        owned.training = module.training
        for child in owned.children():
            if child is not owned.base_layer:
                child.train(module.training)
    return list(found)
