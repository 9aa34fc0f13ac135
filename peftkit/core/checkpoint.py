"""Delta-only checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors`` in HF peft's layout.

Keys are ``base_model.model.<module path>.<adapter tensor>`` with the adapter name stripped, exactly as HF
peft writes them, so checkpoints move between the two libraries unchanged. Nothing is ever unpickled: a legacy
``adapter_model.bin`` is read with ``torch.load(weights_only=True)``.

The two files of one adapter are one checkpoint, and a reader must never pair the config of one save with the
weights of another. ``write_adapter_files`` therefore, holding an exclusive ``flock`` on the adapter directory (so
that concurrent writers, threads or processes, take turns):

1. finishes an earlier save that was killed between its two renames (step 5), or drops its leftovers;
2. writes ``.adapter_model.safetensors.pending`` holding, in its metadata, the config text it belongs to and a
   SHA-256 of that text and every tensor;
3. writes ``.adapter_config.json.pending``; both are fsynced before anything is renamed;
4. renames the weights over ``adapter_model.safetensors``;
5. renames the config over ``adapter_config.json``, and fsyncs the directory.

A process killed anywhere leaves the old pair, or the new weights beside the old config *and* the pending config
whose text the weights name: readers (under a shared lock, so they never see a live writer half-way) then take that
pending config, so every crash leaves either the previous checkpoint or the new one. The checksum turns a damaged
file (flipped bytes, a copy cut short) into a ``CheckpointError`` instead of silently different weights.
Checkpoints of other writers (HF peft) have neither entry and load as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from peftkit.core.config import CONFIG_NAME
from peftkit.core.errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: no flock; saves stay atomic per file, concurrent writers are not serialised
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "WEIGHTS_NAME",
    "LEGACY_WEIGHTS_NAME",
    "KEY_PREFIX",
    "CONFIG_METADATA_KEY",
    "DIGEST_METADATA_KEY",
    "atomic_write_bytes",
    "atomic_save_safetensors",
    "directory_lock",
    "tensor_digest",
    "write_adapter_files",
    "read_adapter_files",
    "read_adapter_weights",
    "interrupted_save_config",
    "check_against_model",
]

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
# safetensors metadata entries peftkit adds (HF peft reads only "format" and ignores them).
CONFIG_METADATA_KEY = "peftkit_config"
DIGEST_METADATA_KEY = "peftkit_sha256"


def _pending(path: str) -> str:
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".pending")


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, shared: bool = False) -> Iterator[int | None]:
    """Hold ``flock`` on ``directory`` (exclusive for writers, shared for readers); yields the directory's fd.

    ``flock`` belongs to the open file description, so two threads of one process exclude each other as two
    processes do, and the kernel drops the lock of a killed process. Where the directory cannot be opened or the
    file system has no ``flock`` (some network mounts), this yields without a lock rather than refuse the save.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield None
        return
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _write_synced(path: str, write: Callable[[str], None]) -> None:
    umask = os.umask(0)
    os.umask(umask)
    write(path)
    # A pending file a killed save left keeps its old mode; a checkpoint gets the usual umask-derived one.
    os.chmod(path, 0o666 & ~umask)
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_directory(fd: int | None) -> None:
    # The renames reach the disk only with the directory; without this a power cut could undo them.
    if fd is not None:
        with contextlib.suppress(OSError):
            os.fsync(fd)


