"""The one settings tree: defaults < TOML file < REPD_* environment < command-line overrides.

Loaded once by the command that runs, then passed down; nothing else reads config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource

from repd import paths
from repd.errors import ConfigError
from repd.paths import read_config_file

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreSettings(_Section):
    """Where the vectors live: the embedded Qdrant Edge shards or a Qdrant server."""

    kind: Literal["embedded", "server"] = "embedded"
    path: Path = Field(default_factory=paths.data_dir,
                       description="data folder: manifest and embedded index")
    url: str | None = Field(default=None, description="Qdrant server URL, for kind=server")
    api_key: SecretStr | None = None
    collection: str = Field(default="repd", description="alias / collection name prefix")


class ApiSettings(_Section):
    """The local API the CLI and the dashboard talk to."""

    socket: Path = Field(default_factory=paths.default_socket)
    tcp_port: int | None = Field(default=None, ge=1, le=65535,
                                 description="also listen on 127.0.0.1:PORT (needs token)")
    token: SecretStr | None = Field(default=None, description="bearer token for TCP")
    max_request_bytes: int = Field(default=64 * 1024, ge=1024)


class WatchSettings(_Section):
    """Live watching and reconciliation."""

    debounce_ms: int = Field(default=150, ge=0, le=60_000)
    settle_ms: int = Field(default=300, ge=0, le=600_000,
                           description="a file still changing is indexed once quiet this long")
    rescan_interval_s: int = Field(default=3600, ge=0, description="0 turns it off")
    max_pending: int = Field(default=20_000, ge=100,
                             description="distinct pending paths before falling back to a scan")
    follow_symlinks: bool = False
    gitignore: bool = True
    force_polling: bool = False


class Settings(BaseSettings):
    """Everything repd can be told. Env: ``REPD_MODEL``, ``REPD_STORE__KIND`` and so on."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    roots: list[Path] = Field(default_factory=list, description="folders to index")
    include: list[str] = Field(default_factory=list, description="globs; empty means all")
    exclude: list[str] = Field(default_factory=list, description="globs added to the defaults")
    allow_secrets: list[str] = Field(
        default_factory=list,
        description="globs (relative to the root) of files indexed even though their name "
                    "or content looks like a secret")
    model: str = Field(default=DEFAULT_MODEL, description="Hugging Face name or local path")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps")
    batch_tokens: int = Field(default=16384, ge=256, description="padded tokens per batch")
    max_file_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_chunks_per_file: int = Field(
        default=20_000, ge=1, description="files cut into more chunks are skipped")
    disk_reserve_mb: int = Field(
        default=256, ge=0,
        description="free MiB kept in the data folder; below it writing pauses (disk_full)")
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    store: StoreSettings = Field(default_factory=StoreSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        ok = v in {"auto", "cpu", "cuda", "mps"} or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return v

    @field_validator("roots")
    @classmethod
    def _roots(cls, v: list[Path]) -> list[Path]:
        return [Path(os.path.abspath(p.expanduser())) for p in v]

    # Cross-field rules live here, on the whole section as the full tree validates it
    # (a section alone, as the API's tests build it, stays constructible): they fail at
    # load time, before any model loads, so the daemon exits 2 (a config error systemd
    # does not restart) instead of failing after a long start.
    @field_validator("api")
    @classmethod
    def _tcp_needs_token(cls, v: ApiSettings) -> ApiSettings:
        if v.tcp_port is not None and not (v.token and v.token.get_secret_value().strip()):
            raise ValueError(f"tcp_port is set ({v.tcp_port}) but token is not: TCP is served "
                             "only with a bearer token; set api.token (REPD_API__TOKEN) or "
                             "unset api.tcp_port")
        return v

    @field_validator("store")
    @classmethod
    def _server_needs_url(cls, v: StoreSettings) -> StoreSettings:
        if v.kind == "server" and not (v.url and v.url.strip()):
            raise ValueError("kind is 'server' but url is not set: set store.url (e.g. "
                             "http://localhost:6333) or use kind = 'embedded'")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() merges file, environment and CLI itself so it can tell where
        # each value came from; the model only validates the merged result.
        return (init_settings,)


@dataclass
class LoadedSettings:
    """Validated settings, the file they came from, and each value's source."""

    settings: Settings
    config_file: Path
    config_file_exists: bool
    sources: dict[str, str] = field(default_factory=dict)


def _env_values() -> dict[str, Any]:
    source = EnvSettingsSource(
        Settings, env_prefix="REPD_", env_nested_delimiter="__", case_sensitive=False
    )
    try:
        data = source()
    except Exception as exc:  # pydantic-settings raises SettingsError for bad JSON values
        raise ConfigError([f"environment: {exc}"]) from None
    data.pop("config", None)
    return data


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _origin(loc: tuple[Any, ...], layers: list[tuple[str, dict[str, Any]]]) -> str:
    dotted = ".".join(str(p) for p in loc if not isinstance(p, int))
    for label, flat in reversed(layers):
        if any(k == dotted or k.startswith(dotted + ".") for k in flat):
            return str(label)
    return "default"


def load_settings(
    config: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> LoadedSettings:
    """Read file, environment and overrides; raise ConfigError listing every problem."""
    path, file_data = read_config_file(config)
    env_data = _env_values()
    cli_data = dict(overrides or {})
    layers = [
        (f"file {path}", _flatten(file_data)),
        ("environment", _flatten(env_data)),
        ("command line", _flatten(cli_data)),
    ]
    merged = _merge(_merge(file_data, env_data), cli_data)
    try:
        settings = Settings(**merged)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{loc}: {msg} (from {_origin(err['loc'], layers)})")
        raise ConfigError(problems) from None
    sources: dict[str, str] = {}
    for key in _flatten(settings.model_dump()):
        sources[key] = _origin(tuple(key.split(".")), layers)
    return LoadedSettings(settings, path, path.exists(), sources)


def effective_items(loaded: LoadedSettings) -> list[tuple[str, str, str]]:
    """(dotted key, value as text, source) rows for ``repd config show``; secrets masked."""
    rows = []
    for key, value in _flatten(loaded.settings.model_dump()).items():
        text = "********" if isinstance(value, SecretStr) else (
            "[" + ", ".join(str(v) for v in value) + "]" if isinstance(value, list) else str(value)
        )
        rows.append((key, text, loaded.sources.get(key, "default")))
    return rows
