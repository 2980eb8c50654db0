"""The ``repd`` command: parses arguments, loads settings, delegates; imports nothing heavy.

torch, sentence-transformers and qdrant are imported inside the commands that need
them, so ``repd --help``, ``repd status`` and ``repd query`` (through the daemon) stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from repd import __version__
from repd.cli_output import terminal_columns
from repd.textsafe import printable

#: typing.TYPE_CHECKING without importing typing (2 ms of every `repd query`):
#: annotations here are strings, never evaluated.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

    from repd.core.types import SearchMode


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "model", None):
        out["model"] = args.model
    if getattr(args, "device", None):
        out["device"] = args.device
    if getattr(args, "data_dir", None):
        out.setdefault("store", {})["path"] = args.data_dir
    if getattr(args, "socket", None):
        out.setdefault("api", {})["socket"] = args.socket
    if getattr(args, "log_format", None):
        out["log_format"] = args.log_format
    if getattr(args, "log_level", None):
        out["log_level"] = args.log_level
    return out


def _load(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Any:
    """Load the settings (exit 2 on a bad config), configure logging, show the warnings.

    The daemon (``repd run``) logs at the configured level (info by default). Every other
    command is one-shot: it prints its own output (a progress bar and a summary) and logs
    warnings and errors only, unless this invocation asks for more (``--log-level`` or
    ``REPD_LOG_LEVEL``); the config file's ``log_level`` is the daemon's.
    """
    from repd.log import configure_logging, get_logger
    from repd.settings import load_settings

    loaded = load_settings(args.config, {**_overrides(args), **(extra or {})})
    s = loaded.settings
    daemon = getattr(args, "command", None) == "run"
    level = s.log_level
    if not daemon and loaded.sources.get("log_level") not in ("command line", "environment"):
        level = "warning"
    configure_logging(s.log_format, level)
    for warning in loaded.warnings:
        if daemon:  # into the daemon's log, which stays JSON lines when it is JSON
            get_logger("config").warning("config_warning", message=warning)
        else:  # beside the command's own "repd: ..." messages
            print(f"repd: warning: {printable(warning)}", file=sys.stderr)
    return loaded


def _display_path(root: str, rel: str) -> str:
    full = Path(root) / rel
    try:
        return str(full.relative_to(Path.cwd()))
    except ValueError:
        return str(full)


# -- index -------------------------------------------------------------------------------

def cmd_index(args: argparse.Namespace) -> int:
    """One-shot: scan, embed and write the given folders, then print a summary."""
    from repd.cli_output import Progress, print_summary
    from repd.engine import Engine

    for p in args.paths:
        problem = _index_path_problem(p)
        if problem:
            print(f"repd: {printable(p)}: {problem}", file=sys.stderr)
            return 2
    loaded = _load(args)
    targets = _index_targets(args.paths, loaded.settings.roots)
    roots = list(dict.fromkeys(root for root, _ in targets))
    from repd.adapters.openvino_int8 import CALIBRATION_TEXTS
    from repd.pipeline.indexer import RunStats

    engine = Engine(loaded.settings, writer=True)
    # An int8 variant named before any index is calibrated on what this run reads.
    engine.calibration_roots = [root / rel if rel else root for root, rel in targets]
    engine.on_calibrate = lambda: print(
        f"repd: making {engine.model_name} first, from up to {CALIBRATION_TEXTS} chunks "
        "(once; about a minute)…", file=sys.stderr)
    total = RunStats()
    try:
        indexer = engine.indexer()
        recovered = indexer.recover()
        if recovered:
            print(f"repd: finished {recovered} interrupted write(s) from an earlier run",
                  file=sys.stderr)
        indexer.allow_roots(roots)
        progress = Progress(enabled=sys.stderr.isatty() and not args.json)
        for root, rel in targets:
            total.add(_index_root(engine, indexer, root, progress, rel))
        indexer.prune_vector_cache()
        embedder = engine._embedder
        device = embedder.device if embedder is not None else None
    finally:
        engine.close()
    if args.json:
        print(json.dumps({**total.as_dict(), "device": device}, indent=2))
    else:
        print_summary(total, device)
        from repd.cli_roots import index_tip

        tip = index_tip(roots, loaded.settings.roots)  # `index` remembers nothing: say so
        if tip:
            print(tip, file=sys.stderr)
    return 0


INDEX_RETRIES = 4


def _index_path_problem(path: str) -> str | None:
    """Why ``repd index PATH`` cannot index PATH, or None (a folder or a regular file)."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "does not exist (a part of it is a file)"
    except PermissionError:
        return "permission denied"
    except OSError as exc:
        return exc.strerror or str(exc)
    import stat as stat_mod

    if stat_mod.S_ISDIR(st.st_mode) or stat_mod.S_ISREG(st.st_mode):
        return None
    return "not a file or folder"


