"""Opens the manifest, the active generation's store and the model for one process.

Used by one-shot commands (``repd index``, ``repd query`` without a daemon) and by the
daemon's composition root alike, so both see the index the same way.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from repd import paths
from repd.adapters.datalock import (
    DataLock,
    announce_daemon,
    busy_by_writer,
    enter_private_umask,
    leave_private_umask,
    retract_daemon,
    tighten,
)
from repd.adapters.manifest import (
    Generation,
    Manifest,
    ManifestDamaged,
    ManifestError,
    ManifestUnwritable,
    move_aside,
    recorded_generations,
    salvage_generations,
)
from repd.adapters.store import Store, StoreError
from repd.core.ignore import IgnoreRules
from repd.errors import ConfigError, EngineError
from repd.log import get_logger
from repd.pipeline.generations import GenerationHandle, Generations, current_vectors
from repd.pipeline.indexer import Indexer
from repd.settings import Settings

log = get_logger("engine")

MANIFEST = "manifest.sqlite"
#: Questions embedded one at a time once a long-lived process loaded a model
#: (``Daemon._warm_queries``): 4 and 24 tokens in MiniLM's vocabulary.
QUERY_WARMUP = ("repd", "a folder of notes and code, searched by meaning while it changes: "
                "which file says how the daemon recovers")
#: The passage whose openings compile OpenVINO's query widths as a long-lived process
#: loads a model (``Engine.load_model``, ``Embedder.use_query_widths``): 59 tokens in
#: MiniLM's vocabulary, more than the widest.
QUERY_WIDTHS_PASSAGE = (
    f"{QUERY_WARMUP[1]} after a crash, where a model upgrade keeps the old index answering, "
    "and why a question that names a path, a function or an error message finds the chunk "
    "that holds it")


class Engine:
    """The index as one process sees it: manifest, active generation, store, model.

    A *writer* (``repd run``, ``repd index``) owns the data folder: it takes the
    exclusive data-folder lock before anything else, makes the folder private, and opens
    the manifest for writing, rebuilding it if it is damaged. A *reader* (``repd query``
    without a daemon, ``repd doctor``) creates nothing: it opens an existing manifest
    read-only and takes the shared lock only when it opens the store; if a writer holds
    the folder it raises ``IndexBusy`` and never touches the store (see
    ``repd.adapters.datalock`` for why Qdrant Edge needs this).
    """

    def __init__(self, settings: Settings, *, writer: bool, embedder: Any = None) -> None:
        self.settings = settings
        self.data_dir = settings.store.path
        self.writer = writer
        self._lock: DataLock | None = None
        self._manifest: Manifest | None = None
        self._store: Store | None = None
        self.generation: Generation | None = None
        # Tests (and the daemon on reload) may hand in an already loaded model.
        self._embedder: Any = embedder
        #: Set when the weights behind the active generation's model path changed.
        self.model_changed: str | None = None
        # One-shot commands refuse changed weights; the daemon migrates to them.
        self._strict_identity = True
        #: The generations this process has open (the active one, a building one, ...).
        self.generations = Generations()
        self._rules: dict[Path, IgnoreRules] = {}
        #: Folders (or single files) an int8 variant is calibrated from while nothing is
        #: indexed yet (the configured roots when empty; ``repd index`` sets its targets).
        self.calibration_roots: list[Path] = []
        #: Models loaded from now on compile copies for short queries, at once (a
        #: long-lived process, the daemon; see ``Embedder.use_query_widths``).
        self.query_widths = False
        #: Called when an int8 variant is about to be made (its calibration texts are
        #: asked for only then): a one-shot command says why it waits a minute.
        self.on_calibrate: Callable[[], None] | None = None
        self._announced = False
        # Everything this process creates from here on (manifest, shard files, locks) is
        # private to its owner: the index holds the text of a person's files.
        enter_private_umask()
        self._private = True
        try:
            if writer:
                self._own_data_dir()
                self._manifest = self._open_manifest_for_writing()
            else:
                self._manifest = self._open_manifest_for_reading()
            self.generation = (self._manifest.active_generation()
                               if self._manifest is not None else None)
        except BaseException:
            self.close()
            raise

    @property
    def manifest(self) -> Manifest:
        """The manifest (a reader on a data folder with no index has none)."""
        if self._manifest is None:
            raise EngineError("nothing is indexed yet: run `repd index PATH` first")
        return self._manifest

    # -- the data folder ----------------------------------------------------------------

    def _own_data_dir(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise _unwritable(self.data_dir, exc.strerror or str(exc)) from None
        if not os.access(self.data_dir, os.W_OK | os.X_OK):
            raise _unwritable(self.data_dir, "permission denied or read-only")
        self._lock = DataLock.writer(self.data_dir)
        changed = tighten(self.data_dir)
        if changed:
            log.warning("data_folder_tightened", folder=str(self.data_dir), entries=changed,
                        message="removed group/other access from the data folder: the "
                        "index holds the text of the indexed files")

    def _open_manifest_for_writing(self) -> Manifest:
        path = self.data_dir / MANIFEST
        try:
            manifest = Manifest(path)
        except ManifestUnwritable as exc:
            raise _unwritable(self.data_dir, str(exc)) from None
        except ManifestError as exc:
            return self._replace_damaged_manifest(path, str(exc))
        problem = manifest.check()
        if problem is None:
            return manifest
        manifest.close()
        return self._replace_damaged_manifest(path, f"{path} is damaged ({problem})")

    def _open_manifest_for_reading(self) -> Manifest | None:
        path = self.data_dir / MANIFEST
        if not path.exists():
            return None  # nothing indexed: and a query must not create anything
        try:
            return Manifest.open_readonly(path)
        except ManifestDamaged as exc:
            raise EngineError(f"{exc}; the next `repd index` or `repd run` rebuilds it") from None
        except ManifestError as exc:
            raise EngineError(str(exc)) from None

    def _replace_damaged_manifest(self, path: Path, problem: str) -> Manifest:
        """Move a damaged manifest aside and rebuild it from the store, or start afresh."""
        aside = move_aside(path)
        log.warning("manifest_damaged", problem=problem, moved_to=str(aside))
        manifest = Manifest(path)
        gen = self._generation_to_rebuild(aside)
        store: Store | None = None
        if gen is not None:
            try:
                store = self._open_store(gen)
            except EngineError as exc:
                log.warning("manifest_rebuild_store_unusable", error=str(exc))
        if gen is None or store is None:
            self._set_shards_aside()
            log.warning("manifest_rebuilt", source="scratch", moved_to=str(aside),
                        message=f"the manifest was damaged and is rebuilt from scratch: "
                        f"every file is indexed again (the damaged file is kept as {aside})")
            return manifest
        from repd.adapters.manifest_rebuild import rebuild_from_store

        t0 = time.perf_counter()
        try:
            stats = rebuild_from_store(manifest, store, gen)
        except (StoreError, ManifestError) as exc:
            store.close()
            raise EngineError(f"could not rebuild the damaged manifest from the index: {exc}; "
                              f"move {self.data_dir} aside and index again") from None
        self._store = store
        log.warning("manifest_rebuilt", source="store", generation=gen.id, files=stats.files,
                    chunks=stats.chunks, dropped_files=stats.dropped_files,
                    seconds=round(time.perf_counter() - t0, 2), moved_to=str(aside),
                    message=f"the manifest was damaged and is rebuilt from the index: "
                    f"{stats.files} files, {stats.chunks} chunks; the next scan confirms them "
                    f"without embedding (the damaged file is kept as {aside})")
        return manifest

    def _generation_to_rebuild(self, aside: Path) -> Generation | None:
        # The damaged file may still yield its generations; else the records kept
        # beside it. Only the active generation is rebuilt: a half-built one restarts.
        for gens in (salvage_generations(aside), recorded_generations(self.data_dir)):
            active = [g for g in gens if g.state == "active"]
            if active:
                return active[-1]
        return None

    def _set_shards_aside(self) -> None:
        # Shards of an unknown model cannot be reused; keep them out of the way (a fresh
        # generation would otherwise reopen gen-1 with whatever it holds).
        shards = self.data_dir / "shards"
        if self.settings.store.kind == "embedded" and shards.exists():
            target = move_aside(shards, "unused")
            log.warning("shards_set_aside", moved_to=str(target))
        records = self.data_dir / "generations"
        if records.exists():
            shutil.rmtree(records, ignore_errors=True)

    # -- model ---------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The model the active index is (or will be) built with."""
        return self.generation.model_name if self.generation else self.settings.model

    def load_model(self, name: str) -> Any:
        """Load a model (this is where torch gets imported); EngineError if it cannot be."""
        from repd.adapters.embedder import Embedder, EmbedderError

        log.info("loading_model", model=name, device=self.settings.device)
        try:
            emb = Embedder.load(name, device=self.settings.device,
                                token_budget=self.settings.batch_tokens,
                                cache_dir=paths.cache_dir(), backend=self.settings.backend,
                                openvino_precision=self.settings.openvino_precision,
                                calibration=self.calibration_texts)
        except EmbedderError as exc:
            raise EngineError(str(exc)) from None
        if self.query_widths:
            # Compiled here, where the model loads (at start-up, or on a migration's own
            # thread), not by the first queries after a switch (~0.2 s each).
            try:
                emb.use_query_widths(QUERY_WIDTHS_PASSAGE)
            except Exception as exc:  # loaded; a query will say what is wrong
                log.warning("query_warmup_failed", model=name,
                            error=f"{type(exc).__name__}: {exc}")
        return emb

    def calibration_texts(self) -> list[str]:
        """Chunk texts to calibrate an int8 variant on: the active index's (the same index
        gives the same texts, see ``Manifest.spread_points``) or, with no chunks indexed
        yet, chunks read from the files of ``calibration_roots`` (``pipeline/calibration``).
        """
        from repd.adapters.openvino_int8 import CALIBRATION_TEXTS

        if self.on_calibrate is not None:
            self.on_calibrate()
        if self.generation is not None:
            handle = self._active_handle()
            ids = self.manifest.spread_points(handle.id, CALIBRATION_TEXTS)
            records = handle.store.retrieve(ids, with_vectors=False) if ids else []
            texts = [text for r in records if isinstance(text := r.payload.get("text"), str)]
            if texts:
                return texts
        from repd.pipeline.calibration import chunk_planner, sample_chunk_texts

        roots = self.calibration_roots or self.settings.roots
        planner = chunk_planner(self.settings.max_file_bytes,
                                follow_symlinks=self.settings.watch.follow_symlinks,
                                allowed_roots=self.settings.roots,
                                allow_secrets=self.settings.allow_secrets)
        texts = sample_chunk_texts(roots, self.rules, planner, CALIBRATION_TEXTS)
        log.info("calibration_from_files", roots=[str(r) for r in roots], texts=len(texts))
        return texts

    def embedder(self) -> Any:
        """The active generation's model, loaded once.

        When the weights behind the generation's model path changed since it was built,
        the identity differs: a one-shot command refuses, the daemon serves the old
        index with the new weights (saying so) and migrates to them.
        """
        if self._embedder is None:
            emb = self.load_model(self.model_name)
            gen = self.generation
            if gen is not None and gen.model_id != emb.model_id:
                self.model_changed = (
                    f"the model at {self.model_name} is not the one generation {gen.id} was "
                    f"built with (weights changed: {gen.model_id.rpartition('@')[2]} -> "
                    f"{emb.model_id.rpartition('@')[2]})")
                log.warning("model_weights_changed", message=self.model_changed)
                if self._strict_identity:
                    raise EngineError(
                        f"{self.model_changed}; `repd run` migrates the index to the new "
                        "weights while the old index keeps answering")
            self._embedder = emb
        return self._embedder

    def check_model_setting(self) -> None:
        """Refuse a one-shot index with a model other than the active generation's: moving
        to another model is a migration, which the daemon carries out."""
        gen = self.generation
        if gen is not None and gen.model_name != self.settings.model:
            raise EngineError(
                f"the index was built with {gen.model_name!r} but the config names "
                f"{self.settings.model!r}: moving to another model re-embeds every file while "
                "the old index keeps answering; `repd run` does it (or `repd model use "
                "NAME` on a running daemon)")

    # -- generations and their stores ----------------------------------------------------

    def ensure_generation(self) -> Generation:
        """The active generation, created (with the model's identity) if there is none."""
        if self.generation is None:
            emb = self.embedder()
            self.generation = self.manifest.create_generation(
                emb.model_name, emb.model_id, emb.dim, self._location(emb), "active",
                current_vectors())
            self.manifest.set_meta("config_model", self.settings.model)
        return self.generation

    def _location(self, emb: Any) -> str | Callable[[int], str]:
        if self.settings.store.kind == "embedded":
            return "shards/gen-{id}"
        from repd.adapters.store_server import collection_for

        base = self.settings.store.collection
        return lambda gen_id: collection_for(base, emb.model_name, emb.model_id, gen_id)

    def create_generation(self, emb: Any) -> GenerationHandle:
        """A new building generation for ``emb``'s model, its store created empty."""
        row = self.manifest.create_generation(emb.model_name, emb.model_id, emb.dim,
                                              self._location(emb), "building",
                                              current_vectors())
        try:
            store = self._open_store(row, alias=False)
        except BaseException:
            self.manifest.delete_generation(row.id)
            raise
        return GenerationHandle(row, store, lambda: emb)

    def open_generation(self, row: Generation, embedder: Any = None) -> GenerationHandle:
        """A handle on an existing generation; its model loads on first use."""
        store = self._open_store(row, alias=row.state == "active")

        def load() -> Any:
            return embedder if embedder is not None else self.load_model(row.model_name)
        return GenerationHandle(row, store, load)

    def drop_generation(self, handle: GenerationHandle) -> None:
        """Delete a generation for good: its store's data, then its manifest rows."""
        try:
            handle.store.drop()
        except StoreError as exc:
            raise EngineError(f"could not delete generation {handle.id}'s store: {exc}") from None
        self.manifest.delete_generation(handle.id)

    def point_alias(self, handle: GenerationHandle) -> None:
        """On a Qdrant server: move the collection alias to ``handle`` (at a switch)."""
        if self.settings.store.kind != "server":
            return
        from repd.adapters.store_server import set_alias

        client = getattr(handle.store, "_client", None)
        if client is None:
            return
        try:
            set_alias(client, self.settings.store.collection, self._resolved(handle.row))
        except StoreError as exc:
            raise EngineError(str(exc)) from None

    @property
    def store(self) -> Store:
        """The active generation's store, opened on first use."""
        return self._active_handle().store

    def _active_handle(self) -> GenerationHandle:
        handle = self.generations.active
        if handle is None:
            gen = self.generation
            if gen is None:
                raise EngineError("nothing is indexed yet: run `repd index PATH` first")
            store = self._store if self._store is not None else self._open_store(gen)
            self._store = None  # the handle owns it now
            handle = GenerationHandle(gen, store, self.embedder)
            self.generations.publish(active=handle)
        return handle

    @staticmethod
    def _resolved(gen: Generation) -> str:
        return gen.location.replace("{id}", str(gen.id))

    def _open_store(self, gen: Generation, *, alias: bool = True) -> Store:
        location = self._resolved(gen)
        try:
            if self.settings.store.kind == "embedded":
                from repd.adapters.store_replicas import open_edge_store

                if self._lock is None:
                    # A reader: never load a shard someone else may have open (Edge would
                    # damage it before failing on its own lock). Raises IndexBusy.
                    self._lock = DataLock.reader(self.data_dir)
                return open_edge_store(self.data_dir / location, gen.dim, hybrid=gen.hybrid,
                                       replicas=self.settings.store.replicas,
                                       writer=self.writer)
            from qdrant_client import QdrantClient

            from repd.adapters.store_server import ServerStore, set_alias

            key = self.settings.store.api_key
            client = QdrantClient(url=self.settings.store.url,
                                  api_key=key.get_secret_value() if key else None)
            store = ServerStore(client, location, gen.dim, owns_client=True,
                                hybrid=gen.hybrid)
            if alias and self.writer:
                # A no-op when the alias already points here: it moves only at a switch
                # (or here, after a crash between the switch's commit and the move).
                set_alias(client, self.settings.store.collection, location)
            return store
        except StoreError as exc:
            raise EngineError(str(exc)) from None

    def indexer(self, *, daemon: bool = False) -> Indexer:
        """An indexer writing into the active generation (created if needed) and, in the
        daemon, into the generation a migration is building."""
        if not daemon:
            self.check_model_setting()
        else:
            # The daemon serves the old index with changed weights while it migrates.
            self._strict_identity = False
        self.ensure_generation()
        self._active_handle()
        if daemon:
            for row in self.manifest.generations():
                if row.state == "building" and self.generations.view.building is None:
                    self.generations.publish(building=self.open_generation(row))
        indexer = Indexer(self.manifest, self.generations, self.settings.max_file_bytes)
        indexer.configure(self.settings)
        return indexer

    def rules(self, root: Path) -> IgnoreRules:
        """Ignore rules of a root (cached: .gitignore files are read lazily)."""
        if root not in self._rules:
            self._rules[root] = IgnoreRules(
                root, include=self.settings.include,
                exclude=[*self.settings.exclude, *self._own_data_globs(root)],
                use_gitignore=self.settings.watch.gitignore)
        return self._rules[root]

    def _own_data_globs(self, root: Path) -> list[str]:
        # Never index our own data folder if it sits inside a root.
        try:
            rel = self.data_dir.resolve().relative_to(root.resolve())
        except ValueError:
            return []
        return [f"/{rel.as_posix()}/"] if str(rel) != "." else []

    def embed_query(self, text: str) -> list[float]:
        """The query's vector under the active generation's model."""
        return self._active_handle().embed_query(text)

    @property
    def loaded_embedder(self) -> Any:
        """The active generation's model if it is loaded, else None (never loads it)."""
        handle = self.generations.active
        loaded = handle.loaded_embedder if handle is not None else None
        # The first active handle loads through ``embedder()``, which keeps its own copy.
        return loaded if loaded is not None else self._embedder

    def update_settings(self, settings: Settings) -> None:
        """Take reloaded settings; ignore rules are rebuilt from them on next use."""
        self.settings = settings
        self._rules.clear()

    def announce(self, socket: Path | str) -> None:
        """Record in the data folder that this daemon serves the index on ``socket``.

        A process that finds the folder held (its settings name another socket) asks
        the daemon there instead of opening the store. Removed again by ``close``.
        """
        if not self.writer:
            raise EngineError("only the process writing the index can announce itself")
        announce_daemon(self.data_dir, socket)
        self._announced = True

    def check_no_writer(self) -> None:
        """Raise IndexBusy now if a writer holds the data folder (a reader's early check,
        so that it need not load a model only to find the store unavailable)."""
        # A Qdrant server serves any number of clients; an embedded shard only one process.
        embedded = self.settings.store.kind == "embedded"
        if not self.writer and self._manifest is not None and embedded:
            busy = busy_by_writer(self.data_dir)
            if busy is not None:
                raise busy

    def close(self) -> None:
        """Release the store, the manifest and the data-folder lock (idempotent)."""
        try:
            self.generations.close()
            if self._store is not None:
                store, self._store = self._store, None
                store.close()
        finally:
            if self._manifest is not None:
                self._manifest.close()
                self._manifest = None
            if self._announced:
                self._announced = False
                retract_daemon(self.data_dir)
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            if getattr(self, "_private", False):
                self._private = False
                leave_private_umask()


def _unwritable(data_dir: Path, why: str) -> ConfigError:
    return ConfigError([
        f"store.path: the data folder {data_dir} cannot be written ({why}): make it "
        f"writable (chmod u+rwx {data_dir}) or point store.path at a folder you own"])
