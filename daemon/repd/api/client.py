"""Client of the daemon's local API, stdlib only: `repd query` must start in milliseconds.

Nothing heavy is imported here (no pydantic, no httpx, no FastAPI, not even
``http.client``, which brings ``email`` and ``ssl`` along: 15-20 ms to import, more
than the rest of ``repd query``'s imports together): one request is one HTTP/1.1
exchange, written and read here (``_exchange``), on the connection the last call left
open (keep-alive) or a new one. Answers are plain dicts shaped like the models in
``repd.api.schema``. Its exceptions belong to repd's one
error tree (``repd.errors``, itself stdlib-only), so the CLI maps each to its exit code.
"""

from __future__ import annotations

import _socket  # the C module: `socket` adds enums and helpers we do not use (2 ms)
import _thread  # a lock without `threading`'s import
import json
import os
import time
from collections.abc import Callable

from repd.errors import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_TEMPFAIL,
    DaemonUnavailable,
    RepdError,
    TransientError,
)

#: typing.TYPE_CHECKING without importing typing (2 ms): annotations are never evaluated.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

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


#: Most bytes a reply's status line and headers may take (http.client's own bound).
MAX_HEAD_BYTES = 64 * 1024
_RECV_BYTES = 64 * 1024
#: What http.client said when the peer closed the connection before any reply; kept so
#: that the message a person sees did not change with the transport.
NO_REPLY = "Remote end closed connection without response"


#: Idle connections a client keeps for its next calls.
KEEP_IDLE = 4
#: Longest a kept connection may have idled to be used again; an older one is closed
#: instead (the daemon's server closes a connection idle for 5 s, and one it closes
#: just as a request leaves would cost that request a retry).
REUSE_WITHIN_S = 2.0


class BadReply(Exception):  # noqa: N818 - what the peer sent, not an error of ours
    """The peer's bytes are not an HTTP/1.1 reply (mapped to "lost the connection")."""


class Reply:
    """One HTTP reply: status code, reason phrase, body (headers are not kept).

    ``reusable``: the connection may carry another request (HTTP/1.1, the body framed by
    its length or chunks, no ``Connection: close``).
    """

    __slots__ = ("body", "reason", "reusable", "status")

    def __init__(self, status: int, reason: str, body: bytes, reusable: bool = False) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        self.reusable = reusable


