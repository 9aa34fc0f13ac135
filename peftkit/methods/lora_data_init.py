"""Data-driven LoRA initialisations: EVA and the CorDA preprocessing, from the inputs each target layer sees.

* EVA (Paischer et al. 2024, "One Initialization to Rule them All", https://arxiv.org/abs/2410.07170): run data
  through the model, take the principal components of each target layer's inputs ``X (N, in)`` (the top right
  singular vectors of the centred ``X``) as the rows of A; B stays 0, so the outputs do not change. Ranks are then
  redistributed across layers by explained variance: the ``Σ r_l`` components with the largest explained-variance
  ratios win, at most ``round(r_l·rho)`` per layer::

      C = Σ (x − μ)(x − μ)ᵀ = V Λ Vᵀ,   A = V[:, :r']ᵀ,   B = 0,   ratio_i = λ_i / tr C

  HF peft runs an incremental PCA until the components stop moving (``tau``); peftkit accumulates ``C`` exactly
  in one pass (float64), so the result is the exact PCA of every position seen.
* CorDA (Yang et al. 2024, https://arxiv.org/abs/2406.05223): ``C = mean over batches of XᵀX`` (X scaled by its
  maximum); the SVD of ``W (C + δI)`` gives ``U, S, Vᵀ``; ``V ← (Vᵀ (C + δI)⁻¹)ᵀ``, cropped to the top r
  components (``"ipm"``) or the bottom r (``"kpm"``). ``init_lora_weights="corda"`` then sets
  ``B = U √(S/s)``, ``A = √(S/s) Vᵀ`` and ``W ← W − s B A`` (:mod:`peftkit.methods.lora_init`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from peftkit.core.errors import PeftConfigError
from peftkit.core.inject import replace_module
from peftkit.core.targets import match_targets

__all__ = ["get_eva_state_dict", "initialize_lora_eva_weights", "preprocess_corda", "forward_fn_dict",
           "prepare_model_inputs_fn_language_modeling", "prepare_layer_inputs_fn_language_modeling"]

_PREFIX = "base_model.model."


def forward_fn_dict(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    """Run ``model(**inputs)``: the default way to feed a dataloader's batches."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping[str, Any], peft_config: Any) -> torch.Tensor:
    """``(N, 2)`` (row, position) indices of the tokens to use: attended, and not label-masked when
    ``eva_config.use_label_mask`` (HF peft's function of the same name)."""
    if not isinstance(model_input, Mapping):
        raise TypeError("prepare_model_inputs_fn_language_modeling needs dict batches (input_ids, attention_mask).")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = peft_config.eva_config
    if eva is not None and eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: torch.Tensor, layer_name: str
                                              ) -> torch.Tensor:
    """The layer's input at the selected (row, position) pairs: ``(N, in)``."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"EVA cannot read the input of {layer_name} ({type(x).__name__}); pass "
                        "prepare_layer_inputs_fn returning a (N, in) tensor.")
    return x[model_input.T.unbind()]


def _to_device(inputs: Any, device: torch.device) -> Any:
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


class _CovarianceHook:
    """Accumulates ``n``, ``Σx`` and ``Σxxᵀ`` of one layer's selected inputs, in float64."""

    def __init__(self, name: str, fn: Callable) -> None:
        self.name, self.fn, self.model_input = name, fn, None
        self.n, self.total, self.outer = 0, None, None

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = self.fn(args, self.model_input, self.name)
        x = x.reshape(-1, x.shape[-1]).double()
        if self.total is None:
            self.total, self.outer = x.new_zeros(x.shape[-1]), x.new_zeros(x.shape[-1], x.shape[-1])
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x

    def pca(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Components ``(in, in)`` as rows, their explained-variance ratios and singular values, largest first."""
        mean = self.total / self.n
        cov = self.outer - self.n * torch.outer(mean, mean)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        eigvals, comps = eigvals.flip(0).clamp_min(0), eigvecs.flip(1).T
        # sklearn's svd_flip (u_based_decision=False), which HF's IncrementalPCA applies: the largest-magnitude
        # entry of each component is positive, so the sign is deterministic.
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        comps = comps * torch.where(signs == 0, 1.0, signs).to(comps.dtype)
        return comps, eigvals / eigvals.sum().clamp_min(1e-300), eigvals.sqrt()


def _eva_targets(model: nn.Module, peft_config: Any, adapter_name: str) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The module tree to hook and ``{name in the base model: module}`` EVA initialises (linear layers only)."""
    from peftkit.core.layer import AdapterLayer
    from peftkit.methods.lora import LoraLinear, LoraMethod

    if hasattr(model, "peft_config") and hasattr(model, "_layers"):
        return model.get_base_model(), {n: m for n, m in model._layers()
                                        if isinstance(m, LoraLinear) and adapter_name in m.lora_A}
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("get_eva_state_dict: pass the PeftModel, or the plain base model with peft_config.")
    targets = peft_config.target_modules or LoraMethod.default_target_modules(model)
    names = match_targets(model, targets, peft_config.exclude_modules, peft_config.layers_to_transform,
                          peft_config.layers_pattern)
    linear = {n: model.get_submodule(n) for n in names}
    return model, {n: m for n, m in linear.items()
                   if isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))}


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: Any = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | dict[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """EVA's A per layer: ``{module name in the base model: (r_l, in)}``, ranks already redistributed.

    ``model`` is a ``PeftModel`` (its LoRA layers are hooked with adapters disabled) or the plain base model with
    ``peft_config``. The other arguments are HF peft's; ``gather_distributed_inputs`` and ``show_progress_bar``
    are accepted and unused (one process, no progress bar).

    Raises:
        ValueError: an empty dataloader, or fewer selected positions than components a layer needs.
    """
    if peft_config is None:
        if not hasattr(model, "peft_config"):
            raise ValueError("get_eva_state_dict needs peft_config when model is not a PeftModel.")
        peft_config = model.peft_config[adapter_name]
    eva = peft_config.eva_config
    if eva is None:
        from peftkit.methods.lora_init import EvaConfig

        eva = EvaConfig()
    hooked_root, layers = _eva_targets(model, peft_config, adapter_name)
    if not layers:
        raise ValueError("EVA found no linear LoRA target; it initialises nn.Linear and Conv1D layers only.")
    layer_fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else {}
    unknown = sorted(set(layer_fns) - set(layers))
    if unknown:
        raise ValueError(f"prepare_layer_inputs_fn names modules that are not EVA targets: {unknown}.")
    default_fn = prepare_layer_inputs_fn if callable(prepare_layer_inputs_fn) else \
        prepare_layer_inputs_fn_language_modeling
    hooks = {n: _CovarianceHook(n, layer_fns.get(n, default_fn)) for n in layers}
    device = next((p.device for p in hooked_root.parameters() if p.device.type != "meta"), None)
    disable = model.disable_adapter() if hasattr(model, "disable_adapter") else _nullcontext()
    handles = [layers[n].register_forward_hook(hooks[n]) for n in layers]
    was_training, batches = hooked_root.training, 0
    try:
        hooked_root.eval()
        with disable:
            for inputs in dataloader:
                inputs = _to_device(inputs, device) if device is not None else inputs
                selected = prepare_model_inputs_fn(inputs, peft_config) if prepare_model_inputs_fn else inputs
                for hook in hooks.values():
                    hook.model_input = selected
                (forward_fn or forward_fn_dict)(model, inputs)
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
        hooked_root.train(was_training)
    if not batches:
        raise ValueError("dataloader is empty: EVA needs at least one batch.")
    return _redistribute(hooks, peft_config, eva, device)


def _redistribute(hooks: dict[str, _CovarianceHook], config: Any, eva: Any, device: torch.device | None
                  ) -> dict[str, torch.Tensor]:
    """HF peft's rank redistribution: the ``Σ r_l`` largest explained-variance ratios over all layers."""
    pcs, ratios, most, budget = {}, [], {}, 0
    for name, hook in hooks.items():
        r = config.rank_and_alpha(name)[0]
        budget += r
        most[name] = round(r * eva.rho)
        if hook.n < most[name]:
            raise ValueError(f"EVA saw {hook.n} positions at {name} but needs at least {most[name]} (r·rho); "
                             "give it more data.")
        pcs[name] = hook.pca()
        ratios += [(float(v), name) for v in pcs[name][1][: most[name]]]
    ratios.sort(key=lambda item: -item[0])  # stable: ties keep layer order, as HF's argsort on one tensor
    counts = dict.fromkeys(hooks, 0)
    for _, name in ratios[:budget]:
        counts[name] += 1
    out = {}
    for name, (comps, _, singular) in pcs.items():
        k = counts[name]
        u = comps[:k]
        if eva.whiten:
            u = u / singular[:k].sqrt().reshape(-1, 1)
        out[name] = u.float().to(device) if device is not None else u.float()
    return out


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | dict[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Replace A of every linear LoRA layer by EVA's components (HF peft's function and arguments).

    Layers whose rank changed are rebuilt with that rank (alpha scaled along when
    ``eva_config.adjust_scaling_factors``), layers given rank 0 lose the adapter, and the adapter's config gets
    the new ``rank_pattern`` / ``alpha_pattern`` / ``target_modules``, so the checkpoint reloads in either library.

    Raises:
        ValueError: not a ``PeftModel``, several active adapters, an adapter not created with
            ``init_lora_weights="eva"``, or neither dataloader nor eva_state_dict.
    """
    if not hasattr(model, "peft_config") or not hasattr(model, "_layers"):
        raise ValueError("initialize_lora_eva_weights needs a PeftModel (get_peft_model(model, LoraConfig(...))).")
    if len(model.active_adapters) > 1:
        raise ValueError("initialize_lora_eva_weights works with one active adapter; set_adapter one first.")
    config = model.peft_config[adapter_name]
    if getattr(config, "init_lora_weights", None) != "eva":
        raise ValueError("initialize_lora_eva_weights needs an adapter created with init_lora_weights='eva'.")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("initialize_lora_eva_weights needs a dataloader or an eva_state_dict.")
        eva_state_dict = get_eva_state_dict(model, dataloader, None, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, adapter_name)
    _load_eva_state_dict(model, {k.removeprefix(_PREFIX): v for k, v in eva_state_dict.items()}, adapter_name)
    return model


def _load_eva_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    from peftkit.methods.lora import LoraLayer

    config = model.peft_config[adapter_name]
    eva = config.eva_config
    layers = [(n, m) for n, m in model._layers() if isinstance(m, LoraLayer) and adapter_name in m.r]
    bad = {n: (tuple(state[n].shape), m.in_features) for n, m in layers
           if n in state and (state[n].dim() != 2 or state[n].shape[1] != getattr(m, "in_features", -1))}
    if bad:  # checked before any layer changes
        raise ValueError(f"eva_state_dict does not fit the LoRA layers (shape, in_features): {bad}.")
    rank_pattern, alpha_pattern, kept, missing = {}, {}, [], []
    for name, layer in layers:
        r, alpha = config.rank_and_alpha(name)
        if name not in state:
            missing.append(name)  # embeddings, convolutions: EVA does not cover them, they keep the default init
            kept.append(name)
            new_rank = r
        else:
            comps = state[name]
            new_rank = comps.shape[0]
            if new_rank == 0:  # HF peft drops the layer's LoRA altogether
                layer.delete_adapter(adapter_name)
                if not layer.adapter_names:
                    replace_module(model.get_base_model(), name, layer.base_layer)
                continue
            if new_rank != r:
                alpha = alpha * new_rank / r if eva.adjust_scaling_factors else alpha
                layer.update_layer(adapter_name, dataclasses.replace(
                    config, r=new_rank, lora_alpha=alpha, rank_pattern={}, alpha_pattern={}), name)
                for child in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
                    child.train(layer.training)
            layer.lora_A[adapter_name].weight.copy_(comps)
            kept.append(name)
        if new_rank != config.r:
            rank_pattern[name] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    model.peft_config[adapter_name] = dataclasses.replace(
        config, target_modules=kept, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    model.set_adapter(model.active_adapters)  # new parameters follow the adapter's trainability
    if missing:
        warnings.warn(f"EVA initialises linear layers only; these keep A from init_lora_weights=True: {missing}.",
                      stacklevel=3)


# ---- CorDA --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: Any,
    run_model: Callable[[], None] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Compute CorDA's decomposition of every target linear layer of the (plain) base model, before
    ``get_peft_model(model, lora_config)`` with ``init_lora_weights="corda"`` uses it (HF peft's function).

    Args:
        run_model: Runs the model over calibration data (HF recommends batches of one sequence).
        hooked_model: Hook this model instead of ``model`` (same module names).

    Cache and covariance files (``corda_config``) are safetensors files, never pickles; HF peft's ``torch.save``
    files do not load here.

    Raises:
        PeftConfigError: no ``corda_config`` / ``init_lora_weights="corda"``, or neither files nor ``run_model``.
    """
    from safetensors.torch import load_file, save_file

    corda = lora_config.corda_config
    if corda is None or lora_config.init_lora_weights != "corda":
        raise PeftConfigError("preprocess_corda needs a LoraConfig with init_lora_weights='corda' (corda_config is "
                              "then filled with the defaults).")
    targets = _corda_targets(model, lora_config)
    if corda.cache_file and os.path.isfile(corda.cache_file) and os.path.getsize(corda.cache_file):
        cache = load_file(corda.cache_file)
        for name, module in targets.items():
            module.eigens = {k: cache[f"{name}.eigens.{k}"] for k in ("S_WC", "U_WC", "V_WC")}
        return
    covariances = _corda_covariances(model, lora_config, targets, run_model, hooked_model)
    if corda.covariance_file and not os.path.isfile(corda.covariance_file):
        os.makedirs(os.path.dirname(os.path.abspath(corda.covariance_file)), exist_ok=True)
        save_file({k: v.contiguous() for k, v in covariances.items()}, corda.covariance_file)
    for name, module in targets.items():
        r = lora_config.rank_and_alpha(name)[0]
        u, s, v = _corda_eigens(module, covariances[name])
        keep = slice(None, r) if corda.corda_method == "ipm" else slice(-r, None)
        if corda.verbose:
            print(f"CorDA {name}: kept singular values {s[keep].tolist()[:4]}...")
        module.eigens = {"S_WC": s[keep].clone(), "U_WC": u[:, keep].clone(), "V_WC": v[:, keep].clone()}
    if corda.cache_file:
        os.makedirs(os.path.dirname(os.path.abspath(corda.cache_file)), exist_ok=True)
        save_file({f"{n}.eigens.{k}": t.contiguous() for n, m in targets.items() for k, t in m.eigens.items()},
                  corda.cache_file)


def _corda_targets(model: nn.Module, config: Any) -> dict[str, nn.Module]:
    from peftkit.methods.lora import LoraMethod

    targets = config.target_modules or LoraMethod.default_target_modules(model)
    names = match_targets(model, targets, config.exclude_modules, config.layers_to_transform, config.layers_pattern)
    modules = {n: model.get_submodule(n) for n in names}
    return {n: m for n, m in modules.items()
            if isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))}


