"""Train a Hugging Face causal LM from a softlabels logits store with `transformers.Trainer`.

The teacher never runs: the student reads the stored soft labels (`softlabels.SoftLabelDataset`)
and `softlabels.DistillationTrainer` replaces the model's loss with the distillation loss of
the store (the one the train_student stage uses). Needs `pip install "softlabels[hf]"`.

    python examples/hf-trainer/train.py --store data/logits/teacher.zarr \
        --tokenized data/tokenized --tokenizer models/teacher --student scratch \
        --out .softlabels/hf-student --max-steps 50

`--student` is a folder or hub id of any AutoModelForCausalLM with the teacher's vocabulary,
or `scratch` for a small new Llama. The store is checked first against the tokenizer, the
tokenized data, the student's vocabulary and its checksums. Writes the student
(save_pretrained, with the tokenizer) and `distill_log.json` (the loss of every step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

import softlabels as sl


def student_model(name: str, vocab_size: int, seed: int) -> AutoModelForCausalLM:
    """A pretrained causal LM (folder or hub id), or a small scratch Llama (`scratch`)."""
    if name != "scratch":
        return AutoModelForCausalLM.from_pretrained(name)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", type=Path, required=True, help="logits store (Zarr folder)")
    p.add_argument("--tokenized", type=Path, required=True, help="its tokenized DatasetDict")
    p.add_argument("--tokenizer", type=Path, required=True, help="the teacher's tokenizer folder")
    p.add_argument("--student", default="scratch", help="folder/hub id of the student, or scratch")
    p.add_argument("--out", type=Path, required=True, help="output folder for the student")
    p.add_argument("--alpha", type=float, default=1.0, help="KD weight (1: pure KD)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--tail", default="bucket", help="top-k stores: renorm | bucket | ignore")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    store = sl.open_store(args.store)
    model = student_model(args.student, store.vocab_size, args.seed)
    store.check(
        tokenizer=args.tokenizer,
        tokenized=args.tokenized,
        vocab_size=model.get_output_embeddings().weight.shape[0],
    )
    rows = sl.SoftLabelDataset(store.path, args.tokenized, seed=args.seed)
    loss = sl.DistillationLoss.from_store(
        store.path, alpha=args.alpha, temperature=args.temperature, tail=args.tail
    )
    training = TrainingArguments(
        output_dir=str(args.out / "checkpoints"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = sl.DistillationTrainer(
        model=model, args=training, train_dataset=rows, distillation=loss
    )
    trainer.train()
    trainer.save_model(str(args.out))
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(args.out)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    (args.out / "distill_log.json").write_text(json.dumps({"loss": losses}, indent=2) + "\n")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
