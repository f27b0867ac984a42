"""Benchmark: the official recipe against e5v's fast path, on the same model and inputs.

:func:`run_bench` times both in one process, alternating repetitions (recipe, fast,
fast, recipe, ...) so that drift in the machine's speed hits both alike, on three
corpora: texts of 5-60 common words (:data:`e5v.testing.COMMON_WORDS`), real photos
of different sizes (crops of scikit-image's data photos) and a mixed corpus (texts,
images, composed queries). It reports items/s, the speed-up, the peak memory of each
path above what was allocated before it ran, and the largest absolute difference
between their vectors. The fast path runs with the
embedder's defaults for the device (token budget, preparation ahead or in turn).

``--random-init small`` keeps E5-V's proportions at a CPU size (32 decoder layers,
vocabulary 31x the hidden width, 24 vision layers; see :mod:`e5v.testing`), so the
recipe's waste (LM-head logits and 33 kept hidden states a token) weighs as in E5-V.
On a CPU, which is compute-bound even one item at a time, the fast path gains what the
recipe wastes plus per-call overhead; on a GPU it gains mostly from batching.

Each path runs once untimed on a corpus to measure its peak memory, then the timed
repetitions follow without returning freed memory to the OS in between, as in a
long-running process (trimming before every timed run would charge both paths for
faulting their working memory back in).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the allocation at the
start of the phase; on Linux CPUs, the resident-set high-water mark (``VmHWM``, reset
through ``/proc/self/clear_refs`` after ``malloc_trim``) above the resident set at the
start. Elsewhere it is not measured (``None``).

FLOPs (the useful work of both paths; the recipe's LM head is not counted), with ``T``
vision tokens a tile (patches + CLS), ``n`` tokens a prompt, ``L`` layers, ``d`` widths,
``i`` MLP widths, ``d_kv`` the key/value width, ``p`` the patch side, ``L_v`` the vision
layers that run (up to the one the features are read from: 23 of CLIP-L's 24 for E5-V)::

    vision tile  = 2*T*3*p*p*d_v + L_v * (2*T*(4*d_v^2 + 2*d_v*i_v) + 4*T^2*d_v)
    projector    = 2*(T-1)*(d_v*d + d*d)            (per tile)
    decoder      = L * (2*n*(2*d^2 + 2*d*d_kv + 3*d*i) + 2*n^2*d)   (causal attention)

``fraction_of_peak`` divides the achieved FLOP/s by the device's dense bf16 peak. Each
corpus also times the fast path's stages apart: preparing every item on one thread, and
the model alone on the prepared batches (``model_fraction_of_peak``), which tells a
model-bound run from one that waits on the host.

Every repetition's time is kept (``times``, ``model_times``) and judged by
:func:`judge_timings`: a corpus whose paths ran too briefly, spread too widely across
repetitions, or whose fast path took less than its own model alone gets plain-English
``warnings``; with one repetition under :data:`SINGLE_REPETITION_MIN_SECONDS` its
``speedup`` is ``None`` and ``speedup_refused`` says why. The cache's cold and warm runs
are repeated and judged alike.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from e5v.core.batching import plan_batches
from e5v.core.embedder import E5VEmbedder
from e5v.core.inputs import Composed, ImageLoader
from e5v.core.prompts import fill
from e5v.errors import ConfigurationError, E5VError
from e5v.model import runner
from e5v.model.loading import LoadedModel, add_image_token_row
from e5v.model.reference import official_embedding
from e5v.testing import COMMON_WORDS

__all__ = [
    "MAX_RELATIVE_SPREAD",
    "MIN_TIMED_SECONDS",
    "MODEL_ALONE_MARGIN",
    "PEAK_TFLOPS",
    "SINGLE_REPETITION_MIN_SECONDS",
    "BenchReport",
    "format_report",
    "judge_cache",
    "judge_timings",
    "make_corpus",
    "model_flops",
    "peak_tflops_for",
    "run_bench",
]

logger = logging.getLogger(__name__)

#: Dense bf16 peak TFLOP/s by a substring of ``torch.cuda.get_device_name()`` (first match).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
    ("L4", 121.0),
)

#: Shortest median seconds of a path's repetition to trust: one GC pass or lost scheduler slice (~30 ms) stays <10%.
MIN_TIMED_SECONDS = 0.3
#: Widest (max - min) / median of a path's repetitions to trust: beyond it, drift outweighs a 1.2x speed-up (photos).
MAX_RELATIVE_SPREAD = 0.25
#: With one repetition, no ratio of paths under this many seconds: nothing tells a stall from the signal.
SINGLE_REPETITION_MIN_SECONDS = 1.0
#: Least shortfall of the fast path's whole time under its model alone, beyond their spreads, called impossible.
MODEL_ALONE_MARGIN = 0.05

_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel")
_EDITS = ("make it red", "at night", "in the snow", "with long sleeves", "seen from above", "as a sketch")


@dataclass
class PathResult:
    """One path (recipe or fast) on one corpus."""

    seconds: float  # median over repetitions
    items_per_s: float
    peak_memory_mb: float | None
    activation_mb_per_item: float | None  # peak / items held at once (recipe: 1, fast: largest batch x busy workers)
    tflops_per_s: float
    fraction_of_peak: float | None
    times: list[float] = field(default_factory=list)  # every repetition's seconds, in order


@dataclass
class CorpusResult:
    items: int
    recipe: PathResult
    fast: PathResult
    speedup: float | None  # recipe / fast medians; None where speedup_refused says why
    max_abs_diff: float
    #: The fast path's two stages apart: preparing every item on one thread (image
    #: processor, tokenizer), and the model alone on the prepared batches (median).
    prepare_seconds: float
    model_seconds: float
    model_tflops_per_s: float
    model_fraction_of_peak: float | None
    model_times: list[float] = field(default_factory=list)  # the model alone's every repetition
    speedup_refused: str | None = None  # why there is no speed-up (one repetition of a sub-second run)
    warnings: list[str] = field(default_factory=list)  # timings not to trust, each naming the corpus


@dataclass
class CacheResult:
    items: int
    cold_seconds: float  # median over repetitions, each with a fresh cache
    warm_seconds: float  # median
    warm_speedup: float | None  # cold / warm medians; None where warm_speedup_refused says why
    max_abs_diff: float  # warm against cold vectors
    cold_times: list[float] = field(default_factory=list)
    warm_times: list[float] = field(default_factory=list)
    warm_speedup_refused: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class BenchReport:
    model: str
    device: str
    device_name: str
    dtype: str
    batch_size: int
    max_batch_tokens: int | None
    prepare_ahead: bool
    workers: int
    repeats: int
    peak_tflops: float | None
    corpora: dict[str, CorpusResult] = field(default_factory=dict)
    cache: CacheResult | None = None

    @property
    def warnings(self) -> list[str]:
        """Every corpus's warnings, then the cache's."""
        found = [warning for result in self.corpora.values() for warning in result.warnings]
        return found + (self.cache.warnings if self.cache is not None else [])

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data, with every warning also in a top-level ``warnings``."""
        return {**asdict(self), "warnings": self.warnings}


