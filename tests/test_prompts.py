"""The paper's prompts, to the character (shared/docs/e5v-method.md)."""

from __future__ import annotations

import pytest

from e5v.core import prompts
from e5v.core.prompts import PRESETS, PromptSet, fashioniq_prompts, fill, get_prompts

CHAT = (
    "<|start_header_id|>user<|end_header_id|>\n\n{BODY}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
)


def test_default_prompts_are_the_papers():
    default = get_prompts(None)
    assert default.chat_template == CHAT
    assert default.text == "<sent>\nSummary above sentence in one word: "
    assert default.image == "<image>\nSummary above image in one word: "
    assert default.composed == '<image>Modify this image with "<sent>", desribe modified image in one word:'
    assert default.wrap(fill(default.text, "A dog")) == (
        "<|start_header_id|>user<|end_header_id|>\n\nA dog\nSummary above sentence in one word: <|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n \n"
    )


def test_presets():
    assert PRESETS["cirr"].image == "<image>\n Describe this image in one word:"
    assert PRESETS["e5v-sts"].text == " <sent>\nSummary above sentence in one word:"
    base = PRESETS["llava-next-base"]
    assert base.wrap(fill(base.text, "hi")) == "hi\nSummary of the above sentence in one word: "
    assert base.image == "<image>\nSummary of the above image in one word: "
    dress = fashioniq_prompts("dress")
    assert dress.image == "<image>\n Describe this dress in one word based on its style:"
    assert dress.composed == (
        "<image> change the style of this dress to <sent>\n Desribe this modified dress in one word based on its style:"
    )
    assert prompts.INTERLEAVED_PROMPT == "<sent>\nSummary above content in one word: "


def test_bad_prompts_are_refused():
    with pytest.raises(ValueError, match="needs 1 '<sent>'"):
        PromptSet(name="x", text="no placeholder")
    with pytest.raises(ValueError, match="needs 0 '<sent>' and 1 '<image>'"):
        PromptSet(name="x", image="<image><image>")
    with pytest.raises(ValueError, match="exactly once"):
        PromptSet(name="x", chat_template="no body")
    with pytest.raises(ValueError, match="unknown prompt preset"):
        get_prompts("nope")
