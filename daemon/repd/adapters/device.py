"""Which torch device and how many CPU threads the embedder gets; torch is probed lazily."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


class EmbedderError(Exception):
    """The embedding model cannot be loaded or run; the message is one line for a person."""


@dataclass(frozen=True, slots=True)
class Accelerators:
    """What the installed torch can see: how many CUDA devices, and whether MPS works."""

    cuda_devices: int = 0
    mps: bool = False


def cpu_only_torch_build(platform: str = sys.platform) -> bool:
    """Whether the installed torch is a build that can see no accelerator, told without
    importing it (2-3 s and ~300 MB: the OpenVINO path never needs torch otherwise).

    True only off macOS (where MPS needs no special build) for a torch whose
    ``version.py`` records neither a CUDA nor a ROCm (HIP) version, as the ``+cpu``
    wheels do. Anything unclear is False: then torch is imported and asked.
    """
    if platform == "darwin" or "torch" in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec("torch")
        locations = list(spec.submodule_search_locations or []) if spec else []
        text = (Path(locations[0]) / "version.py").read_text() if locations else ""
    except (ImportError, ValueError, OSError):
        return False
    recorded = dict(re.findall(r"^(cuda|hip)(?:: *[^=]+)? *= *(.+?) *$", text, re.MULTILINE))
    return recorded.get("cuda") == "None" and recorded.get("hip") == "None"


def probe_torch() -> Accelerators:
    """Ask torch which accelerators exist (imports torch, so call it only when loading a
    model), unless :func:`cpu_only_torch_build` already says there are none."""
    if cpu_only_torch_build():
        return Accelerators()
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps_backend = getattr(torch.backends, "mps", None)
    mps = bool(mps_backend is not None and mps_backend.is_available())
    return Accelerators(cuda_devices=cuda, mps=mps)


def choose_device(requested: str, probe: Callable[[], Accelerators] = probe_torch) -> str:
    """Resolve ``auto|cpu|cuda|cuda:N|mps`` to a device string torch accepts.

    ``auto`` prefers CUDA, then MPS, then the CPU. An explicitly requested device that
    is not there raises :class:`EmbedderError` rather than silently running on the CPU,
    since that would be tens of times slower than the person asked for.
    """
    name = requested.strip().lower()
    if name == "cpu":
        return "cpu"  # no probe: the CPU path must not pay for CUDA initialisation
    found = probe()
    if name == "auto":
        if found.cuda_devices > 0:
            return "cuda"
        return "mps" if found.mps else "cpu"
    if name == "mps":
        if not found.mps:
            raise EmbedderError("device 'mps' requested but torch reports MPS is not available")
        return "mps"
    if name == "cuda" or name.startswith("cuda:"):
        index_text = name.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise EmbedderError(f"device {requested!r} is not valid; use cuda or cuda:N")
        if found.cuda_devices == 0:
            raise EmbedderError(
                f"device {requested!r} requested but torch sees no CUDA device "
                "(CPU-only torch build, or no driver)"
            )
        if int(index_text) >= found.cuda_devices:
            raise EmbedderError(
                f"device {requested!r} requested but torch sees only "
                f"{found.cuda_devices} CUDA device(s)"
            )
        return name
    raise EmbedderError(f"device {requested!r} is not valid; use auto, cpu, cuda, cuda:N or mps")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _physical_cores(cpus: Iterable[int], sysfs: Path) -> int | None:
    """Distinct (package, core) pairs among ``cpus``; None when sysfs does not say."""
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        package = _read(topology / "physical_package_id")
        core = _read(topology / "core_id")
        if package is None or core is None:
            return None
        cores.add((package, core))
    return len(cores) or None


def _cgroup_cpu_limit(cgroup: Path) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` or v1 CFS quota; None when unlimited."""
    v2 = _read(cgroup / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
            return int(quota) / int(period)
        return None
    quota_v1 = _read(cgroup / "cpu" / "cpu.cfs_quota_us")
    period_v1 = _read(cgroup / "cpu" / "cpu.cfs_period_us")
    # A v1 quota of -1 means unlimited; isdigit() rejects it along with garbage.
    if quota_v1 and period_v1 and quota_v1.isdigit() and period_v1.isdigit():
        quota_us, period_us = int(quota_v1), int(period_v1)
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def cpu_threads(
    sysfs: Path = Path("/sys/devices/system/cpu"),
    cgroup: Path = Path("/sys/fs/cgroup"),
    cpus: Iterable[int] | None = None,
) -> int:
    """Threads to give torch on the CPU: physical cores we may run on, within the cgroup quota.

    Hyperthread siblings share the vector units that matrix multiplies saturate, so
    one thread per physical core is as fast and leaves the siblings to the watcher,
    the writer and the API; more threads than the cgroup quota only get throttled.
    ``cpus`` (default: this process's affinity) and the two roots exist for tests.
    """
    allowed = set(cpus) if cpus is not None else _allowed_cpus()
    threads = _physical_cores(allowed, sysfs) or len(allowed) or 1
    limit = _cgroup_cpu_limit(cgroup)
    if limit is not None:
        threads = min(threads, max(1, math.ceil(limit)))
    return max(1, threads)


def choose_backend(requested: str, device: str, available: Callable[[], bool]) -> str:
    """Resolve the ``backend`` setting (``auto|torch|openvino``) for a resolved ``device``.

    ``auto`` is OpenVINO on the CPU when ``available()`` (optimum-intel and openvino
    import), torch otherwise (a GPU, MPS, or OpenVINO not installed). An explicit
    ``openvino`` that cannot run raises :class:`EmbedderError` naming the way out.
    """
    name = requested.strip().lower()
    if name == "torch":
        return "torch"
    if name == "auto":
        return "openvino" if device == "cpu" and available() else "torch"
    if name == "openvino":
        if device != "cpu":
            raise EmbedderError(
                f"backend 'openvino' runs on the CPU only, but the device is {device!r}; "
                "set device = \"cpu\", or backend = \"auto\" to use torch on the GPU")
        if not available():
            raise EmbedderError(
                "backend 'openvino' requested but optimum-intel/openvino is not installed "
                "(pip install 'repd[openvino]'), or set backend = \"auto\"")
        return "openvino"
    raise EmbedderError(f"backend {requested!r} is not valid; use auto, torch or openvino")


def openvino_cpu_capabilities() -> set[str]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` for the CPU (``BF16`` where it is native)."""
    import openvino as ov

    return {str(c).upper() for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")}


def choose_precision(requested: str,
                     capabilities: Callable[[], set[str]] = openvino_cpu_capabilities) -> str:
    """Resolve the ``openvino_precision`` setting (``auto|f32|bf16``) for this CPU.

    ``auto`` is bf16 where the CPU computes it natively (AVX-512 BF16, AMX; OpenVINO's
    own default there) and f32 elsewhere, where bf16 would be emulated and slower. An
    explicit ``bf16`` on a CPU without it raises :class:`EmbedderError`: OpenVINO would
    quietly compute f32 and the setting would lie.
    """
    name = requested.strip().lower()
    if name == "f32":
        return "f32"
    if name in ("auto", "bf16"):
        native = "BF16" in capabilities()
        if name == "bf16" and not native:
            raise EmbedderError(
                "openvino_precision 'bf16' requested but this CPU has no native bf16 "
                "(AVX-512 BF16 or AMX); set openvino_precision = \"auto\" or \"f32\"")
        return "bf16" if native else "f32"
    raise EmbedderError(f"openvino_precision {requested!r} is not valid; use auto, f32 or bf16")
