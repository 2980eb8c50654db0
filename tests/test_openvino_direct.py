"""The OpenVINO export run with no torch (repd.adapters.openvino_runtime): the real model.

The first load of an export goes the full way (sentence-transformers, optimum, torch)
and records a runtime spec; later loads run the IR with ``tokenizers`` and numpy alone.
Checked here: a fresh process loads that way without importing torch, transformers,
sentence-transformers or optimum, and gets torch's identity, chunking key, token counts
and vectors; a spec that is stale, foreign or wrong sends the load the full way again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from repd.adapters import device, openvino_runtime
from repd.adapters.device import cpu_only_torch_build
from repd.adapters.embedder import Embedder, EmbedderError
from repd.adapters.openvino_export import (
    CACHE_ENV,
    MARKER,
    RUNTIME_SPEC,
    export_folder,
    openvino_available,
)
from tests.conftest_models import build_cls_minilm, build_tiny_model

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
needs_openvino = pytest.mark.skipif(
    not openvino_available(),
    reason="optimum-intel[openvino] is not installed (pip install -e '.[openvino]')")

_TEXTS = ["p53", "What causes DNA damage in cells?",
          "Telomere shortening limits the replicative lifespan of human fibroblasts. " * 30,
          "Vitamin D deficiency is associated with an increased risk of multiple sclerosis.",
          "def rotate(keys):\n    return keys[1:] + keys[:1]\n"]

# Loads the model in a fresh interpreter and reports what it imported and computed.
_CHILD = """
import json, sys
from repd.adapters.embedder import Embedder
emb = Embedder.load(sys.argv[1], device="cpu", backend="auto", export_apart=sys.argv[3] == "1")
texts = json.loads(sys.argv[2])
print(json.dumps({
    "runner": type(emb._backend).__name__, "backend": emb.backend, "precision": emb.precision,
    "runtime": emb.runtime,
    "model_id": emb.model_id, "chunking_key": emb.chunking_key, "dim": emb.dim,
    "max_tokens": emb.max_tokens, "counts": emb.count_tokens(texts),
    "vectors": emb.embed(texts).tolist(),
    # (optimum itself is a namespace package, imported to find optimum.intel: no cost.)
    "imported": sorted(m for m in ("torch", "transformers", "sentence_transformers",
                                   "optimum.intel", "nncf") if m in sys.modules)}))
