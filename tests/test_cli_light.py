"""`repd --help`, `repd --version` and `repd status` must not import torch (or the model);
`repd query` through a daemon imports only the CLI, its stdlib HTTP client and the output."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from repd.api.client import (
    MAX_HEAD_BYTES,
    ApiClient,
    ApiClientError,
    BadReply,
    DaemonNotRunning,
    Reply,
    _exchange,
)
from repd.api.schema import QueryHit, QueryRequest, QueryResponse
from repd.api.server import ApiServer
from repd.cli import build_parser
from repd.settings import ApiSettings
from tests.helpers import cli_env

PROBE = """
import sys
from repd.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "sentence_transformers", "transformers", "qdrant_edge",
                           "fastapi", "uvicorn") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


def heavy_modules(args: list[str], home: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], env=cli_env(home),
                          capture_output=True, text=True, timeout=120)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("HEAVY=")][-1]
    return line.removeprefix("HEAVY=")


def test_help_version_status_config_stay_light(tmp_path: Path) -> None:
    assert heavy_modules(["--help"], tmp_path) == ""
    assert heavy_modules(["--version"], tmp_path) == ""
    assert heavy_modules(["query", "--help"], tmp_path) == ""
    assert heavy_modules(["status"], tmp_path) == ""  # no daemon: exits 3, still light
    assert heavy_modules(["config", "show"], tmp_path) == ""


def test_query_without_index_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "repd.cli", "query", "anything"],
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "nothing is indexed yet" in proc.stderr and "Traceback" not in proc.stderr


def test_invalid_path_glob_is_exit_2_with_the_reason_before_anything_loads(
        tmp_path: Path) -> None:
    for glob, reason in (("docs/[abc.md", "unbalanced '[' at position 6"),
                         ("src/**/*.{py,pyi", "unbalanced '{' at position 10"),
                         (str(tmp_path / "x}.md"), "unbalanced '}'")):
        proc = subprocess.run([sys.executable, "-m", "repd.cli", "query", "anything", "--path",
                               glob], env=cli_env(tmp_path), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"repd: invalid --path glob {glob!r}: {reason}" in proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert heavy_modules(["query", "anything", "--path", "a[b"], tmp_path) == ""


def test_a_path_that_exists_is_taken_literally(tmp_path: Path) -> None:
    odd = tmp_path / "odd[1.md"  # an invalid glob, but a real file
    odd.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "repd.cli", "query", "anything", "--path",
                           str(odd)], env=cli_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert "invalid --path glob" not in proc.stderr
    assert "nothing is indexed yet" in proc.stderr  # got as far as opening the index


def test_query_mode_choices(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "repd.cli", "query", "x", "--mode", "fuzzy"],
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'fuzzy'" in proc.stderr


# --- `repd query` through a daemon: one request, nothing heavy -----------------------------

#: What `repd query` must not import when a daemon answers: the model's stack, the store,
#: the server's stack, the settings and logging stacks, the standard library's HTTP client
#: (with email and ssl), and the modules of the other commands.
NOT_FOR_A_QUERY = (
    "torch", "numpy", "sentence_transformers", "transformers", "qdrant_edge",
    "qdrant_client", "pydantic", "pydantic_settings", "structlog", "fastapi", "uvicorn",
    "starlette", "httpx", "textual", "http.client", "ssl", "email", "tomllib",
    "repd.settings", "repd.log", "repd.engine", "repd.cli_daemon", "repd.cli_eval",
    "repd.cli_model", "repd.cli_roots", "repd.cli_service",
)

