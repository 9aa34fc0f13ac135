"""Which modules a config wraps: names, suffixes, regexes, all-linear, exclusions, layers, defaults, task heads."""

from __future__ import annotations

import logging
from pathlib import Path

import peft
import pytest
import torch
from conftest import make_inputs, make_model, model_logits
from torch import nn

from peftkit import LoraConfig, PeftConfigError, PeftModel, TargetModuleError, get_peft_model
from peftkit.core.layer import AdapterLayer, ModulesToSaveWrapper
from peftkit.methods.lora import LoraLayer


def wrapped(peft_model: PeftModel) -> list[str]:
    """Names (as the user sees them in the base model) of the modules holding LoRA adapters."""
    return [n for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)]


def linear_like(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]


def targets_of(kind: str, **config_kwargs) -> list[str]:
    return wrapped(get_peft_model(make_model(kind), LoraConfig(**config_kwargs)))


def without_inputs_labels(kind: str) -> dict[str, torch.Tensor]:
    inputs = make_inputs(kind)
    inputs.pop("labels")
    return inputs


# ---- names, suffixes, regexes ----------------------------------------------------------------------------------
def test_target_modules_selects_only_that_module_when_full_name_given() -> None:
    name = "model.layers.1.self_attn.q_proj"
    assert targets_of("llama", target_modules=[name]) == [name]


def test_target_modules_selects_every_match_when_dotted_suffix_given() -> None:
    assert targets_of("llama", target_modules=["self_attn.q_proj", "up_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj",
    ]


@pytest.mark.parametrize("partial", ["proj", "_proj", "elf_attn.q_proj", "layers.0.self_attn.q"])
def test_target_modules_selects_nothing_when_name_is_not_at_a_dot(partial: str) -> None:
    with pytest.raises(TargetModuleError, match="match no module"):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=[partial]))


# ---- lists naming modules the model lacks (HF peft's rule: one entry must match) ------------------------------
def test_target_list_wraps_what_matches_and_logs_the_rest_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    # A recipe written for several architectures: GPT-2's c_attn and T5's q/v next to Llama's names.
    with caplog.at_level(logging.DEBUG, logger="peftkit"):
        got = targets_of("llama", target_modules=["c_attn", "q_proj", "v_proj", "q", "v"])
    assert got == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")]
    records = [r for r in caplog.records if r.name == "peftkit.core.targets" and r.levelno == logging.DEBUG]
    assert len(records) == 1 and "['c_attn', 'q', 'v']" in records[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


def test_target_list_logs_nothing_when_every_entry_matches(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="peftkit"):
        targets_of("llama", target_modules=["q_proj", "v_proj"])
    assert not [r for r in caplog.records if r.name == "peftkit.core.targets"]


def test_hf_checkpoint_loads_when_its_target_list_names_modules_the_model_lacks(tmp_path: Path) -> None:
    hf_config = peft.LoraConfig(target_modules=["q_proj", "v_proj", "c_attn", "query_key_value"],
                                init_lora_weights=False)
    hf_model = peft.get_peft_model(make_model("llama"), hf_config)
    hf_model.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    assert wrapped(ours) == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")]
    inputs = without_inputs_labels("llama")
    expected = model_logits(hf_model.eval(), inputs)
    assert (expected - model_logits(make_model("llama"), inputs)).abs().max() > 1e-4  # the adapter acts
    torch.testing.assert_close(model_logits(ours, inputs), expected)


def test_target_list_raises_with_close_names_when_no_entry_matches() -> None:
    model = make_model("llama")
    with pytest.raises(TargetModuleError, match=r"\['c_attn', 'q_prj'\] match no module .*'q_prj': close names "
                                                r"\['q_proj'"):
        get_peft_model(model, LoraConfig(target_modules=["c_attn", "q_prj"]))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_target_modules_regex_selects_full_matches_only() -> None:
    assert targets_of("llama", target_modules=r"model\.layers\.0\..*_proj") == [
        f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    assert targets_of("llama", target_modules=r".*\.[qv]_proj") == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")
    ]


@pytest.mark.parametrize(
    "partial_regex", ["q_proj", r"layers\.0\.self_attn\.q_proj", r"model\.layers\.0\.self_attn\.q"]
)
def test_target_modules_regex_selects_nothing_when_it_matches_only_part_of_a_name(partial_regex: str) -> None:
    model = make_model("llama")
    with pytest.raises(TargetModuleError, match="No module .* is selected"):
        get_peft_model(model, LoraConfig(target_modules=partial_regex))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


# ---- all-linear ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "extra", "head"),
    [
        ("gpt2", {}, {"lm_head"}),
        ("llama", {}, {"lm_head"}),
        ("opt", {}, {"lm_head"}),
        ("bert", {"task_type": "SEQ_CLS"}, {"classifier"}),
        ("roberta", {"task_type": "SEQ_CLS"}, {"classifier.dense", "classifier.out_proj"}),
        ("bert", {"modules_to_save": ["classifier"]}, {"classifier"}),
    ],
)
def test_all_linear_wraps_every_linear_layer_except_the_head(kind: str, extra: dict, head: set[str]) -> None:
    expected = [n for n in linear_like(make_model(kind)) if n not in head]
    peft_model = get_peft_model(make_model(kind), LoraConfig(target_modules="all-linear", **extra))
    assert wrapped(peft_model) == expected
    assert len(expected) >= 8
    heads = {name.split(".")[0] for name in head}
    all_lora = [n for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)]
    assert not [n for n in all_lora if n.split(".")[0] in heads]  # not the head, nor its trained copy
    if kind == "gpt2":  # Conv1D layers count as linear
        layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        assert {type(m.get_base_layer()).__name__ for m in layers} == {"Conv1D"}
    if extra:
        assert isinstance(peft_model.get_base_model().classifier, ModulesToSaveWrapper)


