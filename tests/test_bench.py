"""``e5v.bench.fastpath`` and ``e5v bench``: the report is real, both paths agree, errors are clear."""

from __future__ import annotations

import json
import statistics
import sys

import numpy as np
import pytest

from e5v import E5VEmbedder
from e5v.bench.fastpath import (
    MAX_RELATIVE_SPREAD,
    MIN_TIMED_SECONDS,
    SINGLE_REPETITION_MIN_SECONDS,
    BenchReport,
    CacheResult,
    CorpusResult,
    PathResult,
    format_report,
    judge_cache,
    judge_timings,
    make_corpus,
    model_flops,
    peak_tflops_for,
    run_bench,
)
from e5v.cli import main
from e5v.errors import E5VError
from e5v.model import runner


@pytest.fixture(scope="module")
def report(tiny_path):
    return run_bench(tiny_path, device="cpu", texts=3, images=2, mixed=3, repeats=2, cache=True)


def test_report_compares_both_paths(report):
    assert set(report.corpora) == {"texts", "images", "mixed"}
    for result in report.corpora.values():
        assert result.max_abs_diff <= 1e-5
        for path in (result.recipe, result.fast):
            assert path.items_per_s > 0 and path.tflops_per_s > 0
            assert path.fraction_of_peak is None  # no peak known for a CPU
        assert result.speedup == pytest.approx(result.recipe.seconds / result.fast.seconds)
        assert len(result.recipe.times) == len(result.fast.times) == len(result.model_times) == 2  # repeats=2
        assert result.fast.seconds == statistics.median(result.fast.times)
        assert result.model_seconds == statistics.median(result.model_times) and result.speedup_refused is None
        assert result.prepare_seconds > 0 and result.model_seconds > 0 and result.model_fraction_of_peak is None
        assert result.model_tflops_per_s == pytest.approx(
            result.fast.tflops_per_s * result.fast.seconds / result.model_seconds
        )
    if sys.platform == "linux":
        assert report.corpora["images"].recipe.peak_memory_mb is not None
    assert report.cache is not None and report.cache.max_abs_diff == 0.0 and report.cache.warm_speedup > 1
    assert len(report.cache.cold_times) == len(report.cache.warm_times) == 2
    assert report.cache.cold_seconds == statistics.median(report.cache.cold_times)


def test_report_formats_and_serialises(report):
    text = format_report(report)
    assert "speed-up" in text and "texts" in text and "cache (3 mixed items)" in text
    assert "images, fast, model alone on prepared batches" in text
    assert report.max_batch_tokens == 1024 and report.workers == 1 and not report.prepare_ahead  # CPU defaults
    assert "1024 tokens a batch, prepared in turn" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["corpora"]["images"]["items"] == 2 and data["corpora"]["images"]["fast"]["times"]
    assert data["warnings"] == report.warnings  # every corpus's and the cache's, also at the top level


# -- judging the timings: known repetition times, nothing timed ----------------------


def _path(times: list[float], items: int) -> PathResult:
    seconds = statistics.median(times)
    return PathResult(seconds, items / seconds, None, None, 1e-3, None, times=times)


def _report(recipe: list[float], fast: list[float], model_alone: list[float], items: int = 32) -> BenchReport:
    """A report as run_bench assembles it, from known repetition times of the texts corpus."""
    warnings, refused = judge_timings("texts", items, recipe, fast, model_alone)
    r, f = _path(recipe, items), _path(fast, items)
    corpus = CorpusResult(
        items=items,
        recipe=r,
        fast=f,
        speedup=None if refused else r.seconds / f.seconds,
        max_abs_diff=0.0,
        prepare_seconds=0.1,
        model_seconds=statistics.median(model_alone),
        model_tflops_per_s=1e-3,
        model_fraction_of_peak=None,
        model_times=model_alone,
        speedup_refused=refused,
        warnings=warnings,
    )
    return BenchReport("m", "cpu", "cpu", "float32", 16, 1024, False, 1, len(recipe), None, {"texts": corpus})


def test_a_long_tight_run_has_a_ratio_and_no_warning():
    report = _report([2.0, 2.1, 2.05], [1.0, 1.02, 1.01], [0.8, 0.81, 0.8])
    assert report.warnings == [] and report.corpora["texts"].speedup == pytest.approx(2.05 / 1.01)
    text = format_report(report)
    assert next(line for line in text.splitlines() if line.startswith("texts ")).split()[4] == "2.03x"
    assert "not to trust" not in text and text.splitlines()[0].endswith("median of 3 interleaved repetitions")
    data = report.to_dict()
    assert data["warnings"] == [] and data["corpora"]["texts"]["speedup"] == pytest.approx(2.05 / 1.01)
    assert data["corpora"]["texts"]["speedup_refused"] is None


