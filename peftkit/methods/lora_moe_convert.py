"""Loading LoRA adapters written for transformers 4's MoE layout into transformers 5's fused expert parameters.

transformers 5 fused each expert's ``nn.Linear`` layers (Mixtral ``experts.<e>.w1/w2/w3``, Qwen2-MoE
``experts.<e>.gate_proj/up_proj/down_proj``) into 3-D parameters (``gate_up_proj``, ``down_proj``). HF peft converts
old adapters on load; so does peftkit: the config (:func:`convert_moe_config`, run when an adapter is added) and the
tensors (:func:`convert_moe_checkpoint`, run before a checkpoint is checked and loaded), into the layout of
:class:`peftkit.methods.lora_experts.LoraParamWrapper`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.core.errors import CheckpointError, PeftConfigError
from peftkit.core.targets import candidate_modules, get_module, is_linear_like
from peftkit.methods.lora_experts import LoraParamWrapper

if TYPE_CHECKING:
    from peftkit.methods.lora import LoraConfig

__all__ = ["convert_moe_config", "convert_moe_checkpoint"]

# transformers 5 fused each expert's nn.Linear layers into 3-D parameters. Per family: the v4 module name -> the v5
# parameter it became, and which v4 names were concatenated into one (in concatenation order). HF peft's table
# (peft/utils/transformers_weight_conversion.py), for the families transformers converts the same way.
_MOE_RENAMES = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
_MOE_FUSED = {"mixtral": {"gate_up_proj": ["w1", "w3"]}, "qwen2_moe": {"gate_up_proj": ["gate_proj", "up_proj"]}}
_MOE_FAMILY = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen2_moe", "olmoe": "qwen2_moe"}
# transformers 4 Mixtral called the MoE block ``block_sparse_moe``; 5 calls it ``mlp``.
_BLOCK_RENAMES = {"mixtral": (".block_sparse_moe.", ".mlp.")}


def _family(model: nn.Module) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return _MOE_FAMILY.get(model_type)


def convert_moe_config(model: nn.Module, config: LoraConfig) -> dict[str, Any]:
    """The config changes that retarget a LoRA written for transformers 4's per-expert ``nn.Linear`` layers of a MoE
    model (``target_modules=["w1", "w2", "w3"]``) to transformers 5's fused parameters, as HF peft applies them:
    expert names move to ``target_parameters`` and fused pairs get rank and alpha doubled (``rank_pattern`` /
    ``alpha_pattern``), which keeps ``α/r`` and makes the fused update exactly the two old ones side by side.

    Returns ``{}`` when there is nothing to convert. Unlike HF peft, an old name that still matches a linear layer of
    the model (Qwen2-MoE's ``shared_expert.gate_proj``) stays in ``target_modules`` too, so the checkpoint's tensors
    for it load instead of being dropped.

    Raises:
        PeftConfigError: only one half of a fused pair is targeted (the fused parameter cannot take half an update).
    """
    family = _family(model)
    if family is None or not isinstance(config.target_modules, list):
        return {}
    renames, fused = _MOE_RENAMES[family], _MOE_FUSED[family]
    linear_names = [n for n, m in candidate_modules(model) if is_linear_like(m)]
    new_params = set(config.target_parameters or [])
    kept, hits = [], {}
    for target in config.target_modules:
        old = next((o for o in renames if target == o or target.endswith("." + o)), None)
        if old is None:
            kept.append(target)
            continue
        new_params.add(renames[old])
        hits.setdefault(renames[old], set()).add(old)
        if any(n == target or n.endswith("." + target) for n in linear_names):
            kept.append(target)
    if not hits:
        return {}
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    for new, olds in fused.items():
        present = hits.get(new, set())
        if 0 < len(present) < len(olds):
            raise PeftConfigError(
                f"target_modules {sorted(present)} were fused with {sorted(set(olds) - present)} into {new} in "
                f"transformers 5; a LoRA on only one of them cannot be converted. Target all of {olds}."
            )
        if present:
            rank_pattern[rf".*\.{new}"] = config.r * len(olds)
            alpha_pattern[rf".*\.{new}"] = config.lora_alpha * len(olds)
    return {"target_modules": kept, "target_parameters": sorted(new_params), "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern}


_OLD_EXPERT_KEY = re.compile(r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.(?P<ab>lora_[AB])"
                             r"\.weight$")


def convert_moe_checkpoint(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rekey and reshape a transformers-4 MoE LoRA checkpoint (``...experts.<e>.w1.lora_A.weight`` per expert) into
    the fused layout of the model's :class:`LoraParamWrapper` layers; other keys pass through (renamed where the
    block was renamed). Returns ``weights`` unchanged when it holds no per-expert key.

    Per fused pair (w1, w3) of expert ``e``: ``A_e = [A1_e; A3_e]`` (rank 2r) and ``B_e = blockdiag(B1_e, B3_e)``,
    so ``B_e A_e = [B1_e A1_e; B3_e A3_e]``, the two old updates stacked as the parameter stacks the weights.

    Raises:
        CheckpointError: an expert's tensors are missing, or the model has no wrapped parameter for them.
    """
    family = _family(model)
    if family is None:
        return weights
    old, new = _BLOCK_RENAMES.get(family, ("", ""))
    renamed = {k.replace(old, new) if old else k: v for k, v in weights.items()}
    groups: dict[tuple[str, str, str], dict[int, torch.Tensor]] = {}
    out = {}
    for key, tensor in renamed.items():
        match = _OLD_EXPERT_KEY.match(key)
        if match is None or match["proj"] not in _MOE_RENAMES[family]:
            out[key] = tensor
            continue
        groups.setdefault((match["module"], match["proj"], match["ab"]), {})[int(match["expert"])] = tensor
    if not groups:
        return weights
    renames, fused = _MOE_RENAMES[family], _MOE_FUSED[family]
    layers, done = {}, set()
    for (module, proj, ab) in groups:
        param = renames[proj]
        if (module, param, ab) in done:  # the other half of a fused pair
            continue
        done.add((module, param, ab))
        olds = fused.get(param, [proj])
        parts = []
        for name in olds:
            per_expert = groups.get((module, name, ab), {})
            if not per_expert or sorted(per_expert) != list(range(len(per_expert))):
                raise CheckpointError(f"The transformers-4 MoE checkpoint lacks {ab} tensors of {module}.<e>.{name} "
                                      f"(found experts {sorted(per_expert)}); it cannot be converted.")
            parts.append(torch.stack([per_expert[e] for e in range(len(per_expert))]))  # (E, r, in) or (E, out, r)
        if ab == "lora_A":  # A_e = [A1_e; A3_e]: ranks side by side
            fused_t = torch.cat(parts, dim=1)
            tensor = fused_t.reshape(-1, fused_t.shape[-1])  # (E·r', in)
        else:  # B_e = blockdiag(B1_e, B3_e), then columns j·E + e
            fused_t = torch.stack([torch.block_diag(*[p[e] for p in parts]) for e in range(parts[0].shape[0])])
            tensor = fused_t.permute(1, 2, 0).reshape(fused_t.shape[1], -1)  # (out', r'·E)
        path = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
        if path not in layers:
            try:
                layers[path] = get_module(model, path)
            except AttributeError:
                layers[path] = None
        layer = layers[path]
        if not isinstance(layer, LoraParamWrapper) or param not in layer.parameter_names:
            raise CheckpointError(
                f"The checkpoint holds transformers-4 per-expert LoRA tensors for {module}.<e>.{proj}, but "
                f"{path}.{param} is not adapted in this model (check target_modules / target_parameters)."
            )
        out[f"{module}.{layer._key_prefix(param)}{ab}.weight"] = tensor
    return out
