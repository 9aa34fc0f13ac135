"""Fine-tune LoRA with the transformers ``Trainer`` on a real model, fully offline: all-MiniLM-L6-v2 on Rotten
Tomatoes polarity (fresh vs rotten), both shipped as pip packages (see ``examples/_data.py``).

1. ``PeftTrainer`` (``peftkit.integrations.trainer``): the stock ``Trainer`` plus adapter-only model files.
   Evaluates accuracy every ``--eval-steps`` steps, keeps checkpoints, reloads the best one at the end.
2. Every checkpoint and the final ``save_model`` directory hold ``adapter_model.safetensors`` (a few hundred KB),
   never the 90 MB base model; the script lists them.
3. Resumes from the first checkpoint on a fresh base model and trains to the same step: the adapter equals the
   one trained without interruption (``--skip-resume`` leaves this out).
4. Reloads the saved adapter with ``PeftModel.from_pretrained``: same accuracy.

Run: ``.venv/bin/python examples/train_trainer.py`` (about 3 minutes on 2 idle CPU cores). ``--gradient-checkpointing``
and ``--bf16`` (autocast on the CPU) switch those on; the adapters stay fp32 either way.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing is fetched
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import pathlib
import tempfile

import numpy as np
import torch
from _data import MAX_LEN, MODEL_DIR, SEED, load_base, load_tasks
from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments
from transformers import logging as hf_logging

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.integrations.trainer import PeftTrainer

hf_logging.set_verbosity_error()  # "classifier newly initialized" is intended: the head is trained


def _rows(tok, data: list[tuple[str, int]]) -> list[dict]:
    return [{**tok(text, truncation=True, max_length=MAX_LEN), "labels": label} for text, label in data]


def _accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}


def _model() -> PeftModel:
    # task_type SEQ_CLS puts the new classifier head into modules_to_save: trained, and saved with the adapter.
    return get_peft_model(load_base(), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="SEQ_CLS",
                                                  target_modules=["query", "value"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-rows", type=int, default=960)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--output", default=None, help="output directory (default: a temporary one)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the adapters stay fp32)")
    parser.add_argument("--skip-resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    output = pathlib.Path(args.output or tempfile.mkdtemp(prefix="peftkit-trainer-"))

    train_data, test_data = load_tasks()["polarity"]
    rng = np.random.default_rng(SEED)
    train_data = [train_data[i] for i in rng.permutation(len(train_data))[: args.train_rows]]
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    train_rows, eval_rows = _rows(tok, train_data), _rows(tok, test_data[::5])  # 200 balanced test rows

    def trainer_for(model: PeftModel, run_dir: pathlib.Path) -> PeftTrainer:
        training_args = TrainingArguments(
            output_dir=str(run_dir), use_cpu=True, report_to=[], seed=SEED, max_steps=args.steps,
            per_device_train_batch_size=16, per_device_eval_batch_size=64, learning_rate=2e-3, warmup_steps=5,
            # Not train_sampling_strategy="group_by_length": its sampler draws from the RNG state a resumed run
            # restores, so the resumed run would see other batches (measured: 5e-3 adapter difference).
            eval_strategy="steps", eval_steps=args.eval_steps, save_strategy="steps", save_steps=args.eval_steps,
            load_best_model_at_end=True, metric_for_best_model="accuracy", logging_steps=args.eval_steps,
            gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16, disable_tqdm=True,
        )
        return PeftTrainer(model=model, args=training_args, train_dataset=train_rows, eval_dataset=eval_rows,
                           data_collator=DataCollatorWithPadding(tok), compute_metrics=_accuracy)

    model = _model()
    model.print_trainable_parameters()
    trainer = trainer_for(model, output / "run")
    trainer.train()
    metrics = trainer.evaluate()
    print(f"best checkpoint {trainer.state.best_model_checkpoint} (accuracy {trainer.state.best_metric:.3f}); "
          f"after load_best_model_at_end: eval accuracy {metrics['eval_accuracy']:.3f}, "
          f"loss {metrics['eval_loss']:.3f}")
    trainer.save_model(str(output / "final"))
    for folder in sorted((output / "run").glob("checkpoint-*")) + [output / "final"]:
        files = {p.name: p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".json", ".pt")}
        print(f"  {folder.name}: " + ", ".join(f"{name} {size / 1e3:,.0f} KB" for name, size in sorted(files.items())))

    if not args.skip_resume:
        first = sorted((output / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[0]
        resumed = _model()
        resumed_trainer = trainer_for(resumed, output / "resumed")
        resumed_trainer.args.load_best_model_at_end = False  # compare the last step's adapters
        trainer_last = PeftModel.from_pretrained(load_base(), output / "run" / f"checkpoint-{args.steps}")
        resumed_trainer.train(resume_from_checkpoint=str(first))
        last = trainer_last.get_adapter_state_dict("default")
        diff = max((resumed.get_adapter_state_dict("default")[k] - v).abs().max().item() for k, v in last.items())
        print(f"resumed from {first.name} to step {resumed_trainer.state.global_step}: max |adapter difference| vs "
              f"the uninterrupted run {diff:.2e}")

    reloaded = PeftModel.from_pretrained(load_base(), output / "final")
    reloaded_metrics = trainer_for(reloaded, output / "reloaded").evaluate()
    print(f"reloaded adapter: eval accuracy {reloaded_metrics['eval_accuracy']:.3f} (saved in {output / 'final'})")


if __name__ == "__main__":
    main()