def test_a_run_too_short_to_time_is_warned_about_with_a_larger_corpus():
    short = MIN_TIMED_SECONDS / 8  # 32 texts in it: 256 for the minimum
    warnings, refused = judge_timings("texts", 32, [0.5, 0.5, 0.5], [short] * 3, [short * 0.9] * 3)
    assert refused is None and len(warnings) == 1
    assert warnings[0].startswith("texts: too short to time") and "fast path 0.0375 s" in warnings[0]
    assert "model alone" in warnings[0] and "recipe" not in warnings[0] and "--texts 512 or more" in warnings[0]


def test_a_wide_spread_is_warned_about():
    fast = [1.0, 1.0 + 2 * MAX_RELATIVE_SPREAD, 1.1]  # (max - min) / median = 2 x the bound / 1.1
    warnings, refused = judge_timings("images", 16, [2.0, 2.0, 2.0], fast, [0.8, 0.8, 0.8])
    assert refused is None and len(warnings) == 1
    assert warnings[0].startswith("images: repetitions spread over 25%") and "fast path 45% (1-1.5 s)" in warnings[0]
    assert "--repeats 5" in warnings[0]
    assert judge_timings("images", 16, [2.0, 2.0, 2.0], [1.0, 1.2, 1.1], [0.8, 0.8, 0.8]) == ([], None)  # 18%


def test_a_fast_path_faster_than_its_own_model_alone_is_impossible():
    warnings, _ = judge_timings("mixed", 24, [3.0, 3.0, 3.0], [1.0, 1.01, 1.0], [1.5, 1.5, 1.51])
    assert len(warnings) == 1 and warnings[0].startswith("mixed: the fast path's whole run (1 s) took less than")
    # Within the margin or the spread, it is only noise.
    assert judge_timings("mixed", 24, [3.0, 3.0, 3.0], [1.0, 1.0, 1.0], [1.03, 1.03, 1.03]) == ([], None)
    assert judge_timings("mixed", 24, [3.0, 3.0, 3.0], [0.9, 1.0, 1.1], [1.1, 1.1, 1.1]) == ([], None)


def test_one_sub_second_repetition_gives_no_ratio_in_text_or_json():
    report = _report([0.1], [0.04], [0.03], items=4)
    corpus = report.corpora["texts"]
    assert corpus.speedup is None and corpus.speedup_refused == "1 repetition under 1 s; use --repeats 3 or --texts 128"
    text = format_report(report)
    row = next(line for line in text.splitlines() if line.startswith("texts "))
    assert row.split()[4] == "n/a" and "x" not in row.split()[4]
    assert text.startswith("model m on cpu") and text.splitlines()[0].endswith("prepared in turn, 1 repetition")
    assert "timings not to trust:" in text and f"texts: speed-up n/a ({corpus.speedup_refused})" in text
    assert "texts: too short to time" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["corpora"]["texts"]["speedup"] is None
    assert data["corpora"]["texts"]["speedup_refused"] == corpus.speedup_refused
    assert data["warnings"] == data["corpora"]["texts"]["warnings"] == corpus.warnings
    # One repetition of a long run keeps its ratio, with a word on its unknown spread.
    long = _report([SINGLE_REPETITION_MIN_SECONDS * 3], [SINGLE_REPETITION_MIN_SECONDS * 1.5], [1.2])
    assert long.corpora["texts"].speedup == pytest.approx(2.0)
    assert long.warnings == ["texts: 1 repetition, so its spread is unknown; use --repeats 3"]


def test_the_cache_is_judged_alike_but_its_warm_run_may_be_short():
    assert judge_cache(24, [1.5, 1.6, 1.4], [0.015, 0.016, 0.015]) == ([], None)
    warnings, refused = judge_cache(3, [0.2], [0.01])
    assert refused is not None and refused.startswith("1 repetition under 1 s") and "--mixed 16" in refused
    assert warnings[0] == f"cache: warm speed-up n/a ({refused})" and "cold run 0.2 s" in warnings[1]
    assert "warm run" not in warnings[1]
    cache = CacheResult(3, 0.2, 0.01, None, 0.0, [0.2], [0.01], refused, warnings)
    report = BenchReport("m", "cpu", "cpu", "float32", 16, 1024, False, 1, 1, None, cache=cache)
    assert "warm n/a faster" in format_report(report) and report.to_dict()["cache"]["warm_speedup"] is None
    assert report.to_dict()["warnings"] == warnings


