"""Fixtures shared by the test suite."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One OpenVINO export folder for the whole run and every daemon it starts (tests/helpers
# cli_env passes it on), kept between runs: each test has its own XDG_CACHE_HOME, and an
# export per test would cost tens of seconds each. Exports are per model identity,
# written atomically and verified at load, so sharing the folder is safe.
os.environ.setdefault("REPD_OPENVINO_CACHE",
                      os.path.join(tempfile.gettempdir(), f"repd-tests-openvino-{os.getuid()}"))

#: ``REPD_TEST_REPLICAS=0`` runs the suite on the embedded store in one copy (the
#: ``store.replicas`` default is the replicated one): the default is false in this
#: process, and tests/helpers ``cli_env`` sets it for every repd the tests start. (Tests
#: that pass an explicit layout keep theirs.)
TEST_ONE_COPY = os.environ.get("REPD_TEST_REPLICAS") == "0"
if TEST_ONE_COPY:
    from repd.settings import Settings, StoreSettings

    StoreSettings.model_fields["replicas"].default = False
    StoreSettings.model_rebuild(force=True)
    Settings.model_rebuild(force=True)


#: Where a native crash of this test process leaves every thread's stack. Code under
#: test points faulthandler at ``sys.__stderr__`` (``repd.process.fatal_errors_to_stderr``),
#: fd 2, which pytest's capture swaps for a temporary file during each test, a file that
#: dies with the process: a CI run once ended in "Segmentation fault" and nothing else.
#: So for the run ``sys.__stderr__`` (which nothing else in repd writes to) is this file,
#: and each test re-arms faulthandler on it after a line naming the test; .ci/run prints
#: it when the run dies of a signal.
FATAL_LOG = os.environ.get("REPD_TEST_FATAL_LOG") or os.path.join(
    tempfile.gettempdir(), f"repd-tests-fatal-{os.getpid()}.log")
_fatal: IO[str] | None = None
_STDERR = sys.__stderr__


def pytest_sessionstart(session: pytest.Session) -> None:
    """Open (and empty) :data:`FATAL_LOG` for this run."""
    global _fatal
    _fatal = open(FATAL_LOG, "w", encoding="utf-8")  # noqa: SIM115 (held for the run)
    sys.__stderr__ = _fatal  # type: ignore[misc]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Name the test about to run in :data:`FATAL_LOG` and send fatal errors there."""
    if _fatal is None:
        return
    _fatal.seek(0)
    _fatal.truncate()
    _fatal.write(f"running {item.nodeid}\n")
    _fatal.flush()
    faulthandler.enable(file=_fatal, all_threads=True)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A run that ends normally leaves no file."""
    if _fatal is not None:
        sys.__stderr__ = _STDERR  # type: ignore[misc]
        faulthandler.disable()
        _fatal.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(FATAL_LOG)


@pytest.fixture(scope="session", autouse=True)
def _openvino_export_ready() -> None:
    """Make the default model's OpenVINO export (and its runtime spec) once, before any
    daemon needs it.

    A daemon test waits a bounded time for its daemon to start; an export (tens of
    seconds on a busy machine) inside that wait would make the first one flaky. Cheap
    when optimum-intel is absent or the folder already holds an export.
    """
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("openvino") is None:
        return
    folder = Path(os.environ["REPD_OPENVINO_CACHE"])
    # The runtime spec is recorded by the first load after the export: with it, a daemon
    # starts without importing torch (repd.adapters.openvino_runtime).
    if any(folder.glob("sentence-transformers_all-MiniLM-L6-v2_*/repd-runtime.json")):
        return
    from repd.adapters.embedder import Embedder

    Embedder.load("sentence-transformers/all-MiniLM-L6-v2", device="cpu", backend="auto")


#: Conversions to OpenVINO made in this process by the test running (see the fixture below).
_CONVERSIONS_HERE: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """Count every torch-to-OpenVINO conversion made in this test process."""
    from repd.adapters import openvino_export

    real = openvino_export._export

    def counted(*args: Any, **kwargs: Any) -> Any:
        _CONVERSIONS_HERE.append(str(args[0]))
        return real(*args, **kwargs)

    openvino_export._export = counted  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def _no_conversion_in_the_test_process() -> Iterator[None]:
    """Fail a test that converted a model to OpenVINO in the test process itself.

    The conversion has crashed in native code (SIGSEGV, rarely, not again on the same
    input): in a child (``Embedder.load``'s default) that costs one more child; in this
    process it ends the whole run with no result (two CI runs did). A test that needs a
    load in this process the full way seeds the export instead (see
    tests/test_openvino_direct.py ``_seeded``).
    """
    _CONVERSIONS_HERE.clear()
    yield
    if _CONVERSIONS_HERE:
        made = sorted(set(_CONVERSIONS_HERE))
        _CONVERSIONS_HERE.clear()
        pytest.fail(f"converted to OpenVINO in the test process: {made}; let a child make "
                    "the export (Embedder.load's export_apart) or seed it", pytrace=False)


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
