"""Delta-only checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors`` in HF peft's layout.

Keys are ``base_model.model.<module path>.<adapter tensor>`` with the adapter name stripped, exactly as HF
peft writes them, so checkpoints move between the two libraries unchanged. Files are written to a temporary
name in the same directory and renamed, so a crash never leaves a half-written file where a good one was.
Nothing is ever unpickled: a legacy ``adapter_model.bin`` is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file

from peftkit.core.config import CONFIG_NAME
from peftkit.core.errors import CheckpointError

__all__ = [
    "WEIGHTS_NAME",
    "LEGACY_WEIGHTS_NAME",
    "KEY_PREFIX",
    "atomic_write_bytes",
    "atomic_save_safetensors",
    "write_adapter_files",
    "read_adapter_weights",
    "check_against_model",
]

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


def _atomic_write(writes: dict[str, Callable[[str], None]]) -> None:
    """Write every file to a temporary name beside it, fsync, then rename them all.

    The slow part (writing) happens before any rename, so a failure there leaves the old files, as a pair,
    untouched; only the renames, which are atomic each, come after.
    """
    umask = os.umask(0)
    os.umask(umask)
    temps: dict[str, str] = {}
    try:
        for path, write in writes.items():
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path),
                                       dir=os.path.dirname(os.path.abspath(path)))
            os.close(fd)
            temps[path] = tmp
            write(tmp)
            # mkstemp (and safetensors) create files 0600; a checkpoint should get the usual umask-derived mode.
            os.chmod(tmp, 0o666 & ~umask)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def _bytes_writer(data: bytes) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return write


def _safetensors_writer(tensors: dict[str, torch.Tensor]) -> Callable[[str], None]:
    # Clone so that tied or overlapping views never reach safetensors, which refuses shared storage.
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"})


def atomic_write_bytes(path: str, data: bytes) -> None:
    _atomic_write({path: _bytes_writer(data)})


def atomic_save_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    _atomic_write({path: _safetensors_writer(tensors)})


def write_adapter_files(directory: str, tensors: dict[str, torch.Tensor], config_json: str) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` of one adapter as a pair."""
    os.makedirs(directory, exist_ok=True)
    _atomic_write({
        os.path.join(directory, WEIGHTS_NAME): _safetensors_writer(tensors),
        os.path.join(directory, CONFIG_NAME): _bytes_writer(config_json.encode("utf-8")),
    })


def read_adapter_weights(directory: str) -> dict[str, torch.Tensor]:
    """Read the weights file of one adapter directory onto the CPU.

    Raises:
        CheckpointError: no weights file, or the file is corrupt or truncated.
    """
    path = os.path.join(directory, WEIGHTS_NAME)
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(path):
        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises several types for bad headers and short files
            raise CheckpointError(
                f"{path} cannot be read ({type(exc).__name__}: {exc}); the file is corrupt or truncated. "
                "Save the adapter again."
            ) from exc
    if os.path.isfile(legacy):
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{legacy} cannot be read safely ({type(exc).__name__}: {exc}). peftkit never unpickles "
                "arbitrary objects; convert it to safetensors with the library that wrote it."
            ) from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{legacy} does not hold a flat dict of tensors.")
        return state
    raise CheckpointError(
        f"No {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}) in {directory!r}. Pass the directory written by "
        "save_pretrained."
    )


def check_against_model(
    checkpoint: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str
) -> list[str]:
    """Every way ``checkpoint`` does not fit the model's ``expected`` tensors, one line each."""
    problems: list[str] = []
    missing = sorted(set(expected) - set(checkpoint))
    unexpected = sorted(set(checkpoint) - set(expected))
    if missing:
        problems.append(f"{len(missing)} adapter tensor(s) the model expects are missing from {where}: "
                        f"{_show(missing)}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) in {where} match no adapter tensor of the model (another model or "
            f"other target_modules?): {_show(unexpected)}"
        )
    for key in sorted(set(expected) & set(checkpoint)):
        want, got = tuple(expected[key].shape), tuple(checkpoint[key].shape)
        if want != got:
            problems.append(f"shape of {key}: checkpoint {got}, model {want}")
        elif not checkpoint[key].is_floating_point() and expected[key].is_floating_point():
            problems.append(f"dtype of {key}: checkpoint {checkpoint[key].dtype}, model {expected[key].dtype}")
    return problems


def _show(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
