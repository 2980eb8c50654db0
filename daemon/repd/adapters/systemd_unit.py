"""repd's systemd user unit: render the packaged template, install, uninstall, inspect.

Every ``systemctl`` (and ``systemd-run``) call goes through one :data:`Runner`, so the
tests can stand in for a user manager that this machine may not have.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

UNIT_NAME = "repd.service"
SANDBOX_BEGIN = "# >>> sandbox"
SANDBOX_END = "# <<< sandbox"
SANDBOX_DISABLED_NOTE = (
    "# Commented out by the installer: no usable user namespaces here, or --no-sandbox."
)
# The mount-namespace directives of the sandbox block, test-run before installing.
SANDBOX_PROBE_PROPERTIES = (
    "ProtectSystem=strict",
    "ProtectHome=read-only",
    "PrivateTmp=yes",
    "PrivateMounts=yes",
    "PrivateUsers=yes",
    "PrivateNetwork=yes",
    "ProtectHostname=yes",
    "ProtectProc=invisible",
    "ProcSubset=pid",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
)

#: The folder the template makes writable and creates: the default data folder.
TEMPLATE_DATA_DIR = "%h/.local/share/repd"

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


class UnitInstallError(Exception):
    """The user unit could not be installed; the message says why and what to do."""


def unit_template() -> str:
    """The user unit as shipped in the package (identical to ``deploy/repd.service``)."""
    return resources.files("repd").joinpath("data", UNIT_NAME).read_text(encoding="utf-8")


def escape_exec_path(path: str) -> str:
    """Write ``path`` as the first word of an ``ExecStart=`` line, escaped for systemd."""
    # systemd refuses program paths holding quotes, backslashes or control characters
    # ("Executable name contains special characters"): say so now, not at start-up.
    if re.search(r"[\"'\\\x00-\x1f\x7f]", path):
        raise UnitInstallError(
            f"systemd cannot run a program whose path contains quotes, backslashes or"
            f" control characters: {path!r}; install repd elsewhere"
        )
    # %specifiers are expanded in the whole line; $VARIABLES only in the arguments,
    # never in the program's path, so "$" stays as it is.
    text = path.replace("%", "%%")
    return f'"{text}"' if " " in text else text


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _refuse_control(what: str, value: str) -> None:
    if _CONTROL.search(value):
        raise UnitInstallError(f"{what} contains control characters, which a unit file "
                               f"cannot hold: {value!r}")


def escape_exec_arg(arg: str) -> str:
    """One argument of an ``Exec*=`` line (after the program), escaped for systemd.

    In arguments systemd expands ``%`` specifiers and ``$VARIABLES`` and reads C escapes
    inside quotes: ``%`` becomes ``%%``, ``$`` becomes ``$$``, and anything but plain
    characters is double-quoted with ``\\`` and ``\"`` escaped.
    """
    _refuse_control("an argument", arg)
    text = arg.replace("%", "%%").replace("$", "$$")
    if text and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def escape_list_word(word: str) -> str:
    """One word of a space-separated path list (``ReadWritePaths=``, ``Environment=``).

    Specifiers are expanded there (``%%``), ``$`` is not, C escapes are read: quoted
    whenever it holds anything but plain characters.
    """
    _refuse_control("a path", word)
    text = word.replace("%", "%%")
    if text and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class UnitOptions:
    """What the installed unit must say beyond the template: every option honoured.

    ``run_args`` follow ``repd run`` on the ExecStart= line (paths already absolute);
    ``config`` becomes ``Environment=REPD_CONFIG=`` (a missing file is then an error,
    not an empty config); ``data_dir`` replaces the template's data folder in the
    sandbox's ``ReadWritePaths=`` and ``ExecStartPre=`` mkdir; ``writable`` are more
    folders made writable (and created) there, such as the API socket's folder.
    """

    run_args: tuple[str, ...] = ()
    config: str | None = None
    data_dir: str | None = None
    writable: tuple[str, ...] = ()

    @property
    def is_default(self) -> bool:
        """True when the unit is the template's, with only ExecStart='s program changed."""
        return self == UnitOptions()


def render_user_unit(template: str, repd_path: str, *, sandbox: bool = True,
                     options: UnitOptions | None = None) -> str:
    """The unit text to install: ExecStart= runs ``repd_path``; optionally no sandbox block.

    With default ``options`` ``deploy/install-user-service.sh`` produces byte-identical
    output (a test holds both to that), so whichever way a person installs, they get the
    same unit.
    """
    opts = options or UnitOptions()
    data_dir = opts.data_dir or TEMPLATE_DATA_DIR
    made = [data_dir, *opts.writable]
    out: list[str] = []
    exec_lines = 0
    in_sandbox = False
    for line in template.splitlines():
        if line.startswith("ExecStart="):
            words = [escape_exec_path(repd_path), "run", *map(escape_exec_arg, opts.run_args)]
            out.append("ExecStart=" + " ".join(words))
            exec_lines += 1
            if opts.config is not None:
                out.append("# From `repd service install --config` (or REPD_CONFIG): a "
                           "missing file is an error.")
                out.append("Environment=" + escape_list_word(f"REPD_CONFIG={opts.config}"))
            continue
        if line == SANDBOX_BEGIN:
            in_sandbox = True
            if not sandbox:
                out.extend([line, SANDBOX_DISABLED_NOTE])
                continue
        elif line == SANDBOX_END:
            in_sandbox = False
        elif in_sandbox and not opts.is_default:
            if line.startswith("ExecStartPre=+/bin/mkdir -p "):
                dirs = " ".join(d if d == TEMPLATE_DATA_DIR else escape_exec_arg(d)
                                for d in made)
                line = f"ExecStartPre=+/bin/mkdir -p {dirs}"
            elif line.startswith("ReadWritePaths="):
                rest = [w for w in line[len("ReadWritePaths="):].split()
                        if w != f"-{TEMPLATE_DATA_DIR}"]
                words = [f"-{d}" if d == TEMPLATE_DATA_DIR else escape_list_word(f"-{d}")
                         for d in made]
                line = "ReadWritePaths=" + " ".join(words + rest)
        if in_sandbox and not sandbox and line and not line.startswith("#"):
            line = "#" + line
        out.append(line)
    if exec_lines != 1:
        raise UnitInstallError(f"unit template has {exec_lines} ExecStart= lines, expected 1")
    return "\n".join(out) + "\n"


def find_repd(environ: Mapping[str, str] | None = None) -> Path:
    """The ``repd`` command the unit should run, as an absolute path.

    The console script next to the running interpreter comes first: that is the install
    whose code is running now (a venv or pipx environment), even when another ``repd``
    sits earlier on PATH. Otherwise the first ``repd`` on PATH, as the shell script does.
    """
    env = os.environ if environ is None else environ
    sibling = Path(sys.executable).parent / "repd"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return sibling.absolute()
    found = shutil.which("repd", path=env.get("PATH", os.defpath))
    if found is None:
        raise UnitInstallError(
            "repd is not on PATH: install it first (e.g. `pipx install repd`)"
            " or add its bin folder to PATH"
        )
    return Path(found).absolute()


def user_unit_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/systemd/user``, the user manager's own unit folder."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME", "")
    if not Path(base).is_absolute():
        # The XDG spec says relative values are invalid and must be ignored.
        base = str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "systemd" / "user"


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """The one place repd runs ``systemctl`` and ``systemd-run`` (tests pass their own)."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, check=False,
                              timeout=600)
    except FileNotFoundError:
        return subprocess.CompletedProcess(list(argv), 127, "",
                                           f"{argv[0]}: not found (this needs systemd)")


