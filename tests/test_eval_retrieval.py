"""`e5v eval retrieval`: your own queries, corpus and qrels in BEIR's layout, every kind of
query; metrics by hand with injected embeddings; --compare side by side on a tiny checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from e5v import Composed, E5VEmbedder, Interleaved
from e5v.cli import main
from e5v.errors import InvalidInputError
from e5v.evaluation.retrieval import Item, evaluate_retrieval, read_items, read_qrels


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture()
def own_data(tmp_path: Path, photos) -> Path:
    """A corpus of a text, two photos and a photo with a caption; text, image and composed
    queries; one query without any judgement."""
    root = tmp_path / "own"
    (root / "img").mkdir(parents=True)
    for name in ("cat", "coffee", "rocket", "astronaut"):
        photos[name].resize((48, 40)).save(root / "img" / f"{name}.png")
    write_jsonl(
        root / "corpus.jsonl",
        [
            {"_id": "d1", "title": "Espresso", "text": "Coffee brewed under pressure."},
            {"id": "d2", "image": "img/cat.png"},
            {"id": "d3", "image": str(root / "img" / "rocket.png")},  # absolute paths work too
            {"id": "d4", "image": "img/coffee.png", "text": "a cup of coffee on a saucer"},
        ],
    )
    write_jsonl(
        root / "queries.jsonl",
        [
            {"id": "q1", "text": "how is espresso made"},
            {"id": 2, "image": "img/astronaut.png"},
            {"id": "q3", "image": "img/cat.png", "text": "make it a rocket"},
            {"id": "q4", "text": "unjudged"},
        ],
    )
    (root / "qrels.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t1\n2\td4\t1\nq3\td3\t1\nq3\td1\t0\n"
    )
    return root


def own_args(root: Path, model: str | Path) -> list[str]:
    """``e5v eval retrieval`` on the own-data fixture's three files with ``model``."""
    files = ["--queries", root / "queries.jsonl", "--corpus", root / "corpus.jsonl", "--qrels", root / "qrels.tsv"]
    return ["eval", "retrieval", *map(str, files), "--model", str(model)]


