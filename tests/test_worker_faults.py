"""The indexing worker under faults, in-process with the real model, Qdrant Edge and SQLite.

Each test injects one failure a running daemon meets (descriptors running out in a flush,
a full disk in SQLite, a bug in one file's processing, a stop request mid-embedding)
and checks that nothing is lost, nothing is marked wrongly, and the problem is visible
in the worker's published snapshot while it lasts.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from repd.engine import Engine
from repd.errors import DiskFullError
from repd.pipeline.changes import ChangeQueue
from repd.pipeline.indexer import Indexer, Interrupted, RunStats
from repd.pipeline.worker import IndexWorker
from tests.helpers import assert_same_index, fresh_snapshot, make_settings, snapshot

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega").split()


def _text(i: int, paragraphs: int = 3) -> str:
    return "\n\n".join(
        " ".join(WORDS[(i * 7 + p * 3 + j) % len(WORDS)] for j in range(40)) + f" note {i}.{p}"
        for p in range(paragraphs))


def _wait(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Harness:
    """A real engine and a worker thread over ``root``, as the daemon composes them."""

    def __init__(self, root: Path, data: Path, embedder: Any, **worker_kw: Any) -> None:
        self.root = root
        self.engine = Engine(make_settings(data), writer=True, embedder=embedder)
        self.indexer: Indexer = self.engine.indexer()
        self.queue = ChangeQueue(debounce_ms=0, settle_ms=0)
        self.worker = IndexWorker(self.indexer, self.queue, self.engine.rules, beat=lambda: None,
                                  data_dir=data, **worker_kw)
        self.worker.start()

    def scan(self) -> None:
        self.queue.put_scan(self.root, "")

    def idle(self, timeout: float = 120) -> None:
        def quiet() -> bool:
            depth = self.queue.depth()
            snap = self.worker.snapshot
            return (not depth["paths"] and not depth["scans"] and not snap.busy
                    and snap.problem is None and time.monotonic() >= self.worker._retry_at)
        _wait(quiet, timeout, "the worker to finish")
        time.sleep(0.3)
        _wait(quiet, timeout, "the worker to finish")

    def close(self) -> None:
        self.worker.stop(30)
        self.engine.close()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    for i in range(12):
        (root / f"note{i:02}.md").write_text(_text(i))
    return root


@pytest.fixture
def harness(corpus: Path, tmp_path: Path, embedder: Any) -> Iterator[Harness]:
    h = Harness(corpus, tmp_path / "data", embedder)
    yield h
    h.close()


def _files(h: Harness) -> dict[str, str]:
    return {p: r.state for p, r in h.engine.manifest.files_under(str(h.root)).items()}


def test_emfile_in_flush_is_retried_and_loses_nothing(harness: Harness, corpus: Path,
                                                      tmp_path: Path, embedder: Any) -> None:
    harness.scan()
    harness.idle()
    store = harness.engine.store
    real_flush = store.flush
    calls = {"n": 0}

    def flaky_flush() -> None:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OSError(errno.EMFILE, "Too many open files")
        real_flush()

    store.flush = flaky_flush  # type: ignore[method-assign]
    (corpus / "note03.md").write_text(_text(103))
    (corpus / "new.md").write_text(_text(200))
    harness.queue.put_path(corpus, "note03.md")
    harness.queue.put_path(corpus, "new.md")
    # The failure is shown while it lasts...
    snap = _wait(lambda: harness.worker.snapshot if harness.worker.snapshot.problem else None,
                 60, "the failure to be published")
    assert snap.problem_kind == "failing"
    assert "Too many open files" in snap.problem
    # ... then the retry succeeds: nothing dropped, nothing marked unreadable.
    harness.idle()
    assert calls["n"] >= 3
    assert harness.worker.snapshot.problem is None
    assert harness.engine.manifest.intents() == []
    states = _files(harness)
    assert states["new.md"] == "indexed" and states["note03.md"] == "indexed"
    assert set(states.values()) == {"indexed"}
    store.flush = real_flush  # type: ignore[method-assign]
    got = snapshot(harness.engine)
    harness.close()
    assert_same_index(got, fresh_snapshot(corpus, tmp_path / "fresh", embedder))


def test_sqlite_disk_full_at_commit_is_recovered_and_requeued(
        harness: Harness, corpus: Path, tmp_path: Path, embedder: Any) -> None:
    import sqlite3

    harness.scan()
    harness.idle()
    manifest = harness.engine.manifest
    real_tx = manifest.transaction
    state = {"armed": True, "writing_tx": 0}

    def failing_tx() -> Any:
        # A group's second transaction while writing is its commit, after the store was
        # written and flushed: fail it as a full disk would.
        if state["armed"] and harness.worker.snapshot.stage == "writing":
            state["writing_tx"] += 1
            if state["writing_tx"] == 2:
                state["armed"] = False
                raise sqlite3.OperationalError("database or disk is full")
        return real_tx()

    manifest.transaction = failing_tx  # type: ignore[method-assign]
    for name in ("note01.md", "note02.md"):
        (corpus / name).write_text(_text(300 + len(name)))
        harness.queue.put_path(corpus, name)
    _wait(lambda: not state["armed"], 60, "the injected failure")
    harness.idle()
    manifest.transaction = real_tx  # type: ignore[method-assign]
    assert manifest.intents() == []
    assert set(_files(harness).values()) == {"indexed"}
    got = snapshot(harness.engine)
    harness.close()
    assert_same_index(got, fresh_snapshot(corpus, tmp_path / "fresh", embedder))


def test_a_bug_about_one_file_fails_that_file_only(harness: Harness, corpus: Path) -> None:
    real_plan = harness.indexer.planner.plan

    def plan(root: Path, rel: str, *a: Any) -> Any:
        if rel == "note05.md":
            raise ValueError("extractor bug")
        return real_plan(root, rel, *a)

    harness.indexer.planner.plan = plan  # type: ignore[method-assign]
    harness.scan()
    harness.idle()
    rows = harness.engine.manifest.files_under(str(corpus))
    assert rows["note05.md"].state == "failed"
    assert rows["note05.md"].reason == "index_error"
    assert "extractor bug" in (rows["note05.md"].detail or "")
    assert sum(r.state == "indexed" for r in rows.values()) == 11


def test_a_bug_while_writing_is_isolated_by_halving(harness: Harness, corpus: Path) -> None:
    store = harness.engine.store
    real_upsert = store.upsert

    def upsert(points: Any) -> None:
        if any(p.payload["path"] == "note07.md" for p in points):
            raise ValueError("payload the store refuses")
        real_upsert(points)

    store.upsert = upsert  # type: ignore[method-assign]
    harness.scan()
    harness.idle()
    rows = harness.engine.manifest.files_under(str(corpus))
    assert rows["note07.md"].state == "failed"
    assert sum(r.state == "indexed" for r in rows.values()) == 11
    assert harness.engine.manifest.intents() == []
    # The store holds exactly what the manifest says.
    assert store.count() == harness.engine.manifest.chunk_count(harness.indexer.generation.id)


def test_disk_full_pauses_writing_and_resumes_by_itself(corpus: Path, tmp_path: Path,
                                                        embedder: Any) -> None:
    h = Harness(corpus, tmp_path / "data", embedder, reserve_bytes=2**62)
    try:
        h.scan()
        snap = _wait(lambda: h.worker.snapshot if h.worker.snapshot.problem_kind else None,
                     30, "disk_full to show")
        assert snap.problem_kind == "disk_full"
        assert "disk_reserve_mb" in (snap.problem or "")
        time.sleep(1.0)
        assert _files(h) == {}  # nothing written while short of space
        h.worker.reserve_bytes = 0  # space is back
        h.idle()
        assert set(_files(h).values()) == {"indexed"} and len(_files(h)) == 12
    finally:
        h.close()


def test_check_space_refuses_a_write_below_the_reserve(harness: Harness) -> None:
    harness.worker.reserve_bytes = 2**62
    with pytest.raises(DiskFullError, match="disk full"):
        harness.worker._check_space()


def test_long_file_embeds_in_slices_with_heartbeats_and_stops_between(
        tmp_path: Path, embedder: Any) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "long.md").write_text("\n\n".join(_text(i, 1) for i in range(60)))
    engine = Engine(make_settings(tmp_path / "data"), writer=True, embedder=embedder)
    try:
        ix = engine.indexer()
        ix.embed_slice = 8
        beats: list[int] = []
        progress: list[float] = []
        stop = threading.Event()

        def on_embedded(n: int) -> None:
            beats.append(n)
            if len(beats) == 3:
                stop.set()

        ix.on_embedded = on_embedded
        ix.should_stop = stop.is_set
        with pytest.raises(Interrupted):
            ix.reconcile(root, engine.rules(root), progress=lambda d, t, s: progress.append(d))
        assert beats == [8, 8, 8]
        # Nothing was written, but the embedded slices are cached for the next run.
        assert engine.manifest.files_under(str(root)) == {}
        assert engine.store.count() == 0
        assert any(0 < d < 1 for d in progress), progress  # the bar moved mid-group
        ix.should_stop = lambda: False
        stats = ix.reconcile(root, engine.rules(root))
        assert stats.indexed == 1
        assert stats.chunks_reused == 24  # the three slices done before the stop
        assert stats.chunks_embedded > 0
    finally:
        engine.close()


def test_too_many_chunks_is_a_recorded_skip(tmp_path: Path, embedder: Any) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "long.md").write_text("\n\n".join(_text(i, 1) for i in range(40)))
    (root / "short.md").write_text(_text(1, 1))
    engine = Engine(make_settings(tmp_path / "data"), writer=True, embedder=embedder)
    try:
        ix = engine.indexer()
        ix.max_chunks_per_file = 5
        stats = ix.reconcile(root, engine.rules(root))
        assert stats.skipped["too_many_chunks"] == 1 and stats.indexed == 1
        row = engine.manifest.file(str(root), "long.md")
        assert row is not None and row.state == "skipped" and row.reason == "too_many_chunks"
        # A later pass over the unchanged file does not redo the work.
        again = ix.reconcile(root, engine.rules(root))
        assert again.chunks_embedded == 0 and again.indexed == 0
    finally:
        engine.close()


def test_rates_read_zero_once_idle() -> None:
    from repd.pipeline.worker import RATE_IDLE_S, Counters

    c = Counters()
    c.record(RunStats(indexed=10, chunks_embedded=30))
    assert c.rates()[0] > 0
    c.window[-1] = (time.monotonic() - RATE_IDLE_S - 1, *c.window[-1][1:])
    assert c.rates() == (0.0, 0.0, 0.0)


def test_status_never_waits_for_the_manifest(harness: Harness, corpus: Path) -> None:
    """The API builds status from the published snapshot: a long manifest lock (the worker
    writing, or a slow GROUP BY) must not delay it."""
    from types import SimpleNamespace

    from repd.pipeline.supervisor import Supervisor
    from repd.service import DaemonService

    harness.scan()
    harness.idle()
    daemon = SimpleNamespace(
        stopping=False, ready=True, phase="ready", worker=harness.worker, engine=harness.engine,
        supervisor=Supervisor(), watcher=None, roots=[corpus], queue=harness.queue,
        settings=harness.engine.settings, started_at=time.monotonic(), models=None,
        generations=harness.engine.generations, previous_crash=None)
    service = DaemonService(daemon)  # type: ignore[arg-type]
    done = threading.Event()
    result: dict[str, Any] = {}
    with harness.engine.manifest._lock:  # held as a long write would hold it
        def ask() -> None:
            result["status"] = service.status()
            done.set()
        threading.Thread(target=ask, daemon=True).start()
        assert done.wait(5), "status blocked on the manifest lock"
    st = result["status"]
    assert st.state == "idle" and st.totals.files == 12 and st.totals.chunks > 0


def test_every_file_failing_makes_the_worker_loud(harness: Harness, corpus: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that fails on every input is not ten bad files: each gets its failed row,
    and the snapshot says the daemon is degraded until a file indexes again."""
    def broken(texts: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(harness.indexer.embedder, "embed", broken)
    harness.scan()
    snap = _wait(lambda: harness.worker.snapshot
                 if harness.worker.snapshot.problem_kind == "failing_files" else None,
                 120, "the failing files to be reported")
    assert "files in a row failed to index" in (snap.problem or "")
    assert "illegal memory access" in (snap.problem or "")
    assert set(_files(harness).values()) == {"failed"}
    monkeypatch.undo()  # the model works again: the next file clears the problem
    (corpus / "note00.md").write_text(_text(500))
    harness.queue.put_path(corpus, "note00.md")
    harness.idle()
    assert _files(harness)["note00.md"] == "indexed"
    assert harness.worker.snapshot.problem is None


def test_repd_index_honours_max_chunks_per_file(tmp_path: Path) -> None:
    """The one-shot command reads the setting too (it used to keep the built-in limit)."""
    from tests.helpers import cli_env, index_json

    root = tmp_path / "root"
    root.mkdir()
    (root / "long.md").write_text("\n\n".join(_text(i, 1) for i in range(12)))
    (root / "short.md").write_text(_text(1, 1))
    out = index_json(root, cli_env(tmp_path / "home", REPD_MAX_CHUNKS_PER_FILE="2"))
    assert out["skipped"] == {"too_many_chunks": 1} and out["indexed"] == 1
