"""A collection's binding: the model, revision, dtype and prompts its vectors come from.

It is persisted in the Chroma collection's configuration as the config of the embedding
function named ``"e5v"`` (:class:`chromadb_e5v.E5VEmbeddingFunction` reads and writes
the same dict), so a collection opens with the model it was made with, from the index,
the server or plain Chroma. The config's keys: ``model_name``, ``revision``, ``dtype``,
``batch_size``, ``prompts`` and ``model_id`` in-process; ``model_name``, ``batch_size``,
``prompts``, ``base_url``, ``api_key_env_var`` and ``model_id`` when an ``e5v serve``
embeds (never its key).

``model_name`` says where the model was loaded from (a hub id, a folder's absolute path,
a server's model name); ``model_id`` is the model's identity
(:func:`e5v.model.identity.model_identity`: the hub id, or a local folder's fingerprint),
and vectors compare when identities (and revisions and prompts) do, wherever the files
lie. Bindings persisted before ``model_id`` existed have none: they are known by
``model_name``, and the store fingerprints their folder when it is still there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from e5v.core.batching import check_batch_size
from e5v.core.prompts import PRESETS, PromptSet, get_prompts
from e5v.errors import ConfigurationError
from e5v.model.loading import resolve_dtype

if TYPE_CHECKING:
    from e5v.client import RemoteEmbedder

__all__ = [
    "CONFIG_KEYS",
    "FUNCTION_NAME",
    "VECTOR_KEYS",
    "Binding",
    "dtype_name",
    "model_key",
    "prompts_config",
    "served_identity",
]

#: The name the binding is persisted under, as Chroma's embedding function.
FUNCTION_NAME = "e5v"
#: The keys of a persisted binding (see the module doc).
CONFIG_KEYS = ("model_name", "revision", "dtype", "batch_size", "prompts", "base_url", "api_key_env_var", "model_id")
#: What must match for two bindings' vectors to compare: the model (its ``model_id``, else
#: its ``model_name``), revision and prompts.
VECTOR_KEYS = ("model_id", "revision", "prompts")


def model_key(name: str | Path) -> str:
    """How a model is named in a binding: local folders by absolute path, so it opens from any folder."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name)


def served_identity(remote: RemoteEmbedder) -> str:
    """The identity of the model an ``e5v serve`` serves, as its ``/info`` says (its model
    name, from a server older than identities)."""
    found = remote.info.get("model_id")
    return found if isinstance(found, str) and found else remote.model_name


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical name of a dtype ("bf16" -> "bfloat16"); raises ``ConfigurationError`` if unknown."""
    return str(resolve_dtype(dtype, torch.device("cpu"))).removeprefix("torch.")


def prompts_config(prompts: PromptSet) -> str | dict[str, str]:
    """A preset's name, or every template of a custom prompt set."""
    return prompts.name if PRESETS.get(prompts.name) == prompts else dataclasses.asdict(prompts)


@dataclass(frozen=True)
class Binding:
    """The model (a hub id, or a local folder's absolute path), its ``revision`` and
    ``dtype`` (``None``: the device's default), the ``batch_size`` a collection's function
    embeds with, and its ``prompts`` (a preset name or a custom :class:`~e5v.PromptSet`);
    with ``base_url`` an ``e5v serve`` embeds, its key read from ``api_key_env_var``;
    ``model_id`` is the model's identity (``None``: a binding persisted before identities,
    known by ``model``)."""

    model: str
    revision: str | None = None
    dtype: str | None = None
    batch_size: int | Literal["auto"] = "auto"
    prompts: str | PromptSet | None = None
    base_url: str | None = None
    api_key_env_var: str | None = None
    model_id: str | None = None

    @property
    def identity(self) -> str:
        """The model's identity: ``model_id``, else (an old binding) ``model``."""
        return self.model_id or self.model

    @property
    def prompt_set(self) -> PromptSet:
        """The prompts as a :class:`~e5v.PromptSet` (``None``: the ``"e5v"`` preset)."""
        return get_prompts(self.prompts)

    def compares_with(self, other: Binding) -> bool:
        """Whether vectors of ``other`` compare with this binding's: the same model (by
        ``model_id`` when both have one, else by ``model``), revision and prompts."""
        return not self.differences(other)

    def differences(self, other: Binding) -> list[str]:
        """The :data:`VECTOR_KEYS` in which ``other`` differs, so that their vectors do not compare."""
        mine, theirs = self.to_config(), other.to_config()
        same_model = self.model_id == other.model_id if self.model_id and other.model_id else self.model == other.model
        return [
            key for key in VECTOR_KEYS if (not same_model if key == "model_id" else mine.get(key) != theirs.get(key))
        ]

    def to_config(self) -> dict[str, Any]:
        """The persisted config (see the module doc)."""
        prompts = self.prompts
        if isinstance(prompts, PromptSet):
            prompts = prompts_config(prompts)
        identity = {} if self.model_id is None else {"model_id": self.model_id}
        if self.base_url is not None:
            return {
                "model_name": self.model,
                "batch_size": self.batch_size,
                "prompts": prompts,
                "base_url": self.base_url,
                "api_key_env_var": self.api_key_env_var,
                **identity,
            }
        return {
            "model_name": self.model,
            "revision": self.revision,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "prompts": prompts,
            **identity,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Binding:
        """The binding a persisted config holds; a :class:`~e5v.errors.ConfigurationError`
        (a ``ValueError``, as Chroma expects) naming what is wrong."""
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ConfigurationError(f"unknown e5v config keys {unknown}; expected some of {list(CONFIG_KEYS)}")
        if not isinstance(config.get("model_name"), str) or not config["model_name"]:
            raise ConfigurationError(
                f"e5v config needs model_name, a hub id or a local directory; got {dict(config)!r}"
            )
        for key in ("revision", "dtype", "base_url", "api_key_env_var", "model_id"):
            if config.get(key) is not None and not isinstance(config[key], str):
                raise ConfigurationError(f"e5v config {key} must be a string or null, got {config[key]!r}")
        if config.get("base_url") is not None:
            given = [key for key in ("revision", "dtype") if config.get(key) is not None]
            if isinstance(config.get("prompts"), dict):
                given.append("custom prompts (the server takes a preset name)")
            if given:
                raise ConfigurationError(
                    f"e5v config with base_url (an e5v server) cannot hold {', '.join(given)}: "
                    "the server's model embeds; drop them"
                )
        elif config.get("api_key_env_var") is not None:
            raise ConfigurationError("e5v config api_key_env_var names the key of an e5v server: it needs base_url")
        batch_size = config.get("batch_size", "auto")
        try:
            check_batch_size(batch_size)
        except ValueError as exc:
            raise ConfigurationError(f"e5v config {exc}") from None
        prompts = config.get("prompts")
        if isinstance(prompts, str):
            get_prompts(prompts)
        elif isinstance(prompts, dict):
            try:
                prompts = PromptSet(**prompts)
            except TypeError as exc:
                raise ConfigurationError(f"e5v config prompts is not a prompt set: {exc}") from None
        elif prompts is not None:
            raise ConfigurationError(f"e5v config prompts must be a preset name or a prompt set, got {prompts!r}")
        return cls(
            model=config["model_name"],
            revision=config.get("revision"),
            dtype=config.get("dtype"),
            batch_size=batch_size,
            prompts=prompts,
            base_url=config.get("base_url"),
            api_key_env_var=config.get("api_key_env_var"),
            model_id=config.get("model_id"),
        )
