"""Installing repd's systemd user unit: render the packaged template, write it, enable it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
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


def render_user_unit(template: str, repd_path: str, *, sandbox: bool = True) -> str:
    """The unit text to install: ExecStart= runs ``repd_path``; optionally no sandbox block.

    ``deploy/install-user-service.sh`` produces byte-identical output (a test holds both
    to that), so whichever way a person installs, they get the same unit.
    """
    out: list[str] = []
    exec_lines = 0
    in_sandbox = False
    for line in template.splitlines():
        if line.startswith("ExecStart="):
            line = f"ExecStart={escape_exec_path(repd_path)} run"
            exec_lines += 1
        elif line == SANDBOX_BEGIN:
            in_sandbox = True
            if not sandbox:
                out.extend([line, SANDBOX_DISABLED_NOTE])
                continue
        elif line == SANDBOX_END:
            in_sandbox = False
        elif in_sandbox and not sandbox and line and not line.startswith("#"):
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
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=600)


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
) -> str:
    """Install, enable and start repd as a systemd user service; return a report.

    The same steps as ``deploy/install-user-service.sh``: write the unit to
    ``~/.config/systemd/user/repd.service`` with ExecStart= pointing at this repd,
    ``systemctl --user daemon-reload``, ``try-restart`` (so a reinstall takes effect),
    ``enable --now``. ``sandbox=None`` test-runs the sandbox block and keeps it only if
    that works; True or False forces it. ``dry_run`` changes nothing, runs nothing and
    reports what would happen, including the unit text. Raises UnitInstallError.
    """
    env = os.environ if environ is None else environ
    exe = repd_path if repd_path is not None else find_repd(env)
    unit_path = user_unit_dir(env) / UNIT_NAME
    home = Path(env.get("HOME") or Path.home())
    data_dir = home / ".local" / "share" / "repd"
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
        report.append(render_user_unit(unit_template(), str(exe), sandbox=keep).rstrip("\n"))
        report.append(f"would create {data_dir}")
        report.extend("would run: " + shlex.join(argv) for argv in steps)
        return "\n".join(report) + "\n"

    if runner(["systemctl", "--user", "show-environment"]).returncode != 0:
        raise UnitInstallError(
            "no systemd user manager is reachable: log in normally (not via su or sudo),"
            " or export XDG_RUNTIME_DIR=/run/user/$(id -u) and try again"
        )
    keep = probe_sandbox(runner) if sandbox is None else sandbox
    if not keep:
        report.append(
            "sandbox: this system refused a test run of the mount-namespace lines (user"
            " namespaces unavailable); installed with that block commented out"
            if sandbox is None
            else "sandbox: commented out as asked"
        )
    text = render_user_unit(unit_template(), str(exe), sandbox=keep)
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
