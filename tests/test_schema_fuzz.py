"""Schemathesis against real ``e5v serve`` processes: every route of a keyless ``--db``
server and of a keyed one, fuzzed from the server's own ``/openapi.json``.

Each case is checked for what the schema promises: no 5xx, a documented status, content
type, body and headers, refusals of what the schema forbids and acceptance of what it
allows (except where an image or a text's content decides, which no schema can say).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from serving import KEY, launch, start_server, stop

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
#: Cases a route: enough to reach every branch of the request models, a few minutes in all on 2 cores.
EXAMPLES_PER_ROUTE = 100
#: Operations whose bodies carry content (images, texts) that the server checks beyond the schema.
CONTENT_CHECKED = {"POST /v1/embeddings", "POST /v1/search"}
FUZZ = settings(
    max_examples=EXAMPLES_PER_ROUTE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def open_db(tmp_path_factory: pytest.TempPathFactory, tiny_path: Path) -> Iterator[str]:
    """A keyless ``--db`` server on loopback, over examples/data's photos and notes."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(EXAMPLES, root / "data", ignore=shutil.ignore_patterns("*.pdf"))
    env = {name: value for name, value in os.environ.items() if name != "E5V_API_KEY"}
    command = [sys.executable, "-m", "e5v", "index", str(root / "data"), "--model", str(tiny_path)]
    done = subprocess.run(
        [*command, "--db", str(root / "db"), "--quiet"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    process, url = launch(["--db", str(root / "db")], env)
    yield url
    stop(process)


@pytest.fixture(scope="module")
def keyed(tiny_path: Path) -> Iterator[str]:
    process, url = start_server(tiny_path)
    yield url
    stop(process)


def fuzz(url: str, headers: dict[str, str]) -> list[str]:
    """Every operation of ``url``'s schema, fuzzed with valid and invalid cases: the labels
    of those it fuzzed (a failing case raises, naming it)."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        takes_input = bool(operation.body or operation.path_parameters or operation.query)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if takes_input else (GenerationMode.POSITIVE,):
            fuzz_operation(operation, mode, headers)
        labels.append(operation.label)
    return labels


def fuzz_operation(operation: schemathesis.APIOperation, mode: GenerationMode, headers: dict[str, str]) -> None:
    # A schema-valid query can still be refused: no JSON Schema says "a decodable image" or
    # "a text without <image>", so those are held to every check but that one.
    excluded = [positive_data_acceptance] if operation.label in CONTENT_CHECKED else []

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers, timeout=60, excluded_checks=excluded)

    try:
        check()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        print(f"{operation.label}: no invalid request can be written")  # a path's string parameter, say


def test_a_db_server_keeps_its_schema(open_db: str) -> None:
    fuzzed = fuzz(open_db, {})
    assert {"POST /v1/embeddings", "POST /v1/search", "GET /v1/records/{record_id}/thumbnail"} <= set(fuzzed)


def test_a_keyed_server_keeps_its_schema(keyed: str) -> None:
    fuzzed = fuzz(keyed, {"Authorization": f"Bearer {KEY}"})
    assert {"POST /v1/embeddings", "GET /v1/models", "GET /info", "GET /metrics", "GET /ready"} <= set(fuzzed)


def test_the_schema_documents_every_refusal(keyed: str) -> None:
    raw = httpx.get(f"{keyed}/openapi.json").json()
    embeddings = raw["paths"]["/v1/embeddings"]["post"]["responses"]
    assert {"200", "400", "401", "404", "408", "413", "421", "429", "500", "503"} <= set(embeddings)
    assert "422" not in embeddings and "Retry-After" in embeddings["429"]["headers"]
    assert embeddings["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    metrics = raw["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain; version=0.0.4"]
