"""HF peft's ``AutoPeftModel*`` classes: one call loads the base model an adapter names, then the adapter.

    model = AutoPeftModelForCausalLM.from_pretrained("user/adapter")     # a Hub id or a local directory

reads ``adapter_config.json``, loads ``base_model_name_or_path`` (a local path or a Hub id, at the config's
``revision``) with the transformers Auto class of the task, and then the adapter with
``PeftModel.from_pretrained``. The result is the ``PeftModelFor*`` class of the task, as in HF peft.
"""

from __future__ import annotations

import os
from typing import ClassVar

from peftkit.core.config import PeftConfig, TaskType
from peftkit.core.errors import PeftConfigError
from peftkit.core.model import PeftModel
from peftkit.core.task_models import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peftkit.integrations import hub

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
]

# The transformers Auto class that loads a base model with the head a task needs.
_BASE_AUTO_CLASS = {
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
    TaskType.QUESTION_ANS: "AutoModelForQuestionAnswering",
    TaskType.FEATURE_EXTRACTION: "AutoModel",
}
# Arguments of PeftModel.from_pretrained itself; every other keyword goes to the base model's from_pretrained.
_PEFT_KWARGS = ("autocast_adapter_dtype", "ephemeral_gpu_offload", "key_mapping")
# Hub arguments that apply to the base model as well as to the adapter (the same account and cache).
_SHARED_HUB_KWARGS = ("token", "cache_dir", "force_download", "local_files_only")


class AutoPeftModel:
    """Loads an adapter together with its base model; ``AutoPeftModelFor<Task>`` are the task-specific forms.

    ``AutoPeftModel`` itself loads the base with the Auto class of the config's ``task_type`` (``AutoModel``
    when it has none). A class for one task refuses an adapter saved for another, as in HF peft.
    """

    task_type: ClassVar[TaskType | None] = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(f"Use {type(self).__name__}.from_pretrained(adapter_id); the class is not instantiated.")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        **kwargs: object,
    ) -> PeftModel:
        """Load the base model named in the adapter's config, then the adapter.

        If the adapter directory or repo holds a tokenizer with more tokens than the base model's embeddings (tokens
        were added in training), the embeddings are resized to it first, as in HF peft; a larger, padded embedding
        is left as it is.

        Args:
            pretrained_model_name_or_path: The adapter: a directory ``save_pretrained`` wrote, or a Hub repo id.
            adapter_name, is_trainable, config: As in ``PeftModel.from_pretrained``.
            revision: The adapter's revision on the Hub; the base model is loaded at the revision its config
                records (``revision`` in ``adapter_config.json``).
            **kwargs: ``subfolder`` (the adapter's); ``token``, ``cache_dir``, ``force_download`` and
                ``local_files_only`` (for both); ``autocast_adapter_dtype`` and ``key_mapping`` (for the adapter);
                everything else (``dtype``, ``device_map``, ``quantization_config``, ``trust_remote_code``, ...)
                goes to the transformers Auto class that loads the base model.

        Raises:
            PeftConfigError: the adapter cannot be found, it was saved for another task than this class serves,
                or its config names no base model that can be found here.
        """
        import transformers

        hub_kwargs = {k: kwargs.pop(k) for k in [*_SHARED_HUB_KWARGS, "subfolder"] if k in kwargs}
        peft_kwargs = {k: kwargs.pop(k) for k in _PEFT_KWARGS if k in kwargs}
        options = hub.HubOptions(revision=revision, **hub_kwargs)
        source = hub.resolve_adapter(pretrained_model_name_or_path, options, weights=False)
        saved = PeftConfig.from_pretrained(source.directory)
        task = cls._task_for(saved, source.label)
        base_path = cls._base_path(saved, source.label)

        shared = {k: v for k, v in hub_kwargs.items() if k in _SHARED_HUB_KWARGS}
        auto_class = getattr(transformers, _BASE_AUTO_CLASS.get(task, "AutoModel"))
        base = auto_class.from_pretrained(base_path, revision=getattr(saved, "revision", None), **shared, **kwargs)
        tokenizer_file = hub.optional_file(pretrained_model_name_or_path, "tokenizer_config.json", options)
        if tokenizer_file is not None:
            # From the directory the config came from: on the Hub that is the same commit.
            local = not hub.is_repo_id(os.fspath(pretrained_model_name_or_path))
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                source.directory if local else os.fspath(pretrained_model_name_or_path),
                **({} if local else {"revision": revision, "subfolder": options.subfolder, **shared}),
                trust_remote_code=bool(kwargs.get("trust_remote_code", False)),
            )
            embeddings = base.get_input_embeddings()
            if embeddings is not None and len(tokenizer) > embeddings.weight.shape[0]:
                base.resize_token_embeddings(len(tokenizer))

        peft_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task, PeftModel) if task is not None else PeftModel
        return peft_class.from_pretrained(
            base, pretrained_model_name_or_path, adapter_name=adapter_name, is_trainable=is_trainable, config=config,
            revision=revision, **hub_kwargs, **peft_kwargs,
        )

    @classmethod
    def _task_for(cls, saved: PeftConfig, label: str) -> TaskType | None:
        saved_task = TaskType(saved.task_type) if saved.task_type is not None else None
        if cls.task_type is not None and saved_task is not None and saved_task is not cls.task_type:
            right = next((c.__name__ for c in _TASK_CLASSES if c.task_type is saved_task), "AutoPeftModel")
            raise PeftConfigError(
                f"{label} is a {saved_task.value} adapter (task_type in its adapter_config.json), but {cls.__name__} "
                f"loads {cls.task_type.value} models. Use {right}, or AutoPeftModel, which follows the config."
            )
        return cls.task_type or saved_task

    @staticmethod
    def _base_path(saved: PeftConfig, label: str) -> str:
        base_path = saved.base_model_name_or_path
        if not base_path:
            raise PeftConfigError(
                f"The adapter_config.json of {label} names no base model (base_model_name_or_path). Load the base "
                "yourself and call PeftModel.from_pretrained(base, adapter_id)."
            )
        if not os.path.isdir(base_path) and not hub.is_repo_id(base_path):
            raise PeftConfigError(
                f"The base model of {label}, {base_path!r} (base_model_name_or_path in its adapter_config.json), is "
                "a path that does not exist on this machine. Load the base yourself and call "
                "PeftModel.from_pretrained(base, adapter_id)."
            )
        return base_path