# -- corpus ---------------------------------------------------------------------------


def make_corpus(texts: int, images: int, mixed: int, *, seed: int = 0) -> dict[str, list[Any]]:
    """Deterministic, duplicate-free corpora (so the fast path's dedup gains nothing)."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    seen: set[str] = set()

    def text() -> str:
        while True:
            words = rng.choice(COMMON_WORDS, size=int(rng.integers(5, 61)))
            sentence = " ".join(words).capitalize() + "."
            if sentence not in seen:
                seen.add(sentence)
                return sentence

    counter = iter(range(1 << 30))

    def image() -> Image.Image:
        k = next(counter)
        photo = photos[k % len(photos)]
        scale = 0.45 + 0.55 * rng.random()
        width, height = max(32, int(photo.width * scale)), max(32, int(photo.height * scale))
        left, top = int(rng.integers(0, photo.width - width + 1)), int(rng.integers(0, photo.height - height + 1))
        return photo.crop((left, top, left + width, top + height))

    mixed_items: list[Any] = []
    for i in range(mixed):
        kind = i % 3
        if kind == 0:
            mixed_items.append(text())
        else:
            mixed_items.append(image() if kind == 1 else Composed(image(), str(rng.choice(_EDITS))))
    return {
        "texts": [text() for _ in range(texts)],
        "images": [image() for _ in range(images)],
        "mixed": mixed_items,
    }


def _photos() -> list[Image.Image]:
    from skimage import data

    photos = []
    for name in _PHOTOS:
        try:
            photos.append(Image.fromarray(getattr(data, name)()).convert("RGB"))
        except Exception as exc:  # an optional photo that needs a download
            logger.debug("skipping scikit-image photo %s: %s", name, exc)
    if not photos:
        raise E5VError("no scikit-image photo available; pip install scikit-image")
    return photos


# -- measurement ----------------------------------------------------------------------


class _Memory:
    """Peak memory of a phase above its start, in MiB (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._libc = _libc()
        self._base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._base = _proc_status_kb("VmRSS") * 1024
        except OSError:
            self._base = -1

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        if self._base < 0:
            return None
        return (_proc_status_kb("VmHWM") * 1024 - self._base) / 2**20


def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def _proc_status_kb(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise OSError(f"{name} not in /proc/self/status")


def model_flops(loaded: LoadedModel, encoded: Sequence[runner.Encoded]) -> float:
    """FLOPs of the vision tower, projector and decoder for ``encoded`` (module docstring)."""
    config = loaded.model.config
    vision, text = config.vision_config, config.text_config
    side = vision.image_size // vision.patch_size
    tokens = side * side + 1
    d_v, i_v = vision.hidden_size, vision.intermediate_size
    per_tile = 2 * tokens * 3 * vision.patch_size**2 * d_v
    layers_v = runner.vision_layers_run(vision.num_hidden_layers, config.vision_feature_layer)
    per_tile += layers_v * (2 * tokens * (4 * d_v * d_v + 2 * d_v * i_v) + 4 * tokens**2 * d_v)
    d, i = text.hidden_size, text.intermediate_size
    per_tile += 2 * (tokens - 1) * (d_v * d + d * d)
    d_kv = d * text.num_key_value_heads // text.num_attention_heads
    total = 0.0
    for item in encoded:
        n = item.length
        total += sum(item.tiles) * per_tile
        total += text.num_hidden_layers * (2 * n * (2 * d * d + 2 * d * d_kv + 3 * d * i) + 2 * n * n * d)
    return float(total)


def peak_tflops_of(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak from :data:`PEAK_TFLOPS` (``None``: unknown or CPU)."""
    if device.type != "cuda":
        import platform

        return platform.processor() or platform.machine() or "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, peak_tflops_for(name)


def peak_tflops_for(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a GPU named ``device_name`` (``None``: not in :data:`PEAK_TFLOPS`)."""
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


# -- judging the timings --------------------------------------------------------------


def judge_timings(
    corpus: str, items: int, recipe: Sequence[float], fast: Sequence[float], model_alone: Sequence[float]
) -> tuple[list[str], str | None]:
    """Warnings on one corpus's timings, and why its speed-up is refused (``None``: it stands).

    ``recipe``, ``fast`` and ``model_alone`` hold every repetition's seconds of each path.
    """
    option = f"--{corpus}"
    times = {"recipe": recipe, "fast path": fast, "model alone": model_alone}
    warnings, refused = _judge(corpus, option, items, times, ratio_of=("recipe", "fast path"), ratio="speed-up")
    whole, part = statistics.median(fast), statistics.median(model_alone)
    allowance = max(MODEL_ALONE_MARGIN, _spread(fast), _spread(model_alone))
    if whole < part * (1 - allowance):
        warnings.append(
            f"{corpus}: the fast path's whole run ({_s(whole)}) took less than its model alone ({_s(part)}), "
            f"which cannot be: the machine's speed changed between the two; use --repeats "
            f"{max(5, len(fast) + 2)} on a quieter machine"
        )
    return warnings, refused


def judge_cache(items: int, cold: Sequence[float], warm: Sequence[float]) -> tuple[list[str], str | None]:
    """:func:`judge_timings` for the cache's runs; the warm run may be short, being the point."""
    times = {"cold run": cold, "warm run": warm}
    return _judge(
        "cache", "--mixed", items, times, ratio_of=("cold run",), ratio="warm speed-up", short_ok={"warm run"}
    )


def _judge(
    label: str,
    option: str,
    items: int,
    times: dict[str, Sequence[float]],
    *,
    ratio_of: Sequence[str],
    ratio: str,
    short_ok: Collection[str] = (),
) -> tuple[list[str], str | None]:
    """Warnings on short, spread or single repetitions, and the refusal of a ratio of ``ratio_of``'s paths."""
    repetitions = min(len(seconds) for seconds in times.values())
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    warnings: list[str] = []
    refused = None
    shortest = min(medians[name] for name in ratio_of)
    if repetitions == 1 and shortest < SINGLE_REPETITION_MIN_SECONDS:
        larger = _larger_corpus(items, shortest, SINGLE_REPETITION_MIN_SECONDS)
        refused = f"1 repetition under {SINGLE_REPETITION_MIN_SECONDS:g} s; use --repeats 3 or {option} {larger}"
        warnings.append(f"{label}: {ratio} n/a ({refused})")
    short = {name: median for name, median in medians.items() if name not in short_ok and median < MIN_TIMED_SECONDS}
    if short:
        listed = ", ".join(f"{name} {_s(median)}" for name, median in short.items())
        larger = _larger_corpus(items, min(short.values()), MIN_TIMED_SECONDS)
        warnings.append(
            f"{label}: too short to time (under {MIN_TIMED_SECONDS:g} s a repetition): {listed}; "
            f"use {option} {larger} or more"
        )
    wide = {name: seconds for name, seconds in times.items() if _spread(seconds) > MAX_RELATIVE_SPREAD}
    if wide:
        listed = ", ".join(
            f"{name} {_spread(seconds):.0%} ({min(seconds):.3g}-{max(seconds):.3g} s)" for name, seconds in wide.items()
        )
        warnings.append(
            f"{label}: repetitions spread over {MAX_RELATIVE_SPREAD:.0%} of their median: {listed}; the machine's "
            f"speed changed during the run: use --repeats {max(5, repetitions + 2)} on a quieter machine"
        )
    if repetitions == 1 and refused is None:
        warnings.append(f"{label}: 1 repetition, so its spread is unknown; use --repeats 3")
    return warnings, refused


def _spread(seconds: Sequence[float]) -> float:
    """(max - min) / median: 0 for one repetition."""
    return (max(seconds) - min(seconds)) / max(statistics.median(seconds), 1e-12)


def _larger_corpus(items: int, seconds: float, target: float) -> int:
    """Items for ``target`` seconds at ``items`` in ``seconds``, up to a power of two (batching is sublinear)."""
    needed = items * target / max(seconds, 1e-12)
    return max(items + 1, 1 << math.ceil(math.log2(max(needed, 1.0))))


def _s(seconds: float) -> str:
    return f"{seconds:.3g} s"


# -- the benchmark --------------------------------------------------------------------


def _recipe_inputs(embedder: E5VEmbedder, items: Sequence[Any]) -> list[tuple[str, list[Image.Image]]]:
    """Each item's full prompt and RGB images, exactly as the fast path builds them."""
    prompts, loader = embedder.prompts, ImageLoader()
    inputs = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            inputs.append((prompts.wrap(fill(prompts.text, item)), []))
        elif isinstance(item, Composed):
            inputs.append((prompts.wrap(fill(prompts.composed, item.text)), [loader.load(item.image, index)]))
        else:
            inputs.append((prompts.wrap(fill(prompts.image, "")), [loader.load(item, index)]))
    return inputs


def _measured(run: Callable[[], np.ndarray], memory: _Memory) -> float | None:
    """Peak memory of one run in MiB (``None`` where not measured)."""
    memory.start()
    run()
    return memory.peak_mb()


def _timed(run: Callable[[], np.ndarray], device: torch.device) -> tuple[float, np.ndarray]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    vectors = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, vectors


def _model_alone(
    loaded: LoadedModel, batches: list[list[runner.Encoded]], repeats: int, device: torch.device
) -> list[float]:
    """Every repetition's seconds of the fast path's model alone over prepared batches."""

    def run() -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([runner.forward(loaded, batch).cpu().numpy() for batch in batches])

    return [_timed(run, device)[0] for _ in range(repeats)]


def _bench_corpus(
    corpus: str, embedder: E5VEmbedder, items: list[Any], repeats: int, peak: float | None, memory: _Memory
) -> CorpusResult:
    loaded = embedder.loaded
    inputs = _recipe_inputs(embedder, items)

    def recipe() -> np.ndarray:
        return np.stack([official_embedding(loaded.model, loaded.processor, p, i) for p, i in inputs])

    def fast() -> np.ndarray:
        return embedder.embed(items)

    # Warm-up of both paths outside every measurement; two batches, so that workers start too.
    embedder.embed(items[:2], batch_size=1)
    np.stack([official_embedding(loaded.model, loaded.processor, p, i) for p, i in inputs[:2]])
    start = time.perf_counter()
    encoded = [runner.encode(loaded, prompt, images) for prompt, images in inputs]
    prepare_seconds = time.perf_counter() - start
    flops = model_flops(loaded, encoded)
    # The fast path plans on token bounds, never above the exact lengths: this is the most it
    # holds, in each worker's batch when there is more than one batch.
    plan = plan_batches(
        [item.length for item in encoded], max_items=embedder.batch_size, max_tokens=embedder.max_batch_tokens
    )
    held = max(len(batch) for batch in plan) * (embedder.workers if len(plan) > 1 else 1)
    model_times = _model_alone(loaded, [[encoded[i] for i in batch] for batch in plan], repeats, memory.device)
    model_seconds = statistics.median(model_times)
    del encoded
    # An untimed pass of each path measures its peak memory; the timed repeats then run
    # as in a long-running process, keeping freed memory for reuse.
    peaks = {name: _measured(run, memory) for name, run in (("recipe", recipe), ("fast", fast))}
    times: dict[str, list[float]] = {"recipe": [], "fast": []}
    vectors: dict[str, np.ndarray] = {}
    for repeat in range(repeats):
        order = (("recipe", recipe), ("fast", fast)) if repeat % 2 == 0 else (("fast", fast), ("recipe", recipe))
        for name, run in order:
            seconds, vectors[name] = _timed(run, memory.device)
            times[name].append(seconds)

    def result(name: str, at_once: int) -> PathResult:
        seconds = statistics.median(times[name])
        peak_mb = peaks[name]
        achieved = flops / seconds / 1e12
        return PathResult(
            seconds=seconds,
            items_per_s=len(items) / seconds,
            peak_memory_mb=peak_mb,
            activation_mb_per_item=None if peak_mb is None else peak_mb / at_once,
            tflops_per_s=achieved,
            fraction_of_peak=None if peak is None else achieved / peak,
            times=times[name],
        )

    recipe_result = result("recipe", 1)
    fast_result = result("fast", held)
    warnings, refused = judge_timings(corpus, len(items), times["recipe"], times["fast"], model_times)
    return CorpusResult(
        items=len(items),
        recipe=recipe_result,
        fast=fast_result,
        speedup=None if refused else recipe_result.seconds / fast_result.seconds,
        max_abs_diff=float(np.abs(vectors["recipe"] - vectors["fast"]).max()),
        prepare_seconds=prepare_seconds,
        model_seconds=model_seconds,
        model_tflops_per_s=flops / model_seconds / 1e12,
        model_fraction_of_peak=None if peak is None else flops / model_seconds / 1e12 / peak,
        model_times=model_times,
        speedup_refused=refused,
        warnings=warnings,
    )


def _bench_cache(loaded: LoadedModel, items: list[Any], batch_size: int, repeats: int) -> CacheResult:
    """``repeats`` cold runs of the fast path, each on a fresh cache and followed by a warm run; images as PNGs."""
    cold_times: list[float] = []
    warm_times: list[float] = []
    max_abs_diff = 0.0
    with tempfile.TemporaryDirectory(prefix="e5v-bench-") as root:
        files: list[Any] = []
        for index, item in enumerate(items):
            if isinstance(item, Image.Image):
                path = Path(root) / f"{index}.png"
                item.save(path)
                files.append(path)
            else:
                files.append(item)
        for repeat in range(repeats):
            directory = Path(root) / f"cache-{repeat}"
            cold_embedder = E5VEmbedder(loaded, batch_size=batch_size, cache=directory)
            start = time.perf_counter()
            cold = cold_embedder.embed(files)
            cold_times.append(time.perf_counter() - start)
            warm_embedder = E5VEmbedder(loaded, batch_size=batch_size, cache=directory)
            start = time.perf_counter()
            warm = warm_embedder.embed(files)
            warm_times.append(time.perf_counter() - start)
            if warm_embedder.cache is not None and warm_embedder.cache.misses:
                logger.warning("warm cache run missed %d items", warm_embedder.cache.misses)
            max_abs_diff = max(max_abs_diff, float(np.abs(cold - warm).max()))
    cold_seconds, warm_seconds = statistics.median(cold_times), statistics.median(warm_times)
    warnings, refused = judge_cache(len(items), cold_times, warm_times)
    return CacheResult(
        items=len(items),
        cold_seconds=cold_seconds,
        warm_seconds=warm_seconds,
        warm_speedup=None if refused else cold_seconds / warm_seconds,
        max_abs_diff=max_abs_diff,
        cold_times=cold_times,
        warm_times=warm_times,
        warm_speedup_refused=refused,
        warnings=warnings,
    )


def run_bench(
    model: str | Path | LoadedModel | None = None,
    *,
    random_init: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | Literal["auto"] = "auto",
    max_batch_tokens: int | Literal["auto"] | None = "auto",
    workers: int = 1,
    texts: int = 32,
    images: int = 16,
    mixed: int = 24,
    repeats: int = 3,
    cache: bool = False,
    peak_tflops: float | None = None,
    seed: int = 0,
) -> BenchReport:
    """Benchmark the recipe against the fast path; see the module docstring.

    ``model`` is a hub id, a local checkpoint or a :class:`~e5v.model.loading.LoadedModel`;
    or ``random_init`` names a :data:`e5v.testing.PRESETS` preset built with random
    weights directly on ``device`` in ``dtype`` (nothing downloaded). ``cache`` adds
    cold and warm runs of a fresh embedding cache on the mixed corpus, ``repeats`` times.
    """
    loaded = _load(model, random_init, device, dtype, seed)
    add_image_token_row(loaded.model)  # the recipe's one-time fix, outside every measurement
    embedder = E5VEmbedder(loaded, batch_size=batch_size, max_batch_tokens=max_batch_tokens, workers=workers)
    resolved = embedder.device
    device_name, table_peak = peak_tflops_of(resolved)
    peak = peak_tflops if peak_tflops is not None else table_peak
    report = BenchReport(
        model=loaded.name,
        device=str(resolved),
        device_name=device_name,
        dtype=str(loaded.dtype).removeprefix("torch."),
        batch_size=embedder.batch_size,
        max_batch_tokens=embedder.max_batch_tokens,
        prepare_ahead=embedder.prepare_ahead,
        workers=embedder.workers,
        repeats=repeats,
        peak_tflops=peak,
    )
    memory = _Memory(resolved)
    for name, items in make_corpus(texts, images, mixed, seed=seed).items():
        if items:
            logger.info("benchmarking %d %s", len(items), name)
            report.corpora[name] = _bench_corpus(name, embedder, items, repeats, peak, memory)
    if cache and mixed:
        cached = make_corpus(0, 0, mixed, seed=seed + 1)["mixed"]
        report.cache = _bench_cache(loaded, cached, embedder.batch_size, repeats)
    return report


def _load(
    model: str | Path | LoadedModel | None, random_init: str | None, device: str | None, dtype: str | None, seed: int
) -> LoadedModel:
    from e5v.model import loading

    if isinstance(model, LoadedModel):
        return model
    if random_init is None:
        if model is None:
            raise ConfigurationError("give a model (hub id or path) or random_init")
        return loading.load(model, device=device, dtype=dtype)
    from e5v.testing import PRESETS, build_random_model

    if random_init not in PRESETS:
        raise ConfigurationError(f"unknown random_init {random_init!r}; use one of {sorted(PRESETS)}")
    target = loading.resolve_device(device)
    if random_init == "e5v-8b" and target.type == "cpu":
        raise ConfigurationError(
            "random_init='e5v-8b' is E5-V's full size: 8.4B parameters, 32 GB in float32 or 16 GB in "
            "bfloat16, far too slow on a CPU; run it on a GPU (--device cuda --dtype bfloat16) or use 'small'"
        )
    resolved_dtype = loading.resolve_dtype(dtype, target)
    dtype_name = str(resolved_dtype).removeprefix("torch.")
    return build_random_model(random_init, device=str(target), dtype=dtype_name, seed=seed)


def _preparation(report: BenchReport) -> str:
    if report.workers > 1:
        return f"{report.workers} batches at once on CPU threads"
    return f"prepared {'ahead on a worker' if report.prepare_ahead else 'in turn'}"


def format_report(report: BenchReport) -> str:
    """The report as plain-text tables, then the warnings on timings not to trust."""

    def mb(value: float | None) -> str:
        return "n/a" if value is None else f"{value:,.0f}"

    repetitions = f"median of {report.repeats} interleaved repetitions" if report.repeats > 1 else "1 repetition"
    lines = [
        f"model {report.model} on {report.device} ({report.device_name}), {report.dtype}, "
        f"batch size {report.batch_size}, {report.max_batch_tokens or 'unlimited'} tokens a batch, "
        f"{_preparation(report)}, {repetitions}",
        "",
        f"{'corpus':<8}{'items':>6}{'recipe it/s':>13}{'fast it/s':>11}{'speed-up':>10}"
        f"{'recipe peak MiB':>17}{'fast peak MiB':>15}{'max |Δ|':>10}",
    ]
    for name, result in report.corpora.items():
        speedup = f"{'n/a':>10}" if result.speedup is None else f"{result.speedup:>9.2f}x"
        lines.append(
            f"{name:<8}{result.items:>6}{result.recipe.items_per_s:>13.2f}{result.fast.items_per_s:>11.2f}"
            f"{speedup}{mb(result.recipe.peak_memory_mb):>17}{mb(result.fast.peak_memory_mb):>15}"
            f"{result.max_abs_diff:>10.1e}"
        )
    images = report.corpora.get("images")
    if images is not None:
        lines.append("")
        for label, path in (("recipe", images.recipe), ("fast", images.fast)):
            share = "" if path.fraction_of_peak is None else f", {path.fraction_of_peak:.1%} of {report.peak_tflops:g}"
            lines.append(
                f"images, {label}: {path.tflops_per_s:.3f} TFLOP/s{share}; "
                f"activation memory {mb(path.activation_mb_per_item)} MiB per image"
            )
        share = "" if images.model_fraction_of_peak is None else f", {images.model_fraction_of_peak:.1%}"
        lines.append(
            f"images, fast, model alone on prepared batches: {images.model_seconds:.2f} s, "
            f"{images.model_tflops_per_s:.3f} TFLOP/s{share}; preparing them on one thread: "
            f"{images.prepare_seconds:.2f} s"
        )
    if report.cache is not None:
        c = report.cache
        faster = "n/a" if c.warm_speedup is None else f"{c.warm_speedup:.0f}x"
        lines += [
            "",
            f"cache ({c.items} mixed items): cold {c.cold_seconds:.2f} s, warm {c.warm_seconds:.3f} s, "
            f"warm {faster} faster, max |Δ| {c.max_abs_diff:.1e}",
        ]
    if report.warnings:
        lines += ["", "timings not to trust:", *(f"  {warning}" for warning in report.warnings)]
    return "\n".join(lines)
