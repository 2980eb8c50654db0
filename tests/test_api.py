"""The local API end to end: a real ApiServer on a real Unix socket, a fake daemon behind it."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.types import Message

from repd.api.backend import ApiError
from repd.api.client import ApiClient, ApiRequestError, DaemonNotRunning
from repd.api.schema import (
    API_VERSION,
    ActionResponse,
    FileIssue,
    FilesResponse,
    GateLabelFiles,
    GenerationInfo,
    IssueState,
    ModelActionResponse,
    ModelInfo,
    ModelStatusResponse,
    QueryHit,
    QueryRequest,
    QueryResponse,
    QueueInfo,
    Rates,
    RootStatus,
    StatusResponse,
    StoreInfo,
    Totals,
)
from repd.api.server import INTERNAL_ERROR_MESSAGE, ApiServer, ApiStartError, create_app
from repd.pipeline.modelstate import (
    GateLabels,
    GateReport,
    GenerationSummary,
    MigrationRefused,
    MigrationSnapshot,
    ModelCommandResult,
    ModelSnapshot,
)
from repd.service import action_response, migration_info, model_status_response
from repd.settings import ApiSettings
from tests.helpers import UnixHTTPConnection

ROOT = "/home/someone/notes"
LIMIT = 4096  # max_request_bytes for these tests (the settings floor is 1024)


T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp()


class FakeModels:
    """``ModelCommands`` over a small state machine: what the daemon's model commands do
    to generations and the migration, without embedding anything.

    Generation 1 (MiniLM) is active. ``use`` creates a building generation and a migration
    that is backfilling; :meth:`backfilled` moves it to ``ready``; ``gate_fails`` makes the
    switch's gate fail. Refusals raise ``MigrationRefused`` like the real ones.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generations: dict[int, GenerationSummary] = {
            1: GenerationSummary(1, "all-MiniLM-L6-v2", "all-MiniLM-L6-v2@abc", 384, "active",
                                 120, T0, T0, "shards/g0001")}
        self.active: int | None = 1
        self.migration: MigrationSnapshot | None = None
        self.gate_fails = False
        self.calls: list[tuple[str, Any]] = []

    def snapshot(self) -> ModelSnapshot:
        with self.lock:
            gens = tuple(self.generations[i] for i in sorted(self.generations))
            return ModelSnapshot(gens, self.migration, self.active)

    def _set_state(self, gen: int, state: Any, **kw: Any) -> None:
        self.generations[gen] = replace(self.generations[gen], state=state, **kw)

    def use(self, model: str) -> ModelCommandResult:
        with self.lock:
            self.calls.append(("use", model))
            if self.migration is not None:
                raise MigrationRefused(
                    f"a migration to {self.migration.model_name} is already under way; "
                    "`repd model abort` stops it")
            assert self.active is not None
            new = max(self.generations) + 1
            self.generations[new] = GenerationSummary(
                new, model, f"{model}@def", 768, "building", 0, T0 + 60, None, f"shards/g{new:04d}")
            self.migration = MigrationSnapshot(
                state="backfilling", from_generation=self.active, to_generation=new,
                model_name=model, model_id=f"{model}@def", files_done=4, files_total=10,
                chunks_embedded=48, files_per_s=2.0, eta_s=3.0, memory_bytes=133_169_152,
                gate=None, message=None, started_at=T0 + 60)
            return ModelCommandResult(f"migrating to {model}: generation {new} is being built",
                                      new)

    def backfilled(self, gate: GateReport | None = None) -> None:
        """Test hook: the backfill is done, waiting for the switch."""
        with self.lock:
            assert self.migration is not None
            self.migration = replace(self.migration, state="ready", files_done=10, eta_s=None,
                                     gate=gate)

    def switch(
        self, *, force: bool = False, labels: GateLabels | None = None
    ) -> ModelCommandResult:
        with self.lock:
            self.calls.append(("switch", (force, labels)))
            m = self.migration
            if m is None:
                raise MigrationRefused("no migration to switch to; `repd model use NAME` "
                                       "starts one")
            if m.state != "ready" or m.to_generation is None:
                raise MigrationRefused(f"the new generation is still {m.state} "
                                       f"({m.files_done} of {m.files_total} files)")
            checks = ("files: 10 of 10 in the same state in both", "points: 130 in the new one")
            ndcg = (0.41, 0.45) if labels is not None else (None, None)
            if self.gate_fails:
                checks = ("files: 9 of 10 in the same state in both (FAILED)",)
            gate = GateReport(ok=not self.gate_fails, checks=checks, ndcg_active=ndcg[0],
                              ndcg_new=ndcg[1], forced=self.gate_fails and force)
            if not gate.ok and not force:
                self.migration = replace(m, gate=gate)
                raise MigrationRefused("the gate refused the switch: files: 9 of 10 in the "
                                       "same state; `repd model switch --force` switches anyway")
            assert self.active is not None
            self._set_state(self.active, "retired")
            self._set_state(m.to_generation, "active", activated_at=T0 + 120, points=130)
            self.active = m.to_generation
            self.migration = None
            return ModelCommandResult(f"generation {self.active} ({m.model_name}) is active",
                                      self.active, {"gate": gate})

    def rollback(self) -> ModelCommandResult:
        with self.lock:
            self.calls.append(("rollback", None))
            retired = [g for g in self.generations.values() if g.state == "retired"]
            if not retired or self.migration is not None:
                raise MigrationRefused("nothing to roll back to: no retired generation")
            back = max(retired, key=lambda g: g.id)
            assert self.active is not None
            self._set_state(self.active, "retired")
            self._set_state(back.id, "active", activated_at=T0 + 180)
            self.active = back.id
            return ModelCommandResult(f"generation {back.id} ({back.model_name}) is active "
                                      "again", back.id)

    def prune(self) -> ModelCommandResult:
        with self.lock:
            self.calls.append(("prune", None))
            retired = [g.id for g in self.generations.values() if g.state == "retired"]
            if not retired:
                raise MigrationRefused("no retired generation to prune")
            for gen in retired:
                del self.generations[gen]
            return ModelCommandResult(f"pruned {len(retired)} retired generation(s)")

    def abort(self) -> ModelCommandResult:
        with self.lock:
            self.calls.append(("abort", None))
            m = self.migration
            if m is None:
                raise MigrationRefused("no migration to abort")
            if m.to_generation is not None:
                del self.generations[m.to_generation]
            self.migration = None
            return ModelCommandResult(f"migration to {m.model_name} aborted", m.to_generation)


