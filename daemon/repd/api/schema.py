"""The local API's wire models (version 1): what the daemon, the CLI and the dashboard exchange."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

API_VERSION = 1
"""Bumped on any incompatible change; every path lives under ``/v{API_VERSION}/``."""

DaemonState = Literal["starting", "scanning", "indexing", "idle", "paused", "stopping",
                      "degraded", "disk_full"]
"""``degraded``: indexing cannot make progress or a component is dead (see ``problem``);
``disk_full``: writing waits for free space. ``repd status`` exits 4 in both."""
IssueState = Literal["skipped", "failed"]

# A NUL byte can never be part of a path, and os functions raise ValueError on one; refusing it
# at the edge keeps that a 422 instead of an internal error in the daemon.
NO_NUL_PATTERN = r"^[^\x00]*$"
NOT_BLANK_PATTERN = r"\S"


def _integral_float_to_int(value: Any) -> Any:
    # JSON Schema counts 10.0 as an integer, and JSON has one number type; strict mode
    # would still reject it, while "10" and true stay rejected.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_integral_float_to_int)]


class _Request(BaseModel):
    # strict: JSON "10" is not the integer 10; a client sending it has a bug worth a 422.
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    # extra="forbid" puts additionalProperties: false into the OpenAPI document, so the
    # schema fuzzer catches the server sending fields the contract does not name.
    model_config = ConfigDict(extra="forbid")


# --- status -------------------------------------------------------------------------------


class ModelInfo(_Response):
    """The embedding model the active pipeline uses."""

    name: str = Field(description="configured name: Hugging Face id or local path")
    id: str | None = Field(
        default=None,
        description="model identity (name plus revision or weights hash); "
        "null until the model is loaded",
    )
    dim: int | None = Field(default=None, ge=1, description="vector size; null until loaded")
    device: str | None = Field(default=None, description="cpu, cuda:0, mps...; null until loaded")


class GenerationInfo(_Response):
    """One index generation: a model identity, a vector size and a store location."""

    id: str = Field(description="generation id (shard directory or collection name)")
    state: Literal["building", "active", "retired"]
    points: int = Field(ge=0)


class QueueInfo(_Response):
    """Work waiting in each pipeline stage."""

    pending: int = Field(ge=0, description="distinct paths waiting in the change queue")
    scans: int = Field(ge=0, description="reconcile scans queued or running")
    settling: int = Field(ge=0, description="files still changing, waiting to be quiet")
    planning: int = Field(ge=0, description="files being extracted, chunked and diffed")
    embedding: int = Field(ge=0, description="chunks waiting for or inside the embedder")
    writing: int = Field(ge=0, description="files whose points are being written")


class Rates(_Response):
    """Recent throughput, averaged over a short window."""

    files_per_s: float = Field(ge=0)
    chunks_per_s: float = Field(ge=0)
    embeds_per_s: float = Field(ge=0)


class RootStatus(_Response):
    """One indexed folder."""

    path: str = Field(description="absolute path of the root")
    watch: str = Field(
        pattern=r"^(inotify|polling|stopped|error)",
        description='"inotify", "polling", "stopped" (during shutdown), '
        'or "error: <why>" when the root cannot be watched',
    )
    files: int = Field(ge=0)
    chunks: int = Field(ge=0)
    skipped: int = Field(ge=0)
    failed: int = Field(ge=0)


class Totals(_Response):
    """Counters over all roots; embedded and reused count since the daemon started."""

    files: int = Field(ge=0)
    chunks: int = Field(ge=0)
    skipped: int = Field(ge=0)
    failed: int = Field(ge=0)
    embedded: int = Field(ge=0, description="chunks embedded by the model")
    reused: int = Field(ge=0, description="chunks whose vector was reused instead of embedded")


class StoreInfo(_Response):
    """The vector store behind the active generation."""

    kind: Literal["embedded", "server"]
    points: int = Field(ge=0)
    indexed_vectors: int = Field(ge=0, description="points covered by the HNSW index")
    index_built: bool = Field(description="false while queries are brute-force scans")


class ComponentStatus(_Response):
    """One supervised part of the daemon (indexer, watcher, api)."""

    name: str
    state: Literal["ok", "restarting", "dead"]
    restarts: int = Field(ge=0, description="restarts since the daemon started")
    last_error: str | None = Field(default=None, description="why it last stopped")


class StatusResponse(_Response):
    """Everything ``repd status`` and the dashboard show."""

    version: str = Field(description="repd version of the daemon")
    api_version: int = Field(default=API_VERSION, description="wire API version")
    state: DaemonState
    paused: bool
    model: ModelInfo
    generation: GenerationInfo | None = Field(
        default=None, description="the generation answering queries; null before the first"
    )
    queue: QueueInfo
    rates: Rates
    eta_s: float | None = Field(default=None, ge=0, description="seconds until idle, if known")
    roots: list[RootStatus]
    totals: Totals
    store: StoreInfo
    uptime_s: float = Field(ge=0)
    last_scan_at: datetime | None = Field(default=None, description="end of the last full scan")
    last_error: str | None = Field(default=None, description="the most recent pipeline error")
    problem: str | None = Field(
        default=None, description="one line when the index cannot make progress (degraded, "
        "disk_full) or is not ready yet; null when all is well")
    components: list[ComponentStatus] = Field(
        default_factory=list, description="supervised parts and their health")


# --- query --------------------------------------------------------------------------------


class QueryRequest(_Request):
    """A semantic search over the active generation."""

    text: str = Field(
        min_length=1,
        max_length=2000,
        pattern=NOT_BLANK_PATTERN,
        description="what to look for, in plain words; must not be blank",
    )
    k: JsonInt = Field(default=10, ge=1, le=100, description="how many hits to return")
    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        pattern=NO_NUL_PATTERN,
        description="only files whose path relative to their root matches this glob",
    )
    root: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        pattern=NO_NUL_PATTERN,
        description="only files under this root (absolute path)",
    )
    files: bool = Field(
        default=False, description="one hit per file: the best chunk of each of the top k files")


class QueryHit(_Response):
    """One matching chunk."""

    rank: int = Field(ge=1)
    score: float = Field(description="similarity; higher is closer")
    root: str
    path: str = Field(description="path relative to the root")
    start_line: int = Field(ge=1, description="first line of the chunk, 1-based")
    end_line: int = Field(ge=1, description="last line of the chunk, inclusive")
    snippet: str


class QueryResponse(_Response):
    """Hits best first."""

    hits: list[QueryHit]
    took_ms: float = Field(ge=0)
    generation: str = Field(description="id of the generation that answered")


# --- files --------------------------------------------------------------------------------


class FileIssue(_Response):
    """A file that is not in the index, and why."""

    root: str
    path: str = Field(description="path relative to the root")
    state: IssueState
    reason: str = Field(description="short code: binary, too_large, decode_error, ...")
    detail: str = Field(default="", description="human-readable detail")
    at: datetime = Field(description="when it was last tried")


class FilesResponse(_Response):
    """One page of skipped or failed files."""

    items: list[FileIssue]
    total: int = Field(ge=0, description="matching files in all pages")


# --- actions ------------------------------------------------------------------------------


class ReindexRequest(_Request):
    """Re-read files even if their stat did not change."""

    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        pattern=NO_NUL_PATTERN,
        description="a file or folder inside a root; null re-indexes every root",
    )


class ActionResponse(_Response):
    """The outcome of reindex, pause or resume."""

    ok: bool
    message: str
    queued: int = Field(default=0, ge=0, description="paths queued by the action")


# --- errors -------------------------------------------------------------------------------


class ValidationIssue(_Response):
    """One problem with the request, as pydantic reported it."""

    loc: list[str | int] = Field(description="where: body field names or query parameter")
    msg: str
    type: str


class ErrorDetail(_Response):
    """What went wrong."""

    code: str = Field(description="machine-readable: not_found, validation_error, ...")
    message: str = Field(description="human-readable, fit to show as is")
    details: list[ValidationIssue] | None = Field(
        default=None, description="one entry per problem, for validation_error"
    )


class ErrorResponse(_Response):
    """Every non-2xx response carries this body."""

    error: ErrorDetail
