"""The Hugging Face Hub: where adapters come from and go to, through ``huggingface_hub`` only.

Loaders call :func:`resolve_adapter`, which turns a local directory or a Hub repo id into a local directory
holding ``adapter_config.json`` and the weights; they never learn where the files came from. Hub ids are fetched
with ``hf_hub_download`` into the standard cache (``HF_HUB_CACHE``, ``cache_dir=``), which also serves them
offline (``HF_HUB_OFFLINE=1``, ``local_files_only=True``). Uploads (:func:`upload_adapters`) send the adapter
files and a model card, never the base model.

``huggingface_hub`` is imported inside the functions that need it: ``import peftkit`` and plain local
directories never touch it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from peftkit.core.checkpoint import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from peftkit.core.config import CONFIG_NAME, PeftConfig
from peftkit.core.errors import CheckpointError, PeftConfigError

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

__all__ = [
    "HUB_KWARGS",
    "AdapterSource",
    "HubOptions",
    "hub_options",
    "is_repo_id",
    "optional_file",
    "refuse_kwargs",
    "resolve_adapter",
    "upload_adapters",
    "write_model_card",
]

logger = logging.getLogger(__name__)

HUB_KWARGS = ("revision", "subfolder", "token", "cache_dir", "force_download", "local_files_only")

# Arguments HF peft or transformers scripts pass that peftkit does not honour, with what to do instead.
_REFUSED = {
    "use_auth_token": "it was renamed; pass token= instead",
    "proxies": "huggingface_hub has no per-call proxies; set HTTPS_PROXY in the environment",
    "resume_download": "interrupted downloads always resume; drop it",
    "torch_device": "adapter weights go to the device of the layer they adapt; move the model with .to() instead",
    "use_safetensors": "adapter_model.safetensors is read, else a legacy adapter_model.bin (never unpickled); drop it",
    "ignore_mismatched_sizes": "a checkpoint whose shapes differ is refused with every mismatch listed; fix the "
                               "config instead",
    "max_shard_size": "an adapter file is never sharded; drop it",
    "safe_serialization": "peftkit writes safetensors only; drop it",
    "repo_type": "adapters live in model repos; drop it",
    "local_dir": "files go to the Hub cache (cache_dir=); copy the returned model with save_pretrained instead",
}

# A Hub repo id: ``name`` or ``namespace/name`` (huggingface_hub validates the details).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")

# transformers Auto class per task type, named in the model card's usage snippet.
_AUTO_CLASS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
               "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
               "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}
_PIPELINE_TAG = {"CAUSAL_LM": "text-generation", "SEQ_2_SEQ_LM": "text2text-generation",
                 "SEQ_CLS": "text-classification", "TOKEN_CLS": "token-classification",
                 "QUESTION_ANS": "question-answering", "FEATURE_EXTRACTION": "feature-extraction"}


@dataclasses.dataclass(frozen=True)
class HubOptions:
    """Where to find an adapter on the Hub; every field is ignored for a local directory except ``subfolder``.

    Args:
        revision: Branch, tag or commit (default ``"main"``).
        subfolder: Directory inside the repo or local directory (HF's layout puts adapter ``name`` in ``name/``).
        token: Hub token for private or gated repos (default: the one ``hf auth login`` stored).
        cache_dir: Hub cache to use instead of ``HF_HUB_CACHE``.
        force_download: Download again even if the files are cached.
        local_files_only: Use the cache only, as ``HF_HUB_OFFLINE=1`` does.
    """

    revision: str | None = None
    subfolder: str | None = None
    token: str | bool | None = None
    cache_dir: str | os.PathLike | None = None
    force_download: bool = False
    local_files_only: bool = False


class AdapterSource(NamedTuple):
    """A resolved adapter: the local ``directory`` with its files, and a ``label`` naming it for messages (quoted
    already: ``'/path'`` or ``'user/adapter' (revision 'main')``)."""

    directory: str
    label: str


def refuse_kwargs(where: str, kwargs: dict[str, object], accepted: tuple[str, ...] = HUB_KWARGS) -> None:
    """Raise ``TypeError`` for the first keyword argument that ``where`` does not honour, saying what to do."""
    for name in kwargs:
        reason = _REFUSED.get(name, f"it accepts {', '.join(accepted)}")
        raise TypeError(f"{where}() does not accept the keyword argument {name!r}: {reason}.")


def hub_options(where: str, kwargs: dict[str, object]) -> HubOptions:
    """The Hub arguments among ``kwargs``; any other argument is refused (:func:`refuse_kwargs`)."""
    refuse_kwargs(where, {k: v for k, v in kwargs.items() if k not in HUB_KWARGS})
    return HubOptions(**kwargs)


def is_repo_id(path: str) -> bool:
    """Whether ``path`` could name a Hub repo; a path that exists on disk never does."""
    return _REPO_ID.fullmatch(path) is not None and ".." not in path and not os.path.exists(path)


def resolve_adapter(model_id: str | os.PathLike, options: HubOptions, weights: bool = True) -> AdapterSource:
    """The local directory holding the adapter ``model_id`` (``adapter_config.json``, and with ``weights`` its
    weights file), downloading what the Hub cache lacks.

    A local directory is returned as it is (joined with ``subfolder``); a missing local path that cannot be a
    repo id is too, and the loader reports the missing files.

    Raises:
        PeftConfigError: the repo, the revision or ``adapter_config.json`` cannot be found, or the files are not
            cached while downloads are off. Names the id, the revision and what to do.
        CheckpointError: the repo has the config but neither weights file.
    """
    path = os.fspath(model_id)
    if not is_repo_id(path):
        if options.revision is not None and os.path.isdir(path):
            logger.warning("%r is a local directory; revision=%r is ignored.", path, options.revision)
        directory = os.path.join(path, options.subfolder or "")
        return AdapterSource(directory, repr(directory))
    config_path = _download(path, CONFIG_NAME, options, PeftConfigError)
    # Later files come from the commit the config came from, even if the branch moves in between.
    snapshot = Path(config_path).parents[len(Path(options.subfolder or "").parts)]
    if snapshot.parent.name == "snapshots" and _COMMIT.fullmatch(snapshot.name):
        pinned = dataclasses.replace(options, revision=snapshot.name)
    else:
        pinned = options
    label = _label(path, options) + (f" (commit {snapshot.name[:12]})" if pinned is not options else "")
    if weights:
        try:
            _download(path, WEIGHTS_NAME, pinned, CheckpointError, missing_ok=True)
        except _Missing:
            try:
                _download(path, LEGACY_WEIGHTS_NAME, pinned, CheckpointError, missing_ok=True)
            except _Missing as missing:
                raise CheckpointError(
                    f"{label} has {CONFIG_NAME} but neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}{missing}. "
                    "Upload the weights (push_to_hub), or check revision= and subfolder=."
                ) from None
    return AdapterSource(os.path.dirname(config_path), label)


def optional_file(model_id: str | os.PathLike, filename: str, options: HubOptions) -> str | None:
    """The local path of ``filename`` next to the adapter's config, or None if the adapter has none (or, with
    downloads off, the cache does not know)."""
    path = os.fspath(model_id)
    if not is_repo_id(path):
        found = os.path.join(path, options.subfolder or "", filename)
        return found if os.path.isfile(found) else None
    try:
        return _download(path, filename, options, PeftConfigError, missing_ok=True)
    except _Missing:
        return None


class _Missing(Exception):
    """A file the repo does not have; its message says where that was decided when it was the cache alone."""


def _label(repo_id: str, options: HubOptions) -> str:
    where = f"{repo_id!r} (revision {options.revision or 'main'!r}"
    return where + (f", subfolder {options.subfolder!r})" if options.subfolder else ")")


def _offline_reason(options: HubOptions) -> str | None:
    from huggingface_hub import constants

    if options.local_files_only:
        return "local_files_only=True"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    return None


def _download(repo_id: str, filename: str, options: HubOptions, error: type[Exception],
              missing_ok: bool = False) -> str:
    """``hf_hub_download`` with its errors turned into one peftkit ``error`` that says what to do.

    With ``missing_ok``, a file the repo lacks (or the cache lacks while offline) raises :class:`_Missing`.
    """
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise error(
            f"{repo_id!r} is not a local directory, and loading it from the Hub needs huggingface_hub: "
            "pip install 'peftkit[hub]'."
        ) from None
    from peftkit import __version__

    label = _label(repo_id, options)
    try:
        return huggingface_hub.hf_hub_download(
            repo_id, filename, subfolder=options.subfolder or None, revision=options.revision,
            token=options.token, cache_dir=options.cache_dir, force_download=options.force_download,
            local_files_only=options.local_files_only, library_name="peftkit", library_version=__version__,
        )
    except errors.HFValidationError as exc:
        message = (f"{repo_id!r} is neither a local directory nor a valid Hub repo id ('name' or 'namespace/name'): "
                   f"{exc}")
    except errors.GatedRepoError:
        message = (f"{label} is a gated repo. Accept its conditions on https://huggingface.co/{repo_id} and pass "
                   "token= (or log in with `hf auth login`).")
    except errors.RepositoryNotFoundError:
        message = (f"{repo_id!r} is not a local directory, and no Hub repo of that name is visible to you (it does "
                   "not exist, or it is private: pass token= or log in with `hf auth login`).")
    except errors.RevisionNotFoundError:
        message = (f"The Hub repo {repo_id!r} has no revision {options.revision!r} (branch, tag or commit). Check "
                   "the name, or leave revision= out for 'main'.")
    except errors.LocalEntryNotFoundError as exc:
        # hf_hub_download cannot tell "not on the Hub" from "not cached" without the network.
        why = _offline_reason(options) or f"the Hub could not be reached: {exc.__cause__ or exc}"
        cached = _repo_cached(repo_id, options)
        if missing_ok and cached:
            raise _Missing(f" in the cached snapshot (downloading is off: {why})") from None
        cache = options.cache_dir or huggingface_hub.constants.HF_HUB_CACHE
        if cached:
            message = (
                f"The cached snapshot of {label} in {os.fspath(cache)!r} has no {filename}, and downloading is off "
                f"({why}). Check subfolder= and revision=, or download the files with network access."
            )
        else:
            message = (
                f"Cannot find {filename} of {label} in the Hub cache {os.fspath(cache)!r}, and downloading is off "
                f"({why}). {repo_id!r} is not a local directory either. Download it once with network access "
                f"(`hf download {repo_id}" + (f" --revision {options.revision}" if options.revision else "")
                + "`), or pass the local directory save_pretrained wrote."
            )
    except errors.EntryNotFoundError:
        if missing_ok:
            raise _Missing("") from None
        hint = " (an adapter saved under another name than 'default' is in subfolder=<name>)" if (
            filename == CONFIG_NAME) else ""
        message = f"{label} has no {filename}{hint}. Is it a peft adapter repo?"
    except errors.HfHubHTTPError as exc:
        message = f"Downloading {filename} of {label} failed: {type(exc).__name__}: {exc}"
    raise error(message) from None


def _repo_cached(repo_id: str, options: HubOptions) -> bool:
    """Whether the cache holds the snapshot ``options.revision`` points at: then an absent file is absent."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = os.fspath(options.cache_dir or constants.HF_HUB_CACHE)
    folder = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    revision = options.revision or "main"
    if not _COMMIT.fullmatch(revision):
        ref = os.path.join(folder, "refs", revision)
        if not os.path.isfile(ref):
            return False
        with open(ref, encoding="utf-8") as fh:
            revision = fh.read().strip()
    return os.path.isdir(os.path.join(folder, "snapshots", revision))