def _index_targets(paths: Sequence[str], configured: Sequence[Path]) -> list[tuple[Path, str]]:
    """(root, path within it) for each argument of ``repd index``.

    A folder is a root of its own (path ""). A file is indexed as part of the configured
    root that holds it (the deepest, if roots nest), so that its results read as they
    will when that root is indexed; a file outside every configured root is indexed
    with its folder as the root, and only that file is read.
    """
    out: list[tuple[Path, str]] = []
    for p in paths:
        full = Path(os.path.abspath(p))
        if full.is_dir():
            out.append((full, ""))
            continue
        holders = [r for r in configured if full.is_relative_to(r) and full != r]
        root = max(holders, key=lambda r: len(r.parts)) if holders else full.parent
        out.append((root, str(full.relative_to(root))))
    return out


def _index_root(engine: Any, indexer: Any, root: Path, progress: Any, rel: str = "") -> Any:
    """Reconcile one root (or one file in it, ``rel``), retrying with backoff on transient
    failures (no descriptors, a full disk, an I/O hiccup): each try resumes where the last
    committed group ended."""
    import time

    from repd.errors import TransientError, is_transient

    for attempt in range(INDEX_RETRIES):
        progress.start(str(root / rel) if rel else str(root))
        try:
            stats = indexer.reconcile(root, engine.rules(root), rel, progress=progress.update)
        except Exception as exc:
            progress.finish()
            if not is_transient(exc):
                raise
            if attempt == INDEX_RETRIES - 1:
                raise TransientError(f"{root}: gave up after {INDEX_RETRIES} tries: "
                                     f"{type(exc).__name__}: {exc}") from None
            delay = 2.0 ** attempt
            print(f"repd: {type(exc).__name__}: {exc}; retrying in {delay:.0f} s",
                  file=sys.stderr)
            indexer.recover()
            time.sleep(delay)
            continue
        progress.finish()
        return stats
    raise AssertionError("unreachable")


# -- query -------------------------------------------------------------------------------

def cmd_query(args: argparse.Namespace) -> int:
    """Search the index: through the daemon when one runs, else by opening the store."""
    text = " ".join(args.text).strip()
    if not text:
        print("repd: query text is empty", file=sys.stderr)
        return 2
    if not 1 <= args.k <= 100:
        print("repd: -k must be between 1 and 100", file=sys.stderr)
        return 2
    problem = _path_arg_problem(args.path)
    if problem:
        print(f"repd: {printable(problem)}", file=sys.stderr)
        return 2
    result = None if args.local else _query_daemon(text, args, api_socket(args))
    if result is None:
        result = _query_without_api(_load(args).settings, text, args)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    hits = result["hits"]
    if not hits:
        print("no results")
        return 0
    from repd.cli_output import hit_line, output_width

    width = output_width(args.width)
    for h in hits:
        where = f"{_display_path(h['root'], h['path'])}:{h['start_line']}"
        # Names and text are anyone's data: no raw control characters to the terminal.
        print(hit_line(h["rank"], h["score"], printable(where), printable(h["snippet"]), width))
    return 0


def _path_arg_problem(path: str | None) -> str | None:
    """Why ``--path`` cannot be a glob (checked before anything loads), or None.

    A path that exists as written is taken literally, whatever its characters."""
    if not path or os.path.lexists(path):
        return None
    from repd.core.globs import GlobError, check_glob

    try:
        check_glob(path)
    except GlobError as exc:
        return f"invalid --path glob {path!r}: {exc}"
    return None


def _cwd() -> str | None:
    """The current folder, or None when it is gone."""
    try:
        return str(Path.cwd())
    except OSError:
        return None