def test_items_and_qrels_are_read_in_beir_layout(own_data: Path) -> None:
    corpus = read_items(own_data / "corpus.jsonl")
    assert corpus[0] == Item("d1", "Espresso Coffee brewed under pressure.", None)  # BEIR: title, a space, text
    assert [c.kind for c in corpus] == ["text", "image", "image", "composed"]
    assert corpus[3].as_document() == Interleaved([own_data / "img" / "coffee.png", "a cup of coffee on a saucer"])
    queries = read_items(own_data / "queries.jsonl")
    assert queries[1].id == "2" and queries[2].as_query() == Composed(own_data / "img" / "cat.png", "make it a rocket")
    qrels = read_qrels(own_data / "qrels.tsv", queries, corpus)
    assert qrels == {"q1": {"d1": 2, "d2": 1}, "2": {"d4": 1}, "q3": {"d3": 1, "d1": 0}}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "corpus.jsonl:2: not JSON"),
        ('{"text": "no id"}', "corpus.jsonl:2: needs an 'id'"),
        ('{"id": "d9"}', "corpus.jsonl:2: needs a 'text' and/or an 'image'"),
        ('{"id": "d9", "image": "img/nosuch.png"}', "corpus.jsonl:2: image 'img/nosuch.png' not found"),
        ('{"id": "d1", "text": "again"}', "corpus.jsonl:2: id 'd1' already used on line 1"),
        ('{"id": "d9", "text": 5}', "corpus.jsonl:2: 'text' must be a string"),
        ("[1, 2]", "corpus.jsonl:2: expected a JSON object"),
    ],
)
def test_a_bad_item_is_named_by_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": "d1", "text": "fine"}\n' + line + "\n")
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(")):
        read_items(path)


def test_a_bad_qrels_line_is_named(own_data: Path, tmp_path: Path) -> None:
    queries, corpus = read_items(own_data / "queries.jsonl"), read_items(own_data / "corpus.jsonl")
    for text, message in [
        ("q1\td1\n", "qrels.tsv:1: expected query-id<TAB>corpus-id<TAB>score, got 2 fields"),
        ("q1\td1\t1\nq1\td2\thigh\n", "qrels.tsv:2: score 'high' is not a whole number"),
        ("q9\td1\t1\n", "qrels.tsv:1: query-id 'q9' is not in the queries file"),
        ("q1\td9\t1\n", "qrels.tsv:1: corpus-id 'd9' is not in the corpus file"),
    ]:
        (tmp_path / "qrels.tsv").write_text(text)
        with pytest.raises(InvalidInputError, match=message):
            read_qrels(tmp_path / "qrels.tsv", queries, corpus)


class FakeEmbedder:
    """Vectors by content: texts by string, images by file name, composed and interleaved by both."""

    def __init__(self, vectors: dict[object, list[float]]) -> None:
        self.vectors = vectors
        self.prompts: list[object] = []

    def key(self, item: object) -> object:
        if isinstance(item, Composed):
            return ("composed", Path(item.image).name, item.text)
        if isinstance(item, Interleaved):
            return ("interleaved", *(p.name if isinstance(p, Path) else p for p in item.parts))
        return item.name if isinstance(item, Path) else item

    def embed(self, items, *, prompts=None, show_progress_bar=False):
        self.prompts.append(prompts)
        rows = np.array([self.vectors[self.key(item)] for item in items], dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_metrics_by_kind_of_query_on_injected_embeddings(own_data: Path, caplog) -> None:
    e = np.eye(4)
    fake = FakeEmbedder(
        {
            "Espresso Coffee brewed under pressure.": e[0],
            "cat.png": e[1],
            "rocket.png": e[2],
            ("interleaved", "coffee.png", "a cup of coffee on a saucer"): e[3],
            "how is espresso made": e[0] + 0.5 * e[1],  # d1 (grade 2) first, d2 (grade 1) second
            "astronaut.png": e[2] + 0.8 * e[3] + 0.1 * e[0],  # its d4 second, after d3
            ("composed", "cat.png", "make it a rocket"): e[1],  # its d3 ties d1 and d4 at 0: third
        },
    )
    queries, corpus = read_items(own_data / "queries.jsonl"), read_items(own_data / "corpus.jsonl")
    results = evaluate_retrieval(fake, queries, corpus, read_qrels(own_data / "qrels.tsv", queries, corpus), ks=(1, 5))
    assert list(results) == ["text queries", "image queries", "composed queries", "all queries"]
    assert "1 of 4 queries have no relevant item" in caplog.text
    third = 1 / math.log2(3)
    expected = {
        "text queries": {"R@1": 50.0, "R@5": 100.0, "MRR@10": 100.0, "nDCG@10": 100.0},
        "image queries": {"R@1": 0.0, "R@5": 100.0, "MRR@10": 50.0, "nDCG@10": 100 * third},
        "composed queries": {"R@1": 0.0, "R@5": 100.0, "MRR@10": 100 / 3, "nDCG@10": 50.0},
        "all queries": {
            "R@1": 100 / 6, "R@5": 100.0, "MRR@10": 100 * (1 + 0.5 + 1 / 3) / 3, "nDCG@10": 100 * (1 + third + 0.5) / 3,
        },
    }  # fmt: skip
    for kind, metrics in expected.items():
        assert results[kind].metrics == pytest.approx(metrics), kind
    assert results["all queries"].counts == {"queries": 3, "corpus": 4}
    evaluate_retrieval(fake, queries, corpus, {"q1": {"d1": 1}}, prompts="cirr")
    assert fake.prompts[-2:] == ["cirr", "cirr"]
    with pytest.raises(InvalidInputError, match="no query has a relevant corpus item"):
        evaluate_retrieval(fake, queries, corpus, {"q1": {"d1": 0}})


def test_e5v_eval_retrieval_compares_settings_side_by_side(own_data: Path, tiny_path: Path, tmp_path: Path, capsys):
    output = tmp_path / "own.json"
    args = [*own_args(own_data, tiny_path), "--no-cache", "--output", str(output)]
    args += ["--compare", "max_image_tiles=0", "--compare", "dtype=bfloat16,max_image_tiles=1", "--k", "1,3"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert f"wrote the report to {output.resolve()}\n" in err and err.endswith("embedding cache: none (--no-cache)\n")
    header, _rule, *rows = out.splitlines()
    assert header.split() == ["task", "metric", "base", "max_image_tiles=0", "dtype=bfloat16,max_image_tiles=1"]
    kinds = ("text", "image", "composed", "all")
    assert [r.split()[:3] for r in rows] == [
        [k, "queries", m] for k in kinds for m in ("R@1", "R@3", "MRR@10", "nDCG@10")
    ]
    # "text queries R@1 base value (difference) value (difference)"
    assert all(len(r.split()) == 8 and r.split()[5][0] == r.split()[7][0] == "(" for r in rows)
    report = json.loads(output.read_text())
    assert report["settings"]["max_image_tiles=0"]["max_image_tiles"] == 0
    assert report["settings"]["dtype=bfloat16,max_image_tiles=1"]["dtype"] == "bfloat16"
    assert "paper" not in report and set(report["results"]["base"]) == {
        "text queries", "image queries", "composed queries", "all queries",
    }  # fmt: skip
    # the base column is what the API finds
    queries, corpus = read_items(own_data / "queries.jsonl"), read_items(own_data / "corpus.jsonl")
    direct = evaluate_retrieval(
        E5VEmbedder(tiny_path, device="cpu"),
        queries,
        corpus,
        read_qrels(own_data / "qrels.tsv", queries, corpus),
        ks=(1, 3),
    )
    assert list(direct) == list(report["results"]["base"])
    for kind, result in direct.items():
        assert result.metrics == pytest.approx(report["results"]["base"][kind]["metrics"]), kind


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--compare", "speed=fast"], "--compare 'speed=fast': expected KEY=VALUE with KEY one of model, revision"),
        (["--compare", "dtype=float8"], "--compare 'dtype=float8': "),
        (["--compare", "max_image_tiles=-1"], "expected 0 or a positive number of tiles"),
        (["--compare", "max_image_tiles=none"], "--compare 'max_image_tiles=none' changes nothing"),
        (["--compare", "prompts=nosuch"], "unknown prompt preset"),
    ],
)
def test_a_bad_compare_setting_is_one_line(own_data: Path, extra: list[str], message: str, capsys) -> None:
    assert main([*own_args(own_data, "never-loaded"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("e5v eval: error: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["retrieval"], "`e5v eval retrieval` needs --queries, --corpus, --qrels"),
        (["retrieval", "coco", "--queries", "q", "--corpus", "c", "--qrels", "r"], "`e5v eval retrieval` runs alone"),
        (["coco", "--queries", "q.jsonl"], "--queries is for `e5v eval retrieval`"),
        (["coco", "--prompts", "cirr"], "--prompts is for `e5v eval retrieval`"),
        (["imagenet"], "unknown TARGET 'imagenet'"),
        (["coco", "--compare", "prompts=cirr"], "prompts is for `e5v eval retrieval`"),
        (
            ["retrieval", "--queries", "q", "--corpus", "c", "--qrels", "r", "--limit", "5"],
            "--limit is for the benchmarks, not `e5v eval retrieval`",
        ),
    ],
)
def test_misused_targets_are_refused_before_anything_loads(args: list[str], message: str, capsys) -> None:
    assert main(["eval", *args, "--model", "never-loaded"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("e5v eval: error: ") and message in err and len(err.splitlines()) == 1


def test_a_bad_input_file_stops_before_the_model_loads(own_data: Path, capsys) -> None:
    (own_data / "queries.jsonl").write_text('{"id": "q1"}\n')
    assert main(own_args(own_data, "never-loaded")) == 2
    assert "queries.jsonl:1: needs a 'text' and/or an 'image'" in capsys.readouterr().err


def test_help_names_every_target_with_examples(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    examples = text.split("examples:")[1]
    assert "e5v eval paper " in examples and "e5v eval retrieval --queries" in examples
    for target in ("paper", "flickr30k", "coco", "cirr", "cirr-test", "fashioniq", "sts", "i2i-flickr30k", "retrieval"):
        assert target in text.split("examples:")[0]


def test_a_model_loaded_before_stays_shared_and_the_settings_own_are_freed(own_data: Path, tiny_path: Path, embedder):
    from e5v.model import loading

    args = own_args(own_data, tiny_path)
    before = dict(loading._CACHE)
    assert main([*args, "--no-cache", "--output", str(own_data / "out.json"), "--compare", "max_image_tiles=0"]) == 0
    assert before == loading._CACHE  # the float32 tiny model of the fixture is still there; nothing else is
    assert E5VEmbedder(tiny_path, batch_size=4)._loaded is embedder._loaded
