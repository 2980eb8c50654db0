"""XDG locations for repd's config, data, cache and runtime files."""

from __future__ import annotations

import os
from pathlib import Path


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
