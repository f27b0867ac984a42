"""``/ready`` and the app's readiness probe (``app.state.ready``, what a Ray Serve replica's
health check calls): loading, ready, and stopped once the model's scheduler has stopped."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from e5v import E5VEmbedder
from e5v.server.app import ServerConfig, create_app


def test_ready_says_stopped_once_the_scheduler_stops(tiny_path: Path) -> None:
    app = create_app(ServerConfig(model_name="tiny", load=lambda: E5VEmbedder(tiny_path, batch_size=4)))
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:  # bounded: the model loads
            time.sleep(0.1)
        assert client.get("/ready").json() == {"status": "ready"}
    # the app has stopped: its scheduler is closed, and the thread that served it returns
    deadline = time.monotonic() + 30
    while TestClient(app).get("/ready").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    answer = TestClient(app).get("/ready")
    assert answer.status_code == 503
    assert answer.json() == {"status": "stopped", "error": "the model's scheduler has stopped"}


@pytest.mark.asyncio
async def test_the_probe_is_the_route_without_http(tiny_path: Path) -> None:
    app = create_app(ServerConfig(model_name="tiny", load=lambda: E5VEmbedder(tiny_path, batch_size=4)))
    answer = await app.state.ready()  # before the lifespan starts: nothing loads
    assert answer.status_code == 503
    assert json.loads(answer.body) == {"status": "loading"}
