"""AdaLoRA: LoRA in SVD form whose rank budget is moved between layers while training.

Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", https://arxiv.org/abs/2303.10512.
Reference behaviour and checkpoint layout: Hugging Face peft ``tuners/adalora`` (keys ``<path>.lora_A`` = Q,
``<path>.lora_E`` = Λ, ``<path>.lora_B`` = P; the allocator's final mask in ``adapter_config.json::rank_pattern``)::

    x ──► W0 (frozen) ──────────────────────────────────────────────┐
    └──► dropout ─► Q (r×in) ─► ⊙ λ·mask (r) ─► P (out×r) ─► ·α/(r₀+1e-5) ─► + ─► h

``model.update_and_allocate(step)`` masks the lowest-scoring triplets (P[:, i], λ_i, Q[i, :]) so that the total
rank falls from ``init_r`` to ``target_r`` per matrix; ``auxiliary_loss`` keeps P and Q near orthogonal.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.errors import PeftConfigError, TargetModuleError
from peftkit.core.inject import adapter_layers
from peftkit.core.layer import AdapterLayer, base_layer_of
from peftkit.core.registry import PeftMethod, register
from peftkit.integrations.default_targets import ADALORA_TARGETS, LORA_TARGETS, default_targets
from peftkit.methods.lora import LoraConfig

__all__ = ["AdaLoraConfig", "AdaLoraLinear", "RankAllocator", "AdaLoraMethod"]

# HF peft's AdaLoRA defaults (every attention and MLP projection where it lists them), else LoRA's, else the
# attention's query/value projections found in the module tree.
DEFAULT_TARGETS = ADALORA_TARGETS
_TRIPLET = ("lora_A", "lora_E", "lora_B")
_HALF = (torch.float16, torch.bfloat16)


@dataclass(kw_only=True)
class AdaLoraConfig(LoraConfig):
    """AdaLoRA settings, with Hugging Face peft's names and defaults (plus every ``LoraConfig`` field).

    The budget (total rank over all wrapped matrices) is ``b0 = Σ init ranks`` up to step ``tinit``, then
    ``b(t) = b_T + (b0 − b_T)·(1 − (t − tinit)/(total_step − tfinal − tinit))³`` (truncated to an integer), and
    ``b_T = target_r × matrices`` from ``total_step − tfinal`` on, when the mask is frozen.

    Args:
        init_r: Rank every wrapped matrix starts with (default 12); ``r`` is not used.
        target_r: Average rank left after pruning (default 8).
        tinit: Warm-up steps before pruning starts (default 0).
        tfinal: Steps at the end trained with the final, fixed mask (default 0).
        deltaT: Prune every ``deltaT`` steps during the budget phase (default 1).
        beta1, beta2: EMA coefficients of the sensitivity ``Ī`` and the uncertainty ``Ū`` (default 0.85 each).
        orth_reg_weight: γ of the orthogonality penalty added to the training loss (default 0.5).
        total_step: Number of training steps; required, and larger than ``tinit + tfinal``.
        rank_pattern: Written by the allocator: ``{"<module path>.lora_E": [kept?] * init_r}``. A config that
            holds one (a saved checkpoint) builds each layer with only the kept triplets.
        lora_alpha: The update is scaled by ``lora_alpha / (init_r + 1e-5)``, before and after pruning.

    Raises:
        PeftConfigError: a field is out of range; the message names it and the fix.
    """

    peft_type: ClassVar[str] = "ADALORA"

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        # LoraConfig checks rank_pattern as {name: rank}; AdaLoRA's holds the allocator's masks, checked below.
        pattern, self.rank_pattern = self.rank_pattern, {}
        super().__post_init__()
        self.rank_pattern = pattern
        n, t = type(self).__name__, self.total_step
        checks = [
            (all(isinstance(v, int) and v > 0 for v in (self.init_r, self.target_r, self.deltaT)),
             f"{n}.init_r, target_r and deltaT must be positive integers, got {self.init_r}, {self.target_r}, "
             f"{self.deltaT}."),
            (self.target_r <= self.init_r, f"{n}.target_r={self.target_r} exceeds init_r={self.init_r}; AdaLoRA only "
             "prunes ranks, so set target_r <= init_r."),
            (min(self.tinit, self.tfinal) >= 0, f"{n}.tinit and tfinal must be >= 0."),
            (isinstance(t, int) and t > self.tinit + self.tfinal, f"{n}.total_step={t!r}: set it to the number of "
             f"training steps, larger than tinit + tfinal = {self.tinit + self.tfinal}, so that ranks get pruned."),
            (0 < self.beta1 < 1 and 0 < self.beta2 < 1, f"{n}.beta1 and beta2 must be in (0, 1)."),
            (self.orth_reg_weight >= 0, f"{n}.orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}."),
            (self.bias == "none", f"{n}.bias={self.bias!r}: peftkit's AdaLoRA trains no biases; use 'none'."),
            (self.gate is None, f"{n}.gate={self.gate!r}: gates are LoRA's (UniPELT); AdaLoRA has none, use None."),
            (self.rank_pattern is None or isinstance(self.rank_pattern, dict) and all(
                isinstance(v, list) and all(isinstance(b, bool) for b in v) for v in self.rank_pattern.values()),
             f"{n}.rank_pattern must be None or map '<module>.lora_E' to the booleans update_and_allocate writes."),
        ]
        for ok, message in checks:
            if not ok:
                raise PeftConfigError(message)
        ignored = [f for f, off in (("r", 8), ("use_rslora", False), ("alpha_pattern", {})) if getattr(self, f) != off]
        if ignored:  # HF peft accepts and ignores them too, so its checkpoints may carry them
            warnings.warn(f"{n} ignores {ignored}; the starting rank is init_r and the scale lora_alpha/init_r.",
                          stacklevel=3)


def _module_of(pattern_key: str) -> str:
    """``"a.b.lora_E"`` or HF's in-training spelling ``"a.b.lora_E.<adapter>"`` → ``"a.b"``."""
    return pattern_key.rsplit(".lora_E", 1)[0]


