"""Prompt tuning against its definition: the base model run on explicit embeddings ``[P; E(x)]``.

Covers the forward for causal LMs and encoders (padding on either side, labels, token types, token
classification), ``generate`` (greedy, beam search, left padding, T5 with one or two prompts), prompt
ensembles, initialisation, config checks, several adapters (mixed batches included) and unloading.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SEQ, VOCAB, make_inputs, make_model, model_logits
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForTokenClassification

from peftkit import NotMergeableError, PeftConfigError, PeftModel, get_peft_model
from peftkit.methods.prompt_tuning import PromptTuningConfig

N = 4  # virtual tokens
TASKS = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "opt": "CAUSAL_LM", "bert": "SEQ_CLS", "roberta": "SEQ_CLS",
         "t5": "SEQ_2_SEQ_LM"}
LENGTHS = (SEQ, 5, 3)  # real tokens per row of a padded batch
GEN = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}


def _prompt_model(kind: str, n: int = N, **kw) -> PeftModel:
    config = PromptTuningConfig(num_virtual_tokens=n, task_type=TASKS[kind], **kw)
    return get_peft_model(make_model(kind, seed=0), config).eval()


def _table(model: PeftModel, name: str = "default") -> torch.Tensor:
    return model.adapter_modules[name].prompt_table().detach()


def _padded(kind: str, side: str) -> dict[str, torch.Tensor]:
    """``make_inputs`` with rows of ``LENGTHS`` real tokens, padded with id 0 on ``side`` (or not at all)."""
    inputs = make_inputs(kind)
    if side == "none":
        return inputs
    ids, mask = inputs["input_ids"].clone(), torch.zeros_like(inputs["attention_mask"])
    labels = inputs["labels"].clone() if inputs["labels"].dim() == 2 else None
    for row, length in enumerate(LENGTHS):
        real = slice(0, length) if side == "right" else slice(SEQ - length, SEQ)
        ids[row] = 0
        ids[row, real] = inputs["input_ids"][row, :length]
        mask[row, real] = 1
        if labels is not None:
            labels[row] = -100
            labels[row, real] = inputs["labels"][row, :length]
    out = {"input_ids": ids, "attention_mask": mask, "labels": inputs["labels"] if labels is None else labels}
    return out


def _insert(values: torch.Tensor, mask: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Row r of ``values`` with ``block[r]`` put right before the row's first attended position."""
    rows = []
    for row in range(values.shape[0]):
        start = int(mask[row].nonzero()[0])
        rows.append(torch.cat([values[row, :start], block[row].to(values.dtype), values[row, start:]]))
    return torch.stack(rows)


