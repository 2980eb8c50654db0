"""The contract between the API server and the daemon: what the daemon must answer."""

from __future__ import annotations

from typing import Protocol

from repd.api.schema import (
    ActionResponse,
    FilesResponse,
    GateLabelFiles,
    IssueState,
    ModelActionResponse,
    ModelStatusResponse,
    QueryRequest,
    QueryResponse,
    StatusResponse,
)


class ApiError(Exception):
    """A failure the client caused or should see: becomes an HTTP error with this status.

    Raise it from a backend method for expected failures (``ApiError(404, "... is not
    inside any root")``); anything else a backend raises is logged and answered with 503.
    """

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"ApiError status must be 4xx or 5xx, not {status}")
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class Backend(Protocol):
    """What the daemon implements for the API.

    Every method is called from a worker thread of the server's thread pool, possibly
    several at once, so implementations must be thread-safe and may block (briefly).
    """

    def status(self) -> StatusResponse:
        """A snapshot of the daemon's state; must be cheap, the dashboard polls it."""
        ...

    def query(self, req: QueryRequest) -> QueryResponse:
        """Search the active generation, or ``req.generation``; ``ApiError(404,
        ..., "unknown_generation")`` when that one cannot be searched."""
        ...

    def files(self, state: IssueState | None, limit: int, offset: int) -> FilesResponse:
        """A page of skipped and/or failed files, newest first."""
        ...

    def reindex(self, path: str | None) -> ActionResponse:
        """Queue ``path`` (or every root) for re-reading; ``ApiError(404)`` if outside all roots."""
        ...

    def pause(self) -> ActionResponse:
        """Stop taking new work from the queue; watching goes on."""
        ...

    def resume(self) -> ActionResponse:
        """Undo :meth:`pause`."""
        ...

    def metrics(self) -> str:
        """Prometheus text exposition format, version 0.0.4."""
        ...

    # -- model upgrades: each command raises ApiError(409, why, "migration_refused") when
    # the daemon's state does not allow it now, and ApiError(503, ..., "starting") before
    # the daemon is ready.

    def model_status(self) -> ModelStatusResponse:
        """The generations and the migration in progress; cheap, never waits."""
        ...

    def model_use(self, model: str) -> ModelActionResponse:
        """Start migrating to ``model`` (a Hugging Face name or an absolute local path)."""
        ...

    def model_switch(self, force: bool, labels: GateLabelFiles | None) -> ModelActionResponse:
        """Run the gate (with ``labels`` when given) and switch; may block for minutes."""
        ...

    def model_rollback(self) -> ModelActionResponse:
        """Make the most recently retired generation active again."""
        ...

    def model_prune(self) -> ModelActionResponse:
        """Delete the retired generations."""
        ...

    def model_abort(self) -> ModelActionResponse:
        """Stop the migration in progress and delete its generation."""
        ...
