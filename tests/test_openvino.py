"""The OpenVINO backend: same vectors and identity as torch, one export per model, reused.

The tests with the real model skip only when optimum-intel/openvino is not installed
(`pip install -e '.[openvino]'`); the choice of backend is tested either way.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from repd.adapters import embedder, openvino_backend, openvino_export, openvino_runtime
from repd.adapters.device import (
    EmbedderError,
    choose_backend,
    choose_precision,
    cpu_threads,
    openvino_cpu_capabilities,
)
from repd.adapters.embedder import Embedder
from repd.adapters.openvino_export import MARKER, openvino_available
from repd.engine import Engine
from repd.settings import Settings
from tests.helpers import make_settings

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
needs_openvino = pytest.mark.skipif(
    not openvino_available(),
    reason="optimum-intel[openvino] is not installed (pip install -e '.[openvino]')")

_CLAIMS = [
    "Vitamin D deficiency is associated with an increased risk of multiple sclerosis.",
    "Macrophages polarize toward an M2 phenotype in the tumour microenvironment.",
    "Statin therapy reduces cardiovascular events in patients with normal cholesterol.",
    "The BRCA1 protein participates in homologous recombination repair of DNA breaks.",
    "Gut microbiota composition differs between lean and obese twins.",
    "Aspirin use lowers the incidence of colorectal cancer over twenty years.",
    "CRISPR interference silences gene expression without cutting the genome.",
    "Sleep deprivation impairs the consolidation of declarative memory.",
    "Insulin resistance precedes the onset of type 2 diabetes by a decade.",
    "Telomere shortening limits the replicative lifespan of human fibroblasts.",
]


def _texts() -> list[str]:
    """50 texts of varied length: single claims, abstracts of a few, and ones past 256 tokens."""
    out: list[str] = []
    for i in range(50):
        n = 1 + (i * 7) % 20  # 1 to 20 claims: from ~15 tokens to past the 256-token limit
        out.append(" ".join(_CLAIMS[(i + j) % len(_CLAIMS)] for j in range(n)))
    out[3] = "p53"
    out[4] = "What causes DNA damage in cells?"
    return out


def _precision_of(compiled: Any) -> str:
    """A compiled model's precision as repd names it (OpenVINO says ``<Type: 'bfloat16'>``)."""
    hint = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    return "bf16" if "bfloat16" in hint or "bf16" in hint else "f32" if "32" in hint else hint


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


# -- choosing the backend (no model, runs everywhere) -----------------------------------

def test_auto_picks_openvino_on_cpu_only_when_installed() -> None:
    assert choose_backend("auto", "cpu", lambda: True) == "openvino"
    assert choose_backend("auto", "cpu", lambda: False) == "torch"
    assert choose_backend("auto", "cuda", lambda: True) == "torch"
    assert choose_backend("auto", "mps", lambda: True) == "torch"
    assert choose_backend("torch", "cpu", lambda: True) == "torch"
    assert choose_backend("openvino", "cpu", lambda: True) == "openvino"


def test_openvino_where_it_cannot_run_is_a_clear_error() -> None:
    with pytest.raises(EmbedderError, match=r"CPU only.*cuda:1"):
        choose_backend("openvino", "cuda:1", lambda: True)
    with pytest.raises(EmbedderError, match=r"not installed.*repd\[openvino\]"):
        choose_backend("openvino", "cpu", lambda: False)
    with pytest.raises(EmbedderError, match="not valid"):
        choose_backend("onnx", "cpu", lambda: True)


def test_backend_setting_is_validated() -> None:
    assert Settings().backend == "auto"
    assert Settings(backend="openvino").backend == "openvino"
    with pytest.raises(ValueError, match="backend"):
        Settings(backend="onnx")


def test_openvino_unavailable_when_its_import_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optimum.intel", None)  # import raises ImportError
    assert openvino_available() is False


def test_auto_loads_torch_when_openvino_does_not_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optimum.intel", None)
    emb = Embedder.load(MODEL, device="cpu", backend="auto")
    assert emb.backend == "torch"
    with pytest.raises(EmbedderError, match="not installed"):
        Embedder.load(MODEL, device="cpu", backend="openvino")


