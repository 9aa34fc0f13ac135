"""LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization", https://arxiv.org/abs/2310.08659).

QLoRA starts from the quantised ``Q = q(W)`` and ``B = 0``, so training first has to undo the quantisation error.
LoftQ starts the adapter on that error instead (Algorithm 1)::

    for t in 1..T:  Q_t = q(W − L R)          (q: bitsandbytes NF4, block 64, or int8 row-wise absmax)
                    L, R = SVD_r(W − Q_t)     (L = U_r √S_r, R = √S_r V_rᵀ)
    base ← dequant(Q_T),  s·B A = L R        (s = α/r)

``init_lora_weights="loftq"`` runs it at layer creation on a float model (the base weight becomes the dequantised
``Q``, to be saved and quantised again); :func:`replace_lora_weights_loftq` runs one step on a model quantised
already, reading the float weights from its safetensors files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["loftq_factors", "replace_lora_weights_loftq"]


def _quantise_roundtrip(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequant(quant(w))`` with bitsandbytes' NF4 (block 64, as HF's LoftQ) or int8 row-wise absmax, in fp32."""
    from peftkit.integrations.bitsandbytes import _bnb

    bnb = _bnb()
    if bits == 4:
        q = bnb.nn.Params4bit(w.cpu(), requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        return bnb.functional.dequantize_4bit(q.data, q.quant_state).float().to(w.device)
    q = bnb.nn.Int8Params(w.cpu(), requires_grad=False).to("cpu")
    return bnb.functional.int8_vectorwise_dequant(q.data, q.SCB).float().to(w.device)


def _low_rank(res: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``L (out, r)``, ``R (r, in)`` with ``L R`` the best rank-r approximation of ``res``, √S on both sides."""
    u, s, vh = torch.linalg.svd(res, full_matrices=False)
    root = torch.sqrt(s[:r])
    return u[:, :r] * root, root.view(-1, 1) * vh[:r]


def loftq_factors(w: torch.Tensor, r: int, scale: float, bits: int, iters: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # LoftQ Algorithm 1: Q_t = q(W − L R), (L, R) = SVD_r(W − Q_t); HF's loop, which skips the last residual.
    res = w
    for i in range(iters):
        dequantised = _quantise_roundtrip(res, bits)
        big_l, big_r = _low_rank(w - dequantised, r)
        if i + 1 == iters:
            break
        res = w - big_l @ big_r
    # s·B A = L R. HF peft sets A = R, B = L whatever the scale, which matches only for lora_alpha == r.
    root = math.sqrt(scale)
    return dequantised, big_r / root, big_l / root


# ---- LoftQ on an already quantised base ---------------------------------------------------------------------------
@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: nn.Module,
    model_path: str | os.PathLike | None = None,
    adapter_name: str = "default",
    callback: Callable[[nn.Module, str], bool] | None = None,
) -> None:
    """Set the LoRA A/B of every 4-bit layer to the rank-r SVD of its quantisation error ``W − dequant(Q)`` (LoftQ
    with one iteration, on a model quantised already; HF peft's function of the same name).

    Args:
        peft_model: A ``PeftModel`` over a bitsandbytes 4-bit base.
        model_path: The unquantised weights: a ``model.safetensors`` file, a directory holding it, or a directory
            with a sharded ``model.safetensors.index.json``. None: the base model's ``name_or_path`` directory.
        adapter_name: The adapter to initialise.
        callback: ``callback(peft_model, module_name) -> bool`` called after each layer; False rolls that layer back
            (e.g. keep a layer only if the logits moved closer to the float model's).

    Raises:
        ValueError: no 4-bit LoRA layer, or no safetensors file with the weights; nothing is changed.
    """
    from peftkit.integrations.bitsandbytes import LoraLinear4bit, dequantize_weight

    layers = [(n, m) for n, m in peft_model._layers() if isinstance(m, LoraLinear4bit) and adapter_name in m.lora_A]
    if not layers:
        raise ValueError(f"replace_lora_weights_loftq: no bitsandbytes 4-bit LoRA layer holds adapter "
                         f"{adapter_name!r}; quantise the base (load_in_4bit) before get_peft_model.")
    reader = _SafetensorsWeights(peft_model, model_path)
    names = {n: reader.key_for(n + ".weight") for n, _ in layers}  # every key is found before anything changes
    for name, layer in layers:
        w = reader.get(names[name]).float().to(layer.get_base_layer().weight.device)
        dequantised = dequantize_weight(layer.get_base_layer())
        big_l, big_r = _low_rank(w - dequantised, layer.r[adapter_name])
        root = math.sqrt(layer.scaling[adapter_name])
        lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        before = (lora_a.detach().clone(), lora_b.detach().clone())
        lora_a.copy_(big_r / root)
        lora_b.copy_(big_l / root)
        if callback is not None and not callback(peft_model, name):
            lora_a.copy_(before[0])
            lora_b.copy_(before[1])


class _SafetensorsWeights:
    """Reads single tensors lazily from a (possibly sharded) safetensors checkpoint of the base model."""

    def __init__(self, peft_model: nn.Module, model_path: str | os.PathLike | None) -> None:
        import json

        model = peft_model.get_base_model()
        path = os.fspath(model_path) if model_path is not None else getattr(model, "name_or_path", "") or ""
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            single = os.path.join(path, "model.safetensors")
            if os.path.isfile(single):
                self.files = {None: single}
            elif os.path.isfile(index):
                with open(index, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
                self.files = {k: os.path.join(path, v) for k, v in weight_map.items()}
            else:
                path = ""
        elif os.path.isfile(path):
            self.files = {None: path}
        else:
            path = ""
        if not path:
            raise ValueError(f"replace_lora_weights_loftq needs the unquantised weights as safetensors; "
                             f"{model_path or 'the base model name'!r} is no model.safetensors file or directory. "
                             "Pass model_path= (e.g. the directory save_pretrained wrote for the float model).")
        from safetensors import safe_open

        self._open = safe_open
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.keys = {}
        for file in set(self.files.values()):
            with safe_open(file, framework="pt") as fh:
                self.keys.update(dict.fromkeys(fh.keys(), file))

    def key_for(self, name: str) -> str:
        # The float checkpoint may name weights without the model's prefix (a bare base model's save).
        stripped = name[len(self.prefix) + 1:] if self.prefix and name.startswith(self.prefix + ".") else name
        for key in (name, stripped):
            if key in self.keys:
                return key
        raise ValueError(f"replace_lora_weights_loftq: {name} is not in the safetensors weights "
                         f"({len(self.keys)} tensors); pass the checkpoint of this model's float weights.")

    def get(self, key: str) -> torch.Tensor:
        with self._open(self.keys[key], framework="pt") as fh:
            return fh.get_tensor(key)
