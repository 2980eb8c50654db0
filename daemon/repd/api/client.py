"""Client of the daemon's local API, stdlib only: `repd query` must start in milliseconds.

Nothing heavy is imported here (no pydantic, no httpx, no FastAPI): answers are plain dicts
shaped like the models in ``repd.api.schema``. Its exceptions belong to repd's one error
tree (``repd.errors``, itself stdlib-only), so the CLI maps each to its exit code.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

from repd.errors import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_TEMPFAIL,
    DaemonUnavailable,
    RepdError,
    TransientError,
)

API_PREFIX = "/v1"
#: Backoff while a starting daemon loads its model: 0.1 s, doubling, at most 1 s.
STARTING_FIRST_DELAY_S = 0.1
STARTING_MAX_DELAY_S = 1.0
#: Least seconds a model command waits for its answer (more if the client's timeout is
#: longer): ``use`` answers once the new model is loaded (from the Hugging Face cache, or
#: downloaded), a switch runs the gate's checks (with labeled queries, both models rank
#: them), pruning deletes whole stores; the others wait for the indexer to take them.
MODEL_USE_TIMEOUT_S = 600.0
MODEL_COMMAND_TIMEOUT_S = 60.0
MODEL_SWITCH_TIMEOUT_S = 300.0
MODEL_PRUNE_TIMEOUT_S = 120.0


class ApiClientError(RepdError):
    """Base of everything this client raises (exit code 1 unless a subclass says)."""


class DaemonNotRunning(ApiClientError, DaemonUnavailable):  # noqa: N818 - a state
    """No daemon answers: the socket is missing, or nothing listens on it (exit 3)."""


class DaemonUnresponsive(ApiClientError, TransientError):  # noqa: N818 - a state
    """The daemon accepted the connection but did not answer within the timeout (exit 75)."""


class ApiRequestError(ApiClientError):
    """The daemon answered with a 4xx or 5xx; ``message`` is fit to show as is.

    Exit code: 2 for a request the daemon refused as wrong (4xx: a bad argument, a
    missing token), 75 when it is overloaded or not ready (429, 503), 1 otherwise,
    409 included (a right request the daemon's state does not allow now, such as a
    second model migration).
    """

    def __init__(self, status: int, message: str, code: str = "") -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.message = message
        self.code = code
        if status in (429, 503):
            self.exit_code = EXIT_TEMPFAIL
        elif status == 409:
            self.exit_code = EXIT_ERROR
        elif 400 <= status < 500:
            self.exit_code = EXIT_CONFIG
        else:
            self.exit_code = EXIT_ERROR


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection whose transport is a Unix stream socket."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        # The host only fills the Host header; the socket path decides where we connect.
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        """Open the Unix socket (instead of a TCP connection)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """Talks to a running daemon over its Unix socket, or over TCP with a bearer token.

    ``ApiClient(path)`` for the socket; ``ApiClient(base_url="http://127.0.0.1:PORT",
    token=...)`` for TCP. Each call opens its own connection, so one client may be shared
    by threads.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        timeout: float = 5.0,
        *,
        base_url: str | None = None,
        token: str | None = None,
    ) -> None:
        if (socket_path is None) == (base_url is None):
            raise ValueError("give exactly one of socket_path and base_url")
        self.timeout = timeout
        self._token = token
        self._socket_path = os.fspath(socket_path) if socket_path is not None else None
        self._scheme = self._host = self._prefix = ""
        self._port: int | None = None
        if base_url is not None:
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"base_url must be http(s)://host[:port], not {base_url!r}")
            self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
            self._prefix = parts.path.rstrip("/")

    @property
    def target(self) -> str:
        """Where this client connects, for messages."""
        if self._socket_path is not None:
            return self._socket_path
        port = f":{self._port}" if self._port else ""
        return f"{self._scheme}://{self._host}{port}{self._prefix}"

    # -- the API

    def status(self) -> dict[str, Any]:
        """The daemon's status (``StatusResponse``)."""
        return self._json("GET", f"{API_PREFIX}/status")

    def query(
        self, text: str, k: int = 10, path: str | None = None, root: str | None = None,
        files: bool = False, *, wait_starting: float = 0.0,
        on_wait: Callable[[], None] | None = None, generation: int | None = None,
        mode: str | None = None, cwd: str | None = None,
    ) -> dict[str, Any]:
        """Semantic search (``QueryResponse``); ``files``: one hit per file;
        ``generation``: search that generation instead of the active one; ``mode``:
        dense, lexical or hybrid (None: the generation's default); ``cwd``: the folder a
        relative ``path`` written as a path is relative to (absolute).

        ``wait_starting``: seconds to keep asking a daemon that answers 503 "starting"
        (it is loading its model), with a short backoff; ``on_wait`` is called once,
        when the first such answer comes. After that the 503 is raised as usual.
        """
        body: dict[str, Any] = {"text": text, "k": k}
        if files:
            body["files"] = True
        if generation is not None:
            body["generation"] = generation
        if path is not None:
            body["path"] = path
        if root is not None:
            body["root"] = root
        if mode is not None:
            body["mode"] = mode
        if cwd is not None:
            body["cwd"] = cwd
        deadline = time.monotonic() + wait_starting
        delay = STARTING_FIRST_DELAY_S
        waited = False
        while True:
            try:
                return self._json("POST", f"{API_PREFIX}/query", body)
            except ApiRequestError as exc:
                left = deadline - time.monotonic()
                if exc.code != "starting" or left <= 0:
                    raise
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                time.sleep(min(delay, left))
                delay = min(delay * 2, STARTING_MAX_DELAY_S)

    def files(self, state: str | None = None, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """A page of skipped/failed files (``FilesResponse``)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state is not None:
            params["state"] = state
        return self._json("GET", f"{API_PREFIX}/files?{urlencode(params)}")

    def reindex(self, path: str | None = None) -> dict[str, Any]:
        """Re-read ``path`` or every root (``ActionResponse``)."""
        return self._json("POST", f"{API_PREFIX}/reindex", {} if path is None else {"path": path})

    def pause(self) -> dict[str, Any]:
        """Pause indexing (``ActionResponse``)."""
        return self._json("POST", f"{API_PREFIX}/pause")

    def resume(self) -> dict[str, Any]:
        """Resume indexing (``ActionResponse``)."""
        return self._json("POST", f"{API_PREFIX}/resume")

    def metrics(self) -> str:
        """Prometheus text exposition."""
        return self._request("GET", "/metrics").decode("utf-8", "replace")

    # -- model upgrades: each command raises ApiRequestError 409 (code
    # "migration_refused") when the daemon's state does not allow it now. ``timeout``:
    # seconds to wait for the answer; None waits the client's timeout, or the command's
    # own floor when that is longer.

    def model_status(self) -> dict[str, Any]:
        """Generations and the migration in progress (``ModelStatusResponse``)."""
        return self._json("GET", f"{API_PREFIX}/model")

    def model_use(self, model: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Start migrating to ``model``: a Hugging Face name or an absolute local path
        (``ModelActionResponse``); answers once the daemon has loaded it."""
        return self._json("POST", f"{API_PREFIX}/model/use", {"model": model},
                          timeout=self._command_timeout(timeout, MODEL_USE_TIMEOUT_S))

    def model_switch(
        self, force: bool = False, queries: str | None = None, qrels: str | None = None,
        mapping: str | None = None, *, timeout: float | None = None,
    ) -> dict[str, Any]:
        """Run the gate and make the new generation active (``ModelActionResponse``).

        ``queries`` and ``qrels`` (and optionally ``mapping``): a labeled query set for
        the gate, as absolute paths on the daemon's machine; give both or neither.
        """
        if (queries is None) != (qrels is None):
            raise ValueError("queries and qrels go together: give both or neither")
        if mapping is not None and queries is None:
            raise ValueError("mapping needs queries and qrels")
        body: dict[str, Any] = {"force": force}
        if queries is not None and qrels is not None:
            labels: dict[str, Any] = {"queries": queries, "qrels": qrels}
            if mapping is not None:
                labels["mapping"] = mapping
            body["labels"] = labels
        return self._json("POST", f"{API_PREFIX}/model/switch", body,
                          timeout=self._command_timeout(timeout, MODEL_SWITCH_TIMEOUT_S))

    def model_rollback(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Make the most recently retired generation active again (``ModelActionResponse``)."""
        return self._json("POST", f"{API_PREFIX}/model/rollback",
                          timeout=self._command_timeout(timeout, MODEL_COMMAND_TIMEOUT_S))

    def model_prune(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Delete the retired generations (``ModelActionResponse``)."""
        return self._json("POST", f"{API_PREFIX}/model/prune",
                          timeout=self._command_timeout(timeout, MODEL_PRUNE_TIMEOUT_S))

    def model_abort(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Stop the migration in progress and delete its generation (``ModelActionResponse``)."""
        return self._json("POST", f"{API_PREFIX}/model/abort",
                          timeout=self._command_timeout(timeout, MODEL_COMMAND_TIMEOUT_S))

    def _command_timeout(self, given: float | None, floor: float) -> float:
        return given if given is not None else max(self.timeout, floor)

    # -- plumbing

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._socket_path is not None:
            return UnixHTTPConnection(self._socket_path, timeout)
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None, *,
              timeout: float | None = None) -> dict[str, Any]:
        raw = self._request(method, path, body, timeout=timeout)
        try:
            data = json.loads(raw)
        except ValueError:
            raise ApiClientError(
                f"the daemon at {self.target} sent a reply that is not JSON"
            ) from None
        if not isinstance(data, dict):
            raise ApiClientError(f"the daemon at {self.target} sent an unexpected reply")
        return data

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                 timeout: float | None = None) -> bytes:
        wait = self.timeout if timeout is None else timeout
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        conn = self._connection(wait)
        try:
            conn.request(method, self._prefix + path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(
                f"no daemon answers on {self.target} (repd daemon is not running)"
            ) from None
        except TimeoutError:
            raise DaemonUnresponsive(
                f"the daemon at {self.target} did not answer within {wait:g} s"
            ) from None
        except PermissionError:
            raise ApiClientError(
                f"permission denied on {self.target}: is it another user's?"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ApiClientError(
                f"lost the connection to the daemon at {self.target}: {exc}"
            ) from None
        finally:
            conn.close()
        if response.status >= 400:
            message, code = _error_of(data, response.status, response.reason)
            raise ApiRequestError(response.status, message, code)
        return data


def _error_of(data: bytes, status: int, reason: str) -> tuple[str, str]:
    try:
        error = json.loads(data)["error"]
        return str(error["message"]), str(error.get("code", ""))
    except (ValueError, KeyError, TypeError):
        text = data.decode("utf-8", "replace").strip()
        return (text[:500] or reason or f"HTTP {status}"), ""
