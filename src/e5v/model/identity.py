"""A model's identity: what a collection's vectors are bound to, wherever the model's files lie.

A hub id is its own identity (its revision is kept beside it). A local checkpoint folder
is identified by ``sha256:`` and a fingerprint of what decides its vectors, read without
hashing the weights in full (a few hundred KiB of an 8B checkpoint):

- ``config.json``, parsed and written back with sorted keys, without ``_name_or_path`` and
  ``transformers_version`` (where it was saved from, and by which version);
- the tokenizer's and processor's files (:data:`PROCESSING_FILES`, those there are), byte
  for byte: the same weights tokenized or padded otherwise are another model;
- each weight file (``*.safetensors``, else ``*.bin``/``*.pt``/``*.pth``), by name and
  size: a safetensors file's header (every tensor's name, dtype, shape and offsets), and of
  every weight file :data:`SAMPLES` blocks of :data:`SAMPLE_BYTES` bytes spread evenly
  over its data, so checkpoints of one architecture with other weights differ.

So the same folder by a relative or an absolute path, a moved or copied folder, and a
server serving it under another name are one model; a re-saved folder whose files
differ (another dtype, shards or format) is another one. A folder with no ``config.json``
or no weight file, or one that cannot be read, is identified by its absolute path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["PROCESSING_FILES", "SAMPLES", "SAMPLE_BYTES", "fingerprint", "model_identity", "short_identity"]

logger = logging.getLogger(__name__)

#: Bytes read at each sampled place of a weight file.
SAMPLE_BYTES = 64 * 1024
#: Places sampled in each weight file's data: its start, its end and evenly between.
SAMPLES = 4
#: Weight files, by preference: safetensors if the folder has any, else PyTorch pickles.
WEIGHT_PATTERNS = (("*.safetensors",), ("*.bin", "*.pt", "*.pth"))
#: Files of the tokenizer and the image processor, which decide what the weights see.
PROCESSING_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
)
#: ``config.json`` keys that say where and by what a checkpoint was saved, not what it is.
UNSTABLE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version"})
#: The longest safetensors header read (the format's own limit).
MAX_HEADER_BYTES = 100_000_000


def model_identity(name: str | Path) -> str:
    """The identity of the model ``name``: a local folder's ``sha256:...`` fingerprint
    (see the module doc), else ``name`` itself (a hub id)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return str(name)
    try:
        found = fingerprint(path)
    except (OSError, ValueError) as exc:
        logger.debug("cannot fingerprint %s (%s): identified by its path", path, exc)
        found = None
    return str(path.resolve()) if found is None else f"sha256:{found}"


def short_identity(identity: str) -> str:
    """An identity as shown in one line: a fingerprint cut to 12 hex digits."""
    return identity[: len("sha256:") + 12] if identity.startswith("sha256:") else identity


def fingerprint(folder: Path) -> str | None:
    """The hex sha256 fingerprint of the checkpoint in ``folder`` (``None`` when it has no
    ``config.json`` or no weight file). Raises ``OSError`` or ``ValueError`` for a file
    that cannot be read as what it is named."""
    config_file = folder / "config.json"
    weights = _weight_files(folder)
    if not config_file.is_file() or not weights:
        return None
    config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
    stable = {key: value for key, value in config.items() if key not in UNSTABLE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, ensure_ascii=False).encode())
    for name in PROCESSING_FILES:
        if (folder / name).is_file():
            digest.update(f"\0{name}\0".encode())
            digest.update((folder / name).read_bytes())
    for weight in weights:
        _add_weight_file(digest, weight)
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    for patterns in WEIGHT_PATTERNS:
        found = sorted({path for pattern in patterns for path in folder.glob(pattern) if path.is_file()})
        if found:
            return found
    return []


def _add_weight_file(digest: Any, path: Path) -> None:
    """Add ``path``'s name, size, safetensors header and sampled blocks to ``digest``."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        digest.update(f"\0{path.name}\0{size}\0".encode())
        start = 0
        if path.suffix == ".safetensors":
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"{path.name} is not a safetensors file (header length {length})")
            digest.update(handle.read(length))
            start = 8 + length
        span = max(size - start - SAMPLE_BYTES, 0)
        for place in sorted({start + span * number // (SAMPLES - 1) for number in range(SAMPLES)}):
            handle.seek(place)
            digest.update(handle.read(SAMPLE_BYTES))
