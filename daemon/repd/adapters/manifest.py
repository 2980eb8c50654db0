"""The manifest: SQLite (WAL) record of files, chunks, vectors, generations and write intents.

The manifest is the source of truth for what the store *should* hold. Every change to
the store is bracketed by an intent row written before and removed after, in the order
described in docs/architecture.md ("The write protocol"), so a crash at any instant can
be undone.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from repd.core.identity import StatSig
from repd.core.types import SparseVec

SCHEMA_VERSION = 3
#: Cache hits whose last-used time is kept in memory before it is written (see
#: ``Manifest.vectors``); past this many the next read writes them out.
TOUCH_BUFFER = 100_000
#: Next to the manifest: one small JSON file per generation (model identity, vector size,
#: store location), so a damaged manifest can be rebuilt from the store it describes.
GENERATIONS_DIR = "generations"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS generations (
    id INTEGER PRIMARY KEY,
    model_name TEXT NOT NULL,
    model_id TEXT NOT NULL,
    dim INTEGER NOT NULL,
    location TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('building', 'active', 'retired')),
    created_at REAL NOT NULL,
    activated_at REAL,
    cursor TEXT,
    vectors TEXT NOT NULL DEFAULT 'dense'
);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    root TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    content_hash TEXT,
    state TEXT NOT NULL CHECK (state IN ('indexed', 'skipped', 'failed', 'dirty')),
    reason TEXT,
    detail TEXT,
    indexed_at_ns INTEGER NOT NULL,
    UNIQUE (root, path)
);
CREATE TABLE IF NOT EXISTS chunks (
    gen_id INTEGER NOT NULL,
    file_id INTEGER NOT NULL,
    ordinal INTEGER NOT NULL,
    hash TEXT NOT NULL,
    point_id TEXT NOT NULL,
    start_line INTEGER NOT NULL,
    end_line INTEGER NOT NULL,
    PRIMARY KEY (gen_id, file_id, ordinal)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_file ON chunks (file_id);
CREATE TABLE IF NOT EXISTS gen_files (
    gen_id INTEGER NOT NULL,
    file_id INTEGER NOT NULL,
    content_hash TEXT,
    state TEXT NOT NULL CHECK (state IN ('indexed', 'skipped', 'failed', 'dirty')),
    PRIMARY KEY (gen_id, file_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vectors (
    id INTEGER PRIMARY KEY,
    model_id TEXT NOT NULL,
    hash TEXT NOT NULL,
    vector BLOB NOT NULL,
    used_at INTEGER NOT NULL DEFAULT 0,
    UNIQUE (model_id, hash)
);
CREATE TABLE IF NOT EXISTS intents (
    id INTEGER PRIMARY KEY,
    gen_id INTEGER NOT NULL,
    root TEXT NOT NULL,
    path TEXT NOT NULL,
    point_ids TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class FileRow:
    """One file as the manifest last recorded it."""

    id: int
    root: str
    path: str
    sig: StatSig
    content_hash: str | None
    state: str
    reason: str | None
    detail: str | None
    indexed_at_ns: int


@dataclass(frozen=True, slots=True)
class ChunkRow:
    """One chunk of a file under one generation."""

    ordinal: int
    hash: str
    point_id: str
    start_line: int
    end_line: int


@dataclass(frozen=True, slots=True)
class Generation:
    """An index built with one model: (model identity, vector size, store location)."""

    id: int
    model_name: str
    model_id: str
    dim: int
    location: str
    state: str
    created_at: float
    cursor: str | None
    activated_at: float | None = None
    #: What each point holds: ``dense`` (one unnamed dense vector, generations made
    #: before hybrid search) or ``hybrid:<BM25 encoder identity>`` (a named dense vector
    #: and a BM25 sparse one made by that encoder).
    vectors: str = "dense"

    @property
    def hybrid(self) -> bool:
        """Whether the generation's points carry a BM25 sparse vector."""
        return self.vectors.startswith("hybrid")


@dataclass(frozen=True, slots=True)
class Intent:
    """A store write in flight: the points of one file that may be half written."""

    id: int
    gen_id: int
    root: str
    path: str
    point_ids: list[str]


def _file_row(r: sqlite3.Row) -> FileRow:
    return FileRow(r["id"], r["root"], r["path"],
                   StatSig(r["size"], r["mtime_ns"], r["inode"], r["ctime_ns"]),
                   r["content_hash"], r["state"], r["reason"], r["detail"], r["indexed_at_ns"])


def _gen_row(r: sqlite3.Row) -> Generation:
    return Generation(r["id"], r["model_name"], r["model_id"], r["dim"], r["location"],
                      r["state"], r["created_at"], r["cursor"], r["activated_at"],
                      r["vectors"])


def _clock() -> int:
    """Wall-clock nanoseconds for the vector cache's last-used times (tests replace it)."""
    return time.time_ns()


class ManifestError(Exception):
    """The manifest cannot be opened; the message is one line."""


class ManifestDamaged(ManifestError):  # noqa: N818 - a state of the file
    """The file is not a SQLite database, or SQLite finds it malformed."""


