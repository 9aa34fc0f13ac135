"""QLoRA: LoRA beside bitsandbytes 4-bit (NF4/FP4) and 8-bit linear layers, and the tools around it.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", https://arxiv.org/abs/2305.14314.
Reference behaviour: bitsandbytes + Hugging Face peft ``tuners/lora/bnb.py`` (same checkpoint keys)::

    x ──► dequant(W_nf4) x   (bitsandbytes, frozen, 4.127 bits/parameter with double quantisation)
    └──► dropout ─► A (r×in) ─► B (out×r) ─► ·(α/r) ─► + ─► h        (adapters in fp32)

bitsandbytes is optional: this module imports it only inside the functions that need it, and
``LoraMethod.layer_for`` imports this module only for a layer whose class comes from bitsandbytes.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn

from peftkit.core.errors import TargetModuleError
from peftkit.core.inject import replace_module
from peftkit.core.layer import AdapterLayer, base_layer_of
from peftkit.methods.dora import attach_variant, merge_factors, merged_weight, unmerged_weight
from peftkit.methods.lora import LoraConfig, LoraLayer, LoraLinear

__all__ = [
    "LORA_DISPATCHERS", "LoraLinear4bit", "LoraLinear8bitLt", "dequantize_model", "dequantize_weight", "model_nbytes",
    "prepare_model_for_kbit_training", "quantize_model",
]

def _bnb() -> ModuleType:
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError("4-bit and 8-bit quantization needs bitsandbytes: pip install bitsandbytes (or pip install "
                          "peftkit[bnb]).") from exc
    return bitsandbytes


def _is_bnb(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


# ---- the CPU inference layout of bitsandbytes ≥ 0.49 ---------------------------------------------------------
# On CPUs with AVX512-BF16, the first eval-mode forward without grad re-lays a 4-bit weight out for a fused bf16
# kernel (absmax rounded to bf16, double quantisation undone) and keeps it that way. The repacking fails unless
# out_features % 32 == 0 and in_features % blocksize == 0, and the kernel has no autograd: a later training step
# gets no gradient through the layer, silently.
def _is_packed(weight: torch.Tensor) -> bool:
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def _unpacked(weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(data, quant_state) of a 4-bit weight in the standard layout; the weight itself is not changed."""
    state = weight.quant_state
    if not _is_packed(weight):
        return weight.data, state
    state = copy.copy(state)
    # Keep the bf16 absmax the packed kernel used (as fp32, unnested): re-nesting it, as bitsandbytes' own
    # inverse does, would round the weights a second time on every eval → train switch.
    state.original_nested = False
    data, state = _bnb().functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
    state.absmax = weight.quant_state.absmax.T.reshape(-1).float()  # packed as (in/blocksize, out)
    return data, state


def _unpack_for_autograd(module: nn.Module, args: tuple[Any, ...]) -> None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled() and _is_packed(module.weight):
        module.weight.data, module.weight.quant_state = _unpacked(module.weight)
        module.quant_state = module.weight.quant_state


def _guard_cpu_kernel(module: nn.Module) -> None:
    """Make a ``Linear4bit`` safe to train after an eval pass, and usable when out_features % 32 != 0."""
    if getattr(module, "_peftkit_cpu_guard", False):
        return
    if module.out_features % 32 or module.in_features % module.weight.blocksize:
        module.support_avx512bf16_for_cpu = False
    module.register_forward_pre_hook(_unpack_for_autograd)
    module._peftkit_cpu_guard = True


# ---- dequantise / requantise ------------------------------------------------------------------------------------
def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The float weight ``(out, in)`` a bitsandbytes linear computes with, in fp32."""
    bnb, weight = _bnb(), module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(*_unpacked(weight)).float()
    if weight.dtype.is_floating_point:  # Linear8bitLt(has_fp16_weights=True) keeps float weights
        return weight.data.float()
    # The first forward moves the row scales from the weight to the layer's state (init_8bit_state).
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb).float()


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the weight had before quantisation (8-bit does not record it: the bias's, else fp32)."""
    state = getattr(module.weight, "quant_state", None)
    if state is not None:
        return getattr(state, "original_dtype", state.dtype) if _is_packed(module.weight) else state.dtype
    return module.bias.dtype if module.bias is not None else torch.float32


