"""``repd roots add|remove|list``: the folders ``repd run`` and the service watch.

``repd index PATH`` indexes once and remembers nothing; these commands edit ``roots`` in
the config file that every repd command reads (``--config``, ``REPD_CONFIG``, or
``$XDG_CONFIG_HOME/repd/config.toml``), keeping its comments and layout, and then tell
a running daemon to reload (SIGHUP, as ``systemctl --user reload repd`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repd.errors import EXIT_CONFIG, ConfigError

#: Options of ``repd run`` that take a value (to tell its folders from option values).
_VALUE_OPTIONS = ("--config", "--data-dir", "--model", "--device", "--socket", "--log-format",
                  "--log-level")
NEW_FILE_HEADER = ("repd configuration: `repd config show` prints every setting and where "
                   "it came from.")


def normalise(path: str | Path) -> Path:
    """An absolute path, ``~`` expanded, not resolved (as ``roots`` are read)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def config_path(args: argparse.Namespace) -> Path:
    """The config file ``load_settings`` reads for these arguments, made absolute."""
    from repd.paths import resolve_config_file

    return normalise(resolve_config_file(getattr(args, "config", None)))


# -- the file ------------------------------------------------------------------------------


def _read_document(path: Path) -> Any:
    import tomlkit
    from tomlkit.exceptions import ParseError

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        doc = tomlkit.document()
        doc.add(tomlkit.comment(NEW_FILE_HEADER))
        return doc
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    try:
        return tomlkit.parse(text)
    except ParseError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None


def _roots_array(doc: Any, path: Path, create: bool) -> Any:
    import tomlkit
    from tomlkit.items import Array

    if "roots" not in doc:
        if not create:
            return None
        doc["roots"] = tomlkit.array()
    roots = doc["roots"]
    if not isinstance(roots, Array) or not all(isinstance(v, str) for v in roots):
        raise ConfigError([f"{path}: roots must be a list of folder names, like "
                           '`roots = ["/home/me/notes"]`; fix it by hand first'])
    return roots


def file_roots(path: Path) -> list[Path]:
    """The roots the file names, normalised (an absent file names none)."""
    roots = _roots_array(_read_document(path), path, create=False)
    return [normalise(str(v)) for v in roots] if roots is not None else []


def _write_document(path: Path, doc: Any) -> None:
    """Replace the file atomically; a new file is 0600 in a 0700 folder, an old one keeps
    its mode, and a symlinked config (a dotfiles checkout) is written where it points."""
    import tomlkit

    target = Path(os.path.realpath(path))
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o600
        if not target.parent.exists():
            target.parent.mkdir(parents=True, mode=0o700)
    text = tomlkit.dumps(doc)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        Path(tmp).replace(target)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def _validate_existing(args: argparse.Namespace, path: Path) -> Any:
    """Load the settings as every command would (so a broken file is refused before it is
    edited); None when the file does not exist yet."""
    if not path.exists():
        return None
    from repd.cli import _overrides
    from repd.settings import load_settings

    return load_settings(path, _overrides(args))


# -- the running daemon --------------------------------------------------------------------


@dataclass(frozen=True)
class RunningDaemon:
    """A live ``repd run`` recorded in the data folder."""

    pid: int
    socket: str
    argv: list[str]

    def cli_folders(self) -> list[str]:
        """Folders given on its command line (``repd run PATH...``): they win over roots."""
        try:
            rest = self.argv[self.argv.index("run") + 1:]
        except ValueError:
            return []
        out, skip = [], False
        for word in rest:
            if skip:
                skip = False
            elif word in _VALUE_OPTIONS:
                skip = True
            elif not word.startswith("-"):
                out.append(word)
        return out


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [w.decode("utf-8", "replace") for w in raw.split(b"\0") if w]


def _is_repd_run(argv: list[str]) -> bool:
    try:
        run = argv.index("run")
    except ValueError:
        return False
    return any(Path(w).name == "repd" or w == "repd.cli" for w in argv[:run])


def running_daemon(data_dir: Path) -> RunningDaemon | None:
    """The daemon in ``data_dir``'s ``daemon.json`` if that process lives and is repd."""
    from repd.adapters.datalock import read_daemon_record

    record = read_daemon_record(data_dir)
    if record is None:
        return None
    argv = _cmdline(record.pid)
    if argv is None or not _is_repd_run(argv):
        return None  # the pid was reused by something else
    return RunningDaemon(record.pid, record.socket, argv)


