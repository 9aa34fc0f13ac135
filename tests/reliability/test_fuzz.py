"""Fuzzed inputs: every config class with wrong types, out-of-range values and unknown fields, and damaged
checkpoints. Each is refused with one peftkit error that names the problem, and a refused call changes nothing;
what is accepted works (a config builds a model that runs; a checkpoint loads exactly the tensors saved).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
import types
import typing
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import make_inputs, make_model, model_logits
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit import (
    AdapterConfig,
    CheckpointError,
    IA3Config,
    LoraConfig,
    ParallelAdapterConfig,
    PeftConfig,
    PeftConfigError,
    PeftModel,
    PrefixTuningConfig,
    PTuningV2Config,
    TargetModuleError,
    get_peft_model,
)
from peftkit.core.config import CONFIG_NAME
from peftkit.core.registry import config_class_for, registered_peft_types

from .conftest import profile, tally

WEIGHTS = "adapter_model.safetensors"

# One valid config per method (on a tiny GPT-2 unless named), from which the fuzzer changes a few fields.
VALID: dict[str, tuple[str, dict[str, Any]]] = {
    "LORA": ("gpt2", {"r": 2, "target_modules": ["c_attn"]}),
    "ADALORA": ("gpt2", {"init_r": 4, "target_r": 2, "total_step": 10, "target_modules": ["c_attn"]}),
    "IA3": ("gpt2", {}),
    "BITFIT": ("gpt2", {}),
    "BOTTLENECK": ("gpt2", {"r": 4}),
    "PARALLEL_BOTTLENECK": ("gpt2", {"r": 4}),
    "PREFIX_TUNING": ("gpt2", {"num_virtual_tokens": 2, "task_type": "CAUSAL_LM"}),
    "PROMPT_TUNING": ("gpt2", {"num_virtual_tokens": 2, "task_type": "CAUSAL_LM"}),
    "P_TUNING": ("gpt2", {"num_virtual_tokens": 2, "encoder_hidden_size": 8, "task_type": "CAUSAL_LM"}),
    "P_TUNING_V2": ("bert", {"num_virtual_tokens": 2, "task_type": "SEQ_CLS"}),
    "MAM": ("gpt2", {"num_virtual_tokens": 2, "prefix_hidden_size": 8, "ffn_r": 4, "task_type": "CAUSAL_LM"}),
    "UNIPELT": ("gpt2", {"r": 2, "num_virtual_tokens": 2, "prefix_hidden_size": 8, "reduction_factor": 4,
                         "task_type": "CAUSAL_LM"}),
    "COMPOSITE": ("gpt2", {"members": [{"peft_type": "LORA", "r": 2, "target_modules": ["c_attn"]},
                                       {"peft_type": "IA3"}]}),
    "ADAPTER_FUSION": ("gpt2", {"adapters": ["a", "b"]}),  # over serial adapters "a" and "b" (see _apply)
    "TRAINABLE_TOKENS": ("gpt2", {"token_indices": [0, 3]}),
}
UNKNOWN_FIELDS = ["lora_alhpa", "future_option"]
# Words the config fields take, and near misses; "[" and "(" are broken regular expressions.
WORDS = ["", "none", "all", "lora_only", "MLP", "LSTM", "houlsby", "pfeiffer", "mean", "token", "ffn", "attn",
         "gaussian", "RANDOM", "TEXT", "zero", "relu", "c_attn", "c_proj", "nope", "CAUSAL_LM", "SEQ_CLS", ".*", "[",
         "(", "h", "a"]
# Small numbers only: a huge rank or prompt length is a valid request for memory the machine does not have.
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2, 8), st.sampled_from(WORDS),
                    st.sampled_from([math.nan, math.inf, -math.inf, -1.5, 0.0, 0.25, 1e9]))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(WORDS), inner, max_size=2), max_leaves=5)
PYTHON_VALUES = JSON_VALUES | st.tuples(st.sampled_from(WORDS)) | st.builds(object) | st.just(b"c_attn")


def typed_values(hint: Any) -> st.SearchStrategy:
    """Values of the annotated type but any size or word: out of range rather than of the wrong type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([typed_values(a) for a in args])
    if origin is list:
        return st.lists(typed_values(args[0] if args else str), max_size=3)
    if origin is dict:
        return st.dictionaries(st.sampled_from(WORDS), typed_values(args[1] if args else int), max_size=2)
    return {bool: st.booleans(), int: st.integers(-2, 8), float: st.sampled_from([-1.5, 0.0, 0.25, 1.0, 3.0, 1e9]),
            str: st.sampled_from(WORDS), type(None): st.none()}.get(hint, SCALARS)


