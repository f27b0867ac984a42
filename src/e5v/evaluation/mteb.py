"""A model object for ``mteb.evaluate``: E5-V through e5v, on any transformers 5.x.

::

    import mteb
    from e5v.evaluation.mteb import E5VMTEBModel

    model = E5VMTEBModel("royokong/e5-v", dtype="bfloat16")
    mteb.evaluate(model, mteb.get_tasks(tasks=["Flickr30kT2IRetrieval", "STS12"]))

Inputs get the paper's prompts, whatever instruction a task carries (E5-V takes none):
a text the text prompt, an image the image prompt, a query with both a text and an image
the composed prompt, a document with both ONE interleaved vector (image, then text).
Tasks of type ``STS`` use the STS evaluation's text prompt (``e5v-sts``) and CIRR's the
CIRR gallery prompt (``cirr``); ``task_prompts`` maps other task names or types to presets.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from e5v.core.embedder import E5VEmbedder
from e5v.core.inputs import Composed, Interleaved
from e5v.optional import require

require("mteb", "eval")

from mteb.models.abs_encoder import AbsEncoder  # noqa: E402
from mteb.models.model_meta import ModelMeta, ScoringFunction  # noqa: E402
from mteb.types import PromptType  # noqa: E402

__all__ = ["DEFAULT_TASK_PROMPTS", "E5VMTEBModel", "model_meta"]

#: Prompt presets by MTEB task name or task type (a name wins).
DEFAULT_TASK_PROMPTS: dict[str, str] = {"STS": "e5v-sts", "CIRRIT2IRetrieval": "cirr"}


def model_meta(embedder: E5VEmbedder) -> ModelMeta:
    """MTEB's metadata for an embedder: its checkpoint, revision and dimension; results are kept
    apart from other implementations of the same checkpoint (``experiment_kwargs``)."""
    from e5v import __version__

    name = embedder.model_name if "/" in embedder.model_name else f"local/{embedder.model_name}"
    if Path(name).is_absolute():
        name = f"local/{Path(name).name}"
    return ModelMeta(
        loader=None,
        name=name,
        revision=embedder.revision,
        release_date=None,
        languages=["eng-Latn"],
        n_parameters=None,
        memory_usage_mb=None,
        max_tokens=None,
        embed_dim=embedder.dimension,
        license=None,
        open_weights=True,
        public_training_code="https://github.com/kongds/E5-V",
        public_training_data=None,
        framework=["PyTorch", "Transformers"],
        reference=None,
        similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=False,
        training_datasets=None,
        modalities=["image", "text"],
        experiment_kwargs={"implementation": f"e5v-{__version__}", "dtype": str(embedder.dtype).removeprefix("torch.")},
    )


class E5VMTEBModel(AbsEncoder):
    """An MTEB encoder for text, image and image-text tasks (MTEB, MIEB).

    ``model`` is a hub id, a checkpoint folder or an :class:`~e5v.E5VEmbedder`; the other
    keyword arguments go to :class:`~e5v.E5VEmbedder` (``dtype``, ``max_image_tiles``,
    ``adapter``, ``cache`` ...).
    """

    def __init__(
        self,
        model: str | Path | E5VEmbedder = "royokong/e5-v",
        revision: str | None = None,
        *,
        device: str | None = None,
        task_prompts: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        if isinstance(model, E5VEmbedder):
            self.embedder = model
        else:
            self.embedder = E5VEmbedder(model, revision=revision, device=device, **options)
        self.task_prompts = dict(DEFAULT_TASK_PROMPTS if task_prompts is None else task_prompts)
        self.mteb_model_meta = model_meta(self.embedder)

    def preset_for(self, task_metadata: Any) -> str | None:
        """The prompt preset of a task (``None``: the embedder's own)."""
        return self.task_prompts.get(task_metadata.name, self.task_prompts.get(task_metadata.type))

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """One unit vector per input of the DataLoader's batches, in order."""
        preset = self.preset_for(task_metadata)
        query = prompt_type == PromptType.query
        out = [np.empty((0, self.embedder.dimension), dtype=np.float32)]
        for batch in inputs:
            texts, images = batch.get("text"), batch.get("image")
            size = len(texts if texts is not None else images if images is not None else [])
            if size == 0:
                raise ValueError(f"{task_metadata.name}: a batch with neither 'text' nor 'image': {sorted(batch)}")
            items = [
                _item(None if texts is None else texts[i], None if images is None else images[i], query)
                for i in range(size)
            ]
            out.append(self.embedder.embed(items, prompts=preset))
        return np.concatenate(out)


def _item(text: str | None, image: Any, query: bool) -> Any:
    """A text, an image, or both: a composed query or an interleaved document."""
    if image is not None and text:
        return Composed(image, text) if query else Interleaved([image, text])
    if image is not None:
        return image
    return "" if text is None else str(text)
