"""Shared test helpers: settings in temp folders, store snapshots, CLI subprocesses."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from repd.adapters.openvino_backend import SAME_VECTORS_MIN_COSINE
from repd.engine import Engine
from repd.settings import Settings


def make_settings(data_dir: Path, **kw: Any) -> Settings:
    """Settings that keep everything inside a temp folder."""
    return Settings(store={"path": data_dir}, device="cpu", **kw)


def snapshot(engine: Engine) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """Every point of the active generation: id -> (vector, payload without mtime)."""
    store = engine.store
    ids = list(store.iter_ids())
    out = {}
    for rec in store.retrieve(ids, with_vectors=True):
        payload = {k: v for k, v in rec.payload.items() if k != "mtime_ns"}
        out[rec.id] = (np.asarray(rec.vector, dtype=np.float32), payload)
    return out


def assert_same_index(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Same point ids, same payloads, the same vectors.

    "The same vector" is the product's own bar, cosine >= ``SAME_VECTORS_MIN_COSINE``
    (0.9999), not bit equality: in bf16 on OpenVINO (the default on a CPU that has it) a
    chunk's vector moves by ~5e-4 per component with the batch it is embedded in, so a
    chunk re-embedded after a crash, in other company than in a fresh build, is that
    close (cosine ~0.99999), while another chunk's vector is far below the bar.
    """
    assert sorted(a) == sorted(b), (
        f"only in first: {sorted(set(a) - set(b))[:5]}, only in second: "
        f"{sorted(set(b) - set(a))[:5]}")
    for pid, (vec, payload) in a.items():
        vec2, payload2 = b[pid]
        assert payload == payload2, pid
        assert vec.shape == vec2.shape, pid
        cosine = float(vec @ vec2) / float(np.linalg.norm(vec) * np.linalg.norm(vec2))
        assert cosine >= SAME_VECTORS_MIN_COSINE, (pid, cosine)
        np.testing.assert_allclose(np.linalg.norm(vec), np.linalg.norm(vec2), atol=1e-4)


def fresh_snapshot(root: Path, data_dir: Path, embedder: Any) -> dict[str, Any]:
    """Index ``root`` from nothing into ``data_dir`` and snapshot it."""
    eng = Engine(make_settings(data_dir), writer=True, embedder=embedder)
    try:
        eng.indexer().reconcile(root, eng.rules(root))
        return snapshot(eng)
    finally:
        eng.close()


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment whose XDG folders all live under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPD_")}
    env.update({
        "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"), "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_RUNTIME_DIR": str(home / "run"), "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "REPD_DEVICE": "cpu",
    })
    if "REPD_OPENVINO_CACHE" in os.environ:  # the run's one export folder (tests/conftest.py)
        env["REPD_OPENVINO_CACHE"] = os.environ["REPD_OPENVINO_CACHE"]
    if os.environ.get("REPD_TEST_REPLICAS") == "0":  # the suite on one copy (conftest.py)
        env["REPD_STORE__REPLICAS"] = "false"
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``repd ARGS`` in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "repd.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"repd {args} exited {proc.returncode}\n{proc.stderr}")
    return proc


def index_json(root: Path, env: dict[str, str]) -> dict[str, Any]:
    """``repd index ROOT --json`` parsed."""
    out: dict[str, Any] = json.loads(run_cli(["index", str(root), "--json"], env).stdout)
    return out


class UnixHTTPConnection(http.client.HTTPConnection):
    """The standard library's HTTP client over a Unix socket: for tests that send requests
    repd's own client never would (repd talks through ``repd.api.client._exchange``)."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        # The host only fills the Host header; the socket path decides where we go.
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        """Open the Unix socket (instead of a TCP connection)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
