"""Bad input raises one clear exception naming the problem and the fix, and leaves the model as it was."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_inputs, make_model, model_logits
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit import (
    AdapterConfig,
    AdapterNotFoundError,
    CheckpointError,
    LoraConfig,
    PeftConfigError,
    PeftModel,
    TargetModuleError,
    get_peft_model,
)
from peftkit.core import checkpoint as ckpt

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


# ---- helpers ---------------------------------------------------------------------------------------------------
def snapshot(model: nn.Module) -> tuple[list[type], dict[str, torch.Tensor], dict[str, bool]]:
    return (
        [type(m) for m in model.modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_unchanged(model: nn.Module, before: tuple[list[type], dict[str, torch.Tensor], dict[str, bool]]) -> None:
    types, state, grads = before
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert list(now) == list(state)
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, f"tensors changed: {changed}"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def base_model(kind: str = "llama") -> nn.Module:
    """A tiny model with a mixed requires_grad pattern, so restoring the flags is observable."""
    model = make_model(kind)
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


@pytest.fixture
def saved_adapter(tmp_path: Path) -> Callable[..., Path]:
    """Factory: save a LoRA adapter of ``kind`` (non-zero B) and return its directory."""

    def make(kind: str = "llama", name: str = "good", **config_kwargs) -> Path:
        config_kwargs.setdefault("init_lora_weights", False)
        peft_model = get_peft_model(make_model(kind), LoraConfig(**config_kwargs))
        directory = tmp_path / name
        peft_model.save_pretrained(directory)
        return directory

    return make


def rewrite_config(directory: Path, **changes) -> None:
    data = json.loads((directory / CONFIG).read_text())
    data.update(changes)
    (directory / CONFIG).write_text(json.dumps(data))


def rewrite_weights(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS)


def assert_from_pretrained_refused(directory: Path, exc: type[Exception], *words: str, kind: str = "llama") -> None:
    model = base_model(kind)
    before = snapshot(model)
    with pytest.raises(exc) as info:
        PeftModel.from_pretrained(model, directory)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert_unchanged(model, before)


# ---- targets -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "typos", "hints"), [
    ("bert", ["qury"], ["query"]), ("llama", ["q_prj", "v_prj"], ["q_proj", "v_proj"]),
])
def test_get_peft_model_names_close_modules_when_no_target_matches(kind: str, typos: list, hints: list) -> None:
    # One matching entry is enough (HF peft's rule, tests/core/test_targets.py); when none matches, each entry is
    # named with the modules it was probably meant to be.
    model = base_model(kind)
    before = snapshot(model)
    with pytest.raises(TargetModuleError, match="match no module.*named_modules") as info:
        get_peft_model(model, LoraConfig(target_modules=typos))
    for typo, hint in zip(typos, hints):
        assert repr(hint) in str(info.value).split(repr(typo) + ":", 1)[1]
    assert_unchanged(model, before)


def test_get_peft_model_raises_when_target_regex_matches_nothing() -> None:
    model = base_model()
    before = snapshot(model)
    with pytest.raises(TargetModuleError, match=r"No module .* selected .*Loosen"):
        get_peft_model(model, LoraConfig(target_modules=r".*\.does_not_exist"))
    assert_unchanged(model, before)


def test_get_peft_model_rolls_back_when_a_target_has_unsupported_type() -> None:
    # query (wrapped first) is valid, LayerNorm is not: the already wrapped layers must be taken out again.
    model = base_model("bert")
    before = snapshot(model)
    with pytest.raises(TargetModuleError, match=r"LayerNorm.*supported: nn\.Linear.*Remove it from target_modules"):
        get_peft_model(model, LoraConfig(target_modules=["query", "attention.output.LayerNorm"]))
    assert_unchanged(model, before)


def test_get_peft_model_raises_when_modules_to_save_is_absent() -> None:
    model = base_model()
    before = snapshot(model)
    with pytest.raises(TargetModuleError, match="modules_to_save.*no_such_head"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["no_such_head"]))
    assert_unchanged(model, before)


def test_get_peft_model_refuses_a_module_container_as_target_or_in_modules_to_save() -> None:
    model = base_model("gpt2")  # transformer.h is the ModuleList of blocks: GPT-2 iterates it, never calls it
    before = snapshot(model)
    with pytest.raises(TargetModuleError, match=r"\['transformer.h'\] name a ModuleList.*modules inside it"):
        get_peft_model(model, LoraConfig(target_modules=["wte"], modules_to_save=["h"]))
    assert_unchanged(model, before)
    with pytest.raises(TargetModuleError, match=r"target_modules \['transformer.h'\] name a ModuleList"):
        get_peft_model(model, AdapterConfig(target_modules=["h"]))
    assert_unchanged(model, before)


# ---- from_pretrained / load_adapter: files ---------------------------------------------------------------------
def test_from_pretrained_raises_when_directory_is_missing(tmp_path: Path) -> None:
    assert_from_pretrained_refused(tmp_path / "nowhere", PeftConfigError, "adapter_config.json", "save_pretrained")


@pytest.mark.parametrize("lost", [CONFIG, WEIGHTS])
def test_from_pretrained_raises_when_a_file_is_missing(saved_adapter, lost: str) -> None:
    directory = saved_adapter()
    (directory / lost).unlink()
    exc = PeftConfigError if lost == CONFIG else CheckpointError
    assert_from_pretrained_refused(directory, exc, lost, "save_pretrained")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_from_pretrained_raises_when_weights_are_corrupt(saved_adapter, damage: str) -> None:
    directory = saved_adapter()
    path = directory / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(os.urandom(len(data)) if damage == "garbage" else data[: len(data) // 2])
    assert_from_pretrained_refused(directory, CheckpointError, WEIGHTS, "corrupt or truncated", "Save the adapter")


def test_from_pretrained_raises_when_config_is_not_json(saved_adapter) -> None:
    directory = saved_adapter()
    (directory / CONFIG).write_text('{"peft_type": "LORA", "r": 8,')
    assert_from_pretrained_refused(directory, PeftConfigError, CONFIG, "not valid JSON")


# ---- from_pretrained / load_adapter: contents ------------------------------------------------------------------
def test_from_pretrained_lists_shape_mismatch_when_rank_differs(saved_adapter) -> None:
    rank8, rank4 = saved_adapter(name="r8", r=8), saved_adapter(name="r4", r=4)
    shutil.copy(rank4 / WEIGHTS, rank8 / WEIGHTS)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert_from_pretrained_refused(rank8, CheckpointError, "nothing was loaded", f"shape of {key}: checkpoint (4, 32)")


def test_from_pretrained_lists_missing_and_unexpected_keys_when_architecture_differs(saved_adapter) -> None:
    # A Llama adapter on OPT: q_proj/v_proj exist in both, but under other paths.
    directory = saved_adapter("llama")
    assert_from_pretrained_refused(
        directory, CheckpointError, "missing", "model.decoder.layers.0.self_attn.q_proj", "match no adapter tensor",
        "model.layers.0.self_attn.q_proj", kind="opt",
    )


def test_from_pretrained_raises_when_config_targets_are_absent_from_model(saved_adapter) -> None:
    directory = saved_adapter("gpt2")  # targets c_attn, which Llama does not have
    assert_from_pretrained_refused(directory, TargetModuleError, "c_attn", "named_modules")


def test_from_pretrained_raises_when_a_key_is_missing(saved_adapter) -> None:
    directory = saved_adapter()
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    rewrite_weights(directory, lambda t: t.pop(key))
    assert_from_pretrained_refused(directory, CheckpointError, "1 adapter tensor(s) the model expects", key)


def test_from_pretrained_raises_when_a_key_is_unexpected(saved_adapter) -> None:
    directory = saved_adapter()
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    rewrite_weights(directory, lambda t: t.update({key: torch.zeros(8, 32)}))
    assert_from_pretrained_refused(directory, CheckpointError, "1 tensor(s)", "match no adapter tensor", key)


def test_load_adapter_leaves_peft_model_unchanged_when_checkpoint_does_not_fit(saved_adapter) -> None:
    good = saved_adapter(name="good")
    bad = saved_adapter(name="bad", r=4)
    shutil.copy(bad / WEIGHTS, good / WEIGHTS)  # r=8 config, r=4 weights
    peft_model = get_peft_model(base_model(), LoraConfig(target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    inputs = make_inputs("llama")
    expected = model_logits(peft_model, inputs)
    before = snapshot(peft_model)
    with pytest.raises(CheckpointError, match="shape of"):
        peft_model.load_adapter(good, adapter_name="other")
    assert_unchanged(peft_model, before)
    assert list(peft_model.peft_config) == ["default"] and peft_model.active_adapters == ["default"]
    torch.testing.assert_close(model_logits(peft_model, inputs), expected, rtol=0, atol=0)


def test_load_adapter_leaves_peft_model_unchanged_when_config_targets_are_absent(saved_adapter) -> None:
    directory = saved_adapter("gpt2")
    peft_model = get_peft_model(base_model(), LoraConfig())
    before = snapshot(peft_model)
    with pytest.raises(TargetModuleError, match="c_attn"):
        peft_model.load_adapter(directory, adapter_name="other")
    assert_unchanged(peft_model, before)
    assert list(peft_model.peft_config) == ["default"]


# ---- config fields ---------------------------------------------------------------------------------------------
def test_from_pretrained_lists_valid_fields_when_config_has_unknown_field(saved_adapter) -> None:
    directory = saved_adapter()
    rewrite_config(directory, lora_rank=4)
    assert_from_pretrained_refused(directory, PeftConfigError, "Unknown field(s)", "lora_rank=4", "Valid fields",
                                   "'r'")


@pytest.mark.parametrize("field_value", [{"use_qalora": True}, {"lora_bias": True}, {"layer_replication": [[0, 1]]}])
def test_from_pretrained_refuses_hf_feature_when_switched_on(saved_adapter, field_value: dict) -> None:
    directory = saved_adapter()
    rewrite_config(directory, **field_value)
    (name, _), = field_value.items()
    assert_from_pretrained_refused(directory, PeftConfigError, name, "does not implement")


@pytest.mark.parametrize("field_value", [{"target_modules": ["q_prj"]}, {"modules_to_save": ["lm_hed"]}])
def test_saved_config_naming_missing_modules_is_refused_with_the_file_named(saved_adapter, field_value) -> None:
    directory = saved_adapter()
    rewrite_config(directory, **field_value)
    assert_from_pretrained_refused(directory, TargetModuleError, *next(iter(field_value.values())), CONFIG,
                                   str(directory))
    peft_model = get_peft_model(base_model(), LoraConfig(target_modules=["v_proj"]))
    before = snapshot(peft_model)
    with pytest.raises(TargetModuleError, match=f"from {CONFIG} in"):
        peft_model.load_adapter(directory, "other")
    assert_unchanged(peft_model, before)


def test_from_pretrained_accepts_hf_fields_when_switched_off(saved_adapter) -> None:
    directory = saved_adapter()
    rewrite_config(directory, use_dora=False, lora_bias=False, layer_replication=None, loftq_config={},
                   megatron_config=None, megatron_core="megatron.core", peft_version="0.21.2", revision=None,
                   target_parameters=None, trainable_token_indices=None, use_qalora=False, qalora_group_size=16)
    peft_model = PeftModel.from_pretrained(make_model("llama"), directory)
    assert peft_model.peft_config["default"].r == 8


def test_from_pretrained_lists_known_types_when_peft_type_is_unknown(saved_adapter) -> None:
    directory = saved_adapter()
    rewrite_config(directory, peft_type="NOT_A_METHOD")
    assert_from_pretrained_refused(directory, PeftConfigError, "'NOT_A_METHOD'", "LORA")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 2.5}, "LoraConfig.r must be int, got 2.5"),
        ({"lora_dropout": 1.5}, "lora_dropout must be in [0, 1)"),
        ({"bias": "some"}, "bias must be 'none', 'all' or 'lora_only'"),
        ({"init_lora_weights": "lora_ga"}, "init_lora_weights='lora_ga' is not supported"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"task_type": "CAUSAL"}, "task_type='CAUSAL' is not known"),
        ({"layers_pattern": "layers"}, "layers_pattern only has an effect with layers_to_transform"),
    ],
)
def test_lora_config_rejects_invalid_value(kwargs: dict, words: str) -> None:
    with pytest.raises(PeftConfigError) as info:
        LoraConfig(**kwargs)
    assert words in str(info.value)


def test_from_pretrained_rejects_invalid_value_in_file(saved_adapter) -> None:
    directory = saved_adapter()
    rewrite_config(directory, r=0)
    assert_from_pretrained_refused(directory, PeftConfigError, "r must be a positive integer")


# ---- adapter names ---------------------------------------------------------------------------------------------
@pytest.fixture
def two_adapters() -> PeftModel:
    peft_model = get_peft_model(base_model(), LoraConfig(init_lora_weights=False))
    peft_model.add_adapter("other", LoraConfig(target_modules=["k_proj"], init_lora_weights=False))
    return peft_model.eval()


@pytest.mark.parametrize(("name", "words"), [("other", "exists already"), ("__base__", "reserved")])
def test_add_adapter_refuses_name_when_taken_or_reserved(two_adapters: PeftModel, name: str, words: str) -> None:
    before = snapshot(two_adapters)
    with pytest.raises(ValueError, match=words):
        two_adapters.add_adapter(name, LoraConfig(target_modules=["o_proj"]))
    assert_unchanged(two_adapters, before)
    assert list(two_adapters.peft_config) == ["default", "other"]


@pytest.mark.parametrize("call", ["set_adapter", "delete_adapter"])
def test_adapter_call_lists_loaded_adapters_when_name_is_unknown(two_adapters: PeftModel, call: str) -> None:
    before = snapshot(two_adapters)
    with pytest.raises(AdapterNotFoundError) as info:
        getattr(two_adapters, call)("nope")
    assert "'nope'" in str(info.value) and "['default', 'other']" in str(info.value)
    assert_unchanged(two_adapters, before)
    assert two_adapters.active_adapters == ["default"]


@pytest.mark.parametrize(
    ("setup", "names", "exc", "words"),
    [
        (None, ["default", "nope", "other"], AdapterNotFoundError, "'nope'"),
        ("train", ["default", "other", "__base__"], ValueError, "eval mode"),
        ("merge", ["default", "other", "__base__"], ValueError, "unmerge_adapter"),
        (None, ["default", "other"], ValueError, "2 entries for a batch of 3"),
    ],
)
def test_mixed_batch_raises_when_request_is_invalid(two_adapters, setup, names, exc, words) -> None:
    inputs = make_inputs("llama", batch=3)
    if setup == "train":
        two_adapters.train()
    elif setup == "merge":
        two_adapters.merge_adapter()
    expected = model_logits(two_adapters, inputs)
    with pytest.raises(exc, match=words):
        two_adapters(**inputs, adapter_names=names)
    # The failed call leaves no routing behind: a plain forward gives what it gave before.
    torch.testing.assert_close(model_logits(two_adapters, inputs), expected, rtol=0, atol=0)


# ---- legacy .bin -----------------------------------------------------------------------------------------------
EXECUTED: list[str] = []


def _record(tag: str) -> str:
    EXECUTED.append(tag)
    return tag


class _Payload:
    """Unpickling this calls ``_record``: proof that arbitrary code ran."""

    def __reduce__(self):
        return (_record, ("unpickled",))


def test_from_pretrained_refuses_pickled_object_in_legacy_bin(saved_adapter) -> None:
    directory = saved_adapter()
    tensors = load_file(directory / WEIGHTS)
    (directory / WEIGHTS).unlink()
    torch.save({**tensors, "extra": _Payload()}, directory / "adapter_model.bin")
    EXECUTED.clear()
    assert_from_pretrained_refused(directory, CheckpointError, "adapter_model.bin", "never unpickles")
    assert EXECUTED == []


def test_from_pretrained_loads_tensor_dict_from_legacy_bin(saved_adapter) -> None:
    directory = saved_adapter()
    from_safetensors = PeftModel.from_pretrained(make_model("llama"), directory)
    torch.save(load_file(directory / WEIGHTS), directory / "adapter_model.bin")
    (directory / WEIGHTS).unlink()
    from_bin = PeftModel.from_pretrained(make_model("llama"), directory)
    inputs = make_inputs("llama")
    torch.testing.assert_close(model_logits(from_bin, inputs), model_logits(from_safetensors, inputs))
    assert not torch.equal(model_logits(from_bin, inputs), model_logits(make_model("llama"), inputs))


# ---- atomic save -----------------------------------------------------------------------------------------------
def test_save_pretrained_keeps_previous_checkpoint_when_write_fails(tmp_path: Path, monkeypatch) -> None:
    peft_model = get_peft_model(make_model("llama"), LoraConfig(init_lora_weights=False))
    directory = tmp_path / "ckpt"
    peft_model.save_pretrained(directory)
    good_bytes = {name: (directory / name).read_bytes() for name in os.listdir(directory)}
    inputs = make_inputs("llama")
    expected = model_logits(peft_model, inputs)

    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(1.0)

    real_write = ckpt._write_synced

    def failing_write(path: str, write) -> None:
        if not path.endswith(".safetensors") and "safetensors" not in os.path.basename(path):
            return real_write(path, write)
        with open(path, "wb") as fh:  # half a file, then the disk "fills up"
            fh.write(b"\x00" * 64)
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "_write_synced", failing_write)
    with pytest.raises(OSError, match="No space left"):
        peft_model.save_pretrained(directory)

    assert sorted(os.listdir(directory)) == sorted(good_bytes)  # no temp files left behind
    assert {name: (directory / name).read_bytes() for name in good_bytes} == good_bytes
    reloaded = PeftModel.from_pretrained(make_model("llama"), directory)
    torch.testing.assert_close(model_logits(reloaded, inputs), expected)


def test_save_pretrained_files_are_readable_by_others_when_umask_allows(tmp_path: Path) -> None:
    # Atomic writes go through a temp file; the final files must still get the usual 0o666 & ~umask mode,
    # so a checkpoint on a shared disk can be read by the rest of the team.
    umask = os.umask(0o022)
    try:
        get_peft_model(make_model("llama"), LoraConfig()).save_pretrained(tmp_path)
        (tmp_path / "reference").write_bytes(b"")  # what a plain open() gives under this umask: 0o644
    finally:
        os.umask(umask)
    modes = {n: (tmp_path / n).stat().st_mode & 0o777 for n in (CONFIG, WEIGHTS, "reference")}
    assert modes == dict.fromkeys(modes, modes["reference"])
