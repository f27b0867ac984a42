"""``e5v bench-serve --soak``: a real server under mixed load from one pooled client, through the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from e5v.bench.serving import SOAK_MIX, LatencyStats, RssSample, SoakReport, format_soak_report


def soak(tiny_path: Path, tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """``e5v bench-serve --model TINY OPTIONS --json FILE``: the finished process and the JSON report."""
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "-m", "e5v", "bench-serve", "--model", str(tiny_path), *options, "--json", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=400,
    )
    assert out.exists(), result.stderr
    return result, json.loads(out.read_text(encoding="utf-8"))


def test_a_short_soak_reports_every_figure_and_no_errors(tiny_path: Path, tmp_path: Path) -> None:
    options = ["--soak", "6", "--clients", "4", "--sample-every", "1", "--warmup", "2"]
    result, report = soak(tiny_path, tmp_path, *options)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["errors"] == {} and report["error_count"] == 0 and report["flags"] == [] and report["passed"]
    assert report["clients"] == 4 and report["warmup_s"] == 2 and report["mix"] == SOAK_MIX
    assert 6 <= report["elapsed_s"] < 6 + 60  # no request starts after the deadline; each has a 60 s limit
    assert report["requests_per_s"] > 0 and report["items_per_s"] >= report["requests_per_s"]
    overall = report["latency"]
    assert overall["requests"] == sum(stats["requests"] for stats in report["by_type"].values())
    assert set(report["by_type"]) == set(SOAK_MIX)
    for kind, stats in report["by_type"].items():  # every type was sent, answered, and timed
        assert stats["requests"] > 0, kind
        assert 0 < stats["p50_ms"] <= stats["p99_ms"], kind
    assert report["by_type"]["mixed"]["items"] == 4 * report["by_type"]["mixed"]["requests"]
    assert report["by_type"]["long"]["items"] == report["by_type"]["long"]["requests"]
    samples = report["rss"]
    assert len(samples) >= 7 and samples[0]["t_s"] == 0 and samples[-1]["t_s"] >= 6
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    assert all(s["rss_mib"] > 50 for s in samples)  # a server with torch and a model loaded
    assert samples[-1]["requests"] == overall["requests"]
    assert samples[0]["clients"] == 1 and all(s["clients"] == 4 for s in samples if s["t_s"] >= 1)  # joined in turn
    assert report["rss_start_mib"] == samples[0]["rss_mib"]
    assert report["rss_warm_mib"] == next(s["rss_mib"] for s in samples if s["t_s"] >= 2)
    assert report["rss_end_mib"] == samples[-1]["rss_mib"] and report["rss_max_mib"] >= report["rss_end_mib"]
    assert math.isclose(report["rss_growth_mib"], report["rss_end_mib"] - report["rss_warm_mib"])
    assert math.isclose(report["rss_growth_pct"], 100 * report["rss_growth_mib"] / report["rss_warm_mib"])
    text = result.stdout
    assert "p50 ms" in text and "RSS MiB" in text and "errors: none" in text
    assert text.rstrip().splitlines()[-1] == "PASS: no errors, RSS growth after the warm-up within 10%"


def test_requests_past_their_timeout_are_errors_and_fail_the_run(tiny_path: Path, tmp_path: Path) -> None:
    result, report = soak(tiny_path, tmp_path, "--soak", "3", "--clients", "4", "--request-timeout", "0.001")
    assert result.returncode == 1
    assert report["errors"]["timeout"] > 0 and report["error_count"] == sum(report["errors"].values())
    assert report["flags"][0] == f"{report['error_count']} errors"
    assert "the soak failed" in result.stderr and "\nFAIL: " in result.stdout and not report["passed"]


def test_rss_growth_past_the_threshold_after_the_warm_up_fails_the_run() -> None:
    report = SoakReport("m", 60, 32, 10, 5, 60, max_rss_growth_pct=10)
    report.elapsed_s = 60.5
    report.latency = LatencyStats(100, 300, 50.0, 90.0)
    report.rss = [RssSample(0, 900, 0, 1), RssSample(5, 1000, 10, 16), RssSample(10, 1000, 20, 32)]
    report.rss.append(RssSample(60.5, 1105, 100, 32))
    assert report.rss_start_mib == 900 and report.rss_warm_mib == 1000 and report.rss_growth_pct == pytest.approx(10.5)
    assert report.flags == ["the server's RSS grew 10.5% after the warm-up (more than --max-rss-growth 10%)"]
    assert not report.passed and "\nFAIL: the server's RSS grew 10.5%" in format_soak_report(report)
    report.rss[-1] = RssSample(60.5, 1090, 100, 32)  # within the bound; the growth before the warm-up does not count
    assert report.passed and format_soak_report(report).endswith(
        "PASS: no errors, RSS growth after the warm-up within 10%"
    )


def test_a_soak_of_no_time_is_one_error_line_and_status_2(tiny_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "e5v", "bench-serve", "--model", str(tiny_path), "--soak", "0"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "e5v bench-serve: error: argument --soak: expected a positive number of seconds, got '0' "
        "(see `e5v bench-serve --help`)\n"
    )


@pytest.mark.parametrize("value", ["-5", "nan", "inf", "three"])
def test_the_soak_refuses_a_duration_that_is_not_positive_seconds(tiny_path: Path, value: str, capsys) -> None:
    from e5v.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["bench-serve", "--model", str(tiny_path), "--soak", value])
    assert exited.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(
        f"e5v bench-serve: error: argument --soak: expected a positive number of seconds, got '{value}'"
    )


def test_the_soak_refuses_the_comparisons_options_and_a_warm_up_as_long_as_itself(tiny_path: Path, capsys) -> None:
    from e5v.cli import main

    assert main(["bench-serve", "--model", str(tiny_path), "--soak", "5", "--texts", "4"]) == 2
    assert "--texts does not apply to --soak" in capsys.readouterr().err
    assert main(["bench-serve", "--model", str(tiny_path), "--clients", "4", "--warmup", "1"]) == 2
    assert "--clients, --warmup do not apply without --soak" in capsys.readouterr().err
    assert main(["bench-serve", "--model", str(tiny_path), "--soak", "5", "--warmup", "5"]) == 2
    assert "the warm-up (5 s) must be shorter than the soak (5 s)" in capsys.readouterr().err
