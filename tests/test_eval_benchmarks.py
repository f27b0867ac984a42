"""The paper's benchmarks on miniature datasets in each benchmark's exact schema, built
offline here: metrics checked against hand-computed values with injected embeddings, and
the whole harness run end to end on a tiny checkpoint, its vectors equal to the official
recipe's on the official prompts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from e5v import E5VEmbedder
from e5v.cli import main
from e5v.core.inputs import ImageLoader
from e5v.errors import DatasetUnavailableError
from e5v.evaluation import composed, image_text, sts
from e5v.evaluation.benchmarks import load_task_data, run_task
from e5v.evaluation.data import DataSource
from e5v.evaluation.encoder import Encoder
from e5v.evaluation.paper import PAPER
from e5v.evaluation.render import RenderedCaptions, load_font, render_text
from e5v.model.runner import last_states

datasets = pytest.importorskip("datasets")
from datasets import Dataset, DatasetDict, Features, List, Value  # noqa: E402
from datasets import Image as ImageFeature  # noqa: E402

HEAD = "<|start_header_id|>user<|end_header_id|>\n\n"
TAIL = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
TOL = 1e-5


# -- miniature datasets --------------------------------------------------------------------


def photo(i: int) -> Image.Image:
    """A small real photo, different for each ``i`` (a crop of scikit-image's samples)."""
    from skimage import data

    sources = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    array = sources[i % 4]
    top, left = 20 * (i // 4), 30 * (i // 4)
    crop = Image.fromarray(array[top : top + 120, left : left + 90])
    return crop.resize((30 + 4 * (i % 3), 40 - 3 * (i % 2)))


def colour(i: int) -> Image.Image:
    """A solid image whose red channel names it (the injected-embedding tests read it back)."""
    return Image.new("RGB", (8, 8), (i, 0, 0))


IMAGE = ImageFeature()


def flickr_like(captions_per_image: int, images: int, offset: int = 0) -> Dataset:
    return Dataset.from_dict(
        {
            "image": [photo(offset + i) for i in range(images)],
            "text": [[f"photo {offset + i} caption {j}" for j in range(captions_per_image)] for i in range(images)],
        },
        features=Features({"image": IMAGE, "text": List(Value("string"))}),
    )


CIRR_QUERY = Features(
    {
        "candidate": IMAGE,
        "candidate_id": Value("string"),
        "caption": Value("string"),
        "target_id": Value("string"),
        "group": List(Value("string")),
        "split": Value("string"),
        "target": IMAGE,
    }
)
GALLERY = Features({"img": IMAGE, "id": Value("string"), "category": Value("string"), "split": Value("string")})


def gallery(ids: list[str], category: str, split: str, offset: int) -> Dataset:
    rows = {"img": [photo(offset + i) for i in range(len(ids))], "id": ids}
    rows["category"] = [category] * len(ids)
    rows["split"] = [split] * len(ids)
    return Dataset.from_dict(rows, features=GALLERY)


def write_senteval(root: Path) -> None:
    """SentEval's layout and file formats, a few pairs a subset."""
    sentences = [
        ("A man is playing a flute", "A man plays the flute", "4.8"),
        ('He said "no"', "He refused ?", "3.0"),
        ("A cat sleeps", "A rocket launches into space", "0.2"),
        ("Two dogs run on grass", "Dogs are running outside", "4.0"),
    ]
    for year, subsets in sts.STS_SUBSETS.items():
        folder = root / "STS" / f"{year}-en-test"
        folder.mkdir(parents=True)
        for n, subset in enumerate(subsets):
            rows = sentences[n % 2 :] + sentences[: n % 2]
            (folder / f"STS.input.{subset}.txt").write_text("".join(f"{a}\t{b}\n" for a, b, _ in rows) + "x\ty\n")
            (folder / f"STS.gs.{subset}.txt").write_text("".join(f"{g}\n" for *_, g in rows) + "\n")  # last unscored
    bench = root / "STS" / "STSBenchmark"
    bench.mkdir(parents=True)
    (bench / "sts-test.csv").write_text(
        "".join(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{g}\t{a}\t{b}\n" for i, (a, b, g) in enumerate(sentences))
    )
    sick = root / "SICK"
    sick.mkdir()
    (sick / "SICK_test_annotated.txt").write_text(
        "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
        + "".join(f"{i}\t{a}\t{b}\t{1 + float(g) * 0.8:.1f}\tNEUTRAL\n" for i, (a, b, g) in enumerate(sentences))
    )


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every benchmark's data, offline, in its Hub schema: save_to_disk folders and Hub-style Parquet."""
    root = tmp_path_factory.mktemp("eval-data")
    hub = root / "royokong"
    # Flickr30K: Parquet as `hf download` lays it out; COCO: save_to_disk, six captions (the first five count)
    flickr = hub / "flickr30k_test" / "data"
    flickr.mkdir(parents=True)
    flickr_like(5, 4).to_parquet(str(flickr / "test-00000-of-00001.parquet"))
    DatasetDict({"test": flickr_like(6, 3, offset=4)}).save_to_disk(str(hub / "coco_test"))
    # CIRR: val queries and both galleries
    val_ids = [f"dev-{i}-0-img0" for i in range(5)]
    test_ids = [f"test1-{i}-0-img1" for i in range(4)]
    cirr_val = Dataset.from_dict(
        {
            "candidate": [photo(i) for i in (0, 1, 2)],
            "candidate_id": val_ids[:3],
            "caption": ["has two dogs", 'make it "darker"', "show it from above"],
            "target_id": [val_ids[3], val_ids[4], val_ids[0]],
            "group": [val_ids[:4]] * 3,
            "split": ["val"] * 3,
            "target": [photo(i) for i in (3, 4, 0)],
        },
        features=CIRR_QUERY,
    )
    DatasetDict({"val": cirr_val}).save_to_disk(str(hub / "cirr_val"))
    imgs = hub / "cirr_imgs" / "data"
    imgs.mkdir(parents=True)
    gallery(val_ids, "", "val", 0).to_parquet(str(imgs / "val-00000-of-00001.parquet"))
    gallery(test_ids, "", "test", 8).to_parquet(str(imgs / "test-00000-of-00001.parquet"))
    cirr_test = Dataset.from_dict(
        {
            "pairid": [7, 11],
            "candidate": [photo(8), photo(9)],
            "candidate_id": test_ids[:2],
            "caption": ["remove the person", "add a second one"],
        },
        features=Features(
            {"pairid": Value("int64"), "candidate": IMAGE, "candidate_id": Value("string"), "caption": Value("string")}
        ),
    )
    DatasetDict({"test": cirr_test}).save_to_disk(str(hub / "cirr_test"))
    # FashionIQ: three categories in one table, as on the Hub
    rows: dict[str, list[Any]] = {k: [] for k in ("candidate", "candidate_id", "caption", "target_id", "category")}
    galleries = []
    for c, category in enumerate(composed.FASHIONIQ_CATEGORIES):
        ids = [f"{category}{i}" for i in range(4)]
        galleries.append(gallery(ids, category, "val", 12 + 4 * c))
        for q in range(2):
            rows["candidate"].append(photo(12 + 4 * c + q))
            rows["candidate_id"].append(ids[q])
            rows["caption"].append([f"is {category} and red.", f"has long sleeves {q}? "])
            rows["target_id"].append(ids[q + 2])
            rows["category"].append(category)
    rows["split"] = ["val"] * len(rows["caption"])
    rows["target"] = [photo(0)] * len(rows["caption"])
    fashion = Features(
        {
            "candidate": IMAGE,
            "candidate_id": Value("string"),
            "caption": List(Value("string")),
            "target_id": Value("string"),
            "category": Value("string"),
            "split": Value("string"),
            "target": IMAGE,
        }
    )
    DatasetDict({"val": Dataset.from_dict(rows, features=fashion)}).save_to_disk(str(hub / "fashioniq_val"))
    imgs = datasets.concatenate_datasets(galleries)
    DatasetDict({"val": imgs}).save_to_disk(str(hub / "fashioniq_val_imgs"))
    write_senteval(root / "SentEval" / "data" / "downstream")
    return root


# -- injected embeddings ----------------------------------------------------------------------


class FakeEncoder:
    """Vectors looked up by content (texts by string, images by red channel), recording each call."""

    def __init__(self, texts: dict[str, list[float]], images: dict[int, list[float]]) -> None:
        self.text_vectors = {k: np.asarray(v, dtype=np.float32) for k, v in texts.items()}
        self.image_vectors = {k: np.asarray(v, dtype=np.float32) for k, v in images.items()}
        self.calls: list[tuple[str, str, list[Any]]] = []
        self.embedder = SimpleNamespace(dimension=len(next(iter(self.image_vectors.values()))))

    def _unit(self, rows: list[np.ndarray]) -> np.ndarray:
        a = np.stack(rows)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    def texts(self, texts, body, desc):
        self.calls.append(("texts", body, list(texts)))
        return self._unit([self.text_vectors[t] for t in texts])

    def images(self, images, body, desc):
        decoded = images[0 : len(images)]
        self.calls.append(("images", body, [im.getpixel((0, 0))[0] for im in decoded]))
        return self._unit([self.image_vectors[im.getpixel((0, 0))[0]] for im in decoded])

    def composed(self, images, texts, body, desc):
        decoded = images[0 : len(images)]
        self.calls.append(("composed", body, list(texts)))
        return self._unit(
            [self.text_vectors[t] + self.image_vectors[im.getpixel((0, 0))[0]] for im, t in zip(decoded, texts)]
        )


def test_flickr_recall_on_injected_embeddings() -> None:
    # 3 images, 2 captions each (the real sets have 5); caption "i.j" belongs to image i.
    ds = Dataset.from_dict(
        {"image": [colour(i) for i in range(3)], "text": [[f"{i}.{j}" for j in range(2)] for i in range(3)]},
        features=Features({"image": IMAGE, "text": List(Value("string"))}),
    )
    e = np.eye(3)
    fake = FakeEncoder(
        {
            "0.0": e[0],
            "0.1": e[1] + 0.5 * e[0],
            "1.0": e[1],
            "1.1": e[2] + 0.5 * e[1],
            "2.0": e[0] + 0.5 * e[2],
            "2.1": e[1] + 0.4 * e[2],
        },
        {0: e[0], 1: e[1], 2: e[2]},
    )
    result = image_text.run_image_text(fake, ds, "flickr30k")
    # text->image: 0.0 and 1.0 find their image first; 0.1 (0.89 on image 1), 1.1, 2.0 and 2.1 second
    assert result.metrics["t2i R@1"] == pytest.approx(100 * 2 / 6)
    assert result.metrics["t2i R@5"] == 100.0
    # image->text: image 0 finds 0.0 first, image 1 finds 1.0 first (1.0 > 2.1's 0.93 > 0.1's 0.89);
    # image 2's best caption, 2.0 (0.45), comes after 1.1 (0.89): a miss at R@1 although 2.1 is also its own
    assert result.metrics["i2t R@1"] == pytest.approx(100 * 2 / 3)
    assert result.metrics["i2t R@5"] == 100.0
    assert [c[1] for c in fake.calls] == [image_text.PROMPTS["text"], image_text.PROMPTS["image"]]
    assert result.counts == {"images": 3, "captions": 6}


def test_coco_keeps_each_images_first_five_captions() -> None:
    ds = Dataset.from_dict({"image": [colour(0)], "text": [[f"c{j}" for j in range(7)]]})
    assert image_text.captions_of(ds, "coco") == [["c0", "c1", "c2", "c3", "c4"]]
    assert len(image_text.captions_of(ds, "flickr30k")[0]) == 7


def cirr_tables(
    captions: list[str], candidates: list[int], targets: list[int], ids: list[str]
) -> tuple[Dataset, Dataset]:
    queries = Dataset.from_dict(
        {
            "candidate": [colour(c) for c in candidates],
            "candidate_id": [ids[c] for c in candidates],
            "caption": captions,
            "target_id": [ids[t] for t in targets],
        },
        features=Features(
            {
                "candidate": IMAGE,
                "candidate_id": Value("string"),
                "caption": Value("string"),
                "target_id": Value("string"),
            }
        ),
    )
    images = Dataset.from_dict({"img": [colour(i) for i in range(len(ids))], "id": ids})
    return queries, images


def test_cirr_masks_the_reference_on_injected_embeddings() -> None:
    e = np.eye(4)
    ids = ["a", "b", "c", "d"]
    # query 0 (reference a, target b) lands nearest its own reference: masked, b is first
    # query 1 (reference c, target d): d second after a
    queries, images = cirr_tables(["q0", "q1"], [0, 2], [1, 3], ids)
    fake = FakeEncoder(
        {"q0": 0.6 * e[1] - 0.1 * e[0], "q1": 0.5 * e[0] + 0.3 * e[3] - 1.0 * e[2]},
        {0: e[0], 1: e[1], 2: e[2], 3: e[3]},
    )
    result = composed.run_cirr(fake, queries, images)
    assert result.metrics == {"R@1": 50.0, "R@5": 100.0, "R@10": 100.0, "R@50": 100.0}
    assert [c[:2] for c in fake.calls] == [
        ("images", composed.CIRR_PROMPTS["image"]),
        ("composed", composed.CIRR_PROMPTS["composed"]),
    ]
    # without the mask query 0 would miss at R@1: its reference scores highest
    fake.text_vectors["q0"] = 0.6 * e[1] + 0.9 * e[0]
    assert composed.run_cirr(fake, queries, images).metrics["R@1"] == 50.0  # still a hit: the mask removes a
    fake.text_vectors["q0"] = 0.6 * e[1] + 0.9 * e[0] + 0.7 * e[2]
    assert composed.run_cirr(fake, queries, images).metrics["R@1"] == 0.0  # c (not masked for q0) beats b


def test_cirr_submission_masks_and_lists_the_top_ids() -> None:
    e = np.eye(3)
    ids = ["x", "y", "z"]
    queries, images = cirr_tables(["q"], [0], [0], ids)
    queries = queries.remove_columns("target_id").add_column("pairid", [42])
    fake = FakeEncoder({"q": 0.9 * e[0] + 0.3 * e[2] + 0.1 * e[1]}, {0: e[0], 1: e[1], 2: e[2]})
    submission = composed.cirr_submission(fake, queries, images)
    assert submission == {"version": "rc2", "metric": "recall", "42": ["z", "y", "x"]}  # x, the reference, last


def test_fashioniq_sums_the_two_orders_hidden_states_before_normalising() -> None:
    """Injected final hidden states of different norms: the sum of the raw states ranks the
    gallery differently from the sum of the normalised ones, and the harness takes the former."""
    e = np.eye(3, dtype=np.float32)
    states = {  # (query, order) -> raw state; |first order| = 10, |second| = 1
        ("dress0", 0): 10 * e[0], ("dress0", 1): e[1],
        ("dress1", 0): e[2], ("dress1", 1): e[1],
    }  # fmt: skip
    seen: list[tuple[list[str], str]] = []

    def fake_states(images, texts, body):
        seen.append((texts, body))
        names = [f"dress{im.getpixel((0, 0))[0] - 10}" for im in images]
        return [np.stack([states[(n, order)] for n in names]) for order in range(len(texts))]

    encoder = Encoder(SimpleNamespace(cache=None, dimension=3))  # type: ignore[arg-type]
    encoder._states = fake_states  # type: ignore[method-assign]
    gallery_vectors = {"g0": 0.8 * e[0] + 0.6 * e[1], "g1": 0.6 * e[0] + 0.8 * e[1], "g2": e[2]}
    encoder.images = lambda images, body, desc: np.stack(list(gallery_vectors.values()))  # type: ignore[method-assign]
    queries = Dataset.from_dict(
        {
            "candidate": [colour(10), colour(11)],
            "candidate_id": ["g2", "g0"],
            "caption": [["is longer.", "red?"], [" blue", "short, "]],
            "target_id": ["g0", "g1"],
            "category": ["dress", "dress"],
        }
    )
    images = Dataset.from_dict({"img": [colour(0)] * 3, "id": list(gallery_vectors), "category": ["dress"] * 3})
    result = composed.run_fashioniq(encoder, queries, images, categories=["dress"])
    # dress0: normalize(10 e0 + e1) is nearest g0 (its target): a hit at R@1; normalize(e0) + normalize(e1)
    # would tie g0 and g1. dress1: normalize(e2 + e1) ranks g2 first, g1 second: R@10 hit (3 images).
    q0 = (10 * e[0] + e[1]) / np.linalg.norm(10 * e[0] + e[1])
    assert q0 @ gallery_vectors["g0"] > q0 @ gallery_vectors["g1"]
    assert result.metrics == {"dress R@10": 100.0, "dress R@50": 100.0, "avg R@10": 100.0, "avg R@50": 100.0}
    texts, body = seen[0]
    assert texts == [["is longer, red", "blue, short"], ["red, is longer", "short, blue"]]
    assert body == composed.fashioniq_prompt_set("dress").composed
    vectors = encoder.summed_composed([colour(10), colour(11)], *texts, body, "q")
    assert np.allclose(vectors[0], q0) and np.allclose(vectors[1], (e[2] + e[1]) / np.sqrt(2))
    plain = e[0] + e[1]  # what summing normalised vectors would give: tie-free only by the tie rule
    assert not np.allclose(vectors[0], plain / np.linalg.norm(plain))


def test_sts_spearman_on_injected_embeddings(tmp_path: Path) -> None:
    root = tmp_path / "senteval"
    write_senteval(root)
    pairs = sts.read_sts(root, "STSBenchmark")[0]
    assert pairs[2] == [4.8, 3.0, 0.2, 4.0] and pairs[0][1] == ["He", "said", '"no"']
    # cosines by design: pair i gets cosine c[i]
    cosine = {0: 0.9, 1: 0.1, 2: 0.0, 3: 0.5}  # ranks 4, 2, 1, 3 against gold ranks 4, 2, 1, 3
    texts: dict[str, list[float]] = {}
    for i, (a, b) in enumerate(zip(pairs[0], pairs[1])):
        texts[sts.sts_sentence(a)] = [1.0, 0.0]
        texts[sts.sts_sentence(b)] = [cosine[i], float(np.sqrt(1 - cosine[i] ** 2))]
    fake = FakeEncoder(texts, {0: [1.0, 0.0]})
    result = sts.run_sts(fake, root, tasks=["STSBenchmark"])
    assert result.metrics == {"STSBenchmark": pytest.approx(100.0), "avg": pytest.approx(100.0)}
    assert "He said 'no'" in fake.calls[0][2]  # preprocessed: quotes replaced (no full stop after a quote)
    assert "He refused ." in fake.calls[0][2] and "A cat sleeps." in fake.calls[0][2]  # final ? -> ., a . added
    assert fake.calls[0][1] == sts.STS_TEXT_PROMPT
    cosine[1] = 0.95  # now pair 1 (gold 3.0) ranks first: ranks 3, 4, 1, 2 against 4, 2, 1, 3
    fake.text_vectors[sts.sts_sentence(pairs[1][1])] = np.array([0.95, np.sqrt(1 - 0.95**2)], dtype=np.float32)
    assert sts.run_sts(fake, root, tasks=["STSBenchmark"]).metrics["STSBenchmark"] == pytest.approx(100 * 0.4)
    year = sts.read_sts(root, "STS12")
    assert len(year) == 5 and all(len(p[2]) == 4 for p in year)  # the unscored line is dropped


# -- end to end on the tiny checkpoint ---------------------------------------------------------


class Recording(Encoder):
    """The real encoder, keeping what each step embedded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps: dict[str, np.ndarray] = {}

    def _chunked(self, total, desc, embed, chunk_size=None):
        out = super()._chunked(total, desc, embed, chunk_size)
        self.steps[desc] = out
        return out


@pytest.fixture(scope="module")
def official(tiny_path: Path):
    """The official recipe's model and processor, loaded on their own."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_path)


def official_state(official, prompt: str, images: list[Image.Image]) -> np.ndarray:
    """hidden_states[-1][:, -1] of the official recipe, NOT normalised."""
    model, processor = official
    inputs = processor(text=[prompt], images=[ImageLoader().load(i, 0) for i in images] or None, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, return_dict=True)
    return out.hidden_states[-1][0, -1].float().numpy()


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def cached_embedder(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> E5VEmbedder:
    return E5VEmbedder(tiny_path, device="cpu", batch_size=4, cache=tmp_path_factory.mktemp("cache"))


def test_every_benchmark_runs_on_the_tiny_checkpoint_as_the_official_recipe(
    data_dir: Path, cached_embedder: E5VEmbedder, official, tmp_path: Path
) -> None:
    source = DataSource(data_dir)
    encoder = Recording(cached_embedder)
    results = {}
    for task in ("flickr30k", "coco", "cirr", "cirr-test", "fashioniq", "sts"):
        results[task] = run_task(task, encoder, load_task_data(task, source), submission=tmp_path / "sub.json")
    assert results["flickr30k"].counts == {"images": 4, "captions": 20}
    assert results["coco"].counts == {"images": 3, "captions": 15}  # six captions each, the first five kept
    for task in ("flickr30k", "coco"):
        assert set(results[task].metrics) == {f"{d} R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)}
        assert results[task].metrics["t2i R@10"] == 100.0  # 10 >= the number of images
    assert 0 <= results["cirr"].metrics["R@1"] <= results["cirr"].metrics["R@5"] == 100.0
    assert results["fashioniq"].counts["toptee queries"] == 2 and results["fashioniq"].metrics["avg R@10"] == 100.0
    assert set(results["sts"].metrics) == {*sts.STS_TASKS, "avg"}
    assert all(-100 <= v <= 100 for v in results["sts"].metrics.values())
    submission = json.loads((tmp_path / "sub.json").read_text())
    assert submission["version"] == "rc2" and submission["metric"] == "recall"
    assert set(submission) == {"version", "metric", "7", "11"} and len(submission["7"]) == 4
    assert submission["7"][-1] == "test1-0-0-img1" and submission["11"][-1] == "test1-1-0-img1"  # references masked

    # The vectors are the official recipe's on the official prompts (item by item).
    caption = "photo 0 caption 3"
    text = official_state(official, f"{HEAD}{caption}\nSummary above sentence in one word: {TAIL}", [])
    assert np.allclose(encoder.steps["flickr30k captions"][3], unit(text), atol=TOL)
    image = official_state(official, f"{HEAD}<image>\nSummary above image in one word: {TAIL}", [photo(1)])
    assert np.allclose(encoder.steps["flickr30k images"][1], unit(image), atol=TOL)
    edit = 'make it "darker"'
    query = official_state(
        official, f'{HEAD}<image>Modify this image with "{edit}", desribe modified image in one word:{TAIL}', [photo(1)]
    )
    assert np.allclose(encoder.steps["cirr queries"][1], unit(query), atol=TOL)
    gallery = official_state(official, f"{HEAD}<image>\n Describe this image in one word:{TAIL}", [photo(2)])
    assert np.allclose(encoder.steps["cirr gallery"][2], unit(gallery), atol=TOL)
    fiq = "<image> change the style of this shirt to {}\n Desribe this modified shirt in one word based on its style:"
    a = official_state(official, HEAD + fiq.format("is toptee and red, has long sleeves 1") + TAIL, [photo(21)])
    b = official_state(official, HEAD + fiq.format("has long sleeves 1, is toptee and red") + TAIL, [photo(21)])
    assert np.allclose(encoder.steps["fashioniq toptee queries"][1], unit(a + b), atol=TOL)  # toptee says "shirt"
    shirt = official_state(
        official, f"{HEAD}<image>\n Describe this shirt in one word based on its style:{TAIL}", [photo(22)]
    )
    assert np.allclose(encoder.steps["fashioniq toptee gallery"][2], unit(shirt), atol=TOL)
    sentence = official_state(official, f"{HEAD} He said 'no'\nSummary above sentence in one word:{TAIL}", [])
    vectors = encoder.steps["sts STSBenchmark"]
    assert np.isclose(vectors @ unit(sentence), 1.0, atol=TOL).any()

    # A rerun embeds nothing: every vector comes from the cache, FashionIQ's sums too.
    cache = cached_embedder.cache
    misses = cache.misses
    again = {
        task: run_task(task, Encoder(cached_embedder), load_task_data(task, source)) for task in ("cirr", "fashioniq")
    }
    assert cache.misses == misses and cache.hits > 0
    assert (
        again["cirr"].metrics == results["cirr"].metrics and again["fashioniq"].metrics == results["fashioniq"].metrics
    )


def test_last_states_normalised_equal_the_fast_path(embedder: E5VEmbedder) -> None:
    from e5v.model import runner

    loaded = embedder._loaded
    prompts = [embedder.prompts.wrap(composed.CIRR_PROMPTS["composed"].replace("<sent>", t)) for t in ("a", "bb cc")]
    pixels = [runner.process_images(loaded, [ImageLoader().load(photo(i), 0)]) for i in (0, 5)]
    batch = runner.tokenize(loaded, prompts, pixels)
    with torch.inference_mode():
        raw = last_states(loaded, batch)
        fast = runner.forward(loaded, batch)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), fast, atol=1e-6)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))


def test_i2i_draws_each_caption_and_retrieves_image_to_image(data_dir: Path, embedder: E5VEmbedder) -> None:
    font = load_font()
    drawn = render_text("a white dog runs across the snow towards its owner " * 3, font)
    assert drawn.size == (800, 400) and drawn.mode == "RGB"
    pixels = np.asarray(drawn)
    dark_rows = np.flatnonzero((pixels < 128).any(axis=(1, 2)))
    assert 0 < dark_rows.min() < 200 < dark_rows.max() < 400  # several lines, centred
    assert np.asarray(render_text("x" * 200, font)).min() < 128  # an unbreakable word still draws, no hang
    captions = RenderedCaptions(["one", "two"], font)
    assert len(captions) == 2 and [im.size for im in captions[0:2]] == [(800, 400)] * 2
    encoder = Recording(embedder)
    result = run_task("i2i-flickr30k", encoder, load_task_data("i2i-flickr30k", DataSource(data_dir), limit=2))
    assert result.counts == {"images": 2, "captions": 10}
    assert set(encoder.steps) == {"i2i-flickr30k caption images", "i2i-flickr30k images"}
    drawn_vector = embedder.embed_images([render_text("photo 1 caption 4", font)])[0]
    assert np.allclose(encoder.steps["i2i-flickr30k caption images"][9], drawn_vector, atol=TOL)
    assert "t2i R@1" in result.metrics and PAPER["i2i-flickr30k"] == {"t2i R@1": 79.5}


def test_local_copies_load_in_every_layout(data_dir: Path, tmp_path: Path) -> None:
    source = DataSource(data_dir)
    assert len(source.dataset("royokong/flickr30k_test", "test")) == 4  # Parquet, Hub layout
    assert len(source.dataset("royokong/cirr_imgs", "test")) == 4  # Parquet, one of two splits
    assert len(source.dataset("royokong/coco_test", "test")) == 3  # save_to_disk DatasetDict
    flat = tmp_path / "flickr30k_test"  # DATA_DIR/NAME, a split saved on its own
    flickr_like(5, 2).save_to_disk(str(flat))
    assert len(DataSource(tmp_path).dataset("royokong/flickr30k_test", "test")) == 2
    assert source.senteval() == data_dir / "SentEval" / "data" / "downstream"
    with pytest.raises(DatasetUnavailableError, match="has the splits \\['val'\\], not 'test'"):
        source.dataset("royokong/cirr_val", "test")


def test_missing_data_offline_names_what_to_download(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    with pytest.raises(DatasetUnavailableError) as raised:
        DataSource(tmp_path).dataset("royokong/flickr30k_test", "test")
    message = str(raised.value)
    assert "HF_HUB_OFFLINE=1" in message
    assert (
        f"hf download royokong/flickr30k_test --repo-type dataset --local-dir {tmp_path}/royokong/flickr30k_test"
        in message
    )
    with pytest.raises(DatasetUnavailableError, match=r"hf download princeton-nlp/datasets-for-simcse senteval\.tar"):
        DataSource(tmp_path).senteval()
    assert main(["eval", "paper", "--data-dir", str(tmp_path), "--model", str(tmp_path / "never-loaded")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("e5v eval: error: dataset royokong/flickr30k_test (split 'test') is not available")
    assert len(err.splitlines()) == 1
    # everything else the table needs is named in the same line, each dataset once
    others = "royokong/coco_test, royokong/cirr_val, royokong/cirr_imgs, royokong/cirr_test, royokong/fashioniq_val"
    assert f"Also not available: {others}, royokong/fashioniq_val_imgs (`hf download` each into {tmp_path}/NAME" in err
    assert err.rstrip().endswith("SentEval's STS files (`e5v eval sts` says how to get them)")


def test_an_unreachable_hub_is_one_fast_line(tmp_path: Path) -> None:
    """Offline mode off, the Hub on a closed loopback port: no retries, one line naming the fix."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{port}", XDG_CACHE_HOME=str(tmp_path))
    command = [sys.executable, "-m", "e5v", "eval", "cirr", "--model", "never-loaded"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("e5v eval: error: dataset royokong/cirr_val (split 'val') is not available")
    assert "HF_HUB_OFFLINE=1 reads it from there" in result.stderr
    assert "Also not available: royokong/cirr_imgs" in result.stderr


def test_e5v_eval_paper_end_to_end(data_dir: Path, tiny_path: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "paper.json"
    args = ["eval", "paper", "i2i-flickr30k", "--data-dir", str(data_dir), "--model", str(tiny_path)]
    args += ["--cache", str(tmp_path / "cache"), "--output", str(output), "--limit", "2", "--batch-size", "4"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert err.splitlines()[0] == f"wrote the report to {output}"
    assert f"embedding cache: {tmp_path / 'cache'}" in err
    lines = out.splitlines()
    assert lines[0].split() == ["task", "metric", "e5v", "paper", "MTEB"]
    row = next(line.split() for line in lines if line.startswith("flickr30k") and " t2i R@1 " in line)
    assert row[-2:] == ["79.50", "80.60"]
    assert ["cirr-test", "R@50", "-", "93.54", "-"] in [line.split() for line in lines]  # scored by the server
    assert ["fashioniq", "avg", "R@10", "100.00", "31.80", "-"] in [line.split() for line in lines]
    assert any(line.startswith("cirr-test: submission written to") for line in lines)
    report = json.loads(output.read_text())
    tasks = report["results"]["base"]
    assert list(tasks) == ["flickr30k", "coco", "cirr", "cirr-test", "fashioniq", "sts", "i2i-flickr30k"]
    assert tasks["flickr30k"]["counts"] == {"images": 2, "captions": 10}
    assert report["paper"]["sts"] == {"avg": 86.0} and report["settings"]["base"]["model"] == str(tiny_path)
    submission = tmp_path / "paper.cirr-test.json"
    assert tasks["cirr-test"]["files"] == {"submission": str(submission)} and submission.is_file()
    # the rerun embeds nothing and finds the same numbers
    assert main(args) == 0
    assert json.loads(output.read_text())["results"] == report["results"]
