"""Prefix tuning and P-tuning v2 against a hand-written attention with the prefix in front of K/V, on every tiny
architecture (training, positions, masks, generate, gradient checkpointing), the reparametrisation MLP and its
checkpoint, several adapters in one model or one batch, and the errors for models prefixes cannot run on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, make_inputs, make_model, model_logits
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForTokenClassification

from peftkit import NotMergeableError, PeftConfigError, PeftModel, get_peft_model
from peftkit.core.layer import BASE_ADAPTER_NAME
from peftkit.methods.prefix_tuning import PrefixTuningConfig, PTuningV2Config, attention_modules

TASKS = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "opt": "CAUSAL_LM", "bert": "SEQ_CLS", "roberta": "SEQ_CLS",
         "t5": "SEQ_2_SEQ_LM"}
PAD = 2


def _wrap(kind: str, n: int = 4, attn: str | None = None, seed: int = 0, **kw) -> PeftModel:
    model = make_model(kind, seed)
    if attn is not None:
        model.set_attn_implementation(attn)
    return get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=n, task_type=TASKS[kind], **kw)).eval()


def _train(model: PeftModel, inputs: dict, steps: int, lr: float = 1e-2) -> list[float]:
    model.train()
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        optim.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses


def _left_padded(lengths: list[int], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(ids, mask) of rows with the given lengths, left-padded with PAD, and the unpadded rows."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (length,), generator=gen) for length in lengths]
    width = max(lengths)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask, rows


def _no_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


# ---- the formula, by hand ---------------------------------------------------------------------------------------


def _capture(modules: list[nn.Module]) -> list[dict]:
    """Each module's input hidden states ("x") and output ("out") of its next call."""
    records: list[dict] = [{} for _ in modules]

    def hook(i: int):
        def fn(module, args, kwargs, output):
            records[i]["x"] = args[0] if args else kwargs["hidden_states"]
            records[i]["out"] = output[0]
        return fn

    for i, module in enumerate(modules):
        module.register_forward_hook(hook(i), with_kwargs=True)
    return records


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
            allowed: torch.Tensor) -> torch.Tensor:
    """``softmax(q [P_K; K]ᵀ / √d + mask) [P_V; V]``; q, k, v (B, H, T, d), pk, pv (H, n, d), allowed (B, T, n+T)."""
    rows = q.shape[0]
    keys = torch.cat([pk.expand(rows, -1, -1, -1), k], dim=2)
    values = torch.cat([pv.expand(rows, -1, -1, -1), v], dim=2)
    scores = q @ keys.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ values).transpose(1, 2).flatten(2)  # (B, T, H·d)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(*x.shape[:2], heads, -1).transpose(1, 2)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_attention_matches_hand_written_prefix_attention(attn: str) -> None:
    n = 3
    model = _wrap("gpt2", n=n, attn=attn)
    gpt2 = model.get_base_model().transformer
    blocks = list(gpt2.h)
    ids, mask, _ = _left_padded([7, 4, 6])
    records = _capture([b.attn for b in blocks])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        states = model.adapter_modules["default"].prefix_states()
        real = mask.bool()
        t = ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        allowed = torch.cat([torch.ones(len(ids), t, n, dtype=torch.bool), causal & real[:, None, :]], dim=-1)
        for i, (block, record) in enumerate(zip(blocks, records)):
            heads = block.attn.num_heads
            q, k, v = block.attn.c_attn(record["x"]).split(block.attn.embed_dim, dim=2)
            expected = block.attn.c_proj(_attend(_heads(q, heads), _heads(k, heads), _heads(v, heads),
                                                 states[2 * i], states[2 * i + 1], allowed))
            torch.testing.assert_close(record["out"][real], expected[real], atol=1e-5, rtol=0)
        # Real tokens take positions n, n+1, ... as if the prefix were n earlier tokens.
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + n
        x0 = blocks[0].ln_1(gpt2.wte(ids) + gpt2.wpe(positions))
        torch.testing.assert_close(records[0]["x"][real], x0[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kind", "attn"), [("bert", "eager"), ("bert", "sdpa"), ("roberta", "sdpa")])
def test_encoder_attention_matches_hand_written_prefix_attention(kind: str, attn: str) -> None:
    n = 3
    model = _wrap(kind, n=n, attn=attn)
    encoder = getattr(model.get_base_model(), kind)
    selfs = [layer.attention.self for layer in encoder.encoder.layer]
    ids = make_inputs(kind)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding, as BERT tokenizers pad
    real = mask.bool()
    records = _capture(selfs)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        states = model.adapter_modules["default"].prefix_states()
        t = ids.shape[1]
        allowed = torch.cat([torch.ones(len(ids), t, n, dtype=torch.bool), real[:, None, :].expand(-1, t, -1)],
                            dim=-1)
        for i, (attention, record) in enumerate(zip(selfs, records)):
            x, heads = record["x"], attention.num_attention_heads
            expected = _attend(_heads(attention.query(x), heads), _heads(attention.key(x), heads),
                               _heads(attention.value(x), heads), states[2 * i], states[2 * i + 1], allowed)
            torch.testing.assert_close(record["out"][real], expected[real], atol=1e-5, rtol=0)
        # Real tokens take the positions the base model gives tokens n, n+1, ... (RoBERTa numbers from
        # padding_idx + 1), as HF peft's past-key-values route does.
        emb = encoder.embeddings
        first = getattr(emb, "padding_idx", -1) + 1
        positions = torch.arange(t) + first + n
        x0 = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(positions)
                           + emb.token_type_embeddings(torch.zeros_like(ids)))
        torch.testing.assert_close(records[0]["x"][real], x0[real], atol=1e-5, rtol=0)


def test_eager_and_sdpa_give_the_same_logits() -> None:
    ids, mask, _ = _left_padded([8, 5, 3])
    for kind in ("gpt2", "bert"):
        eager, sdpa = _wrap(kind, attn="eager"), _wrap(kind, attn="sdpa")
        sdpa.adapter_modules["default"].load_state_dict(eager.adapter_modules["default"].state_dict())
        inputs = {"input_ids": ids, "attention_mask": mask}
        torch.testing.assert_close(model_logits(sdpa, inputs), model_logits(eager, inputs), atol=1e-5, rtol=1e-4)


# ---- architectures ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TASKS))
def test_trains_only_the_prefix_and_keeps_the_base(kind: str) -> None:
    base = make_model(kind)
    base_params = dict(base.named_parameters())
    snapshot = {name: p.detach().clone() for name, p in base_params.items()}
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=4, task_type=TASKS[kind]))
    inputs = make_inputs(kind)
    causal = TASKS[kind] == "CAUSAL_LM"
    if causal:  # a learnable tiny task: continue a run of one token (random ids leave nothing to learn)
        inputs["input_ids"] = inputs["labels"] = torch.full_like(inputs["input_ids"], 5)
    model.train()
    model(**inputs).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    expected = {"adapter_modules.default.embedding.weight"}
    if TASKS[kind] == "SEQ_CLS":  # the head trains through modules_to_save
        expected |= {f"base_model.model.classifier.modules_to_save.default.{name}"
                     for name, _ in model.get_base_model().classifier.get_base_layer().named_parameters()}
    assert with_grad == expected
    model.zero_grad()
    losses = _train(model, inputs, steps=20, lr=3e-2)
    # The tiny LMs' tied output embedding (std 0.02) keeps their logits small: their loss moves slowly.
    assert losses[-1] < (0.97 if causal else 0.8) * losses[0], losses
    for name, param in base_params.items():
        assert torch.equal(param, snapshot[name]), name


