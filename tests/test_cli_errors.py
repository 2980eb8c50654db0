"""Issue 7 case 13: every error the CLI can meet is one line on stderr and an exit code
from the one error tree (repd.errors): never a traceback.

Exit codes: 2 config or a refused request, 3 no daemon, 4 degraded, 75 try again later.
The daemon side is the real API server (Unix socket, HTTP) over the API tests' backend;
a daemon that does not answer is a real listening socket that never replies.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from repd.api.schema import StatusResponse
from repd.api.server import ApiServer
from repd.settings import ApiSettings
from tests.helpers import cli_env, run_cli
from tests.test_api import FakeBackend


class DegradedBackend(FakeBackend):
    """A daemon whose worker died: status says ``degraded``."""

    def status(self) -> StatusResponse:
        """The fake's idle status, marked degraded."""
        return super().status().model_copy(update={"state": "degraded"})


def _serve(backend: FakeBackend, sock: Path) -> ApiServer:
    srv = ApiServer(backend, ApiSettings(socket=sock))
    srv.start()
    srv.wait_ready(10)
    return srv


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path / "home")


def _no_traceback(proc: subprocess.CompletedProcess[str], lines: int = 1) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == lines, proc.stderr


def test_status_without_a_daemon_exits_3_and_json_says_down(env: dict[str, str]) -> None:
    proc = run_cli(["status"], env, check=False)
    assert proc.returncode == 3
    assert "no daemon answers" in proc.stderr and "repd run" in proc.stderr
    _no_traceback(proc)
    proc = run_cli(["status", "--json"], env, check=False)
    assert proc.returncode == 3
    out = json.loads(proc.stdout)
    assert out["state"] == "down" and "no daemon answers" in out["error"]


@pytest.mark.parametrize(("backend", "code"), [(FakeBackend, 0), (DegradedBackend, 4)])
def test_status_exit_code_follows_the_daemons_state(
        tmp_path: Path, env: dict[str, str], backend: type[FakeBackend], code: int) -> None:
    sock = tmp_path / "run" / "repd.sock"
    srv = _serve(backend(), sock)
    try:
        for extra in ([], ["--json"]):
            proc = run_cli(["status", "--socket", str(sock), *extra], env, check=False)
            assert proc.returncode == code, proc.stdout + proc.stderr
            assert "Traceback" not in proc.stderr
    finally:
        srv.stop()
    assert json.loads(proc.stdout)["state"] == ("degraded" if code else "idle")


def test_a_refused_request_is_one_line_exit_2(tmp_path: Path, env: dict[str, str]) -> None:
    sock = tmp_path / "run" / "repd.sock"
    srv = _serve(FakeBackend(), sock)
    try:
        proc = run_cli(["reindex", "/not/inside/any/root", "--socket", str(sock)], env,
                       check=False)
    finally:
        srv.stop()
    assert proc.returncode == 2
    assert "is not inside any indexed root" in proc.stderr
    _no_traceback(proc)


@pytest.fixture
def silent_socket(tmp_path: Path) -> Iterator[Path]:
    """A Unix socket that accepts connections and never answers (a daemon stuck busy)."""
    path = tmp_path / "silent.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(16)
    try:
        yield path
    finally:
        srv.close()


@pytest.mark.parametrize("args", [["status"], ["query", "anything"], ["pause"]])
def test_a_daemon_busy_past_the_timeout_is_one_line_exit_75(
        silent_socket: Path, env: dict[str, str], args: list[str]) -> None:
    proc = run_cli([*args, "--socket", str(silent_socket), "--timeout", "1"], env,
                   check=False)
    assert proc.returncode == 75, proc.stderr
    assert "did not answer within 1 s" in proc.stderr
    _no_traceback(proc)


@pytest.mark.parametrize("where", ["env", "file"])
def test_tcp_port_without_token_is_a_config_error_before_the_model_loads(
        tmp_path: Path, env: dict[str, str], where: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    args = ["run", str(root)]
    if where == "env":
        env = {**env, "REPD_API__TCP_PORT": "8765"}
    else:
        cfg = tmp_path / "c.toml"
        cfg.write_text('[api]\ntcp_port = 8765\ntoken = "  "\n')
        args += ["--config", str(cfg)]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "repd.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr  # systemd's RestartPreventExitStatus=2
    assert proc.stderr.startswith("repd: config error: api: ")
    assert "tcp_port is set (8765) but token is not" in proc.stderr
    _no_traceback(proc)
    # Nothing was started: no model, no socket, no data folder.
    assert "loading_model" not in proc.stderr
    assert not (tmp_path / "home" / "data").exists()
    assert time.monotonic() - t0 < 60


def test_server_store_without_url_is_a_config_error(env: dict[str, str]) -> None:
    proc = run_cli(["config", "show"], {**env, "REPD_STORE__KIND": "server"}, check=False)
    assert proc.returncode == 2
    assert "store: " in proc.stderr and "url is not set" in proc.stderr
    _no_traceback(proc)
