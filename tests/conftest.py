"""Shared fixtures: tiny offline LLaVA-NeXT checkpoints and real photos from scikit-image."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PRESET_NAMES = ("tiny", "tiny-left", "tiny-published")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from e5v.testing import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {name: build_tiny_checkpoint(root / name, name) for name in PRESET_NAMES}


@pytest.fixture(scope="session")
def tiny_path(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["tiny"]


@pytest.fixture(scope="session")
def embedder(tiny_path: Path):
    from e5v import E5VEmbedder

    return E5VEmbedder(tiny_path, batch_size=4)


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Real photos of different sizes and modes (RGB, greyscale L, RGBA)."""
    from skimage import data

    arrays: dict[str, np.ndarray] = {
        "cat": data.chelsea(),  # 451x300 RGB
        "astronaut": data.astronaut(),  # 512x512 RGB
        "coffee": data.coffee(),  # 600x400 RGB
        "rocket": data.rocket(),  # 640x427 RGB
        "camera": data.camera(),  # 512x512 grey
        "text": data.text(),  # 448x172 grey, very wide
        "logo": data.logo(),  # 500x500 RGBA
    }
    return {name: Image.fromarray(array) for name, array in arrays.items()}


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, Image.Image]) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for name, image in photos.items():
        image.save(root / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's headless chromium, driven by Playwright (whose own browser download does not work here)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"no {CHROMIUM}: install Debian's chromium (apt-get install -y chromium)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
