"""Running a saved OpenVINO export with no torch, transformers or sentence-transformers.

Importing those three costs 6-12 s on a 2-core machine (most of a small `repd index`,
of every daemon start and of a `repd query` with no daemon) and several hundred MB of
memory, yet a verified export needs none of them to run: the network is OpenVINO IR,
the tokenizer is a ``tokenizers.Tokenizer``, and mean or CLS pooling is a line of numpy.

So the first load of an export goes the full way (:class:`OpenVinoBackend`) and then
records a :class:`RuntimeSpec` beside it: the two tokenizers exactly as that load set them
up (serialized), the padding, the pooling, the token limit and the chunking key. Later
loads read the spec and build a :class:`DirectBackend` from it and the IR.

Same vectors by construction and by check:

* the spec is taken from the full path's own objects, and is bound to the export's
  marker and to the versions of the libraries that made it (another version of any of
  them and the full path runs again and records a new spec);
* only models whose modules are a Transformer, a mean or CLS Pooling and optionally a
  Normalize get a spec (anything else, a Dense head or prompts, stays on the full path);
* every direct load runs the probe texts and compares them with the torch vectors the
  export recorded (cosine >= :data:`~repd.adapters.openvino_backend.SAME_VECTORS_MIN_COSINE`),
  in f32, before another precision is tried (the same check as the full path).

Anything that does not hold returns ``None`` (or raises) and the full path is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from repd.adapters import openvino_backend
from repd.adapters.device import EmbedderError
from repd.adapters.embedder import (
    Padding,
    Prepared,
    _Tokenized,
    pad_features,
    prepare_with,
)
from repd.adapters.openvino_backend import (
    SAME_VECTORS_MIN_COSINE,
    CompiledCopies,
    OpenVinoBackend,
    RunsCompiledCopies,
)
from repd.adapters.openvino_export import (
    RUNTIME_SPEC,
    library_versions,
    read_marker,
    worst_cosine,
)
from repd.adapters.token_count import TokenCounter
from repd.log import get_logger

__all__ = ["IR_FILES", "DirectBackend", "RuntimeSpec", "ir_path", "load_direct", "read_spec",
           "record_spec", "spec_of"]

log = get_logger("openvino")

#: The IR of an export (graph, weights), in its ``openvino/`` folder, as optimum-intel
#: names them.
IR_FILES = ("openvino_model.xml", "openvino_model.bin")


def ir_path(folder: Path) -> Path:
    """The IR graph of the export in ``folder`` (its weights lie beside it)."""
    return folder / "openvino" / IR_FILES[0]

_SPEC_VERSION = 1
#: Libraries whose version decides what the full path would set up; a spec recorded
#: under other versions is not used (the full path runs and records it again).
_LIBRARIES = ("openvino", "optimum-intel", "sentence-transformers", "transformers", "tokenizers")
_POOLINGS = ("mean", "cls")


@dataclass(frozen=True, slots=True)
class RuntimeSpec:
    """What running an export needs besides its IR, as the full path had it set up."""

    embed_tokenizer: str  # serialized tokenizers.Tokenizer: truncation on, padding off
    count_tokenizer: str  # the same with truncation off (counts for the chunker)
    pad_id: int
    pad_type_id: int
    left_pad: bool
    type_ids: bool
    max_tokens: int
    chunking_key: str
    dim: int
    pooling: str  # "mean" or "cls"

    @property
    def padding(self) -> Padding:
        """The padding as :func:`~repd.adapters.embedder.pad_features` takes it."""
        return Padding(self.pad_id, self.pad_type_id, self.left_pad, self.type_ids)


def _pooling(st_model: Any) -> str | None:
    """The pooling mode when the modules are Transformer, Pooling(mean|cls) [, Normalize]."""
    modules = list(st_model)
    names = [type(m).__name__ for m in modules]
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return None
    mode = getattr(modules[1], "pooling_mode", None)
    if isinstance(mode, list | tuple) and len(mode) == 1:
        mode = mode[0]
    return mode if mode in _POOLINGS else None


def spec_of(st_model: Any, runner: OpenVinoBackend) -> RuntimeSpec | None:
    """The spec of a loaded full-path backend, or ``None`` when it cannot run without torch."""
    pooling = _pooling(st_model)
    if pooling is None or not runner.fast or runner._embed_tok is None:
        return None
    padding = runner._padding
    return RuntimeSpec(
        embed_tokenizer=runner._embed_tok.to_str(), count_tokenizer=runner._count_tok.to_str(),
        pad_id=padding.pad_id, pad_type_id=padding.pad_type_id, left_pad=padding.left,
        type_ids=padding.type_ids, max_tokens=runner.max_tokens,
        chunking_key=runner.chunking_key, dim=runner.dim, pooling=pooling)


def record_spec(folder: Path, marker_created: Any, spec: RuntimeSpec) -> None:
    """Write ``spec`` beside the export at ``folder`` (atomically; a failure only warns)."""
    body = {"version": _SPEC_VERSION, "marker_created": marker_created,
            "libraries": library_versions(_LIBRARIES), "spec": asdict(spec)}
    # The temporary file lies outside the export folder: a reader lists that folder's
    # files against the marker, and a stray file would read as a damaged export.
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{folder.name}.runtime-", dir=folder.parent)
        tmp = Path(name)
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh)
        tmp.chmod(0o644)
        tmp.replace(folder / RUNTIME_SPEC)
    except OSError as exc:
        log.warning("openvino_runtime_spec_unwritable", path=str(folder), error=str(exc))
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def read_spec(folder: Path, marker: dict[str, Any]) -> tuple[RuntimeSpec | None, str]:
    """The runtime spec beside the export at ``folder`` if current, else ``(None, why)``."""
    try:
        body = json.loads((folder / RUNTIME_SPEC).read_text())
    except FileNotFoundError:
        return None, "no runtime spec yet"
    except (OSError, ValueError):
        return None, "unreadable runtime spec"
    if not isinstance(body, dict) or body.get("version") != _SPEC_VERSION:
        return None, "runtime spec of another version"
    if body.get("marker_created") != marker.get("created"):
        return None, "runtime spec of an earlier export"
    if body.get("libraries") != library_versions(_LIBRARIES):
        return None, "runtime spec recorded under other library versions"
    try:
        spec = RuntimeSpec(**body["spec"])
    except (KeyError, TypeError):
        return None, "runtime spec with other fields"
    if spec.pooling not in _POOLINGS:
        return None, f"runtime spec with pooling {spec.pooling!r}"
    return spec, ""


class DirectBackend(RunsCompiledCopies):
    """An export run by OpenVINO and ``tokenizers`` alone, pooled and normalized in numpy.

    Implements :class:`~repd.adapters.embedder.Backend`; see the module's docstring for
    why its vectors are the full path's.
    """

    fast = True  # always pre-tokenized: there is no encode() to fall back to
    runtime = "direct"  # no torch imported

    def __init__(self, spec: RuntimeSpec, network: Any, reference: np.ndarray | None,
                 min_cosine: float | None = None, precision: str = "f32") -> None:
        """Compile ``network`` in ``precision`` and check it against ``reference``.

        ``reference``: the vectors of the probe texts the export recorded (torch's; an
        int8 variant's own, see :mod:`repd.adapters.openvino_int8`); ``None`` only while
        an export is being made. Raises :class:`EmbedderError` when the vectors are
        not those (cosine under ``min_cosine``, by default
        :data:`~repd.adapters.openvino_backend.SAME_VECTORS_MIN_COSINE`); see
        :func:`load_direct` for what follows such a refusal in another precision than
        f32.
        """
        import openvino as ov
        from tokenizers import Tokenizer

        self._spec = spec
        self._padding = spec.padding
        self._embed_tok = Tokenizer.from_str(spec.embed_tokenizer)
        self._count_tok = Tokenizer.from_str(spec.count_tokenizer)
        self._counter = TokenCounter(self._count_tok, self._embed_tok)
        self.max_tokens = spec.max_tokens
        self.chunking_key = spec.chunking_key
        self.dim = spec.dim
        # The settings through the module, as switch_precision reads them (one place).
        config = openvino_backend.bulk_config(precision=precision)
        self.copies = CompiledCopies(network, ov.Core().compile_model(network, "CPU", config),
                                     precision=precision)
        if reference is None:
            return
        worst = worst_cosine(self._probe(), reference)
        bar = SAME_VECTORS_MIN_COSINE if min_cosine is None else min_cosine
        if not worst >= bar:  # "not >=": NaN fails too
            raise EmbedderError(f"the direct OpenVINO runtime gives other vectors than "
                                f"recorded at export (probe cosine {worst:.6f})")

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text without special tokens or truncation (the chunker's count)."""
        return self._counter(texts)

    def prepare(self, texts: Sequence[str]) -> _Tokenized:
        """Token ids per text, special tokens added, truncated to the model's limit."""
        return prepare_with(self._counter, self._embed_tok, texts, self._padding.type_ids)

    def run(self, prepared: Prepared, batch: Sequence[int]) -> np.ndarray:
        """Unit vectors (float32) for the texts at ``batch``, in that order."""
        assert isinstance(prepared, _Tokenized)
        features = pad_features(prepared, batch, self._padding)
        # The infer request's own buffer, not a copy: read before this thread's next infer.
        hidden = self.copies.infer(features, copy=False, left_padded=self._padding.left)
        mask = features["attention_mask"]
        if self._spec.pooling == "cls":
            # sentence-transformers takes the first attended token (left padding aware).
            pooled = hidden[np.arange(len(batch)), mask.argmax(axis=1)].astype(np.float32)
        else:  # mean over attended tokens, in f32, as Pooling does (count clamped at 1e-9)
            weights = mask.astype(np.float32)
            # (batch, 1, seq) @ (batch, seq, dim): the masked sum with no (batch, seq, dim)
            # temporaries, ~8x faster than multiplying and summing.
            summed = np.matmul(weights[:, None, :], hidden.astype(np.float32, copy=False))
            pooled = summed[:, 0, :] / np.maximum(weights.sum(axis=1), 1e-9)[:, None]
        # torch's normalize: x / max(||x||, 1e-12)
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return np.asarray(pooled / norms, dtype=np.float32)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """A host allocation that failed (the embedder then halves its batches)."""
        return isinstance(exc, MemoryError) or (
            isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())

    def release_memory(self) -> None:
        """Nothing cached to give back on the CPU."""


def load_direct(folder: Path, model_id: str, precision: str, strict: bool,
                min_cosine: float | None = None) -> DirectBackend | None:
    """A :class:`DirectBackend` for the export at ``folder``, or ``None`` (use the full path).

    ``None`` when the export or its spec is missing, stale or of other library versions,
    or when the probe vectors are not the recorded ones (logged); ``strict`` precision
    errors raise. ``min_cosine``: the bar for both checks, by default
    :data:`~repd.adapters.openvino_backend.SAME_VECTORS_MIN_COSINE`.
    """
    marker, why = read_marker(folder, model_id)
    spec = None
    if marker is not None:
        spec, why = read_spec(folder, marker)
    if marker is None or spec is None:
        log.debug("openvino_direct_unused", path=str(folder), reason=why)
        return None
    try:
        import openvino as ov

        reference = np.asarray(marker.get("probe_vectors"), dtype=np.float32)
        network = ov.Core().read_model(str(ir_path(folder)))
        if precision != "f32":
            # Straight in the precision asked for, checked against the recorded vectors:
            # one compile at each start instead of four (f32 and then this precision,
            # each with its one-thread copy), ~1 s less on 2 cores. Refused, the steps
            # below find out why (a bad export, or a precision that moves the vectors)
            # and say so as they always did.
            # The bar is switch_precision's, read where it reads it.
            bar = openvino_backend.SAME_VECTORS_MIN_COSINE if min_cosine is None else min_cosine
            with contextlib.suppress(Exception):
                return DirectBackend(spec, network, reference, bar, precision)
        backend = DirectBackend(spec, network, reference, min_cosine)
    except Exception as exc:  # other vectors, a missing IR, a tokenizer that will not parse
        log.warning("openvino_direct_unusable", path=str(folder),
                    reason=f"{type(exc).__name__}: {str(exc).strip()[:200]}",
                    using="the full OpenVINO path")
        return None
    if precision != "f32":  # as the full path does; a strict refusal is raised from here
        backend.copies.switch_precision(precision, strict, backend._probe, min_cosine)
    return backend
