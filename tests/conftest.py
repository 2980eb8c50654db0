"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedder() -> Any:
    """The real default model, loaded once for the session."""
    from repd.adapters.embedder import Embedder

    return Embedder.load("sentence-transformers/all-MiniLM-L6-v2", device="cpu")


@pytest.fixture(autouse=True)
def _remove_deep_trees(request: pytest.FixtureRequest) -> Iterator[None]:
    """Remove a ``deep_tree`` test's folders itself: pytest's own clean-up of old temp
    folders recurses (shutil.rmtree) and dies with RecursionError on a 1,200-deep tree."""
    deep = request.node.get_closest_marker("deep_tree") is not None
    tmp = request.getfixturevalue("tmp_path") if deep else None  # asked now: gone at teardown
    yield
    if tmp is not None:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
