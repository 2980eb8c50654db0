"""Model upgrades over the local API: ``/v1/model...`` end to end through a real ApiServer
(the API tests' fake daemon behind it), and DaemonService's translation of the daemon's
model machinery (``repd.pipeline.modelstate``) into the wire models."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from repd.api.backend import ApiError
from repd.api.client import ApiClient, ApiRequestError, DaemonUnresponsive
from repd.api.schema import (
    GateLabelFiles,
    ModelActionResponse,
    ModelStatusResponse,
    QueryRequest,
    StatusResponse,
)
from repd.api.server import ApiServer
from repd.metrics import render_metrics
from repd.pipeline.modelstate import GateLabels, GateReport, MigrationRefused
from repd.service import DaemonService
from tests.test_api import JSON, FakeBackend, FakeModels, raw, settings_for

# --- through the socket --------------------------------------------------------------------


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


def test_model_status_lists_generations(client: ApiClient) -> None:
    out = client.model_status()
    assert out["active"] == "1" and out["migration"] is None
    [gen] = out["generations"]
    assert gen["id"] == "1" and gen["state"] == "active" and gen["dim"] == 384
    assert gen["created_at"].startswith("2024-05-01T12:00:00")
    assert ModelStatusResponse.model_validate(out).generations[0].location == "shards/g0001"


def test_use_starts_a_migration_that_status_shows(client: ApiClient, backend: FakeBackend) -> None:
    res = client.model_use("BAAI/bge-base-en-v1.5")
    assert res == {"ok": True, "message": "migrating to BAAI/bge-base-en-v1.5: generation 2 is "
                   "being built", "generation": "2", "gate": None}
    assert backend.models.calls == [("use", "BAAI/bge-base-en-v1.5")]
    m = client.model_status()["migration"]
    assert m["state"] == "backfilling"
    assert (m["from_generation"], m["to_generation"]) == ("1", "2")
    assert (m["files_done"], m["files_total"], m["progress"]) == (4, 10, 0.4)
    assert m["model_memory_bytes"] == 133_169_152
    # The daemon's status carries the same migration, for `repd status` and the dashboard.
    st = client.status()
    assert st["migration"] == m
    assert StatusResponse.model_validate(st).migration is not None


def test_a_second_use_is_refused_with_409(client: ApiClient) -> None:
    client.model_use("model-a")
    with pytest.raises(ApiRequestError) as info:
        client.model_use("model-b")
    assert info.value.status == 409
    assert info.value.code == "migration_refused"
    assert info.value.message.startswith("a migration to model-a is already under way")
    # A refusal is about the daemon's state, not a bad argument: exit 1, not 2.
    assert info.value.exit_code == 1


def test_switch_then_rollback_then_prune(client: ApiClient, backend: FakeBackend) -> None:
    client.model_use("model-b")
    with pytest.raises(ApiRequestError) as info:
        client.model_switch()
    assert info.value.status == 409 and "still backfilling" in info.value.message
    backend.models.backfilled()
    res = client.model_switch()
    assert res["generation"] == "2" and res["message"] == "generation 2 (model-b) is active"
    assert res["gate"]["ok"] is True
    assert res["gate"]["checks"][0] == "files: 10 of 10 in the same state in both"
    out = client.model_status()
    assert out["active"] == "2" and out["migration"] is None
    assert {g["id"]: g["state"] for g in out["generations"]} == {"1": "retired", "2": "active"}
    assert client.model_rollback()["message"] == "generation 1 (all-MiniLM-L6-v2) is active again"
    assert client.model_status()["active"] == "1"
    assert client.model_prune()["message"] == "pruned 1 retired generation(s)"
    with pytest.raises(ApiRequestError) as info:
        client.model_rollback()
    assert info.value.status == 409 and info.value.message.startswith("nothing to roll back")
    with pytest.raises(ApiRequestError) as info:
        client.model_prune()
    assert info.value.status == 409


def test_switch_sends_labels_and_force(client: ApiClient, backend: FakeBackend) -> None:
    client.model_use("model-b")
    backend.models.backfilled()
    backend.models.gate_fails = True
    with pytest.raises(ApiRequestError) as info:
        client.model_switch(queries="/data/q.jsonl", qrels="/data/qrels.tsv")
    assert info.value.status == 409 and "--force" in info.value.message
    # The refused gate is kept on the migration, for `repd model status`.
    gate = client.model_status()["migration"]["gate"]
    assert gate["ok"] is False and gate["ndcg_new"] == 0.45
    res = client.model_switch(True, "/data/q.jsonl", "/data/qrels.tsv", "/data/map.tsv")
    assert res["gate"]["forced"] is True
    assert backend.calls[-1] == ("model_switch", (True, GateLabelFiles(
        queries="/data/q.jsonl", qrels="/data/qrels.tsv", mapping="/data/map.tsv")))
    assert backend.models.calls[-1] == ("switch", (True, GateLabels(
        Path("/data/q.jsonl"), Path("/data/qrels.tsv"), Path("/data/map.tsv"))))


def test_switch_without_a_body_means_no_force_no_labels(
        server: ApiServer, backend: FakeBackend) -> None:
    r = raw(server.socket_path, "POST", "/v1/model/switch")
    assert r.status == 409
    assert r.error()["code"] == "migration_refused"
    assert backend.calls[-1] == ("model_switch", (False, None))


def test_abort(client: ApiClient, backend: FakeBackend) -> None:
    with pytest.raises(ApiRequestError) as info:
        client.model_abort()
    assert info.value.status == 409 and info.value.message == "no migration to abort"
    client.model_use("model-b")
    assert client.model_abort()["generation"] == "2"
    assert client.model_status()["migration"] is None
    assert [g.id for g in backend.models.generations.values()] == [1]


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/model"), ("POST", "/v1/model/use"), ("POST", "/v1/model/switch"),
    ("POST", "/v1/model/rollback"), ("POST", "/v1/model/prune"), ("POST", "/v1/model/abort"),
])
def test_every_model_endpoint_is_503_while_starting(
        server: ApiServer, backend: FakeBackend, method: str, path: str) -> None:
    backend.starting = True
    body = json.dumps({"model": "m"}).encode() if path.endswith("/use") else None
    r = raw(server.socket_path, method, path, body, JSON if body else None)
    assert r.status == 503
    assert r.error()["code"] == "starting"
    assert backend.models.calls == []


@pytest.mark.parametrize(("body", "fragment"), [
    ({}, "model: Field required"),
    ({"model": ""}, "model: String should have at least 1 character"),
    ({"model": "  \t"}, "model: must not be blank or contain NUL characters"),
    ({"model": "a\x00b"}, "model: must not be blank or contain NUL characters"),
    ({"model": 5}, "model: Input should be a valid string"),
    ({"model": "m", "device": "cuda"}, "device: Extra inputs are not permitted"),
])
def test_invalid_use_is_422(server: ApiServer, backend: FakeBackend, body: Any,
                            fragment: str) -> None:
    r = raw(server.socket_path, "POST", "/v1/model/use", json.dumps(body).encode(), JSON)
    assert r.status == 422, r.body
    assert r.error()["code"] == "validation_error"
    assert fragment in r.error()["message"]
    assert backend.models.calls == []


@pytest.mark.parametrize(("body", "fragment"), [
    ({"force": "yes"}, "force: Input should be a valid boolean"),
    ({"queries": "/q.jsonl"}, "queries: Extra inputs are not permitted"),
    ({"labels": {"queries": "/q.jsonl"}}, "labels.qrels: Field required"),
    ({"labels": {"queries": "q.jsonl", "qrels": "/r.tsv"}},
     "labels.queries: must be an absolute path"),
    ({"labels": {"queries": "/q", "qrels": "/r", "mapping": ""}},
     "labels.mapping: String should have at least 1 character"),
])
def test_invalid_switch_is_422(server: ApiServer, backend: FakeBackend, body: Any,
                               fragment: str) -> None:
    r = raw(server.socket_path, "POST", "/v1/model/switch", json.dumps(body).encode(), JSON)
    assert r.status == 422, r.body
    assert fragment in r.error()["message"]
    assert backend.models.calls == []


def test_query_for_one_generation(client: ApiClient, backend: FakeBackend) -> None:
    client.model_use("model-b")
    assert client.query("x", generation=2)["generation"] == "2"
    assert backend.calls[-1] == ("query", QueryRequest(text="x", generation=2))
    assert client.query("x")["generation"] == "g1"
    assert "generation" not in json.dumps(backend.calls[-1][1].model_dump(exclude_none=True))
    with pytest.raises(ApiRequestError) as info:
        client.query("x", generation=9)
    assert (info.value.status, info.value.code) == (404, "unknown_generation")
    with pytest.raises(ApiRequestError) as info:
        client.query("x", generation=0)
    assert info.value.status == 422


def test_openapi_documents_the_model_endpoints(server: ApiServer) -> None:
    doc = json.loads(raw(server.socket_path, "GET", "/v1/openapi.json").body)
    ops = {(path, method): op for path, item in doc["paths"].items()
           for method, op in item.items()}
    model_ops = {key for key, op in ops.items() if "model" in op.get("tags", [])}
    assert model_ops == {("/v1/model", "get"), ("/v1/model/use", "post"),
                         ("/v1/model/switch", "post"), ("/v1/model/rollback", "post"),
                         ("/v1/model/prune", "post"), ("/v1/model/abort", "post")}
    for key in model_ops - {("/v1/model", "get")}:
        assert "ErrorResponse" in json.dumps(ops[key]["responses"]["409"]), key
    schemas = doc["components"]["schemas"]
    assert {"ModelStatusResponse", "MigrationInfo", "GenerationEntry", "GateInfo",
            "ModelUseRequest", "ModelSwitchRequest", "ModelActionResponse"} <= set(schemas)
    assert "migration" in schemas["StatusResponse"]["properties"]
    assert "generation" in schemas["QueryRequest"]["properties"]


def test_a_slow_switch_outlasts_the_clients_usual_timeout(
        client: ApiClient, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    # The gate may run for minutes: the switch waits its own floor (300 s), not the 1 s
    # the client uses for status; an explicit timeout is still obeyed.
    slow = ApiClient(client.target, timeout=0.5)
    client.model_use("model-b")
    backend.models.backfilled()
    real = backend.models.switch

    def switch(**kw: Any) -> Any:
        time.sleep(1.0)
        return real(**kw)

    monkeypatch.setattr(backend.models, "switch", switch)
    with pytest.raises(DaemonUnresponsive, match=r"within 0\.3 s"):
        slow.model_switch(timeout=0.3)
    time.sleep(1.0)  # let the first switch finish (it switched)
    backend.models.use("model-c")
    backend.models.backfilled()
    assert slow.model_switch()["generation"] == "3"


def test_metrics_show_the_migration() -> None:
    backend = FakeBackend()
    assert "repd_migration_active 0.0" in render_metrics(backend.status(), 0, 0.0)
    assert "repd_migration_progress 0.0" in render_metrics(backend.status(), 0, 0.0)
    backend.models.use("model-b")
    text = render_metrics(backend.status(), 0, 0.0)
    assert "repd_migration_active 1.0" in text
    assert "repd_migration_progress 0.4" in text
    assert "# TYPE repd_migration_progress gauge" in text


# --- DaemonService over a fake daemon --------------------------------------------------------


class FakeStore:
    """Answers every search with one hit."""

    def __init__(self, name: str) -> None:
        self.name = name

    def search(self, vector: Any, limit: int, root: Any = None, path_prefix: Any = None) -> Any:
        payload = {"root": "/r", "path": f"{self.name}.md", "start_line": 1, "end_line": 2,
                   "text": f"from {self.name}"}
        return [SimpleNamespace(score=0.5, payload=payload)]


class FakeGenerations:
    """``Daemon.generations``: a handle per known generation; counts the handles taken."""

    def __init__(self, models: FakeModels) -> None:
        self.models = models
        self.taken: list[int | None] = []

    def for_query(self, generation: int | None) -> Any:
        self.taken.append(generation)
        gen = self.models.active if generation is None else generation
        if gen not in self.models.generations:
            raise LookupError(f"there is no generation {generation} to search")
        return SimpleNamespace(id=gen, store=FakeStore(f"g{gen}"),
                               embed_query=lambda text: [0.0, 1.0])


def fake_daemon(ready: bool = True, models: FakeModels | None = None) -> Any:
    models = models if models is not None else FakeModels()
    # A worker that has published nothing yet, an engine with no model loaded: enough for
    # status, which reads only what the parts publish.
    worker = SimpleNamespace(snapshot=None, indexer=SimpleNamespace(generation=None),
                             paused=threading.Event())
    return SimpleNamespace(
        ready=ready, stopping=False, phase="ready" if ready else "loading model and index",
        worker=worker if ready else None,
        engine=SimpleNamespace(loaded_embedder=None) if ready else None, watcher=None,
        roots=[], started_at=time.monotonic(),
        supervisor=SimpleNamespace(health=list), queue=SimpleNamespace(depth=dict),
        settings=SimpleNamespace(model="all-MiniLM-L6-v2", store=SimpleNamespace(kind="embedded")),
        models=models if ready else None, generations=FakeGenerations(models),
        previous_crash=None)


def test_service_answers_503_until_ready() -> None:
    service = DaemonService(fake_daemon(ready=False))
    for call in (service.model_status, service.model_rollback, service.model_prune,
                 service.model_abort, lambda: service.model_use("m"),
                 lambda: service.model_switch(False, None),
                 lambda: service.query(QueryRequest(text="x"))):
        with pytest.raises(ApiError) as info:
            call()
        assert (info.value.status, info.value.code) == (503, "starting")
    assert service.status().migration is None


def test_service_translates_snapshots_and_refusals() -> None:
    d = fake_daemon()
    service = DaemonService(d)
    res = service.model_use("model-b")
    assert res == ModelActionResponse(message="migrating to model-b: generation 2 is being "
                                      "built", generation="2")
    st = service.model_status()
    assert st.active == "1" and [g.state for g in st.generations] == ["active", "building"]
    assert st.migration is not None and st.migration.progress == pytest.approx(0.4)
    assert service.status().migration == st.migration
    with pytest.raises(ApiError) as info:
        service.model_use("model-c")
    assert (info.value.status, info.value.code) == (409, "migration_refused")
    d.models.backfilled(GateReport(ok=True, checks=("a",)))
    assert service.model_status().migration.state == "ready"  # type: ignore[union-attr]
    res = service.model_switch(False, None)
    assert res.gate is not None and res.gate.checks == ["files: 10 of 10 in the same state in "
                                                        "both", "points: 130 in the new one"]
    # Status is not left a quarter second behind a command.
    assert service.status().migration is None


def test_service_checks_label_files_before_the_gate(tmp_path: Path) -> None:
    d = fake_daemon()
    service = DaemonService(d)
    d.models.use("model-b")
    d.models.backfilled()
    queries, qrels = tmp_path / "q.jsonl", tmp_path / "qrels.tsv"
    queries.write_text("{}\n")
    labels = GateLabelFiles(queries=str(queries), qrels=str(qrels))
    with pytest.raises(ApiError) as info:
        service.model_switch(False, labels)
    assert (info.value.status, info.value.code) == (422, "invalid_labels")
    assert str(qrels) in info.value.message
    qrels.write_text("q\td\t1\n")
    service.model_switch(True, labels)
    assert d.models.calls[-1] == ("switch", (True, GateLabels(queries, qrels, None)))


def test_service_query_takes_one_generation_handle() -> None:
    d = fake_daemon()
    service = DaemonService(d)
    d.models.use("model-b")
    out = service.query(QueryRequest(text="x"))
    assert out.generation == "1" and out.hits[0].path == "g1.md"
    out = service.query(QueryRequest(text="x", generation=2))
    assert out.generation == "2" and out.hits[0].path == "g2.md"
    assert d.generations.taken == [None, 2]
    with pytest.raises(ApiError) as info:
        service.query(QueryRequest(text="x", generation=7))
    assert (info.value.status, info.value.code) == (404, "unknown_generation")
    assert info.value.message == "there is no generation 7 to search"


def test_migration_refused_is_a_repd_error_with_exit_1() -> None:
    assert MigrationRefused("x").exit_code == 1
