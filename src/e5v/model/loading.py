"""Loading E5-V checkpoints through transformers, with the published checkpoint's traps fixed.

``royokong/e5-v`` was saved with transformers 4.41. Under current transformers:

1. its ``<image>`` id (128256) equals the language model's ``vocab_size``, one past the
   embedding table. e5v's forward never looks that id up (image positions are masked
   before the lookup and overwritten by image features), so nothing is resized;
   :func:`add_image_token_row` makes the plain transformers forward work too.
2. its processor has no ``patch_size``: it is taken from ``vision_config.patch_size``.

Neither fix changes an output value. Loaded models are shared for the life of the
process: loading the same checkpoint with the same options again returns the object
already in memory (:func:`clear_cache` forgets them).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from e5v.defaults import DEFAULT_MODEL
from e5v.errors import ConfigurationError, ModelLoadError
from e5v.optional import require

__all__ = [
    "QUANTIZATION_SKIP_MODULES",
    "LoadedModel",
    "add_image_token_row",
    "bitsandbytes_config",
    "clear_cache",
    "forgotten_after",
    "hub_problem",
    "load",
    "merge_adapter",
    "parse_device",
    "quiet_peft",
    "quiet_transformers",
    "resolve_device",
    "resolve_dtype",
    "resolve_source",
]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
#: The dtype names an error message lists.
DTYPE_NAMES = "float32, bfloat16, float16 (or fp32, bf16, fp16)"
#: Seconds to wait for the Hub to answer before loading from the cache or failing.
HUB_PROBE_TIMEOUT = 5.0
#: The parts of a LLaVA-NeXT model that bitsandbytes leaves unquantised: the vision tower, the
#: projector and the head (quantising them costs accuracy and saves little memory).
QUANTIZATION_SKIP_MODULES = ("vision_tower", "multi_modal_projector", "lm_head")
#: What the Hub accepts as a repository id (``name`` or ``namespace/name``); anything else is a path.
_HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?(?:/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?)?")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else CPU; a device this machine lacks raises
    :class:`~e5v.errors.ConfigurationError` listing the ones it has."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parsed = parse_device(device)
    if parsed.type == "cpu":
        return parsed
    backend = _backend(parsed.type)
    if backend is None:
        raise ConfigurationError(f"e5v does not run on {parsed.type!r} devices ({device!r}); {_devices_here()}")
    if not backend.is_available():
        why = (
            f"this torch ({torch.__version__}) was built without CUDA; install a CUDA build of torch"
            if parsed.type == "cuda" and torch.version.cuda is None
            else f"no {parsed.type} device is visible"
        )
        raise ConfigurationError(f"device {device!r} is not available: {why}; {_devices_here()}")
    if parsed.index is not None and parsed.index >= backend.device_count():
        raise ConfigurationError(f"device {device!r} does not exist; {_devices_here()}")
    return parsed


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, without checking this machine has it."""
    try:
        return device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigurationError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or xpu") from None


def _backend(kind: str) -> Any:
    """torch's module for a device type with ``is_available`` and ``device_count``, if any."""
    backend = getattr(torch, kind, None)
    if backend is None or not hasattr(backend, "is_available") or not hasattr(backend, "device_count"):
        return None
    return backend


