"""transformers ``Trainer`` for peftkit models: checkpoints hold the adapter files only.

``Trainer`` recognises HF peft's ``PeftModel`` by ``isinstance`` and treats every other model as a plain module:
``Trainer._save`` writes the whole ``state_dict()`` (base weights included) to ``model.safetensors``, and resuming
and ``load_best_model_at_end`` read it back. Callbacks cannot change this (``save_model`` runs none, and
``on_save`` comes after the full file is written), so :class:`PeftTrainerMixin` overrides the three methods that
touch model files: ``_save`` writes ``save_pretrained``'s adapter files, ``_load_from_checkpoint`` and
``_load_best_model`` load them in place (``PeftModel.hotswap_adapter``: the optimizer keeps its parameters).
``__init__`` also takes the label names from the base model's class, so evaluation reports ``eval_loss``.
Every other model goes through ``Trainer``'s own code unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from peftkit.core.checkpoint import WEIGHTS_NAME
from peftkit.core.model import PeftModel
from peftkit.integrations.training import load_adapter_checkpoint, unwrap_model

__all__ = ["PeftTrainer", "PeftTrainerMixin"]


def _has_adapter_files(directory: str | None) -> bool:
    if not directory or not os.path.isdir(directory):
        return False
    return os.path.isfile(os.path.join(directory, WEIGHTS_NAME)) or any(
        os.path.isfile(os.path.join(directory, d, WEIGHTS_NAME)) for d in os.listdir(directory)
    )


class PeftTrainerMixin:
    """Makes a transformers ``Trainer`` (or a subclass: ``Seq2SeqTrainer``, TRL's trainers) save, resume and
    reload the best checkpoint of a peftkit model as adapter files only::

        class MySFTTrainer(PeftTrainerMixin, SFTTrainer): ...

    ``Trainer`` special-cases HF peft's ``PeftModel`` by ``isinstance``; for any other model ``_save`` writes the
    full ``state_dict()`` (base weights included) and resuming reads it back. A callback cannot change that
    (``save_model`` runs none), so these three overrides are needed. Models that are not peftkit models go
    through ``Trainer``'s own code unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        peft_model = unwrap_model(self.model)
        if isinstance(peft_model, PeftModel):
            # Trainer reads the label names off ``type(model).forward``; PeftModel's class-level forward takes
            # ``**kwargs``, so without this evaluation would find no labels and report no eval_loss.
            base = type(peft_model.get_base_model())
            if self.args.label_names is None:
                self.label_names = find_labels(base)
            self.can_return_loss = can_return_loss(base)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = unwrap_model(self.model)
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        # ``state_dict`` is a full one Trainer gathered under FSDP (FULL_STATE_DICT) or DeepSpeed ZeRO-3.
        model.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        peft_model = unwrap_model(model if model is not None else self.model)
        if isinstance(peft_model, PeftModel) and _has_adapter_files(resume_from_checkpoint):
            load_adapter_checkpoint(peft_model, resume_from_checkpoint)
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        peft_model = unwrap_model(self.model)
        best = self.state.best_model_checkpoint
        engine_managed = getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False)
        if isinstance(peft_model, PeftModel) and not engine_managed and _has_adapter_files(best):
            load_adapter_checkpoint(peft_model, best)
            return None
        return super()._load_best_model()


class PeftTrainer(PeftTrainerMixin, Trainer):
    """transformers ``Trainer`` that saves, resumes and reloads the best checkpoint of a peftkit model as adapter
    files only (see :class:`PeftTrainerMixin`); otherwise exactly ``Trainer``."""
