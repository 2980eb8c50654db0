"""OpenVINO exports of a model: made once per model identity, kept in the cache, reused.

sentence-transformers exports a model to OpenVINO IR when asked for ``backend="openvino"``
and the model folder has no IR; that costs seconds to tens of seconds (the torch model is
traced), so the export is saved under :func:`export_root` in a folder named for the model
identity and every later load reads it (well under a second).

An export is written to a temporary folder beside its final place and renamed there in
one step, so two processes exporting the same model at once never see each other's half
work: the loser of the rename drops its copy and uses the winner's. The folder carries a
``repd-export.json`` marker (written last, before the rename) holding the identity, the
library versions and the torch model's vectors for two probe texts; a load that finds the
marker missing, the files of another size, or the probe vectors no longer reproduced puts
the folder aside and exports again, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from repd import paths
from repd.adapters.device import EmbedderError
from repd.log import get_logger
from repd.process import process_exists

__all__ = ["CACHE_ENV", "MARKER", "RUNTIME_SPEC", "ExportReport", "export_folder", "export_root",
           "library_versions", "load_or_export", "openvino_available", "put_in_place",
           "read_marker", "remove_leftovers", "set_aside", "temp_folder", "worst_cosine",
           "write_marker"]

log = get_logger("openvino")

#: Where exports live when set (an absolute path); default ``$XDG_CACHE_HOME/repd/openvino``.
#: Tests point every daemon they start at one session-wide folder through it.
CACHE_ENV = "REPD_OPENVINO_CACHE"
MARKER = "repd-export.json"
#: What :mod:`repd.adapters.openvino_runtime` records beside an export to run it with no
#: torch; written after the export, so not one of the marker's files.
RUNTIME_SPEC = "repd-runtime.json"
_MARKER_VERSION = 1
# The torch and OpenVINO vectors of one text agree to ~1e-6 in fp32; far below this a
# probe that moved means damaged or foreign files, not rounding.
_PROBE_MIN_COSINE = 0.9999


def openvino_available() -> bool:
    """Whether ``optimum.intel`` and ``openvino`` import (the OpenVINO backend can run)."""
    try:
        import openvino  # noqa: F401
        import optimum.intel  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything at import
        return False
    return True


def export_root() -> Path:
    """The folder holding one export per model identity (see :data:`CACHE_ENV`)."""
    value = os.environ.get(CACHE_ENV)
    if value and Path(value).is_absolute():
        return Path(value)
    return paths.cache_dir() / "openvino"


def _folder_name(model_id: str) -> str:
    """A folder name for ``name@digest``: ``/`` and ``@`` (which Hugging Face reads as a
    revision) and other unsafe characters become ``_``; the digest keeps it unique."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)


class ExportReport:
    """What :func:`load_or_export` did: ``exported`` (bool), ``seconds``, ``path``."""

    __slots__ = ("exported", "path", "seconds")

    def __init__(self, path: Path, exported: bool, seconds: float) -> None:
        self.path = path
        self.exported = exported
        self.seconds = seconds


_EXPORT_LIBRARIES = ("openvino", "optimum-intel", "sentence-transformers", "transformers")


def library_versions(packages: Sequence[str] = _EXPORT_LIBRARIES) -> dict[str, str]:
    """Installed version of each distribution in ``packages`` (``?`` when missing), read
    from package metadata: nothing is imported."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def _file_sizes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (MARKER, RUNTIME_SPEC)}


def worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The least cosine between matching rows of ``a`` and ``b``; -1.0 when their shapes
    differ, NaN when a row is (compare with ``not x >= bar`` so that NaN fails)."""
    if a.shape != b.shape:
        return -1.0
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def _encode(model: Any, texts: Sequence[str]) -> np.ndarray:
    return np.asarray(model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True,
                                   show_progress_bar=False), dtype=np.float32)


# Their advice to save the export (we do), their guess whether a folder holds one (we
# tell them), the tracer's warnings and transformers' load report and deprecation notes
# while exporting: noise in a daemon's log (plain text among its JSON lines).
_CHATTY_LOGGERS = ("optimum", "sentence_transformers.backend", "nncf", "transformers")


