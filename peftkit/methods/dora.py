"""DoRA: weight-decomposed low-rank adaptation, a variant of LoRA layers (``LoraConfig(use_dora=True)``).

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", https://arxiv.org/abs/2402.09353. Reference
behaviour and checkpoint layout: Hugging Face peft ``tuners/lora/dora.py`` and ``variants.py`` (one extra key per
wrapped module, ``<module>.lora_magnitude_vector``)::

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_c          ‖·‖_c: L2 norm of each output row, over the input dims
    h  = f ⊙ (W x + s·B A x) + b,   f = m / ‖W + s·B A‖_c  (the norm detached: paper Sec. 4.3)

The magnitude ``m`` starts at ``‖W + s·B A‖_c`` (so ``f = 1`` and the model is unchanged at step 0) and is
trained with A and B. Layers hold a :class:`DoraVariant` per DoRA adapter in ``lora_variant``; the layer code
calls its ``forward`` instead of adding ``s·B A x``, and merges go through :func:`merged_weight`.

Cost: the norm needs ``‖W + s·B A‖`` per output row. peftkit expands it as
``‖W_o‖² + 2s·Σ_k B[o,k] (W Aᵀ)[o,k] + s²·B_o (A Aᵀ) B_oᵀ``: ``‖W_o‖²`` is cached (W is frozen), so a training
step pays one ``W Aᵀ`` GEMM (``out × in × r``) and no ``out × in`` temporary, where HF peft builds ``B A`` and
``W + s·B A`` in full. In eval mode the norm itself is cached per adapter, keyed on the identity, version
counter and storage of W, A and B, the scale and the merge state of the layers below; a train()/eval() switch,
an optimizer step, a merge, a load or ``set_scale`` all change the key, so a stale norm is never read.
(Writes through ``tensor.data`` bypass version counters, as they bypass autograd's checks; merges and loads in
peftkit do not write that way into adapter tensors, and layer merges clear the cache.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.errors import PeftConfigError
from peftkit.core.layer import AdapterLayer

__all__ = ["DoraVariant", "attach_variant", "check_dora_config", "merge_factors", "merge_layer", "merged_weight",
           "unmerge_layer", "unmerged_weight", "weight_norm"]

_WSQ = ("wsq",)  # variant_cache key of ‖W_o‖² (per layer; adapter names are strings, so it cannot collide)


def check_dora_config(config: Any) -> None:
    """Refuse ``use_dora`` where it has no meaning (HF peft refuses the same combinations).

    Raises:
        PeftConfigError: naming the field and the fix.
    """
    if not getattr(config, "use_dora", False):
        return
    name = type(config).__name__
    if config.peft_type != "LORA":
        raise PeftConfigError(f"{name}.use_dora=True: DoRA is a variant of plain LoRA and {name} does not support "
                              "it (HF peft refuses it too). Use LoraConfig(use_dora=True), or use_dora=False.")
    if getattr(config, "gate", None) is not None:
        raise PeftConfigError(f"{name}: use_dora=True and gate={config.gate!r} cannot be combined (DoRA's magnitude "
                              "rescales W + s·BA, a gate replaces s per input). Drop one of them.")


def attach_variant(layer: AdapterLayer, adapter_name: str, config: Any) -> None:
    """Give ``adapter_name`` on ``layer`` its variant (DoRA when ``config.use_dora``); called by ``update_layer``
    once A, B and the scale exist."""
    layer.lora_variant.pop(adapter_name, None)
    layer.variant_cache.pop(adapter_name, None)
    if adapter_name in layer.lora_magnitude_vector:
        del layer.lora_magnitude_vector[adapter_name]
    if getattr(config, "use_dora", False):
        variant = DoraVariant(layer)
        variant.init(layer, adapter_name)
        layer.lora_variant[adapter_name] = variant
        # W' = f ⊙ (W + ΔW) rescales whatever sits below: it commutes with no other layer's merge (core/merging.py).
        layer.weight_effect = "scale"


# ---- the weight as DoRA sees it --------------------------------------------------------------------------------
def _rows(layer: AdapterLayer) -> torch.Tensor:
    """The base weight as ``(out, in·k…)`` rows, the layout the norm runs over (a view where possible)."""
    dense = getattr(layer, "dense_weight", None)  # quantised bases: the dequantised float weight (out, in)
    if dense is not None:
        return dense()
    base = layer.get_base_layer()
    weight = base.weight
    if isinstance(base, nn.Embedding) or getattr(layer, "fan_in_fan_out", False):
        return weight.T  # Embedding (num, dim) and GPT-2 Conv1D (in, out): the rows are columns
    return weight.flatten(1)


def _out_dim(layer: AdapterLayer) -> int:
    """The dim of the stored weight that indexes output rows (merges scale along it)."""
    if getattr(layer, "dense_weight", None) is not None:
        return 0
    base = layer.get_base_layer()
    return 1 if isinstance(base, nn.Embedding) or getattr(layer, "fan_in_fan_out", False) else 0


def _params(layer: AdapterLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameters holding A and B of one adapter, as stored."""
    if name in getattr(layer, "lora_embedding_A", {}):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _factors(layer: AdapterLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in·k…), B (out, r))`` of one adapter (convolution kernels flattened)."""
    a, b = _params(layer, name)
    return a.flatten(1), b.flatten(1)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _token(tensor: torch.Tensor) -> tuple | None:
    """What identifies a tensor's current contents: the object, its version counter (bumped by every in-place
    write, optimizer steps included) and its storage (``param.data = ...`` swaps it)."""
    try:
        return tensor, tensor._version, tensor.data_ptr()
    except RuntimeError:  # inference tensors keep no version counter: never cached
        return None


def _same(a: Any, b: Any) -> bool:
    """Key equality: tensors by identity (the key holds them, so their ids cannot be reused), the rest by value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _below(layer: AdapterLayer) -> tuple:
    """Merge state of the adapter layers this one wraps: their merges rewrite the weight below us."""
    out, module = [], layer.base_layer
    while isinstance(module, AdapterLayer):
        out.append((id(module), tuple(module.merged_adapters)))
        module = module.base_layer
    return tuple(out)