class FakeBackend:
    """An in-memory daemon: answers from fixed data, records calls, fails on request."""

    def __init__(self) -> None:
        self.models = FakeModels()
        self.starting = False  # set: model commands answer 503 "starting"
        self.paused = False
        self.calls: list[tuple[str, Any]] = []
        self.explode: set[str] = set()  # method names that raise RuntimeError
        at = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
        self.issues = [
            FileIssue(
                root=ROOT,
                path=f"big{i}.bin",
                state="skipped",
                reason="too_large",
                detail="12 MB",
                at=at,
            )
            for i in range(3)
        ] + [
            FileIssue(
                root=ROOT,
                path="broken.pdf",
                state="failed",
                reason="extract_error",
                detail="bad xref",
                at=at,
            )
        ]

    def _enter(self, name: str, arg: Any = None) -> None:
        self.calls.append((name, arg))
        if name in self.explode:
            raise RuntimeError(f"{name} exploded")

    def status(self) -> StatusResponse:
        """A plausible status of an idle daemon."""
        self._enter("status")
        return StatusResponse(
            version="0.1.0",
            state="paused" if self.paused else "idle",
            paused=self.paused,
            model=ModelInfo(
                name="all-MiniLM-L6-v2", id="all-MiniLM-L6-v2@abc", dim=384, device="cpu"
            ),
            generation=GenerationInfo(id="g1", state="active", points=120),
            queue=QueueInfo(pending=0, scans=0, settling=0, planning=0, embedding=0, writing=0),
            rates=Rates(files_per_s=0.0, chunks_per_s=0.0, embeds_per_s=0.0),
            eta_s=None,
            roots=[
                RootStatus(path=ROOT, watch="inotify", files=10, chunks=120, skipped=3, failed=1)
            ],
            totals=Totals(files=10, chunks=120, skipped=3, failed=1, embedded=100, reused=20),
            store=StoreInfo(kind="embedded", points=120, indexed_vectors=0, index_built=False),
            uptime_s=12.5,
            last_scan_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
            last_error=None,
            migration=migration_info(m) if (m := self.models.migration) is not None else None,
        )

    def query(self, req: QueryRequest) -> QueryResponse:
        """Up to three hits, whatever was asked (404 for a generation that does not exist)."""
        self._enter("query", req)
        if req.generation is not None and req.generation not in self.models.generations:
            raise ApiError(404, f"there is no generation {req.generation}", "unknown_generation")
        hits = [
            QueryHit(
                rank=i + 1,
                score=1.0 - i / 10,
                root=req.root or ROOT,
                path=f"doc{i}.md",
                start_line=1 + 10 * i,
                end_line=9 + 10 * i,
                snippet=req.text[:40],
            )
            for i in range(min(req.k, 3))
        ]
        generation = "g1" if req.generation is None else str(req.generation)
        return QueryResponse(hits=hits, took_ms=1.5, generation=generation,
                             mode=req.mode or "hybrid")

    def files(self, state: IssueState | None, limit: int, offset: int) -> FilesResponse:
        """A page of the fixed issue list."""
        self._enter("files", (state, limit, offset))
        items = [i for i in self.issues if state is None or i.state == state]
        return FilesResponse(items=items[offset : offset + limit], total=len(items))

    def reindex(self, path: str | None) -> ActionResponse:
        """404 outside ROOT, as the real daemon does."""
        self._enter("reindex", path)
        if path is not None and not (path == ROOT or path.startswith(ROOT + "/")):
            raise ApiError(404, f"{path} is not inside any indexed root")
        return ActionResponse(ok=True, message=f"reindexing {path or 'all roots'}", queued=7)

    def pause(self) -> ActionResponse:
        """Pause."""
        self._enter("pause")
        self.paused = True
        return ActionResponse(ok=True, message="paused")

    def resume(self) -> ActionResponse:
        """Resume."""
        self._enter("resume")
        self.paused = False
        return ActionResponse(ok=True, message="resumed")

    def metrics(self) -> str:
        """Two metrics in the text format."""
        self._enter("metrics")
        return (
            "# HELP repd_points Points in the active generation.\n"
            "# TYPE repd_points gauge\nrepd_points 120\n"
        )

    # -- model upgrades: FakeModels, translated as DaemonService does

    def _model(self, name: str, arg: Any = None) -> FakeModels:
        self._enter(name, arg)
        if self.starting:
            raise ApiError(503, "the daemon is starting (loading model and index); try again "
                           "in a moment", "starting")
        return self.models

    @staticmethod
    def _command(fn: Any) -> ModelActionResponse:
        try:
            return action_response(fn())
        except MigrationRefused as exc:
            raise ApiError(409, str(exc), "migration_refused") from None

    def model_status(self) -> ModelStatusResponse:
        """The fake's generations and migration."""
        return model_status_response(self._model("model_status").snapshot())

    def model_use(self, model: str) -> ModelActionResponse:
        """Start a (fake) migration."""
        models = self._model("model_use", model)
        return self._command(lambda: models.use(model))

    def model_switch(self, force: bool, labels: GateLabelFiles | None) -> ModelActionResponse:
        """Switch, with the labels turned into paths as the daemon does (not checked)."""
        models = self._model("model_switch", (force, labels))
        gate = None if labels is None else GateLabels(
            Path(labels.queries), Path(labels.qrels),
            Path(labels.mapping) if labels.mapping else None)
        return self._command(lambda: models.switch(force=force, labels=gate))

    def model_rollback(self) -> ModelActionResponse:
        """Roll back."""
        models = self._model("model_rollback")
        return self._command(models.rollback)

    def model_prune(self) -> ModelActionResponse:
        """Prune."""
        models = self._model("model_prune")
        return self._command(models.prune)

    def model_abort(self) -> ModelActionResponse:
        """Abort."""
        models = self._model("model_abort")
        return self._command(models.abort)


