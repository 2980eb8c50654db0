"""int8 activations as a model of their own (repd.adapters.openvino_int8): real NNCF, real IR.

The base is a real model (the packaged MiniLM cut to three layers, so that quantizing
takes seconds); the variant is made by repd's own code from chunk texts, loaded again in a
fresh process without torch, and moved to through a real daemon's model upgrade.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from repd.adapters import embedder as embedder_module
from repd.adapters.embedder import Embedder, EmbedderError
from repd.adapters.openvino_export import CACHE_ENV, MARKER, openvino_available
from repd.adapters.openvino_int8 import (
    BASE_MIN_COSINE,
    SUFFIX,
    NothingToCalibrateError,
    split_variant,
    variant_folder,
)
from repd.api.client import ApiClient
from repd.doctor import check_model
from repd.engine import Engine
from tests.conftest_models import build_truncated_minilm
from tests.daemon_harness import DaemonProc, wait_for
from tests.helpers import cli_env, make_settings, run_cli

needs_openvino = pytest.mark.skipif(
    not openvino_available(),
    reason="optimum-intel[openvino] is not installed (pip install -e '.[openvino]')")

_TOPICS = ["volcano eruption lava magma", "stock market shares trading",
           "protein folding enzyme kinetics", "football goal referee match",
           "violin concerto orchestra tempo", "glacier ice sheet climate",
           "compiler parser bytecode optimizer", "bread yeast oven dough"]
# Calibration texts as an index holds them: sentences and paragraphs of various lengths.
_CHUNKS = [f"Note {i} on {t}. " + " ".join(f"{w} number {i * j}" for j, w in
                                          enumerate(t.split() * (1 + i % 5)))
           for i, t in enumerate(_TOPICS * 5)]
_TEXTS = ["p53", "What erupts from a volcano?", "Shares fell on the stock market today.",
          "A parser turns source text into a syntax tree. " * 20]

_CHILD = """
import json, sys
from repd.adapters.embedder import Embedder
emb = Embedder.load(sys.argv[1], device="cpu")
print(json.dumps({"model_id": emb.model_id, "precision": emb.precision,
                  "vectors": emb.embed(json.loads(sys.argv[2])).tolist(),
                  "imported": sorted(m for m in ("torch", "transformers", "sentence_transformers",
                                                 "optimum.intel", "nncf") if m in sys.modules)}))
"""


def _cos(a: Any, b: Any) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return np.asarray((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def _notes(folder: Path, copies: int, name: str, body: Callable[[int, str], str]) -> Path:
    """A folder of one note per topic (``copies`` rounds), named ``name.format(i=...)``."""
    folder.mkdir()
    for i, topic in enumerate(_TOPICS * copies):
        (folder / name.format(i=i)).write_text(body(i, topic), encoding="utf-8")
    return folder


def test_a_variant_is_named_by_a_suffix() -> None:
    assert split_variant("all-MiniLM-L6-v2+int8") == ("all-MiniLM-L6-v2", True)
    assert split_variant("/models/e5 small+int8") == ("/models/e5 small", True)
    assert split_variant("all-MiniLM-L6-v2") == ("all-MiniLM-L6-v2", False)
    assert split_variant(SUFFIX) == (SUFFIX, False)  # nothing to quantize: a plain name


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_truncated_minilm(tmp_path_factory.mktemp("models") / "minilm-3l", layers=3)


@pytest.fixture
def exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "exports"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


class Calibration:
    """Chunk texts on demand, counting the calls (a variant already made needs none)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.calls = 0

    def __call__(self) -> list[str]:
        self.calls += 1
        return self.texts


