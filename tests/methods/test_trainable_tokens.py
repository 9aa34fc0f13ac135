"""Trainable tokens (``TrainableTokensConfig`` and LoRA's ``trainable_token_indices``): only the chosen embedding
rows train, tied output layers follow, checkpoints move both ways with HF peft, resized vocabularies are saved."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_inputs, make_model, model_logits
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.core.errors import PeftConfigError, TargetModuleError
from peftkit.methods.trainable_tokens import TrainableTokensLayer

peft = pytest.importorskip("peft")

ROWS = [3, 5, 9]


def _configs(lib, kind: str):
    return {
        "standalone": lib.TrainableTokensConfig(token_indices=ROWS),
        "lora": lib.LoraConfig(r=2, trainable_token_indices=ROWS, init_lora_weights=False),
    }[kind]


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    inputs = make_inputs(kind)
    inputs["input_ids"][:, :3] = torch.tensor(ROWS)  # the trained tokens occur, so untied models see them too
    return inputs


def _perturb_rows(model: nn.Module, seed: int = 4) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn(param.shape, generator=gen))


def _reference(kind: str, rows: dict[str, torch.Tensor]) -> nn.Module:
    """The base model with rows written into the weights by hand (through the shared weight for GPT-2)."""
    model = make_model(kind)
    with torch.no_grad():
        for module_name, values in rows.items():
            weight = model.get_submodule(module_name).weight
            for k, row in enumerate(ROWS):
                weight[row] = values[k]
    return model


@pytest.mark.parametrize("model_kind", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["standalone", "lora"])
def test_hf_checkpoints_load_both_ways_with_same_logits_and_keys(model_kind, kind, tmp_path) -> None:
    inputs = _inputs(model_kind)
    hf = peft.get_peft_model(make_model(model_kind), _configs(peft, kind))
    _perturb_rows(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours = peftkit.PeftModel.from_pretrained(make_model(model_kind), tmp_path / "hf").eval()
    want = model_logits(hf.eval(), inputs)
    assert (want - model_logits(make_model(model_kind), inputs)).abs().max() > 1e-2
    assert (model_logits(ours, inputs) - want).abs().max() <= 1e-5
    ours.save_pretrained(tmp_path / "pk")
    assert load_file(tmp_path / "pk" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "hf" / "adapter_model.safetensors").keys()
    back = peft.PeftModel.from_pretrained(make_model(model_kind), tmp_path / "pk")
    assert (model_logits(back, inputs) - want).abs().max() <= 1e-5


def test_rows_replace_the_embedding_and_tied_head_rows() -> None:
    model = peftkit.get_peft_model(make_model("gpt2"), peftkit.TrainableTokensConfig(token_indices=ROWS)).eval()
    _perturb_rows(model)
    delta = model.get_adapter_state_dict("default")["base_model.model.transformer.wte.trainable_tokens_delta"]
    assert isinstance(model.get_base_model().lm_head, TrainableTokensLayer)  # the tied head reads the same rows
    reference = _reference("gpt2", {"transformer.wte": delta})  # wte and lm_head share this weight
    inputs = _inputs("gpt2")
    assert (model_logits(model, inputs) - model_logits(reference, inputs)).abs().max() <= 1e-5


def test_untied_modules_by_name_each_get_their_rows() -> None:
    config = peftkit.LoraConfig(r=2, trainable_token_indices={"embed_tokens": ROWS, "lm_head": ROWS})
    model = peftkit.get_peft_model(make_model("llama"), config).eval()
    _perturb_rows(model)
    state = model.get_adapter_state_dict("default")
    reference = _reference("llama", {
        "model.embed_tokens": state["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"],
        "lm_head": state["base_model.model.lm_head.token_adapter.trainable_tokens_delta"]})
    inputs = _inputs("llama")
    assert (model_logits(model, inputs) - model_logits(reference, inputs)).abs().max() <= 1e-5


def test_training_changes_only_the_chosen_rows_and_keeps_gpt2_tied() -> None:
    base = make_model("gpt2")
    original = base.transformer.wte.weight.detach().clone()
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=2, trainable_token_indices=ROWS)).train()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens_delta" in n for n in trained)
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trained)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    inputs = make_inputs("gpt2")
    inputs["input_ids"][:, 2] = ROWS[0]  # the new token occurs, so its row gets gradients as input and output
    for _ in range(3):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = model.eval().merge_and_unload()
    assert merged.lm_head.weight is merged.transformer.wte.weight  # still tied
    changed = (merged.transformer.wte.weight != original).any(dim=1).nonzero().flatten().tolist()
    assert changed == [r for r in ROWS if r in changed] and ROWS[0] in changed


def test_merge_unmerge_restore_the_rows_exactly() -> None:
    base = make_model("gpt2")
    original = base.transformer.wte.weight.detach().clone()
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=2, trainable_token_indices=ROWS)).eval()
    _perturb_rows(model)
    inputs = make_inputs("gpt2")
    unmerged = model_logits(model, inputs)
    model.merge_adapter()
    assert (model_logits(model, inputs) - unmerged).abs().max() <= 1e-5
    model.unmerge_adapter()
    assert torch.equal(model.get_base_model().transformer.wte.base_layer.weight, original)
    assert torch.equal(model.unload().transformer.wte.weight, original)


def test_mixed_batch_routes_rows_to_their_adapters() -> None:
    model = peftkit.get_peft_model(make_model("gpt2"), peftkit.TrainableTokensConfig(token_indices=ROWS))
    model.add_adapter("other", peftkit.TrainableTokensConfig(token_indices=[7, 8]))
    _perturb_rows(model)
    model.eval()
    inputs = make_inputs("gpt2")
    inputs["input_ids"][:, :3] = torch.tensor([3, 7, 8])
    per_adapter = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        per_adapter[name] = model_logits(model, inputs)
    with model.disable_adapter():
        per_adapter["__base__"] = model_logits(model, inputs)
    names = ["other", "__base__", "default"]
    mixed = model_logits(model, inputs, adapter_names=names)
    torch.testing.assert_close(mixed, torch.stack([per_adapter[n][i] for i, n in enumerate(names)]),
                               atol=1e-5, rtol=0)


def test_resized_vocabulary_is_saved_and_restored(tmp_path) -> None:
    """TRL's chat-template case: tokens added, embeddings resized, the new rows trained; the base on disk has the old
    vocabulary, so save_embedding_layers="auto" saves the matrices and a fresh resize (other random rows) loads."""
    make_model("llama").save_pretrained(tmp_path / "base")

    def resized_base(seed: int) -> nn.Module:
        base = type(make_model("llama")).from_pretrained(tmp_path / "base").eval()
        torch.manual_seed(seed)
        base.resize_token_embeddings(VOCAB + 2, mean_resizing=False)
        return base

    new_rows = [VOCAB, VOCAB + 1]
    model = peftkit.get_peft_model(resized_base(1), peftkit.LoraConfig(r=2, trainable_token_indices=new_rows))
    _perturb_rows(model)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.token_adapter.base_layer.weight"].shape[0] == VOCAB + 2
    assert "base_model.model.lm_head.weight" in saved
    inputs = make_inputs("llama")
    inputs["input_ids"][:, 1] = VOCAB + 1
    want = model_logits(model.eval(), inputs)
    other = resized_base(2)
    assert (model_logits(other, inputs) - want).abs().max() > 1e-3  # another resize draws other new rows
    ours = peftkit.PeftModel.from_pretrained(other, tmp_path / "adapter").eval()
    assert (model_logits(ours, inputs) - want).abs().max() <= 1e-5
    hf = peft.PeftModel.from_pretrained(resized_base(3), tmp_path / "adapter")
    assert (model_logits(hf, inputs) - want).abs().max() <= 1e-5
    restored = ours.unload()  # the loaded matrices are undone with the adapter
    assert torch.equal(restored.lm_head.weight, resized_base(2).lm_head.weight)


def test_save_embedding_layers_true_writes_hf_keys(tmp_path) -> None:
    ours = peftkit.get_peft_model(make_model("gpt2"), peftkit.LoraConfig(r=2, trainable_token_indices=ROWS))
    ours.save_pretrained(tmp_path / "pk", save_embedding_layers=True)
    hf = peft.get_peft_model(make_model("gpt2"), peft.LoraConfig(r=2, trainable_token_indices=ROWS))
    hf.save_pretrained(tmp_path / "hf", save_embedding_layers=True)
    pk_keys = set(load_file(tmp_path / "pk" / "adapter_model.safetensors"))
    assert pk_keys == set(load_file(tmp_path / "hf" / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.token_adapter.base_layer.weight" in pk_keys
    assert set(peftkit.get_peft_model_state_dict(ours, save_embedding_layers=True)) == pk_keys


# ---- clear errors that change nothing ----------------------------------------------------------------------------
def test_out_of_range_ids_are_refused_and_the_model_is_unchanged() -> None:
    base = make_model("llama")
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(PeftConfigError, match="resize_token_embeddings"):
        peftkit.get_peft_model(base, peftkit.LoraConfig(r=2, trainable_token_indices=[1, VOCAB + 3]))
    assert [n for n, _ in base.named_modules()] == names


@pytest.mark.parametrize("kw, error, match", [
    ({"trainable_token_indices": []}, PeftConfigError, "empty"),
    ({"trainable_token_indices": {"embed_tokens": [1, 1]}}, PeftConfigError, "distinct"),
    ({"trainable_token_indices": {"embed_tokens": [1]}, "modules_to_save": ["embed_tokens"]}, PeftConfigError,
     "modules_to_save"),
])
def test_bad_configs_name_the_field(kw, error, match) -> None:
    with pytest.raises(error, match=match):
        peftkit.LoraConfig(**kw)


def test_unknown_module_name_and_double_wrapping_are_refused() -> None:
    with pytest.raises(TargetModuleError, match="embed_tokns"):
        peftkit.get_peft_model(make_model("llama"), peftkit.LoraConfig(trainable_token_indices={"embed_tokns": [1]}))
    base = make_model("llama")
    with pytest.raises(TargetModuleError, match="wrapped already"):
        peftkit.get_peft_model(base, peftkit.LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[1]))
    assert type(base.model.embed_tokens) is nn.Embedding


def test_tied_head_targeted_on_its_own_is_refused() -> None:
    base = make_model("gpt2")
    with pytest.raises(PeftConfigError, match="tied"):
        peftkit.get_peft_model(base, peftkit.TrainableTokensConfig(token_indices=ROWS,
                                                                   target_modules=["wte", "lm_head"]))
    assert type(base.lm_head) is nn.Linear and type(base.transformer.wte) is nn.Embedding


def test_active_adapters_with_overlapping_rows_are_refused() -> None:
    model = peftkit.get_peft_model(make_model("llama"), peftkit.TrainableTokensConfig(token_indices=ROWS))
    model.add_adapter("other", peftkit.TrainableTokensConfig(token_indices=[ROWS[0], 20]))
    model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="same rows"):
        model_logits(model, make_inputs("llama"))
