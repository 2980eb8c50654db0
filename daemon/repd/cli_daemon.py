"""``repd`` subcommands that run the daemon or talk to it over the local API."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from repd.errors import EXIT_DEGRADED, EXIT_NO_DAEMON

#: Seconds ``repd status`` and the actions wait for the daemon's answer.
DEFAULT_TIMEOUT_S = 10.0


def _client(args: argparse.Namespace) -> Any:
    from repd.api.client import ApiClient
    from repd.cli import _load

    # The whole config is read and checked (about 0.2 s more than reading only the
    # socket's name): a broken config is exit 2 here as for every other command, and
    # not a status that looks fine until the next restart of the daemon fails.
    socket = _load(args).settings.api.socket
    return ApiClient(socket, timeout=getattr(args, "timeout", DEFAULT_TIMEOUT_S))


def _call(args: argparse.Namespace, fn: str, *a: Any) -> Any:
    # The client's errors are RepdErrors (no daemon: 3, no answer in time: 75, a refused
    # request: 2 or 1); `repd.cli.main` prints them as one line with that exit code.
    return getattr(_client(args), fn)(*a)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground (this is what systemd starts)."""
    from repd.cli import _load, _overrides

    loaded = _load(args)
    from repd.app import Daemon

    roots = [Path(os.path.abspath(p)) for p in args.paths] or None
    return Daemon(loaded, args.config, _overrides(args), roots).run()


def cmd_status(args: argparse.Namespace) -> int:
    """Show the daemon's status; exits 3 when none answers and 4 when it is degraded."""
    from repd.api.client import DaemonNotRunning

    try:
        st = _call(args, "status")
    except DaemonNotRunning as exc:
        if not args.json:
            raise
        # Scripts and monitors read one shape whatever happens.
        print(json.dumps({"state": "down", "error": str(exc)}, indent=2))
        return EXIT_NO_DAEMON
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        from repd.cli_output import output_width
        from repd.cli_status import render_status

        print(render_status(st, output_width(None)))
    # Both say the index is not keeping up and will not by itself until someone acts.
    return EXIT_DEGRADED if st.get("state") in ("degraded", "disk_full") else 0


def _action(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        extra = [getattr(args, "path", None)] if name == "reindex" else []
        if extra and extra[0] is not None:
            extra = [os.path.abspath(extra[0])]
        res = _call(args, name, *extra)
        print(res.get("message", "ok"))
        return 0
    return run


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the machine: inotify limits, device, model, store, socket."""
    from repd.cli import _load
    from repd.doctor import run_checks

    loaded = _load(args)
    ok = True
    for check in run_checks(loaded.settings, load_model=not args.quick):
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[check.level]
        print(f"[{mark}] {check.name}: {check.message}")
        ok = ok and check.level != "fail"
    return 0 if ok else 1


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Open the terminal dashboard."""
    from repd_tui.app import main as tui_main

    argv = []
    if args.config:
        argv += ["--config", str(args.config)]
    if args.socket:
        argv += ["--socket", str(args.socket)]
    return tui_main(argv)


def add_daemon_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register the daemon-facing subcommands."""
    dash = sub.add_parser("dashboard", parents=[common], help="the terminal dashboard")
    dash.set_defaults(func=cmd_dashboard)

    run = sub.add_parser("run", parents=[common],
                         help="run the daemon in the foreground (for systemd)")
    run.add_argument("paths", nargs="*", help="folders to watch (default: roots in the config)")
    run.set_defaults(func=cmd_run)

    timeout = argparse.ArgumentParser(add_help=False)
    timeout.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                         help=f"seconds to wait for the daemon's answer (default "
                         f"{DEFAULT_TIMEOUT_S:g})")
    st = sub.add_parser("status", parents=[common, timeout], help="the running daemon's status "
                        "(exit 3: no daemon answers, 4: it is degraded)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    for name, text in (("pause", "stop indexing (changes keep queueing)"),
                       ("resume", "resume indexing")):
        p = sub.add_parser(name, parents=[common, timeout], help=text)
        p.set_defaults(func=_action(name))
    ri = sub.add_parser("reindex", parents=[common, timeout],
                        help="re-read a file or folder (or everything), even if unchanged")
    ri.add_argument("path", nargs="?")
    ri.set_defaults(func=_action("reindex"))

    doc = sub.add_parser("doctor", parents=[common], help="check this machine's set-up")
    doc.add_argument("--quick", action="store_true", help="do not load the model")
    doc.set_defaults(func=cmd_doctor)

    from repd.cli_roots import add_roots_commands
    from repd.cli_service import add_service_commands

    add_roots_commands(sub, common)
    add_service_commands(sub, common)