def test_precision_is_bf16_only_where_the_cpu_computes_it() -> None:
    native, emulated = (lambda: {"FP32", "BF16", "INT8"}), (lambda: {"FP32", "INT8"})
    assert choose_precision("auto", native) == "bf16"
    assert choose_precision("auto", emulated) == "f32"
    assert choose_precision(" F32 ", native) == "f32"
    assert choose_precision("bf16", native) == "bf16"
    with pytest.raises(EmbedderError, match="no native bf16"):
        choose_precision("bf16", emulated)
    with pytest.raises(EmbedderError, match="not valid; use auto, f32 or bf16"):
        choose_precision("fp8", native)
    with pytest.raises(ValueError, match="openvino_precision"):
        Settings(openvino_precision="fp8")  # type: ignore[arg-type]


# -- the real model through OpenVINO ------------------------------------------------------

@pytest.fixture(scope="module")
def pair() -> tuple[Embedder, Embedder]:
    """The same model through torch and through OpenVINO (the run's shared export folder).

    The OpenVINO one is the direct runtime (no torch), as every start after the first
    runs it: a first load (full path) records the spec if the folder had none yet.
    """
    torch_emb = Embedder.load(MODEL, device="cpu", backend="torch")
    Embedder.load(MODEL, device="cpu", backend="openvino")
    ov_emb = Embedder.load(MODEL, device="cpu", backend="openvino")
    return torch_emb, ov_emb


@needs_openvino
def test_same_vectors_and_same_identity_as_torch(pair: tuple[Embedder, Embedder]) -> None:
    torch_emb, ov_emb = pair
    assert (torch_emb.backend, ov_emb.backend) == ("torch", "openvino")
    # Same vectors means same representation: an index built with torch is served as is.
    assert ov_emb.model_id == torch_emb.model_id
    assert ov_emb.chunking_key == torch_emb.chunking_key
    assert (ov_emb.dim, ov_emb.max_tokens) == (torch_emb.dim, torch_emb.max_tokens)
    texts = _texts()
    assert max(torch_emb.count_tokens(texts)) > torch_emb.max_tokens  # truncation is covered
    a, b = torch_emb.embed(texts), ov_emb.embed(texts)
    assert a.shape == b.shape == (50, 384)
    assert float(_cos(a, b).min()) >= 0.9999
    query = ["does vitamin D protect against multiple sclerosis?"]
    assert float(_cos(torch_emb.embed(query), ov_emb.embed(query))[0]) >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)


@needs_openvino
def test_auto_precision_is_the_cpus_and_keeps_torchs_vectors(
        pair: tuple[Embedder, Embedder]) -> None:
    """auto computes in bf16 where the CPU has it (about 1.7x f32 here), still torch's vectors."""
    torch_emb, ov_emb = pair
    expected = "bf16" if "BF16" in openvino_cpu_capabilities() else "f32"
    assert ov_emb.precision == expected and torch_emb.precision == "f32"
    runner: Any = ov_emb._backend
    assert _precision_of(runner._bulk) == expected
    # The query copy (one thread, for queries during a batch) computes in the same
    # precision as the bulk copy.
    with runner.copies._bulk_busy:  # what a running batch holds
        ov_emb.embed(["p53"])
    assert _precision_of(runner._small) == expected
    # A text's vector hardly depends on the batch it is in: alone against in a batch.
    texts = _texts()[:20]
    batch = ov_emb.embed(texts)
    alone = np.concatenate([ov_emb.embed([t]) for t in texts])
    assert float(_cos(batch, alone).min()) >= 0.9999
    f32 = Embedder.load(MODEL, device="cpu", backend="openvino", openvino_precision="f32")
    assert f32.precision == "f32" and f32.model_id == ov_emb.model_id
    assert float(_cos(f32.embed(texts), torch_emb.embed(texts)).min()) >= 0.99999


