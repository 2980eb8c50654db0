"""The daemon's HTTP API: the FastAPI app, its error contract, and the Unix-socket/TCP listeners."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import hmac
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError, ResponseValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from repd.api.backend import ApiError, Backend
from repd.api.guard import (
    ConnectionGuard,
    connection_cap,
    guarded_protocol,
    install_log_limits,
    raise_nofile_limit,
)
from repd.api.schema import (
    ABSOLUTE_PATH_PATTERN,
    API_VERSION,
    MODEL_NAME_PATTERN,
    NO_NUL_PATTERN,
    NOT_BLANK_PATTERN,
    ActionResponse,
    ErrorDetail,
    ErrorResponse,
    FilesResponse,
    IssueState,
    ModelActionResponse,
    ModelStatusResponse,
    ModelSwitchRequest,
    ModelUseRequest,
    QueryRequest,
    QueryResponse,
    ReindexRequest,
    StatusResponse,
    ValidationIssue,
)
from repd.errors import ConfigError
from repd.log import get_logger
from repd.settings import ApiSettings

log = get_logger("api")

T = TypeVar("T")

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
INTERNAL_ERROR_MESSAGE = "internal error, see daemon log"
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024
# Linux's sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_PATH_BYTES = 107

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "internal_error",
}


def _code_for(status: int) -> str:
    return _CODES.get(status, "client_error" if status < 500 else "server_error")


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    details: list[ValidationIssue] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The one shape of every error: ``{"error": {"code": ..., "message": ...}}``."""
    body = ErrorResponse(
        error=ErrorDetail(code=code or _code_for(status), message=message, details=details)
    )
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True), status_code=status, headers=headers
    )


# --- pure ASGI middlewares ----------------------------------------------------------------
# Both run before routing and before FastAPI reads the body, so an unauthenticated or
# oversized request costs the daemon no parsing and no backend call.


class BearerAuthMiddleware:
    """Answers 401 unless ``Authorization: Bearer <token>`` matches (constant-time compare)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    supplied = credentials.strip()
                break
        # compare_digest on bytes: timing does not reveal how much of the token matched.
        if supplied and hmac.compare_digest(supplied, self._token):
            await self.app(scope, receive, send)
            return
        message = "wrong bearer token" if supplied else "missing bearer token"
        response = error_response(401, message, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class BodyLimitMiddleware:
    """Answers 413 for a body over ``max_bytes``: by Content-Length, and while reading it.

    Content-Length alone is not enough: a chunked body has none. The body is read here,
    counted, and replayed to the app; it is bounded by ``max_bytes``, so buffering is cheap.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._reject(scope, receive, send, 400, "invalid Content-Length header")
                    return
                if declared > self.max_bytes:
                    await self._too_large(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._reject(
            scope, receive, send, 413, f"request body is larger than {self.max_bytes} bytes"
        )

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, status: int, msg: str) -> None:
        # Connection: close, since the rest of an unread body must not be taken for the
        # next request on a kept-alive connection.
        response = error_response(status, msg, headers={"Connection": "close"})
        await response(scope, receive, send)


# --- the app -------------------------------------------------------------------------------


class _BackendError(Exception):
    """The backend raised something unexpected; already logged, answered with 503."""