def test_llama_prefix_has_one_head_per_key_value_head() -> None:
    model = _wrap("llama", n=5)
    config = model.get_base_model().config
    head_dim = config.hidden_size // config.num_attention_heads
    states = model.adapter_modules["default"].prefix_states()
    assert states.shape == (2 * config.num_hidden_layers, config.num_key_value_heads, 5, head_dim)


def test_t5_has_a_prefix_for_encoder_decoder_and_cross_attention() -> None:
    model = _wrap("t5", n=2)
    names = [name for name, _ in attention_modules(model.get_base_model())]
    assert sum("encoder" in n and "SelfAttention" in n for n in names) == 2
    assert sum("decoder" in n and "SelfAttention" in n for n in names) == 2
    assert sum("EncDecAttention" in n for n in names) == 2
    assert model.adapter_modules["default"].prefix_states().shape[0] == 2 * 6
    inputs = make_inputs("t5")
    base = model_logits(make_model("t5"), inputs)
    assert not torch.allclose(model_logits(model, inputs), base)


# ---- positions and masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama", "opt"])
def test_left_padded_rows_equal_their_unpadded_runs(kind: str) -> None:
    model = _wrap(kind)
    ids, mask, rows = _left_padded([8, 5, 3])
    batch = model_logits(model, {"input_ids": ids, "attention_mask": mask})
    for i, row in enumerate(rows):
        single = model_logits(model, {"input_ids": row[None]})
        torch.testing.assert_close(batch[i, -len(row):], single[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(TASKS))
def test_no_mask_equals_all_ones_mask(kind: str) -> None:
    model = _wrap(kind)
    inputs = make_inputs(kind)
    inputs.pop("labels")
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (3, 4))
    ones = model_logits(model, inputs)
    inputs.pop("attention_mask")
    torch.testing.assert_close(model_logits(model, inputs), ones, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "opt"])