def _requantize(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace the layer's weight by ``weight`` (float ``(out, in)``), quantised with the layer's own settings."""
    bnb, old = _bnb(), module.weight
    weight = weight.to(_float_dtype(module)).cpu()
    if isinstance(module, bnb.nn.Linear4bit):
        new = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=old.blocksize,
                                compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                quant_storage=old.quant_storage, module=module)
        module.weight = new.to(old.device)  # .to(device) quantises
    elif old.dtype.is_floating_point:
        old.data.copy_(weight)
    else:
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(old.device)
        module.state.reset_grads()
        module.state.CB = module.state.SCB = None  # the next forward reads the new ones from the weight


def _float_linear(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    dtype = _float_dtype(module)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(dtype).clone(), requires_grad=False)
    return linear.train(module.training)


# ---- LoRA layers ----------------------------------------------------------------------------------------------
class _QuantizedLoraLinear(LoraLinear):
    """LoRA beside a quantised linear; merges go through a float copy of the weight (module docstring)."""

    bits = 0

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        # LoraLayer.update_layer gives the adapter the base weight's dtype, here uint8/int8 storage. QLoRA trains
        # the adapters in higher precision than the quantised base (paper Sec. 3): fp32, as HF peft does.
        r, alpha = config.rank_and_alpha(module_name)
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, alpha
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        device = self.get_base_layer().weight.device
        lora_a, lora_b = (m.to(device=device, dtype=torch.float32) for m in self._make_pair(r))
        self.lora_A[adapter_name], self.lora_B[adapter_name] = lora_a, lora_b
        self.reset_adapter_parameters(adapter_name, config.init_lora_weights)
        attach_variant(self, adapter_name, config)
        self._refresh_slots()

    def dense_weight(self) -> torch.Tensor:
        """The float weight ``(out, in)`` the base computes with (DoRA's norm runs over its rows)."""
        return dequantize_weight(self.get_base_layer())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.dtype == torch.float32:  # output dtype = input dtype: LoraLinear's fused addmm is already fp32
            return super().forward(x, *args, **kwargs)
        # Half-precision compute: run A and B in fp32 and cast the delta once (addmm would run B in half).
        return LoraLayer.forward(self, x, *args, **kwargs)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``(α/r)·B A`` in fp32, shape ``(out, in)``: it is added to the dequantised weight, never to storage."""
        lora_a, lora_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return (lora_b.float() @ lora_a.float()) * self.scaling[adapter_name]

    def _merged_weight(self, names: list[str]) -> torch.Tensor:
        # W + Σ (α/r)·B A, or for DoRA adapters f ⊙ (W + (α/r)·B A) (peftkit/methods/dora.py); raises if not finite.
        return merged_weight(self, dequantize_weight(self.get_base_layer()), names)[0]

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        self._merged_weight(self._to_merge(adapter_names))

    def merge_restore_point(self) -> Callable[[], None]:
        # Re-quantising replaces the weight object and resets the layer's own quantisation state (8-bit row scales,
        # the 4-bit quant_state the layer keeps beside its weight): a rollback must restore those objects too.
        restore_params = super().merge_restore_point()
        base = self.get_base_layer()
        kept = {k: copy.copy(base.__dict__[k]) for k in ("state", "quant_state") if k in base.__dict__}

        def restore() -> None:
            restore_params()
            base.__dict__.update(kept)

        return restore

    def _warn_rounding(self, action: str) -> None:
        warnings.warn(
            f"{action} LoRA into a {self.bits}-bit layer re-quantises its weight, so outputs differ from the "
            "unmerged adapter by rounding; merge_and_unload(dequantize=True) gives float layers with the exact "
            "merged weight.", UserWarning, stacklevel=3)

    def merge(self, adapter_names: list[str] | None = None, safe: bool = False) -> None:
        """``W_q ← quant(dequant(W_q) + Σ (α/r)·B A)``: lossy (warns). Non-finite sums raise before any write."""
        names = self._to_merge(adapter_names)
        if not names:
            return
        self._warn_rounding("Merging")
        factors = merge_factors(self, names)  # what undoes DoRA's rescaling; from the weight before the merge
        _requantize(self.get_base_layer(), self._merged_weight(names))
        self.variant_merged.update(factors)
        self.merged_adapters.extend(names)
        self.variant_cache.clear()

    def unmerge(self) -> None:
        """``W_q ← quant(dequant(W_q) − Σ (α/r)·B A)``: a second rounding, so not bit-exact (warns)."""
        if not self.merged_adapters:
            return
        self._warn_rounding("Unmerging")
        _requantize(self.get_base_layer(), unmerged_weight(self, dequantize_weight(self.get_base_layer())))

    def merged_module(self, adapter_names: list[str] | None, dequantize: bool = False) -> nn.Module:
        """The quantised base with the adapters merged (lossy), or with ``dequantize`` an ``nn.Linear`` holding
        ``dequant(W_q) + Σ (α/r)·B A`` exactly, in the dtype the weight had before quantisation."""
        if not dequantize:
            return super().merged_module(adapter_names)
        return _float_linear(self.get_base_layer(), self._merged_weight(self._to_merge(adapter_names)))


class LoraLinear4bit(_QuantizedLoraLinear):
    """LoRA on a bitsandbytes ``Linear4bit`` (QLoRA): ``h = dequant(W_nf4) x + (α/r) · B A dropout(x)``.

    The base runs in bitsandbytes (NF4 or FP4, with or without double quantisation, in its compute dtype);
    A and B are fp32. Merging dequantises, adds ``(α/r)·B A`` and re-quantises, which rounds (a warning says
    so); ``merge_and_unload(dequantize=True)`` returns an exact float ``nn.Linear`` instead.

    Args:
        base_layer: The frozen ``Linear4bit`` (or an adapter layer around one).
        adapter_name: Name of the first adapter.
        config: Its ``LoraConfig``.
        module_name: Full module name, for ``rank_pattern`` / ``alpha_pattern``.

    Shapes: ``x (..., in)`` → ``h (..., out)``; ``A (r, in)``, ``B (out, r)``.
    """

    bits = 4

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        super().__init__(base_layer, adapter_name, config, module_name)
        _guard_cpu_kernel(self.get_base_layer())


class LoraLinear8bitLt(_QuantizedLoraLinear):
    """LoRA on a bitsandbytes ``Linear8bitLt`` (LLM.int8()): ``h = dequant(W_int8) x + (α/r) · B A dropout(x)``.

    As :class:`LoraLinear4bit`, with row-wise absmax int8 storage; merges round through fp16 (bitsandbytes
    quantises from fp16).
    """

    bits = 8


# ---- dispatch (LoraMethod.layer_for consults LORA_DISPATCHERS in order) ---------------------------------------
def dispatch_bnb_linear(
    target: nn.Module, config: LoraConfig, adapter_name: str, module_name: str
) -> AdapterLayer | None:
    """A LoRA layer for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` base (nested or not), else None."""
    base, bnb = base_layer_of(target), _bnb()
    for kind, layer_class in ((bnb.nn.Linear4bit, LoraLinear4bit), (bnb.nn.Linear8bitLt, LoraLinear8bitLt)):
        if isinstance(base, kind):
            return layer_class(target, adapter_name, config, module_name)
    return None


def reject_other_bnb(
    target: nn.Module, config: LoraConfig, adapter_name: str, module_name: str
) -> AdapterLayer | None:
    """Last in line: any other bitsandbytes layer is refused with a ``TargetModuleError``."""
    # Other bitsandbytes layers subclass nn.Linear / nn.Embedding too; plain LoRA layers would read their packed
    # storage as weights, so they are refused here rather than wrapped wrongly.
    raise TargetModuleError(f"LoRA cannot wrap {module_name} ({type(base_layer_of(target)).__name__} from "
                            "bitsandbytes); supported: Linear4bit, Linear8bitLt. Remove it from target_modules.")


LORA_DISPATCHERS: tuple[Callable[..., AdapterLayer | None], ...] = (dispatch_bnb_linear, reject_other_bnb)


# ---- whole-model tools --------------------------------------------------------------------------------------------
def _matches(name: str, keys: Sequence[str]) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)


def _default_skip(model: nn.Module) -> list[str]:
    """The output head stays in float, as transformers does: it is small next to the body and precision-critical."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return ["lm_head"] + [n for n, m in model.named_modules() if head is not None and m is head]


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.float32,
    skip_modules: Sequence[str] | None = None,
    blocksize: int = 64,
) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers in place by bitsandbytes 4-bit or 8-bit layers; return the model.

    ``quant_type`` ``"nf4"`` (QLoRA's NormalFloat, block 64) or ``"fp4"`` gives ``Linear4bit``
    (``double_quant`` quantises the block absmax to 8 bit, block 256: 4.127 bits/parameter for NF4); ``"int8"``
    gives ``Linear8bitLt`` (row-wise absmax, outlier threshold 6.0 as transformers). Only exact ``nn.Linear``
    layers are converted (subclasses may read ``.weight`` directly), and never a weight shared with another
    module (quantising one copy would untie it).

    Args:
        skip_modules: Names (exact or dotted suffix) kept in float. None: the output head (``lm_head`` or
            ``get_output_embeddings()``).

    Raises:
        ImportError: bitsandbytes is not installed (the message says how to install it).
        ValueError: unknown ``quant_type``, or the model has adapters already (quantise first).
    """
    if quant_type not in ("nf4", "fp4", "int8"):
        raise ValueError(f"quant_type={quant_type!r} is not supported; use 'nf4', 'fp4' or 'int8'.")
    bnb = _bnb()
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("The model has adapters already; quantize_model the base model before get_peft_model.")
    skip = _default_skip(model) if skip_modules is None else list(skip_modules)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not _matches(n, skip)
             and uses[id(m.weight)] == 1]
    for name in names:
        old = model.get_submodule(name)
        device, has_bias = old.weight.device, old.bias is not None
        if quant_type == "int8":
            new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=has_bias, has_fp16_weights=False,
                                      threshold=6.0, device="meta")
            new.weight = bnb.nn.Int8Params(old.weight.data, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                    compress_statistics=double_quant, quant_type=quant_type, device="meta")
            new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, blocksize=blocksize,
                                           compress_statistics=double_quant, quant_type=quant_type, module=new)
        if has_bias:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        new = new.to(device).train(old.training)  # .to(device) quantises
        if quant_type != "int8":
            _guard_cpu_kernel(new)
        replace_module(model, name, new)
    # transformers and HF peft read these flags (Trainer checks, HF peft's bnb dispatch).
    setattr(model, "is_loaded_in_8bit" if quant_type == "int8" else "is_loaded_in_4bit", True)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every bitsandbytes linear (adapter bases included) by an ``nn.Linear`` with its exact float weight."""
    for name, module in list(model.named_modules()):
        if _is_bnb(module) and isinstance(module, (_bnb().nn.Linear4bit, _bnb().nn.Linear8bitLt)):
            replace_module(model, name, _float_linear(module, dequantize_weight(module)))
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        vars(model).pop(flag, None)
    return model


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Get a quantised model ready for adapter training (HF peft's function of the same name); return it.

    1. Freeze every parameter. 2. Cast float16/bfloat16 parameters that are not quantised storage (layer norms,
    embeddings, head) to fp32: half-precision layer norms and logits make QLoRA training unstable. 3. Make
    4-bit layers safe to train after an eval pass on the CPU (see ``_guard_cpu_kernel``). 4. With
    ``use_gradient_checkpointing``: make the embedding output require grad (reentrant checkpointing drops the
    gradients of blocks whose inputs do not), then enable checkpointing. Needs bitsandbytes only if the model
    has bitsandbytes layers.

    Raises:
        ValueError: checkpointing is asked for but the model does not support it.
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.float()
    for module in model.modules():
        if _is_bnb(module) and isinstance(module, _bnb().nn.Linear4bit):
            _guard_cpu_kernel(module)
    if not use_gradient_checkpointing:
        return model
    # transformers 5 renamed gradient checkpointing to activation checkpointing; both take the kwargs first.
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None)
    if enable is None or not hasattr(model, "enable_input_require_grads"):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; pass "
                         "use_gradient_checkpointing=False.")
    model.enable_input_require_grads()
    enable(gradient_checkpointing_kwargs)
    return model


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, quantisation statistics included, each storage once."""
    storages: dict[int, int] = {}
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        for tensor in list(tensors):
            state = getattr(tensor, "quant_state", None)
            for part in (state, getattr(state, "state2", None)):
                tensors += [getattr(part, attr, None) for attr in ("absmax", "code", "offset")]
            tensors.append(getattr(tensor, "SCB", None))
        tensors.append(getattr(getattr(module, "state", None), "SCB", None))  # 8-bit row scales after a forward
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
