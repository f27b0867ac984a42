"""The training loop: accelerate for devices and processes, checkpoints, resume, evaluation.

Run it in one process (CPU or one GPU) or under ``accelerate launch`` (one process per
GPU; the data is sharded by rank and in-batch negatives are gathered from every GPU).
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from e5v.core.prompts import get_prompts
from e5v.errors import TrainingDataError, TrainingError
from e5v.model.loading import resolve_dtype
from e5v.optional import require
from e5v.training.config import TrainingConfig
from e5v.training.data import epoch_batches, load_pairs
from e5v.training.evaluate import rank_positives
from e5v.training.loss import gather_with_grad, info_nce_loss
from e5v.training.model import PromptEncoder, TextEncoder, build_model, loaded_for_training, save_merged

__all__ = ["TrainResult", "Trainer", "train"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "training_config.json"
STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


@dataclass
class TrainResult:
    """What a run produced: the adapter (peft format) in ``output_dir``."""

    output_dir: Path
    steps: int
    #: Mean loss of each optimizer step, from the first step of the run (resumed runs included).
    losses: list[float]
    #: ``{"step", "mean_rank", "accuracy", "candidates"}`` before training, at checkpoints and at the end.
    evaluations: list[dict[str, float]] = field(default_factory=list)
    merged_dir: Path | None = None


def train(config: TrainingConfig, *, show_progress_bar: bool = True) -> TrainResult:
    """Train a LoRA adapter as :class:`TrainingConfig` says; see :class:`Trainer`."""
    return Trainer(config).train(show_progress_bar=show_progress_bar)


class Trainer:
    """Loads the data and the model, then :meth:`train` runs the steps.

    :meth:`embed_texts` embeds with the model as it is (LoRA unmerged), for evaluation.
    """

    def __init__(self, config: TrainingConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import get_linear_schedule_with_warmup

        require("peft", "train")
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(cpu=config.cpu)
        self.data = load_pairs(config.data, config.columns)
        self.eval_data = None if config.eval_data is None else load_pairs(config.eval_data, config.columns)
        world = self.accelerator.num_processes
        self.steps_per_epoch = len(self.data) // (config.batch_size * world) // config.grad_accum
        if self.steps_per_epoch == 0:
            raise TrainingDataError(
                f"{self.data.source}: {len(self.data)} rows are fewer than one optimizer step takes "
                f"(batch_size {config.batch_size} x grad_accum {config.grad_accum} x {world} processes); "
                "lower `batch_size` or `grad_accum`"
            )
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch

        set_seed(config.seed)
        device = self.accelerator.device
        dtype = resolve_dtype(config.dtype, device)
        peft_model, processor = build_model(config, device, dtype)
        loaded = loaded_for_training(peft_model, processor, config, dtype)
        self.prompt_encoder = PromptEncoder(loaded, get_prompts(config.prompts), config.max_length)
        self.parameters = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, self.total_steps)
        self.model = self.accelerator.prepare_model(TextEncoder(peft_model, loaded), device_placement=False)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.step = 0
        self.losses: list[float] = []
        self.evaluations: list[dict[str, float]] = []
        if config.resume is not None:
            self._resume(find_checkpoint(config.resume))

    @property
    def peft_model(self) -> Any:
        return self.accelerator.unwrap_model(self.model).peft_model

    def train(self, *, show_progress_bar: bool = True) -> TrainResult:
        """Run to ``total_steps``, checkpointing every ``save_every``; save the adapter and config."""
        from tqdm.auto import tqdm

        config = self.config
        main = self.accelerator.is_main_process
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.output_dir / CONFIG_FILE)
        logger.info(
            "training on %d rows: %d steps (%d a epoch), %d rows a step",
            len(self.data),
            self.total_steps,
            self.steps_per_epoch,
            config.batch_size * config.grad_accum * self.accelerator.num_processes,
        )
        if self.step == 0:
            self._evaluate()
        shown = main and show_progress_bar
        progress = tqdm(total=self.total_steps, initial=self.step, desc="Training", unit="step", disable=not shown)
        while self.step < self.total_steps:
            epoch, done = divmod(self.step, self.steps_per_epoch)
            batches = epoch_batches(
                len(self.data),
                config.batch_size,
                epoch=epoch,
                seed=config.seed,
                rank=self.accelerator.process_index,
                world_size=self.accelerator.num_processes,
            )
            for step_in_epoch in range(done, self.steps_per_epoch):
                start = step_in_epoch * config.grad_accum
                loss = self._optimizer_step(batches[start : start + config.grad_accum])
                self.step += 1
                self.losses.append(loss)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self.step % config.log_every == 0:
                    logger.info("step %d/%d: loss %.4f", self.step, self.total_steps, loss)
                if config.save_every and self.step % config.save_every == 0:
                    self.save_checkpoint()
                if self.step >= self.total_steps:
                    break
        progress.close()
        if not config.save_every or self.step % config.save_every:
            self._evaluate()
        merged = self._save_final()
        return TrainResult(self.output_dir, self.step, list(self.losses), list(self.evaluations), merged)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed sentences with the current weights (eval mode, no gradients), as training sees them."""
        module = self.accelerator.unwrap_model(self.model)
        was_training = module.training
        module.eval()
        chunk = self.config.batch_size * 3
        try:
            with torch.no_grad():
                parts = [
                    module(self.prompt_encoder(texts[i : i + chunk])).cpu().numpy() for i in range(0, len(texts), chunk)
                ]
        finally:
            module.train(was_training)
        return np.concatenate(parts) if parts else np.empty((0, self.prompt_encoder.loaded.dimension), np.float32)

    # -- steps --------------------------------------------------------------------------

    def _optimizer_step(self, micro_batches: list[list[int]]) -> float:
        """Forward and backward each micro-batch, then one optimizer step; the mean loss."""
        self.model.train()
        total = torch.zeros((), device=self.accelerator.device)
        for i, rows in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                loss = self._loss(rows)
                self.accelerator.backward(loss / len(micro_batches))
            total += loss.detach()
        if self.config.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean = self.accelerator.reduce(total / len(micro_batches), reduction="mean")
        value = float(mean)
        if not np.isfinite(value):
            raise TrainingError(
                f"the loss is {value} at step {self.step + 1}; lower `lr`, or use bf16/fp32 instead of fp16"
            )
        return value

    def _loss(self, rows: list[int]) -> torch.Tensor:
        anchors, positives, negatives = self.data.rows(rows)
        vectors = self.model(self.prompt_encoder(anchors + positives + (negatives or [])))
        size = len(rows)
        distributed = self.accelerator.num_processes > 1
        return info_nce_loss(
            vectors[:size],
            vectors[size : 2 * size],
            vectors[2 * size :] if negatives is not None else None,
            temperature=self.config.temperature,
            symmetric=self.config.symmetric,
            gather=gather_with_grad if distributed else None,
            rank=self.accelerator.process_index,
        )

    def _evaluate(self) -> None:
        """Rank the held-out positives (main process) and log the result."""
        data = self.eval_data
        if data is not None and self.accelerator.is_main_process:
            anchors = self.embed_texts(data.anchors)
            positives = self.embed_texts(data.positives)
            negatives = None if data.negatives is None else self.embed_texts(data.negatives)
            result = {"step": self.step, **rank_positives(anchors, positives, negatives)}
            self.evaluations.append(result)
            logger.info(
                "eval at step %d: mean rank %.2f, accuracy %.3f (%d candidates)",
                self.step,
                result["mean_rank"],
                result["accuracy"],
                result["candidates"],
            )
        self.accelerator.wait_for_everyone()

    # -- saving and resuming ------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Adapter, optimizer, scheduler, step and RNG state in ``output_dir/checkpoint-STEP``."""
        directory = self.output_dir / f"checkpoint-{self.step}"
        directory.mkdir(parents=True, exist_ok=True)
        self._evaluate()
        if self.accelerator.is_main_process:
            self.peft_model.save_pretrained(directory, save_embedding_layers=False)
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
            (directory / STATE_FILE).write_text(json.dumps(self._state(), indent=2) + "\n")
        torch.save(_rng_state(), directory / f"rng_state_{self.accelerator.process_index}.pt")
        self.accelerator.wait_for_everyone()
        logger.info("saved %s", directory)
        return directory

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "rows": len(self.data),
            "batch_size": self.config.batch_size,
            "grad_accum": self.config.grad_accum,
            "processes": self.accelerator.num_processes,
            "seed": self.config.seed,
            "losses": self.losses,
            "evaluations": self.evaluations,
        }

    def _resume(self, checkpoint: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = json.loads((checkpoint / STATE_FILE).read_text())
        now = self._state()
        changed = [key for key in ("rows", "batch_size", "grad_accum", "processes", "seed") if state[key] != now[key]]
        if changed:
            raise TrainingError(
                f"cannot resume from {checkpoint}: "
                + ", ".join(f"{key} was {state[key]}, now {now[key]}" for key in changed)
                + "; resume with the data and batch options of the original run"
            )
        if state["step"] >= self.total_steps:
            raise TrainingError(
                f"{checkpoint} is at step {state['step']}, already at `max_steps` or `epochs` ({self.total_steps})"
            )
        weights = load_file(checkpoint / "adapter_model.safetensors", device=str(self.accelerator.device))
        result = set_peft_model_state_dict(self.peft_model, weights)
        if result.unexpected_keys:
            raise TrainingError(f"{checkpoint} holds weights this model does not have: {result.unexpected_keys[:3]}")
        device = self.accelerator.device
        self.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True))
        self.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
        rng_file = checkpoint / f"rng_state_{self.accelerator.process_index}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        self.step = int(state["step"])
        self.losses = list(state["losses"])
        self.evaluations = list(state["evaluations"])
        logger.info("resumed from %s at step %d", checkpoint, self.step)

    def _save_final(self) -> Path | None:
        merged = None
        if self.accelerator.is_main_process:
            self.peft_model.save_pretrained(self.output_dir, save_embedding_layers=False)
            (self.output_dir / STATE_FILE).write_text(json.dumps(self._state(), indent=2) + "\n")
            logger.info("saved the adapter to %s", self.output_dir)
            if self.config.merge_to is not None:
                merged = save_merged(
                    self.config.model, self.output_dir, self.config.merge_to, revision=self.config.revision
                )
        self.accelerator.wait_for_everyone()
        return merged


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest ``checkpoint-STEP`` in an output directory."""
    path = Path(path)
    if (path / STATE_FILE).exists() and (path / "optimizer.pt").exists():
        return path
    steps = sorted(
        (int(match.group(1)), child)
        for child in (path.iterdir() if path.is_dir() else [])
        if (match := _CHECKPOINT.fullmatch(child.name)) and (child / "optimizer.pt").exists()
    )
    if not steps:
        raise TrainingError(f"no checkpoint to resume from in {path}; pass a checkpoint-STEP directory")
    return steps[-1][1]


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