class AdaLoraLinear(AdapterLayer):
    """AdaLoRA on ``nn.Linear`` or transformers ``Conv1D``: ``h = W0 x + P (λ ⊙ m ⊙ Q dropout(x)) · α/(r₀ + 1e-5)``.

    ``m`` is the allocator's mask and ``r₀ = init_r`` (HF peft's ``ranknum``), also after pruning. The layer also
    keeps, per adapter, the mask and the allocator's EMAs, so they follow ``add``/``delete_adapter``.

    Args:
        base_layer: The frozen layer; ``Conv1D`` stores ``W0`` as ``(in, out)``.
        adapter_name: Name of the first adapter.
        config: Its ``AdaLoraConfig``; a ``rank_pattern`` entry for ``module_name`` gives the pruned size.
        module_name: Full module name.

    Shapes: ``x (..., in)`` → ``h (..., out)``; ``Q (r, in)``, ``λ (r, 1)``, ``P (out, r)``.
    """

    adapter_param_names = _TRIPLET
    adapter_attr_names = ("lora_dropout", "r", "lora_alpha", "scaling", "ranknum", "rank_mask", "pattern_base",
                          "ipt_state")
    method_name = "AdaLoRA"
    weight_effect = "add"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdaLoraConfig, module_name: str) -> None:
        super().__init__(base_layer)
        base = base_layer_of(base_layer)
        self.fan_in_fan_out = not isinstance(base, nn.Linear)
        self.in_features, self.out_features = (
            tuple(base.weight.shape) if self.fan_in_fan_out else (base.in_features, base.out_features)
        )
        self.lora_A, self.lora_E, self.lora_B = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.ranknum: dict[str, float] = {}
        self.rank_mask: dict[str, torch.Tensor | None] = {}  # (r,) bool, None when every triplet is kept
        self.pattern_base: dict[str, list[bool] | None] = {}  # the rank_pattern this layer was built from
        self.ipt_state: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # tensor → (Ī, Ū)
        self.update_layer(adapter_name, config, module_name)

    def update_layer(self, adapter_name: str, config: AdaLoraConfig, module_name: str) -> None:
        pattern = next((v for k, v in (config.rank_pattern or {}).items() if _module_of(k) == module_name), None)
        if pattern is not None and len(pattern) != config.init_r:
            raise PeftConfigError(f"rank_pattern of {module_name} has {len(pattern)} entries but init_r is "
                                  f"{config.init_r}; the config does not belong to this checkpoint.")
        r = sum(pattern) if pattern is not None else config.init_r
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha if config.lora_alpha > 0 else float(r)
        # HF divides by ranknum = init_r (+1e-5) also in layers loaded pruned: pruning never rescales the rest.
        self.ranknum[adapter_name] = float(config.init_r)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        weight = self.get_base_layer().weight  # half-precision bases keep fp32 adapters: bf16 swallows lr·grad
        kw = {"device": weight.device, "dtype": torch.float32 if weight.dtype in _HALF else weight.dtype}
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features, **kw))  # Q (r, in)
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1, **kw))  # λ (r, 1)
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r, **kw))  # P (out, r)
        self.rank_mask[adapter_name], self.pattern_base[adapter_name], self.ipt_state[adapter_name] = None, pattern, {}
        self.reset_adapter_parameters(adapter_name, config.init_lora_weights)

    def reset_adapter_parameters(self, adapter_name: str, init: bool | str) -> None:
        """λ = 0 so ΔW = 0 at step 0, P and Q ~ N(0, 0.02²) (paper Sec. 3.1, HF peft). ``init=False`` keeps the
        standard-normal P, λ, Q of HF peft, which change the outputs at once (for tests)."""
        if init is False:
            return
        nn.init.zeros_(self.lora_E[adapter_name])
        nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)

    # ---- masks -------------------------------------------------------------------------------------------
    def kept(self, adapter_name: str) -> torch.Tensor:
        """(r,) bool: the triplets the allocator keeps (on λ's device)."""
        mask, lam = self.rank_mask[adapter_name], self.lora_E[adapter_name]
        return torch.ones(lam.shape[0], dtype=torch.bool, device=lam.device) if mask is None else mask

    def apply_mask(self, adapter_name: str, keep: torch.Tensor) -> None:
        """Keep only the triplets where ``keep`` (r,) is True. λ of the others is zeroed (HF peft's masking) and
        ``forward`` multiplies by the mask too, so an optimizer step taken after masking cannot revive them."""
        lam = self.lora_E[adapter_name]
        keep = keep.detach().to(lam.device, torch.bool)  # on λ's device: forward uses it every call
        self.rank_mask[adapter_name] = None if bool(keep.all()) else keep
        with torch.no_grad():
            lam.masked_fill_(~keep.view(-1, 1), 0.0)

    def hf_rank_pattern(self, adapter_name: str) -> list[bool]:
        """The kept triplets relative to the ``init_r`` this layer started from: HF peft's ``rank_pattern`` entry."""
        kept, base = self.kept(adapter_name).tolist(), self.pattern_base[adapter_name]
        if base is None:
            return kept
        it = iter(kept)  # a layer loaded pruned holds the True entries of its pattern only
        return [next(it) if b else False for b in base]

    def _lambda(self, adapter_name: str) -> torch.Tensor:
        lam, mask = self.lora_E[adapter_name], self.rank_mask[adapter_name]
        return lam if mask is None else lam * mask.to(lam.device).view(-1, 1)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Live parameters, or, once triplets are pruned, copies holding the kept ones only (HF peft's
        ``resize_state_dict_by_rank_pattern``; the config's ``rank_pattern`` says which were kept)."""
        tensors, mask = super().adapter_tensors(adapter_name), self.rank_mask.get(adapter_name)
        if mask is None:
            return tensors
        q, lam, p = (tensors[k] for k in _TRIPLET)
        keep = mask.to(q.device)
        return {"lora_A": q[keep], "lora_E": lam[keep], "lora_B": p[:, keep]}

    # ---- forward -----------------------------------------------------------------------------------------
    def _delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        q, p = self.lora_A[adapter_name], self.lora_B[adapter_name]
        x = self.lora_dropout[adapter_name](x.to(q.dtype))
        # HF peft's association order, so fp32 outputs of the two libraries agree to rounding.
        return (x @ (q * self._lambda(adapter_name)).T @ p.T) * self.scaling[adapter_name] / (
            self.ranknum[adapter_name] + 1e-5)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(x, result)
        if self._skip_adapters():
            return result
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = result + self._delta(name, x).to(result.dtype)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        for name, rows in self.rows_per_adapter(x.shape[0]).items():
            if name in self.r:
                rows = rows.to(x.device)
                result = result.index_add(0, rows, self._delta(name, x[rows]).to(result.dtype))
        return result

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight = self.get_base_layer().weight
        dtype = torch.float32 if weight.dtype in _HALF else weight.dtype  # CPU half matmul: slow and imprecise
        q, p = self.lora_A[adapter_name].to(dtype), self.lora_B[adapter_name].to(dtype)
        scale = self.scaling[adapter_name] / (self.ranknum[adapter_name] + 1e-5)
        delta = p @ (q * self._lambda(adapter_name).to(dtype)) * scale  # (out, in)
        # Left in fp32 for a half-precision weight: AdapterLayer.merge adds it in fp32 and rounds once.
        return delta.T if self.fan_in_fan_out else delta


class RankAllocator:
    """Importance scores, the budget schedule and the masking of one AdaLoRA adapter (paper Sec. 3.2–3.3).

    Per entry ``w`` of P, λ, Q: ``I = |w · ∂L/∂w|``, ``Ī ← β1 Ī + (1−β1) I``, ``Ū ← β2 Ū + (1−β2) |I − Ī|``,
    ``s = Ī · Ū``. Triplet score ``S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``. The ``b0 − b(t)`` lowest
    triplets over all layers are masked (see ``AdaLoraConfig`` for ``b(t)``). The allocator holds no state:
    EMAs and masks live on the layers, so it is built afresh for each call.

    Args:
        peft_model: The ``PeftModel``.
        adapter_name: An AdaLoRA adapter of it.
    """

    def __init__(self, peft_model: nn.Module, adapter_name: str) -> None:
        self.name = adapter_name
        self.config: AdaLoraConfig = peft_model.peft_config[adapter_name]
        self.layers = [(path, layer) for path, layer in adapter_layers(peft_model.base_model.model)
                       if isinstance(layer, AdaLoraLinear) and adapter_name in layer.lora_A]
        self.init_bgt = sum(layer.r[adapter_name] for _, layer in self.layers)
        self.target_bgt = self.config.target_r * len(self.layers)

    def budget(self, step: int) -> tuple[int, bool]:
        """``(b(step), whether to mask at this step)``, with HF peft's boundaries and integer truncation."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * progress**3 + self.target_bgt), step % c.deltaT == 0

    def update_ipt(self) -> None:
        """Fold this step's sensitivities ``|w · grad|`` into the EMAs ``Ī``, ``Ū`` of every entry."""
        b1, b2 = self.config.beta1, self.config.beta2
        params = [(layer, attr, getattr(layer, attr)[self.name]) for _, layer in self.layers for attr in _TRIPLET]
        if params and all(p.grad is None for _, _, p in params):
            raise RuntimeError(f"update_and_allocate found no gradients on adapter {self.name!r}: call it after "
                               "loss.backward() and optimizer.step(), before optimizer.zero_grad().")
        with torch.no_grad():
            for layer, attr, p in params:
                zero = torch.zeros_like(p)
                ipt = (p * p.grad).abs() if p.grad is not None else zero
                avg, unc = (t.to(p.device) for t in layer.ipt_state[self.name].get(attr, (zero, zero)))
                avg = b1 * avg + (1 - b1) * ipt
                layer.ipt_state[self.name][attr] = (avg, b2 * unc + (1 - b2) * (ipt - avg).abs())

    def triplet_scores(self, layer: AdaLoraLinear) -> torch.Tensor:
        """(r,) ``S_i`` of one layer (zeros before the first ``update_ipt``)."""
        state = layer.ipt_state[self.name]
        s = {a: (state[a][0] * state[a][1]) if a in state else torch.zeros_like(getattr(layer, a)[self.name])
             for a in _TRIPLET}
        return (s["lora_E"].view(-1) + (s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0))).float().cpu()

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Mask the ``b0 − budget`` lowest-scoring triplets over all layers; return HF's ``rank_pattern``."""
        scores = [self.triplet_scores(layer) for _, layer in self.layers]
        keep = torch.ones(self.init_bgt, dtype=torch.bool)
        n_masked = self.init_bgt - budget
        if n_masked > 0:
            # HF masks every score <= the k-th smallest, which masks all ties too (all of them when scores are
            # still zero); a stable sort masks exactly k, so the total rank always equals the budget.
            keep[torch.argsort(torch.cat(scores), stable=True)[:n_masked]] = False
        pattern = {}
        for (path, layer), part in zip(self.layers, keep.split([len(s) for s in scores])):
            layer.apply_mask(self.name, part)
            pattern[f"{path}.lora_E"] = layer.hf_rank_pattern(self.name)
        return pattern

    def update_and_allocate(self, global_step: int) -> None:
        """One allocator step, in HF peft's phases: scores until ``total_step − tfinal``, masking every
        ``deltaT`` steps after ``tinit``, the final mask at ``total_step − tfinal`` and kept fixed after it."""
        c = self.config
        final = c.total_step - c.tfinal
        if global_step < final:
            self.update_ipt()
        budget, mask_now = self.budget(global_step)  # budget(final) is the target: tinit < final
        if global_step == final or (global_step < final and mask_now):
            c.rank_pattern = self.mask_to_budget(budget)
        for _, layer in self.layers:
            if global_step == final:
                layer.ipt_state[self.name] = {}
            elif layer.rank_mask[self.name] is not None:  # optimizer momentum moves a masked λ off zero again
                layer.apply_mask(self.name, layer.rank_mask[self.name])


