"""``e5v bench-serve``: cross-request batching of ``e5v serve`` against batching off and in-process,
or (``--soak``) the server under a mixed load for a while: throughput, latency, errors, memory; or
(``--replicas``) Ray Serve replicas against one replica and against the single server."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from e5v.cli.common import device_option, positive
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

--replicas [N] starts four servers in turn instead, each on its own loopback port and stopped
before the next starts: `e5v serve --replicas 1 --threads 1` (ray-1), `--replicas N --threads 1`
(ray-N; N is 2 unless given), the single server with `--threads N` (single-N) and with
`--threads 1` (single-1). Each is loaded by --clients concurrent single-text clients on one
pooled HTTP client, --requests each, after a warm-up burst (for a Ray server, repeated until
every replica has answered, within --ready-timeout). Every answer must be a 200 with a finite
unit vector within 1e-4 of the in-process embedder's vector of its text (float32), or it is an
error, as is any request over --request-timeout. It reports requests/s (the median repeat),
p50 and p99 latency, errors, the requests each replica served (x-e5v-replica), and ray-N/ray-1
(target >= 1.6x for 2 replicas on 2 cores), ray-N/single-N, and the Ray path's overhead,
ray-1 against single-1 (target <= 10%). It passes (exit 0) with no errors; the targets are
reported, not enforced. Needs the ray extra too.

examples:
  e5v bench-serve --random-init small                 # CPU, no download
  e5v bench-serve --model tiny-e5v --texts 16 --json
  e5v bench-serve --model small-ckpt --soak 180 --json soak.json   # 64 clients, 3 minutes
  e5v bench-serve --random-init small --replicas      # 1 and 2 replicas, 2 single servers
  e5v bench-serve --model small-ckpt --replicas 2 --device cuda --gpus-per-replica 0.5
"""

#: Each mode's options and their defaults (None on the parser: the other modes refuse them). The
#: soak's warm-up: a third of --soak, at most 120 s; --gpus-per-replica: e5v serve's own.
MODES = {
    "comparison": {"texts": 32, "repeats": 3, "requests": 4},
    "soak": {"clients": 64, "sample_every": 5.0, "warmup": None, "request_timeout": 60.0, "max_rss_growth": 10.0},
    "replicas": {
        "texts": 32,
        "repeats": 3,
        "requests": 8,
        "clients": 32,
        "request_timeout": 60.0,
        "ready_timeout": 600.0,
        "device": "cpu",
        "gpus_per_replica": None,
    },
}
#: How a refusal names each mode.
MODE_NAMES = {"comparison": "without --soak or --replicas", "soak": "to --soak", "replicas": "to --replicas"}


def percent(value: str) -> float:
    """A percentage of at least 0, or argparse's error."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a percentage of at least 0, got {value!r}")
    return number


def replica_count(value: str) -> int:
    """``--replicas``: a number of replicas of at least 2, or argparse's error."""
    number = positive(value, "a number of replicas of at least 2")
    if number < 2:
        raise argparse.ArgumentTypeError(f"expected a number of replicas of at least 2, got {value!r}")
    return number


