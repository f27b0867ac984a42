"""LangChain's standard embeddings tests (unit and integration) on a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

from langchain_e5v import E5VEmbeddings

# The standard async tests carry no marker: mark the module for pytest-asyncio, and
# silence its note that the marked sync tests are not coroutines.
pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.filterwarnings("ignore:The test <Function .*> is marked with '@pytest.mark.asyncio'"),
]


class _TinyCheckpoint:
    """Points ``embedding_model_params`` at the session's tiny checkpoint."""

    checkpoint: Path

    @pytest.fixture(autouse=True)
    def _use_tiny_checkpoint(self, tiny_path: Path) -> None:
        type(self).checkpoint = tiny_path

    @property
    def embeddings_class(self) -> type[E5VEmbeddings]:
        return E5VEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model_name": str(self.checkpoint), "batch_size": 2}


class TestE5VEmbeddingsUnit(_TinyCheckpoint, EmbeddingsUnitTests):
    pass


class TestE5VEmbeddingsIntegration(_TinyCheckpoint, EmbeddingsIntegrationTests):
    pass