"""


def _load_in_child(model: str | Path, exports: Path, *, apart: bool = False) -> dict[str, Any]:
    env = {**os.environ, CACHE_ENV: str(exports), "REPD_LOG_LEVEL": "warning"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(model), json.dumps(_TEXTS),
                           "1" if apart else "0"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _cos(a: Any, b: Any) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return np.asarray((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def _export_dir(exports: Path) -> Path:
    (folder,) = [p for p in exports.iterdir() if (p / MARKER).is_file()]
    return folder


#: The run's export folder (tests/conftest.py made MiniLM's there before any test).
_RUN_EXPORTS = Path(os.environ[CACHE_ENV])


def _seeded(exports: Path, model_id: str) -> Path:
    """``exports`` holding a copy of the run's export of ``model_id`` (MiniLM's) without
    its runtime spec, as an export made before specs existed: a load must take the full
    path, in its own process, with no conversion (a conversion in the test process could
    crash it, see repd.adapters.openvino_apart)."""
    import shutil

    made = export_folder(model_id, _RUN_EXPORTS)
    shutil.copytree(made, exports / made.name, ignore=shutil.ignore_patterns(RUNTIME_SPEC))
    return exports


@pytest.fixture(scope="module")
def torch_minilm() -> Embedder:
    return Embedder.load(MODEL, device="cpu", backend="torch")


@needs_openvino
def test_a_second_start_runs_the_export_without_torch_and_gives_torchs_vectors(
        tmp_path: Path, torch_minilm: Embedder) -> None:
    exports = _seeded(tmp_path / "exports", torch_minilm.model_id)
    first = _load_in_child(MODEL, exports)  # the full way: verifies, records the spec
    assert first["runner"] == "OpenVinoBackend" and "torch" in first["imported"]
    assert first["runtime"] == "full"
    assert (_export_dir(exports) / RUNTIME_SPEC).is_file()
    assert sorted(p.name for p in exports.iterdir()) == [_export_dir(exports).name]  # no temp

    second = _load_in_child(MODEL, exports)
    assert second["runner"] == "DirectBackend" and second["backend"] == "openvino"
    assert second["runtime"] == "direct"
    assert second["imported"] == []  # no torch, transformers, sentence-transformers, optimum
    assert second["precision"] == first["precision"]
    # Same representation as torch: the index of either serves the other, no migration.
    for key in ("model_id", "chunking_key", "dim", "max_tokens"):
        assert second[key] == first[key] == getattr(torch_minilm, key), key
    assert second["counts"] == torch_minilm.count_tokens(_TEXTS)
    assert max(second["counts"]) > torch_minilm.max_tokens  # truncation is covered
    want = torch_minilm.embed(_TEXTS)
    assert float(_cos(second["vectors"], want).min()) >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(second["vectors"], axis=1), 1.0, atol=1e-5)


@needs_openvino
def test_a_daemons_first_start_exports_in_a_child_and_never_imports_torch(
        tmp_path: Path, torch_minilm: Embedder) -> None:
    """``export_apart`` (the daemon's loads): the export, its check and its runtime spec
    are made by a child process; this one runs the result with no torch from the start
    (a first start held ~880 MiB for its whole life, a later one ~410)."""
    exports = tmp_path / "exports"
    first = _load_in_child(MODEL, exports, apart=True)
    assert first["runner"] == "DirectBackend" and first["runtime"] == "direct"
    assert first["imported"] == []  # no torch, transformers, sentence-transformers, optimum
    assert (_export_dir(exports) / RUNTIME_SPEC).is_file()
    assert sorted(p.name for p in exports.iterdir()) == [_export_dir(exports).name]
    assert first["model_id"] == torch_minilm.model_id
    assert first["chunking_key"] == torch_minilm.chunking_key
    assert float(_cos(first["vectors"], torch_minilm.embed(_TEXTS)).min()) >= 0.9999


@needs_openvino
def test_a_real_daemon_that_exports_at_its_first_start_holds_no_torch(tmp_path: Path) -> None:
    from tests.daemon_harness import DaemonProc

    root = tmp_path / "notes"
    root.mkdir()
    (root / "a.md").write_text("# Backups\n\nThe nightly job rotates the keys.\n")
    exports = tmp_path / "exports"  # empty: this start must export
    d = DaemonProc(tmp_path / "home", [root], extra_env={CACHE_ENV: str(exports)})
    d.start(timeout=600)
    try:
        model = d.client.status()["model"]
        assert (model["backend"], model["runtime"]) == ("openvino", "direct")
        assert (_export_dir(exports) / RUNTIME_SPEC).is_file()
        maps = Path(f"/proc/{d.pid}/maps").read_text()
        assert "libtorch" not in maps and "openvino_pytorch_frontend" not in maps
        assert d.client.query("which job rotates the keys", k=1)["hits"][0]["path"] == "a.md"
        assert "openvino_exported_apart" in d.log.read_text()
    finally:
        d.stop()


@needs_openvino
def test_a_one_shot_index_has_its_first_export_made_by_a_child(tmp_path: Path) -> None:
    """``repd index`` exports the way the daemon does: a crash in the conversion's native
    code then costs a second child, not the command (see openvino_apart.export_apart)."""
    from tests.helpers import cli_env, run_cli

    root = tmp_path / "notes"
    root.mkdir()
    (root / "a.md").write_text("# Backups\n\nThe nightly job rotates the keys.\n")
    exports = tmp_path / "exports"  # empty: this command must export
    env = cli_env(tmp_path / "home", REPD_OPENVINO_CACHE=str(exports), REPD_LOG_LEVEL="info")
    done = run_cli(["index", str(root), "--json"], env, timeout=600)
    assert json.loads(done.stdout)["indexed"] == 1
    said = done.stdout + done.stderr
    assert "openvino_exporting_apart" in said and "openvino_exported_apart" in said
    assert (_export_dir(exports) / RUNTIME_SPEC).is_file()


@needs_openvino
def test_a_child_that_fails_is_final_and_one_never_started_leaves_the_load_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        torch_minilm: Embedder) -> None:
    from repd.adapters import openvino_apart

    # A real child that fails says why, from its own output.
    problem = openvino_apart.export_apart(str(tmp_path / "no-such-model"), None, "auto")
    assert problem is not None and problem.startswith("exit status 1")
    assert "no-such-model" in problem and not openvino_apart.not_started(problem)

    # Its verdict is final: no conversion here. openvino asked for by name fails with the
    # child's words; auto runs torch, saying why.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "exports"))
    monkeypatch.setattr(openvino_apart, "export_apart", lambda *args: "exit status 1: boom")
    with pytest.raises(EmbedderError, match=r"in a child process.*boom"):
        Embedder.load(MODEL, device="cpu", backend="openvino")
    capsys.readouterr()
    emb = Embedder.load(MODEL, device="cpu", backend="auto")
    assert type(emb._backend).__name__ == "_SentenceTransformerBackend"
    assert "openvino_unusable" in capsys.readouterr().out
    assert not (tmp_path / "exports").exists()  # nothing exported here

    # No child could be started at all: the load goes on here (an export already made,
    # without its spec: the full way, which records it), and says so.
    _seeded(tmp_path / "exports", torch_minilm.model_id)
    not_started = f"cannot start {tmp_path / 'python'}: [Errno 2] No such file"
    assert openvino_apart.not_started(not_started)
    monkeypatch.setattr(openvino_apart, "export_apart", lambda *args: not_started)
    emb = Embedder.load(MODEL, device="cpu", backend="openvino")
    assert type(emb._backend).__name__ == "OpenVinoBackend"  # here, the full way
    out = capsys.readouterr().out
    assert "openvino_export_apart_failed" in out and "No such file" in out
    assert (_export_dir(tmp_path / "exports") / RUNTIME_SPEC).is_file()


def _python_that_dies(folder: Path, times: int, python: str) -> tuple[Path, Path]:
    """A stand-in for ``python`` that dies of SIGSEGV on its first ``times`` starts (as
    a crash in native code would), then runs it; and the file that counts its starts."""
    folder.mkdir()
    starts = folder / "starts"
    wrapper = folder / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"echo start >> '{starts}'\n"
        f"if [ \"$(wc -l < '{starts}')\" -le {times} ]; then kill -SEGV $$; fi\n"
        f"exec '{python}' \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper, starts


@needs_openvino
def test_an_export_child_killed_by_a_signal_is_followed_by_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A child that dies of a signal (the conversion has crashed in native code, rarely)
    costs one more child, not an export in the daemon's own process; one that keeps
    dying is given up after ``CHILD_ATTEMPTS``, and says how it died."""
    from repd.adapters import openvino_apart

    exports = tmp_path / "exports"
    monkeypatch.setenv(CACHE_ENV, str(exports))
    python = sys.executable
    always, starts = _python_that_dies(tmp_path / "always", 99, python)
    monkeypatch.setattr(sys, "executable", str(always))
    problem = openvino_apart.export_apart(MODEL, None, "auto")
    assert problem is not None and problem.startswith("exit status -11")
    assert len(starts.read_text().splitlines()) == openvino_apart.CHILD_ATTEMPTS == 2
    out = capsys.readouterr().out
    assert out.count("openvino_export_child_killed") == 2 and "signal=11" in out

    once, starts = _python_that_dies(tmp_path / "once", 1, python)
    monkeypatch.setattr(sys, "executable", str(once))
    assert openvino_apart.export_apart(MODEL, None, "auto") is None
    assert len(starts.read_text().splitlines()) == 2
    assert (_export_dir(exports) / RUNTIME_SPEC).is_file()  # made by the second child
    assert capsys.readouterr().out.count("openvino_export_child_killed") == 1


@needs_openvino
def test_cls_pooling_and_a_model_without_normalize_run_directly_too(tmp_path: Path) -> None:
    """The two other shapes the direct runtime takes, each against its own torch vectors."""
    models = {"cls": build_cls_minilm(tmp_path / "minilm-cls"),
              "tiny": build_tiny_model(tmp_path / "tiny", dim=32, seed=4)}  # no Normalize
    for name, path in models.items():
        exports = tmp_path / f"exports-{name}"
        _load_in_child(path, exports, apart=True)
        direct = _load_in_child(path, exports)
        assert direct["runner"] == "DirectBackend", name
        want = Embedder.load(str(path), device="cpu", backend="torch")
        assert direct["model_id"] == want.model_id and direct["chunking_key"] == want.chunking_key
        assert float(_cos(direct["vectors"], want.embed(_TEXTS)).min()) >= 0.9999, name


@needs_openvino
def test_a_stale_foreign_or_wrong_spec_sends_the_load_the_full_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        torch_minilm: Embedder) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "exports"))
    Embedder.load(MODEL, device="cpu", backend="openvino")  # export + spec, by a child

    def here(backend: str = "auto") -> Embedder:
        # With no child to record a spec anew: the full way, in this process (the export
        # itself is whole, so no conversion).
        return Embedder.load(MODEL, device="cpu", backend=backend, export_apart=False)

    spec_file = _export_dir(tmp_path / "exports") / RUNTIME_SPEC
    assert type(Embedder.load(MODEL, device="cpu")._backend).__name__ == "DirectBackend"
    want = torch_minilm.embed(_TEXTS)

    def load_after(edit: Any) -> Embedder:
        body = json.loads(spec_file.read_text())
        edit(body)
        spec_file.write_text(json.dumps(body))
        return here()

    # Another version of a library that shaped the spec: the full path, which records anew.
    emb = load_after(lambda b: b["libraries"].update(tokenizers="0.0.1"))
    assert type(emb._backend).__name__ == "OpenVinoBackend"
    assert json.loads(spec_file.read_text())["libraries"]["tokenizers"] != "0.0.1"
    assert type(Embedder.load(MODEL, device="cpu")._backend).__name__ == "DirectBackend"

    # A spec that parses but computes something else: the probe check catches it, loudly.
    capsys.readouterr()
    emb = load_after(lambda b: b["spec"].update(pooling="cls"))
    assert type(emb._backend).__name__ == "OpenVinoBackend"
    assert "openvino_direct_unusable" in capsys.readouterr().out
    assert float(_cos(emb.embed(_TEXTS), want).min()) >= 0.9999
    assert json.loads(spec_file.read_text())["spec"]["pooling"] == "mean"  # recorded again

    # Garbage, or a spec of an earlier export of the same identity: the full path.
    spec_file.write_text("{not json")
    assert type(here()._backend).__name__ == "OpenVinoBackend"
    emb = load_after(lambda b: b.update(marker_created=1.0))
    assert type(emb._backend).__name__ == "OpenVinoBackend"
    # torch asked for by name is torch, spec or not.
    assert type(here("torch")._backend).__name__ == (
        "_SentenceTransformerBackend")


