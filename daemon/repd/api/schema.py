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
#: A model name or path: something that is not blank, and no NUL (it may become a path).
MODEL_NAME_PATTERN = r"^[^\x00]*[^\x00\s][^\x00]*$"
#: A file on the daemon's machine: absolute, since the daemon's working folder is not the
#: client's, and without NUL.
ABSOLUTE_PATH_PATTERN = r"^/[^\x00]*$"


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


# --- model upgrades ----------------------------------------------------------------------

GenerationState = Literal["building", "active", "retired"]
MigrationState = Literal["loading", "backfilling", "gating", "ready", "failed"]
"""``loading``: the new model loads; ``backfilling``: every file is embedded again into the
new generation; ``gating``: the checks before the switch run; ``ready``: waiting for
``repd model switch``; ``failed``: the migration cannot go on (see ``message``)."""


class GateInfo(_Response):
    """What the checks before a switch found."""

    ok: bool = Field(description="true when every check passed")
    checks: list[str] = Field(description="one line per check, fit to show as is")
    ndcg_active: float | None = Field(
        default=None, description="nDCG@10 of the active generation on the labeled queries")
    ndcg_new: float | None = Field(
        default=None, description="nDCG@10 of the new generation on the labeled queries")
    forced: bool = Field(default=False, description="the switch was forced past a failed gate")


class MigrationInfo(_Response):
    """A migration to another embedding model, in progress (at most one at a time)."""

    state: MigrationState
    from_generation: str = Field(description="the generation that answers queries meanwhile")
    to_generation: str | None = Field(
        default=None, description="the generation being built; null while the model loads")
    model: str = Field(description="the new model: Hugging Face name or local path")
    model_id: str | None = Field(
        default=None, description="the new model's identity; null until it is loaded")
    files_done: int = Field(ge=0, description="files embedded into the new generation")
    files_total: int = Field(ge=0, description="files to embed into the new generation")
    progress: float = Field(ge=0, le=1, description="share of the backfill done, 0 to 1")
    chunks_embedded: int = Field(ge=0)
    files_per_s: float = Field(ge=0)
    eta_s: float | None = Field(default=None, ge=0, description="seconds until backfilled")
    model_memory_bytes: int | None = Field(
        default=None, ge=0, description="memory the second model's weights take")
    gate: GateInfo | None = Field(default=None, description="the last gate's result, if run")
    message: str | None = Field(
        default=None, description="why the migration failed or waits, in one line")
    started_at: datetime


class GenerationEntry(_Response):
    """One generation: an index built with one embedding model."""

    id: str
    model: str = Field(description="model name: Hugging Face id or local path")
    model_id: str = Field(description="model identity (name plus revision or weights hash)")
    dim: int = Field(ge=1, description="vector size")
    state: GenerationState = Field(
        description="building (a migration fills it), active (answers queries) or retired "
        "(kept for rollback until pruned)")
    points: int = Field(ge=0)
    created_at: datetime
    activated_at: datetime | None = Field(
        default=None, description="when it last became the active generation")
    location: str = Field(description="shard folder (embedded) or collection name (server)")


class ModelStatusResponse(_Response):
    """The generations and the migration in progress, for ``repd model status|list``."""

    active: str | None = Field(description="the generation answering queries, if any")
    generations: list[GenerationEntry]
    migration: MigrationInfo | None = None


class ModelUseRequest(_Request):
    """Start migrating the index to another embedding model."""

    model: str = Field(
        min_length=1,
        max_length=4096,
        pattern=MODEL_NAME_PATTERN,
        description="Hugging Face model name, or a local path (absolute: the daemon's "
        "working folder is not yours)",
    )


class GateLabelFiles(_Request):
    """A labeled query set (BEIR files) for the gate's quality check: paths on the
    daemon's machine, absolute (the daemon's working folder is not the client's)."""

    queries: str = Field(
        min_length=1, max_length=4096, pattern=ABSOLUTE_PATH_PATTERN,
        description='BEIR queries.jsonl: one {"_id": ..., "text": ...} object a line')
    qrels: str = Field(
        min_length=1, max_length=4096, pattern=ABSOLUTE_PATH_PATTERN,
        description="BEIR qrels TSV: query-id, corpus-id, score a line")
    mapping: str | None = Field(
        default=None, min_length=1, max_length=4096, pattern=ABSOLUTE_PATH_PATTERN,
        description="document id -> file path (TSV or JSON); default: a file's stem")


class ModelSwitchRequest(_Request):
    """Run the gate and make the backfilled generation the active one."""

    force: bool = Field(default=False, description="switch even when the gate fails")
    # One object, not three loose fields: queries without qrels cannot be scored, and the
    # schema says so by itself (no rule that only the daemon knows).
    labels: GateLabelFiles | None = Field(
        default=None, description="labeled queries for the quality check; null: the "
        "configured ones, if any")