# --- helpers --------------------------------------------------------------------------------


def settings_for(tmp_path: Path, **kw: Any) -> ApiSettings:
    return ApiSettings(socket=tmp_path / "run" / "repd.sock", max_request_bytes=LIMIT, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Raw:
    """A hand-rolled request, for what a well-behaved client would never send."""

    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def error(self) -> dict[str, Any]:
        data = json.loads(self.body)
        assert set(data) == {"error"}, data
        assert isinstance(data["error"]["code"], str)
        assert isinstance(data["error"]["message"], str) and data["error"]["message"]
        err: dict[str, Any] = data["error"]
        return err


def raw(
    sock: Path,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Raw:
    conn = UnixHTTPConnection(str(sock), timeout=5)
    try:
        # The server may answer an oversized request (413) from its headers and close
        # before the body is all sent (on a loaded machine it often does); the answer is
        # already in our receive buffer, as curl would read it.
        with contextlib.suppress(BrokenPipeError):
            conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Raw(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def raw_tcp(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> Raw:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return Raw(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def tcp_listen_inodes() -> set[str]:
    """Inodes of TCP sockets in LISTEN state that belong to this process."""
    mine = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # an fd closed while we look
            target = str(fd.readlink())
            if target.startswith("socket:["):
                mine.add(target[8:-1])
    listening = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if table.exists():
            for line in table.read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A":  # TCP_LISTEN
                    listening.add(cols[9])
    return mine & listening


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def server(tmp_path: Path, backend: FakeBackend) -> Iterator[ApiServer]:
    srv = ApiServer(backend, settings_for(tmp_path))
    srv.start()
    srv.wait_ready(10)
    yield srv
    srv.stop()


@pytest.fixture
def client(server: ApiServer) -> ApiClient:
    return ApiClient(server.socket_path, timeout=5)


# --- every endpoint through the client -------------------------------------------------------


def test_status(client: ApiClient) -> None:
    status = client.status()
    assert status["api_version"] == API_VERSION
    assert status["state"] == "idle"
    assert status["model"]["dim"] == 384
    assert status["roots"][0] == {
        "path": ROOT,
        "watch": "inotify",
        "files": 10,
        "chunks": 120,
        "skipped": 3,
        "failed": 1,
    }
    assert status["last_scan_at"].startswith("2024-05-01T12:00:00")
    # The serialized form must round-trip through the model the TUI may use.
    assert StatusResponse.model_validate(status).store.kind == "embedded"


def test_query(client: ApiClient, backend: FakeBackend) -> None:
    out = client.query("where is the config loaded", k=2, path="*.md", root=ROOT)
    assert [h["rank"] for h in out["hits"]] == [1, 2]
    assert out["hits"][0]["snippet"] == "where is the config loaded"
    assert out["generation"] == "g1"
    name, req = backend.calls[-1]
    assert name == "query"
    assert req == QueryRequest(text="where is the config loaded", k=2, path="*.md", root=ROOT)


def test_query_defaults(client: ApiClient, backend: FakeBackend) -> None:
    out = client.query("x")
    assert backend.calls[-1][1] == QueryRequest(text="x", k=10)
    assert backend.calls[-1][1].mode is None and backend.calls[-1][1].cwd is None
    assert out["mode"] == "hybrid"  # what the daemon chose: the generation's default


@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_query_mode_and_cwd_travel(client: ApiClient, backend: FakeBackend, mode: Any) -> None:
    out = client.query("x", path="notes/*.md", mode=mode, cwd="/home/someone")
    assert backend.calls[-1][1] == QueryRequest(text="x", path="notes/*.md", mode=mode,
                                                 cwd="/home/someone")
    assert out["mode"] == mode


def test_query_response_says_which_mode_answered() -> None:
    hit = {"rank": 1, "score": 0.5, "root": ROOT, "path": "a.md", "start_line": 1,
           "end_line": 2, "snippet": "s"}
    base = {"hits": [hit], "took_ms": 1.0, "generation": "1"}
    assert QueryResponse.model_validate(base).mode == "dense"  # a daemon from before modes
    assert QueryResponse.model_validate({**base, "mode": "lexical"}).mode == "lexical"
    schema = QueryResponse.model_json_schema()
    assert set(schema["properties"]["mode"]["enum"]) == {"dense", "lexical", "hybrid"}
    request = QueryRequest.model_json_schema()["properties"]
    assert "mode" in request and "cwd" in request


def test_files_filter_and_paging(client: ApiClient, backend: FakeBackend) -> None:
    everything = client.files()
    assert everything["total"] == 4 and len(everything["items"]) == 4
    skipped = client.files(state="skipped", limit=2, offset=1)
    assert skipped["total"] == 3
    assert [i["path"] for i in skipped["items"]] == ["big1.bin", "big2.bin"]
    assert backend.calls[-1] == ("files", ("skipped", 2, 1))
    failed = client.files(state="failed")
    assert [i["reason"] for i in failed["items"]] == ["extract_error"]


def test_reindex(client: ApiClient, backend: FakeBackend) -> None:
    assert client.reindex() == {"ok": True, "message": "reindexing all roots", "queued": 7}
    assert client.reindex(ROOT + "/a.md")["ok"] is True
    assert backend.calls == [("reindex", None), ("reindex", ROOT + "/a.md")]


def test_reindex_outside_roots_is_404(client: ApiClient) -> None:
    with pytest.raises(ApiRequestError) as info:
        client.reindex("/etc/passwd")
    assert info.value.status == 404
    assert info.value.code == "not_found"
    assert info.value.message == "/etc/passwd is not inside any indexed root"


def test_reindex_without_body(server: ApiServer, backend: FakeBackend) -> None:
    # `curl -X POST .../v1/reindex` with no body at all means "everything".
    r = raw(server.socket_path, "POST", "/v1/reindex")
    assert r.status == 200
    assert backend.calls[-1] == ("reindex", None)


def test_pause_and_resume(client: ApiClient) -> None:
    assert client.pause() == {"ok": True, "message": "paused", "queued": 0}
    status = client.status()
    assert status["paused"] is True and status["state"] == "paused"
    assert client.resume()["message"] == "resumed"
    assert client.status()["paused"] is False


def test_metrics(client: ApiClient, server: ApiServer) -> None:
    assert "repd_points 120" in client.metrics()
    r = raw(server.socket_path, "GET", "/metrics")
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


def test_openapi_documents(server: ApiServer) -> None:
    versioned = raw(server.socket_path, "GET", "/v1/openapi.json")
    plain = raw(server.socket_path, "GET", "/openapi.json")
    assert versioned.status == plain.status == 200
    doc = json.loads(versioned.body)
    assert doc == json.loads(plain.body)
    assert set(doc["paths"]) == {
        "/v1/status",
        "/v1/query",
        "/v1/files",
        "/v1/reindex",
        "/v1/pause",
        "/v1/resume",
        "/metrics",
        "/v1/model",
        "/v1/model/use",
        "/v1/model/switch",
        "/v1/model/rollback",
        "/v1/model/prune",
        "/v1/model/abort",
    }
    # Docstrings become descriptions, and errors are documented with their real shape.
    assert doc["paths"]["/v1/query"]["post"]["description"].startswith("Semantic search")
    assert "ErrorResponse" in json.dumps(doc["paths"]["/v1/query"]["post"]["responses"]["422"])


# --- the socket and its folder ------------------------------------------------------------------


def test_socket_is_0600_and_runtime_dir_0700(server: ApiServer) -> None:
    sock_mode = server.socket_path.stat().st_mode
    assert stat.S_ISSOCK(sock_mode)
    assert stat.S_IMODE(sock_mode) == 0o600
    assert stat.S_IMODE(server.socket_path.parent.stat().st_mode) == 0o700


def test_stop_unlinks_the_socket(tmp_path: Path, backend: FakeBackend) -> None:
    srv = ApiServer(backend, settings_for(tmp_path))
    srv.start()
    srv.wait_ready(10)
    path = srv.socket_path
    assert ApiClient(path).status()["state"] == "idle"
    srv.stop()
    assert not path.exists()
    with pytest.raises(DaemonNotRunning):
        ApiClient(path).status()


def test_stop_does_not_wait_for_idle_keep_alive_connections(
    tmp_path: Path, backend: FakeBackend
) -> None:
    # The dashboard keeps a connection open between polls; stop must not hang on it.
    srv = ApiServer(backend, settings_for(tmp_path))
    srv.start()
    srv.wait_ready(10)
    conn = UnixHTTPConnection(str(srv.socket_path), timeout=5)
    try:
        conn.request("GET", "/v1/status")
        assert conn.getresponse().read()
        started = time.monotonic()
        srv.stop(timeout=5)
        assert time.monotonic() - started < 2
        assert not srv.socket_path.exists()
    finally:
        conn.close()


def test_empty_reindex_path_is_rejected_not_everything(client: ApiClient) -> None:
    with pytest.raises(ApiRequestError) as info:
        client.reindex("")
    assert info.value.status == 422


def test_stale_socket_is_replaced(tmp_path: Path, backend: FakeBackend) -> None:
    settings = settings_for(tmp_path)
    settings.socket.parent.mkdir(mode=0o700)
    # A socket file with nobody behind it: what a kill -9'd daemon leaves.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(settings.socket))
    dead.close()
    with pytest.raises(DaemonNotRunning):
        ApiClient(settings.socket).status()
    srv = ApiServer(backend, settings)
    srv.start()
    try:
        srv.wait_ready(10)
        assert ApiClient(settings.socket).status()["state"] == "idle"
        assert stat.S_IMODE(settings.socket.stat().st_mode) == 0o600
    finally:
        srv.stop()


def test_second_server_on_same_socket_is_refused(
    tmp_path: Path, server: ApiServer, backend: FakeBackend
) -> None:
    second = ApiServer(backend, settings_for(tmp_path))
    with pytest.raises(ApiStartError, match=r"already serving the API on .*repd\.sock"):
        second.start()
    # ... and the refusal left the first one untouched.
    assert ApiClient(server.socket_path).status()["state"] == "idle"


def test_live_listener_without_lock_is_not_removed(tmp_path: Path, backend: FakeBackend) -> None:
    # Something else (not holding our lock) answers on the path: never unlink it.
    settings = settings_for(tmp_path)
    settings.socket.parent.mkdir(mode=0o700)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(settings.socket))
    other.listen(1)
    try:
        with pytest.raises(ApiStartError, match="already answers on"):
            ApiServer(backend, settings).start()
        assert stat.S_ISSOCK(settings.socket.lstat().st_mode)
    finally:
        other.close()


def test_regular_file_at_socket_path_is_not_replaced(tmp_path: Path, backend: FakeBackend) -> None:
    settings = settings_for(tmp_path)
    settings.socket.parent.mkdir(mode=0o700)
    settings.socket.write_text("precious")
    with pytest.raises(ApiStartError, match="not a socket"):
        ApiServer(backend, settings).start()
    assert settings.socket.read_text() == "precious"


def test_folder_writable_by_others_is_refused(tmp_path: Path, backend: FakeBackend) -> None:
    settings = settings_for(tmp_path)
    settings.socket.parent.mkdir()
    settings.socket.parent.chmod(0o777)
    with pytest.raises(ApiStartError, match="writable by other users"):
        ApiServer(backend, settings).start()


def test_too_long_socket_path_is_a_clear_error(tmp_path: Path, backend: FakeBackend) -> None:
    settings = ApiSettings(socket=tmp_path / ("x" * 120) / "repd.sock")
    with pytest.raises(ApiStartError, match="shorter path"):
        ApiServer(backend, settings).start()


def test_client_without_daemon(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="not running"):
        ApiClient(tmp_path / "nothing.sock").status()


# --- TCP ---------------------------------------------------------------------------------------


def test_no_tcp_listener_unless_configured(tmp_path: Path, backend: FakeBackend) -> None:
    before = tcp_listen_inodes()
    srv = ApiServer(backend, settings_for(tmp_path))
    srv.start()
    try:
        srv.wait_ready(10)
        assert srv.tcp_address is None
        assert tcp_listen_inodes() - before == set()
    finally:
        srv.stop()


def test_tcp_with_token(tmp_path: Path, backend: FakeBackend) -> None:
    port = free_port()
    token = "s3cret-token-for-tests"
    before = tcp_listen_inodes()
    srv = ApiServer(backend, settings_for(tmp_path, tcp_port=port, token=SecretStr(token)))
    srv.start()
    try:
        srv.wait_ready(10)
        assert srv.tcp_address == ("127.0.0.1", port)
        assert len(tcp_listen_inodes() - before) == 1
        tcp = ApiClient(base_url=f"http://127.0.0.1:{port}", token=token)
        assert tcp.status()["state"] == "idle"
        assert tcp.query("hello", k=1)["hits"][0]["rank"] == 1
        assert "repd_points" in tcp.metrics()

        missing = raw_tcp(port, "GET", "/v1/status")
        assert missing.status == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.error() == {"code": "unauthorized", "message": "missing bearer token"}
        wrong = raw_tcp(port, "GET", "/v1/status", {"Authorization": "Bearer nope"})
        assert wrong.status == 401
        assert wrong.error()["message"] == "wrong bearer token"
        assert raw_tcp(port, "GET", "/metrics", {"Authorization": f"Basic {token}"}).status == 401
        with pytest.raises(ApiRequestError) as info:
            ApiClient(base_url=f"http://127.0.0.1:{port}", token="wrong").status()
        assert info.value.status == 401
        # The Unix socket needs no token: its mode already limits it to this user.
        assert ApiClient(srv.socket_path).status()["state"] == "idle"
    finally:
        srv.stop()
    with pytest.raises(DaemonNotRunning):
        ApiClient(base_url=f"http://127.0.0.1:{port}", token=token).status()


@pytest.mark.parametrize("token", [None, "", "   "])
def test_tcp_without_token_is_refused(
    tmp_path: Path, backend: FakeBackend, token: str | None
) -> None:
    settings = settings_for(
        tmp_path, tcp_port=free_port(), token=SecretStr(token) if token is not None else None
    )
    srv = ApiServer(backend, settings)
    with pytest.raises(ApiStartError, match="refusing to listen on TCP without a token"):
        srv.start()
    assert not settings.socket.exists()


def test_tcp_port_in_use_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, backend: FakeBackend
) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        settings = settings_for(tmp_path, tcp_port=port, token=SecretStr("t0ken-t0ken"))
        with pytest.raises(ApiStartError, match=f"127.0.0.1:{port}"):
            ApiServer(backend, settings).start()
        assert not settings.socket.exists()
        # The failed start released its lock: a corrected config starts fine.
        ok = ApiServer(backend, settings_for(tmp_path))
        ok.start()
        ok.wait_ready(10)
        ok.stop()
    finally:
        busy.close()


# --- bad requests ---------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}


def test_malformed_json_is_400(server: ApiServer) -> None:
    r = raw(server.socket_path, "POST", "/v1/query", b'{"text": "x", ', JSON)
    assert r.status == 400
    err = r.error()
    assert err["code"] == "bad_request"
    assert err["message"].startswith("malformed JSON body")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"text": "x", "k": 0}, "k: Input should be greater than or equal to 1"),
        ({"text": "x", "k": 1000}, "k: Input should be less than or equal to 100"),
        ({"text": "x", "k": "5"}, "k: Input should be a valid integer"),
        ({"text": "x", "k": True}, "k: Input should be a valid integer"),
        ({"text": 5}, "text: Input should be a valid string"),
        ({"text": ""}, "text: String should have at least 1 character"),
        ({"text": "  \n\t "}, "text: must not be blank"),
        ({"text": "x" * 2001}, "text: String should have at most 2000 characters"),
        ({"k": 3}, "text: Field required"),
        ({"text": "x", "colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"text": "x", "root": "a\x00b"}, "root: must not contain NUL characters"),
        ({"text": "x", "mode": "fuzzy"}, "mode: Input should be 'dense', 'lexical' or 'hybrid'"),
        ({"text": "x", "cwd": "relative/dir"}, "cwd: must be an absolute path"),
        (["text"], "Input should be a valid dictionary"),
    ],
)
def test_invalid_query_is_422(server: ApiServer, body: Any, fragment: str) -> None:
    r = raw(server.socket_path, "POST", "/v1/query", json.dumps(body).encode(), JSON)
    assert r.status == 422, r.body
    err = r.error()
    assert err["code"] == "validation_error"
    assert fragment in err["message"]
    assert err["details"] and all({"loc", "msg", "type"} <= set(d) for d in err["details"])


def test_invalid_query_through_client(client: ApiClient, backend: FakeBackend) -> None:
    with pytest.raises(ApiRequestError) as info:
        client.query("hello", k=0)
    assert info.value.status == 422
    assert "greater than or equal to 1" in info.value.message
    assert not [c for c in backend.calls if c[0] == "query"]


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=1001", "offset=-1", "state=bogus", "limit=ten"]
)
def test_invalid_files_params_are_422(server: ApiServer, query: str) -> None:
    r = raw(server.socket_path, "GET", f"/v1/files?{query}")
    assert r.status == 422
    assert r.error()["message"].startswith("invalid request: query.")


