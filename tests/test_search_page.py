"""The search page of ``e5v serve --db``, driven in a real headless Chromium (Playwright
from PyPI, Debian's ``chromium``) against real server subprocesses over ``examples/data``
indexed by ``e5v index`` with a tiny checkpoint: one open server on loopback, one with a
key whose corpus also holds a hostile file name and note. PDF pages: tests/test_search_page_pdf.py."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serving import KEY, launch, start_server, stop

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "data"
#: examples/data's photos and notes only: the counts below are theirs (PDFs have tests of their own)
ONLY_PHOTOS_AND_NOTES = shutil.ignore_patterns("*.pdf")
XSS_NAME = "<img src=x onerror=alert(1)>.png"
XSS_NOTE = "A note that tries <script>window.pwned = 1; alert('note')</script> and <b onmouseover=alert(2)>bold</b>.\n"
TIMEOUT_MS = 60_000


def index(corpus: Path, model: Path) -> Path:
    db = corpus.parent / "db"
    command = [sys.executable, "-m", "e5v", "index", str(corpus), "--model", str(model), "--db", str(db), "--quiet"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stderr
    return db


def serve_without_key(db: Path) -> tuple[subprocess.Popen[str], str]:
    """``e5v serve --db`` with no key (so on loopback), its model from the collection."""
    return launch(["--db", str(db)], {name: value for name, value in os.environ.items() if name != "E5V_API_KEY"})


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory, tiny_path: Path) -> Iterator[tuple[str, Path]]:
    corpus = tmp_path_factory.mktemp("page-open") / "data"
    shutil.copytree(EXAMPLES, corpus, ignore=ONLY_PHOTOS_AND_NOTES)
    process, url = serve_without_key(index(corpus, tiny_path))
    yield url, corpus
    stop(process)


@pytest.fixture(scope="module")
def locked_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_path: Path, photos: dict[str, Image.Image]
) -> Iterator[tuple[str, Path]]:
    corpus = tmp_path_factory.mktemp("page-locked") / "data"
    shutil.copytree(EXAMPLES, corpus, ignore=ONLY_PHOTOS_AND_NOTES)
    photos["camera"].save(corpus / XSS_NAME)
    (corpus / "notes" / "hostile.md").write_text(XSS_NOTE)
    process, url = start_server(tiny_path, "--db", str(index(corpus, tiny_path)))
    yield url, corpus
    stop(process)


class Tab:
    """A page in a fresh browser context, with what it logged and the dialogs it opened."""

    def __init__(self, browser, url: str, *, width: int = 1280, height: int = 800, key: str | None = None) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.set_default_timeout(TIMEOUT_MS)
        if key is not None:
            self.context.add_init_script(f"sessionStorage.setItem('e5v-api-key', {key!r})")
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.problems: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        self.page.on("console", self._console)
        self.page.goto(url + "/")

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _console(self, message) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.problems.append(message.text)  # a CSP violation among them

    def ready(self) -> None:
        """Wait for the collection's line."""
        self.page.wait_for_function("() => document.getElementById('collection').textContent.includes('records')")

    def query(self, text: str) -> None:
        self.page.fill("#text", text)
        self.page.press("#text", "Enter")

    def results(self, count: int | None = None) -> list[dict]:
        """The cards once the search is done (``count`` of them if given)."""
        self.page.wait_for_function(
            "() => !document.getElementById('results').hasAttribute('aria-busy') && "
            "document.getElementById('status').textContent.includes('result')"
        )
        if count is not None:
            self.page.wait_for_function(f"() => document.querySelectorAll('.card').length === {count}")
        return self.page.eval_on_selector_all(
            ".card",
            """cards => cards.map(card => ({
                id: card.dataset.id, kind: card.dataset.kind,
                name: card.querySelector('.name').textContent,
                score: card.querySelector('.score').textContent,
                snippet: card.querySelector('.snippet') ? card.querySelector('.snippet').textContent : null,
            }))""",
        )

    def thumbnails_loaded(self) -> None:
        self.page.wait_for_function(
            "() => [...document.querySelectorAll('.thumb img')].every(img => img.complete && img.naturalWidth > 0)"
        )

    def close(self) -> None:
        self.context.close()
        assert self.problems == []


