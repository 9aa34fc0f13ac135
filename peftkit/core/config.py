"""Config base classes: validation, JSON round trip and Hugging Face peft compatibility.

A method's config is a ``@dataclass(kw_only=True)`` subclass of :class:`PeftConfig` registered with
:func:`peftkit.core.registry.register`. The JSON file is ``adapter_config.json`` with HF peft's
``peft_type`` key, so checkpoints written by either library are read by the other.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import json
import logging
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftkit.core.errors import PeftConfigError

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"



class TaskType(str, enum.Enum):
    """HF peft's task types. A member equals its string, so ``task_type="CAUSAL_LM"`` keeps working."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


TASK_TYPES = tuple(t.value for t in TaskType)

# A neutral value meaning "ignored whatever it holds": settings of a feature that has its own on/off field.
ANY_VALUE = object()

# Keys HF peft writes for bookkeeping only; reading them changes nothing, so they are dropped quietly.
_HF_METADATA_KEYS = frozenset({"auto_mapping", "peft_version", "megatron_core"})

# Values a field peftkit does not know may hold and still change nothing: "unset" in every peft release so far.
_NEUTRAL_VALUES = (None, False, {}, [], "")


def _is_neutral(value: Any) -> bool:
    return any(value == neutral and type(value) is type(neutral) for neutral in _NEUTRAL_VALUES)