def test_memory_is_measured_on_its_own_pass_and_timed_runs_keep_the_heap(tiny_path, monkeypatch):
    from e5v.bench import fastpath as bench

    starts = []
    measure = bench._Memory.start

    def counted(memory):
        starts.append(memory.device.type)
        measure(memory)  # gc, malloc_trim, high-water reset

    monkeypatch.setattr(bench._Memory, "start", counted)
    run_bench(tiny_path, device="cpu", texts=2, images=0, mixed=0, repeats=3)
    assert starts == ["cpu", "cpu"]  # one memory pass per path, no trim around the 2 x 3 timed runs


def test_the_warm_up_runs_the_workers_before_any_measurement(tiny_path, monkeypatch):
    """Worker threads' one-time costs (their allocator arenas) stay out of the memory pass."""
    import threading

    from e5v.bench import fastpath as bench

    threads_seen: list[str] = []
    at_first_start: list[set[str]] = []
    forward, measure = runner.forward, bench._Memory.start

    def recording_forward(loaded, batch):
        threads_seen.append(threading.current_thread().name.split("_")[0])
        return forward(loaded, batch)

    def start(memory):
        if not at_first_start:
            at_first_start.append(set(threads_seen))
        measure(memory)

    monkeypatch.setattr(runner, "forward", recording_forward)
    monkeypatch.setattr(bench._Memory, "start", start)
    run_bench(tiny_path, device="cpu", workers=2, texts=2, images=0, mixed=0, repeats=1)
    assert len(at_first_start) == 1 and "e5v-worker" in at_first_start[0]


def test_corpus_is_deterministic_unique_and_of_many_sizes():
    first, again = make_corpus(10, 8, 6, seed=3), make_corpus(10, 8, 6, seed=3)
    assert first["texts"] == again["texts"]
    assert all(5 <= len(t.split()) <= 60 for t in first["texts"]) and len(set(first["texts"])) == 10
    sizes = {image.size for image in first["images"]}
    assert len(sizes) == 8
    assert [np.asarray(i).tobytes() for i in first["images"]] == [np.asarray(i).tobytes() for i in again["images"]]


def test_flops_of_a_text_follow_the_documented_formula(embedder):
    loaded = embedder._loaded
    encoded = runner.encode(loaded, "hello there", [])
    text = loaded.model.config.text_config
    n, d, i = encoded.length, text.hidden_size, text.intermediate_size
    d_kv = d * text.num_key_value_heads // text.num_attention_heads
    expected = text.num_hidden_layers * (2 * n * (2 * d * d + 2 * d * d_kv + 3 * d * i) + 2 * n * n * d)
    assert model_flops(loaded, [encoded]) == expected


def test_flops_of_an_image_count_the_vision_layers_that_run(embedder, photos):
    loaded = embedder._loaded
    config = loaded.model.config
    vision, text = config.vision_config, config.text_config
    encoded = runner.encode(loaded, "<image>", [photos["rocket"].convert("RGB")])
    without_image = runner.Encoded(encoded.input_ids, None, None)
    layers = vision.num_hidden_layers + config.vision_feature_layer + 1  # -2: all but the last
    tokens, d_v, i_v = (vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size, vision.intermediate_size
    per_tile = 2 * tokens * 3 * vision.patch_size**2 * d_v
    per_tile += layers * (2 * tokens * (4 * d_v * d_v + 2 * d_v * i_v) + 4 * tokens**2 * d_v)
    per_tile += 2 * (tokens - 1) * (d_v * text.hidden_size + text.hidden_size**2)
    expected = model_flops(loaded, [without_image]) + sum(encoded.tiles) * per_tile
    assert config.vision_feature_layer == -2 and model_flops(loaded, [encoded]) == expected


def test_flops_grow_with_image_tiles(tiny_path, photos):
    loaded = E5VEmbedder(tiny_path)._loaded
    full = runner.encode(loaded, "<image>", [photos["rocket"].convert("RGB")])
    base = runner.encode(loaded, "<image>", [photos["rocket"].convert("RGB")], max_image_tiles=0)
    assert model_flops(loaded, [full]) > model_flops(loaded, [base]) > 0


def test_full_size_random_model_is_refused_on_cpu():
    with pytest.raises(E5VError, match="GPU"):
        run_bench(random_init="e5v-8b", device="cpu")


def test_cli_json(tiny_path, capsys):
    options = ["--device", "cpu", "--texts", "2", "--images", "1", "--mixed", "0", "--repeats", "1", "--json"]
    code = main(["bench", "--model", str(tiny_path), *options])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["corpora"]) == {"texts", "images"} and data["cache"] is None
    assert data["corpora"]["texts"]["max_abs_diff"] <= 1e-5
    assert data["max_batch_tokens"] == 1024 and data["batch_size"] == 16 and data["workers"] == 1  # "auto" on a CPU
    main(["bench", "--model", str(tiny_path), *options, "--batch-size", "3"])
    assert json.loads(capsys.readouterr().out)["batch_size"] == 3
    main(["bench", "--model", str(tiny_path), *options, "--max-batch-tokens", "none"])
    assert json.loads(capsys.readouterr().out)["max_batch_tokens"] is None
    main(["bench", "--model", str(tiny_path), *options, "--max-batch-tokens", "64"])
    assert json.loads(capsys.readouterr().out)["max_batch_tokens"] == 64
    main(["bench", "--model", str(tiny_path), *options, "--workers", "2"])
    data = json.loads(capsys.readouterr().out)
    assert data["workers"] == 2 and data["max_batch_tokens"] == 512 and data["corpora"]["texts"]["max_abs_diff"] <= 1e-5


