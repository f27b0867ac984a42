"""The search page over PDFs, in a real headless Chromium against a real ``e5v serve --db``:
one card per PDF page (its thumbnail, the matching passage, ``page N of M``, the fused
score), the group toggle and the filter field, cards that open their file and passages that
expand, even card heights, and a query typed while the model loads. Takes the README's
screenshot (grouped PDF results, tiny checkpoint); ``E5V_UPDATE_SCREENSHOT=1`` writes it to
docs/search-page.png, else it goes to a temporary folder and the work tree stays clean."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pdfs import write_report
from PIL import Image
from serving import free_port, launch, stop
from test_search_page import Tab, index

pytest.importorskip("pypdfium2")
pytest.importorskip("fpdf")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "data"
SCREENSHOT = ROOT / "docs" / "search-page.png"
QUERY = "a galaxy far away"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, Image.Image]) -> Path:
    root = tmp_path_factory.mktemp("page-pdf") / "data"
    shutil.copytree(EXAMPLES, root)
    write_report(root / "report.pdf", photos["cat"])
    return root


@pytest.fixture(scope="module")
def db(corpus: Path, tiny_path: Path) -> Path:
    return index(corpus, tiny_path)


def open_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name != "E5V_API_KEY"}


@pytest.fixture(scope="module")
def server(db: Path) -> Iterator[str]:
    process, url = launch(["--db", str(db)], open_env())
    yield url
    stop(process)


@pytest.fixture
def tab(browser, server: str) -> Iterator[Tab]:
    opened = Tab(browser, server)
    opened.ready()
    yield opened
    opened.close()


def cards(tab: Tab) -> list[dict]:
    return tab.page.eval_on_selector_all(
        ".card",
        """cards => cards.map(card => ({
            id: card.dataset.id, name: card.querySelector('.name').textContent,
            score: card.querySelector('.score').textContent, kind: card.querySelector('.kind').textContent,
            place: card.querySelector('.place') ? card.querySelector('.place').textContent : null,
            snippet: card.querySelector('.snippet') ? card.querySelector('.snippet').textContent : null,
            thumbnail: !!card.querySelector('.thumb img'), text: card.textContent,
            height: card.getBoundingClientRect().height,
        }))""",
    )


def test_a_pdf_page_is_one_card_with_its_thumbnail_passage_page_and_fused_score(tab: Tab, server: str) -> None:
    tab.query(QUERY)
    tab.results(12)
    tab.thumbnails_loaded()
    answer = httpx.post(f"{server}/v1/search", json={"text": QUERY, "k": 12}, timeout=60).json()
    assert answer["group"] == "page"
    shown = cards(tab)
    assert [card["id"] for card in shown] == [hit["id"] for hit in answer["hits"]]
    pages = [card for card in shown if card["name"].endswith(".pdf")]
    assert sorted((card["name"], card["place"].split(" · ")[0]) for card in pages) == [
        ("hubble-deep-field.pdf", "page 1 of 2"),
        ("hubble-deep-field.pdf", "page 2 of 2"),
        ("report.pdf", "page 1 of 2"),
        ("report.pdf", "page 2 of 2"),
    ]
    for card, hit in zip(shown, answer["hits"]):
        assert card["score"] == f"{hit['score']:.4f}"
        if card["name"].endswith(".pdf"):
            assert card["thumbnail"] and card["snippet"] and card["kind"] == "image + text"
            assert f"passage {hit['passage']}" in card["place"]  # as the CLI and --json number it
        assert not re.search(r"[0-9a-f]{64}|sha256|marker|stamp|pdf_records", card["text"])  # no bookkeeping
    assert len({round(card["height"]) for card in shown}) == 1  # even card heights in the grid


def test_the_group_toggle_and_the_filter_field(tab: Tab) -> None:
    tab.query(QUERY)
    tab.results(12)
    tab.page.select_option("#group", "none")
    tab.page.wait_for_function("() => document.querySelectorAll('.card.grouped').length === 0")
    records = cards(tab)
    assert len(records) == 12 and all(card["kind"] in ("image", "text") for card in records)
    tab.page.select_option("#group", "file")
    tab.page.fill("#where", "path~report")
    tab.page.press("#where", "Enter")
    tab.page.wait_for_function("() => document.querySelectorAll('.card').length === 1")
    [report] = cards(tab)
    assert report["name"] == "report.pdf"
    tab.page.select_option("#group", "page")
    tab.page.fill("#where", "path~report page=2")
    tab.page.press("#where", "Enter")
    # the toggle's own search (page groups of path~report: both pages) may show first; wait for the filter's
    tab.page.wait_for_function(
        "() => { const shown = document.querySelectorAll('.card');"
        " return shown.length === 1 && shown[0].querySelector('.place')?.textContent.startsWith('page 2 of 2'); }"
    )
    [page] = cards(tab)
    assert page["name"] == "report.pdf"
    tab.page.fill("#where", "page=two")
    tab.page.press("#where", "Enter")
    tab.page.wait_for_selector("#error:not([hidden])")
    assert "page is a whole number" in tab.page.text_content("#error")


def test_a_card_opens_its_file_at_its_page_and_a_passage_expands(tab: Tab) -> None:
    tab.query(QUERY)
    tab.results(12)
    first = tab.page.query_selector(".card.grouped:has(.place)")
    page = re.match(r"page (\d+)", first.query_selector(".place").text_content()).group(1)
    with tab.page.expect_popup() as popup:
        first.query_selector(".open-button").click()
    opened = popup.value
    opened.wait_for_function("() => location.href.startsWith('blob:')")
    assert opened.url.endswith(f"#page={page}")
    opened.close()
    tab.page.select_option("#group", "none")
    tab.page.select_option("#kind", "text")
    tab.page.wait_for_function("() => [...document.querySelectorAll('.card')].every(c => c.dataset.kind === 'text')")
    more = tab.page.wait_for_selector(".card .more-button:not([hidden])")
    card = more.evaluate_handle("button => button.closest('.card')")
    assert card.evaluate("c => c.querySelector('.snippet').scrollHeight > c.querySelector('.snippet').clientHeight")
    more.click()
    assert card.evaluate("c => c.classList.contains('expanded')") and more.get_attribute("aria-expanded") == "true"
    assert card.evaluate("c => c.querySelector('.snippet').scrollHeight <= c.querySelector('.snippet').clientHeight")
    assert more.text_content() == "Show less"


def test_a_query_typed_while_the_model_loads_runs_once_it_is_ready(browser, db: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "e5v", "serve", "--db", str(db), "--port", str(port)]
    env = {**open_env(), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the page is served before the model has loaded
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        tab = Tab(browser, url)
        statuses: list[int] = []
        tab.page.on(
            "response", lambda response: statuses.append(response.status) if "/v1/search" in response.url else None
        )
        tab.page.wait_for_function("() => document.getElementById('collection').textContent.includes('records')")
        tab.query(QUERY)  # once: no second Enter
        assert len(tab.results(12)) == 12
        assert statuses[-1] == 200 and set(statuses) <= {200, 503}
        tab.close()
    finally:
        stop(process)


def test_a_screenshot_for_the_readme(browser, server: str, tmp_path: Path) -> None:
    tab = Tab(browser, server)
    tab.ready()
    tab.query(QUERY)
    tab.results(12)
    tab.thumbnails_loaded()
    shot = SCREENSHOT if os.environ.get("E5V_UPDATE_SCREENSHOT") == "1" else tmp_path / SCREENSHOT.name
    tab.page.screenshot(path=str(shot))
    assert Image.open(shot).size == (1280, 800)
    tab.close()
