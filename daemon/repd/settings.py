"""The one settings tree: defaults < TOML file < REPD_* environment < command-line overrides.

Loaded once by the command that runs, then passed down; nothing else reads config.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

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
    replicas: bool = Field(
        default=True,
        description="embedded only: keep two copies of each index, each in a process of "
        "its own, so HNSW builds never pause the daemon (queries go to the copy not "
        "building); twice the disk; false: one copy in the daemon's process, where each "
        "build pauses it for seconds; changing it converts the index at the next start")

    @field_validator("path")
    @classmethod
    def _expand_path(cls, v: Path) -> Path:
        # "~/x" in a config file means the home folder, not a folder named "~" here.
        return Path(os.path.abspath(v.expanduser()))


class ApiSettings(_Section):
    """The local API the CLI and the dashboard talk to."""

    socket: Path = Field(default_factory=paths.default_socket)

    @field_validator("socket")
    @classmethod
    def _expand_socket(cls, v: Path) -> Path:
        return Path(os.path.abspath(v.expanduser()))
    socket_group: str | None = Field(
        default=None, description="a group whose members may use the socket: it becomes "
        "0660 owned by that group, its folder 0750 with that group (unset: 0600, owner only)")
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


class MigrationSettings(_Section):
    """Model upgrades: when the new generation becomes the active one."""

    auto_switch: bool = Field(
        default=True, description="switch as soon as the backfill is done and the gate "
        "passes (false: wait for `repd model switch`)")
    gate_queries: Path | None = Field(
        default=None, description="BEIR queries.jsonl the gate scores both models on")
    gate_qrels: Path | None = Field(default=None, description="BEIR qrels TSV for gate_queries")
    gate_mapping: Path | None = Field(
        default=None, description="document id -> file path (default: the file's stem)")
    max_ndcg_drop: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="the gate refuses a new model whose nDCG@10 is lower by more than this")

    @field_validator("gate_queries", "gate_qrels", "gate_mapping")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return Path(os.path.abspath(v.expanduser())) if v is not None else None


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
    backend: Literal["auto", "torch", "openvino"] = Field(
        default="auto",
        description="auto (OpenVINO on a CPU when installed, else torch), torch or openvino; "
                    "same vectors either way")
    openvino_precision: Literal["auto", "f32", "bf16"] = Field(
        default="auto",
        description="what OpenVINO computes in: auto (bf16 where the CPU has it natively, "
                    "else f32), f32 or bf16; bf16 is kept only if its vectors stay f32's "
                    "(cosine >= 0.9999), so an index needs no migration either way")
    batch_tokens: int | None = Field(
        default=None, ge=256,
        description="padded tokens per batch; unset: the backend's own (4096 on OpenVINO, "
                    "16384 on torch)")
    max_file_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_chunks_per_file: int = Field(
        default=20_000, ge=1, description="files cut into more chunks are skipped")
    disk_reserve_mb: int = Field(
        default=256, ge=0,
        description="free MiB kept in the data folder; below it writing pauses (disk_full)")
    vector_cache_bytes: int = Field(
        default=256 * 2**20, ge=0,
        description="bytes of cached vectors no file uses any more (an undo, a move or a "
                    "restored file then needs no embedding); least recently used go first")
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    store: StoreSettings = Field(default_factory=StoreSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    migration: MigrationSettings = Field(default_factory=MigrationSettings)

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
    #: Things that are probably mistakes but not errors (a misspelled ``REPD_`` name).
    warnings: list[str] = field(default_factory=list)


#: ``REPD_`` variables that are not settings: the config file's name, fault injection
#: for the crash tests, the benchmarks' data. Names under a prefix listed in
#: ``NON_SETTING_ENV_PREFIXES`` are free for tests and tools.
NON_SETTING_ENV = frozenset({"REPD_CONFIG", "REPD_CRASH_AT", "REPD_FAULT", "REPD_SCIFACT",
                             "REPD_OPENVINO_CACHE"})
NON_SETTING_ENV_PREFIXES = ("REPD_TEST_", "REPD_BENCH_")
ENV_PREFIX = "REPD_"


@dataclass
class _EnvLayer:
    """What the ``REPD_*`` environment sets: values, the variable behind each dotted key,
    problems (errors) and warnings (variables that name no setting)."""

    data: dict[str, Any] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _is_complex(annotation: Any) -> bool:
    """A list, a mapping or a section: given in one variable as JSON."""
    origin = get_origin(annotation)
    if origin in (Union, UnionType):
        return any(_is_complex(a) for a in get_args(annotation) if a is not type(None))
    if origin in (list, dict, set, tuple, frozenset):
        return True
    return isinstance(annotation, type) and issubclass(annotation, (BaseModel, list, dict))


def _section_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def env_names(model: type[BaseModel] | None = None, prefix: str = ENV_PREFIX) -> list[str]:
    """Every ``REPD_*`` variable that sets something, upper case (for suggestions)."""
    model = model or Settings
    out: list[str] = []
    for name, info in model.model_fields.items():
        var = f"{prefix}{name.upper()}"
        out.append(var)
        section = _section_of(info.annotation)
        if section is not None:
            out.extend(env_names(section, var + "__"))
    return out


def setting_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key the config file may set (``store``, ``store.kind``...)."""
    model = model or Settings
    out: list[str] = []
    for name, info in model.model_fields.items():
        out.append(prefix + name)
        section = _section_of(info.annotation)
        if section is not None:
            out.extend(setting_keys(section, f"{prefix}{name}."))
    return out