def _guard(op: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except ApiError:
        raise
    except Exception as exc:
        log.exception("api_backend_error", op=op, error=repr(exc))
        raise _BackendError(op) from exc


def _where(loc: Sequence[Any]) -> str:
    parts = list(loc)
    if len(parts) > 1 and parts[0] == "body":
        parts = parts[1:]  # "k", not "body.k": the body is the obvious place
    return ".".join(str(p) for p in parts) or "request"


# A regex in an error message helps nobody; these are the patterns schema.py uses.
_PATTERN_MEANING = {
    NOT_BLANK_PATTERN: "must not be blank",
    NO_NUL_PATTERN: "must not contain NUL characters",
    MODEL_NAME_PATTERN: "must not be blank or contain NUL characters",
    ABSOLUTE_PATH_PATTERN: "must be an absolute path (the daemon's working folder is not "
    "yours), without NUL characters",
}


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    for err in errors:
        if err.get("type") == "json_invalid":
            loc = err.get("loc", ())
            pos = f" at position {loc[1]}" if len(loc) > 1 else ""
            reason = (err.get("ctx") or {}).get("error", "JSON decode error")
            return error_response(400, f"malformed JSON body: {reason}{pos}")
    for err in errors:
        # FastAPI hands the raw bytes to validation when the Content-Type is not JSON.
        if tuple(err.get("loc", ())) == ("body",) and isinstance(err.get("input"), bytes):
            return error_response(
                415, "the request body must be JSON, sent with Content-Type: application/json"
            )
    details = [
        ValidationIssue(
            loc=[p if isinstance(p, int) else str(p) for p in err.get("loc", ())],
            msg=_PATTERN_MEANING.get(str((err.get("ctx") or {}).get("pattern")))
            or str(err.get("msg", "")),
            type=str(err.get("type", "")),
        )
        for err in errors
    ]
    message = "invalid request: " + "; ".join(f"{_where(d.loc)}: {d.msg}" for d in details)
    return error_response(422, message, details=details)


def _install_error_handlers(app: FastAPI) -> None:
    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        headers = dict(exc.headers) if exc.headers else None
        detail = str(exc.detail)
        if status == 404:
            detail = f"no such endpoint: {request.url.path}"
        elif status == 405:
            allowed = (headers or {}).get("Allow", "")
            detail = f"{request.method} is not allowed on {request.url.path}" + (
                f"; use {allowed}" if allowed else ""
            )
        return error_response(status, detail, headers=headers)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _validation_response(exc)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.message, code=exc.code)

    async def on_backend_failure(request: Request, exc: Exception) -> Response:
        return error_response(503, INTERNAL_ERROR_MESSAGE)

    async def on_bad_response(request: Request, exc: Exception) -> Response:
        # The backend returned data that breaks the wire contract: a daemon bug.
        assert isinstance(exc, ResponseValidationError)
        log.error("api_bad_response", path=request.url.path, errors=str(exc.errors())[:2000])
        return error_response(503, INTERNAL_ERROR_MESSAGE)

    async def on_anything(request: Request, exc: Exception) -> Response:
        # Last resort, reached only by a bug in this module: still a JSON 503, not a 500 page.
        log.error("api_unhandled_error", path=request.url.path, error=repr(exc))
        return error_response(503, INTERNAL_ERROR_MESSAGE)

    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(_BackendError, on_backend_failure)
    app.add_exception_handler(ResponseValidationError, on_bad_response)
    app.add_exception_handler(Exception, on_anything)


def _error_docs(*statuses: int) -> dict[int | str, dict[str, Any]]:
    docs: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": _code_for(status).replace("_", " ")}
        for status in statuses
    }
    docs[503] = {"model": ErrorResponse, "description": INTERNAL_ERROR_MESSAGE}
    docs["default"] = {"model": ErrorResponse, "description": "any other error"}
    return docs


