"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from e5v.defaults import DEFAULT_MODEL
from e5v.errors import ConfigurationError

if TYPE_CHECKING:
    from e5v.client import Embedder, RemoteEmbedder
    from e5v.collection.repository import Store
    from e5v.core.embedder import E5VEmbedder

__all__ = [
    "add_collection_options",
    "add_model_options",
    "add_server_option",
    "batch_size_option",
    "configure_output",
    "connect_from_args",
    "counted",
    "device_option",
    "dtype_option",
    "embedder_from_args",
    "existing_paths",
    "positive",
    "remote_from_args",
    "show_progress",
]

#: Loggers of libraries that install a handler of their own (each record would print twice).
LIBRARY_LOGGERS = ("transformers", "huggingface_hub")
_HANDLER_NAME = "e5v-cli"


def configure_output(verbose: int, quiet: bool) -> None:
    """One stderr handler for e5v's and the libraries' records; download bars only when
    :func:`show_progress` says so."""
    root = logging.getLogger()
    if not any(handler.get_name() == _HANDLER_NAME for handler in root.handlers):
        handler = _StderrHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(_FlagsFormatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel((logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)])
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True
    if not show_progress(quiet):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


#: Library parameters whose flag is not their name with dashes.
PARAMETER_FLAGS = {
    "url": "--chroma-url",
    "name": "--collection",
    "columns": "--column",
    "model_name_or_path": "--model",
    "load_in_4bit": "--qlora",
}
#: A parameter as library messages name it: `name`, or `name=VALUE`.
_PARAMETER = re.compile(r"(?<!`)`([a-z][a-z0-9_]*)(?:=([^`\s]+))?`(?!`)")


def as_flags(message: str) -> str:
    """A library message as the command line says it: each parameter it names (`name`,
    `name=VALUE`) becomes its flag (``--name``, ``--name VALUE``; ``=True``: the flag alone)."""

    def flag(match: re.Match[str]) -> str:
        name, value = match.groups()
        option = PARAMETER_FLAGS.get(name, "--" + name.replace("_", "-"))
        return option if value in (None, "True") else f"{option} {value}"

    return _PARAMETER.sub(flag, message)


class _FlagsFormatter(logging.Formatter):
    """Log records with the parameters they name said as flags (:func:`as_flags`)."""

    def format(self, record: logging.LogRecord) -> str:
        return as_flags(super().format(record))


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``sys.stderr`` as it is at each record (tests and tqdm may replace it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def show_progress(quiet: bool) -> bool:
    """Progress bars go to a terminal only, and never with ``--quiet``."""
    return not quiet and sys.stderr.isatty()


def device_option(value: str) -> str:
    """``--device``: a device this machine has (checked before anything is loaded)."""
    return _checked(value, lambda loading: loading.resolve_device(value))


def worker_device_option(value: str) -> str:
    """``--device`` of workers on other machines: only its spelling can be checked here."""
    return _checked(value, lambda loading: loading.parse_device(value))


def dtype_option(value: str) -> str:
    """``--dtype``: a dtype name e5v knows."""
    return _checked(value, lambda loading: loading.resolve_dtype(value, loading.torch.device("cpu")))


def _checked(value: str, check: Callable[[Any], object]) -> str:
    """``value`` if ``check(e5v.model.loading)`` accepts it, else argparse's error with e5v's message."""
    from e5v.model import loading

    try:
        check(loading)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_model_options(
    parser: argparse.ArgumentParser,
    *,
    model_default: str | None = DEFAULT_MODEL,
    model_help: str | None = None,
    revision: bool = True,
    local_device: bool = True,
) -> argparse._ArgumentGroup:
    """``--model``, ``--revision``, ``--device``, ``--dtype``, ``--batch-size``, in a group
    returned for more. ``local_device=False``: the device is on other machines (Ray workers)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=model_default,
        help=model_help or f"hub id or local checkpoint folder (default: {DEFAULT_MODEL})",
    )
    if revision:
        group.add_argument("--revision", default=None, help="hub revision of --model: a branch, tag or commit")
    group.add_argument(
        "--device",
        type=device_option if local_device else worker_device_option,
        default=None,
        help="cpu, cuda, cuda:1 ... (default: CUDA if available)",
    )
    group.add_argument(
        "--dtype",
        type=dtype_option,
        default=None,
        help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)",
    )
    group.add_argument(
        "--batch-size",
        type=batch_size_option,
        default="auto",
        help="most items per forward pass: a number or 'auto' (16 on CPU, 256 on GPU; fewer where the token "
        "budget says so)",
    )
    return group


def add_server_option(group: argparse._ArgumentGroup) -> None:
    """``--server URL``: embed through a running ``e5v serve`` instead of loading the model."""
    group.add_argument(
        "--server",
        metavar="URL",
        default=None,
        help="embed through a running `e5v serve` at URL (its key from $E5V_API_KEY) instead of loading a model",
    )


def remote_from_args(args: argparse.Namespace) -> RemoteEmbedder:
    """The ``--server`` client; model options cannot be combined with it."""
    from e5v.client import RemoteEmbedder

    given = [f"--{name}" for name in ("device", "dtype", "revision") if getattr(args, name, None) is not None]
    if getattr(args, "model", None) not in (None, DEFAULT_MODEL):
        given.insert(0, "--model")
    if given:
        raise ConfigurationError(
            f"--server embeds with the server's model, so {', '.join(given)} cannot be set here; leave "
            f"{'it' if len(given) == 1 else 'them'} out, or start the server with {'it' if len(given) == 1 else 'them'}"
        )
    return RemoteEmbedder(args.server)


def connect_from_args(store: Store, args: argparse.Namespace) -> Embedder:
    """``store.connect`` with the model (or ``--server``) options of ``index`` and ``search``."""
    return store.connect(
        args.model,
        revision=args.revision,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        server=args.server,
    )


def embedder_from_args(args: argparse.Namespace, **options: object) -> E5VEmbedder:
    """Load the model once for this command, from the model options."""
    from e5v.core.embedder import E5VEmbedder

    return E5VEmbedder(
        args.model,
        revision=args.revision,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        **options,
    )


def add_collection_options(parser: argparse.ArgumentParser) -> None:
    """``--db``, ``--collection``, ``--chroma-url``."""
    group = parser.add_argument_group("collection")
    group.add_argument("--db", default="./e5v_db", help="Chroma database folder (default: ./e5v_db)")
    group.add_argument("--collection", default="e5v", help="collection name (default: e5v)")
    group.add_argument(
        "--chroma-url", default=None, help="use a Chroma server (http://host:port) instead of the --db folder"
    )


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """``1 file``, ``2 files``: a count in words (``plural``: when not ``noun`` + s)."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def existing_paths(paths: Iterable[str], what: str) -> None:
    """Refuse, before anything loads, the first of ``paths`` that does not exist (a broken link
    exists): an :class:`~e5v.errors.InvalidInputError` naming it as ``what``."""
    from e5v.errors import InvalidInputError

    for path in paths:
        if not os.path.lexists(os.path.expanduser(path)):
            raise InvalidInputError(f"{what} {path!r} does not exist (from {os.getcwd()!r}); check the path")


def batch_size_option(value: str) -> int | Literal["auto"]:
    """``--batch-size``: ``auto`` or a positive number."""
    return "auto" if value == "auto" else positive(value, "a positive number or 'auto'")


def positive(value: str, expected: str = "a positive number") -> int:
    """A positive integer option, or argparse's error saying what was ``expected``."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return number