def closest(word: str, choices: list[str]) -> str | None:
    """The valid name ``word`` was most likely meant to be, if any is close."""
    lowered = {c.lower(): c for c in choices}
    found = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[found[0]] if found else None


def _json_hint(var: str, annotation: Any, raw: str) -> str:
    if _section_of(annotation) is not None:
        return (f"{var}: not valid JSON; set one key with {var}__KEY=value, or the whole "
                f"section as a JSON object ({var}='{{\"key\": ...}}')")
    example = raw.strip() or "/path"
    if "," in example and not example.startswith("["):
        items = [part.strip() for part in example.split(",") if part.strip()]
    else:
        items = [example]
    listed = ", ".join(json.dumps(i) for i in items)
    return (f"{var}: lists are JSON in the environment: {var}='[{listed}]' "
            f"(got {raw!r})")


def _read_env(environ: Mapping[str, str] | None = None) -> _EnvLayer:
    """The ``REPD_*`` variables as a settings tree, naming each variable in every message.

    ``REPD_KEY`` sets a top-level key, ``REPD_SECTION__KEY`` a key in a section; lists
    and whole sections are JSON. A variable that names no setting is a warning with the
    closest valid name (it is ignored, as a stale one from another version would be).
    """
    env = os.environ if environ is None else environ
    layer = _EnvLayer()
    fields = Settings.model_fields
    json_sections: dict[str, dict[str, Any]] = {}
    nested: list[tuple[str, str, str, str]] = []
    for raw_name in sorted(env):
        var = raw_name.upper()
        if not var.startswith(ENV_PREFIX):
            continue
        if var in NON_SETTING_ENV or var.startswith(NON_SETTING_ENV_PREFIXES):
            continue
        raw = env[raw_name]
        parts = var[len(ENV_PREFIX):].lower().split("__")
        top = parts[0]
        info = fields.get(top)
        section = _section_of(info.annotation) if info is not None else None
        if info is None or len(parts) > 2 or (len(parts) == 2 and section is None):
            _unknown_env(layer, var)
            continue
        if len(parts) == 2:
            assert section is not None
            sub = section.model_fields.get(parts[1])
            if sub is None:
                _unknown_env(layer, var)
                continue
            nested.append((var, top, parts[1], raw))
            continue
        if not _is_complex(info.annotation):
            layer.data[top] = raw
            layer.names[top] = var
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            layer.problems.append(_json_hint(var, info.annotation, raw))
            continue
        if section is not None:
            if not isinstance(value, dict):
                layer.problems.append(f"{var}: must be a JSON object, like "
                                      f"{var}='{{\"key\": ...}}'")
                continue
            json_sections[top] = value
            for key in _flatten(value, top + "."):
                layer.names[key] = var
        else:
            layer.data[top] = value
            layer.names[top] = var
    for top, value in json_sections.items():
        layer.data[top] = dict(value)
    for var, top, key, raw in nested:
        sub_info = _section_of(fields[top].annotation).model_fields[key]  # type: ignore[union-attr]
        item: Any = raw
        if _is_complex(sub_info.annotation):
            try:
                item = json.loads(raw)
            except ValueError:
                layer.problems.append(_json_hint(var, sub_info.annotation, raw))
                continue
        target = layer.data.setdefault(top, {})
        if not isinstance(target, dict):  # pragma: no cover - sections are dicts above
            continue
        target[key] = item  # a single key wins over the same key in REPD_SECTION JSON
        layer.names[f"{top}.{key}"] = var
    return layer