def _explicit(base: nn.Module, inputs: dict[str, torch.Tensor], prompt: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference inputs: ``[E(pads); P; E(x)]`` as ``inputs_embeds``, mask and labels extended to match."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows, n = ids.shape[0], prompt.shape[-2]
    prompt = prompt.expand(rows, -1, -1) if prompt.dim() == 2 else prompt
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
    out = {"inputs_embeds": _insert(embeds, mask, prompt),
           "attention_mask": _insert(mask, mask, torch.ones(rows, n, dtype=mask.dtype))}
    labels = inputs.get("labels")
    if labels is not None:
        out["labels"] = _insert(labels, mask, torch.full((rows, n), -100)) if labels.dim() == 2 else labels
    if "token_type_ids" in inputs:
        out["token_type_ids"] = _insert(inputs["token_type_ids"], mask, torch.zeros(rows, n, dtype=torch.long))
    return out


# ---- forward = base model on [P; E(x)] -----------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["none", "right", "left"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "opt", "bert", "roberta"])
def test_forward_equals_base_on_explicit_prompt_embeddings(kind: str, side: str) -> None:
    model, base = _prompt_model(kind), make_model(kind, seed=0)
    inputs = _padded(kind, side)
    with torch.no_grad():
        got = model(**inputs)
        want = base(**_explicit(base, inputs, _table(model)))
    if TASKS[kind] == "CAUSAL_LM":
        assert got.logits.shape == (3, N + SEQ, VOCAB)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    # causal LM: virtual positions carry label -100, so the loss is the base loss of the explicit run
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    real = got.logits[:, N:] if TASKS[kind] == "CAUSAL_LM" else got.logits
    assert (real - model_logits(base, inputs)).abs().max() > 1e-3, "the prompt changes nothing: vacuous test"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_left_padding_puts_prompt_after_pads_before_first_real_token(kind: str) -> None:
    model = _prompt_model(kind)
    inputs = _padded(kind, "left")
    seen: list[dict[str, torch.Tensor]] = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    ids, mask, labels = seen[0]["input_ids"], seen[0]["attention_mask"], seen[0]["labels"]
    virtual = torch.arange(VOCAB, VOCAB + N)
    for row, length in enumerate(LENGTHS):
        pads = SEQ - length
        assert (ids[row, :pads] == 0).all() and (mask[row, :pads] == 0).all()
        assert torch.equal(ids[row, pads:pads + N], virtual)
        assert (mask[row, pads:] == 1).all()
        assert (labels[row, pads:pads + N] == -100).all()
        assert torch.equal(ids[row, pads + N:], inputs["input_ids"][row, pads:])
        assert torch.equal(labels[row, pads + N:], inputs["labels"][row, pads:])


def test_left_padded_rows_equal_their_unpadded_runs() -> None:
    model = _prompt_model("llama")
    inputs = _padded("llama", "left")
    with torch.no_grad():
        batched = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        for row, length in enumerate(LENGTHS):
            ids = inputs["input_ids"][row:row + 1, SEQ - length:]
            alone = model(input_ids=ids).logits
            torch.testing.assert_close(batched[row:row + 1, -length:], alone[:, -length:], atol=1e-5, rtol=1e-5)


def test_bert_token_type_ids_are_extended_with_zeros_for_the_prompt() -> None:
    model, base = _prompt_model("bert"), make_model("bert", seed=0)
    inputs = make_inputs("bert")
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    inputs["token_type_ids"][:, 5:] = 1  # a second segment
    seen: list[torch.Tensor] = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["token_type_ids"].clone()), with_kwargs=True)
    with torch.no_grad():
        got = model(**inputs).logits
    hook.remove()
    assert torch.equal(seen[0], torch.cat([torch.zeros(3, N, dtype=torch.long), inputs["token_type_ids"]], 1))
    want = model_logits(base, _explicit(base, inputs, _table(model)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_token_classification_logits_and_loss_align_with_real_tokens() -> None:
    torch.manual_seed(0)
    base = BertForTokenClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=5)).eval()
    reference = BertForTokenClassification(base.config).eval()
    reference.load_state_dict(base.state_dict())
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=N, task_type="TOKEN_CLS")).eval()
    inputs = _padded("gpt2", "right")
    labels = torch.randint(0, 5, (3, SEQ)).masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels)
        full = reference(**_explicit(reference, {**inputs, "labels": labels}, _table(model)))
    assert out.logits.shape == (3, SEQ, 5)
    torch.testing.assert_close(out.logits, full.logits[:, N:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, 5), labels.reshape(-1)))


# ---- generate ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_unpadded_batch_equals_base_on_prompt_embeddings(kind: str, beams: int) -> None:
    model, base = _prompt_model(kind), make_model(kind, seed=0)
    inputs = make_inputs(kind)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, num_beams=beams, **GEN)
        ref = _explicit(base, {"input_ids": ids, "attention_mask": mask}, _table(model))
        want = base.generate(**ref, num_beams=beams, **GEN)
    assert got.shape == (3, SEQ + 4)
    assert torch.equal(got[:, :SEQ], ids)  # the caller's ids come back, without virtual ones
    assert torch.equal(got[:, SEQ:], want[:, -4:])
    assert int(got.max()) < VOCAB


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_left_padded_rows_equal_their_unpadded_base_runs(kind: str, beams: int) -> None:
    model, base = _prompt_model(kind), make_model(kind, seed=0)
    inputs = _padded(kind, "left")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, num_beams=beams, **GEN)
    assert got.shape == (3, SEQ + 4)
    assert torch.equal(got[:, :SEQ], ids)
    for row, length in enumerate(LENGTHS):
        alone = {"input_ids": ids[row:row + 1, SEQ - length:], "attention_mask": torch.ones(1, length).long()}
        with torch.no_grad():
            want = base.generate(**_explicit(base, alone, _table(model)), num_beams=beams, **GEN)
        assert torch.equal(got[row, SEQ:], want[0, -4:]), f"row {row}"


