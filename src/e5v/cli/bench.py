"""``e5v bench``: the official recipe against the fast path, on the same model and inputs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Literal

from e5v.cli.common import add_model_options, positive

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark the fast path against the official recipe",
        description=(
            "Time the official E5-V recipe (one item at a time, full forward) and e5v's fast path on the "
            "same model and inputs, interleaved: items/s, speed-up, peak memory, max |Δ| of the vectors. "
            "Example on a GPU without downloading anything: "
            "e5v bench --random-init e5v-8b --device cuda --dtype bfloat16 --json"
        ),
    )
    group = add_model_options(parser)
    group.add_argument(
        "--random-init",
        choices=("small", "e5v-8b"),
        default=None,
        help="random weights, no download: 'small' (E5-V's proportions, CPU-sized) or 'e5v-8b' (full size, GPU)",
    )
    group.add_argument(
        "--max-batch-tokens",
        type=_token_budget,
        default="auto",
        help="fast path padded tokens per forward pass: a number, 'auto' (16384 on GPU; on CPU 1024 shared "
        "by the workers) or 'none'",
    )
    group.add_argument(
        "--workers",
        type=positive,
        default=1,
        help="fast path batches at once on a CPU, each on its own thread (default: 1)",
    )
    corpus = parser.add_argument_group("corpus")
    corpus.add_argument("--texts", type=int, default=32, help="texts of 5-60 words (default: 32)")
    corpus.add_argument("--images", type=int, default=16, help="photos of different sizes (default: 16)")
    corpus.add_argument("--mixed", type=int, default=24, help="texts, photos and composed queries (default: 24)")
    corpus.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of each path (default: 3)")
    parser.add_argument("--cache", action="store_true", help="also time cold and warm runs of the embedding cache")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not known")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus and random weights (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from e5v.bench import format_report, run_bench
    from e5v.errors import E5VError

    for name in ("texts", "images", "mixed"):
        if getattr(args, name) < 0:
            raise SystemExit(f"e5v bench: --{name} must be at least 0")
    if args.repeats < 1:
        raise SystemExit("e5v bench: --repeats must be at least 1")
    try:
        report = run_bench(
            None if args.random_init else args.model,
            random_init=args.random_init,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            max_batch_tokens=args.max_batch_tokens,
            workers=args.workers,
            texts=args.texts,
            images=args.images,
            mixed=args.mixed,
            repeats=args.repeats,
            cache=args.cache,
            peak_tflops=args.peak_tflops,
            seed=args.seed,
        )
    except E5VError as exc:
        raise SystemExit(f"e5v bench: {exc}") from None
    sys.stdout.write((json.dumps(report.to_dict(), indent=2) if args.json else format_report(report)) + "\n")
    return 0


def _token_budget(value: str) -> int | Literal["auto"] | None:
    if value == "auto":
        return "auto"
    if value == "none":
        return None
    return positive(value, "a positive number, 'auto' or 'none'")
