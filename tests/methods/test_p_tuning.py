"""P-tuning: the prompt encoder's output is the prompt, infix templates place virtual tokens anywhere, and a
checkpoint stores the encoder's output as a plain table (so a loaded adapter runs without the encoder).

Infix placement is also checked for prompt tuning, which shares the virtual-token mechanism.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SEQ, VOCAB, make_inputs, make_model, model_logits
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from peftkit import PeftConfigError, PeftModel, get_peft_model
from peftkit.methods.p_tuning import PromptEncoderConfig, PTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig

N = 4
CLS, SEP, MASK = 2, 3, 4
ENCODERS = ["MLP", "LSTM"]


def _config(kind: str, task: str | None = "CAUSAL_LM", n: int = N) -> PromptEncoderConfig | PromptTuningConfig:
    if kind == "prompt_tuning":
        return PromptTuningConfig(num_virtual_tokens=n, task_type=task)
    return PromptEncoderConfig(num_virtual_tokens=n, task_type=task, encoder_reparameterization_type=kind,
                               encoder_hidden_size=16)


def _ptuning(encoder: str, kind: str = "gpt2") -> PeftModel:
    return get_peft_model(make_model(kind, seed=0), _config(encoder)).eval()


def _table(model: PeftModel) -> torch.Tensor:
    with torch.no_grad():
        return model.adapter_modules["default"].prompt_table().detach().clone()


def _explicit_logits(base: nn.Module, ids: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """The base model on ``[P; E(x)]`` (unpadded rows)."""
    with torch.no_grad():
        embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)], 1)
        return base(inputs_embeds=embeds).logits


def _train(model: PeftModel, inputs: dict[str, torch.Tensor], steps: int, lr: float = 0.02) -> list[float]:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ---- the encoder's output is the prompt ----------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ENCODERS)
def test_forward_equals_base_on_encoder_output_prompt(encoder: str) -> None:
    model, base = _ptuning(encoder), make_model("gpt2", seed=0)
    module = model.adapter_modules["default"]
    assert module.mlp_head is not None and (module.lstm_head is not None) == (encoder == "LSTM")
    table = _table(model)
    assert table.shape == (N, 32)
    assert not torch.equal(table, module.embedding.weight.detach())  # it is the encoder's output, not its input
    ids = make_inputs("gpt2")["input_ids"]
    torch.testing.assert_close(model_logits(model, {"input_ids": ids}), _explicit_logits(base, ids, table),
                               atol=1e-5, rtol=1e-5)


def test_ptuning_config_is_the_prompt_encoder_config() -> None:
    assert PTuningConfig is PromptEncoderConfig
    assert PromptEncoderConfig(task_type="CAUSAL_LM").encoder_reparameterization_type == "MLP"


@pytest.mark.parametrize(("kw", "field"), [
    ({"encoder_reparameterization_type": "GRU"}, "encoder_reparameterization_type"),
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"num_virtual_tokens": -3}, "num_virtual_tokens"),
])
def test_bad_config_raises_naming_the_field(kw: dict, field: str) -> None:
    with pytest.raises(PeftConfigError, match=field):
        PromptEncoderConfig(task_type="CAUSAL_LM", **kw)


# ---- training ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_trains_only_adapter_params_and_base_stays_bit_identical(encoder: str) -> None:
    model = _ptuning(encoder)
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapter_modules.default.") for n in trainable)
    assert any(".lstm_head." in n for n in trainable) == (encoder == "LSTM")
    assert any(".mlp_head." in n for n in trainable)
    inputs = make_inputs("gpt2")
    losses = _train(model, inputs, steps=20)
    assert losses[-1] < losses[0]
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and grads <= trainable
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ---- checkpoints ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ENCODERS)
def test_checkpoint_holds_only_the_encoder_output(encoder: str, tmp_path) -> None:
    model = _ptuning(encoder)
    _train(model, make_inputs("gpt2"), steps=2)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"]
    torch.testing.assert_close(saved["prompt_embeddings"], _table(model), rtol=1e-6, atol=1e-6)
    module = model.adapter_modules["default"]
    assert module.mlp_head is not None  # saving leaves the live encoder in place, so training can go on


@pytest.mark.parametrize("encoder", ENCODERS)
def test_reload_gives_identical_logits_without_encoder(encoder: str, tmp_path) -> None:
    model = _ptuning(encoder)
    _train(model, make_inputs("gpt2"), steps=2)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("gpt2", seed=0), tmp_path).eval()
    module = loaded.adapter_modules["default"]
    assert module.lstm_head is None and module.mlp_head is None
    assert not any(p.requires_grad for p in loaded.parameters())
    inputs = make_inputs("gpt2")
    torch.testing.assert_close(model_logits(loaded, inputs), model_logits(model, inputs), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_trainable_reload_continues_training_the_plain_table(encoder: str, tmp_path) -> None:
    _ptuning(encoder).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("gpt2", seed=0), tmp_path, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable == ["adapter_modules.default.embedding.weight"]
    start = _table(loaded)
    losses = _train(loaded, make_inputs("gpt2"), steps=10, lr=0.05)
    assert losses[-1] < losses[0]
    assert not torch.equal(_table(loaded), start)


# ---- infix templates -----------------------------------------------------------------------------------------------
def _masked_lm() -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64)).eval()


def _template(model: PeftModel, rows: int = 2) -> tuple[torch.Tensor, list[int]]:
    """``[CLS] P0 P1 x x x P2 P3 [MASK] [SEP]``, and the positions of P0..P3."""
    virtual = model.virtual_token_ids()
    assert virtual.tolist() == list(range(VOCAB, VOCAB + N))
    text = torch.randint(5, VOCAB, (rows, 3), generator=torch.Generator().manual_seed(3))
    column = lambda v: torch.full((rows, 1), int(v))  # noqa: E731
    ids = torch.cat([column(CLS), column(virtual[0]), column(virtual[1]), text, column(virtual[2]),
                     column(virtual[3]), column(MASK), column(SEP)], 1)
    return ids, [1, 2, 6, 7]


@pytest.mark.parametrize("method", ["prompt_tuning", *ENCODERS])
def test_infix_virtual_tokens_take_prompt_rows_in_place(method: str) -> None:
    model = get_peft_model(_masked_lm(), _config(method, task=None)).eval()
    reference = _masked_lm()
    ids, positions = _template(model)
    seen: list[torch.Tensor] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    hook.remove()
    table = _table(model)
    assert seen[0].shape == (2, 10, 32)  # nothing inserted in front
    assert logits.shape == (2, 10, VOCAB)
    torch.testing.assert_close(seen[0][:, positions], table.expand(2, -1, -1), rtol=0, atol=0)
    real = [i for i in range(10) if i not in positions]
    words = reference.get_input_embeddings()(ids[:, real]).detach()
    torch.testing.assert_close(seen[0][:, real], words, rtol=0, atol=0)
    with torch.no_grad():  # and the model output is the base model's on those embeddings
        want = reference(inputs_embeds=seen[0], attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "MLP"])
def test_infix_template_on_causal_lm_adds_no_positions(method: str) -> None:
    model = get_peft_model(make_model("gpt2", seed=0), _config(method)).eval()
    virtual = model.virtual_token_ids()
    ids = torch.cat([virtual[:2].expand(3, -1), make_inputs("gpt2")["input_ids"][:, :5], virtual[2:].expand(3, -1)], 1)
    logits = model_logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert logits.shape == (3, 9, VOCAB)


@pytest.mark.parametrize("method", ["prompt_tuning", "MLP"])
def test_out_of_range_virtual_id_raises(method: str) -> None:
    model = get_peft_model(_masked_lm(), _config(method, task=None)).eval()
    ids, _ = _template(model)
    ids[:, 7] = VOCAB + N  # one past the last virtual token
    with pytest.raises(ValueError, match=f"{N} virtual tokens"):
        model(input_ids=ids)


def test_virtual_ids_without_active_prompt_adapter_raise() -> None:
    model = get_peft_model(_masked_lm(), _config("prompt_tuning", task=None)).eval()
    ids, _ = _template(model)
    model(input_ids=ids)  # fine with the adapter on
    with model.disable_adapter(), pytest.raises(ValueError, match="no prompt adapter is active"):
        model(input_ids=ids)


def test_base_model_called_directly_after_prompt_call_rejects_virtual_ids() -> None:
    model = get_peft_model(_masked_lm(), _config("prompt_tuning", task=None)).eval()
    ids, _ = _template(model)
    model(input_ids=ids)
    # The base model run on its own has no prompt: a stale table from the last call must not be used.
    with pytest.raises(ValueError, match="no prompt adapter is active"):
        model.get_base_model()(input_ids=ids)


def test_prompt_outside_template_goes_in_front_when_no_virtual_ids_given() -> None:
    model, reference = get_peft_model(_masked_lm(), _config("LSTM", task=None)).eval(), _masked_lm()
    ids = make_inputs("bert")["input_ids"]
    want = _explicit_logits(reference, ids, _table(model))
    torch.testing.assert_close(model_logits(model, {"input_ids": ids}), want, atol=1e-5, rtol=1e-5)
    assert model_logits(model, {"input_ids": ids}).shape == (3, N + SEQ, VOCAB)
