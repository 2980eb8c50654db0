"""``repd doctor``: checks a person can act on, one line each."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repd.settings import Settings

if TYPE_CHECKING:
    from repd.adapters.datalock import IndexBusy


@dataclass(frozen=True)
class Check:
    """One finding: level is ok, warn or fail."""

    name: str
    level: str
    message: str


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def count_dirs(root: Path, settings: Settings) -> int:
    """Folders the watcher would watch under a root (ignored folders excluded)."""
    from repd.core.ignore import IgnoreRules

    rules = IgnoreRules(root, settings.include, settings.exclude, settings.watch.gitignore)
    n = 0
    stack = [""]
    while stack:
        rel = stack.pop()
        n += 1
        try:
            with os.scandir(root / rel if rel else root) as it:
                for de in it:
                    if de.is_dir(follow_symlinks=False):
                        sub = f"{rel}/{de.name}" if rel else de.name
                        if not rules.is_ignored(sub, True):
                            stack.append(sub)
        except OSError:
            continue
    return n


def check_inotify(settings: Settings, roots: list[Path] | None = None) -> Check:
    """Enough inotify watches for every folder under the roots, and a watchdog release
    the inotify watcher knows (another one polls every root)?"""
    from repd.pipeline.watcher import (
        INOTIFY_WATCHDOG_VERSIONS,
        NEWEST_KNOWN_WATCHDOG,
        WATCHDOG_VERSION,
    )

    if WATCHDOG_VERSION not in INOTIFY_WATCHDOG_VERSIONS:
        known = ", ".join(sorted(INOTIFY_WATCHDOG_VERSIONS))
        return Check("inotify", "warn", f"watchdog {WATCHDOG_VERSION} is installed and repd's "
                     f"inotify watcher is written for {known}: roots will be polled; pip "
                     f"install 'watchdog=={NEWEST_KNOWN_WATCHDOG}'")
    roots = settings.roots if roots is None else roots
    limit = _read_int("/proc/sys/fs/inotify/max_user_watches")
    if limit is None:
        return Check("inotify", "warn", "no inotify on this system; roots will be polled")
    if not roots:
        return Check("inotify", "ok", f"max_user_watches={limit} (no roots configured)")
    need = sum(count_dirs(r, settings) for r in roots if r.is_dir())
    msg = f"{need} folders to watch, max_user_watches={limit}"
    if need > limit:
        return Check("inotify", "fail", msg + "; raise it: sudo sysctl "
                     f"fs.inotify.max_user_watches={need * 2} (roots would fall back to polling)")
    if need > limit * 0.5:
        return Check("inotify", "warn", msg + "; other programs share this limit")
    return Check("inotify", "ok", msg)


def check_roots(settings: Settings, daemon_roots: list[Path] | None = None) -> Check:
    """Do the roots exist? A running daemon's roots are the ones that count (it may have
    been given them on its command line); without one, the configured roots."""
    roots = settings.roots if daemon_roots is None else daemon_roots
    where = " (from the running daemon)" if daemon_roots is not None else ""
    if not roots:
        hint = ("the running daemon watches none" if daemon_roots is not None
                else "pass folders to `repd run`, or set `roots` in the config")
        return Check("roots", "warn", f"no roots configured ({hint})")
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        return Check("roots", "fail", "not folders: " + ", ".join(missing) + where)
    text = ", ".join(str(r) for r in roots) + where
    if daemon_roots is not None and set(daemon_roots) != set(settings.roots):
        if settings.roots:
            text += ("; the config names " + ", ".join(str(r) for r in settings.roots)
                     + " (a restart of `repd run` without folders would watch those)")
        else:
            text += ("; the config names none, so a restart of `repd run` without folders "
                     "(or the service) would exit: `repd roots add PATH` keeps them")
    return Check("roots", "ok", text)


def daemon_status(settings: Settings) -> dict[str, Any] | None:
    """The running daemon's status on the configured socket, or None."""
    from repd.api.client import ApiClient, ApiClientError

    try:
        return ApiClient(settings.api.socket, timeout=5.0).status()
    except (ApiClientError, OSError):
        return None


