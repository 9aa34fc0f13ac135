"""Targets when a config names none: HF peft's choice where HF has a default, the module tree everywhere else.

Each architecture is built tiny from its transformers config (random weights). Where HF peft 0.21 has a default,
``peft.get_peft_model`` on an identical copy is the reference; elsewhere the derived targets must be the attention's
query/value (or fused qkv) projections, and one training step must run.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import peft
import pytest
import torch
import transformers
from torch import nn

from peftkit import AdaLoraConfig, AdapterConfig, IA3Config, LoraConfig, PeftConfigError, PeftModel, get_peft_model
from peftkit.core.layer import AdapterLayer
from peftkit.core.targets import layer_index, match_targets
from peftkit.integrations import default_targets as dt
from peftkit.methods.adalora import AdaLoraLinear
from peftkit.methods.bottleneck import PLACEMENTS
from peftkit.methods.ia3 import IA3Layer
from peftkit.methods.lora import LoraLayer
from peftkit.methods.parallel_adapter import ParallelAdapterConfig

VOCAB = 64
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=0,
                eos_token_id=1)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, pad_token_id=0)
_GPT = dict(vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, n_positions=64)
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=0, eos_token_id=1, decoder_start_token_id=0)
_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
           pad_token_id=0, eos_token_id=1)
_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
               patch_size=8)
_MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)

# model_type -> (config kwargs, auto class). Causal LMs unless an encoder/seq2seq/vision class is named.
ARCHS: dict[str, tuple[dict, str]] = {
    # HF peft has a LoRA default for these.
    "gpt2": (_GPT, "lm"), "gpt_bigcode": (_GPT, "lm"), "gptj": ({**_GPT, "rotary_dim": 4}, "lm"),
    "codegen": ({**_GPT, "rotary_dim": 4, "n_ctx": 64}, "lm"),
    "gpt_neo": (dict(vocab_size=VOCAB, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64,
                     attention_types=[[["global", "local"], 1]], max_position_embeddings=64), "lm"),
    "gpt_neox": (_DECODER, "lm"), "bloom": (dict(vocab_size=VOCAB, n_layer=2, hidden_size=32, n_head=4), "lm"),
    "falcon": ({**_DECODER, "head_dim": None, "ffn_hidden_size": 64, "num_kv_heads": 2}, "lm"),
    "mpt": (dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64), "lm"),
    "llama": (_DECODER, "lm"), "mistral": (_DECODER, "lm"), "mixtral": ({**_DECODER, **_MOE}, "lm"),
    "qwen2": (_DECODER, "lm"), "qwen3": (_DECODER, "lm"), "gemma": (_DECODER, "lm"), "gemma2": (_DECODER, "lm"),
    "gemma3_text": (_DECODER, "lm"), "phi": (_DECODER, "lm"), "stablelm": (_DECODER, "lm"), "opt": (
        dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=2), "lm"),
    "bert": (_ENCODER, "encoder"), "roberta": ({**_ENCODER, "pad_token_id": 1}, "encoder"),
    "xlm-roberta": ({**_ENCODER, "pad_token_id": 1}, "encoder"), "electra": ({**_ENCODER, "embedding_size": 32},
                                                                              "encoder"),
    "layoutlm": (_ENCODER, "encoder"), "deberta": (_ENCODER, "encoder"), "deberta-v2": (_ENCODER, "encoder"),
    "t5": (_T5, "seq2seq"), "mt5": (_T5, "seq2seq"), "bart": (_SEQ2SEQ, "seq2seq"),
    "rwkv": (dict(vocab_size=VOCAB, hidden_size=32, attention_hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, context_length=64), "lm"),
    # peftkit's own table entries.
    "albert": ({**_ENCODER, "embedding_size": 32}, "encoder"),
    "distilbert": (dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                        pad_token_id=0), "encoder"),
    "vit": (_VISION, "encoder"), "phi3": (_DECODER, "lm"), "whisper": (_SEQ2SEQ, "encoder"),
    # No table knows these: derived from the module tree.
    "modernbert": ({**_ENCODER, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 1, "cls_token_id": 0,
                    "sep_token_id": 1}, "encoder"),
    "olmo2": (_DECODER, "lm"), "starcoder2": (_DECODER, "lm"), "glm4": (_DECODER, "lm"), "lfm2": (_DECODER, "lm"),
    "qwen3_moe": ({**_DECODER, **_MOE}, "lm"),
    "llama4_text": ({**_DECODER, **_MOE, "intermediate_size_mlp": 64}, "lm"),
    "deepseek_v3": ({**_DECODER, **_MOE, "head_dim": None, "q_lora_rank": 16, "kv_lora_rank": 16,
                     "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8, "n_routed_experts": 4,
                     "first_k_dense_replace": 2}, "lm"),
    "qwen3_next": ({**_DECODER, **_MOE, "linear_num_value_heads": 2, "linear_num_key_heads": 2,
                    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "shared_expert_intermediate_size": 16,
                    "layer_types": ["linear_attention", "full_attention"]}, "lm"),
    "dinov2": (_VISION, "encoder"),
    "mamba": (dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2), "lm"),
}
_AUTO = {"lm": transformers.AutoModelForCausalLM, "encoder": transformers.AutoModel,
         "seq2seq": transformers.AutoModelForSeq2SeqLM}
_TASK = {"lm": "CAUSAL_LM", "encoder": "FEATURE_EXTRACTION", "seq2seq": "SEQ_2_SEQ_LM"}


def build(model_type: str, seed: int = 0) -> nn.Module:
    kwargs, kind = ARCHS[model_type]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return _AUTO[kind].from_config(config).eval()


def task(model_type: str) -> str:
    return _TASK[ARCHS[model_type][1]]


def wrapped(model: nn.Module, layer_type: type) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, layer_type)]
    return [n.removeprefix("base_model.model.") for n in names]


def loss_of(model: nn.Module, model_type: str) -> torch.Tensor:
    if model_type in ("vit", "dinov2"):
        return model(pixel_values=torch.randn(2, 3, 32, 32)).last_hidden_state.pow(2).mean()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids) if ARCHS[model_type][1] == "lm" else model(input_ids=ids)
    loss = getattr(out, "loss", None)
    return loss if loss is not None else out.last_hidden_state.pow(2).mean()


def leaves(names: list[str]) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n in names}


# ---- the tables hold HF peft's -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("ours", "theirs"), [
    (dt.LORA_TARGETS, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"),
    (dt.IA3_TARGETS, "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING"),
    (dt.IA3_FEEDFORWARD, "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING"),
    (dt.ADALORA_TARGETS, "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING"),
])
def test_tables_hold_every_hf_peft_entry(ours: dict, theirs: str) -> None:
    hf = getattr(peft.utils.constants, theirs)
    assert {k: ours.get(k) for k in hf} == hf


# ---- where HF peft has a default: the same modules -----------------------------------------------------------------
HF_LORA = [t for t in ARCHS if t in peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING]
HF_IA3 = [t for t in ARCHS if t in peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING]
HF_ADALORA = ["gpt2", "llama", "bert", "roberta", "t5", "opt", "bart", "deberta-v2", "gpt_neox", "qwen3"]


@pytest.mark.parametrize("model_type", HF_LORA)
def test_lora_default_wraps_what_hf_peft_wraps(model_type: str) -> None:
    hf_config = peft.LoraConfig(task_type=task(model_type))
    if model_type == "mixtral":  # HF peft 0.21's v5 MoE config conversion empties default targets: use its table
        hf_config.target_modules = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["mixtral"]
    theirs = peft.get_peft_model(build(model_type), hf_config)
    ours = get_peft_model(build(model_type), LoraConfig(task_type=task(model_type)))
    assert wrapped(ours, LoraLayer) == wrapped(theirs, peft.tuners.lora.LoraLayer) != []


@pytest.mark.parametrize("model_type", HF_IA3)
def test_ia3_default_wraps_and_classifies_what_hf_peft_does(model_type: str) -> None:
    theirs = peft.get_peft_model(build(model_type), peft.IA3Config(task_type=task(model_type)))
    ours = get_peft_model(build(model_type), IA3Config(task_type=task(model_type)))
    hf_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                 if isinstance(m, peft.tuners.ia3.IA3Layer)}
    our_layers = dict(zip(wrapped(ours, IA3Layer), [m for m in ours.modules() if isinstance(m, IA3Layer)]))
    assert list(our_layers) == list(hf_layers) != []
    assert {n: m.is_feedforward for n, m in our_layers.items()} == {n: m.is_feedforward for n, m in hf_layers.items()}


@pytest.mark.parametrize("model_type", HF_ADALORA)
def test_adalora_default_wraps_what_hf_peft_wraps(model_type: str) -> None:
    theirs = peft.get_peft_model(build(model_type), peft.AdaLoraConfig(task_type=task(model_type), total_step=10))
    ours = get_peft_model(build(model_type), AdaLoraConfig(task_type=task(model_type), total_step=10))
    assert wrapped(ours, AdaLoraLinear) == wrapped(theirs, peft.tuners.adalora.AdaLoraLayer) != []


# ---- where no table has an entry: derived from the module tree -----------------------------------------------------
DERIVED = {  # model_type -> leaves LoRA wraps (query/value or fused), leaves (IA3) scales on the output side
    "modernbert": ({"Wqkv"}, {"Wqkv"}),
    "olmo2": ({"q_proj", "v_proj"}, {"k_proj", "v_proj"}),
    "starcoder2": ({"q_proj", "v_proj"}, {"k_proj", "v_proj"}),
    "glm4": ({"q_proj", "v_proj"}, {"k_proj", "v_proj"}),
    "lfm2": ({"q_proj", "v_proj"}, {"k_proj", "v_proj"}),
    "qwen3_moe": ({"q_proj", "v_proj"}, {"k_proj", "v_proj"}),
    "llama4_text": ({"q_proj", "v_proj"}, {"k_proj", "v_proj"}),
    # Multi-head latent attention: the query and the joint key-value projections (down and up).
    "deepseek_v3": ({"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"},
                    {"kv_a_proj_with_mqa", "kv_b_proj"}),
    "qwen3_next": ({"in_proj_qkvz", "q_proj", "v_proj"}, {"in_proj_qkvz", "k_proj", "v_proj"}),  # linear + full attn
    "dinov2": ({"q_proj", "v_proj"}, {"k_proj", "v_proj"}),
}
# The FFN down projection IA3 scales on its input; None: the MLP is fused expert tensors only, no linear.
FEEDFORWARD = {"modernbert": "mlp.Wo", "olmo2": "down_proj", "starcoder2": "c_proj", "glm4": "down_proj",
               "lfm2": "w2", "qwen3_moe": None, "llama4_text": "down_proj", "deepseek_v3": "down_proj",
               "qwen3_next": "down_proj", "dinov2": "fc2"}


@pytest.mark.parametrize("model_type", sorted(DERIVED))
def test_lora_derives_query_value_for_architectures_no_table_knows(model_type: str) -> None:
    model = build(model_type)
    assert dt.table_entry(dt.LORA_TARGETS, model) is None
    peft_model = get_peft_model(model, LoraConfig(task_type=task(model_type), init_lora_weights=False))
    got = wrapped(peft_model, LoraLayer)
    assert leaves(got) == DERIVED[model_type][0]
    assert all(".mlp." not in n and "expert" not in n for n in got)
    assert {layer_index(n, None) for n in got} == {0, 1}  # every layer
    peft_model.train()
    loss_of(peft_model, model_type).backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)


@pytest.mark.parametrize("model_type", sorted(DERIVED))
def test_ia3_and_adalora_derive_for_architectures_no_table_knows(model_type: str) -> None:
    ia3 = get_peft_model(build(model_type), IA3Config(task_type=task(model_type)))
    names = wrapped(ia3, IA3Layer)
    feedforward = [n for n, m in zip(names, [m for m in ia3.modules() if isinstance(m, IA3Layer)]) if m.is_feedforward]
    down = FEEDFORWARD[model_type]
    assert leaves([n for n in names if n not in feedforward]) == DERIVED[model_type][1]
    assert feedforward == ([] if down is None else [n for n in names if n.endswith("." + down)])
    assert down is None or len(feedforward) == 2
    adalora = get_peft_model(build(model_type), AdaLoraConfig(task_type=task(model_type), total_step=10))
    assert leaves(wrapped(adalora, AdaLoraLinear)) == DERIVED[model_type][0]


def test_derived_names_are_short_suffixes_when_they_select_exactly() -> None:
    model = build("olmo2")
    assert dt.derive_query_value(model) == ["q_proj", "v_proj"]
    assert dt.derive_key_value_feedforward(model) == (["k_proj", "v_proj", "down_proj"], ["down_proj"])
    # BERT's "output.dense" would also select attention.output.dense: a regex says exactly which modules.
    targets, feedforward = dt.derive_key_value_feedforward(build("bert"))
    assert feedforward == r"encoder\.layer\.\d+\.output\.dense" and isinstance(targets, str)
    expected = ("attention.self.key", "attention.self.value", "output.dense")
    assert match_targets(build("bert"), targets) == [f"encoder.layer.{i}.{n}" for i in (0, 1) for n in expected]


# ---- a model of its own: attention found by structure ------------------------------------------------------------
class ToyAttention(nn.Module):
    """Grouped-query attention whose projections have names no table or name rule knows."""

    def __init__(self, d: int, fused: bool) -> None:
        super().__init__()
        self.fused, self.heads = fused, 4
        if fused:
            self.pack, self.unpack = nn.Linear(d, 3 * d), nn.Linear(d, d)
        else:  # query d wide, key and value d/2 (two key-value heads)
            self.to_a, self.to_b, self.to_c, self.mix = (nn.Linear(d, d), nn.Linear(d, d // 2),
                                                         nn.Linear(d, d // 2), nn.Linear(d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        if self.fused:
            q, k, v = self.pack(x).chunk(3, dim=-1)
            out = self.unpack
        else:
            q, k, v, out = self.to_a(x), self.to_b(x).repeat(1, 1, 2), self.to_c(x).repeat(1, 1, 2), self.mix
        b, t, d = q.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, h, T, d/h)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out(y.transpose(1, 2).reshape(b, t, d))


class ToyBlock(nn.Module):
    def __init__(self, d: int, fused: bool) -> None:
        super().__init__()
        self.norm1, self.mixer, self.norm2 = nn.LayerNorm(d), ToyAttention(d, fused), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class ToyLM(nn.Module):
    """A pre-LN decoder with nothing transformers knows about (no config, no model_type)."""

    def __init__(self, fused: bool = False, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(ToyBlock(d, fused) for _ in range(2))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _train_step_lowers_loss(model: nn.Module) -> None:
    ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)

    def loss() -> torch.Tensor:
        logits = model(ids)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss() < before


@pytest.mark.parametrize(("fused", "lora", "ia3"), [
    (False, ["to_a", "to_c"], ["to_b", "to_c"]),  # query: the odd width out; value: the later of the pair
    (True, ["pack"], ["pack"]),
])
def test_custom_model_gets_attention_projections_found_by_shape(fused: bool, lora: list, ia3: list) -> None:
    model = get_peft_model(ToyLM(fused), LoraConfig())
    assert model.peft_config["default"].target_modules == lora
    assert wrapped(model, LoraLayer) == [f"blocks.{i}.mixer.{n}" for i in (0, 1) for n in lora]
    _train_step_lowers_loss(model)

    model = get_peft_model(ToyLM(fused), IA3Config())
    config = model.peft_config["default"]
    assert wrapped(model, IA3Layer) == [f"blocks.{i}.{n}" for i in (0, 1) for n in [f"mixer.{m}" for m in ia3] +
                                        ["ffn.2"]]
    assert config.feedforward_modules == r"blocks\.\d+\.ffn\.2"  # "ffn.2" alone would read as a layer index
    assert [m.is_feedforward for m in model.modules() if isinstance(m, IA3Layer)] == [False] * len(ia3) + [True] \
        + [False] * len(ia3) + [True]
    _train_step_lowers_loss(model)


def test_ia3_classifies_user_targets_on_architecture_no_table_knows() -> None:
    model = get_peft_model(build("olmo2"), IA3Config(target_modules=["k_proj", "v_proj", "down_proj", "up_proj"]))
    assert model.peft_config["default"].feedforward_modules == ["down_proj"]
    model = get_peft_model(ToyLM(), IA3Config(target_modules="all-linear"))
    assert model.peft_config["default"].feedforward_modules == r"blocks\.\d+\.ffn\.2"


# ---- no attention: an error that lists what could be targeted ------------------------------------------------------
@pytest.mark.parametrize("config", [LoraConfig(), IA3Config(), AdaLoraConfig(total_step=10), AdapterConfig(),
                                    ParallelAdapterConfig()], ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("model_type", ["mamba", "mlp"])
def test_model_without_attention_gets_error_listing_candidates(model_type: str, config) -> None:
    if model_type == "mamba":
        model = build("mamba")
        listed = "['mixer.in_proj', 'mixer.x_proj', 'mixer.dt_proj', 'mixer.out_proj', 'lm_head']"
    else:
        model, listed = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), "['0', '2']"
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PeftConfigError, match=r"no default for .*no attention block") as info:
        get_peft_model(model, config)
    assert f"Its linear layers: {listed}; pass target_modules" in str(info.value)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unmatched_default_entries_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    # ViT's table entry names both spellings (transformers 4: query/value, 5: q_proj/v_proj).
    with caplog.at_level(logging.DEBUG, logger="peftkit"):
        model = get_peft_model(build("vit"), LoraConfig())
    assert leaves(wrapped(model, LoraLayer)) == {"q_proj", "v_proj"}
    assert any("['query', 'value']" in r.getMessage() for r in caplog.records)


# ---- adapters: placements ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model_type", "placements"), [
    ("llama", ["houlsby", "pfeiffer", "attn", "ffn"]), ("gpt2", ["houlsby", "pfeiffer", "attn", "ffn"]),
    ("opt", ["houlsby", "pfeiffer", "attn", "ffn", "ffn_span"]), ("bert", ["houlsby", "pfeiffer", "attn"]),
])
def test_derived_placements_select_what_the_table_does(model_type: str, placements: list[str]) -> None:
    model = build(model_type)
    derived, table = dt.derive_placements(model), PLACEMENTS[model_type]
    for key in placements:
        if key.endswith("_span"):
            assert derived[key] == table[key]
        else:
            assert match_targets(model, derived[key]) == match_targets(model, table[key]), key


@pytest.mark.parametrize("config", [AdapterConfig(variant="houlsby"), AdapterConfig(), ParallelAdapterConfig(r=4),
                                    ParallelAdapterConfig(r=4, target="attn")], ids=["houlsby", "pfeiffer", "ffn",
                                                                                     "attn"])
@pytest.mark.parametrize("model_type", ["olmo2", "toy"])
def test_adapters_place_themselves_on_architectures_no_table_knows(model_type: str, config) -> None:
    model = ToyLM() if model_type == "toy" else build(model_type)
    peft_model = get_peft_model(model, dataclasses.replace(config, init_weights=False))
    names = [n for n, m in peft_model.get_base_model().named_modules() if isinstance(m, AdapterLayer)
             and type(m).__name__ != "ParallelAdapterTap"]
    expected = {
        "houlsby": {"olmo2": ["self_attn.o_proj", "mlp.down_proj"], "toy": ["mixer.mix", "ffn.2"]},
        "pfeiffer": {"olmo2": [""], "toy": [""]},
        "ffn": {"olmo2": ["mlp"], "toy": ["ffn"]},
        "attn": {"olmo2": ["self_attn"], "toy": ["mixer"]},
    }[config.placement()][model_type]
    prefix = "blocks" if model_type == "toy" else "model.layers"
    assert names == [f"{prefix}.{i}{'.' + e if e else ''}" for i in (0, 1) for e in expected]
    with torch.no_grad():
        if model_type == "toy":
            ids = torch.randint(0, VOCAB, (2, 8))
            out = peft_model(ids)
            with peft_model.disable_adapter():
                assert not torch.allclose(out, peft_model(ids))
        else:
            out = loss_of(peft_model, model_type)
            with peft_model.disable_adapter():
                assert not torch.allclose(out, loss_of(peft_model, model_type))


def test_derived_targets_round_trip_through_a_checkpoint(tmp_path) -> None:
    # The regex written down for the toy model's FFN must select the same modules when the adapter is loaded.
    torch.manual_seed(0)
    model = get_peft_model(ToyLM(), IA3Config(init_ia3_weights=False))
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(ToyLM(), tmp_path)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), model(ids))
    assert wrapped(reloaded, IA3Layer) == wrapped(model, IA3Layer)