# ---- exclude_modules -------------------------------------------------------------------------------------------
def test_exclude_modules_list_removes_matches_when_given() -> None:
    got = targets_of("llama", target_modules="all-linear", exclude_modules=["o_proj", "mlp.down_proj", "gate_proj"])
    assert got == [f"model.layers.{i}.{n}" for i in (0, 1) for n in
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")]


def test_exclude_modules_regex_removes_full_matches_when_given() -> None:
    got = targets_of("llama", target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.layers\.1\..*")
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    # A regex matching only part of a name excludes nothing.
    assert len(targets_of("llama", target_modules=["q_proj"], exclude_modules=r"layers\.1")) == 2


def test_exclude_modules_raises_when_it_removes_every_target() -> None:
    with pytest.raises(TargetModuleError, match="exclude_modules"):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


# ---- layers_to_transform ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "targets", "layers", "pattern", "expected"),
    [
        ("llama", ["q_proj"], [1], None, ["model.layers.1.self_attn.q_proj"]),
        ("llama", ["q_proj"], 1, "layers", ["model.layers.1.self_attn.q_proj"]),
        ("gpt2", ["c_attn"], [0], None, ["transformer.h.0.attn.c_attn"]),
        ("gpt2", ["c_attn"], [0], "h", ["transformer.h.0.attn.c_attn"]),
        ("bert", ["query"], [1], ["layer"], ["bert.encoder.layer.1.attention.self.query"]),
        ("t5", ["SelfAttention.q"], [1], "block",
         ["encoder.block.1.layer.0.SelfAttention.q", "decoder.block.1.layer.0.SelfAttention.q"]),
        ("opt", ["q_proj", "v_proj"], [0, 1], None,
         [f"model.decoder.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("v", "q")]),
    ],
)
def test_layers_to_transform_keeps_only_those_layers(kind, targets, layers, pattern, expected) -> None:
    got = targets_of(kind, target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)
    assert got == expected


def test_layers_to_transform_selects_nothing_when_pattern_is_absent() -> None:
    model = make_model("llama")
    with pytest.raises(TargetModuleError, match="layers_to_transform"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


# ---- architecture defaults -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "leaves"),
    [("gpt2", ["c_attn"]), ("bert", ["query", "value"]), ("roberta", ["query", "value"]),
     ("llama", ["q_proj", "v_proj"]), ("t5", ["q", "v"]), ("opt", ["q_proj", "v_proj"])],
)
def test_default_targets_follow_architecture_when_target_modules_is_none(kind: str, leaves: list[str]) -> None:
    user_config = LoraConfig()
    peft_model = get_peft_model(make_model(kind), user_config)
    expected = [n for n, _ in make_model(kind).named_modules() if n.rsplit(".", 1)[-1] in leaves]
    assert wrapped(peft_model) == expected and len(expected) >= 2
    assert sorted(peft_model.peft_config["default"].target_modules) == sorted(leaves)
    assert user_config.target_modules is None  # the user's object is not edited


def test_default_targets_raise_when_architecture_is_unknown() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # No table entry and no attention to derive targets from: the error lists the linears to choose from.
    with pytest.raises(PeftConfigError, match=r"no default for Sequential.* \['0', '2'\]; pass target_modules"):
        get_peft_model(model, LoraConfig())
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert wrapped(get_peft_model(model, LoraConfig(target_modules=["0"]))) == ["0"]


# ---- task heads ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "head_keys"), [
    ("bert", ["classifier.bias", "classifier.weight"]),
    ("roberta", ["classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias",
                 "classifier.out_proj.weight"]),
])
def test_seq_cls_trains_and_saves_a_copy_of_the_classifier(tmp_path: Path, kind: str, head_keys: list[str]) -> None:
    user_config = LoraConfig(task_type="SEQ_CLS")
    peft_model = get_peft_model(make_model(kind), user_config)
    assert peft_model.peft_config["default"].modules_to_save == ["classifier"]
    assert user_config.modules_to_save is None
    head = peft_model.get_base_model().classifier
    assert isinstance(head, ModulesToSaveWrapper)
    copy, original = head.modules_to_save["default"], head.base_layer
    assert copy is not original
    assert all(p.requires_grad for p in copy.parameters())
    assert not any(p.requires_grad for p in original.parameters())

    with torch.no_grad():
        for p in copy.parameters():
            p.add_(0.5)
    state = peft_model.get_adapter_state_dict("default")
    saved_head = sorted(k for k in state if ".classifier." in k)
    assert saved_head == [f"base_model.model.{k}" for k in head_keys]
    for key in head_keys:
        torch.testing.assert_close(state[f"base_model.model.{key}"], copy.state_dict()[key.split(".", 1)[1]])

    inputs = without_inputs_labels(kind)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_model(kind), tmp_path)
    torch.testing.assert_close(model_logits(reloaded, inputs), model_logits(peft_model, inputs))
    with peft_model.disable_adapter():
        torch.testing.assert_close(model_logits(peft_model, inputs), model_logits(make_model(kind), inputs))