def test_causal_model_without_mask_still_hides_the_future(kind: str) -> None:
    model = _wrap(kind)
    ids = make_inputs(kind)["input_ids"]
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1 - 3) % (VOCAB - 3) + 3
    before, after = model_logits(model, {"input_ids": ids}), model_logits(model, {"input_ids": changed})
    torch.testing.assert_close(after[:, :5], before[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, 5:], before[:, 5:])


# ---- generate ---------------------------------------------------------------------------------------------------
# HF peft 0.21's own prefix-tuning generate on transformers 5.24 ignores the prefix (it warns "Both past_key_values
# and cache are set"), so these tests check generate against peftkit's own forward, not against HF peft.


def _generating(kind: str) -> PeftModel:
    model = make_model(kind)
    model.generation_config.eos_token_id = None  # fixed-length outputs, so rows compare token by token
    model.generation_config.pad_token_id = PAD
    return get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")).eval()


def _greedy_without_cache(model: PeftModel, row: torch.Tensor, steps: int) -> torch.Tensor:
    seq = row[None]
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[0]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_generate_equals_manual_loop_per_row(kind: str) -> None:
    model, steps = _generating(kind), 5
    ids, mask, rows = _left_padded([6, 4, 2])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    assert out.shape == (3, ids.shape[1] + steps)
    for i, row in enumerate(rows):
        expected = _greedy_without_cache(model, row, steps)
        torch.testing.assert_close(out[i, ids.shape[1] - len(row):], expected, atol=0, rtol=0)
    with torch.no_grad(), model.disable_adapter():
        base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    assert not torch.equal(out, base)  # the prefix is used, not lost in the cache


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_beam_search_batch_rows_equal_single_rows(kind: str) -> None:
    model, steps = _generating(kind), 4
    ids, mask, rows = _left_padded([6, 4, 3])
    kw = {"max_new_tokens": steps, "num_beams": 3, "do_sample": False}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        for i, row in enumerate(rows):
            single = model.generate(input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                    **kw)
            torch.testing.assert_close(out[i, ids.shape[1] - len(row):], single[0], atol=0, rtol=0)


