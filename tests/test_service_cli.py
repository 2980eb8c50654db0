"""``repd service install|uninstall|status`` and ``api.socket_group``.

No systemd runs here: every systemctl call goes through ``systemd_unit._run``, which these
tests replace with a recorder; the units it writes are checked with ``systemd-analyze
verify`` and ``systemd-analyze security`` (the same ceilings as the shipped units).
"""

from __future__ import annotations

import grp
import logging
import os
import re
import stat
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import structlog

from repd import cli_service
from repd.adapters import systemd_unit
from repd.adapters.systemd_unit import UnitOptions, render_user_unit, unit_template
from repd.cli import main
from tests.test_systemd_units import SECURITY_SCORES, parse_unit, real_repd, systemd_analyze, verify


class Recorder:
    """Stands in for systemctl: records each call, answers from ``replies``."""

    def __init__(self, replies: dict[str, tuple[int, str]] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.replies = replies or {}

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        for needle, (rc, out) in self.replies.items():
            if needle in " ".join(argv):
                return subprocess.CompletedProcess(list(argv), rc, out, "")
        return subprocess.CompletedProcess(list(argv), 0, "", "")


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """`main()` in this process configures logging onto pytest's captured stderr, which
    is closed after the test: put back what later tests log through."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    structlog.configure(**config)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home with its XDG folders, and this process's environment pointed at it."""
    h = tmp_path / "home"
    h.mkdir()
    for key in list(os.environ):
        if key.startswith("REPD_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(h / ".config"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(h / "run"))
    # The test's folders are under /tmp, which the unit's PrivateTmp= would hide; the
    # refusal itself is tested below with the real list.
    monkeypatch.setattr(cli_service, "_PRIVATE_TMP", (Path("/nonexistent-private-tmp"),))
    return h


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(systemd_unit, "_run", rec)
    return rec


def write_roots(home: Path, *roots: Path, extra: str = "") -> Path:
    cfg = home / ".config" / "repd" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("roots = [" + ", ".join(f'"{r}"' for r in roots) + "]\n" + extra)
    return cfg


def unit_file(home: Path) -> Path:
    return home / ".config" / "systemd" / "user" / "repd.service"


def security_score(unit: Path) -> float:
    done = subprocess.run([systemd_analyze(), "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout[-2000:] + done.stderr[-2000:]
    return float(found.group(1))


# --- install ------------------------------------------------------------------------------


def test_install_honours_every_option(home: Path, runner: Recorder, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    # Awkward names: a space, "$" (variable expansion) and "%" (specifiers) must survive.
    data = tmp_path / "my data $HOME 100%"
    sock = tmp_path / "sock dir" / "repd.sock"
    cfg = tmp_path / "elsewhere.toml"
    cfg.write_text(f'# my settings\nroots = ["{notes}"]\n')
    model = tmp_path / "model dir"
    model.mkdir()
    code = main(["service", "install", "--config", str(cfg), "--data-dir", str(data),
                 "--socket", str(sock), "--model", str(model), "--device", "cpu",
                 "--log-level", "debug", "--log-format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    path = unit_file(home)
    text = path.read_text()
    unit = parse_unit(text)["Service"]
    exe = real_repd()
    assert unit["ExecStart"] == [
        f'{exe} run --data-dir "{tmp_path}/my data $$HOME 100%%" '
        f'--socket "{tmp_path}/sock dir/repd.sock" --model "{tmp_path}/model dir" '
        "--device cpu --log-format json --log-level debug"]
    assert f"REPD_CONFIG={cfg}" in unit["Environment"]
    assert unit["ReadWritePaths"] == [
        f'"-{tmp_path}/my data $HOME 100%%" "-{tmp_path}/sock dir" -%h/.cache']
    assert unit["ExecStartPre"] == [
        f'+/bin/mkdir -p "{tmp_path}/my data $$HOME 100%%" "{tmp_path}/sock dir"']
    # All hardening kept: only ExecStart=, Environment=, ReadWritePaths= and the mkdir differ.
    shipped = parse_unit(render_user_unit(unit_template(), str(exe)))["Service"]
    assert {k for k in set(shipped) | set(unit) if shipped.get(k) != unit.get(k)} == {
        "ExecStart", "Environment", "ReadWritePaths", "ExecStartPre"}
    # verify's runtime folder goes next to the unit: keep it short for socket paths.
    short = tmp_path / "repd.service"
    short.write_text(text)
    verify(short, user=True, home=home)
    assert security_score(short) <= SECURITY_SCORES["user"][1]
    assert data.is_dir()  # created now, as the default data folder is
    assert [c[:3] for c in runner.calls] == [
        ["systemctl", "--user", "show-environment"],
        ["systemd-run", "--user", "--wait"],
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "try-restart"],
        ["systemctl", "--user", "enable"],
    ]
    assert f"roots: {notes}" in out


def test_install_with_defaults_is_the_shipped_unit(home: Path, runner: Recorder,
                                                   tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    write_roots(home, notes)
    assert main(["service", "install"]) == 0
    # Same bytes as deploy/install-user-service.sh writes (tests/test_systemd_units.py).
    assert unit_file(home).read_text() == render_user_unit(unit_template(), str(real_repd()))


def test_config_in_the_environment_is_pinned_in_the_unit(
        home: Path, runner: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # `repd roots add` edits the file REPD_CONFIG names; the user manager would read
    # ~/.config/repd/config.toml: the unit must name the same file.
    notes = tmp_path / "notes"
    notes.mkdir()
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'roots = ["{notes}"]\n')
    monkeypatch.setenv("REPD_CONFIG", str(cfg))
    monkeypatch.setenv("REPD_BATCH_TOKENS", "1024")
    assert main(["service", "install", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert f"\nEnvironment=REPD_CONFIG={cfg}\n" in out
    assert f"ExecStart={real_repd()} run\n" in out
    # The service does not inherit this shell: say which variables it will not see.
    assert "not passed to the service" in err and "REPD_BATCH_TOKENS" in err
    assert "REPD_CONFIG" not in err
    assert runner.calls == []
    assert not unit_file(home).exists()


def test_no_roots_is_refused(home: Path, runner: Recorder,
                             capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["service", "install"], ["service", "install", "--dry-run"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "refusing to install the service: no roots in" in err
        assert "repd roots add" in err
    assert runner.calls == []
    assert not unit_file(home).exists()
    assert main(["service", "install", "--allow-no-roots"]) == 0
    assert unit_file(home).exists()


def test_paths_the_sandbox_would_hide_are_refused(
        home: Path, runner: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli_service, "_PRIVATE_TMP", (Path("/tmp"), Path("/var/tmp")))
    notes = tmp_path / "notes"
    notes.mkdir()
    write_roots(home, notes)
    assert main(["service", "install", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert f"the data folder {tmp_path / 'data'}" in err and "PrivateTmp=yes" in err
    assert runner.calls == [] and not unit_file(home).exists()
    # Without the sandbox there is no private /tmp.
    assert main(["service", "install", "--data-dir", str(tmp_path / "data"),
                 "--no-sandbox"]) == 0
    assert f"--data-dir {tmp_path}/data" in unit_file(home).read_text()


def test_dry_run_shows_the_unit_and_changes_nothing(
        home: Path, runner: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    write_roots(home, notes)
    before = sorted(p for p in home.rglob("*"))
    assert main(["service", "install", "--dry-run", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing is changed" in out
    assert f"ExecStart={real_repd()} run --device cpu\n" in out
    assert "would run: systemctl --user enable --now repd.service" in out
    assert runner.calls == []
    assert sorted(p for p in home.rglob("*")) == before


def test_bad_options_are_config_errors(home: Path, runner: Recorder, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    write_roots(home, tmp_path)
    assert main(["service", "install", "--device", "tpu"]) == 2
    assert "device" in capsys.readouterr().err
    assert main(["service", "install", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert runner.calls == []


# --- uninstall and status -----------------------------------------------------------------


def test_uninstall_stops_disables_removes_and_keeps_the_data(
        home: Path, runner: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    cfg = write_roots(home, notes)
    assert main(["service", "install"]) == 0
    data = home / ".local" / "share" / "repd"
    (data / "manifest.sqlite").write_text("stand-in")
    capsys.readouterr()
    runner.calls.clear()

    assert main(["service", "uninstall", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would run: systemctl --user disable --now repd.service" in out
    assert runner.calls == [] and unit_file(home).exists()

    assert main(["service", "uninstall"]) == 0
    out = capsys.readouterr().out
    assert runner.calls == [
        ["systemctl", "--user", "show-environment"],
        ["systemctl", "--user", "disable", "--now", "repd.service"],
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "reset-failed", "repd.service"],
    ]
    assert not unit_file(home).exists()
    assert (data / "manifest.sqlite").read_text() == "stand-in" and cfg.exists()
    assert "left alone: the data folder" in out

    runner.calls.clear()
    assert main(["service", "uninstall"]) == 0
    assert "is not installed" in capsys.readouterr().out
    assert runner.calls == []


def test_uninstall_keeps_the_unit_when_systemctl_fails(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    write_roots(home, tmp_path)
    monkeypatch.setattr(systemd_unit, "_run", Recorder())
    assert main(["service", "install"]) == 0
    monkeypatch.setattr(systemd_unit, "_run", Recorder({"disable": (1, "")}))
    assert main(["service", "uninstall"]) == 1
    assert "unit file was left in place" in capsys.readouterr().err
    assert unit_file(home).exists()


@pytest.mark.parametrize(("active", "code"), [("active", 0), ("failed", 3), ("inactive", 3)])
def test_status_reports_systemd_and_the_daemon(
        home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        active: str, code: int) -> None:
    rec = Recorder({"is-active": (0 if active == "active" else 3, active + "\n"),
                    "status": (0, "● repd.service - repd: live semantic index\n   Active: x\n")})
    monkeypatch.setattr(systemd_unit, "_run", rec)
    assert main(["service", "status"]) == code
    out = capsys.readouterr().out
    assert f"systemd:   {active}" in out
    assert "● repd.service" in out
    assert "(not installed" in out
    assert "no daemon answers" in out
    assert [c[2] for c in rec.calls] == ["is-active", "status"]


def test_status_dry_run_runs_nothing(home: Path, runner: Recorder,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["service", "status", "--dry-run"]) == 0
    assert "would run: systemctl --user is-active repd.service" in capsys.readouterr().out
    assert runner.calls == []


def test_systemctl_missing_is_a_clear_error(home: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # The real runner, with no systemctl on PATH.
    write_roots(home, tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["service", "install", "--no-sandbox"]) == 1
    err = capsys.readouterr().err
    assert "no systemd user manager is reachable (systemctl: not found" in err


# --- the rendered unit with options, sandbox on -------------------------------------------


def test_rendered_options_verify_with_and_without_sandbox(tmp_path: Path) -> None:
    opts = UnitOptions(run_args=("--data-dir", "/srv/repd data", "--device", "cuda:1"),
                       config="/etc/my repd.toml", data_dir="/srv/repd data",
                       writable=("/run/user/1000/other",))
    for sandbox in (True, False):
        unit = tmp_path / f"{sandbox:d}" / "repd.service"
        unit.parent.mkdir()
        unit.write_text(render_user_unit(unit_template(), str(real_repd()), sandbox=sandbox,
                                         options=opts))
        verify(unit, user=True)
        service = parse_unit(unit.read_text())["Service"]
        assert service["ExecStart"] == [
            f'{real_repd()} run --data-dir "/srv/repd data" --device cuda:1']
        assert '"REPD_CONFIG=/etc/my repd.toml"' in service["Environment"]
        assert ("ReadWritePaths" in service) is sandbox


# --- api.socket_group ---------------------------------------------------------------------


def _a_group() -> grp.struct_group:
    """A group that is not this process's primary one, which this process may use."""
    if os.geteuid() == 0:
        return grp.getgrnam("users")
    others = [g for g in os.getgroups() if g != os.getegid()]
    if not others:
        pytest.fail("this test needs root or a supplementary group")
    return grp.getgrgid(others[0])


def test_socket_group_makes_the_socket_0660_and_its_folder_0750(tmp_path: Path) -> None:
    from tests.daemon_harness import DaemonProc, wait_for

    group = _a_group()
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.md").write_text("Basalt columns form as lava cools.\n")
    daemon = DaemonProc(tmp_path / "home", [root],
                        extra_env={"REPD_API__SOCKET_GROUP": group.gr_name})
    # The folder exists already, private, as a user's runtime folder would.
    daemon.socket.parent.mkdir(parents=True, mode=0o700)
    daemon.start(wait_idle=False)
    try:
        # The API is up before the model loads.
        wait_for(lambda: daemon.socket.exists(), 60, "the API socket")
        st = daemon.socket.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, group.gr_gid)
        folder = daemon.socket.parent.stat()
        assert (stat.S_IMODE(folder.st_mode), folder.st_gid) == (0o750, group.gr_gid)
        lock = daemon.socket.with_name("repd.sock.lock").stat()
        assert stat.S_IMODE(lock.st_mode) == 0o600  # the lock stays the owner's
        assert wait_for(lambda: daemon.status()["state"], 60, "an answer")
    finally:
        assert daemon.stop(timeout=180) == 0
    assert not daemon.socket.exists()


def test_unknown_socket_group_is_a_config_error(tmp_path: Path) -> None:
    from tests.daemon_harness import DaemonProc

    root = tmp_path / "root"
    root.mkdir()
    daemon = DaemonProc(tmp_path / "home", [root],
                        extra_env={"REPD_API__SOCKET_GROUP": "no-such-group-repd"})
    daemon.start(wait_idle=False)
    assert daemon.proc is not None
    code = daemon.proc.wait(120)
    daemon.stop()
    log = daemon.log.read_text()
    assert code == 2, log[-2000:]
    assert "api.socket_group: there is no group 'no-such-group-repd'" in log
    assert not daemon.socket.exists()