def test_every_registered_method_is_fuzzed() -> None:
    assert set(VALID) == set(registered_peft_types()), "add the new method's valid config to VALID"


def snapshot(model: nn.Module) -> dict[str, Any]:
    """What a refused call must leave as it was: modules, tensors, trainability and (for a PeftModel) adapters."""
    state = {
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
    }
    if isinstance(model, PeftModel):
        state["adapters"] = (dict(model.peft_config), model.active_adapters)
    return state


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["grads"] == before["grads"]
    assert after.get("adapters") == before.get("adapters")
    assert list(after["tensors"]) == list(before["tensors"])
    changed = [k for k, v in before["tensors"].items() if not torch.equal(after["tensors"][k], v)]
    assert not changed, f"tensors changed by a refused call: {changed[:5]}"


# MAM and UniPELT build member configs from their own fields; a member's error names the member's field.
MEMBER_FIELDS = {"ffn_r": "r", "prefix_hidden_size": "encoder_hidden_size", "gate_reduce": "gate",
                 "members": "peft_type"}


def names_a_field(message: str, fields: dict[str, Any]) -> bool:
    names = [*fields, *(MEMBER_FIELDS[n] for n in fields if n in MEMBER_FIELDS)]
    return any(name.rstrip("s") in message for name in names)  # "members" as "needs at least one member"


def _apply(kind: str, config: PeftConfig) -> tuple[nn.Module, PeftModel | None, Exception | None]:
    """Put ``config`` on a fresh model; returns the model it was applied to and the PeftModel, or the error."""
    if config.peft_type == "ADAPTER_FUSION":
        host = get_peft_model(make_model(kind), AdapterConfig(r=4, init_weights=False), "a")
        host.add_adapter("b", AdapterConfig(r=4, init_weights=False))
        before = snapshot(host)
        try:
            host.add_adapter("fusion", config)
            host.set_adapter("fusion")
        except (PeftConfigError, TargetModuleError) as exc:
            assert_unchanged(host, before)
            return host, None, exc
        return host, host, None
    model = make_model(kind)
    before = snapshot(model)
    try:
        return model, get_peft_model(model, config), None
    except (PeftConfigError, TargetModuleError) as exc:
        assert_unchanged(model, before)
        return model, None, exc


@profile(300)
@given(data=st.data())
def test_fuzzed_config_is_refused_by_name_or_builds_a_working_model(data: st.DataObject) -> None:
    peft_type = data.draw(st.sampled_from(sorted(VALID)), label="peft_type")
    kind, valid = VALID[peft_type]
    cls = config_class_for(peft_type)
    names = [f.name for f in dataclasses.fields(cls)] + UNKNOWN_FIELDS
    from_json = data.draw(st.booleans(), label="from_json")
    values = JSON_VALUES if from_json else PYTHON_VALUES
    hints = typing.get_type_hints(cls)
    typed = data.draw(st.booleans(), label="typed")  # half the time values of the right type, out of range

    def value_for(name: str) -> st.SearchStrategy:
        return typed_values(hints[name]) if typed and name in hints else values
    keys = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True), label="fields")
    changes = {name: data.draw(value_for(name), label=name) for name in keys}
    fields = {**valid, **changes}
    try:
        config = PeftConfig.from_dict({"peft_type": peft_type, **fields}) if from_json else cls(**fields)
    except PeftConfigError as exc:
        assert names_a_field(str(exc), changes), f"{exc} names none of {sorted(changes)}"
        tally("fuzzed configs", "refused with PeftConfigError")
        return
    except TypeError as exc:  # Python's own refusal of an unknown keyword, naming it
        unknown = [n for n in changes if n in UNKNOWN_FIELDS]
        assert not from_json and unknown and "unexpected keyword argument" in str(exc), exc
        tally("fuzzed configs", "refused unknown keyword (TypeError)")
        return
    text = config.to_json_string()
    assert PeftConfig.from_dict(json.loads(text)).to_json_string() == text  # what is saved loads back the same
    model, peft_model, error = _apply(kind, config)
    if error is not None:
        tally("fuzzed configs", f"accepted, refused by the model with {type(error).__name__}")
        return
    try:
        logits = model_logits(peft_model.eval(), make_inputs(kind))
    except ValueError as exc:
        # Prefix shapes given by hand (token_dim, num_attention_heads) meet the model's attention only in forward,
        # which names them; anything else escaping forward is a bug.
        assert names_a_field(str(exc), changes), exc
        tally("fuzzed configs", "accepted, refused by the first forward with ValueError")
        return
    assert torch.isfinite(logits).all(), f"{config} gives non-finite outputs"
    tally("fuzzed configs", "accepted and ran")


