"""``e5v serve --replicas N`` / ``--ray`` on the command line: options refused in one line
before Ray starts, ``--ray-config``, and real subprocesses that start a local Ray cluster,
serve (a Chroma server's collection from two replicas), and leave no Ray process behind when stopped
or when their model fails to load."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import psutil
import pytest
import yaml
from scaling import chroma_server
from serving import KEY, free_port

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'e5v[ray]')")

from e5v.cli import main
from e5v.ray.serve import IMPORT_PATH, REPLICA_HEADER

START_S = 300  # a local Ray cluster and two replicas start in about 90 s on 2 busy cores


def refusal(capsys: pytest.CaptureFixture[str], *arguments: str) -> str:
    assert main(["serve", *arguments]) == 2
    said = capsys.readouterr().err.strip()
    assert said.startswith("e5v serve: error: ") and "\n" not in said and "Traceback" not in said, said
    return said


def test_an_embedded_db_with_more_than_one_replica_is_refused(tmp_path: Path, capsys) -> None:
    for scale in (["--replicas", "2"], ["--ray", "--max-replicas", "3"]):
        said = refusal(capsys, "--db", str(tmp_path), *scale)
        assert "--db" in said and "one process only may open" in said
        assert "`chroma run --path DIR`" in said and "--chroma-url" in said
    assert not any(tmp_path.iterdir())  # refused before anything opened the folder


def test_ray_options_without_replicas_or_both_ways_are_refused(capsys) -> None:
    assert "add --ray" in refusal(capsys, "--min-replicas", "2")
    assert "add --replicas N or --ray" in refusal(capsys, "--ray-address", "auto")
    assert "give one of them" in refusal(capsys, "--replicas", "2", "--ray")
    said = refusal(capsys, "--ray", "--min-replicas", "3", "--max-replicas", "2")
    assert "--min-replicas 3 is over --max-replicas 2" in said


def test_ray_config_prints_a_serve_config(tiny_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("E5V_API_KEY", "a-secret")
    arguments = ["--model", str(tiny_path), "--ray", "--min-replicas", "1", "--max-replicas", "4", "--threads", "2"]
    assert main(["serve", *arguments, "--port", "9000", "--ray-config"]) == 0
    out = capsys.readouterr().out
    config = yaml.safe_load(out)
    assert config["http_options"]["port"] == 9000
    (application,) = config["applications"]
    assert application["import_path"] == IMPORT_PATH == "e5v.ray.serve:build"
    assert application["route_prefix"] == "/"
    assert application["args"]["model"] == str(tiny_path)
    assert application["args"]["autoscale"] is True and application["args"]["max_replicas"] == 4
    assert application["args"]["threads"] == 2
    assert "a-secret" not in out  # keys stay in the replicas' environment


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` still running (a zombie has exited)."""
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running


def _until_exited(processes: list[psutil.Process]) -> None:
    """Wait up to 30 s for every one of ``processes`` to exit (Ray's last ones take a moment); fail if one runs on."""
    deadline = time.monotonic() + 30
    while _running(processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _running(processes), [" ".join(child.cmdline())[:100] for child in _running(processes)]


def _until_ready(process: subprocess.Popen, url: str) -> None:
    """Poll ``url``/ready until 200, for at most START_S seconds; the process must not exit meanwhile."""
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} was not ready in {START_S} s")


@pytest.fixture
def chroma_url(tmp_path: Path) -> Iterator[str]:
    """A ``chroma run`` server on a free loopback port."""
    with chroma_server(tmp_path / "chroma") as url:
        yield url