# ---- uploads -------------------------------------------------------------------------------------------------
def upload_adapters(
    folder: str,
    configs: dict[str, PeftConfig],
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
) -> CommitInfo:
    """Create ``repo_id`` if needed and upload the adapters saved in ``folder`` with a model card.

    Only the files of the adapters in ``configs`` (HF's layout: "default" at the top, others in ``<name>/``) and
    ``README.md`` are uploaded, whatever else ``folder`` holds. A ``README.md`` already in ``folder`` (or, failing
    that, in the repo) keeps its text; its metadata gains the base model, the library and the tags.
    """
    from huggingface_hub import HfApi

    from peftkit import __version__

    api = HfApi(token=token, library_name="peftkit", library_version=__version__)
    repo_id = getattr(api.create_repo(repo_id, private=private, exist_ok=True), "repo_id", None) or repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    write_model_card(folder, configs, repo_id, revision=revision, token=token, tags=tags)
    patterns = ["README.md"]
    for name in configs:
        sub = "" if name == "default" else f"{name}/"
        patterns += [sub + CONFIG_NAME, sub + WEIGHTS_NAME]
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, allow_patterns=patterns, revision=revision, create_pr=create_pr,
        commit_message=commit_message or "Upload adapter (peftkit)", commit_description=commit_description,
    )