def _daemon_config(daemon: RunningDaemon) -> Path | None:
    """The config file that daemon reads, when its command line or environment tell."""
    args = daemon.argv
    for i, word in enumerate(args[:-1]):
        if word == "--config":
            return normalise(args[i + 1])
    for word in args:
        if word.startswith("--config="):
            return normalise(word.split("=", 1)[1])
    try:
        raw = Path(f"/proc/{daemon.pid}/environ").read_bytes()
    except OSError:
        return None
    env = dict(w.decode("utf-8", "replace").partition("=")[::2]
               for w in raw.split(b"\0") if b"=" in w)
    if env.get("REPD_CONFIG"):
        return normalise(env["REPD_CONFIG"])
    base = Path(env.get("XDG_CONFIG_HOME", ""))
    if not base.is_absolute():
        home = env.get("HOME")
        if not home:
            return None
        base = Path(home) / ".config"
    return normalise(base / "repd" / "config.toml")


def tell_daemon(data_dir: Path, config: Path) -> str:
    """SIGHUP the daemon of ``data_dir`` so it re-reads its config; say what happened."""
    daemon = running_daemon(data_dir)
    if daemon is None:
        return ("no daemon is running for this data folder; `repd run` and the service "
                "will watch the roots when they start")
    theirs = _daemon_config(daemon)
    if theirs is not None and os.path.realpath(theirs) != os.path.realpath(config):
        return (f"the running daemon (pid {daemon.pid}) reads another config file ({theirs}): "
                "not told to reload; restart it with this one to use these roots")
    try:
        os.kill(daemon.pid, signal.SIGHUP)
    except PermissionError:
        return (f"cannot signal the running daemon (pid {daemon.pid}): reload it yourself "
                "(`systemctl reload repd`)")
    except ProcessLookupError:
        return "the daemon exited meanwhile; it will watch the roots when it starts again"
    told = f"told the running daemon (pid {daemon.pid}) to reload"
    folders = daemon.cli_folders()
    if folders:
        told += (f"; but it was started with folders on its command line ({' '.join(folders)}),"
                 " which it keeps watching instead of the roots: restart it without them")
    return told


def daemon_roots(args: argparse.Namespace, data_dir: Path | None) -> list[Path] | None:
    """The roots the running daemon watches (from its status), or None if none answers."""
    from repd.api.client import ApiClient, ApiClientError
    from repd.cli import api_socket
    from repd.errors import RepdError

    sockets: list[Path] = []
    with contextlib.suppress(RepdError):  # a broken config: ask the recorded socket only
        sockets.append(api_socket(args))
    if data_dir is not None:
        daemon = running_daemon(data_dir)
        if daemon is not None:
            sockets.append(Path(daemon.socket))
    for sock in dict.fromkeys(sockets):
        try:
            status = ApiClient(sock, timeout=getattr(args, "timeout", 5.0)).status()
        except (ApiClientError, RepdError, OSError):
            continue
        return [Path(r["path"]) for r in status.get("roots", [])]
    return None


# -- commands ------------------------------------------------------------------------------


def _edit(args: argparse.Namespace, adding: bool) -> int:
    path = config_path(args)
    targets: list[Path] = []
    for raw in args.paths:
        p = normalise(raw)
        if adding and not p.is_dir():
            what = "does not exist" if not p.exists() else "is not a folder"
            print(f"repd: {p} {what}: roots are folders", file=sys.stderr)
            return EXIT_CONFIG
        if p not in targets:
            targets.append(p)
    loaded = _validate_existing(args, path)
    doc = _read_document(path)
    roots = _roots_array(doc, path, create=adding)
    current = [normalise(str(v)) for v in roots] if roots is not None else []
    changed: list[Path] = []
    for p in targets:
        if adding:
            if p in current:
                print(f"already a root: {p}")
                continue
            roots.append(str(p))
            current.append(p)
        else:
            hits = [i for i, v in enumerate(current) if v == p]
            if not hits:
                print(f"not a root: {p}")
                continue
            for i in reversed(hits):
                del roots[i]
                del current[i]
        changed.append(p)
        print(f"{'added' if adding else 'removed'}: {p}")
    if not changed:
        return 0
    if roots is not None and len(roots) > 3:
        roots.multiline(True)
    _write_document(path, doc)
    print(f"saved {path}")
    if loaded is None:
        from repd.cli import _overrides
        from repd.settings import load_settings

        loaded = load_settings(path, _overrides(args))
    print(tell_daemon(loaded.settings.store.path, path))
    if "REPD_ROOTS" in {k.upper() for k in os.environ}:
        print("note: REPD_ROOTS is set in this environment and overrides the file's roots "
              "for commands started from here", file=sys.stderr)
    return 0