class AutoPeftModelForCausalLM(AutoPeftModel):
    """``AutoPeftModel`` for ``task_type="CAUSAL_LM"`` (base: ``AutoModelForCausalLM``)."""

    task_type = TaskType.CAUSAL_LM


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    """``AutoPeftModel`` for ``task_type="SEQ_2_SEQ_LM"`` (base: ``AutoModelForSeq2SeqLM``)."""

    task_type = TaskType.SEQ_2_SEQ_LM


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    """``AutoPeftModel`` for ``task_type="SEQ_CLS"`` (base: ``AutoModelForSequenceClassification``)."""

    task_type = TaskType.SEQ_CLS


class AutoPeftModelForTokenClassification(AutoPeftModel):
    """``AutoPeftModel`` for ``task_type="TOKEN_CLS"`` (base: ``AutoModelForTokenClassification``)."""

    task_type = TaskType.TOKEN_CLS


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    """``AutoPeftModel`` for ``task_type="QUESTION_ANS"`` (base: ``AutoModelForQuestionAnswering``)."""

    task_type = TaskType.QUESTION_ANS


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    """``AutoPeftModel`` for ``task_type="FEATURE_EXTRACTION"`` (base: ``AutoModel``)."""

    task_type = TaskType.FEATURE_EXTRACTION


_TASK_CLASSES = (AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM, AutoPeftModelForSequenceClassification,
                 AutoPeftModelForTokenClassification, AutoPeftModelForQuestionAnswering,
                 AutoPeftModelForFeatureExtraction)
