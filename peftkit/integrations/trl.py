"""TRL's ``SFTTrainer`` and ``DPOTrainer`` for peftkit models: drop-in subclasses with TRL's signatures.

``from trl import SFTTrainer`` becomes ``from peftkit.integrations.trl import SFTTrainer``; ``peft_config`` takes a
peftkit config, ``model`` a model already wrapped by ``peftkit.get_peft_model`` (or a model id / path). Install
with ``pip install peftkit[trl]``; HF peft need not be installed.

Why subclasses (checked against TRL 1.16): TRL recognises PEFT through ``isinstance(peft_config, peft.PeftConfig)``
and accelerate's ``is_peft_model`` (``isinstance(model, peft.PeftModel)``), names bound inside TRL's modules. For a
peftkit model, ``trl.SFTTrainer`` refuses the config, and with a wrapped model it puts its fused LM head (log-probs
computed from the backbone's hidden states, ``trl.trainer.utils.add_fused_lm_head``) on the ``PeftModel`` instead of
on the base model, where it cannot find the backbone. ``DPOTrainer`` would also load a second copy of the model as
the reference. These classes therefore:

- wrap the model with ``peftkit.get_peft_model`` before TRL sees it, when ``peft_config`` is a peftkit config;
- move TRL's fused LM head from the ``PeftModel`` to the base model, with the options TRL chose;
- save, resume and reload adapter files only (:class:`~peftkit.integrations.trainer.PeftTrainerMixin`);
- (DPO) use the policy itself as the reference: adapters disabled when TRL would disable them (a new adapter), or
  a frozen copy of the adapter named ``"ref"`` when the model came wrapped (TRL's rule for a pre-trained adapter).

Anything else (HF peft configs and models, plain models) goes through TRL's code unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

try:
    import trl
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("peftkit.integrations.trl needs TRL: pip install peftkit[trl] (or pip install trl).") from exc
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollator,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import EvalPrediction
from trl.trainer import utils as trl_utils

from peftkit.core.config import PeftConfig
from peftkit.core.layer import AdapterLayer, ModulesToSaveWrapper
from peftkit.core.model import PeftModel
from peftkit.core.task_models import get_peft_model
from peftkit.integrations.trainer import PeftTrainerMixin
from peftkit.integrations.training import unwrap_model

__all__ = ["DPOTrainer", "SFTTrainer"]

logger = logging.getLogger(__name__)

EvalDatasets = Dataset | IterableDataset | DatasetDict | IterableDatasetDict | dict[str, Dataset | IterableDataset]
Optimizers = tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None]


def _prepare_model(
    model: str | nn.Module, args: TrainingArguments | None, peft_config: object, quantization_config: object,
    processing_class: object = None,
) -> tuple[str | nn.Module, TrainingArguments | None, object, object, object]:
    """Wrap ``model`` with a peftkit config before TRL sees it. Returns what to pass on to TRL:
    (model, args, peft_config, quantization_config, processing_class)."""
    if not isinstance(peft_config, PeftConfig):
        return model, args, peft_config, quantization_config, processing_class  # None or HF peft's: TRL's path
    if isinstance(unwrap_model(model), PeftModel) or getattr(model, "peft_config", None) is not None:
        raise ValueError("The model is a PeftModel already and a peft_config was passed too; pass one of them (to "
                         "train a second adapter, model.add_adapter(name, config) and model.set_adapter(name) first).")
    if isinstance(model, str):
        init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
        if quantization_config is not None:
            if "quantization_config" in init_kwargs:
                raise ValueError("quantization_config was passed both to the trainer and in args.model_init_kwargs; "
                                 "pass it once, preferably to the trainer.")
            init_kwargs["quantization_config"] = quantization_config
        if args is not None and args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
            init_kwargs["device_map"] = None  # as TRL: device_map="auto" fails in distributed runs
        init_kwargs.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
        model = trl_utils.create_model_from_path(model, **init_kwargs)
        if args is not None and getattr(args, "model_init_kwargs", None) is not None:
            args = copy.copy(args)  # used above: keep TRL from warning that they were ignored
            args.model_init_kwargs = None
        quantization_config = None
    if _clones_chat_template(args):
        model, args, peft_config, processing_class = _clone_chat_template(model, args, peft_config, processing_class)
    # TRL seeds before wrapping so that the adapter's random initialisation is reproducible; 42 is its default.
    set_seed(args.seed if args is not None else 42)
    peft_model = get_peft_model(model, peft_config)
    try:
        _refuse_adapter_on_lm_head(peft_model)
    except ValueError:
        peft_model.unload()  # errors change nothing: the user's model comes back as it was
        raise
    return peft_model, args, None, quantization_config, processing_class


def _clones_chat_template(args: TrainingArguments | None) -> bool:
    """``chat_template_path`` names a tokenizer (not a .jinja file) whose template, and tokens, TRL copies."""
    path = getattr(args, "chat_template_path", None)
    return path is not None and not (os.path.isfile(path) and path.endswith((".jinja", ".j2")))


def _clone_chat_template(
    model: nn.Module, args: TrainingArguments, peft_config: PeftConfig, processing_class: object
) -> tuple[nn.Module, TrainingArguments, PeftConfig, object]:
    """What ``trl.SFTTrainer`` does for ``chat_template_path`` when it makes the PEFT model itself, done before
    peftkit wraps the model: copy the template, add its tokens (resizing the embeddings) and make their embedding
    rows trainable (``trainable_token_indices["embed_tokens"]``) with ``lm_head`` in ``modules_to_save``, so that the
    model can learn to read and emit them. The caller's config is not modified."""
    if processing_class is None:  # TRL's default, from the model's config
        processing_class = AutoProcessor.from_pretrained(trl_utils.get_config_model_id(model.config),
                                                         trust_remote_code=args.trust_remote_code)
    source = args.chat_template_path
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    eos = getattr(args, "eos_token", None)
    if eos is not None and eos not in tokenizer.get_vocab():  # TRL's check, which runs before its clone
        raise ValueError(f"The specified `eos_token` ({eos!r}) is not found in the vocabulary of the given "
                         f"`processing_class` ({type(processing_class).__name__}).")
    if not hasattr(peft_config, "trainable_token_indices"):  # refused before the model is resized
        new = [t.content for t in AutoTokenizer.from_pretrained(source).added_tokens_decoder.values()
               if t.content not in tokenizer.get_vocab()]
        if new:
            raise ValueError(f"The chat template of {source!r} adds tokens {new}, whose embedding rows must train, "
                             f"and {type(peft_config).__name__} cannot train embedding rows. Use a LoraConfig, or a "
                             ".jinja chat template that adds no tokens.")
    model, processing_class, added_tokens = trl.clone_chat_template(model, processing_class, source)
    args = copy.copy(args)
    args.chat_template_path = None  # done: TRL must not clone again into the wrapped model
    # TRL applies eos_token and then clones, so the template's eos wins; applied again after our clone, it would not.
    args.eos_token = None
    if not added_tokens or not hasattr(peft_config, "trainable_token_indices"):  # at most rows no text uses
        return model, args, peft_config, processing_class
    indices = copy.deepcopy(peft_config.trainable_token_indices)
    if indices is None or isinstance(indices, dict):
        indices = dict(indices or {})
        indices["embed_tokens"] = [*indices.get("embed_tokens", []), *added_tokens]
    else:  # a list means the input embedding, which embed_tokens is
        indices = [*indices, *added_tokens]
    modules_to_save = list(peft_config.modules_to_save or [])
    if "lm_head" not in modules_to_save:
        logger.warning("The chat template added tokens %s; 'lm_head' goes into modules_to_save (as TRL does) so that "
                       "the model can learn to generate them.", added_tokens)
        modules_to_save.append("lm_head")
    peft_config = dataclasses.replace(peft_config, trainable_token_indices=indices, modules_to_save=modules_to_save)
    return model, args, peft_config, processing_class


