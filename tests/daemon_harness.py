"""Runs a real ``repd run`` subprocess for the daemon tests and waits on it through its API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from repd.api.client import ApiClient, ApiClientError
from tests.helpers import cli_env


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll ``pred`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except (ApiClientError, OSError) as exc:
            last_exc = exc
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error {last_exc})")


class DaemonProc:
    """A daemon subprocess with its own XDG folders under ``home``."""

    def __init__(self, home: Path, roots: list[Path], extra_env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        self.home = home
        self.roots = roots
        self.env = cli_env(home, REPD_LOG_FORMAT="json", **(extra_env or {}))
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.log = home / "daemon.log"
        self.socket = home / "run" / "repd" / "repd.sock"
        self._client: ApiClient | None = None

    def start(self, wait_idle: bool = True, timeout: float = 180) -> DaemonProc:
        self.home.mkdir(parents=True, exist_ok=True)
        args = self.args if self.args is not None else [str(r) for r in self.roots]
        self._log_fh = self.log.open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "repd.cli", "run", *args],
                                     env=self.env, stdout=self._log_fh, stderr=subprocess.STDOUT,
                                     text=True)
        if wait_idle:
            self.wait_idle(timeout)
        return self

    @property
    def client(self) -> ApiClient:
        """One client for the life of this object: its calls share a kept connection, as a
        program that talks to the daemon would (a restarted daemon's is replaced)."""
        if self._client is None:
            self._client = ApiClient(self.socket, timeout=30)
        return self._client

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        return self.client.status()

    def wait_idle(self, timeout: float = 180) -> dict[str, Any]:
        def idle() -> dict[str, Any] | None:
            self._check_alive()
            st = self.status()
            q = st["queue"]
            quiet = not (q["pending"] or q["scans"] or q["settling"])
            return st if st["state"] == "idle" and quiet and st["last_scan_at"] else None
        result: dict[str, Any] = wait_for(idle, timeout, "the daemon to become idle")
        return result

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n"
                                 + self.log.read_text()[-4000:])

    def paths_for(self, text: str, k: int = 50) -> list[str]:
        return [h["path"] for h in self.client.query(text, k=k)["hits"]]

    def top_path(self, text: str) -> str | None:
        hits = self.client.query(text, k=1)["hits"]
        return hits[0]["path"] if hits else None

    def rss_kb(self) -> tuple[int, int]:
        """(current RSS, peak RSS) in KiB from /proc."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            # Its log's end tells a slow exit (`stopped` was logged) from a hung step.
            raise AssertionError("daemon did not stop within the timeout; its log ends:\n"
                                 + self.log.read_text()[-2000:]) from None
        self._log_fh.close()
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._log_fh.close()