def test_cli_refuses_a_ratio_from_one_repetition_of_a_tiny_corpus(tiny_path, capsys):
    options = ["--device", "cpu", "--texts", "2", "--images", "0", "--mixed", "0", "--repeats", "1"]
    assert main(["bench", "--model", str(tiny_path), *options, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    texts = data["corpora"]["texts"]
    assert texts["speedup"] is None and texts["speedup_refused"].startswith("1 repetition under 1 s; use --repeats 3")
    assert texts["recipe"]["seconds"] > 0 and texts["max_abs_diff"] <= 1e-5  # the rest is still reported
    assert data["warnings"][0] == f"texts: speed-up n/a ({texts['speedup_refused']})"
    assert any(w.startswith("texts: too short to time") for w in data["warnings"])
    assert main(["bench", "--model", str(tiny_path), *options]) == 0
    text = capsys.readouterr().out
    assert next(line for line in text.splitlines() if line.startswith("texts ")).split()[4] == "n/a"
    assert "timings not to trust:\n  texts: speed-up n/a (1 repetition under 1 s" in text


def test_cli_errors(capsys):
    assert main(["bench", "--random-init", "e5v-8b", "--device", "cpu"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("e5v bench: error: random_init='e5v-8b' is E5-V's full size") and "GPU" in line
    with pytest.raises(SystemExit):
        main(["bench", "--texts", "-1"])
    assert "--texts: expected 0 or a positive number, got '-1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--random-init", "huge"])
    with pytest.raises(SystemExit):
        main(["bench", "--max-batch-tokens", "0"])
    assert "--max-batch-tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--workers", "0"])
    assert "--workers: expected a positive number, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--batch-size", "0"])
    assert "--batch-size: expected a positive number or 'auto', got '0'" in capsys.readouterr().err


def test_small_preset_keeps_e5v_proportions():
    from e5v.testing import PRESETS, build_random_model

    small, full = PRESETS["small"], PRESETS["e5v-8b"]
    loaded = build_random_model("small")
    text = loaded.model.config.text_config
    # Texts take about a token a word, as in Llama-3's tokenizer (not 3-4 byte pieces).
    texts = make_corpus(40, 0, 0)["texts"]
    tokens = sum(len(loaded.processor.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert tokens / sum(len(t.split()) for t in texts) < 1.3
    assert text.vocab_size / text.hidden_size == pytest.approx(128256 / full.hidden_size, rel=0.01)
    for spec in (small, full):
        assert spec.num_hidden_layers == 32 and spec.vision_num_hidden_layers == 24
        assert spec.intermediate_size / spec.hidden_size == 3.5
        assert spec.vision_intermediate_size / spec.vision_hidden_size == 4
        assert spec.num_attention_heads // spec.num_key_value_heads == 4
    assert small.grid_pinpoints == [[p // 3 for p in pair] for pair in full.grid_pinpoints]


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_a_gpus_dense_bf16_peak_is_found_by_its_name(name, peak):
    assert peak_tflops_for(name) == peak