def write_model_card(folder: str, configs: dict[str, PeftConfig], repo_id: str, *, revision: str | None = None,
                     token: str | bool | None = None, tags: list[str] | None = None) -> None:
    """Write ``folder/README.md``: the existing card (the folder's, else the repo's) with updated metadata, or a
    new card naming the base model and the method of each adapter."""
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(folder, "README.md")
    existing = path if os.path.isfile(path) else _remote_card(repo_id, revision, token)
    card = ModelCard.load(existing) if existing else None
    first = next(iter(configs.values()))
    base = first.base_model_name_or_path
    on_hub = bool(base) and is_repo_id(base)
    task = str(first.task_type) if first.task_type is not None else None
    wanted = ["peftkit", *([f"base_model:adapter:{base}"] if on_hub else []),
              *dict.fromkeys(c.peft_type.lower() for c in configs.values()), *(tags or [])]
    if card is None:
        data = ModelCardData(library_name="peft", base_model=base if on_hub else None,
                             pipeline_tag=_PIPELINE_TAG.get(task or ""), tags=wanted)
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_card_body(configs, repo_id, base, task)}")
    else:
        data = card.data
        data.library_name = data.library_name or "peft"
        if on_hub:
            data.base_model = base
        if data.pipeline_tag is None and task in _PIPELINE_TAG:
            data.pipeline_tag = _PIPELINE_TAG[task]
        data.tags = list(dict.fromkeys([*(data.tags or []), *wanted]))
    card.save(path)