def roots_of(status: dict[str, Any] | None) -> list[Path] | None:
    """The roots a daemon's status lists, or None without a usable status."""
    if not status or not isinstance(status.get("roots"), list):
        return None
    return [Path(r["path"]) for r in status["roots"]
            if isinstance(r, dict) and isinstance(r.get("path"), str)]


def check_device(settings: Settings) -> Check:
    """Which device, and which runtime (torch or OpenVINO), the model would run on."""
    from repd.adapters.device import choose_backend, choose_device, choose_precision
    from repd.adapters.openvino_export import openvino_available

    try:
        device = choose_device(settings.device)
        backend = choose_backend(settings.backend, device, openvino_available)
        precision = ""
        if backend == "openvino":
            precision = (f", openvino_precision {settings.openvino_precision} -> "
                         f"{choose_precision(settings.openvino_precision)}")
        return Check("device", "ok", f"{settings.device} -> {device}, "
                     f"backend {settings.backend} -> {backend}{precision}")
    except Exception as exc:
        return Check("device", "fail", str(exc))


def check_model(settings: Settings) -> Check:
    """Can the model be loaded, and how long does it take?"""
    from repd.adapters.embedder import Embedder
    from repd.adapters.openvino_int8 import NothingToCalibrateError, making_note, split_variant

    def load(model: str) -> Embedder:
        return Embedder.load(model, device=settings.device, backend=settings.backend,
                             openvino_precision=settings.openvino_precision)

    t0 = time.perf_counter()
    name, note = settings.model, ""
    try:
        try:
            emb = load(name)
        except NothingToCalibrateError:
            # Not made yet: the doctor does not make it (a minute, from the index's
            # chunks); it checks the base model it will be made from.
            name = split_variant(settings.model)[0]
            note = (f" (not made yet: {making_note(settings.model)}, when `repd run` or "
                    "`repd index` first loads it)")
            emb = load(name)
    except Exception as exc:
        return Check("model", "fail", f"{name}: {exc}")
    return Check("model", "ok", f"{name}: dim {emb.dim}, max {emb.max_tokens} tokens, "
                 f"loaded in {time.perf_counter() - t0:.1f}s on {emb.device} "
                 f"({emb.backend} {emb.precision}, backend = {settings.backend}){note}")


def check_daemon_and_store(settings: Settings) -> list[Check]:
    """Is a daemon answering? If not, can the store be opened?

    The store is opened only when no process writes it: a daemon or ``repd index``
    holding the data folder is reported (and a daemon asked through the socket it
    recorded there), never opened a second time, which would damage its shard.
    """
    from repd.adapters.datalock import IndexBusy, busy_by_writer
    from repd.api.client import ApiClient, ApiClientError, DaemonNotRunning

    sock = settings.api.socket
    try:
        st = ApiClient(sock, timeout=5.0).status()
        mode = oct(sock.stat().st_mode & 0o777)
        return [Check("socket", "ok", f"daemon answers on {sock} (mode {mode})"),
                _store_from_status(st)]
    except DaemonNotRunning:
        out = [Check("socket", "warn", f"no daemon answers on {sock}")]
    except ApiClientError as exc:
        out = [Check("socket", "fail", str(exc))]
    data_dir = settings.store.path
    busy = busy_by_writer(data_dir) if data_dir.is_dir() else None
    if busy is not None:
        return out + _writer_checks(busy)
    from repd.engine import Engine

    try:
        eng = Engine(settings, writer=False)
        try:
            if eng.generation is None:
                out.append(Check("store", "warn", "nothing indexed yet"))
            else:
                out.append(Check("store", "ok", f"{eng.store.count()} points in generation "
                                 f"{eng.generation.id} ({eng.generation.model_name})"))
        finally:
            eng.close()
    except IndexBusy as exc:  # a writer started since the probe above
        out.extend(_writer_checks(exc))
    except Exception as exc:
        out.append(Check("store", "fail", " ".join(str(exc).split())))
    return out


#: Points from which ``repd doctor`` suggests ``store.replicas`` (the default) for an
#: embedded index its user keeps in one copy: a large folder that changes rebuilds HNSW
#: often, and each build (~3-6 s on 2 cores) pauses queries and status in the daemon's
#: process.
REPLICAS_ADVICE_POINTS = 100_000