@needs_openvino
def test_the_variant_is_made_once_from_chunks_and_is_its_own_model(
        base: Path, exports: Path) -> None:
    plain = Embedder.load(str(base), device="cpu")
    calibration = Calibration(_CHUNKS)
    int8 = Embedder.load(f"{base}{SUFFIX}", device="cpu", calibration=calibration)
    assert calibration.calls == 1
    # Its own identity, the base's plus the calibration's digest: another model.
    assert int8.model_id.startswith(f"{plain.model_id}{SUFFIX}:")
    assert len(int8.model_id.rpartition(":")[2]) == 12
    assert int8.model_name == f"{base}{SUFFIX}"
    assert int8.backend == "openvino" and int8.precision.startswith("int8+")
    # Same tokenizer and limit: the chunks stay the same, so an upgrade reuses them.
    assert int8.chunking_key == plain.chunking_key
    assert int8.count_tokens(_TEXTS) == plain.count_tokens(_TEXTS)
    # Near the base model's vectors (texts unlike the calibration's, such as two-word
    # queries, move most: ~0.98 here), but moved: quantized for real.
    cosines = _cos(int8.embed(_TEXTS), plain.embed(_TEXTS))
    assert 0.95 <= float(cosines.min()) < 0.9999
    marker = json.loads((variant_folder(plain.model_id) / MARKER).read_text())
    assert marker["model_id"] == int8.model_id
    assert marker["quantization"]["texts"] == len(_CHUNKS)
    assert marker["quantization"]["base_cosine_min"] >= BASE_MIN_COSINE

    # Loaded again: from the folder, no calibration, the same identity and vectors.
    again = Embedder.load(f"{base}{SUFFIX}", device="cpu", calibration=calibration)
    assert calibration.calls == 1
    assert again.model_id == int8.model_id
    assert float(_cos(again.embed(_TEXTS), int8.embed(_TEXTS)).min()) >= 0.9999

    # In a fresh process it runs without torch, transformers or NNCF.
    env = {**os.environ, CACHE_ENV: str(exports), "REPD_LOG_LEVEL": "warning"}
    done = subprocess.run([sys.executable, "-c", _CHILD, f"{base}{SUFFIX}", json.dumps(_TEXTS)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["imported"] == []
    assert child["model_id"] == int8.model_id and child["precision"] == int8.precision
    assert float(_cos(child["vectors"], int8.embed(_TEXTS)).min()) >= 0.998


@needs_openvino
def test_other_chunks_make_another_identity_the_same_chunks_the_same(
        base: Path, exports: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = Embedder.load(f"{base}{SUFFIX}", device="cpu", calibration=Calibration(_CHUNKS))
    # The same chunks in another cache: quantized again, the same model (NNCF is
    # deterministic), so an export lost from the cache costs no migration.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "exports-again"))
    same = Embedder.load(f"{base}{SUFFIX}", device="cpu", calibration=Calibration(_CHUNKS))
    assert same.model_id == first.model_id
    assert float(_cos(same.embed(_TEXTS), first.embed(_TEXTS)).min()) >= 0.9999
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "exports-other"))
    other = Embedder.load(f"{base}{SUFFIX}", device="cpu",
                          calibration=Calibration(_CHUNKS[::-1][:20]))
    assert other.model_id != first.model_id
    assert other.model_id.partition(SUFFIX)[0] == first.model_id.partition(SUFFIX)[0]


@needs_openvino
def test_without_chunks_or_off_the_cpu_it_says_what_to_do(
        base: Path, exports: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NothingToCalibrateError, match="nothing to calibrate it on"):
        Embedder.load(f"{base}{SUFFIX}", device="cpu", calibration=Calibration([]))
    with pytest.raises(NothingToCalibrateError, match="repd roots add DIR"):
        Embedder.load(f"{base}{SUFFIX}", device="cpu")
    with pytest.raises(EmbedderError, match="OpenVINO on the CPU only"):
        Embedder.load(f"{base}{SUFFIX}", device="cpu", backend="torch",
                      calibration=Calibration(_CHUNKS))
    with pytest.raises(EmbedderError, match="no such directory"):
        Embedder.load(f"{base}-missing{SUFFIX}", device="cpu", calibration=Calibration(_CHUNKS))
    # Beside a GPU: a CUDA device named outright is refused, ``auto`` takes the CPU (and
    # gets as far as the calibration, which has nothing here).
    monkeypatch.setattr(embedder_module, "choose_device",
                        lambda name: "cpu" if name == "cpu" else "cuda")
    with pytest.raises(EmbedderError, match="OpenVINO on the CPU only"):
        Embedder.load(f"{base}{SUFFIX}", device="cuda", calibration=Calibration(_CHUNKS))
    with pytest.raises(NothingToCalibrateError):
        Embedder.load(f"{base}{SUFFIX}", device="auto", calibration=Calibration([]))
    assert not any(p.name.endswith("_int8") for p in exports.glob("*"))


@needs_openvino
def test_a_damaged_variant_is_made_again(
        base: Path, exports: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calibration = Calibration(_CHUNKS)
    first = Embedder.load(f"{base}{SUFFIX}", device="cpu", calibration=calibration)
    want = first.embed(_TEXTS)
    folder = variant_folder(first.model_id.partition(SUFFIX)[0])
    weights = folder / "openvino" / "openvino_model.bin"
    size = weights.stat().st_size
    weights.write_bytes(np.random.default_rng(0).bytes(size))  # same size: only the probe knows
    capsys.readouterr()
    again = Embedder.load(f"{base}{SUFFIX}", device="cpu", calibration=calibration)
    assert calibration.calls == 2
    assert "openvino_export_damaged" in capsys.readouterr().out
    assert again.model_id == first.model_id
    assert float(_cos(again.embed(_TEXTS), want).min()) >= 0.9999
    assert [p.name for p in exports.iterdir() if p.name.startswith(".")] == []  # no leftovers


# A daemon's load of a variant (export_apart), in a fresh process that reports what it
# imported: the making of the variant, with NNCF and torch, happens in its child.
_CHILD_APART = """
import json, sys
from repd.adapters.embedder import Embedder
texts = json.loads(sys.argv[2])
emb = Embedder.load(sys.argv[1], device="cpu", calibration=lambda: texts, export_apart=True)
print(json.dumps({"model_id": emb.model_id, "vectors": emb.embed(json.loads(sys.argv[3])).tolist(),
                  "imported": sorted(m for m in ("torch", "transformers", "sentence_transformers",
                                                 "optimum.intel", "nncf") if m in sys.modules)}))
"""


@needs_openvino
def test_a_daemon_has_the_variant_made_by_a_child_and_never_imports_torch(
        base: Path, exports: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NNCF imports torch: a daemon that made a variant in its own process kept ~510 MiB
    for its life against ~230 MiB. With ``export_apart`` (the daemon's loads) a child
    makes the base's export and the variant from the same chunk texts, the same model."""
    env = {**os.environ, CACHE_ENV: str(exports), "REPD_LOG_LEVEL": "warning"}
    done = subprocess.run([sys.executable, "-c", _CHILD_APART, f"{base}{SUFFIX}",
                           json.dumps(_CHUNKS), json.dumps(_TEXTS)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["imported"] == []
    assert [p.name for p in exports.iterdir() if p.name.startswith(".")] == []
    # The same model as one made in-process from the same texts (NNCF is deterministic).
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "exports-here"))
    here = Embedder.load(f"{base}{SUFFIX}", device="cpu", calibration=Calibration(_CHUNKS))
    assert child["model_id"] == here.model_id
    assert float(_cos(child["vectors"], here.embed(_TEXTS)).min()) >= 0.9999


@needs_openvino
def test_a_child_that_fails_is_final_and_one_never_started_leaves_the_variant_here(
        base: Path, exports: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from repd.adapters import openvino_apart

    real = openvino_apart.export_apart
    given: list[list[str]] = []
    answer = ["exit status 1: boom"]

    def failing(model: str, cache_dir: Path | None, precision: str,
                calibration: list[str] | None = None) -> str | None:
        if calibration is None:  # the base's export: a real child
            return real(model, cache_dir, precision)
        given.append(list(calibration))
        return answer[0]

    monkeypatch.setattr(openvino_apart, "export_apart", failing)
    # A child that ran and failed: its words, and nothing made here.
    with pytest.raises(EmbedderError, match=r"in a child process.*boom"):
        Embedder.load(f"{base}{SUFFIX}", device="cpu", calibration=Calibration(_CHUNKS))
    assert not any(p.name.endswith("_int8") for p in exports.glob("*"))

    # No child could be started: this process makes it, from the same texts.
    answer[0] = f"cannot start {sys.executable}-gone: [Errno 2] No such file"
    given.clear()
    calibration = Calibration(_CHUNKS)
    capsys.readouterr()
    emb = Embedder.load(f"{base}{SUFFIX}", device="cpu", calibration=calibration)
    assert given == [_CHUNKS]  # the texts went to the child
    assert calibration.calls == 1  # and were not asked of the index a second time
    out = capsys.readouterr().out
    assert "openvino_export_apart_failed" in out and "No such file" in out
    assert emb.model_id.startswith(f"{emb.model_id.partition(SUFFIX)[0]}{SUFFIX}:")
    assert emb.precision.startswith("int8+")
    # Made now: the next load neither asks for texts nor starts a child.
    again = Embedder.load(f"{base}{SUFFIX}", device="cpu", calibration=calibration)
    assert again.model_id == emb.model_id and calibration.calls == 1 and len(given) == 1


def _watch_loading(d: DaemonProc, seen: list[str], stop: threading.Event) -> None:
    """Collect the migration messages of the ``loading`` state until ``stop``."""
    client = ApiClient(d.socket, timeout=30)
    while not stop.is_set():
        mig = client.model_status().get("migration")
        if mig is not None and mig["state"] == "loading":
            seen.append(str(mig["message"]))
        time.sleep(0.1)


@needs_openvino
def test_a_daemon_upgrades_to_int8_calibrated_on_its_own_index(tmp_path: Path) -> None:
    """`repd model use NAME+int8`: calibrated on the index's chunks, re-embedded (chunks
    reused) while the old index answers, switched by the gate, searched the same."""
    root = _notes(tmp_path / "notes", 3, "note{i:02d}.txt", lambda i, topic: (
        f"Note {i} about {topic}. The marker is zq{i}x. " + " ".join(topic.split() * 4)))
    d = DaemonProc(tmp_path / "home", [root]).start()
    try:
        client = d.client
        before = client.status()
        base_id = before["model"]["id"]
        made_here = not variant_folder(base_id).exists()
        seen: list[str] = []
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_loading, args=(d, seen, stop), daemon=True)
        watcher.start()
        try:  # answered once the model is loaded: loading is over then
            started = client.model_use(f"all-MiniLM-L6-v2{SUFFIX}")
        finally:
            stop.set()
            watcher.join(30)
        assert started["generation"] == "2", started
        # While it loads, the status says that the variant may be made first (the session's
        # export folder may hold it already: then loading is quick and may not be seen).
        assert seen or not made_here
        assert all("int8 variant is made from up to 300 chunks" in m for m in seen), seen

        def switched() -> dict[str, Any] | None:
            st = client.status()
            mig = client.model_status().get("migration")
            assert mig is None or mig["state"] != "failed", mig
            return st if st["generation"]["id"] == "2" and mig is None else None

        after = wait_for(switched, 300, "the switch to the int8 generation", every=0.3)
        assert after["model"]["id"].startswith(f"{base_id}{SUFFIX}:")
        assert after["model"]["precision"].startswith("int8+")
        assert after["generation"]["points"] == before["generation"]["points"]
        hits = client.query("glacier ice sheet climate zq5x", k=3)
        assert hits["generation"] == "2"
        assert hits["hits"][0]["path"] == "note05.txt"
        # Calibrated on this index: its 24 distinct chunks (the folder is kept between
        # runs of the suite, the corpus is the same each time).
        marker = json.loads((variant_folder(base_id) / MARKER).read_text())
        assert marker["model_id"] == after["model"]["id"]
        assert marker["quantization"]["texts"] == 24
        listing = {g["id"]: g for g in client.model_status()["generations"]}
        assert listing["2"]["model_id"] == after["model"]["id"]
        assert listing["1"]["state"] == "retired"
    finally:
        d.stop()
    # A restart loads the variant from the cache: the same identity, no migration.
    d2 = DaemonProc(tmp_path / "home", [root]).start()
    try:
        st = d2.client.status()
        assert st["model"]["id"] == after["model"]["id"]
        assert d2.client.model_status().get("migration") is None
    finally:
        d2.stop()


@needs_openvino
def test_named_before_any_index_it_is_calibrated_on_the_files(
        base: Path, exports: Path, tmp_path: Path) -> None:
    """A fresh data folder whose configuration names the variant: `repd index DIR` makes it
    from chunks of DIR's files, indexes with it, and queries answer through it."""
    root = _notes(tmp_path / "notes", 2, "note{i:02d}.md", lambda i, topic: (
        f"# {topic}\n\nNote {i} about {topic}, marker zq{i}x. " + " ".join(topic.split() * 6)))
    # The doctor checks the base while no variant is made, and says how it will be made.
    doctor = check_model(make_settings(tmp_path / "unused", model=f"{base}{SUFFIX}"))
    assert doctor.level == "ok", doctor.message
    assert "int8 variant is made from up to 300 chunks" in doctor.message
    assert not any(p.name.endswith("_int8") for p in exports.glob("*"))

    env = cli_env(tmp_path / "home", REPD_MODEL=f"{base}{SUFFIX}")
    first = run_cli(["index", str(root), "--json"], env)
    out = json.loads(first.stdout)
    assert out["indexed"] == 16 and out["failed"] == 0, out
    # It says why it waits, only when it makes the variant.
    assert f"making {base}{SUFFIX} first, from up to 300 chunks" in first.stderr
    assert "making" not in run_cli(["index", str(root)], env).stderr
    made = list(exports.glob("*_int8"))
    assert len(made) == 1
    marker = json.loads((made[0] / MARKER).read_text())
    # One chunk of each of the 16 notes (300 asked for, so up to 19 of each; each note
    # is one chunk).
    assert marker["quantization"]["texts"] == 16
    hits = json.loads(run_cli(["query", "glacier ice sheet climate zq5x", "--json", "-k", "3"],
                              env).stdout)
    assert hits["hits"][0]["path"] == "note05.md", hits
    engine = Engine(make_settings(tmp_path / "home" / "data" / "repd"), writer=False)
    try:
        assert engine.generation is not None
        assert engine.generation.model_id == marker["model_id"]
    finally:
        engine.close()
    # With the variant made, the doctor loads it.
    doctor = check_model(make_settings(tmp_path / "unused", model=f"{base}{SUFFIX}"))
    assert doctor.level == "ok" and "int8+" in doctor.message, doctor.message


@needs_openvino
def test_a_fresh_daemon_configured_with_the_variant_makes_it_from_its_roots(
        base: Path, exports: Path, tmp_path: Path) -> None:
    root = _notes(tmp_path / "notes", 1, "note{i}.txt",
                  lambda i, topic: f"Note {i} about {topic}. " * 3)
    d = DaemonProc(tmp_path / "home", [root], extra_env={"REPD_MODEL": f"{base}{SUFFIX}"})
    d.start(wait_idle=False)
    try:
        # While the variant is made, the start says why it takes long.
        phases: set[str] = set()

        def made() -> bool:
            try:
                st = d.status()
            except Exception:  # the socket is not up yet
                return False
            if st["state"] == "starting" and st.get("problem"):
                phases.add(st["problem"])
            return st["state"] != "starting"

        wait_for(made, 180, "the daemon to load the variant", every=0.1)
        assert any("int8 variant is made from up to 300 chunks" in p for p in phases), phases
        st = d.wait_idle()
        assert st["model"]["precision"].startswith("int8+"), st["model"]
        marker = json.loads((next(exports.glob("*_int8")) / MARKER).read_text())
        assert st["model"]["id"] == marker["model_id"]
        assert marker["quantization"]["texts"] == len(_TOPICS)
        assert st["generation"]["points"] == len(_TOPICS)
        assert d.client.query("glacier ice sheet climate", k=1)["hits"][0]["path"] == "note5.txt"
    finally:
        d.stop()
