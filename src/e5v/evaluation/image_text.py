"""Flickr30K and COCO 5k test (text->image, image->text) and I2I-Flickr30K, as the
official ``retrieval.py`` runs them.

Every caption is embedded with the text prompt, every image with the image prompt;
a caption's image is the row it came from (COCO: each image's first five captions).
Recall@1/5/10 is CLIP-style: a query is a hit when ANY of its correct items is in its top
k (text->image: its one image; image->text: any of its captions). I2I-Flickr30K draws each
caption as an image (:mod:`e5v.evaluation.render`) and embeds it with the image prompt.
"""

from __future__ import annotations

from typing import Any

from e5v.core.prompts import IMAGE_PROMPT, TEXT_PROMPT
from e5v.errors import InvalidInputError
from e5v.evaluation.encoder import Column, Encoder
from e5v.evaluation.metrics import hit_rate, positive_ranks
from e5v.evaluation.render import RenderedCaptions
from e5v.evaluation.results import TaskResult

__all__ = ["CAPTIONS_PER_IMAGE", "DATASETS", "KS", "PROMPTS", "captions_of", "run_image_text"]

#: Hub dataset and split of each task (columns ``image`` and ``text``, a list of captions).
DATASETS = {
    "flickr30k": ("royokong/flickr30k_test", "test"),
    "coco": ("royokong/coco_test", "test"),
    "i2i-flickr30k": ("royokong/flickr30k_test", "test"),
}
KS = (1, 5, 10)
#: COCO keeps each image's first five captions (Flickr30K has five).
CAPTIONS_PER_IMAGE = 5
#: Prompt BODYs: captions and images (I2I: the drawn captions take the image prompt too).
PROMPTS = {"text": TEXT_PROMPT, "image": IMAGE_PROMPT}


def captions_of(dataset: Any, task: str) -> list[list[str]]:
    """Each row's captions (COCO: the first five)."""
    rows = list(dataset.select_columns(["text"])["text"])
    for index, captions in enumerate(rows):
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise InvalidInputError(f"row {index} of {task}: column 'text' must be a non-empty list of captions")
    return [captions[:CAPTIONS_PER_IMAGE] for captions in rows] if task == "coco" else rows


def run_image_text(encoder: Encoder, dataset: Any, task: str, *, font: Any = None) -> TaskResult:
    """Both directions on ``dataset`` (the test split); ``task`` is ``flickr30k``, ``coco``
    or ``i2i-flickr30k`` (which needs ``font``, see :func:`e5v.evaluation.render.load_font`)."""
    captions = captions_of(dataset, task)
    flat = [caption for row in captions for caption in row]
    owner = [row for row, texts in enumerate(captions) for _ in texts]
    if task == "i2i-flickr30k":
        texts = encoder.images(RenderedCaptions(flat, font), PROMPTS["image"], f"{task} caption images")
    else:
        texts = encoder.texts(flat, PROMPTS["text"], f"{task} captions")
    images = encoder.images(Column(dataset, "image"), PROMPTS["image"], f"{task} images")
    first = 0
    of_image = []
    for row in captions:
        of_image.append(range(first, first + len(row)))
        first += len(row)
    t2i = positive_ranks(texts, images, [[row] for row in owner])
    i2t = positive_ranks(images, texts, of_image)
    metrics = {f"t2i R@{k}": 100 * hit_rate(t2i, k) for k in KS}
    metrics.update({f"i2t R@{k}": 100 * hit_rate(i2t, k) for k in KS})
    return TaskResult(task, metrics, {"images": len(images), "captions": len(flat)})
