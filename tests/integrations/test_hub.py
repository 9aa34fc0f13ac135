"""Loading from and pushing to the Hugging Face Hub, offline.

A Hub cache is laid out as huggingface_hub lays it out (``models--user--adapter/refs/<branch>``,
``snapshots/<commit>/...``, ``blobs/`` with symlinks for one repo, plain files for the other) with two revisions
holding different adapters, and ``HF_HUB_OFFLINE`` is on: every Hub load is served by that cache through
``huggingface_hub`` itself. Uploads are checked at the ``HfApi`` boundary: its methods are replaced by recorders
that copy the uploaded files somewhere a test can reload them from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from conftest import VOCAB, make_inputs, make_model, model_logits
from huggingface_hub import constants, errors
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file

from peftkit import CheckpointError, LoraConfig, PeftConfig, PeftConfigError, PeftModel, get_peft_model
from peftkit.auto import AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
from peftkit.core.task_models import PeftModelForCausalLM, PeftModelForSequenceClassification

ROOT = Path(__file__).resolve().parents[2]


def _commit(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def _put(cache: Path, repo_id: str, source: Path, commit: str, refs: list[str], blobs: bool = True) -> None:
    """Store ``source``'s files as revision ``commit`` of ``repo_id``, with branches/tags ``refs`` pointing at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        target = repo / "snapshots" / commit / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        if blobs:  # huggingface_hub's layout: content-addressed blobs, relative symlinks from the snapshot
            blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, blob)
            target.symlink_to(os.path.relpath(blob, target.parent))
        else:
            shutil.copyfile(path, target)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline: huggingface_hub reads the file as it is


def _lora(kind: str, seed: int, **kw) -> PeftModel:
    base = make_model(kind)  # seeds the RNG itself: seed the adapter's initialisation after it
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> SimpleNamespace:
    """Local adapter directories, and a Hub cache holding them: ``user/adapter`` at main (A, with a second adapter
    in ``other/``) and at ``v2`` (B); ``user/base`` (the GPT-2 base); two adapters whose base is a local dir."""
    root = tmp_path_factory.mktemp("hub")
    gpt2_base, bert_base = root / "gpt2-base", root / "bert-base"
    make_model("gpt2").save_pretrained(gpt2_base)
    make_model("bert").save_pretrained(bert_base)
    a = _lora("gpt2", 1, target_modules=["c_attn"], task_type="CAUSAL_LM", base_model_name_or_path="user/base")
    a.add_adapter("other", LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False))
    a.save_pretrained(root / "a")
    _lora("gpt2", 2, target_modules=["c_attn"], task_type="CAUSAL_LM",
          base_model_name_or_path="user/base").save_pretrained(root / "b")
    _lora("gpt2", 3, target_modules=["c_attn"], task_type="CAUSAL_LM",
          base_model_name_or_path=str(gpt2_base)).save_pretrained(root / "local-base")
    _lora("bert", 4, target_modules=["query", "value"], task_type="SEQ_CLS",
          base_model_name_or_path=str(bert_base)).save_pretrained(root / "cls")
    cache = root / "cache"
    _put(cache, "user/adapter", root / "a", _commit("a"), ["main"])
    _put(cache, "user/adapter", root / "b", _commit("b"), ["v2"])
    _put(cache, "user/base", gpt2_base, _commit("base"), ["main"], blobs=False)
    _put(cache, "user/local-base", root / "local-base", _commit("local-base"), ["main"])
    _put(cache, "user/cls", root / "cls", _commit("cls"), ["main"])
    return SimpleNamespace(root=root, cache=cache, a=root / "a", b=root / "b", local_base=root / "local-base",
                           cls=root / "cls", gpt2_base=gpt2_base)