def _unlink_quietly(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _replace_files(writes: dict[str, Callable[[str], None]]) -> None:
    """Write each file to its pending name, fsync all, then rename them in order; caller holds the lock."""
    pending = {path: _pending(path) for path in writes}
    try:
        for path, write in writes.items():
            _write_synced(pending[path], write)
    except BaseException:
        _unlink_quietly(*pending.values())
        raise
    for path, tmp in pending.items():
        os.replace(tmp, path)


def _bytes_writer(data: bytes) -> Callable[[str], None]:
    # Weights too are serialised in memory and written here: safetensors' own save_file goes through a random
    # temporary name of its own, which a killed process would leave behind, one per kill.
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return write


def _cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Clone so that tied or overlapping views never reach safetensors, which refuses shared storage.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def tensor_digest(tensors: dict[str, torch.Tensor], config_text: str = "") -> str:
    """SHA-256 over ``config_text`` and every tensor's name, dtype, shape and bytes, in name order (independent of
    how safetensors lays the file out)."""
    digest = hashlib.sha256(config_text.encode("utf-8"))
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, under the directory's lock (e.g. ``adapter_config.json`` alone)."""
    directory = os.path.dirname(os.path.abspath(path))
    with directory_lock(directory) as fd:
        _finish_interrupted_save(directory)
        _replace_files({path: _bytes_writer(data)})
        _fsync_directory(fd)


def atomic_save_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the safetensors file ``path`` atomically, under the directory's lock."""
    directory = os.path.dirname(os.path.abspath(path))
    cpu = _cpu_copies(tensors)
    with directory_lock(directory) as fd:
        _replace_files({path: _bytes_writer(safetensors_bytes(cpu, metadata={"format": "pt"}))})
        _fsync_directory(fd)


def write_adapter_files(directory: str, tensors: dict[str, torch.Tensor], config_json: str) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` of one adapter as a pair (see the module
    docstring for the protocol and what a reader sees at every point)."""
    os.makedirs(directory, exist_ok=True)
    cpu = _cpu_copies(tensors)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: config_json,
                DIGEST_METADATA_KEY: tensor_digest(cpu, config_json)}
    with directory_lock(directory) as fd:
        _finish_interrupted_save(directory)
        _replace_files({  # weights first: their metadata names the config that completes them
            os.path.join(directory, WEIGHTS_NAME): _bytes_writer(safetensors_bytes(cpu, metadata=metadata)),
            os.path.join(directory, CONFIG_NAME): _bytes_writer(config_json.encode("utf-8")),
        })
        _fsync_directory(fd)


def _saved_config_text(weights_path: str) -> str | None:
    """The config text a peftkit save stored in the weights file's metadata, or None (another writer, or a file
    that cannot be read: reading the weights reports that)."""
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as fh:
            return (fh.metadata() or {}).get(CONFIG_METADATA_KEY)
    except Exception:  # safetensors raises several types for bad headers; the full read reports them
        return None


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError):
        return None


def interrupted_save_config(directory: str) -> str | None:
    """The config text of a save killed between renaming its weights and its config, or None.

    Then ``adapter_model.safetensors`` is new, ``adapter_config.json`` still the previous save's, and the pending
    config beside them is the one the weights were saved with (their metadata holds its text).
    """
    pending = _read_text(_pending(os.path.join(directory, CONFIG_NAME)))
    if pending is None or pending == _read_text(os.path.join(directory, CONFIG_NAME)):
        return None
    return pending if pending == _saved_config_text(os.path.join(directory, WEIGHTS_NAME)) else None


def _finish_interrupted_save(directory: str) -> None:
    """Complete a save killed between its two renames, or drop a killed save's leftovers; caller holds the lock."""
    config_path = os.path.join(directory, CONFIG_NAME)
    if interrupted_save_config(directory) is not None:
        os.replace(_pending(config_path), config_path)
    _unlink_quietly(_pending(config_path), _pending(os.path.join(directory, WEIGHTS_NAME)))


def read_adapter_files(directory: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read the weights of one adapter directory onto the CPU, with the config text a peftkit save stored beside
    them (None for other writers' files).

    Raises:
        CheckpointError: no weights file, or the file is corrupt, truncated, or fails its stored checksum.
    """
    path = os.path.join(directory, WEIGHTS_NAME)
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(path):
        try:
            with safe_open(path, framework="pt", device="cpu") as fh:
                metadata = fh.metadata() or {}
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        except Exception as exc:  # safetensors raises several types for bad headers and short files
            raise CheckpointError(
                f"{path} cannot be read ({type(exc).__name__}: {exc}); the file is corrupt or truncated. "
                "Save the adapter again."
            ) from exc
        config_text = metadata.get(CONFIG_METADATA_KEY)
        stored = metadata.get(DIGEST_METADATA_KEY)
        if (config_text is None) != (stored is None) or stored is not None and stored != tensor_digest(
                tensors, config_text):
            raise CheckpointError(
                f"{path} fails the checksum stored in it when it was saved: its bytes changed since (a damaged disk "
                "or copy, or an edit of the file). Nothing was loaded; save the adapter again or restore a good copy."
            )
        return tensors, config_text
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
        return state, None
    raise CheckpointError(
        f"No {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}) in {directory!r}. Pass the directory written by "
        "save_pretrained."
    )


def read_adapter_weights(directory: str) -> dict[str, torch.Tensor]:
    """Read the weights file of one adapter directory onto the CPU (see :func:`read_adapter_files`)."""
    with directory_lock(directory, shared=True):
        return read_adapter_files(directory)[0]


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