class ModelActionResponse(_Response):
    """The outcome of use, switch, rollback, prune or abort."""

    ok: bool = True
    message: str = Field(description="one line for the person who asked")
    generation: str | None = Field(
        default=None, description="the generation the command concerns (created, made "
        "active, ...), if one")
    gate: GateInfo | None = Field(default=None, description="for switch: what the gate found")


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
    backend: str | None = Field(default=None,
                                description="torch or openvino; null until loaded")
    precision: str | None = Field(
        default=None, description="f32, bf16 (OpenVINO) or fp16 (CUDA); null until loaded")
    runtime: str | None = Field(
        default=None,
        description="OpenVINO only: direct (no torch imported) or full (through "
        "sentence-transformers, torch imported: a first load, or a model the direct "
        "runtime cannot run); null on torch or until loaded")


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


class ReplicasInfo(_Response):
    """The two copies of a replicated embedded index (``store.replicas``)."""

    serving: str = Field(description="the copy answering queries (r0 or r1)")
    building: str | None = Field(default=None, description="the copy building HNSW now")
    lag_points: int = Field(ge=0, description="writes the other copy has yet to apply")


class StoreInfo(_Response):
    """The vector store behind the active generation."""

    kind: Literal["embedded", "server"]
    points: int = Field(ge=0)
    indexed_vectors: int = Field(ge=0, description="points covered by the HNSW index")
    index_built: bool = Field(description="false while queries are brute-force scans")
    replicas: ReplicasInfo | None = Field(
        default=None, description="set when the index is kept in two copies")


class ComponentStatus(_Response):
    """One supervised part of the daemon (indexer, watcher, api)."""

    name: str
    state: Literal["ok", "restarting", "dead"]
    restarts: int = Field(ge=0, description="restarts since the daemon started")
    last_error: str | None = Field(default=None, description="why it last stopped")


class CrashInfo(_Response):
    """The previous run's fatal error (a native crash), from the record it left."""

    at: datetime = Field(description="when the previous run died")
    error: str = Field(description="what killed it, e.g. 'Segmentation fault'")
    log: str = Field(description="the file holding its threads' stacks")


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
    migration: MigrationInfo | None = Field(
        default=None, description="the model migration in progress; null when there is none")
    previous_crash: CrashInfo | None = Field(
        default=None, description="set when the run before this one died of a fatal error "
        "(a crash in native code); shown for as long as this run lives")


# --- query --------------------------------------------------------------------------------

SearchMode = Literal["dense", "lexical", "hybrid"]
"""``dense``: embeddings only; ``lexical``: BM25 only; ``hybrid``: both, fused (RRF)."""


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
        max_length=4096,
        pattern=NO_NUL_PATTERN,
        description="only files whose path relative to their root matches this glob (`*`, "
        "`**`, `?`, `[a-z]`, `{a,b}`, `\\` escapes; 400 `invalid_glob` with the reason "
        "when it is not valid), or a path as the CLI prints it: absolute, or relative to "
        "`cwd`, a glob allowed past its folders (404 `not_in_root` outside every root)",
    )
    root: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        pattern=NO_NUL_PATTERN,
        description="only files under this root, or under this folder inside a root "
        "(absolute path; 404 `unknown_root` outside every root)",
    )
    cwd: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        pattern=ABSOLUTE_PATH_PATTERN,
        description="the client's working folder: a relative `path` written as a path "
        "(`.`, `..`, or with a `/`) whose folder exists there, inside a root, is taken "
        "relative to it; null: `path` is always relative to each root",
    )
    files: bool = Field(
        default=False, description="one hit per file: the best chunk of each of the top k files")
    mode: SearchMode | None = Field(
        default=None,
        description="dense (embeddings), lexical (BM25) or hybrid (both, fused); null: the "
        "generation's default, hybrid when it has sparse vectors. Lexical and hybrid on a "
        "generation without sparse vectors: 400 `no_sparse_vectors`")
    # The bounds before the validator, inside the union's integer branch: elsewhere pydantic
    # writes them as "ge"/"le" in the JSON Schema, which no client or fuzzer reads as bounds.
    generation: Annotated[
        int, Field(ge=1, le=2**31 - 1), BeforeValidator(_integral_float_to_int)
    ] | None = Field(
        default=None,
        description="answer from this generation (an active, building or retired one that "
        "can be searched); null: the active generation")


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
    mode: SearchMode = Field(default="dense", description="the retrieval mode that answered")


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