def probe_sandbox(runner: Runner = _run) -> bool:
    """Whether the user manager can start a service with the sandbox block's directives.

    Runs ``/bin/true`` as a transient user service with the same mount-namespace settings;
    where unprivileged user namespaces are blocked that start fails, and so would repd's.
    """
    argv = ["systemd-run", "--user", "--wait", "--quiet", "--collect"]
    for prop in SANDBOX_PROBE_PROPERTIES:
        argv += ["-p", prop]
    argv.append("/bin/true")
    try:
        return runner(argv).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def install_user_unit(
    dry_run: bool,
    *,
    sandbox: bool | None = None,
    repd_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    runner: Runner = _run,
    options: UnitOptions | None = None,
) -> str:
    """Install, enable and start repd as a systemd user service; return a report.

    The same steps as ``deploy/install-user-service.sh``: write the unit to
    ``~/.config/systemd/user/repd.service`` with ExecStart= pointing at this repd,
    ``systemctl --user daemon-reload``, ``try-restart`` (so a reinstall takes effect),
    ``enable --now``. ``sandbox=None`` test-runs the sandbox block and keeps it only if
    that works; True or False forces it. ``dry_run`` changes nothing, runs nothing and
    reports what would happen, including the unit text. ``options`` carries what the
    person asked for (see :class:`UnitOptions`). Raises UnitInstallError.
    """
    env = os.environ if environ is None else environ
    opts = options or UnitOptions()
    exe = repd_path if repd_path is not None else find_repd(env)
    unit_path = user_unit_dir(env) / UNIT_NAME
    home = Path(env.get("HOME") or Path.home())
    data_dir = Path(opts.data_dir) if opts.data_dir else home / ".local" / "share" / "repd"
    steps = [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "try-restart", UNIT_NAME],
        ["systemctl", "--user", "enable", "--now", UNIT_NAME],
    ]
    report = [f"repd:      {exe}", f"unit file: {unit_path}"]

    if dry_run:
        keep = sandbox is not False
        report.insert(0, "dry run: nothing is changed")
        if sandbox is None:
            report.append("would test-run the sandbox with systemd-run (shown kept below)")
        report.append(f"would write {unit_path}:")
        report.append(render_user_unit(unit_template(), str(exe), sandbox=keep,
                                       options=opts).rstrip("\n"))
        report.append(f"would create {data_dir}")
        report.extend("would run: " + shlex.join(argv) for argv in steps)
        return "\n".join(report) + "\n"

    _check_manager(runner)
    keep = probe_sandbox(runner) if sandbox is None else sandbox
    if not keep:
        report.append(
            "sandbox: this system refused a test run of the mount-namespace lines (user"
            " namespaces unavailable); installed with that block commented out"
            if sandbox is None
            else "sandbox: commented out as asked"
        )
    text = render_user_unit(unit_template(), str(exe), sandbox=keep, options=opts)
    try:
        unit_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = unit_path.with_name(UNIT_NAME + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(unit_path)
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnitInstallError(f"cannot write {unit_path}: {exc.strerror}") from None
    report.append(f"wrote {unit_path}")
    for argv in steps:
        done = runner(argv)
        if done.returncode != 0:
            detail = (done.stderr or done.stdout or "").strip()
            raise UnitInstallError(
                f"`{shlex.join(argv)}` failed ({done.returncode}): {detail}\n"
                "see: systemctl --user status repd; journalctl --user -u repd"
            )
        report.append("ran: " + shlex.join(argv))
    report.append("repd is running: systemctl --user status repd | journalctl --user -u repd -f")
    return "\n".join(report) + "\n"


def _check_manager(runner: Runner) -> None:
    done = runner(["systemctl", "--user", "show-environment"])
    if done.returncode != 0:
        why = (done.stderr or "").strip().splitlines()
        raise UnitInstallError(
            "no systemd user manager is reachable"
            + (f" ({why[-1]})" if why else "")
            + ": log in normally (not via su or sudo), or export"
            " XDG_RUNTIME_DIR=/run/user/$(id -u) and try again"
        )


def uninstall_user_unit(
    dry_run: bool,
    *,
    environ: Mapping[str, str] | None = None,
    runner: Runner = _run,
) -> str:
    """Stop and disable the user service, remove its unit file, daemon-reload; a report.

    The data folder, the config file and the index are left alone (the report says so).
    Idempotent: with no unit installed it says so and changes nothing. ``dry_run``
    reports the steps without running them.
    """
    env = os.environ if environ is None else environ
    unit_path = user_unit_dir(env) / UNIT_NAME
    keep_note = ("left alone: the data folder (the index), the config file and the "
                 "folders you index; delete them yourself if you want them gone")
    if not unit_path.exists():
        return f"{UNIT_NAME} is not installed ({unit_path} does not exist); nothing to do\n"
    disable = ["systemctl", "--user", "disable", "--now", UNIT_NAME]
    reload = ["systemctl", "--user", "daemon-reload"]
    reset = ["systemctl", "--user", "reset-failed", UNIT_NAME]
    if dry_run:
        return "\n".join([
            "dry run: nothing is changed",
            "would run: " + shlex.join(disable),
            f"would remove {unit_path}",
            "would run: " + shlex.join(reload),
            "would run: " + shlex.join(reset),
            keep_note,
        ]) + "\n"
    _check_manager(runner)
    report = []
    done = runner(disable)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout or "").strip()
        raise UnitInstallError(f"`{shlex.join(disable)}` failed ({done.returncode}): {detail}"
                               "; the unit file was left in place")
    report.append("ran: " + shlex.join(disable) + "   (stopped and disabled)")
    try:
        unit_path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UnitInstallError(f"cannot remove {unit_path}: {exc.strerror}") from None
    report.append(f"removed {unit_path}")
    for argv in (reload, reset):
        done = runner(argv)
        # reset-failed fails when the unit left no state behind: nothing to report.
        if done.returncode != 0 and argv is reload:
            detail = (done.stderr or done.stdout or "").strip()
            raise UnitInstallError(f"`{shlex.join(argv)}` failed ({done.returncode}): {detail}")
        if done.returncode == 0:
            report.append("ran: " + shlex.join(argv))
    report.append(keep_note)
    return "\n".join(report) + "\n"


