"""``repd model ...`` and the migration line of ``repd status``, against a real API server
(Unix socket, HTTP) over the API tests' fake daemon, with ``repd.cli.main`` run in this
process (the commands only talk to the socket)."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from repd.api.server import ApiServer
from repd.cli import main
from repd.cli_model import bar, render_generations, render_model_status
from repd.cli_status import migration_summary, render_status
from repd.pipeline.modelstate import GateReport
from tests.test_api import FakeBackend, settings_for


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """`main()` configures logging onto pytest's captured stderr: put it back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    structlog.configure(**config)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home of its own (no config file), and no REPD_ variables from the caller."""
    h = tmp_path / "home"
    h.mkdir()
    for key in list(os.environ):
        if key.startswith("REPD_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(h / ".config"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(h / "run"))
    monkeypatch.setenv("TZ", "UTC")
    monkeypatch.setenv("COLUMNS", "80")
    return h


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def server(tmp_path: Path, home: Path, backend: FakeBackend) -> Iterator[ApiServer]:
    srv = ApiServer(backend, settings_for(tmp_path))
    srv.start()
    srv.wait_ready(10)
    yield srv
    srv.stop()


class Terminal(io.StringIO):
    """A stdin that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def not_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO())


def answer(monkeypatch: pytest.MonkeyPatch, reply: str) -> list[str]:
    """Make stdin a terminal where the person types ``reply``; returns the questions."""
    asked: list[str] = []

    def fake_input(prompt: str = "") -> str:
        asked.append(prompt)
        return reply

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("builtins.input", fake_input)
    return asked


def repd(server: ApiServer, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str,
                                                                                       str]:
    """``repd ARGS --socket SOCK``: exit code, stdout, stderr."""
    code = main([*args, "--socket", str(server.socket_path)])
    out, err = capsys.readouterr()
    return code, out, err


# --- status and list ---------------------------------------------------------------------------


def test_status_without_a_migration(server: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = repd(server, capsys, "model", "status")
    assert code == 0, err
    assert out.splitlines() == [
        "active     generation 1: all-MiniLM-L6-v2, dim 384, 120 points",
        "migration  none; `repd model use NAME` starts one",
    ]


def test_status_while_backfilling(server: ApiServer, backend: FakeBackend,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    backend.models.use("BAAI/bge-base-en-v1.5")
    code, out, err = repd(server, capsys, "model", "status")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:4] == [
        "active     generation 1: all-MiniLM-L6-v2, dim 384, 120 points",
        "migration  backfilling: generation 1 → generation 2",
        "new model  BAAI/bge-base-en-v1.5 (BAAI/bge-base-en-v1.5@def)",
        f"progress   {bar(0.4)} 40%  4 of 10 files",
    ]
    assert "rate       2.0 files/s, eta 3s, 48 chunks embedded" in lines
    assert "memory     127 MiB for the second model's weights" in lines
    assert lines[-3].startswith("started    2024-05-01 12:01 (")
    assert lines[-2:] == [
        "next       the active generation keeps answering meanwhile; `repd model abort`",
        "           stops the migration",
    ]
    assert all(len(line) <= 80 for line in lines)


def test_status_json_is_the_api_answer(server: ApiServer, backend: FakeBackend,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    backend.models.use("m2")
    code, out, _ = repd(server, capsys, "model", "status", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["active"] == "1" and data["migration"]["to_generation"] == "2"


def test_list_is_a_table_and_json_an_array(server: ApiServer, backend: FakeBackend,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    backend.models.use("BAAI/bge-base-en-v1.5")
    code, out, _ = repd(server, capsys, "model", "list")
    assert code == 0
    # Not a terminal: whole names, columns as wide as their cells.
    assert out.splitlines() == [
        "ID  STATE     MODEL                  DIM  POINTS  CREATED",
        " 1  active    all-MiniLM-L6-v2       384     120  2024-05-01 12:00",
        " 2  building  BAAI/bge-base-en-v1.5  768       0  2024-05-01 12:01",
    ]
    code, out, _ = repd(server, capsys, "model", "list", "--json")
    assert [g["id"] for g in json.loads(out)] == ["1", "2"]


def test_list_fits_a_narrow_terminal() -> None:
    gens = [{"id": "12", "state": "retired", "model": "/home/ada/models/" + "x" * 80 + "/mini",
             "dim": 384, "points": 1_234_567, "created_at": "2024-05-01T12:00:00Z"}]
    lines = render_generations(gens, 60).splitlines()
    assert all(len(line) <= 60 for line in lines), lines
    assert lines[1].split()[2].startswith("…") and lines[1].split()[2].endswith("/mini")


# --- use, switch, rollback ------------------------------------------------------------------


def test_use_sends_a_local_folder_as_an_absolute_path(
        server: ApiServer, backend: FakeBackend, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    code, out, err = repd(server, capsys, "model", "use", "models/mine")
    assert code == 0, err
    assert backend.models.calls == [("use", str(tmp_path / "models" / "mine"))]
    assert out.splitlines()[0] == (f"migrating to {tmp_path}/models/mine: generation 2 is "
                                   "being built")
    # A second one is refused by the daemon: one line, exit 1 (a state, not a bad argument).
    code, out, err = repd(server, capsys, "model", "use", "BAAI/bge-small-en-v1.5")
    assert code == 1
    assert err.strip() == (f"repd: a migration to {tmp_path}/models/mine is already under "
                           "way; `repd model abort` stops it (HTTP 409)")
    assert backend.models.calls[-1] == ("use", "BAAI/bge-small-en-v1.5")


def test_switch_before_the_backfill_is_done_is_refused(
        server: ApiServer, backend: FakeBackend, capsys: pytest.CaptureFixture[str]) -> None:
    backend.models.use("m2")
    code, _, err = repd(server, capsys, "model", "switch")
    assert code == 1
    assert err.strip() == "repd: the new generation is still backfilling (4 of 10 files) " \
        "(HTTP 409)"


def test_switch_prints_the_gate_and_rollback_undoes_it(
        server: ApiServer, backend: FakeBackend, capsys: pytest.CaptureFixture[str]) -> None:
    backend.models.use("m2")
    backend.models.backfilled()
    code, out, err = repd(server, capsys, "model", "status")
    assert "next       `repd model switch` makes the new generation active" in out
    code, out, err = repd(server, capsys, "model", "switch")
    assert code == 0, err
    assert out.splitlines() == [
        "generation 2 (m2) is active",
        "  passed",
        "  - files: 10 of 10 in the same state in both",
        "  - points: 130 in the new one",
    ]
    code, out, _ = repd(server, capsys, "model", "status")
    assert "retired    generation 1: all-MiniLM-L6-v2, dim 384, 120 points" in out
    assert "`repd model rollback` returns to the newest retired" in out
    code, out, _ = repd(server, capsys, "model", "rollback")
    assert (code, out) == (0, "generation 1 (all-MiniLM-L6-v2) is active again\n")
    assert json.loads(repd(server, capsys, "model", "status", "--json")[1])["active"] == "1"
    assert repd(server, capsys, "model", "prune", "--yes")[0] == 0
    code, out, err = repd(server, capsys, "model", "rollback")
    assert code == 1 and "nothing to roll back to" in err


def test_a_refused_gate_is_explained_then_forced_with_labels(
        server: ApiServer, backend: FakeBackend, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    backend.models.use("m2")
    backend.models.backfilled()
    backend.models.gate_fails = True
    code, _, err = repd(server, capsys, "model", "switch")
    assert code == 1
    assert err.splitlines() == [
        "  REFUSED: a check failed",
        "  - files: 9 of 10 in the same state in both (FAILED)",
        "repd: the gate refused the switch: files: 9 of 10 in the same state; `repd model "
        "switch --force` switches anyway (HTTP 409)",
    ]
    code, out, _ = repd(server, capsys, "model", "status")
    assert "gate       REFUSED: a check failed" in out
    assert "next       `repd model switch --force` switches anyway" in out
    monkeypatch.chdir(tmp_path)
    for name in ("q.jsonl", "qrels.tsv"):
        (tmp_path / name).write_text("x\n")
    code, out, err = repd(server, capsys, "model", "switch", "--force", "--queries", "q.jsonl",
                          "--qrels", "qrels.tsv")
    assert code == 0, err
    assert "  forced: switched although a check failed" in out.splitlines()
    assert "  - nDCG@10 on the labeled queries: active 0.410, new 0.450" in out.splitlines()
    force, labels = backend.calls[-1][1]
    assert force is True
    assert (labels.queries, labels.qrels, labels.mapping) == (
        str(tmp_path / "q.jsonl"), str(tmp_path / "qrels.tsv"), None)


@pytest.mark.parametrize(("args", "message"), [
    (["--qrels", "r.tsv"], "--queries and --qrels go together"),
    (["--mapping", "m.tsv"], "--mapping needs --queries and --qrels"),
    (["--queries", "missing.jsonl", "--qrels", "missing.tsv"], "--queries missing.jsonl: no such"),
])
def test_switch_arguments_are_checked_here(
        server: ApiServer, backend: FakeBackend, capsys: pytest.CaptureFixture[str],
        args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = repd(server, capsys, "model", "switch", *args)
    assert code == 2
    assert err.startswith(f"repd: {message}")
    assert not [c for c in backend.calls if c[0] == "model_switch"]


# --- prune and abort: confirmations ---------------------------------------------------------


def _switched(backend: FakeBackend) -> None:
    backend.models.use("m2")
    backend.models.backfilled()
    backend.models.switch()


def test_prune_without_a_terminal_needs_yes(
        server: ApiServer, backend: FakeBackend, capsys: pytest.CaptureFixture[str],
        not_a_tty: None) -> None:
    _switched(backend)
    code, _, err = repd(server, capsys, "model", "prune")
    assert code == 2
    assert err.strip() == ("repd: repd model prune needs a confirmation and stdin is not a "
                           "terminal; add --yes to go ahead")
    assert ("prune", None) not in backend.models.calls
    code, out, _ = repd(server, capsys, "model", "prune", "--yes")
    assert (code, out) == (0, "pruned 1 retired generation(s)\n")


def test_prune_asks_on_a_terminal(server: ApiServer, backend: FakeBackend,
                                  capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _switched(backend)
    asked = answer(monkeypatch, "n")
    code, out, _ = repd(server, capsys, "model", "prune")
    assert (code, out) == (1, "nothing deleted\n")
    assert asked == ["Delete generation 1 (all-MiniLM-L6-v2, 120 points)? Rolling back to it "
                     "will no longer be possible. [y/N] "]
    assert ("prune", None) not in backend.models.calls
    answer(monkeypatch, "y")
    code, out, _ = repd(server, capsys, "model", "prune")
    assert (code, out) == (0, "pruned 1 retired generation(s)\n")


def test_abort_asks_then_stops_the_migration(server: ApiServer, backend: FakeBackend,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    backend.models.use("m2")
    asked = answer(monkeypatch, "")
    code, out, _ = repd(server, capsys, "model", "abort")
    assert (code, out) == (1, "the migration goes on\n")
    assert asked == ["Stop the migration to m2 and delete generation 2 (4 of 10 files "
                     "embedded)? [y/N] "]
    answer(monkeypatch, "yes")
    code, out, _ = repd(server, capsys, "model", "abort")
    assert (code, out) == (0, "migration to m2 aborted\n")
    assert backend.models.migration is None
    # Nothing left to abort: the daemon says so, nothing is asked.
    asked = answer(monkeypatch, "y")
    code, _, err = repd(server, capsys, "model", "abort")
    assert code == 1 and "no migration to abort" in err and asked == []


# --- without a daemon, without an action ----------------------------------------------------


@pytest.mark.parametrize("args", [["status"], ["list", "--json"], ["use", "m"], ["switch"],
                                  ["rollback"], ["prune", "--yes"], ["abort", "--yes"]])
def test_no_daemon_is_exit_3(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             args: list[str]) -> None:
    code = main(["model", *args, "--socket", str(tmp_path / "none.sock")])
    err = capsys.readouterr().err
    assert code == 3
    assert err.startswith("repd: no daemon answers on ") and "start one with `repd run`" in err
    assert len(err.strip().splitlines()) == 1


def test_model_without_an_action_shows_help(home: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model"]) == 2
    out = capsys.readouterr().out
    for action in ("status", "list", "use", "switch", "rollback", "prune", "abort"):
        assert action in out


# --- `repd status` and the text, state by state -----------------------------------------------


def test_repd_status_has_one_migration_line(server: ApiServer, backend: FakeBackend,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = repd(server, capsys, "status")
    assert code == 0 and "migration" not in out
    backend.models.use("bge-small")
    code, out, _ = repd(server, capsys, "status")
    assert code == 0
    assert ("migration  backfilling: bge-small into generation 2, 40% (4 of 10 files), eta "
            "3s") in out.splitlines()


def _migration(**kw: Any) -> dict[str, Any]:
    m = {"state": "backfilling", "from_generation": "1", "to_generation": "2", "model": "m2",
         "model_id": "m2@x", "files_done": 995, "files_total": 1000, "progress": 0.995,
         "chunks_embedded": 9000, "files_per_s": 12.5, "eta_s": 0.4,
         "model_memory_bytes": None, "gate": None, "message": None,
         "started_at": "2024-05-01T12:00:00Z"}
    return {**m, **kw}


def test_migration_summary_state_by_state() -> None:
    # 99.5% is not "100%", and no "eta 0s".
    assert migration_summary(_migration()) == "backfilling: m2 into generation 2, 99% (995 " \
        "of 1,000 files)"
    assert migration_summary(_migration(state="loading", to_generation=None)) == (
        "loading: m2 into a new generation (loading the model)")
    assert "`repd model switch` makes it active" in migration_summary(_migration(state="ready"))
    refused = {"ok": False, "checks": ["x"], "forced": False}
    assert "the gate refused" in migration_summary(_migration(state="ready", gate=refused))
    assert migration_summary(_migration(state="failed", message="out of memory")) == (
        "failed: m2 into generation 2: out of memory")


def test_model_status_text_for_a_failed_migration_fits_80_columns() -> None:
    ms = {"active": "1", "generations": [
        {"id": "1", "model": "all-MiniLM-L6-v2", "model_id": "a", "dim": 384,
         "state": "active", "points": 10, "created_at": "2024-05-01T12:00:00Z",
         "activated_at": None, "location": "g1"}],
        "migration": _migration(state="failed", message="cannot load the model: " + "y" * 150,
                                model_memory_bytes=3 * 1024**3)}
    text = render_model_status(ms, 80)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "memory     3,072 MiB for the second model's weights" in text
    assert text.splitlines()[-2].startswith("next       `repd model abort` removes what was")
    assert "message    cannot load the model: yyy" in text


def test_status_render_keeps_80_columns_with_a_migration() -> None:
    backend = FakeBackend()
    backend.models.use("sentence-transformers/" + "long-model-name-" * 6)
    st = backend.status().model_dump(mode="json")
    lines = render_status(st, 80).splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert any(line.startswith("migration  backfilling: sentence-transformers/") for line in lines)


def test_gate_report_lines_from_the_daemon_shape() -> None:
    gate = GateReport(ok=True, checks=("a",), ndcg_active=0.5, ndcg_new=None)
    from repd.cli_model import gate_lines
    from repd.service import gate_info

    assert gate_lines(gate_info(gate).model_dump()) == [
        "passed", "- a", "- nDCG@10 on the labeled queries: active 0.500, new -"]


def test_status_says_when_openvino_runs_with_torch() -> None:
    """The full OpenVINO runtime (torch imported) is named; the usual direct one is not."""
    st = FakeBackend().status().model_dump(mode="json")
    st["model"].update(name="all-MiniLM-L6-v2", id="m@1", dim=384, device="cpu",
                       backend="openvino", precision="bf16", runtime="direct")
    assert "dim 384  cpu, openvino bf16\n" in render_status(st, 80)
    st["model"]["runtime"] = "full"
    assert "dim 384  cpu, openvino bf16 (with torch)\n" in render_status(st, 80)
    st["model"].update(backend="torch", precision="f32", runtime=None)
    assert "dim 384  cpu, torch f32\n" in render_status(st, 80)