def gpus(value: str) -> float:
    """``--gpus-per-replica``: a number of GPUs of at least 0 (a fraction shares one), or argparse's error."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of GPUs of at least 0, such as 1 or 0.5, got {value!r}")
    return number


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench-serve",
        help="benchmark the server's batching across requests, soak it under mixed load, or time Ray Serve replicas",
        description="Time e5v serve with and without batching across requests, and against in-process embed; "
        "or, with --soak, hold it under a mixed load and watch its errors and memory; or, with --replicas, "
        "time Ray Serve replicas against one replica and against the single server.",
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
    comparison = parser.add_argument_group("batching comparison (without --soak or --replicas; some with --replicas)")
    comparison.add_argument(
        "--texts", type=positive, help="texts, and the most concurrent clients (32); --replicas: texts sent (32)"
    )
    comparison.add_argument(
        "--repeats", type=positive, help="repetitions of the in-process and batched runs (3); --replicas: of each (3)"
    )
    comparison.add_argument(
        "--requests", type=positive, help="requests each concurrent client sends (4; --replicas: 8, after a warm-up)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--soak", type=seconds, metavar="SECONDS", help="load one server for SECONDS instead")
    mode.add_argument(
        "--replicas",
        type=replica_count,
        nargs="?",
        const=2,
        metavar="N",
        help="instead, time N Ray Serve replicas (2 if N is left out) against one, and against the single server",
    )
    soak = parser.add_argument_group("soak (and --replicas: --clients, --request-timeout)")
    soak.add_argument(
        "--clients", type=positive, help="concurrent clients, joining in the warm-up (64; --replicas: 32, all at once)"
    )
    soak.add_argument("--sample-every", type=seconds, metavar="S", help="seconds between RSS samples (5)")
    soak.add_argument(
        "--warmup", type=seconds, metavar="S", help="seconds of load before RSS growth is counted (SECONDS/3, ≤ 120)"
    )
    soak.add_argument("--request-timeout", type=seconds, metavar="S", help="a request's time limit, then an error (60)")
    soak.add_argument(
        "--max-rss-growth", type=percent, metavar="PCT", help="RSS growth after the warm-up that fails the run (10)"
    )
    replicas = parser.add_argument_group("replicas")
    replicas.add_argument("--device", type=device_option, help="the servers' device: cpu, cuda ... (cpu)")
    replicas.add_argument(
        "--gpus-per-replica",
        type=gpus,
        metavar="G",
        help="GPUs each Ray replica holds, 0.5 for two on one GPU (e5v serve's default: 0 on CPU, 1 on a GPU)",
    )
    replicas.add_argument(
        "--ready-timeout", type=seconds, metavar="S", help="seconds for a server, and each replica, to be ready (600)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from e5v.optional import require

    require("skimage", "bench")
    require("fastapi", "serve")

    mode = "soak" if args.soak is not None else "replicas" if args.replicas is not None else "comparison"
    others = {name for other, defaults in MODES.items() if other != mode for name in defaults} - set(MODES[mode])
    if given := [name for name in sorted(others) if getattr(args, name) is not None]:
        options = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConfigurationError(f"{options} {'do' if len(given) > 1 else 'does'} not apply {MODE_NAMES[mode]}")
    options = {
        name: default if getattr(args, name) is None else getattr(args, name) for name, default in MODES[mode].items()
    }
    with _sigterm_unwinds():
        text, figures, flags = _measure(mode, args, options)
    if args.json is not None and args.json != "-":
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write((json.dumps(figures, indent=2) if args.json == "-" else text) + "\n")
    if flags:
        sys.stderr.write(f"e5v bench-serve: the {'soak' if mode == 'soak' else 'run'} failed: {'; '.join(flags)}\n")
    return 1 if flags else 0


def _measure(mode: str, args: argparse.Namespace, options: dict[str, Any]) -> tuple[str, dict[str, Any], list[str]]:
    """Run ``mode`` with its ``options``: the text report, its figures and why it failed (none: it passed)."""
    from e5v.bench.serving import format_serve_report, format_soak_report, run_serve_bench, run_soak
    from e5v.optional import require

    if mode == "replicas":
        require("ray", "ray")
        from e5v.bench.replicas import format_replica_report, run_replica_bench

        replica_report = run_replica_bench(
            args.model,
            random_init=args.random_init,
            replicas=args.replicas,
            requests_per_client=options.pop("requests"),
            **options,
        )
        return format_replica_report(replica_report), replica_report.to_dict(), replica_report.flags
    if mode == "soak":
        report = run_soak(args.model, random_init=args.random_init, seconds=args.soak, **options)
        return format_soak_report(report), report.to_dict(), report.flags
    result = run_serve_bench(
        args.model,
        random_init=args.random_init,
        texts=options["texts"],
        repeats=options["repeats"],
        requests_per_client=options["requests"],
    )
    return format_serve_report(result), result.to_dict(), []


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a CI step's timeout) unwinds like Ctrl-C while inside, so every server
    subprocess is stopped; the handler before is put back on exit (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
