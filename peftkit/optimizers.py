"""LoRA+: a larger learning rate for the B factors than for the A factors.

Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", https://arxiv.org/abs/2402.12354
(reference code https://github.com/nikhil-ghosh-berkeley/loraplus). With one learning rate for both factors, B
(which starts at zero) learns too slowly in wide models; LoRA+ sets ``η_B = λ·η_A`` with ``λ = loraplus_lr_ratio``
(the paper suggests ``λ ≈ 16``). Same signature and parameter groups as Hugging Face peft's
``peft.optimizers.create_loraplus_optimizer``; pass the result to ``Trainer(optimizers=(optimizer, None))``.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from peftkit.methods.lora import LoraEmbedding, LoraLayer

__all__ = ["create_loraplus_optimizer"]

_EIGHT_BIT = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float, loraplus_lr_ratio: float, **kwargs: Any
) -> Optimizer:
    """An ``optimizer_cls`` over the trainable parameters of ``model`` in LoRA+'s four groups (HF peft's):

    ============================================  =====================  ========================
    parameters                                    learning rate          weight decay
    ============================================  =====================  ========================
    A factors and other matrices (heads)          ``lr``                 ``loraplus_weight_decay``
    every factor of a LoRA embedding layer        ``loraplus_lr_embedding``  ``loraplus_weight_decay``
    B factors, and vectors (DoRA magnitudes)      ``lr · ratio``         ``loraplus_weight_decay``
    biases and layer-norm weights                 ``lr · ratio``         0
    ============================================  =====================  ========================

    Args:
        model: A ``PeftModel`` (or any module holding peftkit LoRA layers); frozen parameters are left out.
        optimizer_cls: E.g. ``torch.optim.AdamW``; bitsandbytes' 8-bit Adams keep embeddings in 32-bit state.
        lr: ``η_A``, the learning rate of the A factors.
        loraplus_lr_ratio: ``λ = η_B / η_A`` (≥ 1; the paper uses 2 to 16 and more for harder tasks).
        kwargs: ``loraplus_weight_decay`` (default 0.0), ``loraplus_lr_embedding`` (default 1e-6), and the rest for
            ``optimizer_cls`` (``betas``, ``eps``, ...).

    Raises:
        ValueError: ``model`` has no trainable parameters.
    """
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    # transformers' own rule for weight decay (the Trainer's): not in layer norms, not a bias.
    decay = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
    embedding, lora_b = set(), set()
    for module in model.modules():
        if isinstance(module, LoraEmbedding):
            embedding.update(id(p) for p in module.lora_embedding_A.values())
            embedding.update(id(p) for p in module.lora_embedding_B.values())
        elif isinstance(module, LoraLayer):
            lora_b.update(id(p) for p in module.lora_B.parameters())
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding:
            groups["embedding"].append(param)
        elif id(param) in lora_b or param.ndim == 1:
            groups["B" if name in decay else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    if not any(groups.values()):
        raise ValueError("create_loraplus_optimizer: the model has no trainable parameters; set an adapter active "
                         "and trainable (set_adapter, inference_mode=False) first.")
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    optimizer = optimizer_cls(
        [
            {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
            {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
            {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
            {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
        ],
        lr=lr,
        **kwargs,
    )
    if optimizer_cls.__name__ in _EIGHT_BIT:
        # 8-bit state for embedding rows is unstable (bitsandbytes' advice); HF peft registers the same override.
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
