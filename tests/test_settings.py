"""Settings: sources in order, provenance, and one clear line per config problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from repd.errors import ConfigError
from repd.settings import effective_items, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("REPD_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def test_defaults_without_file(tmp_path: Path) -> None:
    loaded = load_settings()
    assert not loaded.config_file_exists
    assert loaded.config_file == tmp_path / "cfg" / "repd" / "config.toml"
    assert loaded.settings.store.kind == "embedded"
    assert loaded.settings.store.path == tmp_path / "data" / "repd"
    assert all(src == "default" for src in loaded.sources.values())


def test_precedence_file_env_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "from-file"\ndevice = "cpu"\n[watch]\ndebounce_ms = 10\n'
                   'settle_ms = 20\n')
    monkeypatch.setenv("REPD_DEVICE", "cuda:1")
    monkeypatch.setenv("REPD_WATCH__SETTLE_MS", "30")
    loaded = load_settings(cfg, {"model": "from-cli"})
    s = loaded.settings
    assert (s.model, s.device, s.watch.debounce_ms, s.watch.settle_ms) == (
        "from-cli", "cuda:1", 10, 30)
    assert loaded.sources["model"] == "command line"
    assert loaded.sources["device"] == "environment"
    assert loaded.sources["watch.debounce_ms"] == f"file {cfg}"
    assert loaded.sources["watch.settle_ms"] == "environment"
    rows = {k: (v, src) for k, v, src in effective_items(loaded)}
    assert rows["device"] == ("cuda:1", "environment")


def test_repd_config_env_names_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "other.toml"
    cfg.write_text('roots = ["/srv/notes"]\n')
    monkeypatch.setenv("REPD_CONFIG", str(cfg))
    assert load_settings().settings.roots == [Path("/srv/notes")]


def test_every_problem_is_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('device = "tpu"\nbatch_tokens = 3\nbogus = 1\n[store]\nkind = "s3"\n')
    monkeypatch.setenv("REPD_MAX_FILE_BYTES", "-5")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 5, text
    assert "device: " in text and "batch_tokens: " in text and "bogus: unknown setting" in text
    # A value from the environment is named by its variable, the one a person would fix.
    assert "store.kind: " in text and "REPD_MAX_FILE_BYTES: " in text
    assert "(from environment)" in text


def test_malformed_toml_and_missing_explicit_file(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text("model = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "absent.toml")


def test_secrets_are_masked(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[api]\ntoken = "s3cret"\n')
    rows = {k: v for k, v, _ in effective_items(load_settings(cfg))}
    assert rows["api.token"] == "********"


def test_cli_bad_config_one_line_per_problem_no_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('device = "tpu"\n[watch]\ndebounce_ms = "soon"\n')
    proc = subprocess.run([sys.executable, "-m", "repd.cli", "--version"], capture_output=True,
                          text=True, check=True)
    assert proc.stdout.startswith("repd ")
    proc = subprocess.run([sys.executable, "-m", "repd.cli", "config", "show", "--config",
                           str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert all(line.startswith("repd: config error: ") for line in lines)
    assert "Traceback" not in proc.stderr


def test_cli_config_show_names_sources(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "m"\n')
    proc = subprocess.run([sys.executable, "-m", "repd.cli", "config", "show", "--config",
                           str(cfg), "--device", "cpu"], capture_output=True, text=True,
                          check=True)
    out = proc.stdout
    assert f"# config file: {cfg}" in out
    assert any(ln.startswith("model ") and f"# file {cfg}" in ln for ln in out.splitlines())
    assert any(ln.startswith("device ") and "# command line" in ln for ln in out.splitlines())


QUICK_CASES = [
    # (config file text or None, environment, --socket flag, quick resolver must answer)
    (None, {}, None, True),
    ('[api]\nsocket = "/srv/a.sock"\n', {}, None, True),
    ('model = "x"\n[api]\ntcp_port = 9000\ntoken = "t0ken"\n', {}, None, True),
    ('[api]\nsocket = "/srv/a.sock"\n', {"REPD_API__SOCKET": "/env/b.sock"}, None, True),
    ('[api]\nsocket = "/srv/a.sock"\n', {"repd_api__socket": "/env/lower.sock"}, None, True),
    ('[api]\nsocket = "/srv/a.sock"\n', {"REPD_API__SOCKET": "/env/b.sock"}, "/flag.sock", True),
    (None, {"REPD_API": '{"socket": "/json/c.sock"}'}, None, False),
    ("this is = = not toml", {}, None, False),
    ('[api]\nsocket = 5\n', {}, None, False),
    ('api = "flat"\n', {}, None, False),
]


@pytest.mark.parametrize(("text", "env", "flag", "answers"), QUICK_CASES)
def test_quick_socket_agrees_with_full_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    text: str | None, env: dict[str, str], flag: str | None, answers: bool,
) -> None:
    """`repd query`/`status` find the daemon without pydantic; never a different socket."""
    from repd.paths import quick_api_socket

    cfg = tmp_path / "cfg" / "repd" / "config.toml"
    if text is not None:
        cfg.parent.mkdir(parents=True)
        cfg.write_text(text)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    quick = quick_api_socket(None, flag)
    assert (quick is not None) == answers
    if quick is None:
        return
    overrides = {"api": {"socket": flag}} if flag else {}
    assert quick == load_settings(None, overrides).settings.api.socket


def test_quick_socket_defers_on_missing_explicit_config(tmp_path: Path) -> None:
    from repd.paths import quick_api_socket

    # The full loader owns the "config file not found" error for an explicit --config.
    assert quick_api_socket(tmp_path / "missing.toml", None) is None
    with pytest.raises(ConfigError):
        load_settings(tmp_path / "missing.toml")