def create_app(
    backend: Backend,
    token: str | None = None,
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """Build the API app over ``backend``; with ``token``, every request needs that bearer token.

    Endpoints are plain ``def``: FastAPI runs them in its thread pool, so a blocking backend
    call never stalls the event loop.
    """
    app = FastAPI(
        title="repd local API",
        version=str(API_VERSION),
        description="Status, search and control of a running repd daemon.",
        docs_url=None,  # the UIs load scripts from a CDN; the daemon serves no web pages
        redoc_url=None,
    )
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    if token is not None:
        if not token.strip():
            raise ValueError("token must not be blank")
        app.add_middleware(BearerAuthMiddleware, token=token)  # outermost: checked first

    @app.get("/v1/status", responses=_error_docs(), tags=["daemon"])
    def get_status() -> StatusResponse:
        """The daemon's state, queues, rates and totals."""
        return _guard("status", backend.status)

    @app.post("/v1/query", responses=_error_docs(400, 404, 413, 415, 422), tags=["search"])
    async def post_query(req: QueryRequest) -> QueryResponse:
        """Semantic search over the active index generation (or the one named in
        ``generation``: 404 with code ``unknown_generation`` when it cannot be searched)."""
        # The search blocks (the model, the store): it runs in the thread pool, as a plain
        # `def` endpoint would. Being async saves the second trip through the pool that
        # FastAPI takes to validate a plain endpoint's answer: the answer (a few hits) is
        # checked here, on the event loop, and a query pays one thread hand-off, not two.
        return await run_in_threadpool(_guard, "query", lambda: backend.query(req))

    @app.get("/v1/files", responses=_error_docs(422), tags=["daemon"])
    def get_files(
        state: Annotated[
            IssueState | None, Query(description="only skipped or only failed files")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
        offset: Annotated[int, Query(ge=0, le=1_000_000_000, description="items to skip")] = 0,
    ) -> FilesResponse:
        """Files that are not indexed, and why."""
        return _guard("files", lambda: backend.files(state, limit, offset))

    @app.post("/v1/reindex", responses=_error_docs(400, 404, 413, 415, 422), tags=["control"])
    def post_reindex(req: ReindexRequest | None = None) -> ActionResponse:
        """Re-read a file, a folder, or (no body or no path) every root."""
        path = req.path if req is not None else None
        return _guard("reindex", lambda: backend.reindex(path))

    @app.post("/v1/pause", responses=_error_docs(), tags=["control"])
    def post_pause() -> ActionResponse:
        """Stop taking new work from the queue; changes are still watched and queued."""
        return _guard("pause", backend.pause)

    @app.post("/v1/resume", responses=_error_docs(), tags=["control"])
    def post_resume() -> ActionResponse:
        """Undo pause."""
        return _guard("resume", backend.resume)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            **_error_docs(),
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text format 0.0.4",
            },
        },
        tags=["daemon"],
    )
    def get_metrics() -> PlainTextResponse:
        """Prometheus metrics (text exposition format 0.0.4)."""
        return PlainTextResponse(
            _guard("metrics", backend.metrics), media_type=METRICS_CONTENT_TYPE
        )

    @app.get("/v1/openapi.json", include_in_schema=False)
    def get_openapi() -> JSONResponse:
        """This API's OpenAPI document (the same as /openapi.json)."""
        return JSONResponse(app.openapi())

    _add_model_routes(app, backend)
    _refine_openapi(app, bearer=token is not None)
    return app


def _add_model_routes(app: FastAPI, backend: Backend) -> None:
    """``/v1/model...``: generations and migrations to another embedding model.

    The commands answer 409 (code ``migration_refused``) when the daemon's state does not
    allow them now (a second migration, nothing to roll back to...); the message says why.
    """
    # 409: refused in this state; 503 (code "starting") until the daemon is ready.
    refusals = _error_docs(409)

    @app.get("/v1/model", responses=_error_docs(), tags=["model"])
    def get_model() -> ModelStatusResponse:
        """The generations (active, building, retired) and the migration in progress."""
        return _guard("model_status", backend.model_status)

    @app.post("/v1/model/use", responses=_error_docs(400, 409, 413, 415, 422), tags=["model"])
    def post_model_use(req: ModelUseRequest) -> ModelActionResponse:
        """Start migrating to another model: answers once the model is loaded; the new
        generation is then built in the background while the active one answers queries."""
        return _guard("model_use", lambda: backend.model_use(req.model))

    @app.post("/v1/model/switch", responses=_error_docs(400, 409, 413, 415, 422),
              tags=["model"])
    def post_model_switch(req: ModelSwitchRequest | None = None) -> ModelActionResponse:
        """Run the gate's checks and make the backfilled generation the active one (the
        previous one is kept, retired, for rollback). May take minutes with labels."""
        req = req if req is not None else ModelSwitchRequest()
        return _guard("model_switch", lambda: backend.model_switch(req.force, req.labels))

    @app.post("/v1/model/rollback", responses=refusals, tags=["model"])
    def post_model_rollback() -> ModelActionResponse:
        """Make the most recently retired generation active again (nothing is embedded)."""
        return _guard("model_rollback", backend.model_rollback)

    @app.post("/v1/model/prune", responses=refusals, tags=["model"])
    def post_model_prune() -> ModelActionResponse:
        """Delete the retired generations: their points, rows and cached vectors."""
        return _guard("model_prune", backend.model_prune)

    @app.post("/v1/model/abort", responses=refusals, tags=["model"])
    def post_model_abort() -> ModelActionResponse:
        """Stop the migration in progress and delete the generation it was building."""
        return _guard("model_abort", backend.model_abort)


