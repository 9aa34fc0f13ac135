"""LoRA initialisations that start from the base weight: PiSSA, OLoRA, LoftQ, CorDA, and their save-time conversion.

Plain LoRA starts from ``B = 0`` and leaves the base weight alone. These start from a non-zero pair taken from the
weight ``W`` (out×in) itself and rewrite the base so that the model's outputs do not change at step 0::

    W_res = W − (α/r)·B₀A₀        (the base weight becomes the residual; LoftQ: W_res = Q(W), quantised)
    h     = W_res x + (α/r)·B A x  (= W x while B A = B₀ A₀)

* PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): ``W = U S Vᵀ``, ``B₀ = U_r √(S_r/s)``,
  ``A₀ = √(S_r/s) V_rᵀ`` (``s = α/r``). ``"pissa_niter_N"`` uses ``torch.svd_lowrank`` with N subspace iterations
  (Halko et al.), fast on large layers and random (seeded by torch's generator).
* OLoRA (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775): ``W = Q R``, ``B₀ = Q[:, :r]``, ``A₀ = R[:r]``.
* LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659): alternate ``Q = NF4(W − B A s)`` and the rank-r SVD
  of ``W − Q``; the base becomes the dequantised ``Q``, so ``Q + s·B₀A₀ ≈ W`` better than ``Q`` alone.
* CorDA (Yang et al. 2024, https://arxiv.org/abs/2406.05223): the SVD of ``W C`` (``C`` the input covariance, from
  :func:`peftkit.methods.lora_data_init.preprocess_corda`), ``V`` mapped back through ``C⁻¹``.

An adapter trained from such an init only fits the residual base. ``save_pretrained(...,
path_initial_model_for_weight_conversion=DIR)`` (HF peft's argument; DIR holds the adapter saved at step 0) writes
instead the rank-2r LoRA ``[B | −B₀] [A ; A₀]`` with the same scale, which applies to the ORIGINAL base:
``W + s(B A − B₀ A₀) = W_res + s B A``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.core.errors import CheckpointError, PeftConfigError, TargetModuleError
from peftkit.methods.lora_loftq import loftq_factors, replace_lora_weights_loftq

if TYPE_CHECKING:
    from peftkit.methods.lora import LoraConfig, LoraLayer

__all__ = ["LoftQConfig", "EvaConfig", "CordaConfig", "is_base_init", "init_from_base", "replace_lora_weights_loftq",
           "convert_for_initial_model", "normalise_init_configs", "check_base_init_targets"]

_PISSA = re.compile(r"pissa(_niter_(\d+))?")


@dataclass
class LoftQConfig:
    """LoftQ settings (HF peft's names and defaults).

    Args:
        loftq_bits: 4 (NF4) or 8 (int8 row-wise absmax) bits for the quantised base.
        loftq_iter: Alternations of quantisation and rank-r SVD (at least 1).
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if self.loftq_bits not in (4, 8):
            raise PeftConfigError(f"LoftQConfig.loftq_bits must be 4 (NF4) or 8 (int8), got {self.loftq_bits!r}.")
        if not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise PeftConfigError(f"LoftQConfig.loftq_iter must be an integer >= 1, got {self.loftq_iter!r}.")


@dataclass
class EvaConfig:
    """EVA settings (HF peft's names and defaults); see :func:`peftkit.initialize_lora_eva_weights`.

    Args:
        rho: A layer may get up to ``round(r·rho)`` components when ranks are redistributed (>= 1; 1: no
            redistribution).
        tau: HF peft's convergence threshold for its incremental SVD; peftkit computes the exact covariance in one
            pass over the data, so it is only validated.
        use_label_mask: Leave out positions whose ``labels`` equal ``label_mask_value``.
        label_mask_value: See ``use_label_mask`` (default -100).
        whiten: Divide each component by the square root of its singular value.
        adjust_scaling_factors: After redistribution, ``alpha ← alpha · r_new / r`` so ``alpha/r`` is unchanged.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise PeftConfigError(f"EvaConfig.rho must be >= 1.0, got {self.rho!r}.")
        if not 0.0 <= self.tau <= 1.0:
            raise PeftConfigError(f"EvaConfig.tau must be between 0.0 and 1.0, got {self.tau!r}.")


@dataclass
class CordaConfig:
    """CorDA settings (HF peft's names and defaults); see :func:`peftkit.preprocess_corda`.

    Args:
        cache_file: A safetensors file holding the per-layer SVD (written if missing, read if present).
        covariance_file: A safetensors file holding the per-layer input covariance (written / read likewise).
        corda_method: ``"ipm"`` (instruction-previewed: the top-r components) or ``"kpm"`` (knowledge-preserving:
            the bottom-r components, leaving the dominant ones in the frozen residual).
        verbose: Print progress.
        use_float16_for_covariance: Accumulate the covariance in float16 (half the memory, less precise).
        prune_temporary_fields: Drop the covariance from the modules once the SVD is computed.
    """

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: str = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        if self.corda_method not in ("ipm", "kpm"):
            raise PeftConfigError(f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}.")


def is_base_init(init: object) -> bool:
    """Whether ``init_lora_weights`` rewrites the base weight at layer creation."""
    return isinstance(init, str) and (init in ("olora", "loftq", "corda") or _PISSA.fullmatch(init) is not None)


def normalise_init_configs(config: LoraConfig) -> None:
    """Validate the init sub-configs and store them as HF peft does: ``loftq_config`` a dict, ``eva_config`` /
    ``corda_config`` dataclasses (written to JSON as objects). A sub-config for another init is dropped with a
    warning, as in HF peft."""
    init = config.init_lora_weights
    name = type(config).__name__
    if (is_base_init(init) or init == "eva") and type(config).peft_type != "LORA":  # AdaLoRA's SVD-form layers
        raise PeftConfigError(f"{name}.init_lora_weights={init!r} is an init of LoRA layers; {name} layers would "
                              "ignore it. Use init_lora_weights=True.")
    if is_base_init(init) and getattr(config, "gate", None) is not None:
        raise PeftConfigError(f"init_lora_weights={init!r} with gate={config.gate!r}: the residual W − (α/r)·B₀A₀ "
                              "assumes the fixed scale α/r, which a gate replaces. Use init_lora_weights=True.")
    if isinstance(config.loftq_config, LoftQConfig):
        config.loftq_config = dataclasses.asdict(config.loftq_config)
    if init == "loftq":
        if not config.loftq_config:
            raise PeftConfigError("init_lora_weights='loftq' needs loftq_config=LoftQConfig(...) (the bits and "
                                  "iterations); pass one.")
        config.loftq_config = dataclasses.asdict(_sub_config(LoftQConfig, config.loftq_config, "loftq_config"))
    elif config.loftq_config:
        warnings.warn("loftq_config is ignored unless init_lora_weights='loftq'.", stacklevel=3)
        config.loftq_config = {}
    for field_name, init_name, klass in (("eva_config", "eva", EvaConfig), ("corda_config", "corda", CordaConfig)):
        value = getattr(config, field_name)
        if init == init_name:
            setattr(config, field_name, klass() if value is None else _sub_config(klass, value, field_name))
        elif value is not None:
            warnings.warn(f"{field_name} is ignored unless init_lora_weights={init_name!r}.", stacklevel=3)
            setattr(config, field_name, None)
    if is_base_init(init) and config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        # HF peft warns here too: the converted adapter doubles r, and alpha/√r cannot follow per pattern.
        warnings.warn(f"init_lora_weights={init!r} with use_rslora and rank/alpha patterns cannot be converted by "
                      "save_pretrained(path_initial_model_for_weight_conversion=...).", stacklevel=3)


def _sub_config(klass: type, value: Any, name: str) -> Any:
    if isinstance(value, klass):
        return value
    if not isinstance(value, dict):
        raise PeftConfigError(f"LoraConfig.{name} must be a {klass.__name__} or a dict, got {type(value).__name__}.")
    valid = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(value) - valid)
    if unknown:
        raise PeftConfigError(f"LoraConfig.{name} has unknown field(s) {unknown}; valid: {sorted(valid)}.")
    return klass(**value)


# ---- inits at layer creation ------------------------------------------------------------------------------------
def check_base_init_target(layer: nn.Module, init: object, module_name: str) -> None:
    """Raise before anything is written if ``init`` cannot rewrite this layer's base weight."""
    if not is_base_init(init):
        return
    from peftkit.methods.lora import LoraLinear

    base = layer.get_base_layer()
    quantised = type(base).__module__.startswith("bitsandbytes") or not base.weight.dtype.is_floating_point
    if not isinstance(layer, LoraLinear) or quantised:
        _refuse(init, module_name, base, quantised)


def check_base_init_targets(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``LoraMethod.prepare_config``: refuse a base-rewriting init on any target it cannot rewrite before the first
    weight is rewritten, so a refused ``get_peft_model`` / ``add_adapter`` leaves the model as it was."""
    init = config.init_lora_weights
    if not is_base_init(init):
        return config
    from peftkit.core.targets import match_targets
    from peftkit.integrations.transformers import task_head_names
    from peftkit.methods.lora import LoraMethod

    targets = config.target_modules or LoraMethod.default_target_modules(model)
    if not targets:  # nothing to check here; the walker reports what is missing
        return config
    heads = {*(config.modules_to_save or []), *task_head_names(model, config.task_type)}  # trained whole, not wrapped
    names = match_targets(model, targets, config.exclude_modules, config.layers_to_transform, config.layers_pattern)
    for name in names:
        module = model.get_submodule(name)
        while hasattr(module, "base_layer"):  # wrapped already by another method or adapter
            module = module.base_layer
        if name.rsplit(".", 1)[-1] in heads:
            continue
        linear = isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))
        quantised = type(module).__module__.startswith("bitsandbytes")
        if not linear or quantised:
            _refuse(init, name, module, quantised)
        if init == "corda" and getattr(module, "eigens", None) is None:
            raise PeftConfigError(_NO_CORDA.format(name=name))
        shape = module.weight.shape
        r = config.rank_and_alpha(name)[0]
        if r > min(shape):
            raise TargetModuleError(f"init_lora_weights={init!r} needs r <= min(out, in) = {min(shape)} for {name}, "
                                    f"got r={r}; lower r (or its rank_pattern entry).")
    return config


def _refuse(init: str, module_name: str, base: nn.Module, quantised: bool) -> None:
    if not quantised:
        raise TargetModuleError(
            f"init_lora_weights={init!r} initialises from a 2-D weight (nn.Linear, transformers Conv1D); "
            f"{module_name} is {type(base).__name__}. Remove it from target_modules or use init_lora_weights=True."
        )
    fix = ("load the float model, get_peft_model with init_lora_weights='loftq', or call "
           "peftkit.replace_lora_weights_loftq on this quantised model" if init == "loftq" else
           "initialise on the float model, then quantise the residual base (PiSSA paper Sec. 4.3)")
    raise TargetModuleError(f"init_lora_weights={init!r} cannot rewrite the quantised weight of {module_name} "
                            f"({type(base).__name__}); {fix}.")


@torch.no_grad()
def init_from_base(layer: LoraLayer, adapter_name: str, init: str, config: LoraConfig | None) -> None:
    """Set A, B from the base weight and rewrite it to the residual: ``W ← W − s·B₀A₀`` (LoftQ: ``W ← Q``)."""
    check_base_init_target(layer, init, layer.module_name)
    base = layer.get_base_layer()
    weight, r, scale = base.weight, layer.r[adapter_name], layer.scaling[adapter_name]
    w = weight.detach().float()
    w = w.T if layer.fan_in_fan_out else w  # (out, in)
    if r > min(w.shape):
        raise TargetModuleError(f"init_lora_weights={init!r} needs r <= min(out, in) = {min(w.shape)} for "
                                f"{layer.module_name}, got r={r}; lower r (or its rank_pattern entry).")
    if init == "loftq":
        loftq = (config.loftq_config if config is not None else None) or {}
        residual, a, b = loftq_factors(w, r, scale, loftq.get("loftq_bits", 4), loftq.get("loftq_iter", 1))
    else:
        if init == "olora":
            a, b = _olora(w, r)
        elif init == "corda":
            a, b = _corda(base, w, r, scale, layer.module_name)
        else:
            a, b = _pissa(w, r, scale, init)
        residual = w - scale * b @ a
    layer.lora_A[adapter_name].weight.copy_(a)
    layer.lora_B[adapter_name].weight.copy_(b)
    weight.data.copy_((residual.T if layer.fan_in_fan_out else residual).to(weight.dtype))


def _pissa(w: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    niter = _PISSA.fullmatch(init).group(2)
    if niter is None:  # W = V S Uᴴ in HF's naming: V (out, k), Uh (k, in)
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        vr, sr, uhr = v[:, :r], s[:r] / scale, uh[:r]
    else:  # randomised: Halko et al.'s subspace iteration, cost O(out·in·r) instead of a full SVD
        vr, sr, ur = torch.svd_lowrank(w, r, niter=int(niter))
        sr, uhr = sr / scale, ur.t()
    # s·B A = V_r S_r U_rᴴ: the principal part moves into the adapter, √S split over both factors.
    return torch.diag(torch.sqrt(sr)) @ uhr, vr @ torch.diag(torch.sqrt(sr))


def _olora(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, rr = torch.linalg.qr(w)  # q (out, k) orthonormal columns, rr (k, in) upper triangular
    return rr[:r].contiguous(), q[:, :r].contiguous()


_NO_CORDA = ("init_lora_weights='corda' needs peftkit.preprocess_corda(model, config, run_model) before "
             "get_peft_model; {name} has no CorDA decomposition.")


def _corda(base: nn.Module, w: torch.Tensor, r: int, scale: float, module_name: str
           ) -> tuple[torch.Tensor, torch.Tensor]:
    eigens = getattr(base, "eigens", None)
    if eigens is None:
        raise PeftConfigError(_NO_CORDA.format(name=module_name))
    u, s, v = eigens["U_WC"].float(), eigens["S_WC"].float(), eigens["V_WC"].float()
    if u.shape != (w.shape[0], r) or s.shape != (r,) or v.shape != (w.shape[1], r):
        raise PeftConfigError(f"The CorDA decomposition of {module_name} has rank {s.shape[0]} but the config gives "
                              f"r={r}; run preprocess_corda again with this config (or clear its cache_file).")
    if not (torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(v).all()):
        raise PeftConfigError(f"The CorDA decomposition of {module_name} holds NaN/inf; the calibration inputs "
                              "were degenerate. Run preprocess_corda with other data.")
    s = s / scale
    del base.eigens  # used once: the residual now holds the rest
    return (v.t() * s.sqrt().view(-1, 1)).contiguous(), (u * s.sqrt()).contiguous()


# ---- save-time conversion -----------------------------------------------------------------------------------------
_PAIRS = {"lora_A.weight": ("lora_B.weight", 0, 1), "lora_embedding_A": ("lora_embedding_B", 0, 1)}


def convert_for_initial_model(
    config: LoraConfig, tensors: dict[str, torch.Tensor], directory: str | os.PathLike
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The adapter as a plain LoRA for the original base: ``[A ; A₀]``, ``[B | −B₀]``, r and alpha doubled.

    ``directory`` holds this adapter as saved at step 0 (``save_pretrained`` right after ``get_peft_model``).

    Raises:
        PeftConfigError: rsLoRA with rank/alpha patterns (the doubled rank cannot keep ``alpha/√r`` per pattern), or
            a LoftQ adapter (its base is the quantised weight, not a residual the adapter can give back).
        CheckpointError: the initial adapter is missing or does not fit this one (keys, shapes).
    """
    from peftkit.core import checkpoint as ckpt

    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise PeftConfigError("path_initial_model_for_weight_conversion does not work with use_rslora together with "
                              "rank_pattern / alpha_pattern (HF peft refuses it too): the rank-2r adapter could not "
                              "keep alpha/sqrt(r) per pattern. Save without the conversion.")
    if config.init_lora_weights == "loftq":
        raise PeftConfigError("path_initial_model_for_weight_conversion cannot convert a LoftQ adapter: its base is "
                              "the quantised weight Q(W), not W − s·B₀A₀, so no LoRA on W reproduces it.")
    directory = os.fspath(directory)
    initial, _ = ckpt.read_adapter_files(directory)  # CheckpointError when it holds no (readable) adapter
    out, problems = dict(tensors), []
    for key, a in tensors.items():
        for a_suffix, (b_suffix, a_dim, b_dim) in _PAIRS.items():
            if not key.endswith(a_suffix):
                continue
            b_key = key[: -len(a_suffix)] + b_suffix
            missing = [k for k in (key, b_key) if k not in initial]
            if missing or b_key not in tensors:
                problems.append(f"{missing[0] if missing else b_key} is missing")
                continue
            a0, b0 = initial[key], initial[b_key]
            if a0.shape != a.shape or b0.shape != tensors[b_key].shape:
                problems.append(f"{key}: {tuple(a0.shape)} / {tuple(b0.shape)} saved, {tuple(a.shape)} / "
                                f"{tuple(tensors[b_key].shape)} now")
                continue
            # W + s(B A − B₀A₀) = W_res + s B A: stack the factors, one rank-2r LoRA with the same scale.
            out[key] = torch.cat([a.detach(), a0.to(a.device, a.dtype)], dim=a_dim)
            out[b_key] = torch.cat([tensors[b_key].detach(), -b0.to(a.device, a.dtype)], dim=b_dim)
    if problems:
        raise CheckpointError(f"The initial adapter in {directory!r} does not fit this adapter ({len(problems)} "
                              "problem(s)); nothing was written:\n  - " + "\n  - ".join(problems[:8]))
    alpha_factor = math.sqrt(2) if config.use_rslora else 2  # α/√(2r) = α/√r needs √2·α
    converted = dataclasses.replace(
        config, init_lora_weights=True, r=config.r * 2, lora_alpha=config.lora_alpha * alpha_factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
        loftq_config={}, eva_config=None, corda_config=None,
    )
    return out, converted