def _store_from_status(st: dict[str, object]) -> Check:
    store = st.get("store")
    gen = st.get("generation")
    points = store.get("points") if isinstance(store, dict) else None
    gen_id = gen.get("id") if isinstance(gen, dict) else None
    message = f"{points} points, generation {gen_id} (from the daemon)"
    if (isinstance(store, dict) and store.get("kind") == "embedded"
            and not store.get("replicas") and isinstance(points, int)
            and points >= REPLICAS_ADVICE_POINTS):
        message += ("; in one copy, each HNSW build pauses queries for seconds: "
                    "`[store] replicas = true` (the default) builds in a second copy instead "
                    "(twice the disk)")
    return Check("store", "ok", message)


def _writer_checks(busy: IndexBusy) -> list[Check]:
    from repd.api.client import ApiClient, ApiClientError

    holder = busy.holder.describe()
    if busy.daemon is None:
        return [Check("store", "warn", f"being written by {holder}; not opened (it cannot be "
                      "opened twice)")]
    try:
        st = ApiClient(busy.daemon.socket, timeout=5.0).status()
    except ApiClientError as exc:
        return [Check("daemon", "fail", f"{holder} holds the index but does not answer on "
                      f"the socket it recorded, {busy.daemon.socket}: {exc}")]
    return [Check("daemon", "warn", f"{holder} answers on {busy.daemon.socket}, not on the "
                  "socket this shell's settings name (another XDG_RUNTIME_DIR or --socket?)"),
            _store_from_status(st)]


def check_permissions(settings: Settings) -> Check:
    """Is the data folder private? It holds the text of every indexed file."""
    from repd.adapters.datalock import loose_entries

    data_dir = settings.store.path
    if not data_dir.exists():
        return Check("permissions", "ok", f"{data_dir} does not exist yet (created 0700)")
    loose = loose_entries(data_dir)
    if not loose:
        return Check("permissions", "ok", f"{data_dir} and everything in it: owner only")
    first = loose[0]
    mode = oct(first.lstat().st_mode & 0o777) if first.exists() else "?"
    return Check("permissions", "warn",
                 f"{len(loose)} entries in {data_dir} are open to group or others (e.g. "
                 f"{first}, mode {mode}); run `chmod -R go-rwx {data_dir}` (repd run and "
                 "repd index also tighten it when they start)")


def check_crashes(settings: Settings) -> Check:
    """Did a daemon on this data folder die of a fatal error (see :mod:`repd.crashlog`)?

    A record in ``crash.log`` is a crash no daemon has reported yet (none started since);
    ``last-crash.log`` is the last one reported, kept until someone deletes it.
    """
    from repd.crashlog import CRASH_FILE, LAST_CRASH_FILE, read_crash

    for name in (CRASH_FILE, LAST_CRASH_FILE):
        # An empty crash.log is a running daemon's armed file, or a kill -9's: no crash.
        crash = read_crash(settings.store.path / name)
        if crash is None:
            continue
        when = crash.at.astimezone().strftime("%Y-%m-%d %H:%M")
        if name == CRASH_FILE:
            return Check("crashes", "fail", f"the daemon died at {when} ({crash.error}) and "
                         f"has not started since; its threads' stacks: {crash.log} (please "
                         "report it)")
        return Check("crashes", "warn", f"the daemon died at {when} ({crash.error}); its "
                     f"threads' stacks: {crash.log} (please report it, then delete the file)")
    return Check("crashes", "ok", "no fatal error recorded")


def run_checks(settings: Settings, load_model: bool = True) -> list[Check]:
    """Every check, in the order a person would fix things."""
    daemon_roots = roots_of(daemon_status(settings))
    checks = [check_roots(settings, daemon_roots), check_inotify(settings, daemon_roots),
              check_device(settings)]
    if load_model:
        checks.append(check_model(settings))
    checks.extend(check_daemon_and_store(settings))
    checks.append(check_crashes(settings))
    checks.append(check_permissions(settings))
    return checks
