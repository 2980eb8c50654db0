"""int8 activations: a model's OpenVINO export quantized by NNCF on the user's own chunks.

``repd model use NAME+int8`` asks for it. Unlike bf16 (see
:data:`~repd.adapters.openvino_backend.SAME_VECTORS_MIN_COSINE`), int8 changes the vectors
(cosine ~0.994 to f32 on MiniLM), so it is a model of its own: its identity is
``<base identity>+int8:<calibration digest>`` and moving to it is a model upgrade, which
re-embeds every file while the old index answers, and whose gate (or ``repd eval``)
judges it. On SciFact it lost nothing (nDCG@10 0.6628 against bf16's 0.6601, 809 train
queries, ``bench/probe_int8.py``). Its gain depends on the CPU: 2.2x the base model
where that runs in f32 (no native bf16; the index's chunks, 18.9 s against 41.1 s), but
only 1.05-1.16x where the base runs in bf16 on AMX, as on the machine it was built on
(int8 with bf16 elsewhere; with f32 elsewhere it ran at bf16's speed).

How it is made, once per base model (the folder is ``<base identity>+int8`` under the
export cache, :func:`variant_folder`):

* the base export (and its runtime spec) is made first if missing, by loading the base;
* up to :data:`CALIBRATION_TEXTS` chunk texts of the active index (taken by chunk hash
  order, so the same index gives the same sample) are tokenized as the model sees them
  and given to ``nncf.quantize`` (static, model type TRANSFORMER);
* the quantized IR is saved beside a copy of the base export's other files, with a
  marker holding its own identity and its own probe vectors, and the base's runtime spec
  (same tokenizer, pooling and token limit: the chunks stay the same, so the upgrade
  reuses them and only embeds again);
* it is refused when its vectors stray from the base model's on the calibration texts
  (least cosine under :data:`BASE_MIN_COSINE`).

Loading it runs :class:`~repd.adapters.openvino_runtime.DirectBackend` (no torch), checks
the probe vectors in f32 against the recorded ones, then runs what is not int8 in bf16
where the CPU has it (``openvino_precision``, as for the base model, within
:data:`SELF_MIN_COSINE`), and gives the identity the marker names. The calibration
digest is part of the identity, so an export lost and made again from other chunks is
another model (the daemon then migrates to it, as for changed weights).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from repd.adapters.device import EmbedderError
from repd.adapters.embedder import _PROBE_TEXTS, Embedder, pad_features
from repd.adapters.openvino_export import (
    MARKER,
    RUNTIME_SPEC,
    export_folder,
    library_versions,
    put_in_place,
    read_marker,
    set_aside,
    temp_folder,
    write_marker,
)
from repd.adapters.openvino_runtime import (
    IR_FILES,
    DirectBackend,
    ir_path,
    load_direct,
    read_spec,
    record_spec,
)
from repd.log import get_logger

__all__ = ["BASE_MIN_COSINE", "CALIBRATION_TEXTS", "SUFFIX", "NothingToCalibrateError",
           "load_variant", "making_note", "split_variant", "variant_folder"]

log = get_logger("openvino")

#: What a model name ends with to ask for its int8 variant.
SUFFIX = "+int8"
#: Chunk texts the quantization is calibrated on (NNCF's own default subset is 300).
CALIBRATION_TEXTS = 300
#: The least cosine between the variant's and the base model's vector of one calibration
#: text for the variant to be made (MiniLM: 0.994). Lower means the quantization broke
#: something; the gate would catch it later, this says so before a whole re-embed.
BASE_MIN_COSINE = 0.98
#: The least cosine between a load's probe vectors and the ones recorded at quantization
#: (in f32), and between bf16 and f32 for the parts int8 leaves out. Looser than the base
#: model's 0.9999: with int8 activations bf16 moves MiniLM's vectors by ~1e-3 (0.9991 least
#: over 600 SciFact documents; int8 itself moves them by ~1e-2 from the base model), and
#: another CPU's int8 kernels may round differently. Damaged files fall far below.
SELF_MIN_COSINE = 0.998
_METHOD = "nncf static int8, model type transformer, f32 elsewhere"


def split_variant(model: str) -> tuple[str, bool]:
    """``(base model, True)`` for ``NAME+int8``, else ``(model, False)``."""
    if model.endswith(SUFFIX) and len(model) > len(SUFFIX):
        return model[:-len(SUFFIX)], True
    return model, False


def making_note(model: str) -> str:
    """What a status adds while ``model`` loads: for an int8 variant, how it is made when
    it is not yet (a minute); nothing for another model."""
    if not split_variant(model)[1]:
        return ""
    return (f"its int8 variant is made from up to {CALIBRATION_TEXTS} chunks, about a "
            "minute on 2 cores")


class NothingToCalibrateError(EmbedderError):
    """No variant is made yet and no chunk text was given to make one from."""


def variant_folder(base_id: str, root: Path | None = None) -> Path:
    """Where the int8 variant of the model with identity ``base_id`` lives (one per base)."""
    return export_folder(base_id + SUFFIX, root)


def load_variant(base_id: str, base_folder: Path, ensure_base: Callable[[], None],
                 calibration: Callable[[], Sequence[str]] | None, precision: str = "f32",
                 strict: bool = False, root: Path | None = None) -> tuple[str, DirectBackend]:
    """The variant's identity and backend, quantized first if there is none yet.

    ``ensure_base`` makes the base export and its runtime spec (loads the base model);
    ``calibration`` gives chunk texts of the user's index; ``precision`` (``f32`` or
    ``bf16``, ``strict`` when asked for by name) is what runs what int8 leaves out.
    Raises :class:`NothingToCalibrateError` when there is no variant and no text to make one
    from, :class:`EmbedderError` when it cannot be made faithfully.
    """
    folder = variant_folder(base_id, root)
    if folder.exists():
        opened, why = _open(folder, base_id, precision, strict)
        if opened is not None:
            return opened
        set_aside(folder, why)
    texts = [t for t in (calibration() if calibration is not None else []) if t.strip()]
    if not texts:
        raise NothingToCalibrateError(
            f"the int8 variant of {base_id.partition('@')[0]} is not made yet, and there is "
            f"nothing to calibrate it on: it is made from chunks of your index, or, before "
            f"any, of the files in your roots, and neither has any text (add a folder with "
            f"`repd roots add DIR`, or index with the base model first)")
    ensure_base()
    quantize(base_id, base_folder, texts[:CALIBRATION_TEXTS], folder)
    opened, why = _open(folder, base_id, precision, strict)
    if opened is None:
        raise EmbedderError(f"the int8 variant just made does not load: {why}")
    return opened


def _open(folder: Path, base_id: str, precision: str,
          strict: bool) -> tuple[tuple[str, DirectBackend] | None, str]:
    try:
        model_id = json.loads((folder / MARKER).read_text()).get("model_id")
    except (OSError, ValueError, AttributeError):
        return None, "no readable marker (an interrupted or foreign export)"
    if not isinstance(model_id, str) or not model_id.startswith(f"{base_id}{SUFFIX}:"):
        return None, f"marker names {model_id!r}"
    backend = load_direct(folder, model_id, precision, strict, min_cosine=SELF_MIN_COSINE)
    if backend is None:
        return None, "damaged, stale or of other library versions (see the warning before)"
    return (model_id, backend), ""


@contextmanager
def _quiet_nncf() -> Iterator[None]:
    """No NNCF progress in a daemon's log: its INFO lines, and the bars it draws with rich
    on rich's shared console (printed even when stderr is not a terminal)."""
    from rich import get_console

    logger = logging.getLogger("nncf")
    console = get_console()
    level, quiet = logger.level, console.quiet
    logger.setLevel(logging.ERROR)
    console.quiet = True
    try:
        yield
    finally:
        logger.setLevel(level)
        console.quiet = quiet