def test_seq_cls_loads_hf_peft_checkpoint_when_modules_to_save_names_absent_heads(tmp_path: Path) -> None:
    # HF peft writes modules_to_save=["classifier", "score"] for every SEQ_CLS adapter; BERT has no "score".
    hf_model = peft.get_peft_model(make_model("bert"), peft.LoraConfig(task_type="SEQ_CLS", init_lora_weights=False))
    with torch.no_grad():
        hf_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    hf_model.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make_model("bert"), tmp_path)
    inputs = without_inputs_labels("bert")
    torch.testing.assert_close(model_logits(ours, inputs), model_logits(hf_model.eval(), inputs))


# ---- a second adapter ------------------------------------------------------------------------------------------
SECOND_ADAPTER_CASES = {
    "explicit": ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    "default": ("gpt2", {}),
    "regex": ("opt", {"target_modules": r".*\.(q|k)_proj"}),
    "all_linear": ("llama", {"target_modules": "all-linear"}),
    "seq_cls": ("bert", {"task_type": "SEQ_CLS", "target_modules": "all-linear"}),
}


@pytest.mark.parametrize("case", sorted(SECOND_ADAPTER_CASES))
def test_second_adapter_finds_the_same_targets_without_nesting(case: str) -> None:
    kind, kwargs = SECOND_ADAPTER_CASES[case]
    peft_model = get_peft_model(make_model(kind), LoraConfig(**kwargs))
    names_before = wrapped(peft_model)
    keys_before = sorted(peft_model.get_adapter_state_dict("default"))
    peft_model.add_adapter("second", LoraConfig(**kwargs))
    assert wrapped(peft_model) == names_before
    assert sorted(peft_model.get_adapter_state_dict("default")) == keys_before
    assert sorted(peft_model.get_adapter_state_dict("second")) == keys_before
    for _, layer in peft_model.named_modules():
        if isinstance(layer, AdapterLayer):
            assert not isinstance(layer.base_layer, AdapterLayer)
            assert layer.adapter_names == ["default", "second"]


def test_second_adapter_leaves_first_adapters_head_alone_when_it_targets_all_linear() -> None:
    # Adapter 1 trains a copy of the classifier; adapter 2 (no task head) asks for every linear layer. The
    # classifier's modules_to_save wrapper must not be wrapped again: adapter 1's checkpoint keys stay HF's.
    peft_model = get_peft_model(make_model("bert"), LoraConfig(task_type="SEQ_CLS", target_modules="all-linear"))
    keys_before = sorted(peft_model.get_adapter_state_dict("default"))
    peft_model.add_adapter("second", LoraConfig(target_modules="all-linear"))
    assert sorted(peft_model.get_adapter_state_dict("default")) == keys_before
    assert isinstance(peft_model.get_base_model().classifier, ModulesToSaveWrapper)


def test_second_adapter_keeps_active_adapters_biases_trainable_when_both_train_biases() -> None:
    # bias="all" trains base biases shared by every adapter; adding an inactive adapter must not freeze them.
    peft_model = get_peft_model(make_model("gpt2"), LoraConfig(bias="all"))
    biases = [p for n, p in peft_model.named_parameters() if n.endswith(".bias") and "lora_" not in n]
    assert biases and all(p.requires_grad for p in biases)
    peft_model.add_adapter("second", LoraConfig(bias="all"))
    assert peft_model.active_adapters == ["default"]
    assert all(p.requires_grad for p in biases)
