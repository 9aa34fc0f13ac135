"""TRL's SFT and DPO trainers with peftkit (``peftkit.integrations.trl``): from ``peft_config=peftkit.LoraConfig``
and from a model wrapped by ``get_peft_model``, only adapter parameters train, ``save_model`` writes the adapter
only and it reloads to the same logits; QLoRA trains through SFT; DPO's reference is the policy itself."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import VOCAB, make_inputs, make_model, model_logits

pytest.importorskip("trl")
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from tokenizers.pre_tokenizers import Whitespace  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from peftkit import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftkit.integrations.trl import DPOTrainer, SFTTrainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames, read by TRL

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
COMMON = {"use_cpu": True, "report_to": [], "per_device_train_batch_size": 4, "logging_steps": 1,
          "disable_tqdm": True, "save_strategy": "no", "lr_scheduler_type": "constant", "seed": 0}


def _tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]  # ids match the tiny Llama
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>", bos_token="<bos>")


def _texts() -> Dataset:  # one batch of four sentences: memorisable in a few steps
    return Dataset.from_dict({"text": ["w1 w2 w3 w4 w5 w6", "w7 w8 w9 w10 w11", "w12 w13 w14 w15", "w16 w17 w18"]})


def _preferences() -> Dataset:
    return Dataset.from_dict({"prompt": ["w1 w2", "w3 w4", "w5 w6", "w7 w8"],
                              "chosen": [" w10 w11", " w12 w13", " w14", " w15 w16"],
                              "rejected": [" w20", " w21 w22", " w23", " w24"]})


def _frozen(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _adapter(model: PeftModel, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.get_adapter_state_dict(name).items()}


def _losses(trainer: trl.SFTTrainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("wrapped", [False, True], ids=["peft_config", "get_peft_model"])
def test_sft_trains_only_the_adapter_and_saves_it(tmp_path, wrapped: bool) -> None:
    base = make_model("llama", seed=0)
    kwargs = {"model": get_peft_model(base, LoraConfig(**LORA))} if wrapped else {"model": base,
                                                                                    "peft_config": LoraConfig(**LORA)}
    # TRL's gradient checkpointing and bf16 defaults are exercised by the QLoRA test; off here for speed.
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=5, learning_rate=1e-2, bf16=False,
                         gradient_checkpointing=False, **COMMON)
    trainer = SFTTrainer(args=args, train_dataset=_texts(), processing_class=_tokenizer(), **kwargs)
    model = trainer.model
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen, adapter = _frozen(model), _adapter(model)
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(v, adapter[k]) for k, v in _adapter(model).items())

    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    reloaded = PeftModel.from_pretrained(make_model("llama", seed=0), tmp_path / "final")
    inputs = make_inputs("llama")
    assert torch.equal(model_logits(reloaded, inputs), model_logits(model.eval(), inputs))


def test_sft_trains_a_qlora_model_and_checkpoints_the_adapter(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_model("llama", seed=0).save_pretrained(tmp_path / "base")

    def quantized() -> torch.nn.Module:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, dtype=torch.float32)

    # TRL's defaults for the recipe: gradient checkpointing, bf16 autocast, adapters cast to bf16 on a 4-bit base.
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, learning_rate=1e-2,
                         **{**COMMON, "save_strategy": "steps", "save_steps": 4})
    trainer = SFTTrainer(model=quantized(), args=args, train_dataset=_texts(), processing_class=_tokenizer(),
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0], losses
    files = set(os.listdir(tmp_path / "out" / "checkpoint-4"))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    reloaded = PeftModel.from_pretrained(quantized(), tmp_path / "out" / "checkpoint-4")
    inputs = make_inputs("llama")
    # Trained adapters are bf16 (TRL casts them); reloaded into fp32 ones they hold the same values.
    torch.testing.assert_close(model_logits(reloaded.eval(), inputs), model_logits(trainer.model.eval(), inputs),
                               atol=2e-2, rtol=0)


def test_refusals_name_the_fix_and_leave_the_model_as_it_was(tmp_path) -> None:
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, **COMMON)
    wrapped = get_peft_model(make_model("llama"), LoraConfig(**LORA))
    with pytest.raises(ValueError, match="PeftModel already"):
        SFTTrainer(wrapped, args, train_dataset=_texts(), processing_class=_tokenizer(), peft_config=LoraConfig())
    with pytest.raises(TypeError, match="use peftkit.integrations.trl.SFTTrainer"):  # TRL's own, before any step
        trl.SFTTrainer(wrapped, args, train_dataset=_texts(), processing_class=_tokenizer())
    base = make_model("llama")
    with pytest.raises(ValueError, match="Remove 'lm_head' from target_modules"):
        SFTTrainer(base, args, train_dataset=_texts(), processing_class=_tokenizer(),
                   peft_config=LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert type(base.lm_head) is torch.nn.Linear and all(p.requires_grad for p in base.parameters())
    dpo_args = trl.DPOConfig(output_dir=str(tmp_path), precompute_ref_log_probs=True, **COMMON)
    with pytest.raises(NotImplementedError, match="precompute_ref_log_probs"):
        DPOTrainer(base, args=dpo_args, train_dataset=_preferences(), processing_class=_tokenizer(),
                   peft_config=LoraConfig(**LORA))
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@pytest.mark.parametrize("wrapped", [False, True], ids=["peft_config", "get_peft_model"])
def test_dpo_uses_the_policy_as_its_reference(tmp_path, wrapped: bool) -> None:
    base = make_model("llama", seed=0)
    kwargs = {"model": get_peft_model(base, LoraConfig(**LORA))} if wrapped else {"model": base,
                                                                                    "peft_config": LoraConfig(**LORA)}
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=3, learning_rate=3e-2, bf16=False, **COMMON)
    trainer = DPOTrainer(args=args, train_dataset=_preferences(), processing_class=_tokenizer(), **kwargs)
    model = trainer.model
    assert not list(trainer.ref_model.parameters())  # no second copy of the model
    start = _adapter(model)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # reference == policy at step 0
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    if wrapped:  # TRL's rule for an adapter that came with the model: a frozen copy of it is the reference
        assert model.active_adapters == ["default"]
        ref = _adapter(model, "ref")
        assert all(torch.equal(ref[k], v) for k, v in start.items())
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    trainer.save_model(str(tmp_path / "final"))
    assert "model.safetensors" not in os.listdir(tmp_path / "final")
    reloaded = PeftModel.from_pretrained(make_model("llama", seed=0), tmp_path / "final")
    inputs = make_inputs("llama")
    assert torch.equal(model_logits(reloaded, inputs), model_logits(model.eval(), inputs))


def test_sft_works_without_hf_peft_installed(tmp_path) -> None:
    script = textwrap.dedent("""
        import importlib.machinery, importlib.util, sys

        class NoPeft:  # HF peft as if not installed: transformers and TRL see no spec, an import fails
            def find_spec(self, name, path=None, target=None):
                return importlib.machinery.ModuleSpec(name, self) if name.partition(".")[0] == "peft" else None
            def create_module(self, spec):
                raise ModuleNotFoundError(f"No module named {spec.name!r}")
            def exec_module(self, module):
                pass

        sys.meta_path.insert(0, NoPeft())
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, package=None: (
            None if name.partition(".")[0] == "peft" else real_find_spec(name, package))
        sys.path[:0] = [sys.argv[2], sys.argv[2] + "/integrations"]
        import trl
        from conftest import make_model
        from test_trl import COMMON, LORA, _texts, _tokenizer
        from peftkit import LoraConfig
        from peftkit.integrations.trl import SFTTrainer
        args = trl.SFTConfig(output_dir=sys.argv[1], max_steps=1, bf16=False, gradient_checkpointing=False, **COMMON)
        SFTTrainer(make_model("llama"), args, train_dataset=_texts(), processing_class=_tokenizer(),
                   peft_config=LoraConfig(**LORA)).train()
        assert "peft" not in sys.modules
        print("OK")
    """)
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path), tests], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def _template_with_new_tokens(directory) -> str:
    source = _tokenizer()
    source.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    source.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
                            "{% endfor %}")
    source.save_pretrained(directory)
    return str(directory)


def test_sft_with_a_cloned_chat_template_trains_the_new_tokens_rows_and_reloads(tmp_path) -> None:
    # TRL's chat_template_path: the template's special tokens are added to the vocabulary (embeddings resized) and
    # TRL sets trainable_token_indices={"embed_tokens": new ids} and modules_to_save=["lm_head"] on the config.
    _template_with_new_tokens(tmp_path / "template")
    chats = Dataset.from_dict({"messages": [[{"role": "user", "content": "w1 w2"},
                                             {"role": "assistant", "content": "w3 w4"}]] * 4})
    # eos_token too: TRL applies it before cloning, so the template's eos ("<eos>", id 1) is what stays.
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=5, learning_rate=1e-2, bf16=False,
                         gradient_checkpointing=False, chat_template_path=str(tmp_path / "template"),
                         eos_token="w5", **COMMON)
    trainer = SFTTrainer(model=make_model("llama", seed=0), args=args, train_dataset=chats,
                         processing_class=_tokenizer(), peft_config=LoraConfig(**LORA))
    model = trainer.model
    assert trainer.processing_class.eos_token == "<eos>" and model.config.eos_token_id == 1
    new_ids = trainer.processing_class.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    config = model.peft_config["default"]
    added = config.trainable_token_indices["embed_tokens"]  # the template's tokens (and TRL's padding tokens)
    assert set(new_ids) <= set(added) and min(added) >= VOCAB
    assert config.modules_to_save == ["lm_head"]
    embedding = model.get_base_model().get_input_embeddings()  # the trainable-tokens layer on the resized matrix
    matrix = embedding.get_base_layer().weight.detach().clone()
    head = model.get_base_model().get_output_embeddings()  # modules_to_save: TRL's fused head reads the copy
    head_before = head.weight.detach().clone()
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0], losses
    delta = next(v for k, v in model.get_adapter_state_dict("default").items() if "trainable_tokens_delta" in k)
    assert delta.shape[0] == len(added)
    rows = embedding(torch.arange(matrix.shape[0])).detach()  # only the new tokens' rows moved
    moved = (rows != matrix).any(dim=1).nonzero().flatten().tolist()
    assert moved and set(moved) <= set(added) and set(new_ids) <= set(moved), moved
    assert torch.equal(embedding.get_base_layer().weight, matrix)
    assert not torch.equal(head.weight, head_before) and torch.equal(head.base_layer.weight, head_before)

    trainer.save_model(str(tmp_path / "final"))
    base = make_model("llama", seed=0)
    base.resize_token_embeddings(matrix.shape[0])
    reloaded = PeftModel.from_pretrained(base, tmp_path / "final")  # the resized rows come from the checkpoint
    ids = torch.tensor([[new_ids[0], 5, 6, new_ids[1], 7]])
    torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                               atol=1e-5, rtol=0)


def test_chat_template_adding_tokens_with_a_config_that_cannot_train_rows_is_refused_first(tmp_path) -> None:
    from peftkit import IA3Config

    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, bf16=False, gradient_checkpointing=False,
                         chat_template_path=_template_with_new_tokens(tmp_path / "template"), **COMMON)
    model = make_model("llama", seed=0)
    with pytest.raises(ValueError, match=r"adds tokens \['<\|im_start\|>', '<\|im_end\|>'\].*IA3Config"):
        SFTTrainer(model=model, args=args, train_dataset=_texts(), processing_class=_tokenizer(),
                   peft_config=IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    assert model.get_input_embeddings().num_embeddings == VOCAB  # not resized
    assert not hasattr(model, "peft_config")
