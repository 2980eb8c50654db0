"""The BM25 lexical encoder (Qdrant Edge's Bm25): identity, vectors, text processing."""

from __future__ import annotations

from typing import Any

import pytest

from repd.adapters.lexical import (
    DEFAULT_PARAMS,
    Bm25Params,
    LexicalEncoder,
    default_encoder,
)
from repd.core.types import SparseVec

TEXT = "Running runs the runner quickly: the running dog runs past the Runner's house."


def _valid(v: SparseVec) -> None:
    assert len(v.indices) == len(v.values)
    assert v.indices == sorted(set(v.indices))  # ascending and distinct
    assert all(isinstance(i, int) and 0 <= i < 2**32 for i in v.indices)
    assert all(w > 0 for w in v.values)


def test_identity_names_the_engine_and_every_parameter() -> None:
    enc = LexicalEncoder(DEFAULT_PARAMS)
    assert enc.identity.startswith("bm25:edge-")
    assert f":k{DEFAULT_PARAMS.k!r}:b{DEFAULT_PARAMS.b!r}:" in enc.identity
    assert "english" in enc.identity and "snowball" in enc.identity
    assert LexicalEncoder(DEFAULT_PARAMS).identity == enc.identity
    changes: list[dict[str, Any]] = [
        {"k": DEFAULT_PARAMS.k + 0.1}, {"b": DEFAULT_PARAMS.b / 2},
        {"avg_len": DEFAULT_PARAMS.avg_len + 1},
        {"stemmer": "none" if DEFAULT_PARAMS.stemmer == "snowball" else "snowball"},
        {"stopwords": "none" if DEFAULT_PARAMS.stopwords == "language" else "language"},
        {"tokenizer": "whitespace" if DEFAULT_PARAMS.tokenizer == "word" else "word"},
        {"lowercase": not DEFAULT_PARAMS.lowercase},
        {"ascii_folding": not DEFAULT_PARAMS.ascii_folding},
        {"min_token_len": (DEFAULT_PARAMS.min_token_len or 0) + 1},
        {"max_token_len": (DEFAULT_PARAMS.max_token_len or 50) - 1},
    ]
    identities = {enc.with_params(**c).identity for c in changes}
    # Tiny differences count (no rounding); an int and its float are the same setting.
    identities.add(enc.with_params(k=DEFAULT_PARAMS.k + 1e-9).identity)
    assert enc.with_params(avg_len=int(DEFAULT_PARAMS.avg_len)).identity == enc.identity
    assert enc.identity not in identities
    assert len(identities) == len(changes) + 1


def test_default_encoder_is_cached_and_tuned() -> None:
    assert default_encoder() is default_encoder()
    assert default_encoder().params == DEFAULT_PARAMS


def test_same_text_same_vector_and_valid_shape() -> None:
    a, b = LexicalEncoder(), LexicalEncoder()
    [va] = a.embed_documents([TEXT])
    assert va == b.embed_documents([TEXT])[0] == a.embed_documents(["x", TEXT])[1]
    _valid(va)
    q = a.embed_query(TEXT)
    _valid(q)
    assert q.indices == va.indices and set(q.values) == {1.0}


def test_document_weights_saturate_term_frequency() -> None:
    enc = LexicalEncoder(Bm25Params(k=1.2, b=0.0))
    once, = enc.embed_documents(["glacier"])
    many, = enc.embed_documents(["glacier " * 50])
    assert once.indices == many.indices
    assert once.values[0] < many.values[0] < 1.2 + 1  # tf (k+1)/(tf+k) stays below k+1


def test_stemming_joins_word_forms_only_when_on() -> None:
    stem = LexicalEncoder(Bm25Params(stemmer="snowball"))
    assert stem.embed_query("running").indices == stem.embed_query("runs").indices
    plain = LexicalEncoder(Bm25Params(stemmer="none"))
    assert plain.embed_query("running").indices != plain.embed_query("runs").indices


def test_stopwords_and_case() -> None:
    enc = LexicalEncoder(Bm25Params(stopwords="language"))
    assert enc.embed_query("the of and").indices == []
    assert enc.embed_query("Glacier").indices == enc.embed_query("glacier").indices
    keep = LexicalEncoder(Bm25Params(stopwords="none"))
    assert len(keep.embed_query("the glacier").indices) == 2


@pytest.mark.parametrize("text", ["", "   \n\t", "!!! ... ---"])
def test_empty_text_gives_an_empty_vector(text: str) -> None:
    enc = default_encoder()
    assert enc.embed_query(text) == SparseVec([], [])
    assert enc.embed_documents([text]) == [SparseVec([], [])]
    assert enc.embed_documents([]) == []


def test_unicode_and_long_text() -> None:
    enc = default_encoder()
    v = enc.embed_documents(["Ünïcödé naïve café 日本語のテキスト " + "word " * 20_000])[0]
    _valid(v)


@pytest.mark.parametrize("bad", [{"k": -1.0}, {"b": 1.5}, {"avg_len": 0.0},
                                 {"language": "klingon"}, {"stemmer": "porter"},
                                 {"stopwords": "some"}, {"tokenizer": "regex"}])
def test_invalid_parameters_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Bm25Params(**bad)  # type: ignore[arg-type]


def test_one_encoder_serves_several_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    enc = default_encoder()
    expected = enc.embed_documents([TEXT])[0]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: enc.embed_documents([TEXT])[0], range(64)))
    assert all(v == expected for v in got)