QUERY_PROBE = f"""
import sys
from repd.cli import main
code = main(sys.argv[1:])
print("LOADED=" + ",".join(m for m in {NOT_FOR_A_QUERY!r} if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


class OneHitBackend:
    """Answers every query with one fixed hit (the API server's side is not under test)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.texts: list[str] = []

    def query(self, req: QueryRequest) -> QueryResponse:
        self.texts.append(req.text)
        hit = QueryHit(rank=1, score=0.75, root=str(self.root), path="notes/tides.md",
                       start_line=3, end_line=9, snippet="Spring tides follow the moon.")
        return QueryResponse(hits=[hit], took_ms=1.0, generation="1", mode="dense")


@pytest.fixture
def daemon_socket(tmp_path: Path) -> Iterator[OneHitBackend]:
    """An API server on the socket `repd` finds under cli_env(tmp_path)."""
    backend = OneHitBackend(tmp_path / "root")
    server = ApiServer(backend,  # type: ignore[arg-type] - only query is asked for
                       ApiSettings(socket=tmp_path / "run" / "repd" / "repd.sock"))
    server.start()
    server.wait_ready(10)
    try:
        yield backend
    finally:
        server.stop()


def test_query_through_a_daemon_imports_only_what_it_needs(
        tmp_path: Path, daemon_socket: OneHitBackend) -> None:
    proc = subprocess.run([sys.executable, "-c", QUERY_PROBE, "query", "spring", "tides",
                           "--width", "200"], env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert daemon_socket.texts == ["spring tides"]  # answered by the daemon, not locally
    assert "notes/tides.md:3" in proc.stdout and "Spring tides follow the moon." in proc.stdout
    loaded = [ln for ln in proc.stderr.splitlines() if ln.startswith("LOADED=")][-1]
    assert loaded == "LOADED=", f"`repd query` imported {loaded.removeprefix('LOADED=')}"


def test_query_parses_the_same_with_the_light_parser(capsys: pytest.CaptureFixture[str]) -> None:
    full, light = build_parser(), build_parser(light=True)
    for argv in (["query", "tides"], ["query", "a", "b", "-k", "3", "--path", "docs/*.md",
                                       "--root", "/r", "--mode", "lexical", "--files",
                                       "--json", "--local", "--timeout", "2", "--width", "90",
                                       "--socket", "/s", "--config", "/c.toml"]):
        assert vars(full.parse_args(argv)) == vars(light.parse_args(argv))
    outputs = []
    for parser in (full, light):
        for argv in (["query", "--help"], ["query"], ["query", "x", "-k", "many"]):
            with pytest.raises(SystemExit) as exc:
                parser.parse_args(argv)
            captured = capsys.readouterr()
            outputs.append((exc.value.code, captured.out, captured.err))
    assert outputs[:3] == outputs[3:]
    assert "usage: repd query" in outputs[0][1] and "invalid int value: 'many'" in outputs[2][2]


# --- the client's HTTP/1.1 exchange (unit tests over a socket pair) ------------------------


def exchange(reply: bytes, chunks: int = 1) -> Reply:
    """What ``_exchange`` reads when the peer sends ``reply`` (in ``chunks`` writes)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(5)
        step = max(1, len(reply) // chunks)
        for i in range(0, len(reply), step):
            theirs.sendall(reply[i:i + step])
        theirs.shutdown(socket.SHUT_WR)
        got = _exchange(ours, b"GET /v1/status HTTP/1.1\r\n\r\n")
        assert theirs.recv(100) == b"GET /v1/status HTTP/1.1\r\n\r\n"
        return got


@pytest.mark.parametrize("chunks", [1, 7, 1000])
def test_exchange_reads_each_framing(chunks: int) -> None:
    got = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA", chunks)
    assert (got.status, got.reason, got.body) == (200, "OK", b"hello")
    got = exchange(b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: Chunked\r\n\r\n"
                   b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n", chunks)
    assert (got.status, got.reason, got.body) == (404, "Not Found", b"abc0123456789")
    got = exchange(b"HTTP/1.0 503 Service Unavailable\r\n\r\nto the end", chunks)
    assert (got.status, got.body) == (503, b"to the end")
    assert exchange(b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n", chunks).body == b""


@pytest.mark.parametrize(("reply", "message"), [
    (b"", "Remote end closed connection without response"),
    (b"HTTP/1.1 200 OK\r\nContent-Len", "the reply ended inside its reply headers"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.1 reply: 'SSH-2.0-OpenSSH'"),
    (b"HTTP/1.1 100 Continue\r\n\r\n", "unexpected interim reply 100"),
    (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "malformed header line 'no colon'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length '-1'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "5 bytes short of its body"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n", "end with CRLF"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * (MAX_HEAD_BYTES + 10), "reply headers too long"),
])
def test_exchange_refuses_what_is_not_a_reply(reply: bytes, message: str) -> None:
    with pytest.raises(BadReply, match=re.escape(message)):
        exchange(reply)


def test_a_peer_that_hangs_up_is_a_lost_connection_for_the_client(tmp_path: Path) -> None:
    path = tmp_path / "hangup.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def hang_up() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=hang_up)
    thread.start()
    try:
        with pytest.raises(ApiClientError, match=r"lost the connection to the daemon at .*: "
                           r"Remote end closed connection without response"):
            ApiClient(path, timeout=5).status()
    finally:
        thread.join(5)
        listener.close()
    with pytest.raises(DaemonNotRunning):  # nothing listens any more
        ApiClient(path, timeout=5).status()


# --- keep-alive: a run of calls on one connection --------------------------------------------


def test_a_reply_says_whether_its_connection_can_carry_the_next_request() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert exchange(ok).reusable
    assert exchange(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"2\r\nhi\r\n0\r\n\r\n").reusable
    assert not exchange(ok + b"EXTRA").reusable  # bytes after the body: out of step
    assert not exchange(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n"
                        b"hello").reusable
    assert not exchange(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello").reusable
    assert not exchange(b"HTTP/1.1 200 OK\r\n\r\nto the end").reusable


def test_a_run_of_calls_reuses_one_connection_to_the_real_server(
        tmp_path: Path, daemon_socket: OneHitBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    client = ApiClient(tmp_path / "run" / "repd" / "repd.sock", timeout=10)
    assert client.query("first")["hits"][0]["path"] == "notes/tides.md"
    (_, kept), = client._idle
    for i in range(5):
        assert client.query(f"again {i}")["hits"][0]["path"] == "notes/tides.md"
        assert [sock for _, sock in client._idle] == [kept]
    assert daemon_socket.texts == ["first", *(f"again {i}" for i in range(5))]
    # One idle longer than REUSE_WITHIN_S is closed, not reused.
    monkeypatch.setattr("repd.api.client.REUSE_WITHIN_S", -1.0)
    client.query("later")
    assert kept.fileno() == -1 and [sock for _, sock in client._idle] != [kept]
    client.close()
    assert client._idle == []


class ScriptedServer:
    """A Unix socket server that answers each connection's requests as ``script`` says:
    per connection, a list of replies (None: read the request and say nothing)."""

    def __init__(self, path: Path, script: list[list[bytes | None]]) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.script = script
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for replies in self.script:
            conn, _ = self.listener.accept()
            with conn:
                for reply in replies:
                    self.requests.append(conn.recv(65536))
                    if reply is None:
                        conn.recv(65536)  # wait for the client to give up
                        return
                    conn.sendall(reply)
            # the connection closes here without a word: an idle keep-alive timing out

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()


OK_JSON = b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}'


def test_a_kept_connection_the_daemon_closed_is_replaced_and_the_request_sent_again(
        tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    server = ScriptedServer(path, [[OK_JSON], [OK_JSON]])
    try:
        client = ApiClient(path, timeout=5)
        assert client.status() == {}
        assert client.status() == {}  # the kept one is dead: a new connection, same answer
    finally:
        server.close()
    assert len(server.requests) == 2  # each request reached the server exactly once


def test_a_timeout_on_a_kept_connection_is_not_sent_again(tmp_path: Path) -> None:
    from repd.api.client import DaemonUnresponsive

    path = tmp_path / "d.sock"
    server = ScriptedServer(path, [[OK_JSON, None]])
    try:
        client = ApiClient(path, timeout=0.5)
        assert client.status() == {}
        with pytest.raises(DaemonUnresponsive):
            client.status()  # it may be running: a second copy would run it twice
    finally:
        client.close()
        server.close()
    assert len(server.requests) == 2