# ---- regression tests for what the fuzzer found -------------------------------------------------------------
@pytest.mark.parametrize(("build", "field"), [
    (lambda: LoraConfig(lora_dropout="0.1"), "lora_dropout"),  # was TypeError: '<=' between float and str
    (lambda: LoraConfig(lora_alpha=math.nan), "lora_alpha"),  # was accepted: every output NaN
    (lambda: LoraConfig(alpha_pattern=None), "alpha_pattern"),  # was AttributeError in get_peft_model
    (lambda: PeftConfig.from_dict({"peft_type": "LORA", "rank_pattern": "all"}), "rank_pattern"),
    (lambda: ParallelAdapterConfig(span=5), "span"),  # was TypeError: 'int' object is not iterable
    (lambda: AdapterConfig(non_linearity=["relu"]), "non_linearity"),  # was TypeError: unhashable type
    (lambda: LoraConfig(modules_to_save=3), "modules_to_save"),
    (lambda: LoraConfig(target_modules=["c_attn", 2]), "target_modules"),  # was TypeError in the walker
    (lambda: LoraConfig(r=True), "LoraConfig.r"),
    (lambda: PrefixTuningConfig(num_attention_heads=0), "num_attention_heads"),  # was ZeroDivisionError
    (lambda: LoraConfig(target_modules="["), "target_modules"),  # was re.error from inside the walker
    (lambda: LoraConfig(alpha_pattern={"(": 2}), "alpha_pattern"),  # was re.error in get_peft_model
    (lambda: IA3Config(feedforward_modules="["), "feedforward_modules"),
])
def test_config_of_wrong_type_is_refused_naming_the_field(build: Callable[[], PeftConfig], field: str) -> None:
    with pytest.raises(PeftConfigError, match=field):
        build()


def test_prefix_heads_that_do_not_divide_the_width_are_refused_before_the_model_changes() -> None:
    # Was accepted, then a RuntimeError from a view() in the first forward.
    model = make_model("bert")
    before = snapshot(model)
    with pytest.raises(PeftConfigError, match="token_dim=32 is not a multiple of num_attention_heads=3"):
        get_peft_model(model, PTuningV2Config(num_virtual_tokens=2, task_type="SEQ_CLS", num_attention_heads=3))
    assert_unchanged(model, before)


# ---- damaged checkpoints ------------------------------------------------------------------------------------
SAVED = {  # adapters whose every tensor is non-zero, so a damaged value cannot hide
    "lora": ("gpt2", lambda: LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights=False)),
    "prefix": ("gpt2", lambda: PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")),
    "adapter": ("bert", lambda: AdapterConfig(r=4, init_weights=False, task_type="SEQ_CLS")),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, dict[str, torch.Tensor]]]:
    """name -> (model kind, directory, the saved tensors)."""
    out = {}
    for name, (kind, config) in SAVED.items():
        directory = str(tmp_path_factory.mktemp(name))
        get_peft_model(make_model(kind, seed=3), config()).save_pretrained(directory)
        out[name] = (kind, directory, load_file(os.path.join(directory, WEIGHTS)))
    return out