def _unknown_env(layer: _EnvLayer, var: str) -> None:
    guess = closest(var, env_names())
    hint = f" (did you mean {guess}?)" if guess else ""
    layer.warnings.append(f"{var} is not a repd setting{hint}; ignored")


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
    """Read file, environment and overrides; raise ConfigError listing every problem.

    Each problem names where its value came from: the config file's key, the
    environment variable (``REPD_BATCH_TOKENS: ...``), or the command line.
    """
    path, file_data = read_config_file(config)
    env = _read_env()
    cli_data = dict(overrides or {})
    layers = [
        (f"file {path}", _flatten(file_data)),
        ("environment", _flatten(env.data)),
        ("command line", _flatten(cli_data)),
    ]
    merged = _merge(_merge(file_data, env.data), cli_data)
    problems = list(env.problems)
    try:
        settings = Settings(**merged)
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(_describe(err, layers, env, path))
    if problems:
        raise ConfigError(problems)
    sources: dict[str, str] = {}
    for key in _flatten(settings.model_dump()):
        sources[key] = _origin(tuple(key.split(".")), layers)
    return LoadedSettings(settings, path, path.exists(), sources, list(env.warnings))


def _describe(err: Any, layers: list[tuple[str, dict[str, Any]]], env: _EnvLayer,
              path: Path) -> str:
    """One line for one validation error, naming the variable or key it came from."""
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    origin = _origin(err["loc"], layers)
    unknown = err["type"] == "extra_forbidden"
    msg = "unknown setting" if unknown else err["msg"]
    if unknown:
        dotted = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        parent = dotted.rpartition(".")[0]
        siblings = [k for k in setting_keys() if k.rpartition(".")[0] == parent]
        guess = closest(dotted, siblings)
        if guess:
            msg += f" (did you mean {guess!r}?)"
    if origin == "environment":
        dotted = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        var = env.names.get(dotted)
        if var is not None:
            own = var.lower() == (ENV_PREFIX + dotted.replace(".", "__")).lower()
            return f"{var}: {msg} (" + ("" if own else f"{loc}, ") + "from environment)"
        # A rule over a whole section: name every variable that set a key in it.
        inner = sorted({v for k, v in env.names.items() if k.startswith(dotted + ".")})
        if inner:
            return f"{loc}: {msg} (from environment: {', '.join(inner)})"
    return f"{loc}: {msg} (from {origin})"


def effective_items(loaded: LoadedSettings) -> list[tuple[str, str, str]]:
    """(dotted key, value as text, source) rows for ``repd config show``; secrets masked."""
    rows = []
    for key, value in _flatten(loaded.settings.model_dump()).items():
        text = "********" if isinstance(value, SecretStr) else (
            "[" + ", ".join(str(v) for v in value) + "]" if isinstance(value, list) else str(value)
        )
        rows.append((key, text, loaded.sources.get(key, "default")))
    return rows
