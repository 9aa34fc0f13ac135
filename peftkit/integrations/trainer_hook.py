"""Installs peftkit's ``Trainer`` support (``peftkit.integrations.trainer``) once a ``PeftModel`` exists and
``transformers.trainer`` is imported, in whichever order the two happen, without importing the Trainer itself
(that takes over a second, and most ``PeftModel`` users never train with it).

``PeftModel.__init__`` calls :func:`arm`. If ``transformers.trainer`` is loaded already, the support is installed
now; otherwise a one-shot import hook installs it right after ``transformers.trainer`` finishes executing, so that
no ``Trainer`` can be built around a peftkit model without it (the stock ``Trainer`` would write the full model).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any

__all__ = ["arm"]

_TRAINER_MODULE = "transformers.trainer"
_armed = False


def _install() -> None:
    try:
        importlib.import_module("peftkit.integrations.trainer")  # installs on import
    except Exception as exc:  # the user's own import of transformers.trainer must not fail because of peftkit
        warnings.warn(f"peftkit could not install its transformers Trainer support ({exc!r}); checkpoints of peftkit "
                      "models may hold the full model. Use peftkit.integrations.trainer.PeftTrainer.", stacklevel=2)


class _InstallAfterExec(importlib.abc.Loader):
    """The real loader of ``transformers.trainer``, plus an install once the module has executed."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        _install()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ...: tracebacks and inspect use them
        return getattr(self._loader, name)


class _TrainerImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TRAINER_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot; the finders after it locate the real module
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _InstallAfterExec(spec.loader)
        return spec


def arm() -> None:
    """Install the Trainer support now if ``transformers.trainer`` is loaded, else when it gets imported."""
    global _armed
    if _armed:
        return
    _armed = True
    if _TRAINER_MODULE in sys.modules:
        _install()
    else:
        sys.meta_path.insert(0, _TrainerImportHook())
