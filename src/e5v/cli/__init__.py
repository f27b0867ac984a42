"""The ``e5v`` command line: one subcommand per module of this package.

Every command reports a failure the same way: one ``e5v COMMAND: error: ...`` line on
stderr (no traceback; ``-vv`` adds one for unexpected errors) and exit status 2 when it
could not run as asked (options, model, missing package, collection, input), 1 when it
ran and something failed.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from e5v import __version__
from e5v.cli.common import as_flags, configure_output

__all__ = ["main"]

logger = logging.getLogger(__name__)

#: Modules of ``e5v.cli`` that each define ``register(subparsers)``.
SUBCOMMANDS: tuple[str, ...] = (
    "index",
    "search",
    "embed",
    "serve",
    "train",
    "bench",
    "bench_serve",
    "ray_embed",
    "eval",
    "collections",
)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line that names its command (``e5v search: error:
    ...``), points to ``--help``, and suggests the closest command, choice or flag for a typo."""

    #: The subcommands' parsers, by name (set on the top parser by :func:`build_parser`).
    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """As argparse, but unknown arguments are the error of the command they were given to."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = getattr(self, "commands", {}).get(getattr(parsed, "command", None) or "", self)
            flags = {flag for parser in {self, command} for action in parser._actions for flag in action.option_strings}
            command.error(_unrecognized(unknown, sorted(flag for flag in flags if flag.startswith("--"))))
        return parsed

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """argparse's check of a choice, with the closest one suggested."""
        if action.choices is not None and value not in action.choices:
            choices = [str(choice) for choice in action.choices]
            hint = _did_you_mean(str(value), choices, quote=True)
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}{hint} (choose from {', '.join(map(repr, choices))})"
            )


def _unrecognized(unknown: list[str], flags: list[str]) -> str:
    """argparse's message for ``unknown`` arguments, with the closest of ``flags`` to each unknown flag."""
    given_flags = [given.partition("=")[0] for given in unknown if given.startswith("--")]
    hints = []
    for name in given_flags:
        close = _did_you_mean(name, flags)
        if close:
            hints.append(close if len(given_flags) == 1 else f"{close} (for {name})")
    return f"unrecognized arguments: {' '.join(unknown)}" + (f"; did you mean {', '.join(hints)}?" if hints else "")


def _did_you_mean(given: str, known: Iterable[str], *, quote: bool = False) -> str:
    """The closest of ``known`` to ``given`` (``quote``: as ``; did you mean 'X'?``), or nothing."""
    close = difflib.get_close_matches(given, list(known), n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean {close[0]!r}?" if quote else close[0]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="e5v",
        description="E5-V multimodal embeddings: index, search, embed, serve, benchmark and train.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"e5v {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"e5v.cli.{name}").register(subparsers)
    parser.commands = subparsers.choices
    for command in subparsers.choices.values():
        command.add_argument("-q", "--quiet", action="store_true", help="no progress or download bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    configure_output(args.verbose, args.quiet)
    try:
        return int(args.handler(args) or 0)
    except Exception as exc:
        return _failed(f"{parser.prog} {args.command}", exc, args.verbose)
    except KeyboardInterrupt:
        sys.stderr.write(f"{parser.prog} {args.command}: interrupted\n")
        return 130


def exit_status(exc: BaseException) -> int:
    """2 when the command could not run as asked, 1 when it ran and failed."""
    from e5v.errors import ConfigurationError, InvalidInputError, MissingDependencyError, ModelLoadError, StoreError

    usage = (ConfigurationError, InvalidInputError, MissingDependencyError, ModelLoadError, StoreError)
    return 2 if isinstance(exc, usage) else 1


def _failed(command: str, exc: Exception, verbose: int) -> int:
    from e5v.errors import E5VError

    if isinstance(exc, E5VError):
        message = str(exc)
    elif isinstance(exc, OSError):
        message = f"{exc.strerror or exc}" + (f": {exc.filename!r}" if exc.filename else "")
    else:
        message = f"unexpected {type(exc).__name__}: {exc} (a bug in e5v; rerun with -vv for the traceback)"
        if verbose >= 2:
            logger.exception("traceback")
    sys.stderr.write(f"{command}: error: {as_flags(message)}\n")
    return exit_status(exc)