def _t5_greedy_reference(base: nn.Module, ids: torch.Tensor, enc_prompt: torch.Tensor,
                         dec_prompt: torch.Tensor | None, steps: int) -> torch.Tensor:
    """Greedy decoding written out on explicit embeddings: encoder ``[P_enc; E(x)]``, decoder ``[P_dec; E(y)]``."""
    embed = base.get_input_embeddings()
    rows = ids.shape[0]
    enc = torch.cat([enc_prompt.expand(rows, -1, -1), embed(ids)], 1)
    out = torch.zeros(rows, 1, dtype=torch.long)  # decoder_start_token_id
    for _ in range(steps):
        dec = embed(out) if dec_prompt is None else torch.cat([dec_prompt.expand(rows, -1, -1), embed(out)], 1)
        logits = base(inputs_embeds=enc, decoder_inputs_embeds=dec).logits[:, -1]
        logits[:, 1] = -float("inf")  # min_new_tokens: no eos
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], 1)
    return out


@pytest.mark.parametrize("submodules", [1, 2])
def test_t5_generate_returns_real_tokens_only(submodules: int) -> None:
    model = _prompt_model("t5", num_transformer_submodules=submodules)
    base = make_model("t5", seed=0)
    ids = make_inputs("t5")["input_ids"]
    table = _table(model)
    assert table.shape == (submodules * N, 32)
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GEN)
        want = _t5_greedy_reference(base, ids, table[:N], table[N:] if submodules == 2 else None, 4)
    assert int(got.max()) < VOCAB
    assert got.shape == (3, 1 + 4)  # decoder start + new tokens; the decoder prompt is not in the output
    assert torch.equal(got, want)


def test_t5_training_loss_equals_explicit_embedding_loss_with_two_prompts() -> None:
    model, base = _prompt_model("t5", num_transformer_submodules=2), make_model("t5", seed=0)
    inputs = make_inputs("t5")
    table = _table(model)
    embed = base.get_input_embeddings()
    with torch.no_grad():
        got = model(**inputs)
        enc = torch.cat([table[:N].expand(3, -1, -1), embed(inputs["input_ids"])], 1)
        dec_ids = base.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
        dec = torch.cat([table[N:].expand(3, -1, -1), embed(dec_ids)], 1)
        labels = torch.cat([torch.full((3, N), -100), inputs["labels"]], 1)
        want = base(inputs_embeds=enc, decoder_inputs_embeds=dec, labels=labels)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)


# ---- prompt ensembles ----------------------------------------------------------------------------------------------
def _ensemble(kind: str = "bert") -> PeftModel:
    return _prompt_model(kind, num_prompts=3)


