"""``e5v bench-serve``: cross-request batching of ``e5v serve`` against batching off and in-process,
or (``--soak``) the server under a mixed load for a while: throughput, latency, errors, memory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from e5v.cli.common import positive
from e5v.cli.serve import seconds
from e5v.errors import ConfigurationError

__all__ = ["register"]

EPILOG = """\
Starts two `e5v serve` subprocesses on loopback ports (batching across requests, and
--no-batching) on the same checkpoint as the in-process embedder, on the CPU; each repeat
takes every measure once, in turn.
Needs the serve and bench extras. Quote ratios from one run.

--soak SECONDS starts one server instead (the same options, batching on) and loads it for
SECONDS from --clients concurrent clients on one pooled HTTP client; they join one by one over
the first half of the --warmup, whose second half is at full load. Each client repeats a
shuffled cycle of 20 requests: 6 texts of one sentence (5-60 words), 2 long texts (5-40
sentences), 4 batches of 2-8 texts, 3 photos, 2 composed queries, 2 interleaved items (a photo
and a caption) and 1 mixed batch (two texts, a photo, a composed query); photos are
scikit-image's, as JPEG and PNG data URIs. Every body is first sent alone; under load each
answer must have a finite unit vector an item, in order, within 1e-4 of that first answer, or
it is an error, as is any status but 200 and any request over --request-timeout. It reports
requests and items per second, p50 and p99 latency overall and per type, errors by kind, and
the server's resident memory (psutil, else /proc) every --sample-every seconds: at the start,
after the warm-up and at the end. It passes (exit 0) with no errors and RSS grown at most
--max-rss-growth percent after the warm-up; else it fails (exit 1) and says why.

examples:
  e5v bench-serve --random-init small                 # CPU, no download
  e5v bench-serve --model tiny-e5v --texts 16 --json
  e5v bench-serve --model small-ckpt --soak 180 --json soak.json   # 64 clients, 3 minutes
"""

#: The batching comparison's options and their defaults (None on the parser: --soak refuses them).
COMPARISON_DEFAULTS = {"texts": 32, "repeats": 3, "requests": 4}
#: The soak's options and their defaults (warm-up: a third of --soak, at most 120 s).
SOAK_DEFAULTS = {"clients": 64, "sample_every": 5.0, "warmup": None, "request_timeout": 60.0, "max_rss_growth": 10.0}


def percent(value: str) -> float:
    """A percentage of at least 0, or argparse's error."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a percentage of at least 0, got {value!r}")
    return number


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench-serve",
        help="benchmark the server's batching across requests, or soak it under mixed load",
        description="Time e5v serve with and without batching across requests, and against in-process embed; "
        "or, with --soak, hold it under a mixed load and watch its errors and memory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="hub id or local checkpoint folder")
    source.add_argument("--random-init", choices=("small",), help="random weights, no download: 'small'")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="the report as JSON: on stdout, or written to PATH (the text report then goes to stdout)",
    )
    comparison = parser.add_argument_group("batching comparison (without --soak)")
    comparison.add_argument("--texts", type=positive, help="texts, and the most concurrent clients (32)")
    comparison.add_argument("--repeats", type=positive, help="repetitions of the in-process and batched runs (3)")
    comparison.add_argument("--requests", type=positive, help="requests each concurrent client sends (4)")
    soak = parser.add_argument_group("soak")
    soak.add_argument("--soak", type=seconds, metavar="SECONDS", help="load one server for SECONDS instead")
    soak.add_argument("--clients", type=positive, help="concurrent clients, joining in the warm-up (64)")
    soak.add_argument("--sample-every", type=seconds, metavar="S", help="seconds between RSS samples (5)")
    soak.add_argument(
        "--warmup", type=seconds, metavar="S", help="seconds of load before RSS growth is counted (SECONDS/3, ≤ 120)"
    )
    soak.add_argument("--request-timeout", type=seconds, metavar="S", help="a request's time limit, then an error (60)")
    soak.add_argument(
        "--max-rss-growth", type=percent, metavar="PCT", help="RSS growth after the warm-up that fails the run (10)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from e5v.optional import require

    require("skimage", "bench")
    require("fastapi", "serve")
    from e5v.bench.serving import format_serve_report, format_soak_report, run_serve_bench, run_soak

    mode, other = (
        (SOAK_DEFAULTS, COMPARISON_DEFAULTS) if args.soak is not None else (COMPARISON_DEFAULTS, SOAK_DEFAULTS)
    )
    if given := [name for name in other if getattr(args, name) is not None]:
        options = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConfigurationError(
            f"{options} {'do' if len(given) > 1 else 'does'} not apply "
            + ("to --soak" if args.soak is not None else "without --soak")
        )
    options = {name: default if getattr(args, name) is None else getattr(args, name) for name, default in mode.items()}
    if args.soak is not None:
        report = run_soak(args.model, random_init=args.random_init, seconds=args.soak, **options)
        text, figures, flags = format_soak_report(report), report.to_dict(), report.flags
    else:
        result = run_serve_bench(
            args.model,
            random_init=args.random_init,
            texts=options["texts"],
            repeats=options["repeats"],
            requests_per_client=options["requests"],
        )
        text, figures, flags = format_serve_report(result), result.to_dict(), []
    if args.json is not None and args.json != "-":
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write((json.dumps(figures, indent=2) if args.json == "-" else text) + "\n")
    if flags:
        sys.stderr.write(f"e5v bench-serve: the soak failed: {'; '.join(flags)}\n")
    return 1 if flags else 0
