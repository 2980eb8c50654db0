"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedder() -> Any:
    """The real default model, loaded once for the session."""
    from repd.adapters.embedder import Embedder

    return Embedder.load("sentence-transformers/all-MiniLM-L6-v2", device="cpu")