def test_reindex_extra_field_is_422(server: ApiServer) -> None:
    r = raw(server.socket_path, "POST", "/v1/reindex", b'{"paths": ["/x"]}', JSON)
    assert r.status == 422
    assert "paths: Extra inputs are not permitted" in r.error()["message"]


def test_non_json_content_type_is_415(server: ApiServer) -> None:
    r = raw(
        server.socket_path,
        "POST",
        "/v1/query",
        b"text=hello",
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status == 415
    assert "Content-Type: application/json" in r.error()["message"]


def test_oversized_body_with_content_length_is_413(server: ApiServer, backend: FakeBackend) -> None:
    body = json.dumps({"text": "x" * (LIMIT * 2)}).encode()
    r = raw(server.socket_path, "POST", "/v1/query", body, JSON)
    assert r.status == 413
    err = r.error()
    assert err == {
        "code": "payload_too_large",
        "message": f"request body is larger than {LIMIT} bytes",
    }
    assert backend.calls == []


def test_oversized_chunked_body_is_413(server: ApiServer, backend: FakeBackend) -> None:
    # No Content-Length at all: only counting while reading can catch this one.
    conn = UnixHTTPConnection(str(server.socket_path), timeout=5)
    try:
        conn.putrequest("POST", "/v1/query")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        piece = b"x" * 1000
        try:
            conn.send(b'a\r\n{"text": "\r\n')
            for _ in range(LIMIT // len(piece) + 3):
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        except BrokenPipeError:
            # The server may answer 413 and close as soon as the limit is passed, before
            # the rest is sent; the answer is already in our receive buffer, as a browser
            # or curl would read it.
            pass
        resp = conn.getresponse()
        status, body = resp.status, resp.read()
    finally:
        conn.close()
    assert status == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert backend.calls == []


def test_small_chunked_body_is_accepted(server: ApiServer, backend: FakeBackend) -> None:
    conn = UnixHTTPConnection(str(server.socket_path), timeout=5)
    try:
        conn.request(
            "POST",
            "/v1/query",
            body=iter([b'{"text": ', b'"chunked"}']),
            headers={**JSON, "Transfer-Encoding": "chunked"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read())["hits"][0]["snippet"] == "chunked"
    finally:
        conn.close()


def test_lying_content_length_is_413_while_reading(backend: FakeBackend) -> None:
    # A peer (or a proxy) whose Content-Length understates the body: the middleware must
    # count what it reads, not trust the header. Driven at the ASGI level, since an HTTP
    # parser would already cut the body at the declared length.
    app = create_app(backend, max_request_bytes=LIMIT)
    chunks = [b'{"text": "', b"y" * LIMIT, b"y" * LIMIT, b'"}']
    sent: list[Message] = []

    async def receive() -> Message:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/query",
        "raw_path": b"/v1/query",
        "root_path": "",
        "query_string": b"",
        "server": ("localhost", 80),
        "client": None,
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"20")],
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert chunks == [b"y" * LIMIT, b'"}'], "reading stops as soon as the limit is passed"
    assert backend.calls == []


def test_unknown_route_is_404(server: ApiServer) -> None:
    r = raw(server.socket_path, "GET", "/v1/nope")
    assert r.status == 404
    assert r.error() == {"code": "not_found", "message": "no such endpoint: /v1/nope"}
    assert raw(server.socket_path, "GET", "/v2/status").status == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/query"), ("DELETE", "/v1/status"), ("PUT", "/v1/pause"), ("POST", "/metrics")],
)
def test_wrong_method_is_405(server: ApiServer, method: str, path: str) -> None:
    r = raw(server.socket_path, method, path)
    assert r.status == 405
    err = r.error()
    assert err["code"] == "method_not_allowed"
    assert err["message"].startswith(f"{method} is not allowed on {path}; use ")
    assert r.headers["allow"]