def _weight_key(layer: AdapterLayer) -> tuple | None:
    weight = layer.get_base_layer().weight
    token = _token(weight)
    state = getattr(weight, "quant_state", None)
    return None if token is None else (*token, id(state), _below(layer))


@torch.no_grad()
def _row_sq_norms(layer: AdapterLayer, rows: torch.Tensor) -> torch.Tensor:
    """``‖W_o‖²`` per output row, cached while W is unchanged (it is frozen in training)."""
    key, hit = _weight_key(layer), layer.variant_cache.get(_WSQ)
    if hit is not None and key is not None and _same(hit[0], key):
        return hit[1]
    dtype = _compute_dtype(rows)
    wsq = rows.to(dtype).square().sum(1)  # (out,)
    if key is not None:
        layer.variant_cache[_WSQ] = (key, wsq)
    return wsq


@torch.no_grad()
def weight_norm(layer: AdapterLayer, name: str) -> torch.Tensor:
    """``‖W + s·B A‖_c`` per output row, ``(out,)``, in fp32 (fp64 for fp64 weights), without autograd history.

    Expanded so that no ``out × in`` tensor is built: ``‖W_o‖² + 2s·⟨W_o, (B A)_o⟩ + s²·‖(B A)_o‖²`` with
    ``⟨W_o, (B A)_o⟩ = Σ_k B[o,k] (W Aᵀ)[o,k]`` and ``‖(B A)_o‖² = B_o (A Aᵀ) B_oᵀ``.
    """
    rows = _rows(layer)
    dtype = _compute_dtype(rows)
    a, b = (t.detach().to(dtype) for t in _factors(layer, name))  # (r, in), (out, r)
    s = float(layer.scaling[name])
    wa = rows.to(dtype) @ a.T  # (out, r): the one GEMM over W
    cross = (b * wa).sum(1)
    lora_sq = ((b @ (a @ a.T)) * b).sum(1)
    return (_row_sq_norms(layer, rows) + 2 * s * cross + s * s * lora_sq).clamp_min(0).sqrt()


def _cached_norm(layer: AdapterLayer, name: str) -> torch.Tensor:
    """The norm for ``forward``: recomputed in training mode (A and B move every step), cached in eval mode."""
    if layer.training:
        layer.variant_cache.pop(name, None)
        return weight_norm(layer, name)
    a, b = _params(layer, name)
    key = (_weight_key(layer), _token(a), _token(b), float(layer.scaling[name]))
    hit = layer.variant_cache.get(name)
    if hit is not None and _same(hit[0], key):
        return hit[1]
    norm = weight_norm(layer, name)
    if None not in key[:3]:
        layer.variant_cache[name] = (key, norm)
    return norm