@dataclass(kw_only=True)
class PeftConfig:
    """Fields shared by every method.

    Args:
        task_type: One of ``TASK_TYPES`` or None. ``"SEQ_CLS"`` / ``"TOKEN_CLS"`` / ``"QUESTION_ANS"`` add the
            task head to ``modules_to_save`` of methods that support it.
        base_model_name_or_path: The base model the adapter was trained on (a local path or a Hub id);
            ``AutoPeftModel*.from_pretrained`` loads it.
        revision: The base model's revision on the Hub (HF peft's field), used with ``base_model_name_or_path``.
        inference_mode: When True the adapter's parameters are frozen after loading.
        modules_to_save: Modules (e.g. a classifier) that get a full trainable copy per adapter, saved in the
            checkpoint.

    Subclasses set ``hf_unsupported_fields``: fields HF peft writes for features peftkit does not implement,
    mapped to the value that means "feature off". On load they are ignored (silently: every HF checkpoint has
    them) while they hold that value, and rejected otherwise, so a checkpoint is never silently run without a
    feature it needs. A field no table knows (a newer peft's) is ignored with one short warning when its value is
    unset (None, False, empty) and rejected otherwise.
    """

    peft_type: ClassVar[str] = ""
    hf_unsupported_fields: ClassVar[dict[str, Any]] = {}

    task_type: TaskType | str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    modules_to_save: list[str] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None:
            cls.__post_init__ = _types_checked_first(own)

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if self.task_type is not None:
            if self.task_type not in TASK_TYPES:
                raise PeftConfigError(
                    f"{type(self).__name__}.task_type={self.task_type!r} is not known; use one of "
                    f"{list(TASK_TYPES)} (peftkit.TaskType) or None."
                )
            self.task_type = TaskType(self.task_type)

    @property
    def is_prompt_learning(self) -> bool:
        """HF peft's flag: True for methods that add virtual tokens or key/value prefixes instead of wrapping
        modules (they have no ``target_modules``)."""
        return not isinstance(self, TunerConfig)

    # ---- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict including ``peft_type``."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            elif isinstance(value, enum.Enum):
                value = value.value
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
        switched_off, enabled_unsupported, unknown_unset, unknown_set = [], [], [], []
        for key in list(data):
            if key in valid:
                continue
            value = data.pop(key)
            if key in _HF_METADATA_KEYS:
                continue
            if key in cls.hf_unsupported_fields:
                neutral = cls.hf_unsupported_fields[key]
                if neutral is ANY_VALUE or value == neutral or (_is_neutral(value) and _is_neutral(neutral)):
                    switched_off.append(key)
                else:
                    enabled_unsupported.append(f"{key}={value!r}")
            elif _is_neutral(value):
                unknown_unset.append(key)
            else:
                unknown_set.append(f"{key}={value!r}")
        if enabled_unsupported:
            raise PeftConfigError(
                f"This {cls.__name__} checkpoint uses features peftkit does not implement: "
                f"{', '.join(enabled_unsupported)}. Loading it without them would give wrong outputs."
            )
        if unknown_set:
            close = {k.split("=")[0]: difflib.get_close_matches(k.split("=")[0], valid, n=2) for k in unknown_set}
            hints = "; ".join(f"{k!r} (did you mean {v}?)" for k, v in close.items() if v)
            raise PeftConfigError(
                f"Unknown field(s) for {cls.__name__} set to a value: {', '.join(unknown_set)}. peftkit cannot tell "
                "what they would change, so it refuses rather than compute something else. "
                f"{hints + '. ' if hints else ''}"
                f"Valid fields: {sorted(valid)}. Remove or rename them."
            )
        if switched_off:  # every HF checkpoint carries these; debug level keeps an ordinary load quiet
            logger.debug("Ignoring Hugging Face peft field(s) that are switched off: %s",
                         ", ".join(sorted(switched_off)))
        if unknown_unset:
            logger.warning("%s: ignoring unset field(s) peftkit does not know: %s", cls.__name__,
                           ", ".join(sorted(unknown_unset)))
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` atomically into ``save_directory``."""
        from peftkit.core.checkpoint import atomic_write_bytes

        os.makedirs(save_directory, exist_ok=True)
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), self.to_json_string().encode("utf-8"))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: object
    ) -> PeftConfig:
        """Read ``adapter_config.json`` from a local directory or a Hub repo.

        Args:
            pretrained_model_name_or_path: The directory ``save_pretrained`` wrote, or a Hub repo id.
            subfolder: The directory inside it (HF's layout puts adapter ``name`` in ``name/``).
            **kwargs: Hub arguments: ``revision``, ``token``, ``cache_dir``, ``force_download``,
                ``local_files_only`` (:class:`peftkit.integrations.hub.HubOptions`).

        Raises:
            PeftConfigError: the file is missing (locally, or on the Hub and in its cache) or is not valid JSON,
                or the fields do not fit.
            TypeError: a keyword argument that is not a Hub argument (config fields cannot be overridden here).
        """
        from peftkit.integrations import hub

        options = hub.hub_options(f"{cls.__name__}.from_pretrained", {**kwargs, "subfolder": subfolder})
        directory = hub.resolve_adapter(pretrained_model_name_or_path, options, weights=False).directory
        path = os.path.join(directory, CONFIG_NAME)
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


def _types_checked_first(post_init: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(post_init)
    def checked(self: PeftConfig) -> None:
        # Validation compares and iterates field values; a value of the wrong type (a string where a number belongs,
        # JSON's null for a dict) would otherwise escape it as a bare TypeError that names no field.
        check_field_types(self)
        post_init(self)

    return checked


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation importable only by type checkers: those fields go unchecked
        return {}
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the annotated type; a bool is no number, and a float field holds a finite one."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, int) or isinstance(value, float) and math.isfinite(value)
    if origin is list:  # tuples and sets too: configs turn them into lists
        item = (typing.get_args(hint) or (Any,))[0]
        return isinstance(value, (list, tuple, set, frozenset)) and all(_fits(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_fits(k, key) and _fits(v, item) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a form this check does not know: the config's own validation decides


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_describe(arg) for arg in typing.get_args(hint))
    if hint is float:
        return "float (finite)"
    if hint is type(None):
        return "None"
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)


def check_field_types(config: PeftConfig) -> None:
    """Raise ``PeftConfigError`` naming the first field whose value does not have its annotated type.

    ``PeftConfig`` runs this before every config class's own ``__post_init__``, so validation code may compare and
    iterate values without guarding their types.
    """
    for name, hint in _field_types(type(config)).items():
        value = getattr(config, name)
        if not _fits(value, hint):
            raise PeftConfigError(
                f"{type(config).__name__}.{name} must be {_describe(hint)}, got {value!r} ({type(value).__name__})."
            )


def check_regex(field_name: str, pattern: str) -> None:
    """Raise ``PeftConfigError`` naming ``field_name`` when ``pattern`` is no regular expression; matching modules
    against it later would raise a bare ``re.error`` from inside the walker."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise PeftConfigError(f"{field_name}={pattern!r} is not a valid regular expression ({exc}).") from None


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
            elif isinstance(value, str):
                check_regex(f"{type(self).__name__}.{name}", value)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise PeftConfigError("layers_pattern only has an effect with layers_to_transform; set both or neither.")


def config_field(default: Any = None) -> Any:
    """A dataclass field with a fresh copy of a mutable default."""
    return field(default_factory=lambda: type(default)(default)) if isinstance(default, (dict, list)) else default