@needs_openvino
def test_a_model_with_a_dense_head_gets_no_spec_and_stays_on_the_full_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    base = SentenceTransformer(str(build_tiny_model(tmp_path / "tiny", dim=32, seed=5)),
                               device="cpu")
    path = tmp_path / "tiny-dense"
    SentenceTransformer(modules=[*base, Dense(32, 16)], device="cpu").save(str(path))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "exports"))
    for apart in (True, False):  # the child exports; no spec, so the full path runs it
        emb = Embedder.load(str(path), device="cpu", backend="openvino", export_apart=apart)
        assert type(emb._backend).__name__ == "OpenVinoBackend" and emb.dim == 16
    assert not (_export_dir(tmp_path / "exports") / RUNTIME_SPEC).exists()


# -- telling a CPU-only torch without importing it (no model) ----------------------------

@pytest.mark.parametrize(("version_py", "platform", "expected"), [
    ("cuda: Optional[str] = None\nhip: Optional[str] = None\n", "linux", True),
    ("cuda = None\nhip = None\n", "linux", True),
    ("cuda: Optional[str] = '12.8'\nhip: Optional[str] = None\n", "linux", False),
    ("cuda: Optional[str] = None\nhip: Optional[str] = '6.4.1'\n", "linux", False),
    ("cuda: Optional[str] = None\nhip: Optional[str] = None\n", "darwin", False),  # MPS
    ("__version__ = '2.13.0'\n", "linux", False),  # a layout we do not know: ask torch
])
def test_a_cpu_only_torch_build_is_told_from_its_version_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version_py: str, platform: str,
        expected: bool) -> None:
    package = tmp_path / "torch"
    package.mkdir()
    (package / "version.py").write_text(version_py)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(device.importlib.util, "find_spec", lambda name: SimpleNamespace(
        submodule_search_locations=[str(package)]) if name == "torch" else None)
    assert cpu_only_torch_build(platform) is expected