def _header(data: bytes) -> tuple[dict[str, Any], bytes]:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + length]), data[8 + length:]


def _with_header(header: dict[str, Any], body: bytes, length_shift: int = 0) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) + length_shift) + raw + body


DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8, torch.bool]


@st.composite
def damage(draw: st.DrawFn, tensors: dict[str, torch.Tensor]) -> tuple[str, Callable[[str], None], dict]:
    """A way to damage an adapter directory: (description, function of the directory, the tensors a load may
    then give: the saved ones, or for a deliberate dtype change, the saved ones through that dtype). The
    description starts with the field or tensor it changes, which an error may name instead of the file."""
    weights_path, config_path = WEIGHTS, CONFIG_NAME
    key = draw(st.sampled_from(sorted(tensors)))
    kind = draw(st.sampled_from(["flip", "truncate", "dtype", "shape", "lying header", "not json", "other method",
                                 "config field", "drop key", "missing file"]))
    expected = dict(tensors)

    def rewrite(path: str, edit: Callable[[bytes], bytes]) -> Callable[[str], None]:
        def apply(directory: str) -> None:
            full = os.path.join(directory, path)
            with open(full, "rb") as fh:
                data = fh.read()
            with open(full, "wb") as fh:
                fh.write(edit(data))
        return apply

    def retensor(edit: Callable[[dict[str, torch.Tensor]], None], keep_metadata: bool) -> Callable[[str], None]:
        def apply(directory: str) -> None:
            full = os.path.join(directory, weights_path)
            with open(full, "rb") as fh:
                header, _ = _header(fh.read())
            tensors_now = load_file(full)
            edit(tensors_now)
            save_file(tensors_now, full, metadata=header["__metadata__"] if keep_metadata else {"format": "pt"})
        return apply

    target = draw(st.sampled_from([weights_path, config_path]))
    if kind == "flip":
        spots = draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1,
                              max_size=4))

        def flip(data: bytes) -> bytes:
            out = bytearray(data)
            for where, bit in spots:
                out[int(where * len(out))] ^= 1 << bit
            return bytes(out)
        return f"flip {spots} in {target}", rewrite(target, flip), expected
    if kind == "truncate":
        keep = draw(st.floats(0, 1, exclude_max=True))
        return f"truncate {target} to {keep:.3f}", rewrite(target, lambda d: d[:int(keep * len(d))]), expected
    keep_metadata = draw(st.booleans())
    if kind == "dtype":
        dtype = draw(st.sampled_from(DTYPES))
        if dtype.is_floating_point:
            expected[key] = tensors[key].to(dtype).to(tensors[key].dtype)

        def cast(t: dict[str, torch.Tensor]) -> None:
            t[key] = t[key].to(dtype)
        return f"{key} as {dtype} (metadata kept: {keep_metadata})", retensor(cast, keep_metadata), expected
    if kind == "shape":
        how = draw(st.sampled_from(["row more", "row less", "flatten", "transpose", "scalar"]))
        reshape = {"row more": lambda t: torch.cat([t, t[:1]]), "row less": lambda t: t[1:],
                   "flatten": lambda t: t.reshape(-1), "transpose": lambda t: t.reshape(t.shape[::-1]),
                   "scalar": lambda t: t.reshape(-1)[0]}[how]

        def change(t: dict[str, torch.Tensor]) -> None:
            t[key] = reshape(t[key]).contiguous()
        if how == "transpose" and tensors[key].shape == tensors[key].shape[::-1]:
            return "no change (square)", lambda directory: None, expected
        return f"{key}: {how}", retensor(change, keep_metadata), expected
    if kind == "drop key":
        return f"drop {key}", retensor(lambda t: t.pop(key), keep_metadata), expected
    if kind == "lying header":
        lie = draw(st.sampled_from(["offsets shifted", "offsets past the end", "offsets reversed", "shape", "dtype",
                                    "length prefix"]))
        shift = draw(st.integers(1, 64)) * draw(st.sampled_from([1, -1] if lie == "length prefix" else [1]))

        def lying(data: bytes) -> bytes:
            header, body = _header(data)
            entry = header[key]
            start, end = entry["data_offsets"]
            if lie == "length prefix":
                return _with_header(header, body, length_shift=shift)
            if lie == "offsets shifted":
                entry["data_offsets"] = [start + shift, end + shift]
            elif lie == "offsets past the end":
                entry["data_offsets"] = [start, len(body) + shift]
            elif lie == "offsets reversed":
                entry["data_offsets"] = [end, start]
            elif lie == "shape":
                entry["shape"] = [*entry["shape"][:-1], entry["shape"][-1] + shift] if entry["shape"] else [shift]
            else:
                entry["dtype"] = {"F32": "F16", "F16": "F32", "BF16": "F64"}.get(entry["dtype"], "I8")
            return _with_header(header, body)
        return f"header of {key}: {lie} by {shift}", rewrite(weights_path, lying), expected
    if kind == "not json":
        junk = draw(st.binary(max_size=40) | st.text(max_size=40).map(str.encode) | st.just(b"[]") | st.just(b"3"))
        return f"config is {junk!r}", rewrite(config_path, lambda d: junk), expected
    if kind in ("other method", "config field"):
        field = "peft_type" if kind == "other method" else draw(st.sampled_from(
            ["r", "lora_alpha", "target_modules", "num_virtual_tokens", "token_dim", "reduction_factor", "variant",
             "task_type", "inference_mode", "base_model_name_or_path", "lora_alhpa"]))
        value = draw(st.sampled_from(registered_peft_types() + ["LORB", None, 3]) if kind == "other method"
                     else JSON_VALUES)

        def edit(data: bytes) -> bytes:
            return json.dumps({**json.loads(data), field: value}).encode()
        return f"{field}={value!r} in the config", rewrite(config_path, edit), expected
    lost = draw(st.sampled_from([weights_path, config_path]))
    return f"no {lost}", lambda directory: os.unlink(os.path.join(directory, lost)), expected