def _adalora_adapters(peft_model: nn.Module, adapter_name: str | None, trainable: bool) -> list[str]:
    configs = peft_model.peft_config
    names = [adapter_name] if adapter_name is not None else [
        n for n in peft_model.active_adapters if not (trainable and configs[n].inference_mode)]
    names = [n for n in names if isinstance(configs.get(n), AdaLoraConfig)]
    if not names:
        raise ValueError(f"No {'trainable ' if trainable else ''}AdaLoRA adapter {adapter_name or 'is active'}: call "
                         "set_adapter(name), load it with is_trainable=True, or pass adapter_name.")
    return names


@register(AdaLoraConfig)
class AdaLoraMethod(PeftMethod):
    """Wraps linear and ``Conv1D`` layers with AdaLoRA layers; offers ``update_and_allocate`` and
    ``current_ranks`` on the ``PeftModel`` and the orthogonality penalty as its auxiliary loss."""

    layer_class = AdaLoraLinear
    model_api = ("update_and_allocate", "current_ranks")

    @classmethod
    def default_target_modules(cls, model: nn.Module) -> list[str] | str | None:
        return default_targets(model, ADALORA_TARGETS, LORA_TARGETS)

    @classmethod
    def layer_for(cls, target: nn.Module, config: AdaLoraConfig, adapter_name: str, module_name: str) -> AdapterLayer:
        base = base_layer_of(target)
        if isinstance(base, nn.Linear) or (type(base).__name__ == "Conv1D" and hasattr(base, "nf")):
            return AdaLoraLinear(target, adapter_name, config, module_name)
        raise TargetModuleError(f"AdaLoRA cannot wrap {module_name} ({type(base).__name__}); supported: nn.Linear, "
                                "transformers Conv1D. Remove it from target_modules.")

    @classmethod
    def update_and_allocate(cls, peft_model: nn.Module, global_step: int, adapter_name: str | None = None) -> None:
        """Update importance scores and prune to the budget of ``global_step`` (HF peft's API). Call it every step
        after ``optimizer.step()``, before ``optimizer.zero_grad()`` (it reads gradients), for the active trainable
        AdaLoRA adapters or ``adapter_name``. The kept triplets go to ``peft_config[name].rank_pattern``."""
        for name in _adalora_adapters(peft_model, adapter_name, trainable=True):
            RankAllocator(peft_model, name).update_and_allocate(global_step)

    @classmethod
    def current_ranks(cls, peft_model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
        """``{module path: number of unmasked triplets}`` of one AdaLoRA adapter (default: the active one)."""
        name = _adalora_adapters(peft_model, adapter_name, trainable=False)[0]
        return {path: int(layer.kept(name).sum()) for path, layer in RankAllocator(peft_model, name).layers}

    @classmethod
    def auxiliary_loss(cls, peft_model: nn.Module, adapter_name: str) -> torch.Tensor | None:
        """``γ · mean over P and Q matrices of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F`` (HF peft's formula: Frobenius norms,
        not squared, averaged over the 2·layers matrices); None for frozen adapters or γ = 0."""
        config = peft_model.member_config(adapter_name, cls)
        if config.inference_mode or config.orth_reg_weight == 0:
            return None
        terms = []
        for _, layer in RankAllocator(peft_model, adapter_name).layers:
            q, p = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            for cov in (q @ q.T, p.T @ p):  # (r, r) each
                eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
                terms.append(torch.norm(cov - eye, p="fro"))
        return config.orth_reg_weight * sum(t.to(terms[0].device) for t in terms) / len(terms) if terms else None
