"""Config base classes: validation, JSON round trip and Hugging Face peft compatibility.

A method's config is a ``@dataclass(kw_only=True)`` subclass of :class:`PeftConfig` registered with
:func:`peftkit.core.registry.register`. The JSON file is ``adapter_config.json`` with HF peft's
``peft_type`` key, so checkpoints written by either library are read by the other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftkit.core.errors import PeftConfigError

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"

TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# A neutral value meaning "ignored whatever it holds": settings of a feature that has its own on/off field.
ANY_VALUE = object()

# Keys HF peft writes for bookkeeping only; reading them changes nothing, so they are dropped quietly.
_HF_METADATA_KEYS = frozenset({"auto_mapping", "peft_version", "revision", "megatron_core"})


@dataclass(kw_only=True)
class PeftConfig:
    """Fields shared by every method.

    Args:
        task_type: One of ``TASK_TYPES`` or None. ``"SEQ_CLS"`` / ``"TOKEN_CLS"`` / ``"QUESTION_ANS"`` add the
            task head to ``modules_to_save`` of methods that support it.
        base_model_name_or_path: Recorded for the user's information; never used to fetch anything.
        inference_mode: When True the adapter's parameters are frozen after loading.
        modules_to_save: Modules (e.g. a classifier) that get a full trainable copy per adapter, saved in the
            checkpoint.

    Subclasses set ``hf_unsupported_fields``: fields HF peft writes for features peftkit does not implement,
    mapped to the value that means "feature off". On load they are ignored with a warning while they hold
    that value, and rejected otherwise, so a checkpoint is never silently run without a feature it needs.
    """

    peft_type: ClassVar[str] = ""
    hf_unsupported_fields: ClassVar[dict[str, Any]] = {}

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise PeftConfigError(
                f"{type(self).__name__}.task_type={self.task_type!r} is not known; use one of {list(TASK_TYPES)} "
                "or None."
            )

    # ---- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict including ``peft_type``."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build the config of the method named by ``data["peft_type"]`` (or ``cls`` itself).

        Raises:
            PeftConfigError: unknown ``peft_type``, unknown fields (listing the valid ones), or an HF-only
                feature that is switched on.
        """
        from peftkit.core.registry import config_class_for, registered_peft_types

        data = dict(data)
        peft_type = data.pop("peft_type", None)
        target_cls: type[PeftConfig] = cls
        if peft_type is not None:
            target_cls = config_class_for(str(peft_type))
            if cls is not PeftConfig and not issubclass(target_cls, cls):
                raise PeftConfigError(
                    f"The config has peft_type={peft_type!r} but {cls.__name__} was asked for; "
                    f"load it with PeftConfig.from_pretrained or {target_cls.__name__}."
                )
        elif cls is PeftConfig:
            raise PeftConfigError(f"The config has no 'peft_type' field; add one of {registered_peft_types()}.")
        return target_cls._from_fields(data)

    @classmethod
    def _from_fields(cls, data: dict[str, Any]) -> PeftConfig:
        valid = {f.name for f in dataclasses.fields(cls)}
        ignored, enabled_unsupported, unknown = [], [], []
        for key in list(data):
            if key in valid:
                continue
            value = data.pop(key)
            if key in _HF_METADATA_KEYS:
                continue
            if key in cls.hf_unsupported_fields:
                neutral = cls.hf_unsupported_fields[key]
                off = (None, {}, [], False)
                if neutral is ANY_VALUE or value == neutral or (value in off and neutral in off):
                    ignored.append(key)
                else:
                    enabled_unsupported.append(f"{key}={value!r}")
            else:
                unknown.append(key)
        if unknown:
            raise PeftConfigError(
                f"Unknown field(s) {sorted(unknown)} for {cls.__name__}. Valid fields: {sorted(valid)}. "
                "Remove or rename them."
            )
        if enabled_unsupported:
            raise PeftConfigError(
                f"This {cls.__name__} checkpoint uses features peftkit does not implement: "
                f"{', '.join(enabled_unsupported)}. Loading it without them would give wrong outputs."
            )
        if ignored:
            logger.warning("Ignoring Hugging Face peft field(s) that are switched off: %s", ", ".join(sorted(ignored)))
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` atomically into ``save_directory``."""
        from peftkit.core.checkpoint import atomic_write_bytes

        os.makedirs(save_directory, exist_ok=True)
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), self.to_json_string().encode("utf-8"))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, subfolder: str | None = None) -> PeftConfig:
        """Read ``adapter_config.json`` from a local directory.

        Raises:
            PeftConfigError: the file is missing or is not valid JSON, or the fields do not fit.
        """
        path = os.path.join(directory, subfolder or "", CONFIG_NAME)
        if not os.path.isfile(path):
            raise PeftConfigError(
                f"No {CONFIG_NAME} in {os.path.dirname(path)!r}. Pass the directory written by save_pretrained."
            )
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PeftConfigError(f"{path} is not valid JSON ({exc}); the file is corrupt or truncated.") from exc
        if not isinstance(data, dict):
            raise PeftConfigError(f"{path} must hold a JSON object, found {type(data).__name__}.")
        return cls.from_dict(data)


@dataclass(kw_only=True)
class TunerConfig(PeftConfig):
    """Fields of methods that wrap named modules of the base model.

    Args:
        target_modules: Which modules to wrap. A list matches a module whose full name equals an entry or ends
            with ``"." + entry``; a string is a regular expression that must match the full name;
            ``"all-linear"`` picks every linear layer except the output head. None: the method's default for
            the architecture.
        exclude_modules: Same forms as ``target_modules``; matching modules are never wrapped.
        layers_to_transform: Only wrap modules inside these layer indices.
        layers_pattern: Name of the layer list (``"layers"``, ``"h"``, ...) used to read the layer index;
            guessed from common names when None.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise PeftConfigError(f"{name} must be a list of names, a regex string or None, got {value!r}.")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise PeftConfigError("layers_pattern only has an effect with layers_to_transform; set both or neither.")


def config_field(default: Any = None) -> Any:
    """A dataclass field with a fresh copy of a mutable default."""
    return field(default_factory=lambda: type(default)(default)) if isinstance(default, (dict, list)) else default
