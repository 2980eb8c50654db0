"""XDG locations for repd's config, data, cache and runtime files."""

from __future__ import annotations

import os
from pathlib import Path

from repd.errors import ConfigError

#: typing.TYPE_CHECKING without importing typing (2 ms of every `repd query`).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    # The XDG spec says relative values are invalid and must be ignored.
    if value and Path(value).is_absolute():
        return Path(value)
    return Path.home() / fallback


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/repd``."""
    return _xdg("XDG_CONFIG_HOME", ".config") / "repd"


def data_dir() -> Path:
    """``$XDG_DATA_HOME/repd``: the manifest and the embedded index live here."""
    return _xdg("XDG_DATA_HOME", ".local/share") / "repd"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/repd``."""
    return _xdg("XDG_CACHE_HOME", ".cache") / "repd"


def runtime_dir() -> Path:
    """``$XDG_RUNTIME_DIR/repd``, or a private folder under /tmp when there is none."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and Path(base).is_absolute():
        return Path(base) / "repd"
    return Path(f"/tmp/repd-{os.getuid()}")


def default_config_file() -> Path:
    """The config file read when neither ``--config`` nor ``REPD_CONFIG`` names one."""
    return config_dir() / "config.toml"


def resolve_config_file(explicit: Path | None) -> Path:
    """``--config`` wins, then ``REPD_CONFIG``, then the XDG default."""
    if explicit is not None:
        return explicit
    env = os.environ.get("REPD_CONFIG")
    return Path(env) if env else default_config_file()


def read_config_file(explicit: Path | None) -> tuple[Path, dict[str, Any]]:
    """The config file to read (see ``resolve_config_file``) and its TOML contents.

    A missing file is empty settings unless a person named it (``--config`` or
    ``REPD_CONFIG``); that, unreadable files and invalid TOML raise ConfigError.
    """
    path = resolve_config_file(explicit)
    try:
        with path.open("rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        if explicit is not None or "REPD_CONFIG" in os.environ:
            raise ConfigError([f"{path}: config file not found"]) from None
        return path, {}
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    import tomllib  # only with a file to parse: `repd query` without one skips it

    try:
        return path, tomllib.loads(raw.decode())  # as tomllib.load reads a file
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None


def default_socket() -> Path:
    """The API socket when nothing names one: ``$XDG_RUNTIME_DIR/repd/repd.sock``."""
    return runtime_dir() / "repd.sock"


def quick_api_socket(config: Path | None, socket_arg: str | None) -> Path | None:
    """The API socket as ``load_settings`` resolves it, without importing pydantic.

    Talking to a running daemon should cost a Python start-up and one request, not the
    ~0.3 s that validating the whole settings tree takes. This reads only what names the
    socket (flag, ``REPD_API__SOCKET``, the config file's ``[api] socket``) and returns
    None whenever the answer needs the full loader (JSON in ``REPD_API``, a config file
    that cannot be read or parsed, a value of the wrong type), so errors are still
    reported by the one place that knows how.
    """
    if socket_arg:
        return Path(socket_arg)
    env = {k.upper(): v for k, v in os.environ.items() if k.upper().startswith("REPD_API")}
    if "REPD_API" in env:
        return None
    if "REPD_API__SOCKET" in env:
        return Path(env["REPD_API__SOCKET"]) if env["REPD_API__SOCKET"] else None
    try:
        _, data = read_config_file(config)
    except ConfigError:
        return None
    api = data.get("api", {})
    if not isinstance(api, dict):
        return None
    value = api.get("socket")
    if value is None:
        return default_socket()
    return Path(value) if isinstance(value, str) and value else None