def test_t5_generate_uses_the_prefix() -> None:
    model, steps = _wrap("t5"), 4
    inputs = make_inputs("t5", batch=2)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                             eos_token_id=None, min_new_tokens=steps)
        decoder = torch.zeros(2, 1, dtype=torch.long)
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits[:, -1]
            decoder = torch.cat([decoder, logits.argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(out, decoder, atol=0, rtol=0)


# ---- gradient checkpointing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("projection", [False, True])
def test_gradient_checkpointing_gives_the_same_prefix_gradients(kind: str, reentrant: bool, projection: bool) -> None:
    inputs = make_inputs(kind)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(7)  # the same prefix (and MLP) in both runs
        model = _wrap(kind, prefix_projection=projection, encoder_hidden_size=16)
        _no_dropout(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        model(**inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.adapter_modules.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


# ---- reparametrisation ------------------------------------------------------------------------------------------


def test_projection_trains_the_mlp_and_checkpoints_only_its_output(tmp_path) -> None:
    model = _wrap("gpt2", prefix_projection=True, encoder_hidden_size=16)
    encoder = model.adapter_modules["default"]
    assert encoder.transform is not None
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    assert {n for n in before if n.startswith("transform.")} and all(p.requires_grad for p in encoder.parameters())
    inputs = make_inputs("gpt2")
    losses = _train(model, inputs, steps=10)
    assert losses[-1] < losses[0]
    for name, param in encoder.named_parameters():
        assert not torch.equal(param, before[name]), name
    model.eval()
    expected = model_logits(model, inputs)
    model.save_pretrained(tmp_path)
    assert encoder.transform is not None  # saving does not drop the MLP of the model being trained
    saved = load_file(tmp_path / "adapter_model.safetensors")
    config = model.peft_config["default"]
    assert list(saved) == ["prompt_embeddings"]
    assert saved["prompt_embeddings"].shape == (4, config.num_layers * 2 * config.token_dim)
    with torch.no_grad():
        torch.testing.assert_close(saved["prompt_embeddings"], encoder.prefix_table(), atol=0, rtol=0)
    loaded = PeftModel.from_pretrained(make_model("gpt2"), tmp_path)
    assert loaded.adapter_modules["default"].transform is None
    assert not any(".transform." in n for n, _ in loaded.named_parameters())
    torch.testing.assert_close(model_logits(loaded, inputs), expected, atol=0, rtol=0)


@pytest.mark.parametrize("projection", [False, True])
def test_zero_init_gives_zero_prefixes(projection: bool) -> None:
    model = _wrap("gpt2", prefix_projection=projection, encoder_hidden_size=16, init_weights="zero")
    states = model.adapter_modules["default"].prefix_states()
    assert states.shape[2] == 4 and not states.any()


# ---- P-tuning v2 --------------------------------------------------------------------------------------------------


def _tiny_bert_token_cls() -> nn.Module:
    torch.manual_seed(0)
    return BertForTokenClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=5)).eval()


def test_p_tuning_v2_token_classification_keeps_labels_aligned() -> None:
    model = get_peft_model(_tiny_bert_token_cls(), PTuningV2Config(num_virtual_tokens=4, task_type="TOKEN_CLS"))
    inputs = make_inputs("gpt2")
    labels = torch.randint(0, 5, inputs["input_ids"].shape)
    labels[:, 0] = labels[:, -1] = -100
    inputs["labels"] = labels
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (3, inputs["input_ids"].shape[1], 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.flatten(0, 1), labels.flatten()))
    classifier = model.get_base_model().classifier.modules_to_save["default"]
    head = classifier.weight.detach().clone()
    losses = _train(model, inputs, steps=30)
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(classifier.weight, head)


def test_p_tuning_v2_sequence_classification_trains_head_and_prefix() -> None:
    base = make_model("bert")
    original_head = base.classifier.weight.detach().clone()
    model = get_peft_model(base, PTuningV2Config(num_virtual_tokens=4, task_type="SEQ_CLS"))
    prefix = model.adapter_modules["default"].embedding.weight
    head = model.get_base_model().classifier.modules_to_save["default"].weight
    before = prefix.detach().clone(), head.detach().clone()
    losses = _train(model, make_inputs("bert"), steps=25)
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(prefix, before[0]) and not torch.equal(head, before[1])
    assert torch.equal(base.classifier.get_base_layer().weight, original_head)


def test_p_tuning_v2_rejects_reparametrisation() -> None:
    with pytest.raises(PeftConfigError, match="prefix_projection|reparametrisation"):
        PTuningV2Config(prefix_projection=True)


# ---- several adapters -------------------------------------------------------------------------------------------


def _two_adapters(kind: str) -> PeftModel:
    base = make_model(kind)
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=2, task_type=TASKS[kind]), adapter_name="a")
    model.add_adapter("b", PrefixTuningConfig(num_virtual_tokens=5, task_type=TASKS[kind]))
    return model.eval()