def api_socket(args: argparse.Namespace) -> Path:
    """The daemon's API socket; the full settings are loaded only when needed to tell."""
    from repd.paths import quick_api_socket

    sock = quick_api_socket(args.config, getattr(args, "socket", None))
    return sock if sock is not None else Path(_load(args).settings.api.socket)


def _query_daemon(text: str, args: argparse.Namespace, socket: Path) -> dict[str, Any] | None:
    """Ask the daemon on ``socket``; None when nothing listens there (other errors raise).

    A running daemon has the model loaded: the query costs one request. This path
    imports neither pydantic nor structlog, so the whole command stays near 0.1 s.
    A daemon that is still starting (loading its model) is waited for, up to the
    query's timeout.
    """
    from repd.api.client import ApiClient, DaemonNotRunning

    def told() -> None:
        if sys.stderr.isatty():
            print("repd: the daemon is starting (loading model and index); waiting…",
                  file=sys.stderr, flush=True)

    try:
        client = ApiClient(socket, timeout=args.timeout)
        root = os.path.abspath(args.root) if args.root else None
        # The daemon's folder is not ours: a relative --path written as a path (for
        # example as `repd query` printed it) is resolved against this one there.
        path = args.path
        cwd = _cwd() if path is not None and not Path(path).is_absolute() else None
        res: dict[str, Any] = client.query(text, k=args.k, path=path, root=root,
                                           files=args.files, wait_starting=args.timeout,
                                           on_wait=told, mode=getattr(args, "mode", None),
                                           cwd=cwd)
        return res
    except DaemonNotRunning:
        return None


def _query_without_api(settings: Any, text: str, args: argparse.Namespace) -> dict[str, Any]:
    """No daemon on the socket we know: open the index here, unless a writer holds it.

    The data folder is the authority on who writes the index: a daemon whose socket is
    elsewhere (``--socket`` or ``XDG_RUNTIME_DIR`` differ in this shell) recorded it
    there, and is asked instead; the store itself is never opened twice.
    """
    from repd.adapters.datalock import IndexBusy
    from repd.errors import DaemonUnavailable, TransientError

    try:
        return _query_local(settings, text, args)
    except IndexBusy as busy:
        if args.local or not busy.by_daemon:
            raise
        if busy.daemon is not None:
            result = _query_daemon(text, args, Path(busy.daemon.socket))
            if result is not None:
                return result
            raise DaemonUnavailable(
                f"the index in {busy.data_dir} belongs to {busy.holder.daemon_name()}, "
                f"but nothing answers on the socket it recorded ({busy.daemon.socket})"
            ) from None
        raise TransientError(
            f"the index in {busy.data_dir} belongs to {busy.holder.daemon_name()}, "
            "which is still starting (its API is not up yet); query again in a moment"
        ) from None


@contextlib.contextmanager
def local_index(settings: Any) -> Iterator[Any]:
    """The index opened in this process for queries (``--local``, or no daemon answering).

    Refuses at once, before the model loads (seconds), when nothing is indexed or a
    writer holds the index; closes the engine (and the store's lock) on the way out.
    """
    from repd.engine import Engine
    from repd.errors import EngineError

    engine = Engine(settings, writer=False)
    try:
        if engine.generation is None:
            raise EngineError("nothing is indexed yet: run `repd index PATH` first")
        engine.check_no_writer()
        yield engine
    finally:
        engine.close()


def search_local(engine: Any, vector: list[float], text: str, k: int, path: str | None,
                 root: str | None, files: bool, *, mode: SearchMode = "dense",
                 prefix: str | None = None) -> tuple[list[Any], float]:
    """One search with a vector embedded beforehand (none for a lexical search): the store
    (and its lock, which a starting daemon waits for) is opened only for the searches,
    after the embedding. ``path``, ``root`` and ``prefix`` are a resolved scope's
    (``repd.pipeline.search.resolve_scope``); ``mode`` one ``check_mode`` allowed."""
    from repd.adapters.store import StoreError
    from repd.errors import EngineError
    from repd.pipeline.search import search

    try:
        store = engine.store
        handle = engine.generations.active
        sparse = handle.embed_sparse_query if handle is not None and mode != "dense" else None
        return search(store, lambda _text: vector, text, k, path, root, per_file=files,
                      mode=mode, embed_sparse=sparse, path_prefix=prefix)
    except StoreError as exc:
        raise EngineError(str(exc)) from None


