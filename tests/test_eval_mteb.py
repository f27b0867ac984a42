"""mteb.evaluate accepts e5v's model object, offline, on MTEB's own task classes fed local data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

mteb = pytest.importorskip("mteb")
datasets = pytest.importorskip("datasets")

from e5v.evaluation.mteb import E5VMTEBModel  # noqa: E402


def run(task, embedder, predictions=None):
    """MTEB's scores of ``task`` on the data set in it (``predictions``: where MTEB saves its
    query-document scores)."""
    task.data_loaded = True  # the local data below instead of the hub
    model = E5VMTEBModel(embedder)
    result = mteb.evaluate(model, task, cache=None, show_progress_bar=False, prediction_folder=predictions)
    return result.task_results[0].scores[task.metadata.eval_splits[0]][0]


def test_sts12_scores_with_the_sts_prompt(embedder) -> None:
    first = ["a man plays a guitar", "a dog runs in the park", "the sky is blue", "two kids eat apples", "a horse"]
    second = ["someone plays music", "a cat sleeps on a sofa", "the sky is clear", "children eating fruit", "a car"]
    gold = [4.0, 1.0, 4.5, 3.5, 0.5]
    task = mteb.get_task("STS12")
    task.dataset = {"test": datasets.Dataset.from_dict({"sentence1": first, "sentence2": second, "score": gold})}
    scores = run(task, embedder)
    cosines = (embedder.embed(first, prompts="e5v-sts") * embedder.embed(second, prompts="e5v-sts")).sum(axis=1)
    assert scores["cosine_spearman"] == pytest.approx(spearmanr(cosines, gold).statistic, abs=1e-4)
    plain = (embedder.embed_texts(first) * embedder.embed_texts(second)).sum(axis=1)
    assert not np.allclose(cosines, plain)  # so the check above tells the presets apart


def test_flickr30k_text_to_image_scores_as_e5v_does(embedder, photos, tmp_path) -> None:
    images = [photos[name].convert("RGB").resize((48, 36)) for name in ("cat", "astronaut", "rocket", "coffee")]
    texts = ["a cat", "a rocket", "a cup of coffee"]
    relevant = {"q0": {"d0": 1}, "q1": {"d2": 1}, "q2": {"d3": 1}}
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
    corpus = datasets.Dataset.from_dict({"id": [f"d{i}" for i in range(4)], "image": images}, features=features)
    queries = datasets.Dataset.from_dict({"id": ["q0", "q1", "q2"], "text": texts})
    task = mteb.get_task("Flickr30kT2IRetrieval")
    split = task.metadata.eval_splits[0]
    task.dataset = {
        "default": {split: {"corpus": corpus, "queries": queries, "relevant_docs": relevant, "top_ranked": None}}
    }
    scores = run(task, embedder, tmp_path)
    ours = embedder.embed_texts(texts) @ embedder.embed_images(images).T
    saved = json.loads((tmp_path / "Flickr30kT2IRetrieval_predictions.json").read_text())["default"][split]
    assert np.allclose([[saved[f"q{q}"][f"d{d}"] for d in range(4)] for q in range(3)], ours, atol=1e-5)
    top = ours.argmax(axis=1)
    assert scores["recall_at_1"] == pytest.approx(np.mean(top == [0, 2, 3]), abs=1e-4)  # MTEB keeps 5 decimals


def test_cirr_composed_queries_score_with_the_papers_cirr_prompts(embedder, photos, tmp_path) -> None:
    """MTEB's own saved scores of an image+text -> image task equal e5v's composed query
    against the CIRR gallery prompt (not the default image prompt)."""
    from e5v.core.prompts import GALLERY_PROMPT

    images = [photos[name].convert("RGB").resize((40, 30)) for name in ("cat", "astronaut", "rocket", "coffee")]
    edits = ["make it a dog", "add a full moon"]
    corpus = datasets.Dataset.from_dict(
        {"id": [f"d{i}" for i in range(4)], "image": images},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()}),
    )
    queries = datasets.Dataset.from_dict(
        {"id": ["q0", "q1"], "text": edits, "image": [images[0], images[2]]},
        features=datasets.Features(
            {"id": datasets.Value("string"), "text": datasets.Value("string"), "image": datasets.Image()}
        ),
    )
    task = mteb.get_task("CIRRIT2IRetrieval")
    relevant = {"q0": {"d1": 1}, "q1": {"d3": 1}}
    task.dataset = {
        "default": {"test": {"corpus": corpus, "queries": queries, "relevant_docs": relevant, "top_ranked": None}}
    }
    run(task, embedder, tmp_path)
    saved = json.loads((tmp_path / "CIRRIT2IRetrieval_predictions.json").read_text())["default"]["test"]
    theirs = np.array([[saved[q][f"d{i}"] for i in range(4)] for q in ("q0", "q1")])
    composed = embedder.embed_composed([images[0], images[2]], edits)
    ours = composed @ embedder.embed_images(images, prompt=GALLERY_PROMPT).T
    assert np.allclose(theirs, ours, atol=1e-5)
    assert not np.allclose(theirs, composed @ embedder.embed_images(images).T, atol=1e-3)
