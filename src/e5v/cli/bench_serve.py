"""``e5v bench-serve``: cross-request batching of ``e5v serve`` against batching off and in-process."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from e5v.cli.common import positive

__all__ = ["register"]

EPILOG = """\
Starts two `e5v serve` subprocesses on loopback ports (batching across requests, and
--no-batching) on the same checkpoint as the in-process embedder, on the CPU; each repeat
takes every measure once, in turn.
Needs the serve and bench extras. Quote ratios from one run.

examples:
  e5v bench-serve --random-init small                 # CPU, no download
  e5v bench-serve --model tiny-e5v --texts 16 --json
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench-serve",
        help="benchmark the server's batching across requests",
        description="Time e5v serve with and without batching across requests, and against in-process embed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="hub id or local checkpoint folder")
    source.add_argument("--random-init", choices=("small",), help="random weights, no download: 'small'")
    parser.add_argument("--texts", type=positive, default=32, help="texts, and the most concurrent clients (32)")
    parser.add_argument("--repeats", type=positive, default=3, help="repetitions of the in-process and batched runs")
    parser.add_argument("--requests", type=positive, default=4, help="requests each concurrent client sends (4)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from e5v.optional import require

    require("skimage", "bench")
    require("fastapi", "serve")
    from e5v.serve_bench import format_serve_report, run_serve_bench

    report = run_serve_bench(
        args.model,
        random_init=args.random_init,
        texts=args.texts,
        repeats=args.repeats,
        requests_per_client=args.requests,
    )
    sys.stdout.write((json.dumps(report.to_dict(), indent=2) if args.json else format_serve_report(report)) + "\n")
    return 0