@pytest.mark.parametrize(
    "op", ["status", "query", "files", "reindex", "pause", "resume", "metrics"]
)
def test_backend_exception_is_503_and_server_lives(
    client: ApiClient, backend: FakeBackend, op: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend.explode.add(op)
    call = {
        "status": client.status,
        "query": lambda: client.query("x"),
        "files": client.files,
        "reindex": client.reindex,
        "pause": client.pause,
        "resume": client.resume,
        "metrics": client.metrics,
    }[op]
    with pytest.raises(ApiRequestError) as info:
        call()
    assert info.value.status == 503
    assert info.value.code == "internal_error"
    assert info.value.message == INTERNAL_ERROR_MESSAGE
    backend.explode.clear()
    call()  # the server is still up and answers normally
    assert client.status()["api_version"] == API_VERSION


def test_backend_breaking_the_contract_is_503(client: ApiClient, backend: FakeBackend) -> None:
    backend.status = lambda: {"state": "confused"}  # type: ignore[method-assign,assignment,return-value]
    with pytest.raises(ApiRequestError) as info:
        client.status()
    assert info.value.status == 503
    assert client.files()["total"] == 4


def test_concurrent_requests(client: ApiClient) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(10):
                assert client.query("parallel")["hits"]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []


# --- the client stays light ---------------------------------------------------------------------


def test_client_import_pulls_in_nothing_heavy() -> None:
    code = (
        "import sys, repd.api.client; "
        "print(sorted(m for m in ('pydantic', 'fastapi', 'starlette', 'httpx', 'uvicorn', "
        "'anyio', 'structlog') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
