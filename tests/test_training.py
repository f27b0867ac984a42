"""Contrastive LoRA training on the tiny checkpoint: loss, adapter, resume, CLI, merge, data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from e5v import E5VEmbedder
from e5v.errors import MissingDependencyError
from e5v.training import (
    PairData,
    Trainer,
    TrainingConfig,
    TrainingDataError,
    TrainingError,
    info_nce_loss,
    load_pairs,
)

# peft asks transformers for the old name of a property.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

SUBJECTS = ("dog", "cat", "fox", "car", "rocket", "coffee", "river", "jacket")
ROWS = [
    row
    for s in SUBJECTS
    for row in (
        (f"A {s} in the park.", f"The {s} is in the park.", "A parked car near the river."),
        (f"The quick {s}.", f"A quick {s} jumps.", "A cup of coffee on a wooden table."),
    )
]
STEPS = 12
SAVE_EVERY = 6


def write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("pairs") / "pairs.csv", ("anchor", "positive", "negative"), ROWS)


def config_for(tiny_path: Path, data: Path, output: Path, **changes: object) -> TrainingConfig:
    options: dict[str, object] = {
        "model": tiny_path,
        "data": data,
        "output_dir": output,
        "max_steps": STEPS,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup_steps": 0,
        "save_every": SAVE_EVERY,
        "gradient_checkpointing": False,
        "cpu": True,
    }
    options.update(changes)
    return TrainingConfig(**options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(tiny_path: Path, pairs_csv: Path, tmp_path_factory: pytest.TempPathFactory):
    trainer = Trainer(config_for(tiny_path, pairs_csv, tmp_path_factory.mktemp("run"), eval_data=pairs_csv))
    return trainer, trainer.train()


@pytest.fixture(scope="module")
def tuned(trained, tiny_path: Path) -> E5VEmbedder:
    return E5VEmbedder(tiny_path, batch_size=4, adapter=trained[1].output_dir)


# -- training -------------------------------------------------------------------------


def test_loss_falls_and_eval_improves(trained) -> None:
    result = trained[1]
    assert result.steps == STEPS and len(result.losses) == STEPS
    assert np.mean(result.losses[-3:]) < 0.5 * np.mean(result.losses[:3])
    before, after = result.evaluations[0], result.evaluations[-1]
    assert (before["step"], after["step"]) == (0, STEPS)
    assert after["mean_rank"] < before["mean_rank"]
    assert after["candidates"] == 2 * len(ROWS)


def test_output_layout(trained) -> None:
    output = trained[1].output_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "training_config.json"} <= {
        p.name for p in output.iterdir()
    }
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    saved = TrainingConfig.load(output / "training_config.json")
    assert saved.max_steps == STEPS and saved.lora_r == 64 and saved.temperature == 0.05
    adapter = load_file(output / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 2  # 2 layers x q/k/v/o/gate/up/down x (A, B)
    assert all(".language_model.layers." in key for key in adapter)


def test_adapter_reproduces_trained_text_embeddings(trained, tuned: E5VEmbedder) -> None:
    texts = [row[0] for row in ROWS[:6]] + ["A red rocket stands on the launch pad."]
    np.testing.assert_allclose(tuned.embed_texts(texts), trained[0].embed_texts(texts), atol=1e-5)


def test_adapter_changes_image_embeddings(embedder: E5VEmbedder, tuned: E5VEmbedder, photos) -> None:
    images = [photos["cat"], photos["rocket"]]
    assert np.abs(tuned.embed_images(images) - embedder.embed_images(images)).max() > 1e-3


def test_vision_tower_and_projector_untouched(tuned: E5VEmbedder, tiny_path: Path) -> None:
    saved = load_file(tiny_path / "model.safetensors")
    parts = {
        "vision_tower": tuned.model.model.vision_tower,
        "multi_modal_projector": tuned.model.model.multi_modal_projector,
    }
    for prefix, module in parts.items():
        state = module.state_dict()
        assert state
        for key, value in state.items():
            assert torch.equal(value, saved[f"{prefix}.{key}"]), f"{prefix}.{key} changed"


def test_positive_rises_relative_to_negatives(embedder: E5VEmbedder, tuned: E5VEmbedder) -> None:
    anchors, positives, negatives = (list(column) for column in zip(*ROWS))

    def margin(model: E5VEmbedder) -> float:
        a, p, n = model.embed_texts(anchors), model.embed_texts(positives), model.embed_texts(negatives)
        return float(np.mean(np.sum(a * p, axis=1) - np.sum(a * n, axis=1)))

    assert margin(tuned) > margin(embedder) + 0.1


def test_resume_continues_from_the_saved_step(trained, tiny_path: Path, pairs_csv: Path, tmp_path: Path) -> None:
    first_run = trained[1].output_dir
    checkpoint = first_run / f"checkpoint-{SAVE_EVERY}"
    resumed = Trainer(config_for(tiny_path, pairs_csv, tmp_path, resume=first_run / f"checkpoint-{SAVE_EVERY}"))
    assert resumed.step == SAVE_EVERY
    assert resumed.scheduler.last_epoch == SAVE_EVERY
    saved_optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    restored = resumed.optimizer.state_dict()["state"]
    for index, state in saved_optimizer["state"].items():
        assert torch.equal(restored[index]["exp_avg"], state["exp_avg"])
        assert int(restored[index]["step"]) == SAVE_EVERY
    result = resumed.train()
    assert result.steps == STEPS and result.losses[:SAVE_EVERY] == trained[1].losses[:SAVE_EVERY]
    np.testing.assert_allclose(result.losses[SAVE_EVERY:], trained[1].losses[SAVE_EVERY:], rtol=1e-4)
    final, expected = (
        load_file(tmp_path / "adapter_model.safetensors"),
        load_file(first_run / "adapter_model.safetensors"),
    )
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, atol=1e-5, rtol=1e-4)


def test_resume_refuses_a_different_batch_size(trained, tiny_path: Path, pairs_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="batch_size was 4, now 2"):
        Trainer(config_for(tiny_path, pairs_csv, tmp_path, batch_size=2, resume=trained[1].output_dir))


def test_too_few_rows_for_one_step(tiny_path: Path, pairs_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="fewer than one optimizer step"):
        Trainer(config_for(tiny_path, pairs_csv, tmp_path, batch_size=8, grad_accum=3))


def test_qlora_needs_bitsandbytes_and_cuda(tiny_path: Path, pairs_csv: Path, tmp_path: Path) -> None:
    with pytest.raises((MissingDependencyError, TrainingError), match=r"'bitsandbytes'.*pip install|needs a CUDA GPU"):
        Trainer(config_for(tiny_path, pairs_csv, tmp_path, load_in_4bit=True))


# -- CLI and merged checkpoint ---------------------------------------------------------


def test_cli_trains_and_merges(tiny_path: Path, tmp_path: Path, photos) -> None:
    data = write_csv(tmp_path / "nli.csv", ("sent0", "sent1", "hard_neg"), ROWS)
    output, merged = tmp_path / "adapter", tmp_path / "merged"
    e5v = Path(sys.executable).with_name("e5v")
    command = [str(e5v), "train", "--model", str(tiny_path), "--data", str(data), "--output", str(output)]
    command += ["--merge-to", str(merged), "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--cpu"]
    command += ["--warmup-steps", "1", "--symmetric"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stderr
    assert "trained 2 steps" in done.stdout and f"merged checkpoint: {merged}" in done.stdout
    assert json.loads((output / "training_config.json").read_text())["symmetric"] is True

    via_adapter = E5VEmbedder(tiny_path, batch_size=4, adapter=output)
    via_merged = E5VEmbedder(merged, batch_size=4)
    texts = ["A cat sleeps on a warm sofa.", "The quick brown fox."]
    np.testing.assert_allclose(via_merged.embed_texts(texts), via_adapter.embed_texts(texts), atol=1e-5)
    np.testing.assert_allclose(
        via_merged.embed_images([photos["coffee"]]), via_adapter.embed_images([photos["coffee"]]), atol=1e-5
    )
    base, saved = load_file(tiny_path / "model.safetensors"), load_file(merged / "model.safetensors")
    assert base.keys() == saved.keys()
    for key in base:
        if not key.startswith("language_model."):
            assert torch.equal(base[key], saved[key]), key
    changed = {key for key in base if not torch.equal(base[key], saved[key])}
    assert changed and all(key.endswith("_proj.weight") for key in changed)


def test_cli_reports_a_missing_column(tiny_path: Path, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "bad.csv", ("query", "positive"), [("a", "b")])
    from e5v.cli import main

    assert main(["train", "--model", str(tiny_path), "--data", str(data), "--output", str(tmp_path / "o")]) == 1


# -- data -------------------------------------------------------------------------------


def test_formats_and_nli_names_load_the_same(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    anchors, positives, negatives = (list(column) for column in zip(*ROWS))
    expected = PairData(anchors, positives, negatives, "")
    csv_path = write_csv(tmp_path / "d.csv", ("sent0", "sent1", "hard_neg"), ROWS)
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text("".join(json.dumps({"anchor": a, "positive": p, "negative": n}) + "\n" for a, p, n in ROWS))
    parquet_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"anchor": anchors, "positive": positives, "negative": negatives}), parquet_path)
    for path in (csv_path, jsonl_path, parquet_path):
        data = load_pairs(path)
        assert (data.anchors, data.positives, data.negatives) == (expected.anchors, positives, negatives), path
        assert data.source == str(path) and len(data) == len(ROWS)


def test_pairs_without_negatives_and_column_mapping(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "Who?", "answer": "Me.", "id": 1}\n\n{"question": "Why?", "answer": "So."}\n')
    data = load_pairs(path, {"anchor": "question", "positive": "answer"})
    assert (data.anchors, data.positives, data.negatives) == (["Who?", "Why?"], ["Me.", "So."], None)
    assert data.rows([1]) == (["Why?"], ["So."], None)


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (("query", "positive"), [("a", "b")], r"no anchor column \(looked for 'anchor' or 'sent0'; the file has"),
        (("anchor", "text"), [("a", "b")], "no positive column"),
        (("anchor", "positive"), [], "no rows"),
        (("anchor", "positive"), [("a", " ")], "row 1 has no text in column 'positive'"),
        (("anchor", "positive"), [("a", "b"), ("<image> c", "d")], "row 2, column 'anchor' contains the reserved"),
    ],
)
def test_bad_data_is_reported(tmp_path: Path, header, rows, message: str) -> None:
    path = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(TrainingDataError, match=message):
        load_pairs(path)


def test_bad_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match=r"unknown data format '\.txt'"):
        load_pairs(tmp_path / "d.txt")
    with pytest.raises(TrainingDataError, match="no such file"):
        load_pairs(tmp_path / "missing.csv")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"anchor": "a", "positive": "b"}\n{"anchor": \n')
    with pytest.raises(TrainingDataError, match="line 2 is not valid JSON"):
        load_pairs(broken)
    with pytest.raises(TrainingDataError, match="no negative column"):
        load_pairs(write_csv(tmp_path / "d.csv", ("anchor", "positive"), [("a", "b")]), {"negative": "neg"})


# -- loss ---------------------------------------------------------------------------------


def unit(rows: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, 16, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_info_nce_with_hard_negatives() -> None:
    a, p, n = unit(5, 0), unit(5, 1), unit(5, 2)
    logits = a @ torch.cat([p, n]).T / 0.05
    expected = -torch.log_softmax(logits, dim=1).diagonal().mean()
    torch.testing.assert_close(info_nce_loss(a, p, n), expected)


def test_symmetric_is_the_clip_loss() -> None:
    a, p = unit(6, 3), unit(6, 4)
    similarity = a @ p.T / 0.1
    clip = (
        -torch.log_softmax(similarity, 1).diagonal().mean() - torch.log_softmax(similarity, 0).diagonal().mean()
    ) / 2
    torch.testing.assert_close(info_nce_loss(a, p, temperature=0.1, symmetric=True), clip)


def _two_process_loss(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from e5v.training.loss import gather_with_grad

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    a, p, n = (unit(8, seed).requires_grad_() for seed in (0, 1, 2))
    half = slice(4 * rank, 4 * rank + 4)
    loss = info_nce_loss(a[half], p[half], n[half], symmetric=True, gather=gather_with_grad, rank=rank)
    (loss / 2).backward()  # each process's loss over its anchors; DDP averages the gradients
    grads = [t.grad.clone() for t in (a, p, n)]
    for grad in grads:
        dist.all_reduce(grad)
    torch.save({"loss": loss.detach(), "grads": grads}, f"{out}/rank{rank}.pt")
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


def test_gathered_loss_equals_the_single_process_loss(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_two_process_loss, args=(port, str(tmp_path)), nprocs=2)
    a, p, n = (unit(8, seed).requires_grad_() for seed in (0, 1, 2))
    whole = info_nce_loss(a, p, n, symmetric=True)
    whole.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, whole.detach())
    for got, tensor in zip(ranks[0]["grads"], (a, p, n)):
        torch.testing.assert_close(got, tensor.grad)


def test_config_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        TrainingConfig(data="d.csv", output_dir=tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="unknown roles"):
        TrainingConfig(data="d.csv", output_dir=tmp_path, columns={"query": "q"})


def test_missing_adapter_is_a_load_error(tiny_path: Path, tmp_path: Path) -> None:
    from e5v.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"cannot load the adapter .*adapter_config\.json"):
        E5VEmbedder(tiny_path, adapter=tmp_path / "nowhere")