def local_scope(engine: Any, settings: Any, path: str | None, root: str | None) -> Any:
    """``--path`` and ``--root`` resolved against the roots the index holds (and the
    configured ones), relative to the current folder (``resolve_scope``)."""
    from repd.pipeline.search import resolve_scope

    roots = [*engine.manifest.roots(), *settings.roots]
    return resolve_scope(path, root, roots, cwd=_cwd())


def _query_local(settings: Any, text: str, args: argparse.Namespace) -> dict[str, Any]:
    from repd.pipeline.search import check_mode

    with local_index(settings) as engine:
        # Both refused before the model loads (seconds).
        scope = local_scope(engine, settings, args.path, args.root)
        mode = check_mode(getattr(args, "mode", None), engine.generation.hybrid)
        vector = engine.embed_query(text) if mode != "lexical" else []
        hits, took = search_local(engine, vector, text, args.k, scope.glob, scope.root,
                                  args.files, mode=mode, prefix=scope.prefix)
        gen = engine.generation.id
    return {"hits": [h.as_dict() for h in hits], "took_ms": round(took, 2),
            "generation": gen, "mode": mode}


# -- files -------------------------------------------------------------------------------

def cmd_files(args: argparse.Namespace) -> int:
    """List skipped and failed files with their reasons (read from the manifest)."""
    from repd.adapters.manifest import Manifest, ManifestDamaged, ManifestError
    from repd.errors import EngineError

    loaded = _load(args)
    path = loaded.settings.store.path / "manifest.sqlite"
    if not path.exists():
        print("repd: nothing is indexed yet", file=sys.stderr)
        return 1
    try:
        # Read-only: SQLite lets this run beside a writing daemon, and it creates nothing.
        manifest = Manifest.open_readonly(path)
    except ManifestDamaged as exc:
        raise EngineError(f"{exc}; the next `repd index` or `repd run` rebuilds it") from None
    except ManifestError as exc:
        raise EngineError(str(exc)) from None
    try:
        rows, total = manifest.file_issues(args.state, args.limit, 0)
    finally:
        manifest.close()
    items: list[dict[str, str]] = [
        {"root": r.root, "path": r.path, "state": r.state, "reason": r.reason or "",
         "detail": r.detail or ""} for r in rows]
    if args.json:
        print(json.dumps({"items": items, "total": total}, indent=2, ensure_ascii=False))
        return 0
    for it in items:
        where = _display_path(it["root"], it["path"])
        print(f"{it['state']:<8} {it['reason'] or '':<13} {where!r}  "  # repr: escaped
              f"{printable(it['detail'] or '')}")
    print(f"{total} file(s)" + (f", first {len(items)} shown" if total > len(items) else ""))
    return 0


# -- config ------------------------------------------------------------------------------

def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the effective config and where each value came from."""
    from repd.settings import effective_items

    loaded = _load(args)
    rows = effective_items(loaded)
    if args.json:
        print(json.dumps({k: {"value": v, "source": s} for k, v, s in rows}, indent=2))
        return 0
    state = "" if loaded.config_file_exists else " (not present; defaults apply)"
    print(f"# config file: {loaded.config_file}{state}")
    width = max(len(k) for k, _, _ in rows)
    for key, value, source in rows:
        print(f"{key:<{width}}  {value:<40}  # {source}")
    return 0


# -- parser ------------------------------------------------------------------------------

class _HelpFormatter(argparse.HelpFormatter):
    """argparse's own formatter at argparse's own width (the terminal's, less 2), measured
    without importing shutil, which argparse does for it (2 ms of every command)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         terminal_columns() - 2 if width is None else width)