def _refuse_adapter_on_lm_head(model: nn.Module) -> None:
    peft_model = unwrap_model(model)
    if isinstance(peft_model, PeftModel):
        head = peft_model.get_base_model().get_output_embeddings()
        # A trained copy (modules_to_save) is fine: the fused head reads the copy's weight through the wrapper.
        if isinstance(head, AdapterLayer) and not isinstance(head, ModulesToSaveWrapper):
            raise ValueError("An adapter on lm_head is not supported by TRL: its fused LM head reads lm_head.weight "
                             "directly, so the adapter would never train. Remove 'lm_head' from target_modules.")


def _move_fused_lm_head(model: nn.Module) -> None:
    """Re-apply the fused LM head TRL put on a ``PeftModel`` to its base model, with the same options."""
    peft_model = unwrap_model(model)
    add_fused_lm_head = getattr(trl_utils, "add_fused_lm_head", None)  # TRL versions before it have no fused head
    if not isinstance(peft_model, PeftModel) or add_fused_lm_head is None:
        return
    patched = peft_model.__dict__.pop("forward", None)  # TRL's instance attribute; PeftModel's own is the class's
    if patched is None:
        return
    # ``add_fused_lm_head`` keeps its options in the closure of the forward it installs; read them by name.
    captured = inspect.getclosurevars(getattr(patched, "__func__", patched)).nonlocals
    options = [p for p in inspect.signature(add_fused_lm_head).parameters if p != "model"]
    if "outputs" not in captured:
        raise RuntimeError(f"TRL {trl.__version__}'s fused LM head changed (checked against TRL 1.16); it cannot be "
                           "moved to the base model. Please report this to peftkit.")
    add_fused_lm_head(peft_model.get_base_model(), **{name: captured[name] for name in options if name in captured})