def _remote_card(repo_id: str, revision: str | None, token: str | bool | None) -> str | None:
    """The repo's README.md, downloaded, so that pushing a new version keeps the text its owner wrote."""
    from huggingface_hub import errors, hf_hub_download

    try:
        return hf_hub_download(repo_id, "README.md", revision=revision, token=token)
    except (errors.EntryNotFoundError, errors.HfHubHTTPError, errors.HFValidationError):
        return None  # a new repo, a new branch, or no network: a new card


def _card_body(configs: dict[str, PeftConfig], repo_id: str, base: str | None, task: str | None) -> str:
    from peftkit import __version__

    base_text = f"[`{base}`](https://huggingface.co/{base})" if base and is_repo_id(base) else (
        f"`{base}` (a local path)" if base else "an unnamed base model")
    rows = "\n".join(f"| `{name}` | {config.peft_type} | {str(config.task_type or '-')} | "
                     f"`{'./' if name == 'default' else name + '/'}` |" for name, config in configs.items())
    auto = _AUTO_CLASS.get(task or "", "AutoModel")
    load_base = f'{auto}.from_pretrained("{base}")' if base else f"{auto}.from_pretrained(...)"
    where = {name: "" if name == "default" else f', subfolder="{name}"' for name in configs}
    first, *others = configs
    load = f'model = PeftModel.from_pretrained(base, "{repo_id}"{where[first]}' + (
        ")" if first == "default" else f', adapter_name="{first}")')
    load += "".join(f'\nmodel.load_adapter("{repo_id}", "{name}"{where[name]})' for name in others)
    return f"""# {repo_id.rsplit('/', 1)[-1]}

Adapter weights for {base_text}, saved with peftkit in Hugging Face peft's format (`adapter_config.json` +
`adapter_model.safetensors`); the base model is not included.

| adapter | method | task | files |
|---|---|---|---|
{rows}

## Usage

```python
from transformers import {auto}
from peftkit import PeftModel  # or: from peft import PeftModel

base = {load_base}
{load}
```

## Framework versions

- peftkit {__version__}
"""