@contextmanager
def _quiet() -> Iterator[None]:
    # optimum sets its loggers' level and handler the first time one of its modules asks
    # for a logger, which would be inside the calls below (optimum.intel imports lazily):
    # import its logging module first, or it would undo what is set here.
    import optimum.utils.logging  # noqa: F401

    from repd.log import route_optimum_logs

    route_optimum_logs()
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in _CHATTY_LOGGERS]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _open(folder: Path, ov_config: dict[str, str]) -> Any:
    from sentence_transformers import SentenceTransformer

    with _quiet():
        model = SentenceTransformer(str(folder), device="cpu", backend="openvino",
                                    model_kwargs={"ov_config": dict(ov_config)})
    model.eval()
    return model


def read_marker(folder: Path, model_id: str) -> tuple[dict[str, Any] | None, str]:
    """The marker of the export at ``folder`` if it is whole and for ``model_id``.

    Else ``(None, why)``. The probe vectors in it are not checked here: that needs the
    model run (see :func:`_check` and :mod:`repd.adapters.openvino_runtime`).
    """
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None, "no readable marker (an interrupted or foreign export)"
    if not isinstance(marker, dict) or marker.get("version") != _MARKER_VERSION:
        return None, "marker of another version"
    if marker.get("model_id") != model_id:
        return None, f"marker names {marker.get('model_id')!r}"
    if marker.get("files") != _file_sizes(folder):
        return None, "files missing or of another size"
    return marker, ""


def export_folder(model_id: str, root: Path | None = None) -> Path:
    """Where the export of ``model_id`` lives (under :func:`export_root` by default)."""
    return (root or export_root()) / _folder_name(model_id)


def _check(folder: Path, model_id: str, ov_config: dict[str, str],
           probes: Sequence[str]) -> tuple[Any | None, str]:
    """The export at ``folder`` opened and verified, or ``(None, why it is unusable)``."""
    marker, why = read_marker(folder, model_id)
    if marker is None:
        return None, why
    try:
        model = _open(folder, ov_config)
        got = _encode(model, probes)
    except Exception as exc:
        return None, f"cannot be loaded: {type(exc).__name__}: {str(exc).strip()[:200]}"
    want = np.asarray(marker.get("probe_vectors"), dtype=np.float32)
    # "not >=" so that NaN (weights overwritten with garbage) counts as a mismatch.
    if not worst_cosine(want, got) >= _PROBE_MIN_COSINE:
        return None, "its vectors no longer match the ones recorded at export"
    return model, ""


def set_aside(folder: Path, why: str) -> None:
    """Move a damaged export out of the way (then delete it), with a warning."""
    log.warning("openvino_export_damaged", path=str(folder), reason=why,
                action="exporting again")
    aside = folder.with_name(f".{folder.name}.damaged-{os.getpid()}-{time.time_ns()}")
    try:
        folder.rename(aside)  # another process may have done it first: then it is gone
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _export(source: str, folder: Path, model_id: str, ov_config: dict[str, str],
            probes: Sequence[str], reference: Callable[[], np.ndarray]) -> Any:
    """Export ``source`` into ``folder`` through a temporary sibling and one rename."""
    from sentence_transformers import SentenceTransformer

    tmp = temp_folder(folder)
    try:
        with _quiet():
            model = SentenceTransformer(source, device="cpu", backend="openvino",
                                        model_kwargs={"ov_config": dict(ov_config),
                                                      "export": True})
        model.eval()
        want = reference()
        got = _encode(model, probes)
        worst = worst_cosine(want, got)
        if not worst >= _PROBE_MIN_COSINE:
            raise EmbedderError(
                f"the OpenVINO export of {model_id} gives other vectors than torch "
                f"(probe cosine {worst:.6f}); use backend = \"torch\"")
        model.save_pretrained(str(tmp))
        write_marker(tmp, model_id, source, probes, want)
        put_in_place(tmp, folder)
        return model
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def temp_folder(folder: Path) -> Path:
    """A new empty folder beside ``folder``, to build its contents in (see :func:`put_in_place`).

    Its name carries this process's pid: an export killed midway (``kill -9`` of a
    first ``repd index``, of the daemon's export child) leaves its folder behind, tens
    or hundreds of MB, and the next export in the same cache folder removes it once its
    process is gone (:func:`remove_leftovers`).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder.parent)
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-",
                                 dir=folder.parent))


#: A leftover's name: ``.NAME.tmp-PID-XXXX`` (``temp_folder``) or ``.NAME.damaged-PID-NS``
#: (``set_aside``); ``.NAME.tmp-XXXX`` from before the pid was in the name.
_LEFTOVER_RE = re.compile(r"^\..+\.(?:tmp|damaged)-(?:(\d+)-)?[^/]*$")
#: Age past which a leftover without a pid in its name is taken for abandoned.
LEGACY_LEFTOVER_S = 3600.0


def remove_leftovers(parent: Path) -> list[str]:
    """Remove the half-made exports in ``parent`` whose process is gone (no such pid);
    those named without a pid once they are an hour old. Returns the names removed.
    A live process's folder is never touched, nor is anything else in ``parent``."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = _LEFTOVER_RE.match(entry.name)
        if m is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if m.group(1) is not None:
                if process_exists(int(m.group(1))):
                    continue
            elif time.time() - entry.stat(follow_symlinks=False).st_mtime < LEGACY_LEFTOVER_S:
                continue
        except (OSError, ValueError, OverflowError):  # a pid past any kernel's: not ours
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not Path(entry.path).exists():
            removed.append(entry.name)
            log.info("openvino_export_leftover_removed", path=entry.path)
    return removed


