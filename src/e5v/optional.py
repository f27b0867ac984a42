"""Optional features and the packages they need: one import check, one message for all.

``require("peft", "train")`` imports and returns the module, or raises
:class:`~e5v.errors.MissingDependencyError` naming the feature and the install command
that works where e5v itself is installed (pip then adds only the extra's packages).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from e5v.errors import MissingDependencyError

__all__ = ["FEATURES", "Feature", "require"]


@dataclass(frozen=True)
class Feature:
    """What an optional feature is called and how to install what it needs."""

    description: str
    install: str


FEATURES: dict[str, Feature] = {
    "train": Feature("training (e5v train, e5v.training) and LoRA adapters", 'pip install "e5v[train]"'),
    "ray": Feature(
        "Ray (e5v embed-dataset and e5v.ray.data on Ray Data; e5v serve --replicas and e5v.ray.serve on Ray Serve)",
        'pip install "e5v[ray]"',
    ),
    "bench": Feature("the benchmark's photos (e5v bench)", 'pip install "e5v[bench]"'),
    "chroma": Feature(
        "indexing and search (e5v index, e5v search, e5v.collection.repository)",
        'pip install "e5v[chroma]"',
    ),
    "serve": Feature("the embedding server (e5v serve, e5v.server)", 'pip install "e5v[serve]"'),
    "pdf": Feature("reading PDFs (e5v index, e5v.pdf)", 'pip install "e5v[pdf]"'),
    "eval": Feature(
        "the benchmarks' datasets and the MTEB model object (e5v eval, e5v.evaluation)", 'pip install "e5v[eval]"'
    ),
    "quantization": Feature("quantization='8bit' or '4bit', and `load_in_4bit=True`", "pip install bitsandbytes"),
}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature`` (a key of :data:`FEATURES`), or say what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        wanted = FEATURES[feature]
        missing = exc.name or module
        raise MissingDependencyError(
            f"{wanted.description} needs the package {missing!r}, which is not installed: {wanted.install}"
        ) from None