@dataclass(frozen=True)
class UnitState:
    """What systemd says about the user service."""

    unit_path: Path
    installed: bool
    #: ``systemctl --user is-active``: active, inactive, failed, activating... or
    #: "unknown" when no user manager answers.
    active: str
    #: ``systemctl --user status`` output (its first lines), or why it is missing.
    details: str


def user_unit_state(
    *,
    environ: Mapping[str, str] | None = None,
    runner: Runner = _run,
    lines: int = 10,
) -> UnitState:
    """Ask the user manager about repd.service (``is-active`` and ``status``)."""
    env = os.environ if environ is None else environ
    unit_path = user_unit_dir(env) / UNIT_NAME
    active = runner(["systemctl", "--user", "is-active", UNIT_NAME])
    state = (active.stdout or "").strip().splitlines()
    word = state[0] if state else ""
    status = runner(["systemctl", "--user", "status", "--no-pager", f"--lines={lines}",
                     UNIT_NAME])
    details = (status.stdout or "").rstrip() or (status.stderr or "").strip()
    if not word:
        word = "unknown"
        details = details or (active.stderr or "").strip()
    return UnitState(unit_path, unit_path.exists(), word, details)


def status_commands(lines: int = 10) -> list[list[str]]:
    """The commands :func:`user_unit_state` runs (for ``--dry-run``)."""
    return [["systemctl", "--user", "is-active", UNIT_NAME],
            ["systemctl", "--user", "status", "--no-pager", f"--lines={lines}", UNIT_NAME]]
