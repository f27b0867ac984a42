"""e5v serve keeps glibc from handing freed memory back after every round."""

from __future__ import annotations

import sys

import pytest

from e5v.server.memory import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_is_tuned_unless_its_own_variables_say_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    assert keep_freed_memory() is True
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
