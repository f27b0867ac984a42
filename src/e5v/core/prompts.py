"""E5-V's prompt templates, to the character, and named presets.

A prompt is a BODY with placeholders ``<sent>`` (the text) and ``<image>`` (one image),
wrapped in a chat template. The defaults are the paper's (model card of
``royokong/e5-v``), including the composed-query prompt's "desribe" typo, with which
the model was evaluated.

Substitution is literal and single-pass: text from an input is never re-read as a
template.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from e5v.errors import ConfigurationError
from e5v.model.vocabulary import IMAGE_TOKEN, LLAMA3_SPECIAL_TOKENS

__all__ = [
    "CHAT_TEMPLATE_LLAMA3",
    "COMPOSED_PROMPT",
    "GALLERY_PROMPT",
    "IMAGE_PROMPT",
    "IMAGE_TOKEN",
    "INTERLEAVED_PROMPT",
    "LLAMA3_SPECIAL_TOKENS",
    "PRESETS",
    "STS_TEXT_PROMPT",
    "TEXT_PLACEHOLDER",
    "TEXT_PROMPT",
    "PromptSet",
    "fashioniq_prompts",
    "get_prompts",
]

TEXT_PLACEHOLDER = "<sent>"
BODY_PLACEHOLDER = "{BODY}"

#: Llama-3 chat template; the tokenizer adds ``<|begin_of_text|>`` in front.
CHAT_TEMPLATE_LLAMA3 = (
    "<|start_header_id|>user<|end_header_id|>\n\n{BODY}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
)
TEXT_PROMPT = "<sent>\nSummary above sentence in one word: "
IMAGE_PROMPT = "<image>\nSummary above image in one word: "
COMPOSED_PROMPT = '<image>Modify this image with "<sent>", desribe modified image in one word:'
#: CIRR gallery images.
GALLERY_PROMPT = "<image>\n Describe this image in one word:"
#: The STS evaluation's text prompt: a leading space, no trailing space.
STS_TEXT_PROMPT = " <sent>\nSummary above sentence in one word:"
#: e5v's choice for interleaved text and images (the paper has none): the parts joined
#: by newlines, then the paper's summarising instruction naming the content.
INTERLEAVED_PROMPT = "<sent>\nSummary above content in one word: "


@dataclass(frozen=True)
class PromptSet:
    """The BODY templates for each kind of input, and the chat template around them."""

    name: str
    text: str = TEXT_PROMPT
    image: str = IMAGE_PROMPT
    composed: str = COMPOSED_PROMPT
    interleaved: str = INTERLEAVED_PROMPT
    chat_template: str = CHAT_TEMPLATE_LLAMA3

    def __post_init__(self) -> None:
        if self.chat_template.count(BODY_PLACEHOLDER) != 1:
            raise ConfigurationError(f"chat_template must contain {BODY_PLACEHOLDER} exactly once")
        check_body(self.text, "text")
        check_body(self.image, "image")
        check_body(self.composed, "composed")
        check_body(self.interleaved, "interleaved")

    def wrap(self, body: str) -> str:
        """Put a filled BODY into the chat template."""
        head, tail = self.chat_template.split(BODY_PLACEHOLDER)
        return head + body + tail

    def with_overrides(self, **bodies: str) -> PromptSet:
        """A copy with some BODY templates replaced (checked like the originals)."""
        return replace(self, **bodies)


_NEEDS = {
    "text": (1, 0),
    "image": (0, 1),
    "composed": (1, 1),
    "interleaved": (1, 0),
}


def check_body(body: str, kind: str) -> None:
    """Raise ``ValueError`` unless ``body`` has the placeholders a ``kind`` prompt needs."""
    sent, image = _NEEDS[kind]
    if body.count(TEXT_PLACEHOLDER) != sent or body.count(IMAGE_TOKEN) != image:
        raise ConfigurationError(
            f"a {kind} prompt needs {sent} {TEXT_PLACEHOLDER!r} and {image} {IMAGE_TOKEN!r} placeholder(s); "
            f"got {body!r}"
        )


def fill(body: str, text: str = "") -> str:
    """Replace ``<sent>`` in a BODY by ``text``, literally."""
    head, sep, tail = body.partition(TEXT_PLACEHOLDER)
    return head + text + tail if sep else body


def fashioniq_prompts(category: str) -> PromptSet:
    """FashionIQ's prompts for a garment ``category`` (``dress``, ``shirt``, ``toptee``)."""
    return PromptSet(
        name=f"fashioniq-{category}",
        image=f"<image>\n Describe this {category} in one word based on its style:",
        composed=(
            f"<image> change the style of this {category} to <sent>\n"
            f" Desribe this modified {category} in one word based on its style:"
        ),
    )


PRESETS: dict[str, PromptSet] = {
    "e5v": PromptSet(name="e5v"),
    # The paper's STS evaluation.
    "e5v-sts": PromptSet(name="e5v-sts", text=STS_TEXT_PROMPT),
    # CIRR composed retrieval: the gallery images use the "Describe this image" prompt.
    "cirr": PromptSet(name="cirr", image=GALLERY_PROMPT),
    # A plain LLaVA-NeXT base model without the chat template (weaker; never the default).
    "llava-next-base": PromptSet(
        name="llava-next-base",
        text="<sent>\nSummary of the above sentence in one word: ",
        image="<image>\nSummary of the above image in one word: ",
        interleaved="<sent>\nSummary of the above content in one word: ",
        chat_template=BODY_PLACEHOLDER,
    ),
}


def get_prompts(prompts: str | PromptSet | None) -> PromptSet:
    """Resolve a preset name, a :class:`PromptSet` or ``None`` (the paper's defaults)."""
    if prompts is None:
        return PRESETS["e5v"]
    if isinstance(prompts, PromptSet):
        return prompts
    try:
        return PRESETS[prompts]
    except KeyError:
        raise ConfigurationError(f"unknown prompt preset {prompts!r}; choose one of {sorted(PRESETS)}") from None