ALLOWED = (CheckpointError, PeftConfigError, TargetModuleError)


@profile(250)
@given(data=st.data())
def test_damaged_checkpoint_is_refused_by_name_and_leaves_the_model_unchanged(data: st.DataObject, saved) -> None:
    name = data.draw(st.sampled_from(sorted(saved)), label="adapter")
    kind, original, tensors = saved[name]
    what, apply, expected = data.draw(damage(tensors), label="damage")
    into_peft_model = data.draw(st.booleans(), label="load_adapter into a PeftModel")
    with tempfile.TemporaryDirectory() as directory:
        shutil.copytree(original, directory, dirs_exist_ok=True)
        apply(directory)
        if into_peft_model:  # another method's adapter present, so the loaded one has to fit beside it
            model = get_peft_model(make_model(kind, seed=3), LoraConfig(r=2, target_modules=["query", "c_proj"]
                                                                         if kind == "gpt2" else ["query"]))
        else:
            model = make_model(kind, seed=3)
        before = snapshot(model)
        try:
            if into_peft_model:
                model.load_adapter(directory, "loaded")
                loaded = model
            else:
                loaded = PeftModel.from_pretrained(model, directory, adapter_name="loaded")
        except ALLOWED as exc:
            message = str(exc)
            named = [directory, CONFIG_NAME, WEIGHTS, "Config", what.split("=")[0], *registered_peft_types()]
            assert any(word in message for word in named), f"{what}: {message}"
            assert_unchanged(model, before)
            tally("damaged checkpoints", f"refused with {type(exc).__name__}")
            return
    # Loaded anyway: then the damage changed nothing that matters (a bookkeeping field, a dtype that holds the
    # values), and the adapter holds exactly the tensors saved.
    got = loaded.get_adapter_state_dict("loaded")
    assert set(got) == set(expected), what
    for key, tensor in expected.items():
        assert torch.equal(got[key].to(tensor.dtype), tensor), f"{what}: {key} differs after loading"
    tally("damaged checkpoints", "harmless damage, loaded exactly")
