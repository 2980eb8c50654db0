"""Running a SentenceTransformer's transformer through OpenVINO on the CPU.

The model comes from :mod:`repd.adapters.openvino_export` (sentence-transformers'
``backend="openvino"``). optimum-intel's model object runs every call through one infer
request shared by all threads, which is unsafe from two threads at once; so the fast path
here keeps one infer request per calling thread, on one of two compiled copies of the
same network:

* the *bulk* copy runs with :func:`~repd.adapters.device.cpu_threads` inference threads
  (one stream): a batch uses every core we may;
* a small input (at most ``_SMALL_RUN_TOKENS`` padded tokens: a search query) runs with
  all cores too while no bulk batch holds them (a SciFact question in 3.4 ms against 6.0
  on one thread, idle, this 2-core box), else on the *small* copy, one thread, compiled
  on first use (in a long-lived process, at load: ``use_query_widths``). A query never
  queues behind a bulk batch (a lock held for each bulk run, taken by a query only when
  free), and a bulk batch waits for at most one query's run.
  With all cores, one text of at most ``QUERY_WIDTHS[-1]`` tokens runs on a *width* copy:
  the network compiled for one input shape, the text padded to it, the padding's outputs
  dropped (OpenVINO's CPU kernels for a fixed shape embedded SciFact questions in 3.9 ms
  against 4.9 through the dynamic network, padding included; ~33 MiB each). One is
  compiled for the first text of its width, and kept only if that text's token
  embeddings stay the bulk copy's (see ``_width_copy``). Only a long-lived process
  turns them on (``use_query_widths``: the daemon): a one-shot query would pay ~0.2 s
  of compile to save ~1 ms.

All copies compute in one precision: f32, as verified against torch by the export, or
bf16 where the CPU has it natively and the probe vectors stay f32's (see
:class:`OpenVinoBackend` and :data:`SAME_VECTORS_MIN_COSINE`).

The pooling and normalization modules after the transformer are sentence-transformers'
own, fed the token embeddings as torch tensors, so the vectors equal ``encode()``'s
(``_check_fast_path`` verifies that at load; if they differ, ``encode()`` is used,
serialized by a lock because of the shared request). That is the *full* runtime, which
a first load of an export runs; later loads run the same compiled copies
(:class:`CompiledCopies`) without torch, see :mod:`repd.adapters.openvino_runtime`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from repd.adapters.device import EmbedderError, cpu_threads
from repd.adapters.embedder import (
    _PROBE_TEXTS,
    _SMALL_RUN_TOKENS,
    Prepared,
    _SentenceTransformerBackend,
    _Tokenized,
)
from repd.adapters.openvino_export import worst_cosine
from repd.log import get_logger

__all__ = ["SAME_VECTORS_MIN_COSINE", "CompiledCopies", "OpenVinoBackend", "RunsCompiledCopies",
           "bulk_config"]

log = get_logger("openvino")


#: Input widths (tokens) of the copies compiled for one shape that a single short input
#: runs on once ``use_query_widths`` was called (see the module doc): a query of 1-16
#: tokens pads to 16, of 17-24 to 24, and so on; a longer one runs on the dynamic copy.
#: SciFact's questions, 10-36 tokens, half of them over 20, embedded one at a time in
#: one run (bf16, 2 idle cores): p50 / p95 3.90 / 5.72 ms on these widths, 4.17 / 6.56 on
#: 16 and 32 only, 4.92 / 6.57 on the dynamic copy; ~33 MiB each.
QUERY_WIDTHS = (16, 24, 32, 48)

#: Tokens of the input that :meth:`CompiledCopies.warm_small` runs: a short query's.
_WARM_TOKENS = 16

#: The least cosine between a probe text's vector in another precision and in f32 for
#: that precision to count as the same representation (the bar torch and OpenVINO f32
#: clear by far, ~1 - 1e-7). bf16 on MiniLM: 0.99997 to torch on 300 SciFact documents.
SAME_VECTORS_MIN_COSINE = 0.9999


def bulk_config(threads: int | None = None, precision: str = "f32") -> dict[str, str]:
    """The OpenVINO CPU settings for bulk batches: latency hint, one stream, our core count.

    The precision is always explicit: OpenVINO's default on a CPU with native bf16 is
    bf16, and the export is verified against torch in f32 before another precision is
    tried (see :class:`OpenVinoBackend`).
    """
    return {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": str(threads or cpu_threads())}


class CompiledCopies:
    """The compiled copies of one OpenVINO network and each thread's infer requests.

    Shared by both ways of running an export: :class:`OpenVinoBackend` (the
    sentence-transformers model around it) and
    :class:`~repd.adapters.openvino_runtime.DirectBackend` (no torch at all).
    ``on_bulk`` is told of every new bulk copy (optimum's own ``encode()`` path must run
    through it too).
    """

    def __init__(self, network: Any, bulk: Any, on_bulk: Callable[[Any], None] | None = None,
                 precision: str = "f32") -> None:
        """Hold ``bulk``, ``network`` compiled in ``precision``; the small copy comes later."""
        self.network = network
        self.input_names = {name for port in network.inputs for name in port.get_names()}
        self.bulk = bulk
        self.small: Any = None
        self.precision = precision
        self._on_bulk = on_bulk
        self._local = threading.local()
        self._probing = threading.local()
        self._lock = threading.Lock()
        #: Held for each run on the bulk copy: one stream runs one request at a time, so
        #: a query takes the bulk copy only when no batch holds it (see ``infer``).
        self._bulk_busy = threading.Lock()
        #: The widths a single short input runs on (``QUERY_WIDTHS`` once asked for).
        self.query_widths: tuple[int, ...] = ()
        #: The width copies by width; None where one was refused (see ``_width_copy``).
        self._widths: dict[int, Any] = {}

    @contextlib.contextmanager
    def bulk_only(self) -> Iterator[None]:
        """Run this thread's inputs on the bulk copy, however small (the load's probes:
        a load then compiles one copy, not two; the one-thread copy is compiled when a query
        first needs it, or by ``warm_small``, ~0.25 s on 2 cores)."""
        self._probing.on = True
        try:
            yield
        finally:
            self._probing.on = False

    def switch_precision(self, precision: str, strict: bool, probe: Callable[[], np.ndarray],
                         min_cosine: float | None = None) -> None:
        """Recompile the network in ``precision`` and keep it if ``probe()`` stays f32's
        (cosine >= ``min_cosine``, by default :data:`SAME_VECTORS_MIN_COSINE`).

        A compile or a probe run that fails in that precision counts as unfaithful too:
        f32, already verified, stays with the warning ``openvino_precision_unfaithful``,
        or, when ``strict`` (the user asked for that precision by name),
        :class:`EmbedderError` is raised.
        """
        import openvino as ov

        reference = probe()
        previous = self.bulk
        try:
            self._use_bulk(ov.Core().compile_model(self.network, "CPU",
                                                   bulk_config(precision=precision)), precision)
            worst = worst_cosine(probe(), reference)
            bar = SAME_VECTORS_MIN_COSINE if min_cosine is None else min_cosine
            why = "" if worst >= bar else (
                f"gives other vectors than f32 for this model (probe cosine {worst:.6f})")
        except Exception as exc:  # e.g. a CPU plugin that refuses the precision after all
            why = f"cannot run this model: {type(exc).__name__}: {str(exc).strip()[:200]}"
        if not why:
            return
        self._use_bulk(previous, "f32")
        if strict:
            raise EmbedderError(f"OpenVINO in {precision} {why}; "
                                "set openvino_precision = \"f32\" or \"auto\"")
        log.warning("openvino_precision_unfaithful", precision=precision, reason=why,
                    using="f32")

    def _use_bulk(self, compiled: Any, precision: str) -> None:
        with self._lock:
            self.bulk = compiled
            if self._on_bulk is not None:
                self._on_bulk(compiled)
            self.small = None  # recompiled in the new precision on first use
            self._widths = {}
            self._local = threading.local()  # infer requests belonged to the old copies
            self.precision = precision

    def _small_model(self) -> Any:
        with self._lock:
            if self.small is None:
                import openvino as ov

                self.small = ov.Core().compile_model(self.network, "CPU",
                                                     bulk_config(1, self.precision))
            return self.small

    def warm_small(self) -> None:
        """Compile the one-thread copy and run it once now (~0.25 s on 2 cores: 0.2 s of
        compile, 60 ms of first run), not in the first query that comes while a batch
        runs: that query, often the one that looks for a file just saved, took 0.4-0.5 s
        where the next ones take ~70 ms (``bench/bench_daemon.py``). ~10 MiB."""
        ids = np.zeros((1, _WARM_TOKENS), dtype=np.int64)  # 0 is in every vocabulary
        inputs = self.inputs_for({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        self._run(self.request(small=True), inputs, copy=False)

    def request(self, small: bool) -> Any:
        """This thread's infer request on the small or the bulk copy (made on first use)."""
        attr = "small" if small else "bulk"
        request = getattr(self._local, attr, None)
        if request is None:
            compiled = self._small_model() if small else self.bulk
            request = compiled.create_infer_request()
            setattr(self._local, attr, request)
        return request

    def inputs_for(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``features`` as the network takes them (see :meth:`infer`)."""
        names = self.input_names
        inputs = {k: v for k, v in features.items() if k in names}
        if "token_type_ids" in names and "token_type_ids" not in inputs:
            inputs["token_type_ids"] = np.zeros_like(features["input_ids"])
        return inputs

    def infer(self, features: dict[str, np.ndarray], copy: bool = True,
              left_padded: bool = False) -> np.ndarray:
        """The network's first output (token embeddings) for padded ``features``.

        Features the network does not take are left out; a ``token_type_ids`` input it
        takes but the tokenizer does not make is all zeros, as transformers fills it.
        With ``copy`` False the array is the infer request's own output buffer (no copy
        of ~6 MB per batch): valid only until this thread's next ``infer``.
        ``left_padded``: the tokenizer pads on the left (a width copy pads the same way).
        """
        inputs = self.inputs_for(features)
        ids = features["input_ids"]
        small = (ids.shape[0] * ids.shape[1] <= _SMALL_RUN_TOKENS
                 and not getattr(self._probing, "on", False))
        # A small input runs on every core only if no batch holds the bulk copy; a
        # batch waits for the copy. Measured under load (6 busy processes on 2 cores),
        # OpenVINO's two threads cost a query 10 % more than one, no stall; idle, 43 % less.
        if not self._bulk_busy.acquire(blocking=not small):
            return self._run(self.request(small=True), inputs, copy)
        try:
            width = next((w for w in self.query_widths if ids.shape[1] <= w), None)
            if small and ids.shape[0] == 1 and width is not None:
                request = self._width_request(width, inputs, left_padded)
                if request is not None:
                    return _run_padded(request, inputs, width, left_padded, copy)
            return self._run(self.request(small=False), inputs, copy)
        finally:
            self._bulk_busy.release()

    def _width_request(self, width: int, inputs: dict[str, np.ndarray],
                       left_padded: bool) -> Any:
        """This thread's infer request on the copy of ``width``, or None where that copy
        was refused. Called with the bulk copy held (its first use checks against it)."""
        requests: dict[int, Any] = getattr(self._local, "widths", None) or {}
        if width not in requests:
            compiled = self._width_copy(width, inputs, left_padded)
            if compiled is None:
                return None
            requests[width] = compiled.create_infer_request()
            self._local.widths = requests
        return requests[width]

    def _width_copy(self, width: int, inputs: dict[str, np.ndarray],
                    left_padded: bool) -> Any:
        """The copy of ``width``, compiled on first use and checked then: ``inputs``'
        token embeddings through it, padded, must be the bulk copy's (per-token cosine
        at least :data:`SAME_VECTORS_MIN_COSINE`), else it is refused (None) for good.

        A model whose outputs depend on the padding (positions counted from the left
        edge under left padding, say) or that cannot take one fixed shape is refused so.
        """
        with self._lock:
            if width in self._widths:
                return self._widths[width]
            import openvino as ov

            compiled: Any = None
            try:
                network = self.network.clone()
                network.reshape({port.get_any_name(): ov.PartialShape([1, width])
                                 for port in network.inputs})
                compiled = ov.Core().compile_model(network, "CPU",
                                                   bulk_config(precision=self.precision))
                padded = _run_padded(compiled.create_infer_request(), inputs, width,
                                     left_padded, copy=True)
                exact = self._run(self.request(small=False), inputs, copy=True)
                worst = worst_cosine(padded[0], exact[0])
                if not worst >= SAME_VECTORS_MIN_COSINE:  # NaN too
                    log.warning("openvino_width_copy_refused", width=width,
                                reason=f"token embeddings moved (cosine {worst:.6f})")
                    compiled = None
            except Exception as exc:  # a network that cannot take a fixed shape
                log.warning("openvino_width_copy_refused", width=width,
                            reason=f"{type(exc).__name__}: {str(exc).strip()[:200]}")
                compiled = None
            self._widths[width] = compiled
            return compiled

    @staticmethod
    def _run(request: Any, inputs: dict[str, np.ndarray], copy: bool) -> np.ndarray:
        output = request.infer(inputs, share_outputs=True)[request.model_outputs[0]]
        return np.array(output, copy=True) if copy else output

    def memory_bytes(self) -> int:
        """Bytes of the network's constants (its weights), as the bulk copy holds them.

        Not equal to the torch module's size: the export leaves out what feature
        extraction never runs (BERT's pooler) and buffers such as position ids.
        """
        return sum(int(op.get_byte_size()) for op in self.network.get_ops()
                   if op.get_type_name() == "Constant")


class RunsCompiledCopies:
    """What both OpenVINO runtimes derive from their :class:`CompiledCopies` the same way.

    A subclass sets ``self.copies`` and has ``prepare`` and ``run`` (the Backend protocol).
    """

    copies: CompiledCopies

    @property
    def precision(self) -> str:
        """What the network computes in: ``f32`` or ``bf16``."""
        return self.copies.precision

    @property
    def _bulk(self) -> Any:
        return self.copies.bulk

    @property
    def _small(self) -> Any:
        return self.copies.small

    def use_query_widths(self) -> tuple[int, ...]:
        """Run single short inputs on width copies from now on (see the module doc); the
        widths, smallest first. The one-thread copy, which queries take while a batch
        runs, is made ready now too (:meth:`CompiledCopies.warm_small`)."""
        self.copies.query_widths = QUERY_WIDTHS
        self.copies.warm_small()
        return QUERY_WIDTHS

    def _probe(self) -> np.ndarray:
        """The probe texts' vectors, as :meth:`CompiledCopies.switch_precision` compares them."""
        backend: Any = self
        with self.copies.bulk_only():
            return np.asarray(backend.run(backend.prepare(_PROBE_TEXTS),
                                          range(len(_PROBE_TEXTS))))

    def memory_bytes(self) -> int:
        """Bytes of the network's constants (see :meth:`CompiledCopies.memory_bytes`)."""
        return self.copies.memory_bytes()


class OpenVinoBackend(RunsCompiledCopies, _SentenceTransformerBackend):
    """A SentenceTransformer whose transformer is an optimum-intel OpenVINO model."""

    runtime = "full"  # torch, transformers, sentence-transformers and optimum imported

    def __init__(self, model: Any, export_dir: Path, precision: str = "f32",
                 strict: bool = False) -> None:
        """Wrap ``model`` (compiled in f32) and switch it to ``precision`` when faithful.

        A precision other than f32 is kept only if the probe texts' vectors stay within
        :data:`SAME_VECTORS_MIN_COSINE` of f32's (see :meth:`CompiledCopies.switch_precision`).
        """
        self._export_dir = export_dir
        transformer = model[0]
        auto_model = transformer.auto_model
        auto_model.compile()  # optimum compiles lazily; we want the bulk copy now

        def on_bulk(compiled: Any) -> None:
            # optimum's encode() path runs through auto_model.request too: one compiled copy.
            auto_model.request = compiled

        self.copies = CompiledCopies(auto_model.model, auto_model.request, on_bulk)
        self._output_name = getattr(transformer, "module_output_name", "token_embeddings")
        self._heads = list(model)[1:]
        self._encode_lock = threading.Lock()
        super().__init__(model, "cpu")
        if precision != "f32":
            self.copies.switch_precision(precision, strict, self._probe)

    def run(self, prepared: Prepared, batch: Sequence[int]) -> np.ndarray:
        if not isinstance(prepared, _Tokenized):
            return super().run(prepared, batch)  # encode(), through _encode's lock
        import torch

        features = self._features(prepared, batch)
        hidden = self.copies.infer(features, left_padded=self._padding.left)
        with torch.inference_mode():
            state: dict[str, Any] = {k: torch.from_numpy(v) for k, v in features.items()}
            state[self._output_name] = torch.from_numpy(hidden)
            for module in self._heads:
                state = module(state)
            vectors = torch.nn.functional.normalize(state["sentence_embedding"].float(), p=2, dim=1)
            return np.asarray(vectors.numpy(), dtype=np.float32)

    def _encode(self, texts: list[str]) -> np.ndarray:
        with self._encode_lock:  # optimum's model shares one infer request between threads
            return super()._encode(texts)

    # is_out_of_memory is torch's (inherited): OpenVINO raises none of those, so batch
    # halving, which is for accelerators with fixed memory, never starts here.

    def release_memory(self) -> None:
        """Nothing cached to give back on the CPU."""


def _run_padded(request: Any, inputs: dict[str, np.ndarray], width: int, left: bool,
                copy: bool) -> np.ndarray:
    """``inputs`` (one text) through ``request`` of a copy of ``width``: padded with
    zeros (the attention mask's zeros hide the ids; 0 is in every vocabulary), the
    padding's outputs dropped."""
    n = inputs["input_ids"].shape[1]
    pad = ((0, 0), (width - n, 0) if left else (0, width - n))
    output = CompiledCopies._run(request, {k: np.pad(v, pad) for k, v in inputs.items()},
                                 copy=False)
    real = output[:, width - n:] if left else output[:, :n]
    return np.array(real, copy=True) if copy else real