def test_no_torch_installed_or_torch_already_imported_means_asking_torch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(device.importlib.util, "find_spec", lambda name: None)
    assert cpu_only_torch_build("linux") is False
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace())
    assert cpu_only_torch_build("linux") is False


def test_only_transformer_pooling_and_normalize_get_a_spec() -> None:
    def model(*names: str, mode: Any = "mean") -> list[Any]:
        return [type(n, (), {"pooling_mode": mode})() for n in names]

    assert openvino_runtime._pooling(model("Transformer", "Pooling")) == "mean"
    assert openvino_runtime._pooling(model("Transformer", "Pooling", "Normalize",
                                           mode=["cls"])) == "cls"
    assert openvino_runtime._pooling(model("Transformer", "Pooling", mode="max")) is None
    assert openvino_runtime._pooling(model("Transformer", "Pooling", mode=("mean", "cls"))) is None
    assert openvino_runtime._pooling(model("Transformer", "Pooling", "Dense")) is None
    assert openvino_runtime._pooling(model("Transformer", "Pooling", "Normalize", "Dense")) is None


def test_half_made_exports_of_gone_processes_are_removed_and_live_ones_kept(
        tmp_path: Path) -> None:
    import time

    from repd.adapters.openvino_export import LEGACY_LEFTOVER_S, remove_leftovers

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    names = {
        "dead": f".m_1.tmp-{dead_pid}-abc123",
        "dead_damaged": f".m_1.damaged-{dead_pid}-1700000000",
        "live": f".m_1.tmp-{os.getpid()}-def456",
        "legacy_old": ".m_1.tmp-x1y2z3q4",
        "legacy_new": ".m_2.tmp-q4z3y2x1",
        "export": "m_1",
        "other": ".cache",
        "no_such_pid": ".m_3.tmp-99999999999999999999-abc",  # kept, and no error
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "openvino_model.bin").write_bytes(b"\0" * 1024)
    old = time.time() - LEGACY_LEFTOVER_S - 60
    os.utime(tmp_path / names["legacy_old"], (old, old))
    removed = remove_leftovers(tmp_path)
    assert sorted(removed) == sorted([names["dead"], names["dead_damaged"],
                                      names["legacy_old"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["live"], names["legacy_new"], names["export"], names["other"],
         names["no_such_pid"]])


@needs_openvino
def test_an_export_killed_midway_leaves_nothing_once_the_next_one_is_made(
        tmp_path: Path) -> None:
    import signal
    import time

    exports = tmp_path / "exports"
    env = {**os.environ, CACHE_ENV: str(exports), "REPD_LOG_LEVEL": "warning"}
    child = subprocess.Popen([sys.executable, "-m", "repd.adapters.openvino_apart", MODEL],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (exports.is_dir() and any(".tmp-" in p.name for p in exports.iterdir())):
            assert child.poll() is None, "the export ended before it could be killed"
            assert time.monotonic() < deadline, "no export folder appeared"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    (left,) = [p for p in exports.iterdir() if ".tmp-" in p.name]
    assert f".tmp-{child.pid}-" in left.name
    got = _load_in_child(MODEL, exports, apart=True)  # the next start: exports again
    assert got["runtime"] == "direct"
    assert [p.name for p in exports.iterdir() if p.name.startswith(".")] == []
    assert (_export_dir(exports) / RUNTIME_SPEC).is_file()


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# A daemon's loading thread, reduced to the call that has the export made apart.
_EXPORTING_PARENT = """
import sys
from repd.adapters.openvino_apart import export_apart
print(export_apart(sys.argv[1], None, "auto"))
"""


@needs_openvino
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_export_child_dies_with_the_daemon_that_waits_for_it(tmp_path: Path) -> None:
    """A daemon killed mid-export (kill -9) leaves no export running on: the child
    would spend minutes of CPU beside the export the restarted daemon begins."""
    import signal
    import time

    exports = tmp_path / "exports"
    env = {**os.environ, CACHE_ENV: str(exports), "REPD_LOG_LEVEL": "warning"}
    parent = subprocess.Popen([sys.executable, "-c", _EXPORTING_PARENT, MODEL], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (exports.is_dir() and any(".tmp-" in p.name for p in exports.iterdir())):
            assert parent.poll() is None, "the export ended before its parent could be killed"
            assert time.monotonic() < deadline, "no export folder appeared"
            time.sleep(0.05)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    (left,) = [p for p in exports.iterdir() if ".tmp-" in p.name]
    child = int(left.name.split(".tmp-", 1)[1].split("-", 1)[0])  # .NAME.tmp-PID-XXXX
    assert child != parent.pid
    deadline = time.monotonic() + 60  # a SIGKILL: seconds even on a loaded machine
    while _running(child):
        assert time.monotonic() < deadline, f"export child {child} outlived its parent"
        time.sleep(0.05)
    # Killed, not finished: the export never went into place.
    assert left.is_dir() and not [p for p in exports.iterdir() if (p / MARKER).is_file()]
