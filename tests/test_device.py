"""Device choice, CPU thread count, and the embedder's out-of-memory halving (fake model)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from repd.adapters.device import (
    Accelerators,
    EmbedderError,
    choose_device,
    cpu_threads,
    probe_torch,
)
from repd.adapters.embedder import Embedder
from repd.core.batching import padded_cost

# -- choose_device -----------------------------------------------------------------------


def _probe(cuda: int = 0, mps: bool = False) -> Accelerators:
    return Accelerators(cuda_devices=cuda, mps=mps)


@pytest.mark.parametrize(
    ("found", "expected"),
    [(_probe(cuda=1, mps=True), "cuda"), (_probe(mps=True), "mps"), (_probe(), "cpu")],
)
def test_auto_prefers_cuda_then_mps_then_cpu(found: Accelerators, expected: str) -> None:
    assert choose_device("auto", probe=lambda: found) == expected


def test_cpu_never_probes_torch() -> None:
    def boom() -> Accelerators:
        raise AssertionError("probed")

    assert choose_device("cpu", probe=boom) == "cpu"


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1", " CUDA:1 "])
def test_explicit_cuda_when_present(name: str) -> None:
    assert choose_device(name, probe=lambda: _probe(cuda=2)) == name.strip().lower()


@pytest.mark.parametrize(
    ("name", "found", "message"),
    [
        ("cuda", _probe(), "no CUDA device"),
        ("cuda:0", _probe(mps=True), "no CUDA device"),
        ("cuda:2", _probe(cuda=2), "only 2 CUDA device"),
        ("cuda:x", _probe(cuda=1), "not valid"),
        ("mps", _probe(cuda=1), "MPS is not available"),
        ("tpu", _probe(cuda=1), "not valid"),
    ],
)
def test_unavailable_or_bad_device_is_a_clear_error(
    name: str, found: Accelerators, message: str
) -> None:
    with pytest.raises(EmbedderError, match=message) as info:
        choose_device(name, probe=lambda: found)
    assert "\n" not in str(info.value)


def test_real_probe_agrees_with_torch() -> None:
    import torch

    found = probe_torch()
    assert found.cuda_devices == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if found.cuda_devices == 0 and not found.mps:
        assert choose_device("auto") == "cpu"


# -- cpu_threads -------------------------------------------------------------------------


def _sysfs(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    """A fake /sys/devices/system/cpu: cpu number -> (package, core)."""
    for cpu, (package, core) in cores.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return root


def test_hyperthreads_count_once(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path / "sys", {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)})
    assert cpu_threads(sysfs, tmp_path / "nocg", cpus={0, 1, 2, 3}) == 2
    assert cpu_threads(sysfs, tmp_path / "nocg", cpus={0, 2}) == 1  # siblings of one core


def test_two_sockets_count_separately(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path / "sys", {0: (0, 0), 1: (1, 0)})
    assert cpu_threads(sysfs, tmp_path / "nocg", cpus={0, 1}) == 2


def test_without_topology_use_logical_cpus(tmp_path: Path) -> None:
    assert cpu_threads(tmp_path / "missing", tmp_path / "nocg", cpus={0, 1, 2}) == 3


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000"}, 2),
        ({"cpu.max": "50000 100000"}, 1),
        ({"cpu.max": "max 100000"}, 8),
        ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, 8),
    ],
)
def test_cgroup_quota_caps_threads(tmp_path: Path, files: dict[str, str], expected: int) -> None:
    cgroup = tmp_path / "cg"
    for name, text in files.items():
        (cgroup / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / name).write_text(text + "\n")
    assert cpu_threads(tmp_path / "missing", cgroup, cpus=range(8)) == expected


def test_real_machine_gets_a_sane_count() -> None:
    import os

    assert 1 <= cpu_threads() <= (os.cpu_count() or 1)


# -- out-of-memory halving, with a fake model --------------------------------------------


class FakeOOMError(RuntimeError):
    """What torch raises: a RuntimeError whose text says out of memory."""


class _Lengths:
    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)
        self.lengths = [len(t.split()) + 2 for t in texts]


def fake_vector(text: str, dim: int = 8) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    vec = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vec / np.linalg.norm(vec)


class FakeBackend:
    """Runs out of memory above ``max_tokens_per_run`` padded tokens or ``max_items`` texts."""

    dim = 8
    max_tokens = 510

    def __init__(self, max_tokens_per_run: int = 10**9, max_items: int = 10**9) -> None:
        self.capacity = max_tokens_per_run
        self.max_items = max_items
        self.embedded: list[str] = []  # texts that came back from a successful run
        self.ooms = 0
        self.released = 0
        self.lock = threading.Lock()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    def prepare(self, texts: Sequence[str]) -> _Lengths:
        return _Lengths(texts)

    def run(self, prepared: Any, batch: Sequence[int]) -> np.ndarray:
        if len(batch) > self.max_items or padded_cost(prepared.lengths, batch) > self.capacity:
            with self.lock:
                self.ooms += 1
            raise FakeOOMError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(prepared.texts[i] == "poison" for i in batch):
            raise ValueError("something else broke\nsecond line")
        with self.lock:
            self.embedded.extend(prepared.texts[i] for i in batch)
        return np.stack([fake_vector(prepared.texts[i]) for i in batch])

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, RuntimeError) and "out of memory" in str(exc)

    def release_memory(self) -> None:
        self.released += 1


def _embedder(backend: FakeBackend, budget: int = 4096) -> Embedder:
    return Embedder(backend, model_name="fake", model_id="fake@0", device="cuda",
                    token_budget=budget, max_batch=256)


def _texts(n: int) -> list[str]:
    # Varied lengths (3..42 words) so batches hold different counts of texts.
    return [" ".join(f"w{i}" for _ in range(1 + (i * 7) % 40)) + f" t{i}" for i in range(n)]


def test_oom_halves_until_it_fits_and_keeps_order() -> None:
    backend = FakeBackend(max_items=5)
    emb = _embedder(backend)
    texts = _texts(100)
    out = emb.embed(texts)
    assert backend.ooms > 0
    assert backend.released == backend.ooms
    assert sorted(backend.embedded) == sorted(texts)  # each text embedded exactly once
    np.testing.assert_array_equal(out, np.stack([fake_vector(t) for t in texts]))
    assert emb.embedded_count == len(texts)
    assert emb.token_budget < 4096


def test_reduced_budget_is_remembered() -> None:
    backend = FakeBackend(max_tokens_per_run=300)
    emb = _embedder(backend, budget=4096)
    texts = _texts(200)
    emb.embed(texts)
    first_call_ooms = backend.ooms
    assert first_call_ooms > 0
    assert emb.token_budget <= 300
    backend.embedded.clear()
    out = emb.embed(texts)
    assert backend.ooms == first_call_ooms  # planned within the learnt budget: no new OOM
    assert sorted(backend.embedded) == sorted(texts)
    np.testing.assert_array_equal(out, np.stack([fake_vector(t) for t in texts]))
    assert emb.embedded_count == 2 * len(texts)


def test_single_text_that_does_not_fit_is_an_embedder_error() -> None:
    backend = FakeBackend(max_tokens_per_run=20)
    emb = _embedder(backend)
    with pytest.raises(EmbedderError, match="out of memory on cuda embedding a single text of 52"):
        emb.embed(["short", " ".join(["long"] * 50)])


def test_other_model_errors_become_one_line_embedder_errors() -> None:
    emb = _embedder(FakeBackend())
    with pytest.raises(EmbedderError, match=r"embedding failed: ValueError: something else broke$"):
        emb.embed(["fine", "poison"])


def test_empty_input_gives_an_empty_matrix() -> None:
    backend = FakeBackend()
    out = _embedder(backend).embed([])
    assert out.shape == (0, 8)
    assert out.dtype == np.float32
    assert backend.embedded == []


def test_threads_share_the_learnt_budget() -> None:
    backend = FakeBackend(max_tokens_per_run=200)
    emb = _embedder(backend)
    texts = _texts(120)
    results: dict[int, np.ndarray] = {}

    def work(k: int) -> None:
        results[k] = emb.embed(texts[k::3])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for k in range(3):
        expected = np.stack([fake_vector(t) for t in texts[k::3]])
        np.testing.assert_array_equal(results[k], expected)
    assert sorted(backend.embedded) == sorted(texts)
    assert emb.embedded_count == len(texts)
    assert emb.token_budget <= 200
