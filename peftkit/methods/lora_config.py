"""LoRA's configuration: Hugging Face peft's ``LoraConfig`` fields, defaults and checks.

The layers and the method live in :mod:`peftkit.methods.lora`; the variants the fields switch on (DoRA, the
base-rewriting inits, expert parameters, trainable tokens) in their own modules.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, ClassVar

from peftkit.core.config import ANY_VALUE, TunerConfig, check_regex
from peftkit.core.errors import PeftConfigError
from peftkit.methods import lora_init
from peftkit.methods.dora import check_dora_config
from peftkit.methods.gating import check_gate, without_unset_gate

__all__ = ["LoraConfig", "INITS", "pattern_value"]


@dataclass(kw_only=True)
class LoraConfig(TunerConfig):
    """LoRA settings, with Hugging Face peft's names and defaults.

    Args:
        r: Rank of the update (default 8).
        lora_alpha: Scale numerator: the update is multiplied by ``lora_alpha / r`` (default 8).
        lora_dropout: Dropout on the adapter input (default 0.0).
        fan_in_fan_out: The base weight is stored ``(in, out)``, as in GPT-2's ``Conv1D`` (set automatically there).
        bias: ``"none"``, ``"all"`` (train every bias of the model) or ``"lora_only"`` (biases of wrapped layers).
            Trained biases are saved in the checkpoint and restored by ``unload()``.
        use_rslora: Scale by ``lora_alpha / sqrt(r)`` (rank-stabilised LoRA, arXiv:2312.03732).
        init_lora_weights: True (A Kaiming-uniform, B zero), ``"gaussian"`` (A ~ N(0, 1/r), B zero), or False
            (B random too, so the adapter changes the output at once; for tests). From the base weight, which
            becomes ``W − (α/r)·B₀A₀``: ``"pissa"``, ``"pissa_niter_N"``, ``"olora"``, ``"loftq"``, ``"corda"``;
            from data: ``"eva"`` (see :mod:`peftkit.methods.lora_init`, :mod:`peftkit.methods.lora_data_init`).
        loftq_config, eva_config, corda_config: Settings of those inits (``LoftQConfig``, ``EvaConfig``,
            ``CordaConfig``); ignored (with a warning) for other inits.
        rank_pattern: ``{module name or regex: r}`` overriding ``r`` for matching modules.
        alpha_pattern: ``{module name or regex: alpha}`` overriding ``lora_alpha``.
        gate: None (default), ``"mean"`` or ``"token"``: UniPELT's learned gate ``G(x) = σ(W_g x + b_g)`` (one per
            example, averaged over tokens, or one per token) replaces ``α/r``: ``h = W0 x + G(x)·B A x``. Linear and
            ``Conv1D`` layers only; a gated adapter cannot be merged. Left out of the saved config when None.
        use_dora: DoRA (arXiv:2402.09353): ``W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_c`` with a trained magnitude ``m``
            per output row; see :mod:`peftkit.methods.dora`.
        target_parameters: Parameters to adapt directly, e.g. the 3-D expert stacks of MoE models
            (``["gate_up_proj", "down_proj"]``): one low-rank update per expert (:mod:`peftkit.methods.lora_experts`).
        trainable_token_indices: Embedding rows to train besides LoRA: a list of token ids (input embedding) or
            ``{module name: ids}``; see :mod:`peftkit.methods.trainable_tokens`.

    Raises:
        PeftConfigError: a field is out of range; the message names it.
    """

    peft_type: ClassVar[str] = "LORA"
    # enable_lora / merge_weights are fields of peft < 0.3 (MergedLinear), unset in its LoRA configs.
    hf_unsupported_fields: ClassVar[dict[str, Any]] = {
        "enable_lora": None, "merge_weights": False,
        "lora_bias": False, "layer_replication": None, "megatron_config": None,
        "use_qalora": False, "qalora_group_size": ANY_VALUE, "alora_invocation_tokens": None, "arrow_config": None,
        "ensure_weight_tying": False, "kasa_config": None, "lora_ga_config": None, "monteclora_config": None,
        "use_bdlora": None, "velora_config": None, "runtime_config": None,
    }

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    gate: str | None = None
    loftq_config: lora_init.LoftQConfig | dict[str, Any] = field(default_factory=dict)
    eva_config: lora_init.EvaConfig | dict[str, Any] | None = None
    corda_config: lora_init.CordaConfig | dict[str, Any] | None = None
    use_dora: bool = False
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise PeftConfigError(f"LoraConfig.r must be a positive integer, got {self.r!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PeftConfigError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise PeftConfigError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        if self.init_lora_weights not in INITS and not lora_init.is_base_init(self.init_lora_weights):
            rewrites_base = isinstance(self.init_lora_weights, str) and self.init_lora_weights.startswith("lora_ga")
            why = (" It changes the base weights at init (the saved adapter only fits the changed base), which "
                   "peftkit does not implement yet." if rewrites_base else "")
            raise PeftConfigError(
                f"LoraConfig.init_lora_weights={self.init_lora_weights!r} is not supported.{why} Use one of "
                f"{[*INITS, 'pissa', 'pissa_niter_<N>', 'olora', 'loftq', 'corda']}."
            )
        lora_init.normalise_init_configs(self)  # loftq/eva/corda sub-configs
        if self.init_lora_weights == "orthogonal" and self.r % 2:
            raise PeftConfigError(f"init_lora_weights='orthogonal' needs an even rank r, got r={self.r}.")
        bad = {k: v for k, v in self.rank_pattern.items() if not isinstance(v, int) or v <= 0}
        if bad:
            raise PeftConfigError(f"LoraConfig.rank_pattern values must be positive integers, got {bad}.")
        for name in ("rank_pattern", "alpha_pattern"):  # keys are regular expressions (HF peft's matching rule)
            for key in getattr(self, name):
                check_regex(f"{type(self).__name__}.{name} key", key)
        check_gate(type(self).__name__, self.gate)
        check_dora_config(self)
        from peftkit.methods import lora_experts  # target_parameters, trainable_token_indices

        lora_experts.check_beyond_modules(self)

    def to_dict(self) -> dict[str, Any]:
        out = without_unset_gate(super().to_dict())
        for key in ("eva_config", "corda_config"):  # JSON objects, as HF peft writes them
            out[key] = asdict(out[key]) if is_dataclass(out[key]) else out[key]
        return out

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha for one module, after ``rank_pattern`` / ``alpha_pattern`` (HF's matching rule)."""
        return pattern_value(self.rank_pattern, module_name, self.r), pattern_value(
            self.alpha_pattern, module_name, self.lora_alpha
        )


# True: A Kaiming-uniform; "eva": the same until a data-driven init replaces A; "orthogonal": see _orthogonal_pair.
INITS = (True, False, "gaussian", "eva", "orthogonal")


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
