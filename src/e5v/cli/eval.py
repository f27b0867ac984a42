"""``e5v eval``: the paper's benchmarks as the official evaluation runs them, and retrieval on your own data."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from e5v.cli.common import add_model_options, device_option, dtype_option, positive, show_progress
from e5v.errors import ConfigurationError
from e5v.evaluation.paper import TASKS

__all__ = ["register"]

logger = logging.getLogger(__name__)

TARGETS = ("paper", *TASKS, "retrieval")
#: Options a --compare setting may change.
SETTING_KEYS = ("model", "revision", "dtype", "device", "adapter", "max_image_tiles", "quantization", "prompts")

EPILOG = """\
TARGET is `paper` (Flickr30K, COCO, CIRR val and test, FashionIQ, STS: the paper's table),
one or more benchmarks, or `retrieval` (your own data). Benchmarks read the public Hub
datasets the official evaluation reads (royokong/flickr30k_test ...), or a local copy in
the same schema under --data-dir (save_to_disk folders or Parquet: DIR/royokong/NAME), and
STS reads SentEval's files (DIR/.../STS/STS12-en-test ... and SICK/). Every figure is in
percent; the paper's and MTEB's published numbers stand beside e5v's. CIRR test has no
public labels: its submission JSON is written for the CIRR evaluation server. Vectors go
through the embedding cache (--cache), so a rerun embeds nothing it has embedded before.

retrieval reads BEIR/MTEB's layout: --queries and --corpus JSON lines with an "id" and a
"text" and/or an "image" path; --qrels TSV lines "query-id corpus-id score". A query with
both is a composed query; a corpus item with both is one interleaved vector. It reports
Recall@k, MRR@10 and nDCG@10 per kind of query.

--compare SETTING (repeatable) runs the same evaluation again with some options changed:
comma-separated KEY=VALUE of model, revision, dtype, device, adapter, max_image_tiles,
quantization, prompts (retrieval only); "none" unsets one. Each column after the first
shows its difference to the first.

examples:
  e5v eval paper --device cuda --output e5v-paper.json
  e5v eval flickr30k coco --data-dir /data/e5v-eval --model /models/e5-v
  e5v eval i2i-flickr30k --font arial.ttf
  e5v eval retrieval --queries queries.jsonl --corpus corpus.jsonl --qrels qrels.tsv
  e5v eval retrieval --queries q.jsonl --corpus c.jsonl --qrels r.tsv --compare max_image_tiles=0 \\
      --compare dtype=float32 --compare adapter=e5v-nli
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="reproduce the paper's benchmarks, or measure retrieval on your own data",
        description="Evaluate E5-V: the paper's benchmarks exactly as the official evaluation runs them, "
        "or Recall@k / MRR@10 / nDCG@10 on your own queries, corpus and relevance judgements.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("targets", nargs="+", metavar="TARGET", help=f"one or more of: {', '.join(TARGETS)}")
    group = add_model_options(parser)
    group.add_argument("--adapter", default=None, help="a LoRA adapter from `e5v train`, merged at load")
    group.add_argument(
        "--max-image-tiles",
        type=_tiles,
        default=None,
        help="anyres tiles per image besides the base view (default: all, as E5-V; 0: the base view only)",
    )
    bench = parser.add_argument_group("benchmarks")
    bench.add_argument("--data-dir", default=None, help="local copies of the datasets (DIR/royokong/NAME, SentEval)")
    bench.add_argument("--limit", type=positive, default=None, help="first N rows of each query set: a smoke test")
    bench.add_argument(
        "--font", default=None, help="TrueType font for the I2I captions (default: Pillow's; the official: Arial)"
    )
    bench.add_argument(
        "--submission", default=None, help="CIRR test submission JSON (default: next to --output, .cirr-test.json)"
    )
    own = parser.add_argument_group("retrieval on your own data")
    own.add_argument("--queries", default=None, help="queries JSONL: id, text and/or image")
    own.add_argument("--corpus", default=None, help="corpus JSONL: id, text and/or image")
    own.add_argument("--qrels", default=None, help="relevance TSV: query-id, corpus-id, score")
    own.add_argument(
        "--k", type=_ks, default=(1, 5, 10), help="cut-offs of Recall@k, comma-separated (default: 1,5,10)"
    )
    own.add_argument("--prompts", default=None, help="prompt preset for retrieval (default: e5v; e.g. cirr)")
    run_group = parser.add_argument_group("run")
    run_group.add_argument(
        "--compare", action="append", default=[], metavar="SETTING", help="another setting to run side by side"
    )
    run_group.add_argument("--cache", default=None, help="embedding cache folder (default: ~/.cache/e5v/embeddings)")
    run_group.add_argument("--no-cache", action="store_true", help="embed everything, store nothing")
    run_group.add_argument("--output", default="e5v-eval.json", help="JSON report (default: e5v-eval.json)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from e5v.evaluation.paper import MTEB_PUBLISHED, PAPER, tasks_of
    from e5v.evaluation.report import format_table, report_dict, write_report

    retrieval = _check_targets(args)
    settings = _settings(args)
    output = Path(args.output)
    _check_paths(args, output)
    progress = show_progress(args.quiet)
    if retrieval:
        results = _run_retrieval(args, settings, progress)
        paper = mteb = None
    else:
        tasks = tasks_of(args.targets)
        results = _run_benchmarks(args, tasks, settings, output, progress)
        paper, mteb = PAPER, MTEB_PUBLISHED
    write_report(output, report_dict(results, settings, paper=paper, mteb=mteb))
    sys.stdout.write(format_table(results, paper=paper, mteb=mteb) + "\n")
    sys.stderr.write(f"wrote the report to {output.resolve()}\n")
    for figures in results.values():
        for result in figures.values():
            for name, path in result.files.items():
                sys.stderr.write(f"wrote the {result.task} {name} to {Path(path).resolve()}\n")
    cache = _cache_dir(args)
    sys.stderr.write(
        "embedding cache: none (--no-cache)\n"
        if cache is None
        else f"embedding cache: {cache.resolve()} (a rerun embeds nothing twice; --no-cache to store nothing)\n"
    )
    return 0


def _check_paths(args: argparse.Namespace, output: Path) -> None:
    """Refuse, before anything loads, a data file that does not exist and a report folder that does not."""
    files = {"--queries": args.queries, "--corpus": args.corpus, "--qrels": args.qrels, "--font": args.font}
    for flag, value in files.items():
        if value is not None and not Path(value).exists():
            raise ConfigurationError(f"{flag} {value!r} does not exist (from {str(Path.cwd())!r}); check the path")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise ConfigurationError(f"--data-dir {args.data_dir!r} is not a folder; give the folder of the datasets")
    folder = output.parent
    if not folder.is_dir():
        raise ConfigurationError(
            f"--output {str(output)!r}: its folder {str(folder)!r} does not exist; create it, or write elsewhere"
        )


def _cache_dir(args: argparse.Namespace) -> Path | None:
    """The embedding cache's folder, ``None`` with ``--no-cache``."""
    from e5v.evaluation.data import default_cache_dir

    if args.no_cache:
        return None
    return Path(args.cache) if args.cache else default_cache_dir() / "embeddings"


def _check_targets(args: argparse.Namespace) -> bool:
    """Whether this is a retrieval run; refuses unknown or mixed targets and misplaced options."""
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        raise ConfigurationError(f"unknown TARGET {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    own = {"--queries": args.queries, "--corpus": args.corpus, "--qrels": args.qrels}
    if "retrieval" in args.targets:
        if len(args.targets) > 1:
            raise ConfigurationError("`e5v eval retrieval` runs alone; run the benchmarks in another `e5v eval`")
        missing = [name for name, value in own.items() if value is None]
        if missing:
            raise ConfigurationError(f"`e5v eval retrieval` needs {', '.join(missing)}")
        benchmark = {
            "--data-dir": args.data_dir,
            "--limit": args.limit,
            "--font": args.font,
            "--submission": args.submission,
        }
        given = [name for name, value in benchmark.items() if value is not None]
        if given:
            raise ConfigurationError(f"{given[0]} is for the benchmarks, not `e5v eval retrieval`")
        return True
    given = [name for name, value in {**own, "--prompts": args.prompts}.items() if value is not None]
    if given:
        raise ConfigurationError(
            f"{given[0]} is for `e5v eval retrieval`; the benchmarks use the official evaluation's prompts and data"
        )
    return False


def _settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The base setting from the options, then each --compare setting over it, by label."""
    base = {
        "model": args.model,
        "revision": args.revision,
        "dtype": args.dtype,
        "device": args.device,
        "adapter": args.adapter,
        "max_image_tiles": args.max_image_tiles,
        "quantization": None,
        "prompts": args.prompts,
    }
    settings = {"base": base}
    for text in args.compare:
        changed = dict(base)
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in SETTING_KEYS:
                raise ConfigurationError(
                    f"--compare {text!r}: expected KEY=VALUE with KEY one of {', '.join(SETTING_KEYS)}"
                )
            changed[key] = _setting_value(key, value.strip(), text)
        if "retrieval" not in args.targets and changed["prompts"] is not None:
            raise ConfigurationError(f"--compare {text!r}: prompts is for `e5v eval retrieval`")
        if changed == base:
            raise ConfigurationError(f"--compare {text!r} changes nothing")
        if text in settings:
            raise ConfigurationError(f"--compare {text!r} is given twice")
        settings[text] = changed
    return settings


def _setting_value(key: str, value: str, text: str) -> Any:
    if value.lower() == "none":
        if key == "model":
            raise ConfigurationError(f"--compare {text!r}: model cannot be none")
        return None
    try:
        if key == "dtype":
            return dtype_option(value)
        if key == "device":
            return device_option(value)
        if key == "max_image_tiles":
            return _tiles(value)
    except argparse.ArgumentTypeError as exc:
        raise ConfigurationError(f"--compare {text!r}: {exc}") from None
    if key == "prompts":
        from e5v.core.prompts import PRESETS

        if value not in PRESETS:
            raise ConfigurationError(f"--compare {text!r}: unknown prompt preset; choose one of {sorted(PRESETS)}")
    if key == "quantization" and value not in ("8bit", "4bit"):
        raise ConfigurationError(f"--compare {text!r}: quantization is 8bit, 4bit or none")
    return value


def _embedder(args: argparse.Namespace, setting: dict[str, Any]) -> Any:
    from e5v.core.cache import EmbeddingCache
    from e5v.core.embedder import E5VEmbedder

    folder = _cache_dir(args)
    cache = None if folder is None else EmbeddingCache(folder)
    return E5VEmbedder(
        setting["model"],
        revision=setting["revision"],
        device=setting["device"],
        dtype=setting["dtype"],
        batch_size=args.batch_size,
        adapter=setting["adapter"],
        max_image_tiles=setting["max_image_tiles"],
        quantization=setting["quantization"],
        cache=cache,
    )


def _run_benchmarks(
    args: argparse.Namespace, tasks: list[str], settings: dict[str, dict[str, Any]], output: Path, progress: bool
) -> dict[str, dict[str, Any]]:
    from e5v.evaluation.benchmarks import load_tasks, run_task
    from e5v.evaluation.data import DataSource
    from e5v.evaluation.encoder import Encoder
    from e5v.evaluation.render import load_font
    from e5v.model import loading

    source = DataSource(args.data_dir, progress=progress)
    data = load_tasks(tasks, source, limit=args.limit)  # before any model loads
    font = load_font(args.font) if "i2i-flickr30k" in tasks else None
    results: dict[str, dict[str, Any]] = {}
    for number, (label, setting) in enumerate(settings.items()):
        with loading.forgotten_after():  # this setting's model is freed before the next loads
            encoder = Encoder(_embedder(args, setting), progress=progress)
            results[label] = {}
            for task in tasks:
                logger.info("%s: %s", label, task)
                submission = _submission_path(args, output, number, len(settings))
                results[label][task] = run_task(task, encoder, data[task], font=font, submission=submission)
            del encoder
    return results


def _submission_path(args: argparse.Namespace, output: Path, number: int, settings: int) -> Path:
    base = Path(args.submission) if args.submission else output.with_name(f"{output.stem}.cirr-test.json")
    return base if settings == 1 else base.with_name(f"{base.stem}.{number}{base.suffix}")


def _run_retrieval(
    args: argparse.Namespace, settings: dict[str, dict[str, Any]], progress: bool
) -> dict[str, dict[str, Any]]:
    from e5v.core.prompts import get_prompts
    from e5v.evaluation.retrieval import evaluate_retrieval, read_items, read_qrels
    from e5v.model import loading

    queries, corpus = read_items(args.queries), read_items(args.corpus)
    qrels = read_qrels(args.qrels, queries, corpus)
    for setting in settings.values():
        if setting["prompts"] is not None:
            get_prompts(setting["prompts"])
    results: dict[str, dict[str, Any]] = {}
    for label, setting in settings.items():
        with loading.forgotten_after():
            embedder = _embedder(args, setting)
            results[label] = evaluate_retrieval(
                embedder, queries, corpus, qrels, ks=args.k, prompts=setting["prompts"], progress=progress
            )
            del embedder
    return results


def _tiles(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive number of tiles, got {value!r}")
    return number


def _ks(value: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(part) for part in value.split(",") if part.strip()}))
    except ValueError:
        ks = ()
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {value!r}")
    return ks
