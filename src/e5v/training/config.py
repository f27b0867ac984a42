"""The training configuration, with the paper's recipe as defaults."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from e5v.defaults import DEFAULT_MODEL
from e5v.errors import ConfigurationError
from e5v.model.loading import resolve_dtype

__all__ = ["TrainingConfig"]


@dataclass
class TrainingConfig:
    """What to train, on what, and how.

    Batch sizes count rows (anchor, positive and optional negative): ``batch_size`` rows
    per process and forward pass; one optimizer step sees
    ``batch_size * grad_accum * processes`` rows. In-batch negatives come from the
    forward pass's rows on every process (gathered across GPUs), not across
    accumulation steps. ``epochs`` is ignored when ``max_steps`` is set.
    """

    data: str | Path
    output_dir: str | Path
    model: str | Path = DEFAULT_MODEL
    revision: str | None = None
    eval_data: str | Path | None = None
    #: Maps ``anchor`` / ``positive`` / ``negative`` to the data's own column names.
    columns: dict[str, str] = field(default_factory=dict)
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 4e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    temperature: float = 0.05
    symmetric: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    #: Sentences are cut at this many tokens before they are put in the prompt.
    max_length: int = 32
    prompts: str = "e5v"
    dtype: str | None = None
    load_in_4bit: bool = False
    gradient_checkpointing: bool = True
    cpu: bool = False
    save_every: int | None = None
    log_every: int = 10
    resume: str | Path | None = None
    merge_to: str | Path | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "lora_r", "lora_alpha", "max_length", "log_every"):
            _check_positive(name, getattr(self, name))
        for name in ("max_steps", "save_every"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if self.warmup_steps < 0:
            raise ConfigurationError(f"warmup_steps must be 0 or more, got {self.warmup_steps}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigurationError(
                f"lr and temperature must be positive, got lr={self.lr}, temperature={self.temperature}"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigurationError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.dtype is not None:
            resolve_dtype(self.dtype, torch.device("cpu"))  # a ConfigurationError lists the valid names
        unknown = set(self.columns) - {"anchor", "positive", "negative"}
        if unknown:
            raise ConfigurationError(f"columns maps unknown roles {sorted(unknown)}; use anchor, positive, negative")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainingConfig:
        """Read a ``training_config.json`` (unknown keys are an error)."""
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigurationError(f"{path}: unknown training options {sorted(unknown)}")
        return cls(**data)


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigurationError(f"{name} must be at least 1, got {value}")