# ---- the strategy ----------------------------------------------------------------------------------------------
class DoraVariant:
    """DoRA on one LoRA layer (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Embedding``, ``nn.Conv1d/2d``, bitsandbytes).

    ``h = f ⊙ (W x + s·B A x) + b`` with ``f = m / ‖W + s·B A‖_c`` per output row; with dropout in training
    ``h = W x + b + (f − 1) ⊙ W x_d + f ⊙ s·B A x_d``, ``x_d = dropout(x)`` (HF peft's formula). ``m`` is HF's
    ``lora_magnitude_vector``: shape ``(out,)`` (Linear, Conv1D, 4-bit), ``(dim,)`` (Embedding) or
    ``(1, out, 1[, 1])`` (Conv1d/2d).
    """

    def __init__(self, layer: AdapterLayer) -> None:
        base = layer.get_base_layer()
        self.kind = ("embedding" if isinstance(base, nn.Embedding)
                     else "conv" if isinstance(base, (nn.Conv1d, nn.Conv2d)) else "linear")

    def init(self, layer: AdapterLayer, name: str) -> None:
        """``m = ‖W + s·B A‖_c``, in the adapter's dtype (HF peft's init): the model is unchanged at step 0."""
        a = _factors(layer, name)[0]
        # The forward's own norm: f = m / norm is then exactly 1 until A, B or m move.
        norm = weight_norm(layer, name).to(device=a.device, dtype=a.dtype)
        if self.kind == "conv":
            norm = norm.view(1, -1, *([1] * (layer.get_base_layer().weight.dim() - 2)))
        layer.lora_magnitude_vector[name] = nn.Parameter(norm, requires_grad=a.requires_grad)

    def factor(self, layer: AdapterLayer, name: str) -> torch.Tensor:
        """``f = m / ‖W + s·B A‖_c`` in the magnitude's shape; gradients reach m only (the norm is detached)."""
        magnitude = layer.lora_magnitude_vector[name]
        return magnitude / _cached_norm(layer, name).to(magnitude.dtype).view(magnitude.shape)

    def forward(self, layer: AdapterLayer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (the base output plus the adapters applied before this one, as in HF peft) with this
        adapter applied; same shape and dtype."""
        f = self.factor(layer, name)
        scale = layer.scaling[name]
        if self.kind == "embedding":  # no bias, no dropout (HF peft's embedding DoRA)
            return (f * (result + layer._adapter_delta(name, x))).to(result.dtype)
        lora_a, lora_b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
        if layer.training and not isinstance(dropout, nn.Identity):
            # The dropped-out input also goes through W: (f − 1) ⊙ W x_d needs its own product.
            x = dropout(x.to(lora_a.weight.dtype))
            lora = (lora_b(lora_a(x)) * scale).reshape(result.shape)  # LoraLinear passes result as (tokens, out)
            return (result + (f - 1) * self._base_product(layer, x).reshape(result.shape) + f * lora).to(result.dtype)
        bias = getattr(layer.get_base_layer(), "bias", None)
        if self.kind == "conv":
            t = result + lora_b(lora_a(x.to(lora_a.weight.dtype))) * scale
        else:
            a, b = lora_a.weight, lora_b.weight
            hidden = F.linear(x.to(a.dtype), a).reshape(-1, a.shape[0])  # (tokens, r)
            # One GEMM adds s·B A x to the output (as LoraLinear), then one fused pass applies f and the bias.
            flat = result.reshape(-1, result.shape[-1])
            t = torch.addmm(flat, hidden.to(flat.dtype), b.T.to(flat.dtype), alpha=scale).view(result.shape)
        if bias is None:
            return (t * f).to(result.dtype)
        return torch.addcmul(bias.view(f.shape) * (1 - f), t, f).to(result.dtype)  # f ⊙ (t − b) + b

    def _base_product(self, layer: AdapterLayer, x: torch.Tensor) -> torch.Tensor:
        """``W x`` without the bias, for the dropout path."""
        base = layer.get_base_layer()
        if self.kind == "conv":
            conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
            return conv(x, base.weight.to(x.dtype), None, base.stride, base.padding, base.dilation, base.groups)
        return F.linear(x, _rows(layer).to(x.dtype))

    def merge(self, layer: AdapterLayer, name: str, weight: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """``f ⊙ (weight + s·B A)``: ``weight`` in the stored layout (float), ``f`` from :func:`merge_factors`."""
        f = f.to(weight.dtype)
        return self._along_rows(layer, f, weight) * (weight + layer.delta_weight(name).to(weight.dtype))

    def unmerge(self, layer: AdapterLayer, name: str, weight: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """``weight / f − s·B A``: the inverse of :meth:`merge` with the factor it used."""
        return weight / self._along_rows(layer, f.to(weight.dtype), weight) - layer.delta_weight(name).to(weight.dtype)

    @staticmethod
    def _along_rows(layer: AdapterLayer, f: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        shape = [1] * weight.dim()
        shape[_out_dim(layer)] = -1
        return f.view(shape)


# ---- merging (float weights here; quantised layers pass their dequantised weight) --------------------------------
def merge_factors(layer: AdapterLayer, names: list[str]) -> dict[str, torch.Tensor]:
    """``f = m / ‖W + s·B A‖_c`` per DoRA adapter in ``names``, from the weight ``forward`` uses now."""
    out = {}
    for name in names:
        if name in layer.lora_variant:
            magnitude = layer.lora_magnitude_vector[name].detach().reshape(-1)
            norm = weight_norm(layer, name)
            out[name] = magnitude.to(norm.dtype) / norm
    return out


def merged_weight(layer: AdapterLayer, weight: torch.Tensor, names: list[str]
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weight (float, stored layout) with ``names`` merged in order, and the DoRA factors used.

    Each DoRA norm comes from the weight before this merge, the one ``forward`` used, so the merged layer computes
    what the unmerged one did; a plain LoRA adapter adds ``s·B A``.

    Raises:
        ValueError: the result is not finite (names the adapter); nothing is written.
    """
    factors = merge_factors(layer, names)
    for name in names:
        if name in factors:
            weight = layer.lora_variant[name].merge(layer, name, weight, factors[name])
        else:
            weight = weight + layer.delta_weight(name).to(weight.dtype)
        if not torch.isfinite(weight).all():
            raise ValueError(f"Merging adapter {name!r} into {type(layer).__name__} gives non-finite weights (the "
                             "adapter holds NaN/inf, or a DoRA norm is zero). Nothing was merged.")
    return weight, factors


def unmerged_weight(layer: AdapterLayer, weight: torch.Tensor) -> torch.Tensor:
    """Undo every merge on ``layer`` (last first) in the float weight ``weight``; empties ``merged_adapters``."""
    while layer.merged_adapters:
        name = layer.merged_adapters.pop()
        if name in layer.variant_merged:
            weight = layer.lora_variant[name].unmerge(layer, name, weight, layer.variant_merged.pop(name))
        else:
            weight = weight - layer.delta_weight(name).to(weight.dtype)
    layer.variant_cache.clear()
    return weight


def _float(weight: torch.Tensor) -> torch.Tensor:
    # Half-precision weights are merged in fp32 and rounded once (as AdapterLayer.merge does for plain LoRA).
    return weight.detach().to(torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype,
                              copy=True)


def merge_layer(layer: AdapterLayer, names: list[str], write: bool = True) -> None:
    """Merge ``names`` into a float base weight (``write=False``: only check that it would be finite)."""
    if not names:
        return
    weight = layer.get_base_layer().weight
    new, factors = merged_weight(layer, _float(weight), names)
    if not torch.isfinite(new.to(weight.dtype)).all():  # fp16 overflows where fp32 does not
        raise ValueError(f"Merging {names} into {type(layer).__name__} overflows {weight.dtype}. Nothing was merged.")
    if not write:
        return
    with torch.no_grad():
        weight.copy_(new)  # in place under no_grad: the version counter moves, so cached norms see the change
    layer.variant_merged.update(factors)
    layer.merged_adapters.extend(names)
    layer.variant_cache.clear()


def unmerge_layer(layer: AdapterLayer) -> None:
    """Undo every merge of a layer whose base weight is float."""
    if not layer.merged_adapters:
        return
    weight = layer.get_base_layer().weight
    new = unmerged_weight(layer, _float(weight))
    with torch.no_grad():
        weight.copy_(new)