def test_replicas_serve_a_chroma_servers_collection_and_sigterm_stops_their_ray(
    tiny_path: Path, tmp_path: Path, chroma_url: str
) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "coffee.txt").write_text("espresso brewing at dawn")
    (notes / "cats.txt").write_text("cats sleep all day on the sofa")
    assert main(["index", str(notes), "--chroma-url", chroma_url, "--model", str(tiny_path)]) == 0
    port = free_port()
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - read after the process has gone
    env = {**os.environ, "E5V_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "-m", "e5v", "serve", "--chroma-url", chroma_url, "--replicas", "2", "--threads", "1"]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--graceful-shutdown-timeout", "3"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    ray_processes: list[psutil.Process] = []
    try:
        _until_ready(process, url)
        answer = httpx.post(
            f"{url}/v1/embeddings", json={"input": ["a cat"]}, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        )
        assert answer.status_code == 200 and answer.headers[REPLICA_HEADER]

        def search(_: int) -> httpx.Response:
            body = {"text": "espresso brewing at dawn", "k": 2, "group": "none"}
            return httpx.post(f"{url}/v1/search", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

        seen: set[str] = set()
        for _ in range(10):  # bounded: concurrent searches reach both replicas
            with ThreadPoolExecutor(4) as pool:
                for found in pool.map(search, range(12)):
                    assert found.status_code == 200, found.text
                    assert Path(found.json()["hits"][0]["path"]).name == "coffee.txt"
                    seen.add(found.headers[REPLICA_HEADER])
            if len(seen) == 2:
                break
        assert len(seen) == 2, seen
        ray_processes = _descendants(process.pid)
        assert any("raylet" in " ".join(child.cmdline()) for child in ray_processes)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    _until_exited(ray_processes)
    log.seek(0)
    said = log.read()
    assert "ready: " in said and "2 replicas on Ray Serve" in said, said
    assert "keys: on (1)" in said and f"collection: 'e5v' in {chroma_url}, 2 records" in said
    assert "Traceback" not in said, said


def test_a_model_that_cannot_load_is_one_line_and_leaves_no_ray(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "e5v", "serve", "--model", str(tmp_path / "nothing"), "--replicas", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.Popen(
        [*command, "--threads", "1", "--port", str(free_port())], stderr=subprocess.PIPE, text=True, env=env
    )
    children: list[psutil.Process] = []
    deadline = time.monotonic() + 60
    while not children and process.poll() is None and time.monotonic() < deadline:  # its Ray processes, once there
        children = [child for child in _descendants(process.pid) if "raylet" in " ".join(child.cmdline())]
        time.sleep(0.5)
    try:
        _, err = process.communicate(timeout=START_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("e5v serve: error: the replicas did not start: "), err
    assert "no checkpoint folder" in last and str(tmp_path / "nothing") in last
    assert "Traceback" not in err
    assert children and not _running(children)


class Cluster(NamedTuple):
    address: str
    env: dict[str, str]  # joins it: RAY_AUTH_MODE=token and its token
    pid: int  # of its `ray start`


@pytest.fixture
def ray_cluster() -> Iterator[Cluster]:
    """A ``ray start --head --block`` cluster on loopback with token authentication, as on a real head node.
    Stopping ``ray start`` stops the cluster."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
    }
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    ports = {f"--{name}": str(free_port()) for name in ("ray-client-server-port", "dashboard-port")}
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port)]
    options = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--include-dashboard", "false"]
    head = subprocess.Popen(
        [*command, *options, *(item for pair in ports.items() for item in pair), "--temp-dir", temp],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    processes: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:  # bounded: the GCS accepts connections
            assert head.poll() is None, "ray start exited"
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            time.sleep(0.5)
        yield Cluster(f"127.0.0.1:{port}", env, head.pid)
        processes = _descendants(head.pid)
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)
    _until_exited(processes)


def _serve_actors(cluster: Cluster) -> list[str]:
    """The Ray Serve actors (controller, proxies, replicas) running in ``cluster``."""
    lines = [" ".join(process.cmdline()) for process in _running(_descendants(cluster.pid))]
    return [line for line in lines if line.startswith(("ray::ServeController", "ray::ProxyActor", "ray::ServeReplica"))]


def _embedding(url: str, text: str) -> tuple[list[float], str]:
    answer = httpx.post(f"{url}/v1/embeddings", json={"input": [text]}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"][0]["embedding"], answer.headers[REPLICA_HEADER]


def test_a_joined_cluster_and_serve_run_of_the_printed_config(
    ray_cluster: Cluster, tiny_path: Path, tmp_path: Path, embedder, capsys
) -> None:
    address, env = ray_cluster.address, ray_cluster.env
    expected = embedder.embed(["a cat on a mat"])[0]
    port = free_port()
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - read after the process has gone
    arguments = ["--model", str(tiny_path), "--replicas", "1", "--threads", "1"]
    joined = subprocess.Popen(
        [sys.executable, "-m", "e5v", "serve", *arguments, "--ray-address", address, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        _until_ready(joined, f"http://127.0.0.1:{port}")
        vector, _ = _embedding(f"http://127.0.0.1:{port}", "a cat on a mat")
        assert np.allclose(vector, expected, atol=1e-5)
        assert _serve_actors(ray_cluster)
        joined.send_signal(signal.SIGTERM)
        assert joined.wait(timeout=90) == 0
    finally:
        if joined.poll() is None:
            joined.kill()
    log.seek(0)
    said = log.read()
    assert "ready: " in said and "1 replica on Ray Serve" in said and "Traceback" not in said, said
    deadline = time.monotonic() + 30
    while _serve_actors(ray_cluster) and time.monotonic() < deadline:  # bounded: the Serve instance e5v started stops
        time.sleep(0.5)
    assert not _serve_actors(ray_cluster)

    port = free_port()  # the Ray way: the printed config, run by Ray's own `serve run` on the same cluster
    assert main(["serve", *arguments, "--port", str(port), "--ray-config"]) == 0
    config = tmp_path / "serve.yaml"
    config.write_text(capsys.readouterr().out)
    run = subprocess.Popen(
        [str(Path(sys.executable).parent / "serve"), "run", str(config), "--address", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        _until_ready(run, f"http://127.0.0.1:{port}")
        vector, _ = _embedding(f"http://127.0.0.1:{port}", "a cat on a mat")
        assert np.allclose(vector, expected, atol=1e-5)
        refused = subprocess.run(  # a cluster already serving: e5v says so and leaves it be
            [sys.executable, "-m", "e5v", "serve", *arguments, "--ray-address", address, "--port", str(free_port())],
            capture_output=True,
            text=True,
            env=env,
            timeout=START_S,
        )
        assert refused.returncode == 2, refused.stderr
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith("e5v serve: error: --ray-address ") and "Ray Serve already runs" in last, last
        assert "serve deploy serve.yaml" in last and "Traceback" not in refused.stderr
        assert _embedding(f"http://127.0.0.1:{port}", "a cat on a mat")[0] == vector  # still served
        run.send_signal(signal.SIGINT)  # Ctrl-C: `serve run` deletes its application
        assert run.wait(timeout=90) == 0
    finally:
        if run.poll() is None:
            run.kill()


def test_an_address_where_nothing_listens_is_refused_at_once(capsys) -> None:
    said = refusal(capsys, "--replicas", "1", "--ray-address", f"127.0.0.1:{free_port()}")
    assert "nothing answers there" in said and "ray start --head" in said