def _per_prompt_logits(model: PeftModel, base: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, prompts, classes): each prompt of the ensemble run on its own, as explicit embeddings."""
    table = _table(model)
    runs = [model_logits(base, _explicit(base, inputs, table[e * N:(e + 1) * N])) for e in range(3)]
    return torch.stack(runs, dim=1)


def test_ensemble_forward_runs_every_row_once_per_prompt() -> None:
    model, base = _ensemble(), make_model("bert", seed=0)
    inputs = make_inputs("bert")
    assert _table(model).shape == (3 * N, 32)
    logits = model_logits(model, inputs)
    assert logits.shape == (9, 3)
    torch.testing.assert_close(logits.view(3, 3, 3), _per_prompt_logits(model, base, inputs), atol=1e-5, rtol=1e-5)


def test_ensemble_predict_mean_equals_mean_of_separate_prompts() -> None:
    model, base = _ensemble(), make_model("bert", seed=0)
    inputs = make_inputs("bert")
    inputs.pop("labels")
    with torch.no_grad():
        got = model.ensemble_predict(reduce="mean", **inputs)
    torch.testing.assert_close(got, _per_prompt_logits(model, base, inputs).mean(1), atol=1e-5, rtol=1e-5)


def test_ensemble_predict_vote_returns_majority_class() -> None:
    model, base = _ensemble(), make_model("bert", seed=0)
    with torch.no_grad():  # spread the prompts so they disagree on some rows
        model.adapter_modules["default"].embedding.weight.mul_(3.0)
    inputs = make_inputs("bert", batch=6)
    inputs.pop("labels")
    with torch.no_grad():
        got = model.ensemble_predict(reduce="vote", **inputs)
    votes = _per_prompt_logits(model, base, inputs).argmax(-1)  # (batch, prompts)
    want = torch.stack([torch.bincount(row, minlength=3).argmax() for row in votes])  # ties: lowest class
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="reduce"):
        model.ensemble_predict(reduce="median", **inputs)


def test_ensemble_training_reduces_loss_and_trains_all_prompts() -> None:
    model = _ensemble()
    model.train()
    inputs = make_inputs("bert")
    start = _table(model).clone()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(10):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    moved = (_table(model) - start).abs().amax(-1).view(3, N)
    assert (moved > 0).all()  # every prompt of the ensemble got gradients


def test_ensemble_in_mixed_batch_or_generate_raises() -> None:
    model = _ensemble()
    model.add_adapter("single", PromptTuningConfig(num_virtual_tokens=N, task_type="SEQ_CLS"))
    inputs = make_inputs("bert")
    with pytest.raises(ValueError, match="num_prompts"):
        model(**inputs, adapter_names=["default", "single", "default"])
    lm = _prompt_model("gpt2", num_prompts=3)
    with pytest.raises(ValueError, match="ensemble"):
        lm.generate(input_ids=make_inputs("gpt2")["input_ids"], **GEN)


# ---- initialisation and config checks -------------------------------------------------------------------------------
def test_sample_vocab_init_rows_are_word_embedding_rows() -> None:
    model = _prompt_model("gpt2", n=6, prompt_tuning_init="SAMPLE_VOCAB")
    words = model.get_input_embeddings().weight.detach()
    table = _table(model)
    for row in table:
        assert (words - row).abs().amax(-1).min() == 0


def _save_tokenizer(directory) -> dict[str, int]:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "classify": 17, "the": 5, "sentiment": 42}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(directory)
    return vocab


def test_text_init_repeats_the_embeddings_of_the_text_ids(tmp_path) -> None:
    vocab = _save_tokenizer(tmp_path)
    model = _prompt_model("gpt2", n=7, prompt_tuning_init="TEXT", prompt_tuning_init_text="classify the sentiment",
                          tokenizer_name_or_path=str(tmp_path))
    ids = [vocab["classify"], vocab["the"], vocab["sentiment"]] * 3
    words = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(_table(model), words[ids[:7]], rtol=0, atol=0)


@pytest.mark.parametrize(("kw", "field"), [
    ({"prompt_tuning_init": "ZEROS"}, "prompt_tuning_init"),
    ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hello"}, "tokenizer_name_or_path"),
    ({"prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "/nowhere"}, "prompt_tuning_init_text"),
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"num_prompts": 0}, "num_prompts"),
    ({"num_transformer_submodules": 3}, "num_transformer_submodules"),
])
def test_bad_config_raises_naming_the_field(kw: dict, field: str) -> None:
    with pytest.raises(PeftConfigError, match=field):
        PromptTuningConfig(task_type="CAUSAL_LM", **kw)


def test_token_dim_not_matching_embedding_width_is_rejected() -> None:
    base = make_model("gpt2")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(PeftConfigError, match="token_dim"):
        get_peft_model(base, PromptTuningConfig(num_virtual_tokens=N, token_dim=16, task_type="CAUSAL_LM"))
    assert not base.get_input_embeddings()._forward_hooks
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


# ---- training, checkpoints -----------------------------------------------------------------------------------------
def test_only_the_prompt_trains_and_base_stays_bit_identical() -> None:
    model = _prompt_model("gpt2")
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["adapter_modules.default.embedding.weight"]
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    inputs, losses = make_inputs("gpt2"), []
    for _ in range(10):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_save_and_reload_gives_identical_logits(tmp_path) -> None:
    model = _prompt_model("llama")
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"]
    torch.testing.assert_close(saved["prompt_embeddings"], _table(model), rtol=0, atol=0)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == N
    loaded = PeftModel.from_pretrained(make_model("llama", seed=0), tmp_path).eval()
    inputs = _padded("llama", "right")
    torch.testing.assert_close(model_logits(loaded, inputs), model_logits(model, inputs), rtol=0, atol=0)


# ---- several prompt adapters ---------------------------------------------------------------------------------------
def _two_adapters(kind: str, n_b: int = N) -> PeftModel:
    model = _prompt_model(kind)
    model.add_adapter("b", PromptTuningConfig(num_virtual_tokens=n_b, task_type=TASKS[kind]))
    return model.eval()


def test_add_set_delete_adapters_switch_the_prompt() -> None:
    model, base = _two_adapters("gpt2", n_b=2), make_model("gpt2", seed=0)
    inputs = make_inputs("gpt2")
    assert model.active_adapters == ["default"]
    model.set_adapter("b")
    assert model.virtual_token_ids().tolist() == [VOCAB, VOCAB + 1]
    want = model_logits(base, _explicit(base, inputs, _table(model, "b")))
    torch.testing.assert_close(model_logits(model, inputs), want, atol=1e-5, rtol=1e-5)
    model.delete_adapter("b")
    assert list(model.adapter_modules) == ["default"] and model.active_adapters == ["default"]
    want = model_logits(base, _explicit(base, inputs, _table(model)))
    torch.testing.assert_close(model_logits(model, inputs), want, atol=1e-5, rtol=1e-5)


def test_two_active_prompt_adapters_raise() -> None:
    model = _two_adapters("gpt2")
    model.set_adapter(["default", "b"])
    with pytest.raises(ValueError, match="one prompt at a time"):
        model(**make_inputs("gpt2"))


@pytest.mark.parametrize("n_b", [N, 2], ids=["equal-lengths", "different-lengths"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_mixed_batch_rows_equal_their_single_adapter_runs(kind: str, n_b: int) -> None:
    model = _two_adapters(kind, n_b=n_b)
    inputs = make_inputs(kind)
    inputs.pop("labels")
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["default", "b", "__base__"]).logits
        singles = []
        for name in ["default", "b"]:
            model.set_adapter(name)
            singles.append(model(**inputs).logits)
        with model.disable_adapter():
            singles.append(model(**inputs).logits)
    for row, single in enumerate(singles):
        if TASKS[kind] == "CAUSAL_LM":  # a row shorter than the longest prompt ends in masked fill
            width = single.shape[1]
            torch.testing.assert_close(mixed[row, :width], single[row], atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(mixed[row], single[row], atol=1e-5, rtol=1e-5)


def test_merge_and_unload_raises_not_mergeable() -> None:
    model = _prompt_model("gpt2")
    with pytest.raises(NotMergeableError, match="PROMPT_TUNING"):
        model.merge_and_unload()


def test_disable_adapter_gives_base_outputs() -> None:
    model, base = _prompt_model("opt"), make_model("opt", seed=0)
    inputs = _padded("opt", "right")
    with model.disable_adapter():
        torch.testing.assert_close(model_logits(model, inputs), model_logits(base, inputs), rtol=0, atol=0)
    assert model_logits(model, inputs).shape[1] == N + SEQ  # and the prompt is back afterwards


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_unload_restores_bit_identical_base_without_hooks(kind: str) -> None:
    model, reference = _two_adapters(kind), make_model(kind, seed=0)
    inputs = make_inputs(kind)
    model(**inputs)
    base = model.unload()
    for module in base.modules():  # T5: the encoder's and decoder's embedding modules too
        assert not module._forward_hooks and not module._forward_pre_hooks, type(module).__name__
    state, want = base.state_dict(), reference.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    assert all(p.requires_grad for p in base.parameters())
    torch.testing.assert_close(model_logits(base, inputs), model_logits(reference, inputs), rtol=0, atol=0)
