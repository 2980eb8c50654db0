"""Opens the manifest, the active generation's store and the model for one process.

Used by one-shot commands (``repd index``, ``repd query`` without a daemon) and by the
daemon's composition root alike, so both see the index the same way.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO, Any

from repd import paths
from repd.adapters.manifest import Generation, Manifest
from repd.adapters.store import Store, StoreError
from repd.core.ignore import IgnoreRules
from repd.errors import EngineError
from repd.log import get_logger
from repd.pipeline.indexer import Indexer
from repd.settings import Settings

log = get_logger("engine")


class Engine:
    """The index as one process sees it: manifest, active generation, store, model."""

    def __init__(self, settings: Settings, *, writer: bool, embedder: Any = None) -> None:
        self.settings = settings
        self.data_dir = settings.store.path
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file: IO[str] | None = None
        if writer:
            self._take_writer_lock()
        self.manifest = Manifest(self.data_dir / "manifest.sqlite")
        self.generation: Generation | None = self.manifest.active_generation()
        self._store: Store | None = None
        # Tests (and the daemon on reload) may hand in an already loaded model.
        self._embedder: Any = embedder
        self._rules: dict[Path, IgnoreRules] = {}

    def _take_writer_lock(self) -> None:
        # Only one writer (a daemon or a `repd index`) may own the manifest at a time.
        fh = (self.data_dir / "writer.lock").open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise EngineError(
                f"the index in {self.data_dir} is being written by {owner}; "
                "stop it first, or use the running daemon (repd status)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock_file = fh

    # -- model ---------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The model the index is (or will be) built with."""
        return self.generation.model_name if self.generation else self.settings.model

    def embedder(self) -> Any:
        """Load the model once (this is where torch gets imported)."""
        if self._embedder is None:
            from repd.adapters.embedder import Embedder, EmbedderError

            log.info("loading_model", model=self.model_name, device=self.settings.device)
            try:
                self._embedder = Embedder.load(
                    self.model_name, device=self.settings.device,
                    token_budget=self.settings.batch_tokens, cache_dir=paths.cache_dir())
            except EmbedderError as exc:
                raise EngineError(str(exc)) from None
            gen = self.generation
            if gen is not None and gen.model_id != self._embedder.model_id:
                raise EngineError(
                    f"the model at {self.model_name} is not the one the index was built with "
                    f"(weights changed: {gen.model_id.rpartition('@')[2]} -> "
                    f"{self._embedder.model_id.rpartition('@')[2]})")
        return self._embedder

    def check_model_setting(self) -> None:
        """Refuse to index with a model other than the active generation's."""
        gen = self.generation
        if gen is not None and gen.model_name != self.settings.model:
            raise EngineError(
                f"the index was built with {gen.model_name!r} but the config names "
                f"{self.settings.model!r}; switching models needs a new generation "
                "(not supported yet): set model back, or use a new store.path")

    # -- store ---------------------------------------------------------------------------

    def ensure_generation(self) -> Generation:
        """The active generation, created (with the model's identity) if there is none."""
        if self.generation is None:
            emb = self.embedder()
            location = ("shards/gen-{id}" if self.settings.store.kind == "embedded"
                        else f"{self.settings.store.collection}-gen-{{id}}")
            gen = self.manifest.create_generation(
                emb.model_name, emb.model_id, emb.dim, location, "active")
            self.generation = gen
        return self.generation

    @property
    def store(self) -> Store:
        """The active generation's store, opened on first use."""
        if self._store is None:
            gen = self.generation
            if gen is None:
                raise EngineError("nothing is indexed yet: run `repd index PATH` first")
            self._store = self._open_store(gen)
        return self._store

    def _open_store(self, gen: Generation) -> Store:
        location = gen.location.replace("{id}", str(gen.id))
        try:
            if self.settings.store.kind == "embedded":
                from repd.adapters.store_edge import EdgeStore

                return EdgeStore.open(self.data_dir / location, gen.dim)
            from qdrant_client import QdrantClient

            from repd.adapters.store_server import ServerStore, set_alias

            key = self.settings.store.api_key
            client = QdrantClient(url=self.settings.store.url,
                                  api_key=key.get_secret_value() if key else None)
            store = ServerStore(client, location, gen.dim, owns_client=True)
            set_alias(client, self.settings.store.collection, location)
            return store
        except StoreError as exc:
            raise EngineError(str(exc)) from None

    def indexer(self) -> Indexer:
        """An indexer writing into the active generation (created if needed)."""
        self.check_model_setting()
        gen = self.ensure_generation()
        return Indexer(self.manifest, self.store, gen, self.embedder,
                       self.settings.max_file_bytes,
                       follow_symlinks=self.settings.watch.follow_symlinks)

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
        vec = self.embedder().embed([text])[0]
        return [float(x) for x in vec]

    def close(self) -> None:
        """Release the store, the manifest and the writer lock."""
        if self._store is not None:
            self._store.close()
            self._store = None
        self.manifest.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