class ManifestUnwritable(ManifestError):  # noqa: N818 - a state of the file
    """The manifest (or its folder) cannot be written: permissions, a read-only mount."""


# SQLite's own words for a file that is not (or no longer) a sound database.
_DAMAGE_WORDS = ("not a database", "malformed", "corrupt", "file is encrypted")
_UNWRITABLE_WORDS = ("readonly", "read-only", "unable to open", "permission denied",
                     "access permission")


def _translate(path: Path, exc: sqlite3.Error) -> ManifestError | None:
    text = str(exc).lower()
    if any(w in text for w in _DAMAGE_WORDS):
        return ManifestDamaged(f"{path} is damaged ({exc})")
    if any(w in text for w in _UNWRITABLE_WORDS):
        return ManifestUnwritable(f"{path} cannot be written ({exc})")
    return None


class Manifest:
    """Thread-safe wrapper over one SQLite connection (writes are serialised by a lock).

    ``Manifest(path)`` opens it for writing, creating it (and its schema) if absent;
    :meth:`open_readonly` opens an existing one for reading and creates nothing. Both
    raise :class:`ManifestDamaged` or :class:`ManifestUnwritable` instead of sqlite3's
    errors where the file itself is the problem.
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._lock = threading.RLock()
        #: Vector-cache hits not yet written: (model id, hash) -> last used (ns).
        self._touched: dict[tuple[str, str], int] = {}
        #: (caches, budget, the connection's total_changes) after the last prune.
        self._pruned: tuple[tuple[str, ...], int, int] | None = None
        try:
            if readonly:
                # mode=ro: never creates the file (a query on an empty data folder must
                # leave it empty) and never writes; WAL readers still see committed rows.
                uri = f"file:{quote(str(path))}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False,
                                           isolation_level=None)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(str(path), check_same_thread=False,
                                           isolation_level=None)
        except sqlite3.Error as exc:
            raise _translate(path, exc) or ManifestError(f"{path}: {exc}") from None
        self._db.row_factory = sqlite3.Row
        try:
            self._set_up()
        except sqlite3.Error as exc:
            self._db.close()
            err = _translate(path, exc)
            if err is None:
                raise
            raise err from None

    def _set_up(self) -> None:
        self._db.execute("PRAGMA busy_timeout=10000")
        if self.readonly:
            # Reading sqlite_master is the first thing that fails on a damaged file.
            self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed manifest row must survive power loss, since it claims that
        # the store already holds the file's points.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=OFF")
        with self.transaction():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            self._files_ids_never_reused()
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(generations)")}
            if "vectors" not in columns:  # made before hybrid search: dense points only
                self._db.execute(
                    "ALTER TABLE generations ADD COLUMN vectors TEXT NOT NULL DEFAULT 'dense'")
            self._vectors_table()
            found = self._db.execute(
                "SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if found is not None and int(found[0]) < 2:
                # Version 1 had no per-generation file state: the active generation held
                # exactly what the files table says.
                self._db.execute(
                    "INSERT OR IGNORE INTO gen_files (gen_id, file_id, content_hash, state)"
                    " SELECT g.id, f.id, f.content_hash, f.state FROM files f, generations g"
                    " WHERE g.state='active'")
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    def _vectors_table(self) -> None:
        """Schema 3: the vector cache as a rowid table with a last-used time, and the
        index its least-recently-used order walks.

        Schema 2 kept it ``WITHOUT ROWID``, whose rows may hold only ~1,000 bytes on a
        4 KiB page before spilling into an overflow page of their own: a 384-float
        vector (1,536 bytes) then took ~4.5 KiB on disk, three times its size (a rowid
        table keeps rows up to ~4,000 bytes inline: 1.4 times, and 4x faster inserts).
        Such a table is copied once into the new form (its entries all at ``used_at``
        0: equally old, so the first prune keeps an arbitrary subset of the unreferenced
        ones within the budget). SQLite reuses the freed pages; the file does not shrink.
        """
        row = self._db.execute(
            "SELECT sql FROM sqlite_master WHERE type='table' AND name='vectors'").fetchone()
        if row is not None and "WITHOUT ROWID" in str(row[0]).upper():
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(vectors)")}
            used = "used_at" if "used_at" in columns else "0"
            body = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS vectors ("):]
            body = body[:body.index(";")].replace("IF NOT EXISTS vectors (", "vectors_new (")
            self._db.execute("DROP INDEX IF EXISTS vectors_lru")
            self._db.execute(body)
            self._db.execute("INSERT INTO vectors_new (model_id, hash, vector, used_at)"
                             f" SELECT model_id, hash, vector, {used} FROM vectors")
            self._db.execute("DROP TABLE vectors")
            self._db.execute("ALTER TABLE vectors_new RENAME TO vectors")
        # Covers the prune's walk (newest first, per cache) and its referenced-or-not
        # test on the hash, so only the rows it deletes or keeps are read.
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS vectors_lru ON vectors (model_id, used_at, hash)")

    def _files_ids_never_reused(self) -> None:
        """Rebuild a ``files`` table made before ids were AUTOINCREMENT (schema 1).

        A retired generation keeps its chunk rows of a deleted file under the file's id;
        had SQLite handed that id to the next new file, the rows would pass for the new
        file's and a rollback would serve the deleted one.
        """
        row = self._db.execute(
            "SELECT sql FROM sqlite_master WHERE type='table' AND name='files'").fetchone()
        if row is None or "AUTOINCREMENT" in str(row[0]).upper():
            return
        body = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS files ("):]
        body = body[:body.index(";")].replace("IF NOT EXISTS files (", "files_new (")
        self._db.execute(body)
        self._db.execute("INSERT INTO files_new SELECT * FROM files")
        self._db.execute("DROP TABLE files")
        self._db.execute("ALTER TABLE files_new RENAME TO files")

    @classmethod
    def open_readonly(cls, path: Path) -> Manifest:
        """Open an existing manifest for reading only (raises ManifestError if absent)."""
        return cls(path, readonly=True)

    def check(self) -> str | None:
        """SQLite's ``quick_check``: None when sound, else its first complaint.

        O(size of the file), run once when a writer opens the manifest: a damaged page
        found now is rebuilt at start-up instead of failing some write hours later.
        """
        try:
            rows = self._query("PRAGMA quick_check(5)")
        except sqlite3.DatabaseError as exc:
            return str(exc)
        first = str(rows[0][0]) if rows else "no answer"
        return None if first == "ok" else "; ".join(str(r[0]) for r in rows)

    def close(self) -> None:
        """Close the connection (writing out the vector cache's pending last-used times)."""
        with self._lock:
            if self._touched and not self.readonly:
                # Best effort: a lost touch only makes an entry look older than it is.
                with contextlib.suppress(sqlite3.Error), self.transaction() as db:
                    self._flush_touches(db)
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write transaction (BEGIN IMMEDIATE ... COMMIT)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- generations -------------------------------------------------------------------

    def active_generation(self) -> Generation | None:
        """The generation that answers queries, if any."""
        rows = self._query("SELECT * FROM generations WHERE state='active' ORDER BY id DESC")
        return _gen_row(rows[0]) if rows else None

    def generations(self) -> list[Generation]:
        """Every generation, oldest first."""
        return [_gen_row(r) for r in self._query("SELECT * FROM generations ORDER BY id")]

    def create_generation(self, model_name: str, model_id: str, dim: int,
                          location: str | Callable[[int], str], state: str,
                          vectors: str = "dense") -> Generation:
        """Record a new generation; ``location`` may depend on its id (a template with
        ``{id}``, or a function of the id). Ids are never reused, even after a prune."""
        with self.transaction() as db:
            high = db.execute("SELECT value FROM meta WHERE key='last_generation_id'").fetchone()
            top = db.execute("SELECT COALESCE(MAX(id), 0) FROM generations").fetchone()[0]
            gen_id = max(int(top), int(high[0]) if high else 0) + 1
            where = location(gen_id) if callable(location) else location.replace("{id}",
                                                                                 str(gen_id))
            now = time.time()
            db.execute(
                "INSERT INTO generations (id, model_name, model_id, dim, location, state,"
                " created_at, activated_at, vectors) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (gen_id, model_name, model_id, dim, where, state, now,
                 now if state == "active" else None, vectors),
            )
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_generation_id', ?)",
                       (str(gen_id),))
        gen = next(g for g in self.generations() if g.id == gen_id)
        self._record_generation(gen)
        return gen

    def restore_generation(self, gen: Generation) -> Generation:
        """Insert a generation with its original id (rebuilding a manifest from its store)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO generations (id, model_name, model_id, dim, location, state,"
                " created_at, activated_at, vectors) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (gen.id, gen.model_name, gen.model_id, gen.dim, gen.location, gen.state,
                 gen.created_at, time.time() if gen.state == "active" else None,
                 gen.vectors),
            )
        self._record_generation(gen)
        return next(g for g in self.generations() if g.id == gen.id)

    def generation(self, gen_id: int) -> Generation | None:
        """One generation by id."""
        rows = self._query("SELECT * FROM generations WHERE id=?", (gen_id,))
        return _gen_row(rows[0]) if rows else None

    def switch_generations(self, new_active: int, old_active: int | None) -> None:
        """Make ``new_active`` the active generation and retire ``old_active``, atomically."""
        with self.transaction() as db:
            if old_active is not None:
                db.execute("UPDATE generations SET state='retired' WHERE id=?", (old_active,))
            db.execute("UPDATE generations SET state='active', activated_at=?, cursor=NULL"
                       " WHERE id=?", (time.time(), new_active))
        for gen in self.generations():
            if gen.id in (new_active, old_active):
                self._record_generation(gen)

    @staticmethod
    def set_cursor(db: sqlite3.Connection, gen_id: int, cursor: str | None) -> None:
        """Save a backfill's position inside a caller's transaction (with what it wrote)."""
        db.execute("UPDATE generations SET cursor=? WHERE id=?", (cursor, gen_id))

    def delete_generation(self, gen_id: int) -> None:
        """Forget a generation: its rows, intents and record, and the vectors only it used."""
        gen = self.generation(gen_id)
        if gen is None:
            return
        with self.transaction() as db:
            db.execute("DELETE FROM chunks WHERE gen_id=?", (gen_id,))
            db.execute("DELETE FROM gen_files WHERE gen_id=?", (gen_id,))
            db.execute("DELETE FROM intents WHERE gen_id=?", (gen_id,))
            db.execute("DELETE FROM generations WHERE id=?", (gen_id,))
            others = db.execute("SELECT COUNT(*) FROM generations WHERE model_id=?",
                                (gen.model_id,)).fetchone()[0]
            if not others:
                db.execute("DELETE FROM vectors WHERE model_id=?", (gen.model_id,))
        with contextlib.suppress(OSError):
            (self.path.parent / GENERATIONS_DIR / f"{gen_id}.json").unlink()

    def get_meta(self, key: str) -> str | None:
        """A value kept in the manifest's meta table."""
        rows = self._query("SELECT value FROM meta WHERE key=?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Keep a value in the meta table."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _record_generation(self, gen: Generation) -> None:
        # Best effort: the record only matters if the manifest is ever lost, and a
        # generation without one is rebuilt from scratch instead of from its store.
        folder = self.path.parent / GENERATIONS_DIR
        tmp = folder / f".{gen.id}.json.tmp"
        try:
            folder.mkdir(exist_ok=True)
            tmp.write_text(json.dumps(asdict(gen)), encoding="utf-8")
            tmp.replace(folder / f"{gen.id}.json")
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    # -- files ---------------------------------------------------------------------------

    def file(self, root: str, path: str) -> FileRow | None:
        """The file's row, if recorded."""
        rows = self._query("SELECT * FROM files WHERE root=? AND path=?", (root, path))
        return _file_row(rows[0]) if rows else None

    def files_under(self, root: str, prefix: str = "") -> dict[str, FileRow]:
        """Rows of a root (optionally below a folder), keyed by relative path."""
        if prefix:
            like = prefix.rstrip("/").replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            rows = self._query(
                "SELECT * FROM files WHERE root=? AND (path=? OR path LIKE ? ESCAPE '\\')",
                (root, prefix.rstrip("/"), like + "/%"),
            )
        else:
            rows = self._query("SELECT * FROM files WHERE root=?", (root,))
        return {r["path"]: _file_row(r) for r in rows}

    def scan_view(self, root: str, prefix: str = "") -> dict[str, tuple[Any, ...]]:
        """What a reconcile scan compares, as plain tuples keyed by relative path:
        (size, mtime_ns, inode, ctime_ns, state, indexed_at_ns, reason).

        The scan's hot path: no Row objects and no FileRow per file (building those was
        a third of a no-op scan of 100,000 files); full rows are read only for the
        files that changed (:meth:`files_at`).
        """
        sql = ("SELECT path, size, mtime_ns, inode, ctime_ns, state, indexed_at_ns, reason"
               " FROM files WHERE root=?")
        args: tuple[object, ...] = (root,)
        if prefix:
            like = prefix.rstrip("/").replace("\\", "\\\\").replace("%", "\\%")
            like = like.replace("_", "\\_")
            sql += " AND (path=? OR path LIKE ? ESCAPE '\\')"
            args = (root, prefix.rstrip("/"), like + "/%")
        with self._lock:
            cur = self._db.cursor()
            cur.row_factory = None
            try:
                return {r[0]: r[1:] for r in cur.execute(sql, args)}
            finally:
                cur.close()

    def files_at(self, root: str, paths: Sequence[str]) -> dict[str, FileRow]:
        """Full rows of some files of a root, keyed by relative path."""
        out: dict[str, FileRow] = {}
        for i in range(0, len(paths), 500):
            part = list(paths[i:i + 500])
            marks = ",".join("?" * len(part))
            for r in self._query(f"SELECT * FROM files WHERE root=? AND path IN ({marks})",
                                 (root, *part)):
                out[r["path"]] = _file_row(r)
        return out

    def roots(self) -> list[str]:
        """Every root that has rows."""
        return [r[0] for r in self._query("SELECT DISTINCT root FROM files")]

    def file_issues(self, state: str | None, limit: int, offset: int) -> tuple[list[FileRow], int]:
        """Skipped and failed files with their reasons, newest first, and their total."""
        states = ("skipped", "failed") if state is None else (state,)
        marks = ",".join("?" * len(states))
        rows = self._query(
            f"SELECT * FROM files WHERE state IN ({marks}) ORDER BY indexed_at_ns DESC, path "
            "LIMIT ? OFFSET ?", (*states, limit, offset))
        total = self._query(f"SELECT COUNT(*) FROM files WHERE state IN ({marks})", states)[0][0]
        return [_file_row(r) for r in rows], int(total)

    def counts_by_root(self) -> dict[str, dict[str, int]]:
        """Per root: files by state."""
        out: dict[str, dict[str, int]] = {}
        for r in self._query("SELECT root, state, COUNT(*) AS n FROM files GROUP BY root, state"):
            out.setdefault(r["root"], {})[r["state"]] = int(r["n"])
        return out

    def chunk_counts_by_root(self, gen_id: int) -> dict[str, int]:
        """Per root: chunks under a generation."""
        rows = self._query(
            "SELECT f.root AS root, COUNT(*) AS n FROM chunks c JOIN files f ON f.id=c.file_id "
            "WHERE c.gen_id=? GROUP BY f.root", (gen_id,))
        return {r["root"]: int(r["n"]) for r in rows}

    @staticmethod
    def upsert_file(db: sqlite3.Connection, root: str, path: str, sig: StatSig,
                    content_hash: str | None, state: str, reason: str | None,
                    detail: str | None, indexed_at_ns: int) -> int:
        """Insert or update a file row inside a caller's transaction; returns its id."""
        db.execute(
            "INSERT INTO files (root, path, size, mtime_ns, inode, ctime_ns, content_hash, state,"
            " reason, detail, indexed_at_ns) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (root, path) DO UPDATE SET size=excluded.size,"
            " mtime_ns=excluded.mtime_ns, inode=excluded.inode, ctime_ns=excluded.ctime_ns,"
            " content_hash=excluded.content_hash, state=excluded.state, reason=excluded.reason,"
            " detail=excluded.detail, indexed_at_ns=excluded.indexed_at_ns",
            (root, path, sig.size, sig.mtime_ns, sig.inode, sig.ctime_ns, content_hash, state,
             reason, detail, indexed_at_ns),
        )
        row = db.execute("SELECT id FROM files WHERE root=? AND path=?", (root, path)).fetchone()
        return int(row[0])

    def touch_files(self, rows: Iterable[tuple[int, StatSig, int]]) -> None:
        """Record a new stat signature for files whose content proved unchanged."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE files SET size=?, mtime_ns=?, inode=?, ctime_ns=?, indexed_at_ns=?"
                " WHERE id=?",
                [(s.size, s.mtime_ns, s.inode, s.ctime_ns, at, fid) for fid, s, at in rows],
            )

    # -- chunks --------------------------------------------------------------------------

    def chunks(self, gen_id: int, file_id: int) -> list[ChunkRow]:
        """A file's chunks under a generation, by ordinal."""
        rows = self._query(
            "SELECT ordinal, hash, point_id, start_line, end_line FROM chunks"
            " WHERE gen_id=? AND file_id=? ORDER BY ordinal", (gen_id, file_id))
        return [ChunkRow(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    @staticmethod
    def replace_chunks(db: sqlite3.Connection, gen_id: int, file_id: int,
                       chunks: Sequence[ChunkRow]) -> None:
        """Replace a file's chunk rows inside a caller's transaction."""
        db.execute("DELETE FROM chunks WHERE gen_id=? AND file_id=?", (gen_id, file_id))
        db.executemany(
            "INSERT INTO chunks (gen_id, file_id, ordinal, hash, point_id, start_line, end_line)"
            " VALUES (?,?,?,?,?,?,?)",
            [(gen_id, file_id, c.ordinal, c.hash, c.point_id, c.start_line, c.end_line)
             for c in chunks],
        )

    def point_ids(self, gen_id: int) -> set[str]:
        """Every point id the manifest says the generation's store holds."""
        return {r[0] for r in self._query("SELECT point_id FROM chunks WHERE gen_id=?", (gen_id,))}

    def chunk_count(self, gen_id: int) -> int:
        """Number of chunks (= points) of a generation."""
        return int(self._query("SELECT COUNT(*) FROM chunks WHERE gen_id=?", (gen_id,))[0][0])

    def files_with_points(self, gen_id: int, point_ids: Iterable[str]) -> set[int]:
        """File ids owning any of the given point ids."""
        ids = list(point_ids)
        out: set[int] = set()
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            marks = ",".join("?" * len(part))
            out.update(r[0] for r in self._query(
                f"SELECT DISTINCT file_id FROM chunks WHERE gen_id=? AND point_id IN ({marks})",
                (gen_id, *part)))
        return out

    # -- vectors (a cache keyed by model identity and chunk text hash) --------------------

    def vectors(self, model_id: str, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """Known vectors for these chunk hashes under this model.

        Each hit counts as a use for the cache's least-recently-used order. The time is
        kept in memory and written with the next prune (or once ``TOUCH_BUFFER`` hits
        are pending, or at close), not here: a read must not cost a synchronous write
        transaction. A crash loses only those times, which makes entries look older.
        """
        wanted = list(dict.fromkeys(hashes))
        out: dict[str, np.ndarray] = {}
        for i in range(0, len(wanted), 500):
            part = wanted[i:i + 500]
            marks = ",".join("?" * len(part))
            for r in self._query(
                f"SELECT hash, vector FROM vectors WHERE model_id=? AND hash IN ({marks})",
                (model_id, *part),
            ):
                out[r[0]] = np.frombuffer(r[1], dtype=np.float32)
        if out and not self.readonly:
            self._touch(model_id, out)
        return out

    def _touch(self, model_id: str, hashes: Iterable[str]) -> None:
        now = _clock()
        with self._lock:
            self._touched.update(((model_id, h), now) for h in hashes)
            if len(self._touched) >= TOUCH_BUFFER and not self._db.in_transaction:
                with self.transaction() as db:
                    self._flush_touches(db)

    def _flush_touches(self, db: sqlite3.Connection) -> None:
        """Write the pending last-used times (inside a caller's transaction)."""
        with self._lock:
            pending, self._touched = self._touched, {}
        # max(): an entry written (put) after it was read keeps the later time.
        db.executemany(
            "UPDATE vectors SET used_at=max(used_at, ?) WHERE model_id=? AND hash=?",
            [(at, mid, h) for (mid, h), at in pending.items()])

    @staticmethod
    def put_vectors(db: sqlite3.Connection, model_id: str,
                    items: Iterable[tuple[str, np.ndarray]]) -> None:
        """Store vectors inside a caller's transaction (each counts as just used)."""
        now = _clock()
        db.executemany(
            "INSERT OR IGNORE INTO vectors (model_id, hash, vector, used_at) VALUES (?,?,?,?)",
            [(model_id, h, np.asarray(v, dtype=np.float32).tobytes(), now) for h, v in items],
        )

    def sparse_vectors(self, encoder_id: str, hashes: Iterable[str]) -> dict[str, SparseVec]:
        """Known BM25 vectors for these chunk hashes under this encoder (same table as the
        dense cache, keyed by the encoder's identity)."""
        out: dict[str, SparseVec] = {}
        for h, blob in self.vectors(encoder_id, hashes).items():
            raw = blob.view(np.uint32)
            n = int(raw[0])
            out[h] = SparseVec(raw[1:1 + n].tolist(),
                               raw[1 + n:1 + 2 * n].view(np.float32).tolist())
        return out

    @staticmethod
    def put_sparse_vectors(db: sqlite3.Connection, encoder_id: str,
                           items: Iterable[tuple[str, SparseVec]]) -> None:
        """Cache BM25 vectors inside a caller's transaction (count, indices, values)."""
        now = _clock()
        rows = []
        for h, v in items:
            head = np.array([len(v.indices)], dtype=np.uint32)
            blob = (head.tobytes() + np.asarray(v.indices, dtype=np.uint32).tobytes()
                    + np.asarray(v.values, dtype=np.float32).tobytes())
            rows.append((encoder_id, h, blob, now))
        db.executemany("INSERT OR IGNORE INTO vectors (model_id, hash, vector, used_at)"
                       " VALUES (?,?,?,?)", rows)

    def prune_vectors(self, model_ids: str | Sequence[str], budget_bytes: int) -> int:
        """Bound the cached vectors no chunk uses to ``budget_bytes``; returns rows deleted.

        ``model_ids``: the caches (model or BM25 encoder identities) that share the
        budget. Vectors some chunk row references (of any generation) are always kept:
        they are the index's own, and recovery rewrites files from them without
        embedding. The unreferenced ones (kept so that a move, a copy or an undo is not
        embedded again) are kept most recently used first while their bytes fit the
        budget; the rest, the least recently used, are deleted.
        """
        ids = [model_ids] if isinstance(model_ids, str) else list(dict.fromkeys(model_ids))
        if not ids:
            return 0
        # The walk costs seconds on a large index (6 s for 300k chunks on a busy 2-core
        # machine) and the daemon prunes once a minute when idle: when nothing at all was
        # written since the last prune with the same budget, nothing can be due. (This
        # process is the manifest's only writer, so its own change count tells.)
        key = (tuple(ids), budget_bytes)
        with self._lock:
            if self._pruned == (*key, self._db.total_changes):
                return 0
        marks = ",".join("?" * len(ids))
        with self.transaction() as db:
            self._flush_touches(db)
            # Walks the vectors_lru index; only unreferenced rows are read for their size.
            rows = db.execute(
                f"SELECT model_id, hash, length(vector) FROM vectors"
                f" WHERE model_id IN ({marks}) AND hash NOT IN (SELECT hash FROM chunks)"
                f" ORDER BY used_at DESC, hash", ids).fetchall()
            kept = 0
            extra: list[tuple[str, str]] = []
            for mid, h, size in rows:
                if not extra and kept + int(size) <= budget_bytes:
                    kept += int(size)
                else:  # strict LRU: once one does not fit, every older one goes
                    extra.append((mid, h))
            db.executemany("DELETE FROM vectors WHERE model_id=? AND hash=?", extra)
        with self._lock:
            self._pruned = (*key, self._db.total_changes)
        return len(extra)

    # -- intents -------------------------------------------------------------------------

    @staticmethod
    def add_intent(db: sqlite3.Connection, gen_id: int, root: str, path: str,
                   point_ids: Iterable[str]) -> int:
        """Record, inside a caller's transaction, which points a write may touch."""
        cur = db.execute(
            "INSERT INTO intents (gen_id, root, path, point_ids, created_at) VALUES (?,?,?,?,?)",
            (gen_id, root, path, json.dumps(sorted(set(point_ids))), time.time()),
        )
        return int(cur.lastrowid or 0)

    def intents(self) -> list[Intent]:
        """Open intents (left by a crash)."""
        return [Intent(r["id"], r["gen_id"], r["root"], r["path"], json.loads(r["point_ids"]))
                for r in self._query("SELECT * FROM intents ORDER BY id")]

    @staticmethod
    def clear_intents(db: sqlite3.Connection, ids: Iterable[int]) -> None:
        """Remove intents inside a caller's transaction."""
        db.executemany("DELETE FROM intents WHERE id=?", [(i,) for i in ids])

    @staticmethod
    def delete_file(db: sqlite3.Connection, file_id: int) -> None:
        """Remove a file's row, inside a caller's transaction.

        Its chunk rows are removed per generation by :meth:`drop_gen_file`, for the
        generations the deletion was written to: a retired generation keeps them (its
        store still holds those points) until a rollback brings it up to date.
        """
        db.execute("DELETE FROM files WHERE id=?", (file_id,))

    @staticmethod
    def drop_gen_file(db: sqlite3.Connection, gen_id: int, file_id: int) -> None:
        """Forget what a generation holds of a file, inside a caller's transaction."""
        db.execute("DELETE FROM chunks WHERE gen_id=? AND file_id=?", (gen_id, file_id))
        db.execute("DELETE FROM gen_files WHERE gen_id=? AND file_id=?", (gen_id, file_id))

    @staticmethod
    def set_gen_file(db: sqlite3.Connection, gen_id: int, file_id: int,
                     content_hash: str | None, state: str) -> None:
        """Record which content of a file a generation's chunks hold (caller's transaction)."""
        db.execute("INSERT OR REPLACE INTO gen_files (gen_id, file_id, content_hash, state)"
                   " VALUES (?,?,?,?)", (gen_id, file_id, content_hash, state))

    def files_to_backfill(self, gen_id: int, after_id: int, limit: int) -> list[FileRow]:
        """Indexed files, by id after ``after_id``, whose content the generation lacks.

        A file the generation holds in another version, or marked dirty there, is listed;
        one it failed on or skipped (same content, say more chunks than the limit with
        its tokenizer) is not: the gate reports it.
        """
        rows = self._query(
            "SELECT f.* FROM files f WHERE f.state='indexed' AND f.id>? AND NOT EXISTS"
            " (SELECT 1 FROM gen_files g WHERE g.gen_id=? AND g.file_id=f.id"
            "  AND g.content_hash IS f.content_hash AND g.state != 'dirty')"
            " ORDER BY f.id LIMIT ?", (after_id, gen_id, limit))
        return [_file_row(r) for r in rows]

    def files_to_clear(self, gen_id: int, limit: int) -> list[int]:
        """File ids whose chunks a generation holds although the file is not indexed
        (deleted, skipped or failed since the generation last saw it)."""
        rows = self._query(
            "SELECT DISTINCT c.file_id FROM chunks c WHERE c.gen_id=? AND NOT EXISTS"
            " (SELECT 1 FROM files f WHERE f.id=c.file_id AND f.state='indexed')"
            " ORDER BY c.file_id LIMIT ?", (gen_id, limit))
        return [int(r[0]) for r in rows]

    def sync_counts(self, gen_id: int) -> dict[str, int]:
        """How far a generation is from the files table: indexed files, files it lacks,
        files it failed or skipped, files it holds that are not indexed, files marked
        dirty."""
        q = self._query
        indexed = int(q("SELECT COUNT(*) FROM files WHERE state='indexed'")[0][0])
        missing = int(q(
            "SELECT COUNT(*) FROM files f WHERE f.state='indexed' AND NOT EXISTS"
            " (SELECT 1 FROM gen_files g WHERE g.gen_id=? AND g.file_id=f.id"
            "  AND g.content_hash IS f.content_hash AND g.state != 'dirty')",
            (gen_id,))[0][0])
        failed = int(q(
            "SELECT COUNT(*) FROM gen_files g JOIN files f ON f.id=g.file_id WHERE g.gen_id=?"
            " AND g.state IN ('failed', 'skipped') AND f.state='indexed'", (gen_id,))[0][0])
        extra = int(q(
            "SELECT COUNT(DISTINCT c.file_id) FROM chunks c WHERE c.gen_id=? AND NOT EXISTS"
            " (SELECT 1 FROM files f WHERE f.id=c.file_id AND f.state='indexed')",
            (gen_id,))[0][0])
        dirty = int(q("SELECT COUNT(*) FROM files WHERE state='dirty'")[0][0])
        return {"indexed": indexed, "missing": missing, "failed": failed, "extra": extra,
                "dirty": dirty}

    def chunk_counts(self, gen_id: int, file_ids: Sequence[int]) -> dict[int, int]:
        """Chunks per file under a generation (files without chunks are left out)."""
        out: dict[int, int] = {}
        for i in range(0, len(file_ids), 500):
            part = list(file_ids[i:i + 500])
            marks = ",".join("?" * len(part))
            out.update((int(r[0]), int(r[1])) for r in self._query(
                f"SELECT file_id, COUNT(*) FROM chunks WHERE gen_id=? AND file_id IN ({marks})"
                " GROUP BY file_id", (gen_id, *part)))
        return out

    def sample_points(self, gen_id: int, n: int) -> list[str]:
        """Up to ``n`` point ids of a generation, at random (the gate's sample queries)."""
        return [str(r[0]) for r in self._query(
            "SELECT point_id FROM chunks WHERE gen_id=? ORDER BY random() LIMIT ?", (gen_id, n))]

    def spread_points(self, gen_id: int, n: int) -> list[str]:
        """Up to ``n`` point ids of a generation's distinct chunks, the first by chunk hash:
        spread over the corpus like a random sample, but the same for the same index."""
        return [str(r[0]) for r in self._query(
            "SELECT MIN(point_id) FROM chunks WHERE gen_id=? GROUP BY hash ORDER BY hash"
            " LIMIT ?", (gen_id, n))]

    def mark_for_reindex(self, file_ids: Sequence[int]) -> None:
        """Make the next scan index these files again even if stat and content match
        (a generation made active again lacks their latest content). Chunk rows stay:
        the rewrite diffs against them, so stale points are deleted."""
        with self.transaction() as db:
            db.executemany("UPDATE files SET state='dirty', size=-1 WHERE id=?",
                           [(fid,) for fid in file_ids])

    def file_by_id(self, file_id: int) -> FileRow | None:
        """A file's row by id."""
        rows = self._query("SELECT * FROM files WHERE id=?", (file_id,))
        return _file_row(rows[0]) if rows else None

    def forget_hashes(self, root: str, prefix: str = "") -> int:
        """Make the next scan re-read and re-chunk files (their points stay until then).

        A size of -1 never matches a real stat and a null hash never matches a real
        content hash, so neither shortcut skips the file; its chunk rows stay, so the
        rewrite is an ordinal diff as usual and vectors come from the cache.
        """
        rows = self.files_under(root, prefix)
        with self.transaction() as db:
            db.executemany("UPDATE files SET content_hash=NULL, size=-1 WHERE id=?",
                           [(r.id,) for r in rows.values()])
        return len(rows)

    def forget_skipped(self, root: str, reasons: Sequence[str]) -> int:
        """Make the next scan look again at files skipped for these reasons (a limit changed)."""
        marks = ",".join("?" * len(reasons))
        with self.transaction() as db:
            cur = db.execute(
                f"UPDATE files SET content_hash=NULL, size=-1 WHERE root=? AND state='skipped'"
                f" AND reason IN ({marks})", (root, *reasons))
            return int(cur.rowcount or 0)

    @staticmethod
    def mark_dirty(db: sqlite3.Connection, gen_id: int, file_id: int, *, primary: bool) -> None:
        """Forget a generation's chunks of a file, whose points were removed or lost.

        For the active generation (``primary``) the file row is marked too, so the next
        scan indexes it afresh; a building generation's backfill finds it by itself.
        """
        db.execute("DELETE FROM chunks WHERE gen_id=? AND file_id=?", (gen_id, file_id))
        db.execute("INSERT OR REPLACE INTO gen_files (gen_id, file_id, content_hash, state)"
                   " VALUES (?, ?, NULL, 'dirty')", (gen_id, file_id))
        if primary:
            db.execute("UPDATE files SET state='dirty', content_hash=NULL, size=-1 WHERE id=?",
                       (file_id,))


def recorded_generations(data_dir: Path) -> list[Generation]:
    """The generation records kept next to a manifest (see ``GENERATIONS_DIR``), by id."""
    out: list[Generation] = []
    folder = data_dir / GENERATIONS_DIR
    try:
        names = sorted(folder.glob("*.json"))
    except OSError:
        return out
    for f in names:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            out.append(Generation(int(data["id"]), str(data["model_name"]),
                                  str(data["model_id"]), int(data["dim"]),
                                  str(data["location"]), str(data["state"]),
                                  float(data["created_at"]), data.get("cursor"),
                                  data.get("activated_at"), str(data.get("vectors", "dense"))))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(out, key=lambda g: g.id)


def salvage_generations(path: Path) -> list[Generation]:
    """Whatever generation rows a damaged manifest still yields (often none)."""
    try:
        m = Manifest.open_readonly(path)
    except (ManifestError, sqlite3.Error):
        return []
    try:
        return m.generations()
    except sqlite3.Error:
        return []
    finally:
        m.close()


def move_aside(path: Path, tag: str = "damaged") -> Path:
    """Rename ``path`` (and its -wal/-shm) to ``<name>.<tag>-<time>``; returns the new path.

    Kept, not deleted: a person may want to look at it, and nothing is lost by keeping it.
    """
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.{tag}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{tag}-{stamp}-{n}")
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.replace(target.with_name(target.name + suffix))
    path.replace(target)
    return target