def _refine_openapi(app: FastAPI, *, bearer: bool) -> None:
    """Fix what FastAPI cannot say by itself in the OpenAPI document."""
    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain_openapi()
            # FastAPI documents every response of a text/plain route as text/plain, but
            # the errors of /metrics are JSON like everyone else's.
            error_json = {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
            }
            for status, response in schema["paths"]["/metrics"]["get"]["responses"].items():
                if status != "200":
                    response["content"] = error_json
            if bearer:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}
                }
                schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# --- the listeners -------------------------------------------------------------------------


class ApiStartError(RuntimeError):
    """The API cannot start; the message says why and what to do about it."""


class ApiServer:
    """Serves the API on a Unix socket (and, if configured, on 127.0.0.1:tcp_port with a token).

    ``start()`` binds everything in the calling thread, so that configuration problems
    raise there, then serves from a background thread with its own event loop.
    """

    def __init__(self, backend: Backend, settings: ApiSettings) -> None:
        self._backend = backend
        self._settings = settings
        self._socket_path = settings.socket.expanduser().absolute()
        self._lock_path = self._socket_path.with_name(self._socket_path.name + ".lock")
        self._lock_fd: int | None = None
        self._socket_id: tuple[int, int] | None = None
        self._listeners: list[tuple[socket.socket, FastAPI]] = []
        self._servers: list[uvicorn.Server] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._tcp_address: tuple[str, int] | None = None
        self._guard = ConnectionGuard(1)  # replaced in start(), sized by the fd limit

    @property
    def socket_path(self) -> Path:
        """The Unix socket the API listens on."""
        return self._socket_path

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the TCP listener, or None when there is none."""
        return self._tcp_address

    def start(self) -> None:
        """Bind the listeners and start serving in a background thread.

        Raises ApiStartError when TCP is asked for without a token, when another daemon
        already answers on the socket, or when a path or port cannot be used; ConfigError
        when ``api.socket_group`` names no group, or one this user cannot give files to.
        """
        if self._thread is not None:
            raise RuntimeError("ApiServer.start() called twice")
        token = self._settings.token.get_secret_value() if self._settings.token else None
        port = self._settings.tcp_port
        if port is not None and not (token and token.strip()):
            raise ApiStartError(
                f"api.tcp_port is set ({port}) but api.token is not: refusing to listen on TCP "
                "without a token; set api.token (REPD_API__TOKEN) or unset api.tcp_port"
            )
        limit = self._settings.max_request_bytes
        # Before binding: the connection cap is sized from the descriptor limit.
        raise_nofile_limit()
        install_log_limits()
        self._guard = ConnectionGuard(connection_cap())
        try:
            self._prepare_runtime_dir()
            self._acquire_lock()
            self._remove_stale_socket()
            unix_sock = self._bind_unix()
            self._listeners.append(
                (unix_sock, create_app(self._backend, None, max_request_bytes=limit))
            )
            if port is not None and token is not None:
                tcp_sock = self._bind_tcp(port)
                self._listeners.append(
                    (tcp_sock, create_app(self._backend, token, max_request_bytes=limit))
                )
        except BaseException:
            self._cleanup()
            raise
        protocol = guarded_protocol(self._guard)  # one guard: descriptors are per process
        for _, app in self._listeners:
            config = uvicorn.Config(
                app,
                log_config=None,  # logging belongs to repd.log, not to uvicorn
                access_log=False,
                lifespan="off",
                http=protocol,  # h11, with a request deadline and a connection cap
                # asyncio accepts up to `backlog` sockets per wake-up before any protocol
                # runs: kept near the cap so a burst cannot take every descriptor at once.
                backlog=max(8, self._guard.cap),
                loop="asyncio",
                ws="none",
                proxy_headers=False,
                server_header=False,
                timeout_graceful_shutdown=3,
            )
            self._servers.append(uvicorn.Server(config))
        self._thread = threading.Thread(target=self._run, name="repd-api", daemon=True)
        self._thread.start()
        log.info(
            "api_listening",
            socket=str(self._socket_path),
            tcp=f"127.0.0.1:{port}" if port is not None else None,
        )

    def alive(self) -> bool:
        """True while the serving thread runs (the supervisor restarts a dead one)."""
        return self._thread is not None and self._thread.is_alive()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until every listener accepts requests; raise ApiStartError or TimeoutError."""
        if self._thread is None:
            raise RuntimeError("ApiServer.wait_ready() before start()")
        deadline = time.monotonic() + timeout
        while True:
            if self._error is not None:
                raise ApiStartError(f"the API server failed: {self._error!r}") from self._error
            if all(server.started for server in self._servers):
                return
            if not self._thread.is_alive():
                raise ApiStartError("the API server thread exited before it was ready")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the API server was not ready within {timeout:g} s")
            time.sleep(0.005)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish in-flight requests (up to ``timeout``), close listeners, unlink the socket."""
        for server in self._servers:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                for server in self._servers:
                    server.force_exit = True
                self._thread.join(2.0)
            if self._thread.is_alive():
                log.warning("api_stop_timeout", timeout_s=timeout)
        self._cleanup()

    # -- serving thread

    def _run(self) -> None:
        try:
            asyncio.run(self._serve_all())
        except BaseException as exc:  # SystemExit too: uvicorn exits on startup failure
            self._error = exc
            log.error("api_server_crashed", error=repr(exc))

    async def _serve_all(self) -> None:
        # accept() failing for want of descriptors is reported here every second: held to
        # one log line per LOG_EVERY_S (it once wrote 22 MB in 10 s).
        asyncio.get_running_loop().set_exception_handler(self._guard.on_loop_error)
        await asyncio.gather(
            *(
                server.serve(sockets=[sock])
                for server, (sock, _) in zip(self._servers, self._listeners, strict=True)
            )
        )

    # -- binding

    def _prepare_runtime_dir(self) -> None:
        parent = self._socket_path.parent
        if len(os.fsencode(self._socket_path)) > _MAX_UNIX_PATH_BYTES:
            raise ApiStartError(
                f"socket path {self._socket_path} is longer than the {_MAX_UNIX_PATH_BYTES} "
                "bytes a Unix socket allows; set api.socket to a shorter path"
            )
        if not parent.exists():
            parent.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                parent.mkdir(mode=0o700)
                parent.chmod(0o700)  # mkdir's mode is filtered by the umask
        st = parent.stat()
        if not stat.S_ISDIR(st.st_mode):
            raise ApiStartError(f"{parent} is not a directory; cannot put the API socket there")
        # Whoever can write the folder can swap the socket for their own: it must be ours
        # and closed to others (this also defeats a pre-created /tmp/repd-UID).
        if st.st_uid != os.getuid():
            raise ApiStartError(
                f"{parent} belongs to another user (uid {st.st_uid}); refusing to put the API "
                "socket there: set api.socket to a path in a folder you own"
            )
        if st.st_mode & 0o022:
            raise ApiStartError(
                f"{parent} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                f"run `chmod 700 {parent}` or set api.socket elsewhere"
            )
        gid = self._socket_gid()
        if gid is not None and (st.st_gid != gid or stat.S_IMODE(st.st_mode) != 0o750):
            # api.socket_group: the group's members must reach the socket through its
            # folder (r-x, never w: they must not swap the socket), others must not.
            self._give_to_group(parent, gid, 0o750)

    def _socket_gid(self) -> int | None:
        """The gid of ``api.socket_group``, or None when the socket is the owner's only."""
        group = self._settings.socket_group
        if not group:
            return None
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            if group.isdigit():
                return int(group)
        raise ConfigError([f"api.socket_group: there is no group {group!r} on this machine "
                           "(see `getent group`)"])

    def _give_to_group(self, path: Path, gid: int, mode: int) -> None:
        # chown before chmod: the group bits open only once the group is the right one.
        try:
            os.chown(path, -1, gid)
            path.chmod(mode)
        except PermissionError:
            raise ConfigError([
                f"api.socket_group: cannot give {path} to group {self._settings.socket_group} "
                f"(gid {gid}): this user is not a member of it (with the system unit's "
                "PrivateUsers=yes only the service's own group can be used)"]) from None

    def _acquire_lock(self) -> None:
        # The lock, not the socket file, decides who owns the socket path: two daemons
        # starting at once could otherwise both see a stale socket and unlink each other's.
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ApiStartError(
                    f"another repd daemon (pid {holder}) is already serving the API on "
                    f"{self._socket_path}; stop it first, or set api.socket to another path"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _remove_stale_socket(self) -> None:
        path = self._socket_path
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ApiStartError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except ConnectionRefusedError:
            log.info("api_stale_socket_removed", socket=str(path))
            path.unlink(missing_ok=True)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ApiStartError(f"cannot check the existing socket {path}: {exc}") from None
        finally:
            probe.close()
        raise ApiStartError(
            f"another process already answers on {path} (a running repd daemon?); stop it "
            "first, or set api.socket to another path"
        )

    def _bind_unix(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The socket is born 0600 under this umask: no window in which a chmod is pending.
        # The umask is process-wide, so the window is kept to the bind call alone.
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(self._socket_path))
        except OSError as exc:
            sock.close()
            raise ApiStartError(f"cannot bind the API socket {self._socket_path}: {exc}") from None
        finally:
            os.umask(old_umask)
        st = self._socket_path.stat()
        self._socket_id = (st.st_dev, st.st_ino)
        gid = self._socket_gid()
        if gid is not None:
            try:
                self._give_to_group(self._socket_path, gid, 0o660)
            except BaseException:
                sock.close()
                raise
            log.info("api_socket_shared", group=self._settings.socket_group, gid=gid)
        sock.listen(128)
        return sock

    def _bind_tcp(self, port: int) -> socket.socket:
        try:
            sock = socket.create_server(("127.0.0.1", port), backlog=128)
        except OSError as exc:
            raise ApiStartError(
                f"cannot listen on 127.0.0.1:{port} (api.tcp_port): {exc}"
            ) from None
        self._tcp_address = ("127.0.0.1", port)
        return sock

    def _cleanup(self) -> None:
        for sock, _ in self._listeners:
            sock.close()
        self._listeners.clear()
        if self._socket_id is not None:
            # Unlink only the socket this server bound, never a successor's.
            with contextlib.suppress(FileNotFoundError):
                st = self._socket_path.lstat()
                if (st.st_dev, st.st_ino) == self._socket_id:
                    self._socket_path.unlink()
            self._socket_id = None
        if self._lock_fd is not None:
            # The lock file itself stays: unlinking it would let a third daemon lock a
            # new file while a second still holds the old one.
            os.close(self._lock_fd)
            self._lock_fd = None
        self._tcp_address = None