class SFTTrainer(PeftTrainerMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` that takes a peftkit config as ``peft_config`` or a model wrapped by
    ``peftkit.get_peft_model``, trains only the adapter, and saves adapter files only (``save_model``,
    checkpoints). Same arguments as ``trl.SFTTrainer``; see the module docstring for what differs inside.

    Raises:
        ValueError: a ``PeftModel`` and a ``peft_config`` together, or an adapter on ``lm_head``.
    """

    def __init__(
        self,
        model: str | nn.Module,
        args: TrainingArguments | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: EvalDatasets | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: Optimizers = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, object]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        quantization_config: BitsAndBytesConfig | None = None,
        peft_config: PeftConfig | object | None = None,
        formatting_func: Callable[[dict], str] | None = None,
    ) -> None:
        _refuse_adapter_on_lm_head(model)
        model, args, peft_config, quantization_config, processing_class = _prepare_model(
            model, args, peft_config, quantization_config, processing_class)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics, quantization_config=quantization_config,
            peft_config=peft_config, formatting_func=formatting_func,
        )
        _move_fused_lm_head(self.model)


class _PolicyAsReference(nn.Module):
    """DPO's reference model for a peftkit policy: the policy itself, run with its adapters disabled, or with the
    frozen adapter ``adapter_name`` active instead of the trained one. It holds no parameters of its own (the
    policy is deliberately not a submodule), so nothing is copied, sharded or prepared twice.
    """

    def __init__(self, policy: PeftModel, adapter_name: str | None) -> None:
        super().__init__()
        self.__dict__["_policy"] = policy
        self.adapter_name = adapter_name

    @property
    def config(self) -> object:  # read by TRL's add_fused_lm_head
        return self._policy.config

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        # TRL hashes the reference's state dict to key its cache of precomputed reference log-probs.
        return self._policy.state_dict(*args, **kwargs)

    @contextlib.contextmanager
    def _as_reference(self) -> Iterator[None]:
        if self.adapter_name is None:
            with self._policy.disable_adapter():
                yield
            return
        active = self._policy.active_adapters
        self._policy.set_adapter(self.adapter_name)
        try:
            yield
        finally:
            self._policy.set_adapter(active)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Overrides Module.__call__, so the forward TRL and accelerate install on this object is never used: the
        # policy's own (fused LM head, autocast) runs instead.
        with self._as_reference():
            return self._policy(*args, **kwargs)


def _refuse_policy_as_reference(args: object) -> None:
    reasons = {
        # TRL precomputes inside its __init__, before the fused LM head is moved to the base model.
        "precompute_ref_log_probs": "the reference is computed on the fly, by the policy itself",
        "sync_ref_model": "the reference is the policy itself; there is no copy to synchronise",
        "deepspeed": "the reference runs through the policy, which DeepSpeed wraps",
        "fsdp": "the reference runs through the policy, which FSDP wraps",
    }
    for flag, why in reasons.items():
        if getattr(args, flag, None):
            raise NotImplementedError(f"peftkit's DPOTrainer does not support {flag} without a ref_model: {why}. "
                                      f"Turn {flag} off, or pass ref_model= (a separate reference model).")


def _reference_for(model: nn.Module, wrapped_here: bool) -> _PolicyAsReference:
    """TRL's rule: a new adapter's reference is the base model; an adapter that came with the model (maybe
    pre-trained) is compared against a frozen copy of itself, named "ref"."""
    policy = unwrap_model(model)
    if wrapped_here:
        return _PolicyAsReference(policy, None)
    if "ref" not in policy.peft_config:
        trained = policy.active_adapters
        if len(trained) != 1:
            raise ValueError(f"The model has active adapters {trained}; DPO needs one trained adapter to copy as "
                             "the reference. Activate one with set_adapter, or pass ref_model=.")
        policy.add_adapter("ref", policy.peft_config[trained[0]])
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if f".{trained[0]}." in name:
                    policy.get_parameter(name.replace(f".{trained[0]}.", ".ref.")).copy_(param)
    return _PolicyAsReference(policy, "ref")


class DPOTrainer(PeftTrainerMixin, trl.DPOTrainer):
    """``trl.DPOTrainer`` for peftkit models, with the same arguments. Without ``ref_model`` the reference is the
    policy itself (no second copy of the model): adapters disabled for an adapter created from ``peft_config``, or
    a frozen copy named ``"ref"`` of an adapter the model came with, as TRL does with HF peft.

    Raises:
        ValueError: a ``PeftModel`` and a ``peft_config`` together, or an adapter on ``lm_head``.
        NotImplementedError: ``precompute_ref_log_probs``, ``sync_ref_model``, DeepSpeed or FSDP while the policy is
            its own reference (pass ``ref_model``).
    """

    def __init__(
        self,
        model: str | nn.Module,
        ref_model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: EvalDatasets | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: Optimizers = (None, None),
        quantization_config: BitsAndBytesConfig | None = None,
        peft_config: PeftConfig | object | None = None,
    ) -> None:
        wrapped_here = isinstance(peft_config, PeftConfig)
        policy_is_reference = ref_model is None and (wrapped_here or isinstance(unwrap_model(model), PeftModel))
        if policy_is_reference:
            _refuse_policy_as_reference(args)
        _refuse_adapter_on_lm_head(model)
        model, args, peft_config, quantization_config, processing_class = _prepare_model(
            model, args, peft_config, quantization_config, processing_class)
        if policy_is_reference:
            ref_model = _reference_for(model, wrapped_here)
        super().__init__(
            model=model, ref_model=ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, optimizers=optimizers, quantization_config=quantization_config,
            peft_config=peft_config,
        )
        _move_fused_lm_head(self.model)