class _Reader:
    """Buffered reads from a socket, for one reply."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def more(self) -> bool:
        """Read what has arrived into the buffer; False at the end of the stream."""
        data = self.sock.recv(_RECV_BYTES)
        self.buf += data
        return bool(data)

    def until(self, mark: bytes, limit: int, what: str) -> bytes:
        """Bytes up to ``mark`` (consumed, not returned), at most ``limit`` of them."""
        while (end := self.buf.find(mark)) < 0:
            if len(self.buf) > limit:
                raise BadReply(f"{what} too long")
            if not self.more():
                raise BadReply(NO_REPLY if not self.buf and what == "reply headers"
                               else f"the reply ended inside its {what}")
        out = bytes(self.buf[:end])
        del self.buf[:end + len(mark)]
        return out

    def exactly(self, n: int) -> bytes:
        """The next ``n`` bytes."""
        while len(self.buf) < n:
            if not self.more():
                raise BadReply(f"the reply ended {n - len(self.buf)} bytes short of its body")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def rest(self) -> bytes:
        """Everything until the peer closes the connection."""
        while self.more():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out


def _exchange(sock: _socket.socket, request: bytes) -> Reply:
    """Send one request and read its reply.

    The body is framed by Content-Length, by chunked transfer coding, or by the end of
    the connection, as HTTP/1.1 says; a 1xx interim reply (never asked for) is an error.
    """
    sock.sendall(request)
    reader = _Reader(sock)
    head = reader.until(b"\r\n\r\n", MAX_HEAD_BYTES, "reply headers").decode("iso-8859-1")
    status_line, *lines = head.split("\r\n")
    version, _, tail = status_line.partition(" ")
    code, _, reason = tail.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise BadReply(f"not an HTTP/1.1 reply: {status_line[:80]!r}")
    status = int(code)
    if status < 200:
        raise BadReply(f"unexpected interim reply {status}")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise BadReply(f"malformed header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    # Reusable only where nothing but a next reply can follow the body (no extra bytes).
    framed = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    if status in (204, 304):
        return Reply(status, reason, b"", framed and not reader.buf)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(reader)
        return Reply(status, reason, body, framed and not reader.buf)
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise BadReply(f"invalid Content-Length {length[:40]!r}")
        body = reader.exactly(int(length))
        return Reply(status, reason, body, framed and not reader.buf)
    return Reply(status, reason, reader.rest())


def _dechunk(reader: _Reader) -> bytes:
    body = bytearray()
    while True:
        size_line = reader.until(b"\r\n", 1024, "chunk size").split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise BadReply(f"invalid chunk size {size_line[:40]!r}") from None
        if size == 0:
            while reader.until(b"\r\n", MAX_HEAD_BYTES, "trailers"):
                pass  # trailers, ignored
            return bytes(body)
        body += reader.exactly(size)
        if reader.exactly(2) != b"\r\n":
            raise BadReply("a chunk does not end with CRLF")


class ApiClient:
    """Talks to a running daemon over its Unix socket, or over TCP with a bearer token.

    ``ApiClient(path)`` for the socket; ``ApiClient(base_url="http://127.0.0.1:PORT",
    token=...)`` for TCP. A call takes a connection for itself (one an earlier call left
    open, or a new one) and leaves it for the next when the reply allows: one client may
    be shared by threads, and a run of calls skips a connect and an accept each (~0.8 ms
    of a query's 9 through the API, ``bench/bench_cli_query.py``). :meth:`close` closes
    the connections kept.
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
            from urllib.parse import urlsplit

            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"base_url must be http(s)://host[:port], not {base_url!r}")
            self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
            self._prefix = parts.path.rstrip("/")
        #: Open connections no call is using, with when each was last used.
        self._idle: list[tuple[float, Any]] = []
        self._idle_lock = _thread.allocate_lock()

    def close(self) -> None:
        """Close the connections kept for later calls (a later call opens a new one)."""
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for _, sock in idle:
            sock.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Most clients live for one call or one command: what they kept goes with them,
        # closed, not left to the socket's finalizer (a ResourceWarning each).
        if getattr(self, "_idle", None):
            self.close()

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
        from urllib.parse import urlencode

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

    def _connect(self, timeout: float) -> _socket.socket:
        if self._socket_path is not None:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self._socket_path)
            except BaseException:
                sock.close()
                raise
            return sock
        import socket  # TCP only

        port = self._port or (443 if self._scheme == "https" else 80)
        sock = socket.create_connection((self._host, port), timeout)
        if self._scheme != "https":
            return sock
        import ssl  # only for https: ~10 ms to import

        context = ssl.create_default_context()
        context.set_alpn_protocols(["http/1.1"])
        try:
            return context.wrap_socket(sock, server_hostname=self._host)
        except BaseException:
            sock.close()
            raise

    def _host_header(self) -> str:
        if self._socket_path is not None:
            return "localhost"  # as http.client wrote it; the server does not look
        default = 443 if self._scheme == "https" else 80
        host = f"[{self._host}]" if ":" in self._host else self._host
        return host if self._port in (None, default) else f"{host}:{self._port}"

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
        target = self._prefix + path
        if any(c <= " " or c == "\x7f" for c in target):
            raise ValueError(f"URL can't contain control characters: {target!r}")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header()}",
                 "Accept-Encoding: identity", "Accept: application/json"]
        payload = b""
        if body is not None:
            payload = json.dumps(body).encode("utf-8")
            lines.append("Content-Type: application/json")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(payload)}")
        if self._token is not None:
            if any(c in self._token for c in "\r\n\0"):
                raise ValueError("the API token must not contain line breaks or NUL")
            lines.append(f"Authorization: Bearer {self._token}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + payload
        sock = self._kept(wait)
        if sock is not None:
            try:
                return self._exchange_on(sock, request, wait, kept=True)
            except _Unanswered:
                pass  # the daemon had closed it (idle too long, a restart): on a new one
        return self._exchange_on(self._open(wait), request, wait, kept=False)

    def _open(self, wait: float) -> Any:
        """A new connection, or the error that says why there is none."""
        try:
            return self._connect(wait)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(
                f"no daemon answers on {self.target} (repd daemon is not running)"
            ) from None
        except TimeoutError:
            raise self._unresponsive(wait) from None
        except PermissionError:
            raise ApiClientError(
                f"permission denied on {self.target}: is it another user's?"
            ) from None
        except OSError as exc:
            raise self._lost(exc) from None

    def _exchange_on(self, sock: Any, request: bytes, wait: float, kept: bool) -> bytes:
        """``request`` over ``sock``, which is then kept for a later call or closed."""
        try:
            reply = _exchange(sock, request)
        except (OSError, BadReply) as exc:
            sock.close()
            if kept and _unanswered(exc):
                raise _Unanswered from None
            if isinstance(exc, TimeoutError):  # never sent again: it may be running
                raise self._unresponsive(wait) from None
            raise self._lost(exc) from None
        except BaseException:
            sock.close()
            raise
        return self._answer(sock, reply)

    def _unresponsive(self, wait: float) -> DaemonUnresponsive:
        return DaemonUnresponsive(f"the daemon at {self.target} did not answer within {wait:g} s")

    def _lost(self, exc: BaseException) -> ApiClientError:
        return ApiClientError(f"lost the connection to the daemon at {self.target}: {exc}")

    def _kept(self, wait: float) -> Any:
        """A kept connection fit to use (its timeout set to ``wait``), or None."""
        now = time.monotonic()
        with self._idle_lock:
            while self._idle:
                since, sock = self._idle.pop()
                if now - since <= REUSE_WITHIN_S:
                    sock.settimeout(wait)
                    return sock
                sock.close()
        return None

    def _answer(self, sock: Any, reply: Reply) -> bytes:
        """Keep ``sock`` for a later call if ``reply`` allows; the body, or the error it says."""
        if reply.reusable:
            with self._idle_lock:
                if len(self._idle) < KEEP_IDLE:
                    self._idle.append((time.monotonic(), sock))
                    sock = None
        if sock is not None:
            sock.close()
        if reply.status >= 400:
            message, code = _error_of(reply.body, reply.status, reply.reason)
            raise ApiRequestError(reply.status, message, code)
        return reply.body


class _Unanswered(Exception):  # noqa: N818 - a signal between two methods
    """A kept connection failed before any reply: the request was not read."""


def _unanswered(exc: BaseException) -> bool:
    """Whether ``exc`` on a kept connection means the daemon had closed it unread."""
    if isinstance(exc, BadReply):
        return str(exc) == NO_REPLY  # closed with nothing sent back
    return isinstance(exc, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError))


def _error_of(data: bytes, status: int, reason: str) -> tuple[str, str]:
    try:
        error = json.loads(data)["error"]
        return str(error["message"]), str(error.get("code", ""))
    except (ValueError, KeyError, TypeError):
        text = data.decode("utf-8", "replace").strip()
        return (text[:500] or reason or f"HTTP {status}"), ""
