"""The prompts the evaluation harness uses equal the official evaluation's, character for
character. The official strings are built below as kongds/E5-V's ``retrieval.py`` and
``eval_sts.py`` build them (their code, transcribed), and checked against the method notes'
table (shared/docs/e5v-method.md) written out literally."""

from __future__ import annotations

import pytest

from e5v.core.prompts import PRESETS, fill
from e5v.evaluation import composed, image_text, sts

# retrieval.py
llama3_template = (
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
)


def official_retrieval_prompts(data: str, fiq_data_type: str | None = None) -> tuple[str, str]:
    """(gallery/image prompt, query prompt) as retrieval.py's main() builds them for E5-V."""
    if data in ("flickr30k", "coco"):
        return (
            llama3_template.format("<image>\nSummary above image in one word: "),
            llama3_template.format("<sent>\nSummary above sentence in one word: "),
        )
    if data == "fashioniq":
        fiq_data_name = fiq_data_type
        if fiq_data_type == "toptee":
            fiq_data_name = "shirt"
        img_prompt = f"[INST] <image>\n Describe this {fiq_data_name} in one word based on its style: [/INST]"
        text_img_prompt = (
            f"[INST] <image> change the style of this {fiq_data_name} to <sent>\n Desribe this modified "
            f"{fiq_data_name} in one word based on its style: [/INST]"
        )
    else:
        img_prompt = "[INST] <image>\n Describe this image in one word: [/INST]"
        text_img_prompt = '[INST] <image>Modify this image with "<sent>", desribe modified image in one word: [/INST]'
    img_prompt = img_prompt.replace("[INST] ", "").replace(" [/INST]", "")
    text_img_prompt = text_img_prompt.replace("[INST] ", "").replace(" [/INST]", "")
    return llama3_template.format(img_prompt), llama3_template.format(text_img_prompt)


def official_sts_prompt(tokens: list[str]) -> str:
    """eval_sts.py's batcher on one SentEval sentence (E5-V: the Llama-3 template)."""
    template = "*sent_0*\nSummary_above_sentence_in_one_word:"
    template = template.replace("\\n", "\n")
    mllm_template = (
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
    )
    template = template.replace("_", " ").replace("*sep+*", "").replace("*cls*", "")
    s = " ".join(tokens)
    if len(s) > 0 and s[-1] not in ".?\"'":
        s += "."
    s = s.replace('"', "'")
    if len(s) > 0 and s[-1] == "?":
        s = s[:-1] + "."
    return mllm_template.format(" " + template.replace("*sent 0*", s).strip())


def harness(body: str, text: str = "") -> str:
    return PRESETS["e5v"].wrap(fill(body, text))


EDIT = 'has two dogs, "bigger" and brown?'


def test_flickr30k_and_coco_prompts_are_the_officials() -> None:
    image, text = official_retrieval_prompts("flickr30k")
    assert harness(image_text.PROMPTS["image"]) == image
    assert harness(image_text.PROMPTS["text"], "A dog runs.") == text.replace("<sent>", "A dog runs.")
    assert official_retrieval_prompts("coco") == (image, text)


def test_cirr_prompts_are_the_officials() -> None:
    image, query = official_retrieval_prompts("cirr")
    assert harness(composed.CIRR_PROMPTS["image"]) == image
    assert harness(composed.CIRR_PROMPTS["composed"], EDIT) == query.replace("<sent>", EDIT)


@pytest.mark.parametrize("category", ["dress", "shirt", "toptee"])
def test_fashioniq_prompts_are_the_officials_toptee_saying_shirt(category: str) -> None:
    image, query = official_retrieval_prompts("fashioniq", category)
    prompts = composed.fashioniq_prompt_set(category)
    assert harness(prompts.image) == image
    text = composed.fashioniq_text(["is red.", " has long sleeves? "])
    assert harness(prompts.composed, text) == query.replace("<sent>", text)
    if category == "toptee":
        assert "toptee" not in harness(prompts.composed, text) and "this shirt" in harness(prompts.image)


def test_the_prompt_bodies_are_the_method_notes_table() -> None:
    assert image_text.PROMPTS == {
        "text": "<sent>\nSummary above sentence in one word: ",
        "image": "<image>\nSummary above image in one word: ",
    }
    assert composed.CIRR_PROMPTS == {
        "composed": '<image>Modify this image with "<sent>", desribe modified image in one word:',
        "image": "<image>\n Describe this image in one word:",
    }
    dress = composed.fashioniq_prompt_set("dress")
    assert dress.image == "<image>\n Describe this dress in one word based on its style:"
    assert dress.composed == (
        "<image> change the style of this dress to <sent>\n Desribe this modified dress in one word based on its style:"
    )
    assert composed.FASHIONIQ_PROMPT_WORD == {"dress": "dress", "shirt": "shirt", "toptee": "shirt"}
    assert harness(sts.STS_TEXT_PROMPT, "A man plays.") == (
        "<|start_header_id|>user<|end_header_id|>\n\n A man plays.\nSummary above sentence in one word:"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
    )


@pytest.mark.parametrize(
    ("tokens", "sentence"),
    [
        (["A", "man", "is", "playing", "a", "flute"], "A man is playing a flute."),
        (["Is", "it", "raining", "?"], "Is it raining ."),
        (["He", "said", '"', "no", '"'], "He said ' no '"),
        (['"Stop"', "now", "?"], "'Stop' now ."),
        (["It", "is", "done", "."], "It is done ."),
        (["ends", "with", "'"], "ends with '"),
        ([], ""),
    ],
)
def test_sts_sentences_and_prompts_are_the_officials(tokens: list[str], sentence: str) -> None:
    assert sts.sts_sentence(tokens) == sentence
    assert harness("<sent>", sts.sts_body(sentence)) == official_sts_prompt(tokens)
    if sentence:  # the preset the harness embeds with gives the same prompt
        assert harness(sts.STS_TEXT_PROMPT, sentence) == official_sts_prompt(tokens)


def test_fashioniq_query_text_strips_and_joins_in_both_orders() -> None:
    captions = ["is shiny and silver with shorter sleeves.", "fit and flare?, "]
    assert composed.fashioniq_text(captions) == "is shiny and silver with shorter sleeves, fit and flare"
    assert composed.fashioniq_text(captions[::-1]) == "fit and flare, is shiny and silver with shorter sleeves"
    # the official expression, verbatim
    assert composed.fashioniq_text(captions) == ", ".join([cc.strip(".?, ") for cc in captions])