def _embed(backend: DirectBackend, texts: Sequence[str]) -> np.ndarray:
    """``texts``' vectors, batched as every embedding is (by :class:`Embedder`)."""
    return Embedder(backend, model_name="", model_id="", device="cpu",
                    backend_name="openvino").embed(texts)


def quantize(base_id: str, base_folder: Path, texts: Sequence[str], folder: Path) -> None:
    """Make the int8 variant of the export at ``base_folder`` in ``folder`` (see module)."""
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        raise EmbedderError("the int8 variant needs nncf (pip install 'repd[openvino]')") from exc
    marker, why = read_marker(base_folder, base_id)
    spec = read_spec(base_folder, marker)[0] if marker is not None else None
    if marker is None or spec is None:
        raise EmbedderError(f"no usable OpenVINO export of {base_id} to quantize "
                            f"({why or 'no runtime spec: the model runs only with torch'})")
    core = ov.Core()
    # The base model in f32: its compiled copy fills the inputs as every run does, and
    # its vectors are what the variant is compared with below.
    base = DirectBackend(spec, core.read_model(str(ir_path(base_folder))), None)
    prepared = base.prepare(texts)
    calibration = [base.copies.inputs_for(pad_features(prepared, [i], spec.padding))
                   for i in range(len(texts))]
    log.info("openvino_int8_quantizing", base=base_id, texts=len(texts))
    try:
        with _quiet_nncf():
            network = core.read_model(str(ir_path(base_folder)))
            quantized = nncf.quantize(network, nncf.Dataset(calibration),
                                      model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(texts))
    except Exception as exc:
        raise EmbedderError(f"NNCF could not quantize {base_id}: {type(exc).__name__}: "
                            f"{str(exc).strip()[:200]}") from exc
    tmp = temp_folder(folder)
    try:
        _copy_base_files(base_folder, tmp)
        ov.save_model(quantized, str(ir_path(tmp)), compress_to_fp16=False)
        variant = DirectBackend(spec, core.read_model(str(ir_path(tmp))), None)
        cosines = (_embed(base, texts) * _embed(variant, texts)).sum(axis=1)
        worst = float(cosines.min())
        if not worst >= BASE_MIN_COSINE:
            raise EmbedderError(
                f"int8 moves {base_id}'s vectors too far on your chunks (least cosine "
                f"{worst:.4f}, bar {BASE_MIN_COSINE}); keep the model as it is")
        nncf_version = library_versions(("nncf",))["nncf"]
        digest = hashlib.sha256(json.dumps(
            {"texts": list(texts), "method": _METHOD, "nncf": nncf_version}).encode()).hexdigest()
        model_id = f"{base_id}{SUFFIX}:{digest[:12]}"
        created = write_marker(
            tmp, model_id, str(base_folder), _PROBE_TEXTS, variant._probe(),
            {"quantization": {"method": _METHOD, "base": base_id, "texts": len(texts),
                              "digest": digest, "nncf": nncf_version,
                              "base_cosine_min": round(worst, 6),
                              "base_cosine_mean": round(float(cosines.mean()), 6)}})
        record_spec(tmp, created, spec)
        put_in_place(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("openvino_int8_made", model_id=model_id, path=str(folder), texts=len(texts),
             base_cosine_min=round(worst, 4), base_cosine_mean=round(float(cosines.mean()), 4))


def _copy_base_files(base_folder: Path, tmp: Path) -> None:
    """Everything of the base export but its IR, marker and spec (tokenizer, configs)."""
    for path in sorted(base_folder.rglob("*")):
        relative = path.relative_to(base_folder)
        if path.is_dir() or path.name in (MARKER, RUNTIME_SPEC) or (
                relative.parts[0] == "openvino" and path.name in IR_FILES):
            continue
        target = tmp / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    (tmp / "openvino").mkdir(exist_ok=True)