@needs_openvino
def test_a_precision_that_moves_the_vectors_is_not_kept(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """bf16 asked for where no cosine can pass: auto falls back to f32 loudly, bf16 refuses."""
    # Whatever this CPU has, ask for bf16 and make the bar impossible to clear.
    monkeypatch.setattr(embedder, "choose_precision", lambda requested: "bf16")
    monkeypatch.setattr(openvino_backend, "SAME_VECTORS_MIN_COSINE", 1.01)
    fallen = Embedder.load(MODEL, device="cpu", backend="openvino", openvino_precision="auto")
    assert fallen.precision == "f32"
    runner: Any = fallen._backend
    assert _precision_of(runner._bulk) == "f32"
    assert "openvino_precision_unfaithful" in capsys.readouterr().out
    with pytest.raises(EmbedderError, match="gives other vectors than f32"):
        Embedder.load(MODEL, device="cpu", backend="openvino", openvino_precision="bf16")


@needs_openvino
def test_a_precision_openvino_cannot_compile_is_not_kept(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A real compile error in the asked precision: auto keeps f32 loudly, bf16 refuses."""
    real = openvino_backend.bulk_config

    def refused(threads: int | None = None, precision: str = "f32") -> dict[str, str]:
        config = real(threads, precision)
        if precision == "bf16":  # a value the CPU plugin rejects at compile time
            config["INFERENCE_PRECISION_HINT"] = "no-such-precision"
        return config

    monkeypatch.setattr(embedder, "choose_precision", lambda requested: "bf16")
    monkeypatch.setattr(openvino_backend, "bulk_config", refused)
    fallen = Embedder.load(MODEL, device="cpu", backend="openvino", openvino_precision="auto")
    assert (fallen.backend, fallen.precision) == ("openvino", "f32")
    assert float(_cos(fallen.embed(["p53"]), fallen.embed(["p53", "telomeres"])[:1])[0]) > 0.99999
    out = capsys.readouterr().out
    assert "openvino_precision_unfaithful" in out and "cannot run this model" in out
    with pytest.raises(EmbedderError, match="OpenVINO in bf16 cannot run this model"):
        Embedder.load(MODEL, device="cpu", backend="openvino", openvino_precision="bf16")


@needs_openvino
def test_fast_path_equals_encode_and_threads_fit_the_cores(
        pair: tuple[Embedder, Embedder]) -> None:
    # The full path (sentence-transformers around the export), as a first load runs it;
    # pair's OpenVINO embedder is the direct runtime once the export has its spec.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(openvino_runtime, "load_direct", lambda *args, **kwargs: None)
        full = Embedder.load(MODEL, device="cpu", backend="openvino")
    runner: Any = full._backend
    assert type(runner).__name__ == "OpenVinoBackend"
    assert runner.fast  # the pre-tokenized path passed its check against encode()
    texts = _texts()[:12]
    via_encode = runner._encode(texts)
    np.testing.assert_allclose(full.embed(texts), via_encode, atol=1e-4)
    for emb in (full, pair[1]):
        bulk: Any = emb._backend._bulk  # type: ignore[attr-defined]
        assert int(bulk.get_property("INFERENCE_NUM_THREADS")) == cpu_threads()
    assert type(pair[1]._backend).__name__ == "DirectBackend"
    assert float(_cos(pair[1].embed(texts), full.embed(texts)).min()) >= 0.9999


@needs_openvino
def test_queries_and_a_bulk_batch_from_two_threads(pair: tuple[Embedder, Embedder]) -> None:
    """Each thread has its own infer request: concurrent calls give the same vectors."""
    torch_emb, ov_emb = pair
    bulk, query = _texts(), ["telomere length and ageing"]
    want_bulk, want_query = torch_emb.embed(bulk), torch_emb.embed(query)
    errors: list[str] = []

    def embed_bulk() -> None:
        for _ in range(3):
            if float(_cos(ov_emb.embed(bulk), want_bulk).min()) < 0.9999:
                errors.append("bulk")

    worker = threading.Thread(target=embed_bulk)
    worker.start()
    for _ in range(20):
        if float(_cos(ov_emb.embed(query), want_query)[0]) < 0.9999:
            errors.append("query")
    worker.join()
    assert errors == []


@needs_openvino
def test_a_query_runs_on_every_core_unless_a_batch_holds_them(
        pair: tuple[Embedder, Embedder], monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle, a short query runs on the copy of its width (all cores), a long one on the
    bulk copy; during a batch, on the one-thread copy, with the same vector; a batch
    waits for the bulk copy rather than share it."""
    _, ov_emb = pair
    copies: Any = ov_emb._backend.copies  # type: ignore[attr-defined]
    used: list[object] = []
    real_request, real_width = copies.request, copies._width_request

    def spy(small: bool) -> Any:
        used.append("small" if small else "bulk")
        return real_request(small)

    def spy_width(width: int, *args: Any) -> Any:
        used.append(width)
        return real_width(width, *args)

    monkeypatch.setattr(copies, "request", spy)
    monkeypatch.setattr(copies, "_width_request", spy_width)
    monkeypatch.setattr(copies, "query_widths", openvino_backend.QUERY_WIDTHS)
    query = ["telomere length and ageing"]
    long_query = [" ".join(["telomere length and ageing in mice"] * 8)]  # > 48 tokens
    idle = ov_emb.embed(query)
    assert used[0] == 16 and "small" not in used
    used.clear()
    ov_emb.embed(long_query)
    assert used == ["bulk"]
    used.clear()
    done = threading.Event()
    with copies._bulk_busy:  # a batch is running
        during = ov_emb.embed(query)
        batch = threading.Thread(target=lambda: (ov_emb.embed(_texts()[:8]), done.set()))
        batch.start()
        # Whatever the load, the batch cannot finish while the copy is held.
        assert not done.wait(0.5)
    batch.join(timeout=120)
    assert done.is_set()
    assert used[0] == "small" and set(used[1:]) == {"bulk"}
    assert int(copies.small.get_property("INFERENCE_NUM_THREADS")) == 1
    assert float(_cos(idle, during)[0]) >= 0.9999


@needs_openvino
def test_a_short_query_runs_on_a_copy_of_its_width_with_the_same_vector(
        pair: tuple[Embedder, Embedder], monkeypatch: pytest.MonkeyPatch) -> None:
    """Once asked for (the daemon does), queries of up to 16, 17-24, 25-32 and 33-48
    tokens run on copies compiled for that input shape, with every core, and get the
    vectors the dynamic bulk copy gives them; without, none is compiled (a one-shot
    command). A longer one runs on the bulk copy. Asking also readies the one-thread copy."""
    _, ov_emb = pair
    copies: Any = ov_emb._backend.copies  # type: ignore[attr-defined]
    widths = openvino_backend.QUERY_WIDTHS
    assert widths == (16, 24, 32, 48)
    words = " ".join(_CLAIMS).split()
    texts = [" ".join(words[:n]) for n in (2, 14, 20, 30, 60)]
    lengths = [n + 2 for n in ov_emb.count_tokens(texts)]  # with [CLS] and [SEP]
    assert lengths[0] <= 16 < lengths[1] <= 24 < lengths[2] <= 32 < lengths[3] <= 48
    assert lengths[4] > 48
    fresh = Embedder.load(MODEL, device="cpu", backend="openvino")
    fresh_copies: Any = fresh._backend.copies  # type: ignore[attr-defined]
    dynamic = np.concatenate([fresh.embed([t]) for t in texts])
    assert fresh_copies.query_widths == () and fresh_copies._widths == {}
    assert fresh_copies.small is None  # a one-shot command compiles no one-thread copy
    monkeypatch.setattr(copies, "query_widths", ())
    monkeypatch.setattr(copies, "_widths", {})  # as if none was compiled yet
    monkeypatch.setattr(copies, "small", None)
    monkeypatch.setattr(copies, "_local", threading.local())  # nor requested
    ov_emb.use_query_widths()  # no passage: compiled on first use
    assert copies.query_widths == widths and copies._widths == {}
    # The one-thread copy, for queries that come while a batch runs, is ready now.
    assert int(copies.small.get_property("INFERENCE_NUM_THREADS")) == 1
    by_width = np.concatenate([ov_emb.embed([t]) for t in texts])
    assert sorted(copies._widths) == list(widths)
    for width in widths:
        compiled = copies._widths[width]
        assert {tuple(port.get_shape()) for port in compiled.inputs} == {(1, width)}
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == cpu_threads()
    assert float(_cos(by_width, dynamic).min()) >= openvino_backend.SAME_VECTORS_MIN_COSINE


@needs_openvino
def test_a_width_copy_whose_outputs_move_with_the_padding_is_refused(
        pair: tuple[Embedder, Embedder], capsys: pytest.CaptureFixture[str]) -> None:
    """Padded on the left, BERT's tokens move to other positions and their embeddings
    change: the copy is refused on its first use, loudly, and the bulk copy answers."""
    import openvino as ov

    _, ov_emb = pair
    shared: Any = ov_emb._backend.copies  # type: ignore[attr-defined]
    copies = openvino_backend.CompiledCopies(
        shared.network, ov.Core().compile_model(
            shared.network, "CPU", openvino_backend.bulk_config(precision=shared.precision)),
        precision=shared.precision)
    copies.query_widths = openvino_backend.QUERY_WIDTHS
    prepared: Any = ov_emb._backend.prepare(["telomere length and ageing"])  # type: ignore[attr-defined]
    features = embedder.pad_features(prepared, [0], ov_emb._backend._padding)  # type: ignore[attr-defined]
    exact = shared._run(shared.request(small=False), shared.inputs_for(features), copy=True)
    left = copies.infer(features, left_padded=True)
    assert copies._widths == {16: None}
    assert "openvino_width_copy_refused" in capsys.readouterr().out
    assert float(openvino_export.worst_cosine(left[0], exact[0])) >= 0.9999
    assert copies.infer(features, left_padded=True).shape == exact.shape  # no retry


@needs_openvino
def test_export_is_made_once_reused_and_redone_when_damaged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pair: tuple[Embedder, Embedder],
        capsys: pytest.CaptureFixture[str]) -> None:
    torch_emb, _ = pair
    exports = tmp_path / "exports"
    monkeypatch.setenv(openvino_export.CACHE_ENV, str(exports))
    texts = _texts()[:10]

    def exports_made() -> int:  # each made by a child process (Embedder.load's default)
        return capsys.readouterr().out.count("openvino_exported_apart")

    capsys.readouterr()
    first = Embedder.load(MODEL, device="cpu", backend="openvino")
    assert exports_made() == 1
    [folder] = exports.iterdir()  # no temp folder left beside it
    assert (folder / MARKER).is_file()
    marker_mtime = (folder / MARKER).stat().st_mtime_ns

    second = Embedder.load(MODEL, device="cpu", backend="openvino")
    assert exports_made() == 0  # loaded from the saved export, not exported again
    assert (folder / MARKER).stat().st_mtime_ns == marker_mtime
    assert second.model_id == first.model_id == torch_emb.model_id

    # Same size, other bytes: only the probe vectors recorded at export can tell.
    weights = folder / "openvino" / "openvino_model.bin"
    data = bytearray(weights.read_bytes())
    half = len(data) // 2
    data[half:] = b"\x7f" * (len(data) - half)  # every weight there becomes ~3e38
    weights.write_bytes(bytes(data))
    third = Embedder.load(MODEL, device="cpu", backend="openvino")
    assert exports_made() == 1  # set aside and exported again
    assert (folder / MARKER).stat().st_mtime_ns != marker_mtime
    assert float(_cos(third.embed(texts), torch_emb.embed(texts)).min()) >= 0.9999

    (folder / MARKER).unlink()  # an export interrupted before its marker
    Embedder.load(MODEL, device="cpu", backend="openvino")
    assert exports_made() == 1
    assert sorted(p.name for p in exports.iterdir()) == [folder.name]


@needs_openvino
def test_the_daemons_engine_turns_the_width_copies_on_a_one_shot_one_does_not(
        tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", backend="openvino")
    for long_lived in (False, True):
        engine = Engine(settings, writer=False)
        engine.query_widths = long_lived  # as repd.app.Daemon.start sets it
        try:
            emb: Any = engine.load_model(MODEL)
            expected = openvino_backend.QUERY_WIDTHS if long_lived else ()
            assert emb._backend.copies.query_widths == expected
            # The daemon's are compiled as the model loads (a migration's too), not by
            # the first queries after a switch.
            assert sorted(emb._backend.copies._widths) == list(expected)
        finally:
            engine.close()
