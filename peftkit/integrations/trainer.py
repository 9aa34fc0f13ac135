"""transformers ``Trainer`` with peftkit models: checkpoints hold the adapter files only, with any ``Trainer``.

What ``Trainer`` inspects (transformers 5.25, ``trainer.py`` / ``trainer_utils.py``), and what peftkit does:

- ``validate_quantization_for_training`` refuses a model whose ``is_quantized`` is true unless it is HF peft's
  ``PeftModel`` or has ``_hf_peft_config_loaded`` set ("adapters are attached"; transformers' own PEFT integration
  sets it). A peftkit ``PeftModel`` sets that attribute (``peftkit/core/model.py``), so QLoRA passes the check.
- ``_save``, ``_load_from_checkpoint`` and ``_load_best_model`` recognise HF peft's ``PeftModel`` by ``isinstance``
  only. Any other model is a plain module: ``_save`` writes its whole ``state_dict()`` to ``model.safetensors``
  (base weights included; GPT-2's tied embeddings make safetensors refuse it, after training), and resuming reads
  that file back. No attribute or callback changes this (``save_model`` runs no callback; ``on_save`` comes after
  the file is written), so these three methods are the one place to act.
- ``__init__`` reads the label names off ``type(model).forward`` (HF peft's model is unwrapped first); a
  ``PeftModel``'s class-level forward takes ``**kwargs``, so none are found and evaluation reports no ``eval_loss``.
  The wrapped ``__init__`` also stops TRL's own SFT/DPO trainers, which would fail at the first step on a peftkit
  model, and names ``peftkit.integrations.trl``.

:class:`PeftTrainerMixin` overrides these (the explicit path: ``PeftTrainer``, or the mixin on any ``Trainer``
subclass). :func:`enable_trainer_support` wraps the same methods of ``transformers.Trainer`` itself, so that the
stock ``Trainer`` and its subclasses (TRL's included) behave the same for a peftkit model; the wrappers hand every
other model to the original code untouched. It runs when this module is imported, and
``peftkit.integrations.trainer_hook`` imports this module when a ``PeftModel`` is built, or later, when
``transformers.trainer`` is first imported; ``import peftkit`` alone imports neither.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from peftkit.core.checkpoint import WEIGHTS_NAME
from peftkit.core.model import PeftModel
from peftkit.integrations.training import load_adapter_checkpoint, unwrap_model

__all__ = ["PeftTrainer", "PeftTrainerMixin", "enable_trainer_support"]


def _has_adapter_files(directory: str | None) -> bool:
    if not directory or not os.path.isdir(directory):
        return False
    return os.path.isfile(os.path.join(directory, WEIGHTS_NAME)) or any(
        os.path.isfile(os.path.join(directory, d, WEIGHTS_NAME)) for d in os.listdir(directory)
    )


def _peftkit_model(model: nn.Module | None) -> PeftModel | None:
    inner = unwrap_model(model) if model is not None else None
    return inner if isinstance(inner, PeftModel) else None


def _use_base_labels(trainer: Trainer) -> None:
    # Without the base model's label names evaluation reports no eval_loss, and load_best_model_at_end, which looks
    # for it by default, fails at the first evaluation, after training has started.
    peft_model = _peftkit_model(trainer.model)
    if peft_model is not None:
        base = type(peft_model.get_base_model())
        if trainer.args.label_names is None:
            trainer.label_names = find_labels(base)
        trainer.can_return_loss = can_return_loss(base)


# Each returns True when it handled a peftkit model, False to let Trainer's own code run.
def _save_adapter(trainer: Trainer, output_dir: str | None = None, state_dict: dict | None = None) -> bool:
    model = _peftkit_model(trainer.model)
    if model is None:
        return False
    if not trainer.args.should_save:
        return True
    output_dir = output_dir if output_dir is not None else trainer.args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    # ``state_dict`` is a full one Trainer gathered under FSDP (FULL_STATE_DICT) or DeepSpeed ZeRO-3.
    model.save_pretrained(output_dir, state_dict=state_dict)
    tokenizer = trainer.processing_class
    if tokenizer is None:
        tokenizer = getattr(trainer.data_collator, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    torch.save(trainer.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
    return True


def _resume_adapter(trainer: Trainer, resume_from_checkpoint: str, model: nn.Module | None = None) -> bool:
    peft_model = _peftkit_model(model if model is not None else trainer.model)
    if peft_model is None or not _has_adapter_files(resume_from_checkpoint):
        return False  # a checkpoint with a full model.safetensors (an older run) still loads the stock way
    load_adapter_checkpoint(peft_model, resume_from_checkpoint)
    return True


def _load_best_adapter(trainer: Trainer) -> bool:
    peft_model = _peftkit_model(trainer.model)
    best = trainer.state.best_model_checkpoint
    engine_managed = getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False)
    if peft_model is None or engine_managed or not _has_adapter_files(best):
        return False
    load_adapter_checkpoint(peft_model, best)
    return True


class PeftTrainerMixin:
    """Makes a transformers ``Trainer`` (or a subclass: ``Seq2SeqTrainer``, TRL's trainers) save, resume and
    reload the best checkpoint of a peftkit model as adapter files only::

        class MySeq2SeqTrainer(PeftTrainerMixin, Seq2SeqTrainer): ...

    ``_save`` writes ``save_pretrained``'s adapter files; ``_load_from_checkpoint`` and ``_load_best_model`` load
    them in place (``PeftModel.hotswap_adapter``: the optimizer keeps its parameters). ``__init__`` takes the label
    names from the base model's class, so evaluation reports ``eval_loss``. Models that are not peftkit models go
    through ``Trainer``'s own code unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _use_base_labels(self)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not _save_adapter(self, output_dir, state_dict):
            super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not _resume_adapter(self, resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not _load_best_adapter(self):
            super()._load_best_model()


class PeftTrainer(PeftTrainerMixin, Trainer):
    """transformers ``Trainer`` that saves, resumes and reloads the best checkpoint of a peftkit model as adapter
    files only, and evaluates with the base model's label names (see :class:`PeftTrainerMixin`); otherwise exactly
    ``Trainer``."""


# TRL trainers that recognise HF peft only and cannot run a peftkit model (their fused LM head lands on the
# PeftModel); peftkit.integrations.trl has drop-in replacements.
_TRL_REPLACED = ("SFTTrainer", "DPOTrainer")


def _refuse_stock_trl(trainer: Trainer) -> None:
    mro = type(trainer).__mro__
    if _peftkit_model(trainer.model) is None or any(c.__module__ == "peftkit.integrations.trl" for c in mro):
        return
    for cls in mro:
        if cls.__module__.startswith("trl.") and cls.__name__ in _TRL_REPLACED:
            raise TypeError(f"trl.{cls.__name__} cannot train a peftkit model (it recognises HF peft's PeftModel "
                            f"only); use peftkit.integrations.trl.{cls.__name__}, which takes the same arguments.")


def _after_init(original: Callable) -> Callable:
    @functools.wraps(original)
    def __init__(self: Trainer, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _refuse_stock_trl(self)
        _use_base_labels(self)

    return __init__


def _dispatching(original: Callable, peftkit_path: Callable[..., bool]) -> Callable:
    @functools.wraps(original)
    def method(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        if peftkit_path(self, *args, **kwargs):
            return None
        return original(self, *args, **kwargs)

    return method


# Checked against transformers 5.25. A method renamed upstream fails loudly here (KeyError), never silently.
_WRAPPERS = {"__init__": _after_init,
             "_save": lambda original: _dispatching(original, _save_adapter),
             "_load_from_checkpoint": lambda original: _dispatching(original, _resume_adapter),
             "_load_best_model": lambda original: _dispatching(original, _load_best_adapter)}


def enable_trainer_support() -> None:
    """Make ``transformers.Trainer`` (and its subclasses, TRL's included) treat peftkit models as it treats HF
    peft's ``PeftModel``: adapter files in checkpoints and ``save_model``, adapters loaded back on resume and by
    ``load_best_model_at_end``, the base model's label names for evaluation. Idempotent.

    Wraps ``Trainer._save``, ``_load_from_checkpoint`` and ``_load_best_model`` (a peftkit model, possibly inside
    DDP / FSDP / compile wrappers, takes the adapter path; any other model the original method, with the same
    arguments) and ``__init__`` (for peftkit models only, after the original: the base model's label names, and a
    refusal naming ``peftkit.integrations.trl`` from TRL's SFT/DPO trainers, which cannot run them). A patch
    rather than an extension point because ``Trainer`` has none for model files (see the module docstring). It
    runs on import of this module; calling it again does nothing.
    """
    for name, wrap in _WRAPPERS.items():
        current = Trainer.__dict__[name]
        if getattr(current, "__peftkit_original__", None) is None:
            wrapped = wrap(current)
            wrapped.__peftkit_original__ = current
            setattr(Trainer, name, wrapped)


enable_trainer_support()
