"""``repd service install|uninstall|status``: repd as a systemd user service.

``install`` writes the unit the options describe (ExecStart= carries ``--data-dir``,
``--socket``, ``--model``, ``--device`` and the log options; ``--config`` or
``REPD_CONFIG`` becomes ``Environment=REPD_CONFIG=``; the sandbox's ``ReadWritePaths=``
names the data folder and the socket's folder), and refuses a service that could only
exit 2 (no roots). Every systemctl call goes through
:func:`repd.adapters.systemd_unit._run`, which the tests replace.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from repd.errors import EXIT_CONFIG, EXIT_ERROR, EXIT_NO_DAEMON

#: Where PrivateTmp=yes gives the service its own empty folders.
_PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))


def _runner() -> Any:
    # Looked up at call time so that tests can replace the one function.
    from repd.adapters import systemd_unit

    return systemd_unit._run


def _under_private_tmp(path: Path) -> bool:
    return any(path == t or t in path.parents for t in _PRIVATE_TMP)


class RefusedError(Exception):
    """Installing would give a service that cannot work; exit 2 with this line."""


def plan_options(args: argparse.Namespace, environ: dict[str, str] | None = None) -> tuple[
        Any, list[Path], list[str]]:
    """The unit's options, the roots the service will read, and warnings to print.

    Raises ConfigError for a config that does not load and RefusedError for a service that
    would exit 2 at once, or write where its sandbox makes it lose the files.
    """
    from repd.adapters.systemd_unit import UnitOptions
    from repd.cli import _overrides
    from repd.cli_roots import file_roots, normalise
    from repd.settings import load_settings

    env = dict(os.environ if environ is None else environ)
    home = Path(env.get("HOME") or Path.home())
    loaded = load_settings(args.config, _overrides(args))  # validates every option
    settings = loaded.settings
    config = normalise(loaded.config_file)
    warnings: list[str] = []
    run_args: list[str] = []

    # The user manager reads ~/.config/repd/config.toml unless told otherwise: pin the
    # file this shell's repd reads (and `repd roots add` edits) whenever it is another.
    pinned = None if config == home / ".config" / "repd" / "config.toml" else str(config)

    data_dir = normalise(settings.store.path)
    default_data = home / ".local" / "share" / "repd"
    unit_data: str | None = None
    if data_dir != default_data:
        run_args += ["--data-dir", str(data_dir)]
        unit_data = str(data_dir)

    writable: list[str] = []
    sock_path: Path | None = None
    if getattr(args, "socket", None) or loaded.sources.get("api.socket", "default") != "default":
        sock_path = normalise(settings.api.socket)
        run_args += ["--socket", str(sock_path)]
        writable.append(str(sock_path.parent))

    if getattr(args, "model", None):
        model = args.model
        run_args += ["--model", str(normalise(model)) if Path(model).exists() else model]
    for flag, attr in (("--device", "device"), ("--log-format", "log_format"),
                       ("--log-level", "log_level")):
        value = getattr(args, attr, None)
        if value:
            run_args += [flag, str(value)]

    shell_only = sorted(k for k in env if k.upper().startswith("REPD_")
                        and k.upper() not in ("REPD_CONFIG", "REPD_STORE__PATH",
                                              "REPD_API__SOCKET"))
    if shell_only:
        warnings.append("not passed to the service (it does not inherit this shell's "
                        f"environment): {', '.join(shell_only)}; put them in {config}")

    roots = file_roots(config)
    sandboxed = not getattr(args, "no_sandbox", False)
    if sandboxed:
        hidden = [f"{what} {p}" for what, p in (
            ("the data folder", data_dir), ("the config file", config),
            ("the API socket", sock_path)) if p is not None and _under_private_tmp(p)
            and (what != "the config file" or pinned or config.exists())]
        if hidden:
            raise RefusedError(f"{'; '.join(hidden)}: under /tmp or /var/tmp, which the service's "
                          "sandbox (PrivateTmp=yes) replaces with an empty folder of its own; "
                          "move it, or install with --no-sandbox")
        for r in roots:
            if _under_private_tmp(r):
                warnings.append(f"root {r} is under /tmp or /var/tmp, which the service's "
                                "sandbox hides: it will be empty there")
    if not roots and not args.allow_no_roots:
        raise RefusedError(f"no roots in {config}: the service would exit 2 at once and never "
                      "restart; add folders with `repd roots add PATH...` first (or pass "
                      "--allow-no-roots and add them later, then `systemctl --user "
                      "restart repd`)")
    for r in roots:
        if not r.is_dir():
            warnings.append(f"root {r} is not a folder: the service exits 2 until it exists "
                            f"or `repd roots remove {r}`")
    options = UnitOptions(run_args=tuple(run_args), config=pinned, data_dir=unit_data,
                          writable=tuple(writable))
    return options, roots, warnings


def cmd_service_install(args: argparse.Namespace) -> int:
    """Install and enable the systemd user unit, honouring every option given."""
    from repd.adapters.systemd_unit import UnitInstallError, install_user_unit

    try:
        options, roots, warnings = plan_options(args)
    except RefusedError as exc:
        print(f"repd: refusing to install the service: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    try:
        report = install_user_unit(dry_run=args.dry_run,
                                   sandbox=False if args.no_sandbox else None,
                                   runner=_runner(), options=options)
    except UnitInstallError as exc:
        print(f"repd: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(report, end="")
    if roots:
        print("roots: " + ", ".join(str(r) for r in roots)
              + "   (change them with `repd roots add|remove`; the service reloads)")
    return 0


def cmd_service_uninstall(args: argparse.Namespace) -> int:
    """Stop, disable and remove the user unit; the index and the config stay."""
    from repd.adapters.systemd_unit import UnitInstallError, uninstall_user_unit

    try:
        print(uninstall_user_unit(args.dry_run, runner=_runner()), end="")
    except UnitInstallError as exc:
        print(f"repd: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def cmd_service_status(args: argparse.Namespace) -> int:
    """What systemd says about the service, then the daemon's own status if it answers.

    Exits 0 when the service is active, 3 when it is not (or not installed).
    """
    import shlex

    from repd.adapters.systemd_unit import UNIT_NAME, status_commands, user_unit_dir

    if args.dry_run:
        print("dry run: nothing is changed")
        for argv in status_commands():
            print("would run: " + shlex.join(argv))
        print("would ask the daemon: repd status")
        return 0
    from repd.adapters.systemd_unit import user_unit_state

    state = user_unit_state(runner=_runner())
    where = user_unit_dir() / UNIT_NAME
    print(f"unit file: {where}" + ("" if state.installed else " (not installed: "
                                   "`repd service install`)"))
    print(f"systemd:   {state.active}")
    if state.details:
        print(state.details)
    from repd.api.client import DaemonNotRunning
    from repd.cli_daemon import _call
    from repd.errors import RepdError

    print()
    try:
        st = _call(args, "status")
    except DaemonNotRunning:
        print("daemon:    no daemon answers on its socket")
    except RepdError as exc:
        print(f"daemon:    {exc}")
    else:
        from repd.cli_status import render_status

        print(render_status(st))
    return 0 if state.active in ("active", "reloading") else EXIT_NO_DAEMON


def subcommand_help(parser: argparse.ArgumentParser) -> Any:
    """A command that prints ``parser``'s help and exits 2 (an action is missing)."""

    def show(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2
    return show


def add_service_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``repd service install|uninstall|status``."""
    svc = sub.add_parser("service", help="the systemd user service: install, uninstall, "
                         "status")
    svc.set_defaults(func=subcommand_help(svc))
    svc_sub = svc.add_subparsers(dest="service_command", metavar="ACTION")
    dry = argparse.ArgumentParser(add_help=False)
    dry.add_argument("--dry-run", action="store_true", help="print what it would do; "
                     "change nothing")
    inst = svc_sub.add_parser(
        "install", parents=[common, dry],
        help="install, enable and start the systemd user unit (the options given go into "
        "the unit: ExecStart=, ReadWritePaths=, REPD_CONFIG)")
    inst.add_argument("--no-sandbox", action="store_true",
                      help="leave out the mount-namespace hardening (for hosts without "
                      "user namespaces)")
    inst.add_argument("--allow-no-roots", action="store_true",
                      help="install even though no roots are configured (the service "
                      "exits 2 until some are)")
    inst.set_defaults(func=cmd_service_install)
    un = svc_sub.add_parser("uninstall", parents=[dry],
                            help="stop, disable and remove the user unit (the index and "
                            "the config stay)")
    un.set_defaults(func=cmd_service_uninstall)
    st = svc_sub.add_parser("status", parents=[common, dry],
                            help="systemd's view of the service, and the daemon's status "
                            "(exit 3 when not active)")
    st.add_argument("--timeout", type=float, default=5.0,
                    help="seconds to wait for the daemon's answer (default 5)")
    st.set_defaults(func=cmd_service_status)