def cmd_roots_add(args: argparse.Namespace) -> int:
    """Add folders to ``roots`` in the config file; tell a running daemon."""
    return _edit(args, adding=True)


def cmd_roots_remove(args: argparse.Namespace) -> int:
    """Remove folders from ``roots``; a running daemon drops their files from the index."""
    return _edit(args, adding=False)


def cmd_roots_list(args: argparse.Namespace) -> int:
    """Each root of the config file: does it exist, does the running daemon watch it."""
    path = config_path(args)
    roots = file_roots(path)
    data_dir: Path | None
    try:
        from repd.cli import _overrides
        from repd.settings import load_settings

        data_dir = load_settings(args.config, _overrides(args)).settings.store.path
    except ConfigError:
        data_dir = None  # still list what the file says
    watched = daemon_roots(args, data_dir)
    rows: list[dict[str, Any]] = [
        {"path": str(r), "exists": r.is_dir(),
         "watched": None if watched is None else r in watched} for r in roots]
    extra = [str(r) for r in (watched or []) if r not in roots]
    if args.json:
        print(json.dumps({"config_file": str(path), "config_file_exists": path.exists(),
                          "roots": rows, "daemon_answers": watched is not None,
                          "watched_not_in_config": extra}, indent=2))
        return 0
    from repd.textsafe import printable

    state = "" if path.exists() else " (not present yet)"
    print(f"# config file: {path}{state}")
    if not rows:
        print("no roots configured: add one with `repd roots add PATH`")
    for row in rows:
        words = ["exists" if row["exists"] else "MISSING (not a folder)"]
        if row["watched"] is not None:
            words.append("watched" if row["watched"] else "not watched by the daemon")
        print(f"{printable(str(row['path']))}  {', '.join(words)}")
    if watched is None:
        print("# no daemon answers: `watched` is unknown")
    for folder in extra:
        print(f"{printable(folder)}  watched by the daemon, not in the config")
    return 0


def index_tip(paths: list[Path], configured: list[Path]) -> str | None:
    """The one-line tip ``repd index`` prints for folders no root covers, or None."""
    def covered(p: Path) -> bool:
        return any(p == r or r in p.parents for r in configured)

    loose = [p for p in paths if not covered(p)]
    if not loose:
        return None
    import shlex

    words = " ".join(shlex.quote(str(p)) for p in loose)
    return (f"tip: `repd roots add {words}` keeps {'it' if len(loose) == 1 else 'them'} "
            "watched by `repd run` and the service")


def add_roots_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``repd roots add|remove|list``."""
    roots = sub.add_parser("roots", help="the folders `repd run` and the service watch "
                           "(saved in the config file)")
    from repd.cli_service import subcommand_help

    roots.set_defaults(func=subcommand_help(roots))
    roots_sub = roots.add_subparsers(dest="roots_command", metavar="ACTION")
    add = roots_sub.add_parser("add", parents=[common],
                               help="add folders to roots (and tell a running daemon)")
    add.add_argument("paths", nargs="+", metavar="PATH")
    add.set_defaults(func=cmd_roots_add)
    rm = roots_sub.add_parser("remove", parents=[common],
                              help="remove folders from roots (a running daemon drops "
                              "their files from the index)")
    rm.add_argument("paths", nargs="+", metavar="PATH")
    rm.set_defaults(func=cmd_roots_remove)
    ls = roots_sub.add_parser("list", parents=[common],
                              help="each root: does it exist, does the daemon watch it")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--timeout", type=float, default=5.0,
                    help="seconds to wait for the daemon's status (default 5)")
    ls.set_defaults(func=cmd_roots_list)