def _corda_covariances(model: nn.Module, config: Any, targets: dict[str, nn.Module], run_model: Callable | None,
                       hooked_model: nn.Module | None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    corda = config.corda_config
    if corda.covariance_file and os.path.isfile(corda.covariance_file) and os.path.getsize(corda.covariance_file):
        return load_file(corda.covariance_file)
    if run_model is None:
        raise PeftConfigError("preprocess_corda needs run_model (a function running the model over calibration "
                              "data) unless corda_config.cache_file or covariance_file exists already.")
    hooked = hooked_model if hooked_model is not None else model
    sums: dict[str, list] = {n: [0, 0] for n in targets}

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x  # HF squeezes a batch of one: same rows
            x = x.half() if corda.use_float16_for_covariance else x.float()
            x = x / torch.max(x).abs()  # HF's scaling (the maximum, not the maximum magnitude)
            if not torch.isfinite(x).all():
                raise ValueError(f"CorDA: non-finite input at {name}; check the calibration data.")
            sums[name][0] += 1
            sums[name][1] = sums[name][1] + x.t() @ x
        return hook

    handles = [hooked.get_submodule(n).register_forward_hook(hook_for(n)) for n in targets]
    was_training = hooked.training
    try:
        hooked.eval()
        run_model()
    finally:
        for handle in handles:
            handle.remove()
        hooked.train(was_training)
    empty = [n for n, (count, _) in sums.items() if not count]
    if empty:
        raise ValueError(f"CorDA: run_model never reached {empty}; run the model over calibration data in it.")
    return {n: cov / count for n, (count, cov) in sums.items()}


def _corda_eigens(module: nn.Module, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = module.weight.detach().float()
    w = w.T if type(module).__name__ == "Conv1D" else w  # (out, in)
    cov = covariance.float()
    damp, eye = 0.01, torch.eye(cov.shape[0], device=cov.device)
    while True:  # HF's damping: double δ until (C + δI) inverts to within 0.05
        fixed = cov + eye * torch.mean(torch.diag(cov)) * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    return u, s, (vh @ inv).transpose(0, 1)