@pytest.mark.parametrize(("kind", "padded"), [("gpt2", False), ("gpt2", True), ("bert", True), ("roberta", False)])
def test_mixed_batch_rows_equal_their_adapters(kind: str, padded: bool) -> None:
    model = _two_adapters(kind)
    if kind == "gpt2":
        ids, mask, _ = _left_padded([8, 6, 7] if padded else [8, 8, 8])
    else:
        ids = make_inputs(kind)["input_ids"]
        mask = torch.ones_like(ids)
        mask[2, 6:] = int(not padded)
    inputs = {"input_ids": ids, "attention_mask": mask}
    names = ["a", "b", BASE_ADAPTER_NAME]
    mixed = model_logits(model, inputs, adapter_names=names)
    expected = {BASE_ADAPTER_NAME: model_logits(make_model(kind), inputs)}
    for name in ("a", "b"):
        model.set_adapter(name)
        expected[name] = model_logits(model, inputs)
    assert not torch.allclose(expected["a"], expected["b"])
    for row, name in enumerate(names):
        real = mask[row].bool() if kind == "gpt2" else slice(None)  # padded positions' logits are not used
        torch.testing.assert_close(mixed[row][real], expected[name][row][real], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"row of {name!r}: {m}")


def test_two_active_prefixes_concatenate() -> None:
    model = _two_adapters("gpt2")
    table = torch.cat([model.adapter_modules[n].embedding.weight.detach() for n in ("a", "b")])
    model.add_adapter("ab", PrefixTuningConfig(num_virtual_tokens=7, task_type="CAUSAL_LM"))
    with torch.no_grad():
        model.adapter_modules["ab"].embedding.weight.copy_(table)
    inputs = make_inputs("gpt2")
    model.set_adapter("ab")
    joined = model_logits(model, inputs)
    model.set_adapter(["a", "b"])
    torch.testing.assert_close(model_logits(model, inputs), joined, atol=1e-5, rtol=1e-5)
    model.set_adapter(["b", "a"])  # attention does not depend on the order of its keys
    torch.testing.assert_close(model_logits(model, inputs), joined, atol=1e-5, rtol=1e-5)


def test_disable_adapter_and_merge() -> None:
    model, inputs = _wrap("gpt2"), make_inputs("gpt2")
    base = model_logits(make_model("gpt2"), inputs)
    adapted = model_logits(model, inputs)
    with model.disable_adapter():
        torch.testing.assert_close(model_logits(model, inputs), base, atol=0, rtol=0)
    torch.testing.assert_close(model_logits(model, inputs), adapted, atol=0, rtol=0)
    with pytest.raises(NotMergeableError):
        model.merge_and_unload()
    with pytest.raises(NotMergeableError):
        model.merge_adapter()
    torch.testing.assert_close(model_logits(model, inputs), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "t5"])
@pytest.mark.parametrize("finish", ["unload", "delete"])
def test_unload_and_deleting_the_last_prefix_restore_the_model(kind: str, finish: str) -> None:
    inputs = make_inputs(kind)
    base = make_model(kind)
    expected = model_logits(base, inputs)
    configs = {name: module.config for name, module in attention_modules(base)}
    assert len(configs) == (6 if kind == "t5" else 2)
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=2, task_type=TASKS[kind]), adapter_name="a")
    model.add_adapter("b", PrefixTuningConfig(num_virtual_tokens=3, task_type=TASKS[kind]))
    assert all(m.config is not configs[n] for n, m in attention_modules(base))
    if finish == "unload":
        assert model.unload() is base
    else:
        model.delete_adapter("a")
        assert all(m.config is not configs[n] for n, m in attention_modules(base))  # "b" still needs them
        model.delete_adapter("b")
    for name, module in attention_modules(base):
        assert module.config is configs[name], name
        assert "_peftkit_prefix_slot" not in module.__dict__
    torch.testing.assert_close(model_logits(base, inputs), expected, atol=0, rtol=0)


# ---- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2"])
def test_unsupported_attention_implementation_is_rejected_unchanged(implementation: str) -> None:
    base = make_model("llama")
    if implementation == "flex_attention":
        base.set_attn_implementation(implementation)
    else:  # flash-attn is not installed here; the check reads the config only
        base.config._attn_implementation = implementation
    configs = {name: module.config for name, module in attention_modules(base)}
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(PeftConfigError, match="eager.*sdpa"):
        get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    for name, module in attention_modules(base):
        assert module.config is configs[name]
        assert module.config._attn_implementation == implementation
        assert "_peftkit_prefix_slot" not in module.__dict__
    assert all(p.requires_grad for p in base.parameters())
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def test_model_without_transformers_attention_is_rejected() -> None:
    model = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 8))
    with pytest.raises(PeftConfigError, match="attention"):
        get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=2, token_dim=8, num_layers=1,
                                                 num_attention_heads=2))
    assert all(p.requires_grad for p in model.parameters())