@pytest.fixture
def offline(store, monkeypatch) -> Path:
    """huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, at import: patch what it read."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(store.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return store.cache


def _logits(model, kind: str = "gpt2") -> torch.Tensor:
    return model_logits(model, {k: v for k, v in make_inputs(kind).items() if k != "labels"})


def _local(directory: Path, kind: str = "gpt2", **kw) -> torch.Tensor:
    return _logits(PeftModel.from_pretrained(make_model(kind), directory, **kw), kind)


# ---- loading by Hub id ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("revision, expected", [(None, "a"), ("main", "a"), ("v2", "b"), (_commit("b"), "b")])
def test_from_pretrained_hub_id_loads_the_revision_asked_for(store, offline, revision, expected) -> None:
    kw = {} if revision is None else {"revision": revision}
    loaded = PeftModel.from_pretrained(make_model("gpt2"), "user/adapter", **kw)
    assert isinstance(loaded, PeftModelForCausalLM)
    torch.testing.assert_close(_logits(loaded), _local(getattr(store, expected)), rtol=0, atol=0)
    assert not torch.equal(_local(store.a), _local(store.b))  # the two revisions really differ


def test_from_pretrained_hub_id_with_subfolder_and_explicit_cache_dir(store, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(store.root / "empty-cache"))
    loaded = PeftModel.from_pretrained(make_model("gpt2"), "user/adapter", subfolder="other", cache_dir=store.cache,
                                       local_files_only=True)
    torch.testing.assert_close(_logits(loaded), _local(store.a / "other"), rtol=0, atol=0)


def test_load_adapter_and_hotswap_take_hub_ids(store, offline) -> None:
    model = PeftModel.from_pretrained(make_model("gpt2"), "user/adapter")
    model.load_adapter("user/adapter", "second", revision="v2")
    model.set_adapter("second")
    torch.testing.assert_close(_logits(model), _local(store.b), rtol=0, atol=0)
    model.set_adapter("default")
    model.hotswap_adapter("user/adapter", "default", revision="v2")
    torch.testing.assert_close(_logits(model), _local(store.b), rtol=0, atol=0)


def test_load_adapter_into_a_loaded_name_overwrites_its_weights(store) -> None:
    """HF peft's behaviour, which transformers' Trainer relies on when it resumes from a checkpoint."""
    model = PeftModel.from_pretrained(make_model("gpt2"), store.a, is_trainable=True)
    params = dict(model.named_parameters())
    model.load_adapter(store.b, "default", is_trainable=True)
    torch.testing.assert_close(_logits(model), _local(store.b), rtol=0, atol=0)
    assert all(p is params[n] for n, p in model.named_parameters())


def test_peft_config_from_pretrained_takes_hub_ids(store, offline) -> None:
    assert PeftConfig.from_pretrained("user/adapter", revision="v2") == PeftConfig.from_pretrained(store.b)
    assert LoraConfig.from_pretrained("user/adapter", subfolder="other").r == 2


def test_local_directory_never_calls_huggingface_hub(store, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a local directory went to the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    torch.testing.assert_close(_local(store.a, revision="main"), _local(store.a), rtol=0, atol=0)
    assert PeftConfig.from_pretrained(store.a, subfolder="other").r == 2


# ---- errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_id, kw, words", [
    ("user/missing", {}, ["user/missing", "'main'", "HF_HUB_OFFLINE=1", "hf download user/missing"]),
    ("user/adapter", {"revision": "v9"}, ["user/adapter", "'v9'", "HF_HUB_OFFLINE=1", "--revision v9"]),
    ("user/adapter", {"subfolder": "nope"}, ["cached snapshot", "user/adapter", "'nope'", "adapter_config.json"]),
    ("user/adapter", {"local_files_only": True, "revision": "v9"}, ["local_files_only=True"]),
])
def test_uncached_hub_id_offline_raises_one_clear_error_and_leaves_model(offline, model_id, kw, words) -> None:
    model = make_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(PeftConfigError) as info:
        PeftModel.from_pretrained(model, model_id, **kw)
    for word in words:
        assert word in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no huggingface_hub traceback
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cached_snapshot_without_weights_raises_checkpoint_error(store, offline, tmp_path) -> None:
    (tmp_path / "cfg").mkdir()
    shutil.copy(store.a / "adapter_config.json", tmp_path / "cfg")
    _put(offline, "user/no-weights", tmp_path / "cfg", _commit("no-weights"), ["main"])
    with pytest.raises(CheckpointError, match=r"user/no-weights.*neither adapter_model\.safetensors nor"):
        PeftModel.from_pretrained(make_model("gpt2"), "user/no-weights")


def _http_error(cls: type[Exception]) -> Exception:
    return cls("server says no", response=SimpleNamespace(headers={}, request=None, status_code=404))


@pytest.mark.parametrize("error, words", [
    (lambda: _http_error(errors.RepositoryNotFoundError), ["no Hub repo", "token="]),
    (lambda: _http_error(errors.GatedRepoError), ["gated", "huggingface.co/user/adapter"]),
    (lambda: _http_error(errors.RevisionNotFoundError), ["no revision 'v3'"]),
    (lambda: _http_error(errors.RemoteEntryNotFoundError), ["has no adapter_config.json", "subfolder="]),
    (lambda: errors.HFValidationError("bad id"), ["neither a local directory nor a valid Hub repo id"]),
])
def test_online_hub_errors_become_one_peftkit_error(monkeypatch, error, words) -> None:
    def fail(*args, **kwargs):
        raise error()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(PeftConfigError) as info:
        PeftConfig.from_pretrained("user/adapter", revision="v3")
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("call, exc, words", [
    (lambda d: PeftModel.from_pretrained(make_model("gpt2"), d, torch_device="cpu"), TypeError,
     ["'torch_device'", ".to()"]),
    (lambda d: PeftModel.from_pretrained(make_model("gpt2"), d, use_auth_token="x"), TypeError, ["token="]),
    (lambda d: PeftModel.from_pretrained(make_model("gpt2"), d, revison="v2"), TypeError,
     ["'revison'", "revision"]),
    (lambda d: PeftModel.from_pretrained(make_model("gpt2"), d, ephemeral_gpu_offload=True), ValueError,
     ["ephemeral_gpu_offload"]),
    (lambda d: PeftModel.from_pretrained(make_model("gpt2"), d, low_cpu_mem_usage=True), ValueError,
     ["low_cpu_mem_usage"]),
    (lambda d: PeftConfig.from_pretrained(d, r=8), TypeError, ["'r'", "revision"]),
    (lambda d: PeftModel.from_pretrained(make_model("gpt2"), d).load_adapter(d, "x", torch_device="cpu"),
     TypeError, ["load_adapter", "'torch_device'"]),
    (lambda d: PeftModel.from_pretrained(make_model("gpt2"), d).push_to_hub("me/x", max_shard_size="1GB"),
     TypeError, ["push_to_hub", "'max_shard_size'", "never sharded"]),
    (lambda d: PeftModel.from_pretrained(make_model("gpt2"), d).save_pretrained(d, safe_serialization=False),
     ValueError, ["safetensors only"]),
    (lambda d: PeftModel.from_pretrained(make_model("gpt2"), d).save_pretrained(d, save_embedding_layers="yes"),
     ValueError, ["save_embedding_layers"]),
    (lambda d: PeftModel.from_pretrained(make_model("gpt2"), d).save_pretrained(d, convert_pissa_to_lora="x"),
     TypeError, ["'convert_pissa_to_lora'"]),
])
def test_keyword_peftkit_does_not_honour_is_refused_by_name(store, call, exc, words) -> None:
    with pytest.raises(exc) as info:
        call(store.a)
    for word in words:
        assert word in str(info.value)


def test_key_mapping_renames_checkpoint_keys_before_loading(store, tmp_path) -> None:
    shutil.copy(store.a / "adapter_config.json", tmp_path)
    weights = load_file(store.a / "adapter_model.safetensors")
    save_file({k.replace(".h.", ".blocks."): v for k, v in weights.items()}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="blocks"):
        _local(tmp_path)
    mapped = _local(tmp_path, key_mapping={r"^transformer\.blocks\.": "transformer.h.", "unused": "x"})
    torch.testing.assert_close(mapped, _local(store.a), rtol=0, atol=0)


# ---- AutoPeftModel -------------------------------------------------------------------------------------------
def test_auto_causal_lm_loads_hub_adapter_with_hub_base(store, offline) -> None:
    model = AutoPeftModelForCausalLM.from_pretrained("user/adapter", revision="v2")
    assert isinstance(model, PeftModelForCausalLM)
    torch.testing.assert_close(_logits(model), _local(store.b), rtol=0, atol=0)
    assert AutoPeftModel.from_pretrained("user/adapter").active_adapter == "default"  # follows the task type


def test_auto_causal_lm_loads_local_base_and_passes_base_kwargs(store, offline) -> None:
    for adapter in (store.local_base, "user/local-base"):
        model = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float64)
        assert model.get_base_model().dtype == torch.float64
        reference = _local(store.local_base)
        torch.testing.assert_close(_logits(model).float(), reference, rtol=1e-5, atol=1e-5)


def test_auto_sequence_classification_loads_local_base_and_head(store, offline) -> None:
    for adapter in (store.cls, "user/cls"):
        model = AutoPeftModelForSequenceClassification.from_pretrained(adapter)
        assert isinstance(model, PeftModelForSequenceClassification)
        torch.testing.assert_close(_logits(model, "bert"), _local(store.cls, "bert"), rtol=0, atol=0)


def test_auto_class_refuses_an_adapter_of_another_task(offline) -> None:
    with pytest.raises(PeftConfigError, match=r"CAUSAL_LM adapter.*AutoPeftModelForSequenceClassification.*"
                                              r"Use AutoPeftModelForCausalLM"):
        AutoPeftModelForSequenceClassification.from_pretrained("user/adapter")


def test_auto_refuses_a_base_path_missing_on_this_machine(store, tmp_path) -> None:
    config = json.loads((store.a / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/no/such/dir"}))
    with pytest.raises(PeftConfigError, match="'/no/such/dir'.*does not exist on this machine"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path)


def test_auto_grows_embeddings_to_the_adapters_tokenizer(store, tmp_path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(store.local_base, tmp_path, dirs_exist_ok=True)
    vocab = {f"t{i}": i for i in range(VOCAB + 6)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                            unk_token="t0").save_pretrained(tmp_path)
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 6


# ---- uploads -------------------------------------------------------------------------------------------------
@pytest.fixture
def hub_api(monkeypatch, tmp_path) -> SimpleNamespace:
    """``HfApi`` whose network methods record their calls and copy what ``upload_folder`` would send."""
    record = SimpleNamespace(calls=[], uploads={})

    def create_repo(self, repo_id, **kw):
        record.calls.append(("create_repo", repo_id, kw))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def create_branch(self, repo_id, **kw):
        record.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kw):
        record.calls.append(("upload_folder", repo_id, kw))
        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        target = tmp_path / "uploaded" / repo_id / (kw.get("revision") or "main")
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(folder_path) / name, target / name)
        record.uploads[repo_id] = target
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    for name, fn in [("create_repo", create_repo), ("create_branch", create_branch),
                     ("upload_folder", upload_folder)]:
        monkeypatch.setattr(huggingface_hub.HfApi, name, fn)
    return record


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_push_to_hub_uploads_adapter_files_and_card_only(store, offline, hub_api) -> None:
    model = PeftModel.from_pretrained(make_model("gpt2"), store.a)
    model.load_adapter(store.a / "other", "other")
    info = model.push_to_hub("me/adapter", private=True, revision="dev", commit_message="first")
    assert info.commit_url.endswith("/commit/0")
    assert [c[0] for c in hub_api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub_api.calls[0][2]["private"] is True and hub_api.calls[1][2]["branch"] == "dev"
    assert hub_api.calls[2][2]["commit_message"] == "first"
    uploaded = hub_api.uploads["me/adapter"]
    assert _files(uploaded) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                "other/adapter_config.json", "other/adapter_model.safetensors"]
    card = huggingface_hub.ModelCard.load(uploaded / "README.md")
    assert card.data.base_model == "user/base" and card.data.library_name == "peft"
    assert {"peftkit", "lora", "base_model:adapter:user/base"} <= set(card.data.tags)
    assert "LORA" in card.text and "user/base" in card.text and 'subfolder="other"' in card.text
    reloaded = PeftModel.from_pretrained(make_model("gpt2"), uploaded)
    torch.testing.assert_close(_logits(reloaded), _local(store.a), rtol=0, atol=0)
    reloaded.load_adapter(uploaded, "other", subfolder="other")
    reloaded.set_adapter("other")
    torch.testing.assert_close(_logits(reloaded), _local(store.a / "other"), rtol=0, atol=0)


def test_push_to_hub_is_never_the_transformers_models(store, offline, hub_api, monkeypatch) -> None:
    model = PeftModel.from_pretrained(make_model("gpt2"), store.a)
    monkeypatch.setattr(type(model.get_base_model()), "push_to_hub", lambda *a, **k: pytest.fail("full model"))
    model.push_to_hub("me/adapter", selected_adapters=["default"], create_pr=True)
    assert hub_api.calls[-1][2]["create_pr"] is True
    assert "model.safetensors" not in _files(hub_api.uploads["me/adapter"])


def test_save_pretrained_push_keeps_the_users_readme_and_skips_other_files(store, offline, hub_api, tmp_path):
    out = tmp_path / "my-adapter"
    out.mkdir()
    (out / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My notes\n\nTrained on my data.\n")
    (out / "model.safetensors").write_bytes(b"not an adapter")
    (out / "notes.txt").write_text("private")
    model = PeftModel.from_pretrained(make_model("gpt2"), store.a)
    model.save_pretrained(out, push_to_hub=True, token="hf_x")
    assert hub_api.calls[0][1] == "my-adapter" and "me/my-adapter" in hub_api.uploads
    uploaded = hub_api.uploads["me/my-adapter"]
    assert _files(uploaded) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = huggingface_hub.ModelCard.load(uploaded / "README.md")
    assert "# My notes" in card.text and "Trained on my data." in card.text
    assert card.data.license == "mit" and card.data.base_model == "user/base"
    assert card.data.tags[0] == "mine" and "lora" in card.data.tags
    assert (out / "README.md").read_text() == (uploaded / "README.md").read_text()


def test_save_pretrained_without_push_does_not_upload_or_write_a_card(store, hub_api, tmp_path) -> None:
    PeftModel.from_pretrained(make_model("gpt2"), store.a).save_pretrained(tmp_path)
    assert hub_api.calls == [] and _files(tmp_path) == ["adapter_config.json", "adapter_model.safetensors"]


# ---- the environment, as a user sets it -------------------------------------------------------------------------
@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_environment_variables_pick_cache_and_offline_mode_and_import_stays_light(store, tmp_path, variable):
    """A fresh interpreter: the cache (HF_HUB_CACHE, or HF_HOME/hub) and HF_HUB_OFFLINE from the environment, read at
    import as users set them; ``import peftkit`` and a local load never import huggingface_hub."""
    script = textwrap.dedent(f"""
        import sys, torch, peftkit
        from peftkit import LoraConfig, PeftConfig, PeftConfigError, PeftModel, get_peft_model
        net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        get_peft_model(net, LoraConfig(r=2, target_modules=["0"])).save_pretrained({str(tmp_path / "local")!r})
        PeftModel.from_pretrained(torch.nn.Sequential(torch.nn.Linear(4, 4)), {str(tmp_path / "local")!r})
        assert "huggingface_hub" not in sys.modules
        assert PeftConfig.from_pretrained("user/adapter", revision="v2").r == 4
        try:
            PeftConfig.from_pretrained("user/missing")
        except PeftConfigError as exc:
            assert "HF_HUB_OFFLINE=1" in str(exc), exc
        else:
            raise AssertionError("no error")
    """)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "hub").symlink_to(store.cache)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_HOME", "HUGGINGFACE_HUB_CACHE")}
    env[variable] = str(store.cache if variable == "HF_HUB_CACHE" else tmp_path / "home")
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
