"""The benchmarks' data: a local copy under ``--data-dir`` first, else the Hugging Face Hub.

A local copy of a Hub dataset ``owner/name`` lives in ``DATA_DIR/owner/name`` (or
``DATA_DIR/name``) in the Hub's own schema, as one of:

- a ``datasets`` ``save_to_disk`` folder (of a ``DatasetDict`` holding the split, or of the
  split itself, or one such folder per split: ``DATA_DIR/owner/name/SPLIT``);
- Parquet files named for the split: ``SPLIT.parquet``, ``SPLIT-*.parquet`` (the Hub's
  ``data/test-00000-of-00001.parquet``: what ``hf download owner/name --repo-type dataset
  --local-dir DATA_DIR/owner/name`` writes) or any ``*.parquet`` in a folder named ``SPLIT``.

The STS tasks read SentEval's files, as the official evaluation does: ``STS/STS12-en-test``
... and ``SICK/`` from ``senteval.tar`` of ``princeton-nlp/datasets-for-simcse``.
"""

from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path
from typing import Any

from e5v.errors import ConfigurationError, DatasetUnavailableError
from e5v.optional import require

__all__ = ["DataSource", "SENTEVAL_ARCHIVE", "default_cache_dir"]

logger = logging.getLogger(__name__)

#: Where the official STS evaluation's files come from: (Hub dataset, file).
SENTEVAL_ARCHIVE = ("princeton-nlp/datasets-for-simcse", "senteval.tar")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/e5v`` (``~/.cache/e5v``): the embedding cache and unpacked archives."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "e5v"


class DataSource:
    """Loads benchmark datasets from ``data_dir`` (a local copy) or the Hub; ``progress=False``
    turns off ``datasets``' own progress bars."""

    def __init__(self, data_dir: str | Path | None = None, *, progress: bool = True) -> None:
        self.data_dir = None if data_dir is None else Path(data_dir).expanduser()
        self.progress = progress
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise ConfigurationError(f"`data_dir` {str(self.data_dir)!r} is not a folder")

    def dataset(self, name: str, split: str) -> Any:
        """The ``split`` of the Hub dataset ``name`` as a ``datasets.Dataset``."""
        datasets = require("datasets", "eval")
        if not self.progress:
            datasets.disable_progress_bars()
        local = self._local_folder(name)
        if local is not None:
            logger.info("loading %s (%s) from %s", name, split, local)
            return _load_local(datasets, local, name, split)
        problem = _hub_problem()
        if problem is not None and not _offline():  # no retries against a dead Hub; its cache needs offline mode
            reason = f"{problem}; if a copy is in the datasets cache, HF_HUB_OFFLINE=1 reads it from there"
            raise DatasetUnavailableError(self._missing(name, split, reason))
        try:
            return datasets.load_dataset(name, split=split)
        except Exception as exc:  # offline and not cached, not found, no such split: all mean "get a copy"
            reason = problem or f"{type(exc).__name__}: {_first_line(exc)}"
            raise DatasetUnavailableError(self._missing(name, split, reason)) from None

    def senteval(self) -> Path:
        """The folder holding SentEval's ``STS/`` and ``SICK/`` (downloaded and unpacked once
        when not in ``data_dir``)."""
        if self.data_dir is not None:
            found = find_senteval(self.data_dir)
            if found is not None:
                return found
        unpacked = default_cache_dir() / "senteval"
        found = find_senteval(unpacked) if unpacked.is_dir() else None
        if found is not None:
            return found
        repo, filename = SENTEVAL_ARCHIVE
        problem = _hub_problem() or ("HF_HUB_OFFLINE=1 is set" if _offline() else None)
        if problem is None:
            from huggingface_hub import hf_hub_download

            try:
                archive = hf_hub_download(repo, filename, repo_type="dataset")
            except Exception as exc:
                problem = f"{type(exc).__name__}: {_first_line(exc)}"
            else:
                _unpack(Path(archive), unpacked)
                found = find_senteval(unpacked)
                if found is not None:
                    return found
                problem = f"{filename} holds no STS/STS12-en-test folder"
        where = f"`data_dir` {str(self.data_dir)!r}" if self.data_dir else "no `data_dir` was given"
        raise DatasetUnavailableError(
            f"the STS tasks need SentEval's files (STS/STS12-en-test ... and SICK/), which are not found ({where}) "
            f"and cannot be downloaded ({problem}). Where the Hub is reachable, run `hf download {repo} {filename} "
            f"--repo-type dataset --local-dir DIR` and `tar -xf DIR/{filename} -C DIR`, then pass `data_dir=DIR`"
        )

    def _local_folder(self, name: str) -> Path | None:
        if self.data_dir is None:
            return None
        for candidate in (self.data_dir / name, self.data_dir / name.split("/")[-1]):
            if candidate.is_dir():
                return candidate
        return None

    def _missing(self, name: str, split: str, reason: str) -> str:
        root = str(self.data_dir) if self.data_dir is not None else "DATA_DIR"
        where = f"not in `data_dir` {root!r}" if self.data_dir is not None else "no `data_dir` was given"
        return (
            f"dataset {name} (split {split!r}) is not available: {where}, and loading it from the Hub failed "
            f"({reason}). Where the Hub is reachable, run `hf download {name} --repo-type dataset --local-dir "
            f"{root}/{name}` and pass `data_dir={root}`"
        )


def _load_local(datasets: Any, folder: Path, name: str, split: str) -> Any:
    """A split of a local copy: a ``save_to_disk`` folder or Parquet files (module docstring)."""
    if (folder / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(folder))
        if split not in loaded:
            raise DatasetUnavailableError(
                f"{folder} (a local copy of {name}) has the splits {sorted(loaded)}, not {split!r}"
            )
        return loaded[split]
    if (folder / "state.json").is_file():
        return datasets.load_from_disk(str(folder))
    if (folder / split / "state.json").is_file():
        return datasets.load_from_disk(str(folder / split))
    files = sorted(folder.rglob("*.parquet"))
    chosen = [f for f in files if f.stem == split or f.stem.startswith(f"{split}-") or f.parent.name == split]
    if not chosen:
        found = ", ".join(str(f.relative_to(folder)) for f in files[:5]) or "no Parquet files"
        raise DatasetUnavailableError(
            f"{folder} (a local copy of {name}) holds no split {split!r}: expected a save_to_disk folder or "
            f"Parquet files named {split}.parquet or {split}-*.parquet, found {found}"
        )
    return datasets.Dataset.from_parquet([str(f) for f in chosen])


def find_senteval(root: Path) -> Path | None:
    """The folder under ``root`` (at most three levels down) that holds ``STS/STS12-en-test``."""
    for depth in range(4):
        for candidate in sorted(root.glob("/".join(["*"] * depth) + ("/" if depth else "") + "STS")):
            if (candidate / "STS12-en-test").is_dir():
                return candidate.parent
    return None


def _unpack(archive: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    logger.info("unpacking %s into %s", archive, target)
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(target, filter="data")  # no links out, no devices, no absolute paths
        except TypeError:  # a Python without extraction filters: refuse unsafe members by hand
            for member in tar.getmembers():
                if not (member.isfile() or member.isdir()) or Path(member.name).is_absolute() or ".." in member.name:
                    raise DatasetUnavailableError(f"{archive}: unsafe member {member.name!r}") from None
            tar.extractall(target)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _hub_problem() -> str | None:
    """Why the Hub cannot be reached (``HF_HUB_OFFLINE=1``, or one failed request), or ``None``."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE=1 is set"
    from e5v.model.loading import hub_problem

    return hub_problem(constants.ENDPOINT)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
