"""``e5v train``: contrastive LoRA training on text pairs (the paper's recipe by default)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from e5v.cli.common import as_flags, counted, dtype_option, positive, show_progress
from e5v.defaults import DEFAULT_MODEL

__all__ = ["register"]

EPILOG = """\
Data: CSV, TSV, JSONL or Parquet with columns anchor, positive and optional negative
(SimCSE's sent0, sent1, hard_neg also work; map others with --column anchor=question).
The defaults are the paper's recipe (LoRA r 64, alpha 16, dropout 0.05; lr 4e-4;
InfoNCE at temperature 0.05; sentences cut at 32 tokens). Needs the train extra:
pip install "e5v[train]".

examples:
  # a CPU smoke run on a tiny random checkpoint (learns nothing useful)
  e5v train --model tiny-e5v --data pairs.csv --output tiny-adapter --max-steps 20 \\
      --batch-size 4 --lr 1e-2 --warmup-steps 0 --cpu
  # the paper's run on SimCSE NLI on one GPU (768 rows a step)
  e5v train --model royokong/e5-v --data nli_for_simcse.csv --output e5v-nli --epochs 2 \\
      --batch-size 96 --grad-accum 8 --qlora --save-every 100
  e5v train ... --resume e5v-nli                 # continue after an interruption
  accelerate launch --num_processes 8 $(which e5v) train ...   # several GPUs
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a LoRA adapter on text pairs (anchor, positive, optional negative)",
        description=(
            "Contrastive (InfoNCE) LoRA training of E5-V's language model on text pairs from a CSV, TSV, "
            "JSONL or Parquet file with columns anchor, positive and optional negative (or SimCSE's sent0, "
            "sent1, hard_neg). Saves a peft adapter in --output; use it with E5VEmbedder(model, adapter=DIR). "
            "For several GPUs run it under 'accelerate launch $(which e5v) train ...'."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, help=f"base checkpoint (default: {DEFAULT_MODEL})")
    model.add_argument("--revision", default=None, help="hub revision of --model: a branch, tag or commit")
    parser.add_argument("--data", required=True, help="training pairs (.csv, .tsv, .jsonl, .parquet)")
    parser.add_argument("--output", required=True, help="directory for the adapter and checkpoints")
    parser.add_argument("--eval-data", default=None, help="held-out pairs: rank of each positive, logged")
    parser.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="ROLE=NAME",
        help="use column NAME as ROLE (anchor, positive, negative); repeatable",
    )
    steps = parser.add_argument_group("schedule")
    steps.add_argument("--epochs", type=int, default=1, help="passes over the data (default: 1)")
    steps.add_argument("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    steps.add_argument("--batch-size", type=int, default=8, help="rows per forward pass per process (default: 8)")
    steps.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimizer step (default: 1)")
    steps.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (default: 4e-4)")
    steps.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps (default: 100)")
    steps.add_argument("--seed", type=int, default=42, help="seed of the data order and LoRA init (default: 42)")
    method = parser.add_argument_group("method")
    method.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature (default: 0.05)")
    method.add_argument(
        "--symmetric", action="store_true", help="average both directions (anchor->positive, positive->anchor)"
    )
    method.add_argument("--max-length", type=int, default=32, help="cut sentences at N tokens (default: 32)")
    method.add_argument("--lora-r", type=positive, default=64, help="LoRA rank (default: 64)")
    method.add_argument(
        "--lora-alpha", type=positive, default=16, help="LoRA scaling: updates are scaled by alpha / r (default: 16)"
    )
    method.add_argument(
        "--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input, in [0, 1) (default: 0.05)"
    )
    system = parser.add_argument_group("memory and devices")
    system.add_argument(
        "--dtype",
        type=dtype_option,
        default=None,
        help="bfloat16, float16, float32 (default: bf16 on GPU, fp32 on CPU)",
    )
    system.add_argument("--qlora", action="store_true", help="4-bit NF4 base model (needs bitsandbytes and CUDA)")
    system.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute activations in the backward pass (default: on)",
    )
    system.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    saving = parser.add_argument_group("checkpoints")
    saving.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    saving.add_argument("--resume", default=None, help="a checkpoint-STEP directory, or an output dir (latest)")
    saving.add_argument("--merge-to", default=None, help="also save a full merged checkpoint (model + processor)")
    saving.add_argument("--log-every", type=int, default=10, help="log the loss every N steps (default: 10)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from e5v.training import TrainingConfig, train

    columns = {}
    for item in args.column:
        role, sep, name = item.partition("=")
        if not sep or not name:
            sys.stderr.write(f"e5v train: error: --column takes ROLE=NAME, got {item!r}\n")
            return 2
        columns[role] = name
    try:
        config = TrainingConfig(
            data=args.data,
            output_dir=args.output,
            model=args.model,
            revision=args.revision,
            eval_data=args.eval_data,
            columns=columns,
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            temperature=args.temperature,
            symmetric=args.symmetric,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            max_length=args.max_length,
            dtype=args.dtype,
            load_in_4bit=args.qlora,
            gradient_checkpointing=args.gradient_checkpointing,
            cpu=args.cpu,
            save_every=args.save_every,
            log_every=args.log_every,
            resume=args.resume,
            merge_to=args.merge_to,
            seed=args.seed,
        )
    except ValueError as exc:
        sys.stderr.write(f"e5v train: error: {as_flags(str(exc))}\n")
        return 2
    result = train(config, show_progress_bar=show_progress(args.quiet))
    lines = [
        f"trained {counted(result.steps, 'step')}" + (f"; last loss {result.losses[-1]:.4f}" if result.losses else "")
    ]
    lines += [
        f"eval at step {e['step']}: mean rank {e['mean_rank']:.2f}, accuracy {e['accuracy']:.3f}"
        for e in result.evaluations[-1:]
    ]
    lines.append(f"adapter: {result.output_dir}")
    if result.merged_dir is not None:
        lines.append(f"merged checkpoint: {result.merged_dir}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