@pytest.fixture
def tab(browser, open_server) -> Iterator[Tab]:
    opened = Tab(browser, open_server[0])
    opened.ready()
    yield opened
    opened.close()


def api(url: str, body: dict, key: str | None = None) -> list[str]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    response = httpx.post(f"{url}/v1/search", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["hits"]]


def metric(url: str, name: str) -> float:
    line = next(line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


# -- searching -----------------------------------------------------------------------


def test_a_text_query_shows_results_reachable_by_tab(tab: Tab, open_server) -> None:
    url, _ = open_server
    assert "10 records (5 images, 5 texts)" in tab.page.text_content("#collection")
    tab.query("how to make espresso")
    cards = tab.results(10)
    assert [card["id"] for card in cards] == api(url, {"text": "how to make espresso", "k": 12})
    assert "text query" in tab.page.text_content("#status")
    assert any(card["snippet"] and "espresso" in card["snippet"] for card in cards)
    tab.page.focus("#text")
    for _ in range(12):  # the form's controls, then the first result
        tab.page.keyboard.press("Tab")
        if tab.page.evaluate("document.activeElement.classList.contains('card')"):
            break
    assert tab.page.evaluate("document.activeElement.dataset.id") == cards[0]["id"]
    for _ in range(4):  # the card's own buttons: its picture or passage, Open, then More like this
        tab.page.keyboard.press("Tab")
        if tab.page.evaluate("document.activeElement.textContent") == "More like this":
            break
    assert tab.page.evaluate("document.activeElement.closest('.card').dataset.id") == cards[0]["id"]
    assert tab.page.evaluate("document.activeElement.textContent") == "More like this"


def test_an_uploaded_indexed_photo_comes_first_with_its_thumbnail(tab: Tab, open_server) -> None:
    _, corpus = open_server
    tab.page.set_input_files("#file", str(corpus / "chelsea.png"))
    cards = tab.results(10)
    assert cards[0]["name"] == "chelsea.png" and cards[0]["score"] == "1.000"
    assert "image query" in tab.page.text_content("#status")
    tab.thumbnails_loaded()
    first = tab.page.eval_on_selector(".card .thumb img", "img => [img.naturalWidth, img.naturalHeight]")
    assert first == [400, 266]  # the 451 x 300 photo, downscaled
    assert tab.page.is_visible("#image-chosen") and tab.page.text_content("#image-name") == "chelsea.png"


def test_drag_and_drop_and_paste_give_the_query_image(tab: Tab, open_server) -> None:
    _, corpus = open_server
    for event, field in (("drop", "dataTransfer"), ("paste", "clipboardData")):
        for name in ("coffee.jpg", "horse.png"):
            payload = list((corpus / name).read_bytes())
            tab.page.evaluate(
                """([event, field, name, bytes]) => {
                    const data = new DataTransfer();
                    const type = name.endsWith('.png') ? 'image/png' : 'image/jpeg';
                    data.items.add(new File([new Uint8Array(bytes)], name, {type}));
                    const init = {bubbles: true, cancelable: true, [field]: data};
                    const target = document.getElementById('drop');
                    const made = event === 'drop' ? new DragEvent('drop', init) : new ClipboardEvent('paste', init);
                    target.dispatchEvent(made);
                }""",
                [event, field, name, payload],
            )
            tab.page.wait_for_function(f"() => document.getElementById('image-name').textContent === {name!r}")
            assert tab.results(10)[0]["name"] == name, (event, name)


def test_a_composed_query_returns_results(tab: Tab, open_server) -> None:
    url, corpus = open_server
    tab.page.fill("#text", "make it a dog")
    tab.page.set_input_files("#file", str(corpus / "chelsea.png"))
    cards = tab.results(10)
    assert "composed query" in tab.page.text_content("#status")
    image = base64.b64encode((corpus / "chelsea.png").read_bytes()).decode()
    assert [card["id"] for card in cards] == api(url, {"text": "make it a dog", "image": image, "k": 12})
    tab.page.click("#clear-image")
    tab.page.press("#text", "Enter")
    tab.results(10)
    assert "text query" in tab.page.text_content("#status")


def test_the_kind_filter_and_k(tab: Tab) -> None:
    tab.query("a photo of an animal")
    assert len(tab.results(10)) == 10
    tab.page.select_option("#kind", "image")
    tab.page.wait_for_function(
        "() => [...document.querySelectorAll('.card')].every(card => card.dataset.kind === 'image')"
    )
    assert [card["kind"] for card in tab.results(5)] == ["image"] * 5
    tab.page.select_option("#kind", "text")
    tab.page.wait_for_function(
        "() => [...document.querySelectorAll('.card')].every(card => card.dataset.kind === 'text')"
    )
    assert [card["kind"] for card in tab.results(5)] == ["text"] * 5
    tab.page.select_option("#kind", "")
    tab.page.fill("#k", "3")
    tab.page.press("#k", "Enter")
    assert len(tab.results(3)) == 3


def test_more_like_this_searches_by_a_result(tab: Tab, open_server) -> None:
    url, _ = open_server
    tab.query("a rocket launch")
    cards = tab.results(10)
    tab.page.click(f".card[data-id='{cards[1]['id']}'] .like-button")
    tab.page.wait_for_selector("#like-banner:not([hidden])")
    assert tab.page.text_content("#like-name") == cards[1]["name"]
    tab.page.wait_for_function(f"() => !document.querySelector(\".card[data-id='{cards[1]['id']}']\")")
    liked = tab.results(9)
    assert [card["id"] for card in liked] == api(url, {"like": cards[1]["id"], "k": 12})
    assert "records like" in tab.page.text_content("#status")
    tab.page.click("#clear-like")
    assert tab.page.is_hidden("#like-banner")
    assert len(tab.results(10)) == 10


def test_a_bad_upload_clears_the_results_and_says_why_in_words(tab: Tab, open_server, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    tab.query("a cat")
    tab.results(10)
    tab.page.set_input_files("#file", str(notes))
    tab.page.wait_for_selector("#error:not([hidden])")
    assert tab.page.text_content("#error") == (
        "“notes.txt” is not an image (text/plain); choose a JPEG, PNG, WebP, GIF, BMP or TIFF file."
    )
    assert tab.page.query_selector_all(".card") == [] and tab.page.text_content("#status") == ""
    tab.query("a cat")
    tab.results(10)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing of a picture")
    tab.page.set_input_files("#file", str(broken))
    tab.page.wait_for_function("() => document.getElementById('error').textContent.includes('readable')")
    message = tab.page.text_content("#error")
    assert message.startswith("“broken.png” cannot be searched: bytes of length 38 is not a readable image")
    assert "(Pillow cannot identify its format)" in message and "PNG, JPEG" in message
    assert "<" not in message and "0x" not in message  # no Python object's repr
    assert tab.page.query_selector_all(".card") == [] and tab.page.text_content("#status") == ""
    assert tab.page.is_hidden("#image-chosen")


def test_empty_query_and_no_results_states(tab: Tab) -> None:
    assert "Type a query" in tab.page.text_content("#status")
    tab.page.press("#text", "Enter")
    assert "Type a query" in tab.page.text_content("#status") and tab.page.is_hidden("#error")
    tab.page.evaluate(
        "document.getElementById('kind').append(new Option('videos', 'video'))"  # a kind with no records
    )
    tab.page.select_option("#kind", "video")
    tab.query("anything")
    tab.page.wait_for_function("() => document.getElementById('status').textContent.startsWith('No results')")
    assert tab.page.text_content("#status") == "No results among video for this text query."


def test_thumbnails_are_made_once_and_kept(browser, open_server) -> None:
    url, _ = open_server
    kept = metric(url, "e5v_thumbnails_cache_hits_total")
    shown: list[str] = []
    for _ in range(2):  # two contexts: no browser cache shared
        tab = Tab(browser, url)
        tab.ready()
        tab.page.select_option("#kind", "image")
        tab.query("a photo")
        shown = [card["id"] for card in tab.results(5)]
        tab.thumbnails_loaded()
        tab.close()
    assert metric(url, "e5v_thumbnails_generated_total") == len(shown) == 5  # one per photo, whatever asked before
    assert metric(url, "e5v_thumbnails_cache_hits_total") - kept >= len(shown)  # the second tab's, at least


def test_readable_at_phone_width(browser, open_server) -> None:
    url, corpus = open_server
    tab = Tab(browser, url, width=390, height=844)
    tab.ready()
    tab.page.set_input_files("#file", str(corpus / "astronaut.jpg"))
    tab.results(10)
    tab.thumbnails_loaded()
    assert tab.page.evaluate("document.documentElement.scrollWidth") <= 390
    box = tab.page.eval_on_selector(".card", "card => card.getBoundingClientRect().width")
    assert 140 <= box <= 390
    tab.close()


# -- safety --------------------------------------------------------------------------


def test_hostile_names_and_notes_render_as_text(browser, locked_server) -> None:
    from e5v.collection.records import record_id
    from e5v.collection.repository import Store

    url, corpus = locked_server
    hostile_id = record_id(str(corpus / XSS_NAME))
    extra = {"page": 7, "caption": "<img src=x onerror=alert(3)>"}  # other metadata, as another indexer may add
    Store(corpus.parent / "db").collection.update(ids=[hostile_id], metadatas=[extra])
    tab = Tab(browser, url, key=KEY)
    tab.ready()
    tab.page.fill("#k", "50")
    tab.query("a hostile note")
    cards = tab.results(12)
    tab.thumbnails_loaded()
    names = [card["name"] for card in cards]
    assert XSS_NAME in names
    note = next(card for card in cards if card["name"] == "hostile.md")
    assert note["snippet"] == XSS_NOTE.strip()
    assert tab.page.eval_on_selector_all("img[src='x'], b, main script", "found => found.length") == 0
    assert tab.page.evaluate("window.pwned") is None
    hostile = tab.page.eval_on_selector(
        f".card[data-id='{hostile_id}'] .thumb img", "img => [img.alt, img.naturalWidth]"
    )
    assert hostile == [XSS_NAME, 400]
    facts = tab.page.text_content(f".card[data-id='{hostile_id}'] .facts")
    assert "caption" not in facts and "page" not in facts  # no metadata field on a card, a photo has no page
    tab.page.hover(".snippet")
    assert tab.dialogs == []
    tab.close()


def test_a_locked_server_asks_for_the_key(browser, locked_server) -> None:
    url, _ = locked_server
    tab = Tab(browser, url)
    answers: list[tuple[str, int, str | None]] = []
    tab.page.on(
        "response",
        lambda response: (
            answers.append(
                (response.url.removeprefix(url), response.status, response.request.headers.get("authorization"))
            )
            if "/v1/" in response.url
            else None
        ),
    )
    tab.page.reload()
    tab.page.wait_for_selector("#key-form:not([hidden])")
    assert tab.page.evaluate("document.activeElement.id") == "key"
    tab.page.wait_for_function("() => document.getElementById('collection').textContent.startsWith('Locked')")
    assert tab.page.text_content("#collection") == "Locked: this server needs an API key."
    assert ("/v1/collection", 401, None) in answers
    for control in ("#text", "#go", "#kind", "#group", "#where", "#k", "#file"):
        assert tab.page.is_disabled(control), control  # the search form waits behind the key
    assert tab.page.query_selector_all(".card") == []

    tab.page.fill("#key", "wrong-key")
    tab.page.press("#key", "Enter")
    tab.page.wait_for_function("() => document.getElementById('key-error').textContent.includes('refused')")
    tab.page.fill("#key", KEY)
    tab.page.press("#key", "Enter")
    tab.ready()
    assert tab.page.is_hidden("#key-form") and tab.page.is_enabled("#text")
    tab.query("a cat")
    cards = tab.results(12)
    assert cards[0]["id"] == api(url, {"text": "a cat", "k": 12}, key=KEY)[0]
    tab.thumbnails_loaded()
    assert ("/v1/search", 200, f"Bearer {KEY}") in answers
    assert any(path.endswith("/thumbnail") and status == 200 for path, status, _ in answers)
    assert tab.page.evaluate("sessionStorage.getItem('e5v-api-key')") == KEY
    assert tab.page.evaluate("localStorage.length") == 0
    tab.close()