def write_marker(tmp: Path, model_id: str, source: str, probes: Sequence[str],
                 vectors: np.ndarray, extra: dict[str, Any] | None = None) -> float:
    """Write the marker of the export built in ``tmp`` (its files all written); return
    its ``created`` stamp. ``vectors``: the reference vectors of ``probes``."""
    created = time.time()
    marker = {"version": _MARKER_VERSION, "model_id": model_id, "source": source,
              "created": created, "libraries": library_versions(),
              "files": _file_sizes(tmp), "probe_texts": list(probes),
              "probe_vectors": np.asarray(vectors).tolist(), **(extra or {})}
    (tmp / MARKER).write_text(json.dumps(marker))
    return created


def put_in_place(tmp: Path, folder: Path) -> None:
    """Rename the finished export ``tmp`` to ``folder`` in one step (or drop it when
    another process got there first)."""
    tmp.chmod(0o755 & ~_umask())  # mkdtemp makes it 0700; honour the umask instead
    try:
        tmp.rename(folder)
    except OSError:
        # Another process renamed its export there first: the same identity, so the
        # same model; keep theirs (it may be in use) and drop ours.
        log.info("openvino_export_raced", path=str(folder))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_or_export(source: str, model_id: str, ov_config: dict[str, str],
                   probes: Sequence[str], reference: Callable[[], np.ndarray],
                   root: Path | None = None) -> tuple[Any, ExportReport]:
    """The OpenVINO SentenceTransformer for ``model_id``, from its saved export or a new one.

    ``reference`` gives the torch model's vectors for ``probes``; it is called only when
    exporting (it loads the torch model). Raises :class:`EmbedderError` on failure.
    """
    folder = export_folder(model_id, root)
    t0 = time.perf_counter()
    if folder.exists():
        model, why = _check(folder, model_id, ov_config, probes)
        if model is not None:
            return model, ExportReport(folder, False, time.perf_counter() - t0)
        set_aside(folder, why)
    log.info("openvino_exporting", model_id=model_id, path=str(folder))
    try:
        model = _export(source, folder, model_id, ov_config, probes, reference)
    except EmbedderError:
        raise
    except Exception as exc:
        raise EmbedderError(
            f"cannot export {model_id} to OpenVINO: {type(exc).__name__}: "
            f"{(str(exc).strip().splitlines() or [''])[0]}") from exc
    seconds = time.perf_counter() - t0
    log.info("openvino_exported", model_id=model_id, path=str(folder), seconds=round(seconds, 1))
    return model, ExportReport(folder, True, seconds)