def _devices_here() -> str:
    devices = ["cpu"]
    for kind in ("cuda", "xpu", "mps"):
        backend = _backend(kind)
        if backend is not None and backend.is_available():
            count = backend.device_count()
            devices += [kind, *(f"{kind}:{i}" for i in range(count))] if count > 1 else [kind]
    return f"this machine has: {', '.join(devices)}"


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` means bfloat16 (float16 where unsupported) on GPU and float32 elsewhere;
    an unknown name raises :class:`~e5v.errors.ConfigurationError` listing the valid ones."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigurationError(f"dtype {dtype} is not supported; use one of {DTYPE_NAMES}")
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ConfigurationError(f"unknown dtype {dtype!r}; use one of {DTYPE_NAMES}") from None


def resolve_source(
    name: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """Where ``name`` loads from, checked before anything is downloaded or created:
    ``from_pretrained`` options (``local_files_only``), or :class:`ModelLoadError`.

    A local folder must hold a ``config.json``. A hub id loads from the Hub when the Hub
    answers; offline (``HF_HUB_OFFLINE=1``) or unreachable, from the cache if the model
    is there, else it fails at once, saying what to do, instead of retrying for minutes.
    """
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{text!r} is a folder without config.json, not a checkpoint; pass a folder written by "
                "save_pretrained (e.g. a downloaded royokong/e5-v) or a hub id"
            )
        return {}
    if path.exists():
        raise ModelLoadError(f"{text!r} is a file, not a checkpoint folder; pass the folder that holds config.json")
    if not _HUB_ID.fullmatch(text):
        raise ModelLoadError(
            f"no checkpoint folder {text!r} (from {os.getcwd()!r}); check the path, or pass a hub id such as "
            f"{DEFAULT_MODEL!r}"
        )
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(text, "config.json", cache_dir=cache_dir, revision=revision), str)
    if constants.is_offline_mode():
        if cached:
            return {"local_files_only": True}
        raise ModelLoadError(f"{text!r} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 is set. {_OFFLINE_HELP}")
    problem = hub_problem(constants.ENDPOINT)
    if problem is None:
        return {}
    if cached:
        logger.warning("the Hugging Face Hub is unreachable (%s); loading %s from the cache", problem, text)
        return {"local_files_only": True}
    raise ModelLoadError(
        f"cannot download {text!r}: the Hugging Face Hub ({constants.ENDPOINT}) is unreachable ({problem}) and "
        f"the model is not in the cache. {_OFFLINE_HELP}"
    )


_OFFLINE_HELP = (
    "Pass the folder of a downloaded checkpoint instead (`model_name_or_path=DIR`), or download the "
    "model where the Hub is reachable (hf download royokong/e5-v) and set HF_HUB_OFFLINE=1. To try e5v "
    'offline with random weights: python -c "from e5v.testing import build_tiny_checkpoint as b; '
    "b('tiny-e5v')\" and `model_name_or_path=tiny-e5v`"
)


@functools.lru_cache(maxsize=8)
def hub_problem(endpoint: str) -> str | None:
    """Why the Hugging Face Hub at ``endpoint`` cannot be reached (one request, no retries, the
    answer remembered for the process), or ``None`` if it answers."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT)
    except Exception as exc:  # any transport failure means the downloads would fail too
        return f"{type(exc).__name__}: {exc}"
    return None


def bitsandbytes_config(bits: int, compute_dtype: torch.dtype | None = None, *, double_quant: bool = False) -> Any:
    """A transformers ``BitsAndBytesConfig`` that quantises the language model to ``bits``: 8
    (LLM.int8), or 4 (NF4 computing in ``compute_dtype``, with ``double_quant`` as in QLoRA),
    leaving :data:`QUANTIZATION_SKIP_MODULES` unquantised. The caller checks that bitsandbytes
    is installed and the device is CUDA."""
    from transformers import BitsAndBytesConfig

    skip = list(QUANTIZATION_SKIP_MODULES)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if bits != 4:
        raise ConfigurationError(f"bitsandbytes quantises to 8 or 4 bits, not {bits!r}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Hide the FutureWarning peft's ``PeftModel`` triggers on transformers 5 (it reads the
    deprecated ``is_gradient_checkpointing``); nothing for a user to change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _first_line(exc: BaseException) -> str:
    """An exception's message up to its first line break, without a trailing period."""
    return str(exc).strip().split("\n", 1)[0].rstrip(".")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' own progress bars (loading and saving weights) inside the block."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


@dataclass(eq=False)
class LoadedModel:
    """A LLaVA-NeXT model and its processor, ready for E5-V embedding."""

    model: Any  # LlavaNextForConditionalGeneration
    processor: Any  # LlavaNextProcessor
    name: str
    revision: str | None
    dtype: torch.dtype
    image_token_id: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def dimension(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


_CACHE: dict[tuple[Any, ...], LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget every loaded model (they are freed once no embedder holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


@contextmanager
def forgotten_after() -> Iterator[None]:
    """Forget, when the block ends, the models first loaded inside it (those loaded before
    stay shared): one setting's model freed before the next loads."""
    with _CACHE_LOCK:
        before = set(_CACHE)
    try:
        yield
    finally:
        with _CACHE_LOCK:
            for key in set(_CACHE) - before:
                del _CACHE[key]


def load(
    model_name_or_path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    device_map: str | dict[str, Any] | None = None,
    allow_pickle: bool = False,
    attn_implementation: str | None = "sdpa",
    model_kwargs: dict[str, Any] | None = None,
    adapter: str | Path | None = None,
) -> LoadedModel:
    """Load (or reuse) a LLaVA-NeXT checkpoint from a hub id or a local directory.

    Weights load from safetensors only unless ``allow_pickle=True``;
    ``trust_remote_code`` is never enabled. ``adapter`` is a peft (LoRA) adapter, a
    directory or hub id, merged into the weights (see :func:`merge_adapter`).
    """
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    name = str(model_name_or_path)
    key = (
        name,
        revision,
        str(cache_dir),
        str(resolved_device) if device_map is None else repr(device_map),
        resolved_dtype,
        allow_pickle,
        attn_implementation,
        repr(sorted((model_kwargs or {}).items())),
        _adapter_key(adapter),
    )
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            logger.debug("reusing loaded model %s", name)
            return cached
        loaded = _load_uncached(
            name,
            device=resolved_device,
            dtype=resolved_dtype,
            revision=revision,
            cache_dir=cache_dir,
            device_map=device_map,
            allow_pickle=allow_pickle,
            attn_implementation=attn_implementation,
            model_kwargs=model_kwargs or {},
            adapter=adapter,
        )
        _CACHE[key] = loaded
        return loaded


def _load_uncached(
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    revision: str | None,
    cache_dir: str | Path | None,
    device_map: str | dict[str, Any] | None,
    allow_pickle: bool,
    attn_implementation: str | None,
    model_kwargs: dict[str, Any],
    adapter: str | Path | None = None,
) -> LoadedModel:
    source = resolve_source(name, revision=revision, cache_dir=cache_dir)  # before transformers' slow imports
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    common: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir, "trust_remote_code": False, **source}
    logger.info("loading %s (%s, %s)", name, device if device_map is None else f"device_map={device_map}", dtype)
    try:
        with quiet_transformers():
            processor = AutoProcessor.from_pretrained(name, **common)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load the processor of {name!r}: {_first_line(exc)}. Pass a LLaVA-NeXT checkpoint saved with "
            f"save_pretrained, or a hub id such as {DEFAULT_MODEL!r}"
        ) from exc
    try:
        with quiet_transformers():
            model = LlavaNextForConditionalGeneration.from_pretrained(
                name,
                dtype=dtype,
                device_map=device_map,
                use_safetensors=None if allow_pickle else True,
                attn_implementation=attn_implementation,
                **common,
                **model_kwargs,
            )
    except (OSError, ValueError) as exc:
        hint = "" if allow_pickle else " (only safetensors weights are loaded unless allow_pickle=True)"
        raise ModelLoadError(f"cannot load the model weights of {name!r}{hint}: {_first_line(exc)}") from exc
    if device_map is None:
        model.to(device)
    if adapter is not None:
        model = merge_adapter(model, adapter)
    model.eval()
    model.requires_grad_(False)
    image_token_id = _fix_processor(processor, model, name)
    return LoadedModel(
        model=model, processor=processor, name=name, revision=revision, dtype=dtype, image_token_id=image_token_id
    )


def _adapter_key(adapter: str | Path | None) -> str | None:
    """A local adapter by its absolute path (so relative spellings share a cache entry)."""
    if adapter is None:
        return None
    path = Path(adapter)
    return str(path.resolve()) if path.exists() else str(adapter)


def merge_adapter(model: Any, adapter: str | Path) -> Any:
    """Load a peft adapter onto ``model`` and merge it into the weights (no inference overhead)."""
    peft = require("peft", "train")
    logger.info("merging adapter %s", adapter)
    try:
        with quiet_peft():
            peft_model = peft.PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot load the adapter {str(adapter)!r}: {exc}. Pass the output directory of 'e5v train' "
            "(it holds adapter_config.json and adapter_model.safetensors)"
        ) from exc
    return peft_model.merge_and_unload()


def _fix_processor(processor: Any, model: Any, name: str) -> int:
    """Fill in what the published processor lacks; fail clearly on what cannot be fixed."""
    config = model.config
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ModelLoadError(f"{name!r} has no image processor and tokenizer; it is not a LLaVA-NeXT checkpoint")
    patch_size = config.vision_config.patch_size
    if getattr(processor, "patch_size", None) is None:
        logger.info("processor of %s has no patch_size; using vision_config.patch_size=%d", name, patch_size)
        processor.patch_size = patch_size
    elif processor.patch_size != patch_size:
        raise ModelLoadError(
            f"processor patch_size {processor.patch_size} differs from the vision tower's {patch_size} in {name!r}"
        )
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    if image_token_id != config.image_token_id:
        raise ModelLoadError(
            f"the tokenizer's {processor.image_token!r} id {image_token_id} differs from the model's "
            f"image_token_id {config.image_token_id} in {name!r}"
        )
    return int(image_token_id)


def add_image_token_row(model: Any) -> None:
    """Give the embedding table a row for ``<image>`` if it has none (the published trap).

    Only needed by the plain transformers forward (the official recipe); the new rows
    are never read for hidden states, since image positions are overwritten.
    """
    needed = int(model.config.image_token_id) + 1
    if model.get_input_embeddings().num_embeddings < needed:
        logger.info("resizing token embeddings to %d for the <image> token", needed)
        model.resize_token_embeddings(needed, mean_resizing=False)
