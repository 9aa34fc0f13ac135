"""Config JSON round trips, Hugging Face peft file compatibility, the method registry, and core/method separation."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import peft
import pytest

import peftkit
from peftkit import LoraConfig, PeftConfig, PeftConfigError, PeftMethod, register
from peftkit.core import registry
from peftkit.core.config import TunerConfig
from peftkit.core.registry import config_class_for, method_for, registered_peft_types
from peftkit.methods.lora import LoraMethod

CONFIG = "adapter_config.json"


def full_lora_config() -> LoraConfig:
    """Every field away from its default."""
    return LoraConfig(
        task_type="CAUSAL_LM", base_model_name_or_path="tiny/llama", inference_mode=True,
        target_modules=["v_proj", "q_proj"], exclude_modules=r".*\.layers\.1\..*", layers_to_transform=[0, 1],
        layers_pattern="layers", modules_to_save=["lm_head"], r=4, lora_alpha=16, lora_dropout=0.1,
        fan_in_fan_out=True, bias="lora_only", use_rslora=True, init_lora_weights="gaussian",
        rank_pattern={"q_proj": 2, r"layers\.0\.self_attn\.v_proj": 6}, alpha_pattern={"v_proj": 3.5}, gate="mean",
    )


# peftkit's own LoRA options; HF peft has no such field (and the field is left out of files while it is off).
PEFTKIT_ONLY = {"gate"}


def lora_fields(config: LoraConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def comparable(name: str, value: object) -> object:
    """Name lists are sets to HF peft (order is meaningless); everything else compares as is."""
    if name in ("target_modules", "exclude_modules", "modules_to_save") and isinstance(value, (list, set)):
        return set(value)
    return value


# ---- round trips -----------------------------------------------------------------------------------------------
def test_to_dict_round_trips_every_field_when_all_are_set() -> None:
    config = full_lora_config()
    data = config.to_dict()
    assert data["peft_type"] == "LORA"
    assert set(data) == {"peft_type"} | {f.name for f in dataclasses.fields(LoraConfig)}
    json.dumps(data)  # JSON-ready
    for cls in (LoraConfig, PeftConfig):
        restored = cls.from_dict(json.loads(json.dumps(data)))
        assert type(restored) is LoraConfig
        assert restored == config


@pytest.mark.parametrize("loader", [LoraConfig, PeftConfig])
def test_save_pretrained_round_trips_every_field_when_loaded_back(tmp_path: Path, loader: type[PeftConfig]) -> None:
    config = full_lora_config()
    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / CONFIG).read_text())
    assert on_disk["rank_pattern"] == {"q_proj": 2, r"layers\.0\.self_attn\.v_proj": 6}
    assert on_disk["alpha_pattern"] == {"v_proj": 3.5}
    restored = loader.from_pretrained(tmp_path)
    assert type(restored) is LoraConfig
    assert lora_fields(restored) == lora_fields(config)


def test_from_pretrained_reads_subfolder_when_given(tmp_path: Path) -> None:
    LoraConfig(r=2, target_modules=["q"]).save_pretrained(tmp_path / "second")
    assert PeftConfig.from_pretrained(tmp_path, subfolder="second") == LoraConfig(r=2, target_modules=["q"])


def test_lora_config_stores_sorted_list_when_targets_are_a_set(tmp_path: Path) -> None:
    config = LoraConfig(target_modules={"v_proj", "q_proj", "k_proj"})
    assert config.target_modules == ["k_proj", "q_proj", "v_proj"]
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG).read_text())["target_modules"] == ["k_proj", "q_proj", "v_proj"]


def test_lora_config_defaults_match_hf_peft() -> None:
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for name in ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "init_lora_weights",
                 "rank_pattern", "alpha_pattern", "target_modules", "modules_to_save", "layers_to_transform",
                 "layers_pattern", "task_type", "inference_mode"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_lora_config_mutable_defaults_are_not_shared() -> None:
    first, second = LoraConfig(), LoraConfig()
    first.rank_pattern["q_proj"] = 2
    assert second.rank_pattern == {} and LoraConfig().rank_pattern == {}


# ---- Hugging Face peft files -----------------------------------------------------------------------------------
HF_CASES = {
    "full": dict(
        r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], bias="lora_only",
        task_type="CAUSAL_LM", rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}, layers_to_transform=[0],
        layers_pattern="layers", use_rslora=True, init_lora_weights="gaussian", modules_to_save=["lm_head"],
        exclude_modules=["o_proj"], fan_in_fan_out=True, base_model_name_or_path="some/model",
    ),
    "all_linear_regex_exclude": dict(target_modules="all-linear", exclude_modules=r".*mlp.*", init_lora_weights=False),
    "regex_target": dict(target_modules=r".*\.q_proj", bias="all", lora_dropout=0.05),
    "int_layer": dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern=["layers", "h"]),
    "qalora_off_custom_group_size": dict(target_modules=["q_proj"], use_qalora=False, qalora_group_size=32),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_from_pretrained_reads_hf_peft_config_with_same_values(tmp_path: Path, case: str) -> None:
    hf_config = peft.LoraConfig(**HF_CASES[case])
    hf_config.save_pretrained(tmp_path)
    ours = PeftConfig.from_pretrained(tmp_path)
    assert type(ours) is LoraConfig
    for f in dataclasses.fields(LoraConfig):
        if f.name in PEFTKIT_ONLY:
            assert getattr(ours, f.name) is None, f.name
            continue
        want = getattr(hf_config, f.name)
        if f.name == "layers_to_transform" and isinstance(want, int):
            want = [want]
        assert comparable(f.name, getattr(ours, f.name)) == comparable(f.name, want), f.name


def test_hf_peft_reads_peftkit_config_with_same_values(tmp_path: Path) -> None:
    ours = dataclasses.replace(full_lora_config(), fan_in_fan_out=False, gate=None)
    ours.save_pretrained(tmp_path)
    theirs = peft.LoraConfig.from_pretrained(tmp_path)
    assert theirs.peft_type == peft.PeftType.LORA
    for f in dataclasses.fields(LoraConfig):
        if f.name in PEFTKIT_ONLY:
            continue
        assert comparable(f.name, getattr(theirs, f.name)) == comparable(f.name, getattr(ours, f.name)), f.name


def test_from_dict_refuses_config_of_other_type_when_class_is_specific() -> None:
    @dataclass(kw_only=True)
    class OtherConfig(TunerConfig):
        peft_type: ClassVar[str] = "OTHER_TEST"

    with isolated_registry():
        register(OtherConfig)(type("OtherMethod", (PeftMethod,), {}))
        with pytest.raises(PeftConfigError, match="peft_type='OTHER_TEST' but LoraConfig was asked for"):
            LoraConfig.from_dict({"peft_type": "OTHER_TEST"})


def test_from_dict_raises_when_base_class_gets_no_peft_type() -> None:
    with pytest.raises(PeftConfigError, match="no 'peft_type' field"):
        PeftConfig.from_dict({"r": 4})
    assert LoraConfig.from_dict({"r": 4}) == LoraConfig(r=4)


# ---- registry --------------------------------------------------------------------------------------------------
class isolated_registry:
    """Registrations made inside the block are forgotten afterwards."""

    def __enter__(self) -> None:
        self.saved = dict(registry._METHODS), dict(registry._CONFIGS_BY_TYPE)

    def __exit__(self, *exc: object) -> None:
        registry._METHODS.clear()
        registry._METHODS.update(self.saved[0])
        registry._CONFIGS_BY_TYPE.clear()
        registry._CONFIGS_BY_TYPE.update(self.saved[1])


def test_registered_peft_types_contains_lora() -> None:
    assert "LORA" in registered_peft_types()
    assert config_class_for("LORA") is LoraConfig
    assert method_for(LoraConfig()) is LoraMethod


def test_register_rejects_peft_type_when_registered_twice() -> None:
    @dataclass(kw_only=True)
    class ImpostorConfig(TunerConfig):
        peft_type: ClassVar[str] = "LORA"

    with isolated_registry():
        with pytest.raises(ValueError, match="'LORA' is registered twice"):
            register(ImpostorConfig)(type("ImpostorMethod", (PeftMethod,), {}))
        with pytest.raises(ValueError, match="registered twice"):
            register(LoraConfig)(type("SecondLoraMethod", (PeftMethod,), {}))
        assert config_class_for("LORA") is LoraConfig
        assert method_for(LoraConfig()) is LoraMethod


def test_register_rejects_peft_type_when_not_upper_case() -> None:
    @dataclass(kw_only=True)
    class LowerConfig(TunerConfig):
        peft_type: ClassVar[str] = "lower"

    with isolated_registry():
        with pytest.raises(ValueError, match="upper-case"):
            register(LowerConfig)(type("LowerMethod", (PeftMethod,), {}))
        assert "lower" not in registered_peft_types()


def test_from_pretrained_dispatches_on_peft_type_when_several_methods_exist(tmp_path: Path) -> None:
    @dataclass(kw_only=True)
    class ToyConfig(TunerConfig):
        peft_type: ClassVar[str] = "TOY_TEST"
        width: int = 3

    with isolated_registry():
        register(ToyConfig)(type("ToyMethod", (PeftMethod,), {}))
        assert {"LORA", "TOY_TEST"} <= set(registered_peft_types())
        ToyConfig(width=5, target_modules=["fc"]).save_pretrained(tmp_path / "toy")
        LoraConfig(r=2).save_pretrained(tmp_path / "lora")
        toy, lora = PeftConfig.from_pretrained(tmp_path / "toy"), PeftConfig.from_pretrained(tmp_path / "lora")
        assert type(toy) is ToyConfig and toy.width == 5 and toy.target_modules == ["fc"]
        assert type(lora) is LoraConfig and lora.r == 2
        assert method_for(toy).__name__ == "ToyMethod"
    assert "TOY_TEST" not in registered_peft_types()


def test_method_for_lists_registered_configs_when_config_is_unregistered() -> None:
    @dataclass(kw_only=True)
    class StrayConfig(TunerConfig):
        peft_type: ClassVar[str] = "STRAY"

    with pytest.raises(PeftConfigError, match=r"StrayConfig is not a registered method config.*LoraConfig"):
        method_for(StrayConfig())


# ---- core/method separation ------------------------------------------------------------------------------------
# Method names that must never appear in the core. Matched case-insensitively as whole identifiers or identifier
# parts (split at '_', '-', case changes), so "adapter", "prefix" (KEY_PREFIX) and "soft" stay legal core words.
METHOD_WORDS = ("lora", "loha", "lokr", "adalora", "dora", "rslora", "ia3", "vera", "oft", "boft", "prefix_tuning",
                "prefixtuning", "prompt_tuning", "prompttuning", "p_tuning", "ptuning", "adaption_prompt",
                "adapter_fusion", "adapterfusion", "bottleneck", "houlsby", "pfeiffer", "compacter", "qalora")


def _identifier_parts(text: str) -> set[str]:
    words: set[str] = set()
    for token in re.findall(r"[A-Za-z0-9_\-]+", text):
        pieces = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", token).replace("-", " ").replace("_", " ").lower().split()
        words.update(pieces)
        words.add(token.lower().replace("-", "_"))
        words.update("_".join(pieces[i:i + 2]) for i in range(len(pieces) - 1))
    return words


def test_identifier_parts_finds_method_names_when_embedded() -> None:
    # The checker itself: it must see a method named in code, strings and docstrings, and spare core words.
    assert {"lora"} <= _identifier_parts("class LoraLayer: ...") & set(METHOD_WORDS)
    assert {"lora"} <= _identifier_parts('raise X("for example \\"LORA\\"")')
    assert {"prefix_tuning"} <= _identifier_parts("PREFIX_TUNING = 1")
    assert {"ia3"} <= _identifier_parts("IA3Config")
    assert not _identifier_parts("KEY_PREFIX = 'base_model.model.'; adapter_names; soft; several; adorable") & set(
        METHOD_WORDS
    )


def test_core_source_names_no_method() -> None:
    core = Path(peftkit.__file__).parent / "core"
    sources = sorted(core.glob("*.py"))
    assert len(sources) >= 8
    found = {}
    for path in sources:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            hits = _identifier_parts(line) & set(METHOD_WORDS)
            if hits:
                found[f"{path.name}:{lineno}"] = (sorted(hits), line.strip())
    assert not found, f"peftkit/core names a method: {found}"
