"""``e5v bench-serve --replicas``: Ray Serve replicas against one replica and the single server,
a real short run through the CLI (real ``e5v serve`` subprocesses, a real local Ray cluster)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from e5v.bench.replicas import ATOL, TARGETS

pytest.importorskip("ray.serve")

CLIENTS, REQUESTS = 4, 4


def _marked(marker: str) -> list[int]:
    """The processes whose environment holds ``E5V_BENCH_MARK=marker``: what the run started."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"E5V_BENCH_MARK={marker}".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return found


def test_a_short_run_reports_every_server_right_answers_and_both_replicas_serving(
    tiny_path: Path, tmp_path: Path
) -> None:
    out, marker = tmp_path / "replicas.json", uuid.uuid4().hex
    command = [sys.executable, "-m", "e5v", "bench-serve", "--model", str(tiny_path), "--replicas", "--texts", "6"]
    command += ["--clients", str(CLIENTS), "--requests", str(REQUESTS), "--repeats", "1", "--json", str(out)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "E5V_BENCH_MARK": marker},
        timeout=550,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    deadline = time.monotonic() + 15  # Ray's last workers may take a moment to exit
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _marked(marker) == []  # no server, Ray process or worker left behind
    report = json.loads(out.read_text(encoding="utf-8"))
    assert (report["replicas"], report["texts"], report["clients"]) == (2, 6, CLIENTS)
    assert (report["requests_per_client"], report["repeats"], report["device"]) == (REQUESTS, 1, "cpu")
    arms = {arm["name"]: arm for arm in report["arms"]}
    assert list(arms) == ["ray-1", "ray-2", "single-2", "single-1"]  # the order they ran in
    assert arms["ray-1"]["command"] == "e5v serve --replicas 1 --threads 1"
    assert arms["ray-2"]["command"] == "e5v serve --replicas 2 --threads 1"
    assert arms["single-2"]["command"] == "e5v serve --threads 2" and arms["single-2"]["threads"] == 2
    for name, arm in arms.items():  # every answer a 200 with its text's reference vector
        assert arm["requests"] == CLIENTS * REQUESTS and arm["errors"] == {} and arm["error_count"] == 0, name
        assert len(arm["repeat_requests_per_s"]) == 1 and arm["requests_per_s"] > 0, name
        assert 0 < arm["p50_ms"] <= arm["p99_ms"], name
    [one] = arms["ray-1"]["served_by"]
    assert list(one.values()) == [CLIENTS * REQUESTS] and arms["ray-1"]["replicas_served"] == 1
    [two] = arms["ray-2"]["served_by"]
    assert len(two) == 2 and sum(two.values()) == CLIENTS * REQUESTS and arms["ray-2"]["replicas_served"] == 2
    assert not set(one) & set(two)  # a new cluster, new replicas
    assert arms["single-1"]["served_by"] == [] and arms["single-1"]["replicas_served"] is None
    rate = {name: arm["requests_per_s"] for name, arm in arms.items()}
    assert math.isclose(report["scaling"], rate["ray-2"] / rate["ray-1"])
    assert math.isclose(report["versus_single"], rate["ray-2"] / rate["single-2"])
    assert math.isclose(report["ray_overhead_pct"], 100 * (1 - rate["ray-1"] / rate["single-1"]))
    assert report["targets"] == TARGETS and report["atol"] == ATOL
    assert report["error_count"] == 0 and report["flags"] == [] and report["passed"]
    lines = result.stdout.rstrip().splitlines()
    assert lines[0].startswith(f"replicas: model {tiny_path} on cpu, 6 texts, {CLIENTS} concurrent")
    assert any(line.startswith("ray-2 ") and line.endswith("/".join(map(str, two.values()))) for line in lines)
    assert "ray-2 / ray-1: 2 replicas against one: " in result.stdout and "(target >= 1.6x" in result.stdout
    assert lines[-1] == f"PASS: no errors, every answer its text's reference vector within {ATOL:g}"


def test_the_replica_mode_refuses_the_other_modes_options_and_one_replica(tiny_path: Path, capsys) -> None:
    from e5v.cli import main

    assert main(["bench-serve", "--model", str(tiny_path), "--replicas", "--sample-every", "2"]) == 2
    assert "--sample-every does not apply to --replicas" in capsys.readouterr().err
    assert main(["bench-serve", "--model", str(tiny_path), "--device", "cpu", "--ready-timeout", "5"]) == 2
    assert "--device, --ready-timeout do not apply without --soak or --replicas" in capsys.readouterr().err
    assert main(["bench-serve", "--model", str(tiny_path), "--soak", "5", "--gpus-per-replica", "1"]) == 2
    assert "--gpus-per-replica does not apply to --soak" in capsys.readouterr().err
    wrongs = [(["--replicas", "1"], "at least 2"), (["--replicas", "--gpus-per-replica", "-1"], "at least 0")]
    for wrong, said in wrongs:
        with pytest.raises(SystemExit) as exited:
            main(["bench-serve", "--model", str(tiny_path), *wrong])
        assert exited.value.code == 2 and said in capsys.readouterr().err