def build_parser(*, light: bool = False) -> argparse.ArgumentParser:
    """The full argument parser (also used to render the CLI reference).

    ``light``: only the commands defined in this module (index, query, files, config),
    without importing the modules that add the others (about 13 ms of CPU time, a
    sixth of what ``repd query`` through a daemon cost). ``main`` uses it for ``repd
    query``, which parses exactly as with the full parser (``tests/test_cli_light.py``).
    """
    fmt = _HelpFormatter
    common = argparse.ArgumentParser(add_help=False, formatter_class=fmt)
    common.add_argument("--config", type=Path, help="config file (default: $REPD_CONFIG or "
                        "$XDG_CONFIG_HOME/repd/config.toml)")
    common.add_argument("--data-dir", help="where the manifest and embedded index live")
    common.add_argument("--model", help="embedding model: Hugging Face name or local path")
    common.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    common.add_argument("--socket", help="the daemon's API socket")
    common.add_argument("--log-format", choices=["auto", "console", "json"])
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    p = argparse.ArgumentParser(
        prog="repd", description="repd keeps a live semantic index of your folders.",
        formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"repd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    ix = sub.add_parser("index", parents=[common], help="index folders once and exit",
                        formatter_class=fmt)
    ix.add_argument("paths", nargs="+", metavar="PATH",
                    help="folders to index; a file is indexed as part of the configured "
                    "root that holds it, else with its own folder as the root")
    ix.add_argument("--json", action="store_true", help="print the summary as JSON")
    ix.set_defaults(func=cmd_index)

    q = sub.add_parser("query", parents=[common], help="search the index", formatter_class=fmt)
    q.add_argument("text", nargs="+", help="what to look for")
    q.add_argument("-k", type=int, default=10, help="number of results (1-100, default 10)")
    q.add_argument("--path", help="only paths matching this glob, relative to each root "
                   "(e.g. 'docs/**/*.md', '**/*.{py,pyi}'), or a path as repd prints it "
                   "(absolute, or relative to the current folder; a glob may follow its "
                   "folders: ./src/*.py)")
    q.add_argument("--root", help="only this root folder, or this folder inside a root")
    q.add_argument("--mode", choices=["hybrid", "dense", "lexical"],
                   help="hybrid (embeddings and BM25 fused), dense (embeddings) or lexical "
                   "(BM25, exact words); default: hybrid when the index has sparse vectors, "
                   "else dense")
    q.add_argument("--files", action="store_true",
                   help="one hit per file: the best chunk of each of the top files")
    q.add_argument("--json", action="store_true", help="print results as JSON")
    q.add_argument("--local", action="store_true",
                   help="do not ask a daemon: load the model and open the index in this "
                   "process (refused while a daemon or `repd index` is writing the index, "
                   "which cannot be opened twice)")
    q.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the daemon's answer, and for a daemon that is "
                   "still starting (default 30)")
    q.add_argument("--width", type=int, metavar="N",
                   help="fit each result line to N columns, shortening the snippet (default: "
                   "the terminal's width; no limit when the output is not a terminal)")
    q.set_defaults(func=cmd_query)

    fl = sub.add_parser("files", parents=[common], formatter_class=fmt,
                        help="skipped and failed files, with reasons")
    fl.add_argument("--state", choices=["skipped", "failed"])
    fl.add_argument("--limit", type=int, default=200)
    fl.add_argument("--json", action="store_true")
    fl.set_defaults(func=cmd_files)

    cfg = sub.add_parser("config", help="inspect configuration", formatter_class=fmt)
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION")
    show = cfg_sub.add_parser("show", parents=[common], formatter_class=fmt,
                              help="effective config and where each value came from")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_config_show)
    if light:
        return p

    from repd.cli_daemon import add_daemon_commands

    add_daemon_commands(sub, common)
    from repd.cli_eval import add_eval_command

    add_eval_command(sub, common)
    from repd.cli_model import add_model_commands

    add_model_commands(sub, common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``repd`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(light=argv[:1] == ["query"])
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    from repd.errors import ConfigError, RepdError

    try:
        return func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"repd: config error: {problem}", file=sys.stderr)
        return exc.exit_code
    except RepdError as exc:
        # Every problem a person can act on: one line, its exit code, no traceback.
        from repd.api.client import DaemonNotRunning

        hint = "; start one with `repd run`" if isinstance(exc, DaemonNotRunning) else ""
        print(f"repd: {_one_line(exc)}{hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("repd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `repd status | head`: the reader left; point stdout at /dev/null so the
        # interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def run() -> NoReturn:
    """The ``repd`` program: :func:`main`, then the process ends without finalization.

    A command's work is done and closed when ``main`` returns; what the interpreter's
    teardown would add is the cost and the risk of tearing the model runtime down (see
    :func:`repd.process.end_process`). A native crash prints the threads' stacks.
    """
    from repd.process import end_process, fatal_errors_to_stderr

    fatal_errors_to_stderr()
    end_process(main())


if __name__ == "__main__":
    run()
