"""Contrastive training of E5-V on text pairs with LoRA (the paper's single-modality recipe).

``train(TrainingConfig(data="nli.csv", output_dir="out"))`` saves a peft adapter in
``out``; ``E5VEmbedder(model, adapter="out")`` embeds with it merged. Needs the
``train`` extra (``pip install 'e5v[train]'``).
"""

from __future__ import annotations

from e5v.errors import TrainingDataError, TrainingError
from e5v.training.config import TrainingConfig
from e5v.training.data import PairData, load_pairs
from e5v.training.evaluate import rank_positives
from e5v.training.loss import info_nce_loss
from e5v.training.trainer import Trainer, TrainResult, find_checkpoint, train

__all__ = [
    "PairData",
    "TrainResult",
    "Trainer",
    "TrainingConfig",
    "TrainingDataError",
    "TrainingError",
    "find_checkpoint",
    "info_nce_loss",
    "load_pairs",
    "rank_positives",
    "train",
]
