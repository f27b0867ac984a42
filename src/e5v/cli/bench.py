"""``e5v bench``: the official recipe against the fast path, on the same model and inputs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Literal

from e5v.cli.common import add_model_options, positive

__all__ = ["register"]

EPILOG = """\
The corpora are synthetic texts and scikit-image's sample photos (the bench extra:
pip install "e5v[bench]"). Timings under 0.3 s a repetition, or spread by more than a
quarter between repetitions, are flagged under the table; one repetition under 1 s
gives no speed-up at all. Quote ratios from one run with --repeats 3 or more.

examples:
  e5v bench --random-init small                      # CPU, no download (E5-V's proportions)
  e5v bench --random-init small --texts 256 --repeats 5 --cache --json
  e5v bench --random-init e5v-8b --device cuda --dtype bfloat16 --json --texts 256
  e5v bench --model /models/e5-v --device cuda       # a real checkpoint
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark the fast path against the official recipe",
        description=(
            "Time the official E5-V recipe (one item at a time, full forward) and e5v's fast path on the "
            "same model and inputs, interleaved: items/s, speed-up, peak memory, max |Δ| of the vectors."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = add_model_options(parser, revision=False)
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
    corpus.add_argument("--texts", type=_count, default=32, help="texts of 5-60 words (default: 32)")
    corpus.add_argument("--images", type=_count, default=16, help="photos of different sizes (default: 16)")
    corpus.add_argument("--mixed", type=_count, default=24, help="texts, photos and composed queries (default: 24)")
    corpus.add_argument("--repeats", type=positive, default=3, help="interleaved repetitions of each path (default: 3)")
    parser.add_argument("--cache", action="store_true", help="also time cold and warm runs of the embedding cache")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not known")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus and random weights (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from e5v.optional import require

    require("skimage", "bench")
    from e5v.bench.fastpath import format_report, run_bench

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
    sys.stdout.write((json.dumps(report.to_dict(), indent=2) if args.json else format_report(report)) + "\n")
    return 0


def _count(value: str) -> int:
    """A corpus size: 0 or more."""
    return 0 if value == "0" else positive(value, "0 or a positive number")


def _token_budget(value: str) -> int | Literal["auto"] | None:
    if value == "auto":
        return "auto"
    if value == "none":
        return None
    return positive(value, "a positive number, 'auto' or 'none'")
