"""What the model-upgrade machinery publishes, and the commands it takes.

The worker thread owns generations and migrations; every other thread (the API, the
systemd status line, the dashboard through the API) reads the frozen snapshots defined
here and asks for changes through :class:`ModelCommands`, never by touching the manifest
or another component's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from repd.errors import RepdError

GenState = Literal["building", "active", "retired"]
#: ``loading``: the new model is being loaded; ``backfilling``: every file is embedded
#: again into the new generation; ``gating``: the checks before the switch run;
#: ``ready``: backfilled, waiting for ``repd model switch`` (auto switch off, or the gate
#: refused: see ``gate``); ``failed``: the migration cannot go on (see ``message``).
MigrationState = Literal["loading", "backfilling", "gating", "ready", "failed"]


class MigrationRefused(RepdError):  # noqa: N818 - the answer to a command, not a crash
    """A model command that cannot be carried out now; the message says why and what to do."""

    exit_code = 1


@dataclass(frozen=True, slots=True)
class GenerationSummary:
    """One generation as ``repd model list`` shows it."""

    id: int
    model_name: str
    model_id: str
    dim: int
    state: GenState
    points: int
    created_at: float
    activated_at: float | None
    #: Shard folder (embedded) or collection name (server).
    location: str


@dataclass(frozen=True, slots=True)
class GateReport:
    """What the checks before a switch found."""

    ok: bool
    #: One line per check, e.g. "files: 5183 of 5183 in the same state in both".
    checks: tuple[str, ...]
    ndcg_active: float | None = None
    ndcg_new: float | None = None
    forced: bool = False


@dataclass(frozen=True, slots=True)
class MigrationSnapshot:
    """A migration in progress (at most one at a time)."""

    state: MigrationState
    from_generation: int
    #: None while the model loads (the generation is created once its identity is known).
    to_generation: int | None
    model_name: str
    model_id: str | None
    files_done: int
    files_total: int
    chunks_embedded: int
    files_per_s: float
    eta_s: float | None
    #: Bytes of the second model's weights in memory (what the migration costs in RAM).
    memory_bytes: int | None
    gate: GateReport | None
    message: str | None
    started_at: float


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """Generations and the migration, published by the worker after each step."""

    generations: tuple[GenerationSummary, ...] = ()
    migration: MigrationSnapshot | None = None
    #: The generation that answers queries, if any.
    active: int | None = None


@dataclass(frozen=True, slots=True)
class GateLabels:
    """A labeled query set for the gate (BEIR files), from the config or the command line."""

    queries: Path
    qrels: Path
    mapping: Path | None = None


@dataclass(frozen=True)
class ModelCommandResult:
    """The answer to a model command: one line for the person who asked."""

    message: str
    generation: int | None = None
    extra: dict[str, object] = field(default_factory=dict)


class ModelCommands(Protocol):
    """The commands ``repd model ...`` and the API's ``/v1/model/...`` send to the daemon.

    Each is thread-safe. Each raises :class:`MigrationRefused` with a one-line reason
    when it cannot be carried out (a second migration, nothing to roll back to, ...).
    """

    def snapshot(self) -> ModelSnapshot:
        """The latest published state (never blocks)."""
        ...

    def use(self, model: str) -> ModelCommandResult:
        """Start migrating to ``model`` (a Hugging Face name or a local path)."""
        ...

    def switch(self, *, force: bool = False,
               labels: GateLabels | None = None) -> ModelCommandResult:
        """Run the gate and make the backfilled generation the active one."""
        ...

    def rollback(self) -> ModelCommandResult:
        """Make the most recently retired generation active again (no embedding)."""
        ...

    def prune(self) -> ModelCommandResult:
        """Delete retired generations: their store, their rows, their cached vectors."""
        ...

    def abort(self) -> ModelCommandResult:
        """Stop the migration in progress and delete its generation."""
        ...
