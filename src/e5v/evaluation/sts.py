"""STS12-16, STS-B and SICK-R, as the official ``eval_sts.py`` runs them on SentEval's files.

Each sentence is SentEval's tokens joined by spaces, then: a ``.`` is appended unless it
ends in ``.``, ``?``, ``"`` or ``'``; every ``"`` becomes ``'``; a final ``?`` becomes
``.``. It is embedded with the STS prompt (``" " + s + "\\nSummary above sentence in one
word:"`` in the Llama-3 template). The score is Spearman's correlation of the cosines
with the gold scores, x 100: over all pairs of a year's subsets pooled for STS12-16
(SentEval's "all"), over the test set for STS-B and SICK-R; the paper's figure is the
average of the seven.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from e5v.core.prompts import STS_TEXT_PROMPT, TEXT_PLACEHOLDER, fill
from e5v.errors import ConfigurationError, InvalidInputError
from e5v.evaluation.encoder import Encoder
from e5v.evaluation.metrics import spearman
from e5v.evaluation.results import TaskResult

__all__ = ["STS_SUBSETS", "STS_TASKS", "read_sts", "run_sts", "sts_body", "sts_sentence"]

STS_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness")
#: SentEval's subsets of each year (STS13 without SMT, as SentEval ships it).
STS_SUBSETS = {
    "STS12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "STS13": ("FNWN", "headlines", "OnWN"),
    "STS14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "STS15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "STS16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}
#: The official template before its ``*sent 0*`` is filled (``eval_sts.py``'s default, underscores as spaces).
_OFFICIAL_TEMPLATE = "*sent 0*\nSummary above sentence in one word:"

Pairs = tuple[list[list[str]], list[list[str]], list[float]]


def sts_sentence(tokens: Sequence[str]) -> str:
    """SentEval's tokens of one sentence, preprocessed as the official batcher does."""
    s = " ".join(tokens)
    if len(s) > 0 and s[-1] not in ".?\"'":
        s += "."
    s = s.replace('"', "'")
    if len(s) > 0 and s[-1] == "?":
        s = s[:-1] + "."
    return s


def sts_body(sentence: str) -> str:
    """The prompt BODY of a preprocessed sentence, built as the official batcher builds it."""
    return " " + _OFFICIAL_TEMPLATE.replace("*sent 0*", sentence).strip()


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidInputError(f"cannot read SentEval file {str(path)!r}: {exc.strerror or exc}") from None


def _year(folder: Path, subsets: Sequence[str]) -> list[Pairs]:
    out = []
    for subset in subsets:
        inputs = folder / f"STS.input.{subset}.txt"
        rows = []
        for number, line in enumerate(_lines(inputs), 1):
            fields = line.split("\t")
            if len(fields) != 2:
                raise InvalidInputError(f"{inputs}:{number}: expected two tab-separated sentences")
            rows.append(fields)
        gold = _lines(folder / f"STS.gs.{subset}.txt")
        if len(gold) != len(rows):
            raise InvalidInputError(f"{folder}: {len(rows)} sentence pairs but {len(gold)} scores in {subset}")
        kept = [(a.split(), b.split(), float(g)) for (a, b), g in zip(rows, gold) if g != ""]
        out.append(([k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]))
    return out


def _columns(path: Path, a: int, b: int, score: int, skip_header: bool) -> Pairs:
    first, second, gold = [], [], []
    for number, line in enumerate(_lines(path), 1):
        if skip_header and number == 1:
            continue
        fields = line.strip().split("\t")
        try:
            first.append(fields[a].split())
            second.append(fields[b].split())
            gold.append(float(fields[score]))
        except (IndexError, ValueError):
            raise InvalidInputError(f"{path}:{number}: not a SentEval line (sentence, sentence, score)") from None
    return first, second, gold


def read_sts(root: Path, task: str) -> list[Pairs]:
    """A task's subsets as (tokens of the first sentences, of the second, gold scores), read
    from SentEval's folder ``root`` (holding ``STS/`` and ``SICK/``) as SentEval reads them."""
    if task in STS_SUBSETS:
        return _year(root / "STS" / f"{task}-en-test", STS_SUBSETS[task])
    if task == "STSBenchmark":
        return [_columns(root / "STS" / "STSBenchmark" / "sts-test.csv", 5, 6, 4, skip_header=False)]
    if task == "SICKRelatedness":
        return [_columns(root / "SICK" / "SICK_test_annotated.txt", 1, 2, 3, skip_header=True)]
    raise ConfigurationError(f"unknown STS task {task!r}; choose one of {STS_TASKS}")


def _embed(encoder: Encoder, sentences: list[str], desc: str) -> np.ndarray:
    """Vectors of preprocessed sentences under the official STS prompt. The preset equals
    the official BODY for any sentence that neither starts nor ends with whitespace, as a
    preprocessed one never does, except the empty one; those go with their official BODY."""
    bodies = [sts_body(s) for s in sentences]
    plain = [i for i, (s, body) in enumerate(zip(sentences, bodies)) if body == fill(STS_TEXT_PROMPT, s)]
    other = sorted(set(range(len(sentences))) - set(plain))
    out = np.empty((len(sentences), encoder.embedder.dimension), dtype=np.float32)
    out[plain] = encoder.texts([sentences[i] for i in plain], STS_TEXT_PROMPT, desc)
    if other:
        out[other] = encoder.texts([bodies[i] for i in other], TEXT_PLACEHOLDER, desc)
    return out


def run_sts(encoder: Encoder, root: Path, *, tasks: Sequence[str] = STS_TASKS, limit: int | None = None) -> TaskResult:
    """Spearman x 100 of each task and their average (``limit``: first pairs of each subset)."""
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    for task in tasks:
        cosines, gold = [], []
        for first, second, scores in read_sts(root, task):
            if limit is not None:
                first, second, scores = first[:limit], second[:limit], scores[:limit]
            sentences = [sts_sentence(tokens) for tokens in first + second]
            unique = list(dict.fromkeys(sentences))
            vectors = _embed(encoder, unique, f"sts {task}")
            row = {s: i for i, s in enumerate(unique)}
            a = vectors[[row[s] for s in sentences[: len(first)]]]
            b = vectors[[row[s] for s in sentences[len(first) :]]]
            cosines.extend(np.sum(a * b, axis=1).tolist())
            gold.extend(scores)
        metrics[task] = 100 * spearman(np.asarray(cosines), np.asarray(gold))
        counts[f"{task} pairs"] = len(gold)
    metrics["avg"] = float(np.mean([metrics[task] for task in tasks]))
    return TaskResult("sts", metrics, counts)
