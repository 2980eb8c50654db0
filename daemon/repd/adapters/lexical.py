"""The lexical encoder: BM25 sparse vectors from Qdrant Edge's built-in ``Bm25`` model.

Qdrant scores a sparse vector stored with the IDF modifier as ``sum over the query's
terms of idf(term) * document weight``, with the IDF computed by the engine over the
points it holds at query time. So a document vector carries only the term-frequency
part of BM25 (``tf * (k + 1) / (tf + k * (1 - b + b * len / avg_len))``), and a query
vector weighs every distinct term 1. No corpus statistics live here: adding or removing
files never changes the vector of another chunk, which is what lets sparse vectors be
cached by chunk text like the dense ones.

Term ids are hashes of the (stemmed, lower-cased) tokens, computed by the engine;
:attr:`LexicalEncoder.identity` names the engine version and every parameter, so a
cache keyed by it never serves a vector made another way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib import metadata
from typing import Any

import qdrant_edge as qe

from repd.core.types import SparseVec

__all__ = ["DEFAULT_PARAMS", "Bm25Params", "LexicalEncoder", "default_encoder"]

# Bumped when this module changes what text reaches the engine or how its output is
# shaped (so the identity, and every cache keyed by it, changes with it).
_WRAPPER_VERSION = 1
_LANGUAGES = {
    "english": (qe.Language.English, qe.SnowballLanguage.English),
}
_TOKENIZERS = {
    "word": qe.TokenizerType.Word,
    "whitespace": qe.TokenizerType.Whitespace,
    "multilingual": qe.TokenizerType.Multilingual,
}


@dataclass(frozen=True, slots=True)
class Bm25Params:
    """Every setting of the BM25 encoder; each one is part of the encoder's identity.

    ``k`` saturates term frequency (higher: repeats count more), ``b`` normalizes by
    length (0: none, 1: full) against ``avg_len`` tokens, a fixed guess of the average
    chunk length (the engine keeps no running average, so vectors stay independent).
    ``stemmer`` is ``"snowball"`` or ``"none"``; ``stopwords`` ``"language"`` (the
    language's list) or ``"none"``. Tokens shorter than ``min_token_len`` or longer than
    ``max_token_len`` are dropped (``None``: no limit).
    """

    k: float = 1.2
    b: float = 0.75
    avg_len: float = 256.0
    language: str = "english"
    tokenizer: str = "word"
    stemmer: str = "snowball"
    stopwords: str = "language"
    lowercase: bool = True
    ascii_folding: bool = False
    min_token_len: int | None = None
    max_token_len: int | None = None

    def __post_init__(self) -> None:
        if self.language not in _LANGUAGES:
            raise ValueError(f"unsupported BM25 language {self.language!r}; "
                             f"known: {', '.join(sorted(_LANGUAGES))}")
        if self.tokenizer not in _TOKENIZERS:
            raise ValueError(f"unsupported BM25 tokenizer {self.tokenizer!r}; "
                             f"known: {', '.join(sorted(_TOKENIZERS))}")
        if self.stemmer not in ("snowball", "none"):
            raise ValueError(f"stemmer must be 'snowball' or 'none', not {self.stemmer!r}")
        if self.stopwords not in ("language", "none"):
            raise ValueError(f"stopwords must be 'language' or 'none', not {self.stopwords!r}")
        if self.k < 0 or not 0.0 <= self.b <= 1.0 or self.avg_len <= 0:
            raise ValueError(f"BM25 needs k >= 0, 0 <= b <= 1, avg_len > 0 "
                             f"(got k={self.k}, b={self.b}, avg_len={self.avg_len})")

    def config(self) -> Any:
        """The engine's ``Bm25Config`` for these settings, every field given explicitly."""
        stop_lang, stem_lang = _LANGUAGES[self.language]
        stemmer: Any = (qe.SnowballParams(stem_lang) if self.stemmer == "snowball"
                        else qe.DisabledStemmer())
        stopwords: Any = (stop_lang if self.stopwords == "language"
                          else qe.StopwordsSet(languages=set(), custom=set()))
        return qe.Bm25Config(
            k=self.k, b=self.b, avg_len=self.avg_len, tokenizer=_TOKENIZERS[self.tokenizer],
            language=self.language, lowercase=self.lowercase, ascii_folding=self.ascii_folding,
            stopwords=stopwords, stemmer=stemmer, min_token_len=self.min_token_len,
            max_token_len=self.max_token_len)

    def describe(self) -> str:
        """The parameters as one stable string (``word:k1.2:b0.3:avg256.0:english:...``)."""
        lengths = f"{self.min_token_len or 0}-{self.max_token_len or 'inf'}"
        k, b, avg = (repr(float(x)) for x in (self.k, self.b, self.avg_len))  # exact
        return (f"{self.tokenizer}:k{k}:b{b}:avg{avg}:{self.language}"
                f":stem-{self.stemmer}:stop-{self.stopwords}:lc{int(self.lowercase)}"
                f":fold{int(self.ascii_folding)}:len{lengths}")


#: The tuned settings (bench/tune_hybrid.py on SciFact's train split, chunk text as the
#: indexer feeds it): b 0.3 rather than the textbook 0.75, since chunks are already cut
#: to one length cap and full length normalization mostly punishes the longer ones (hybrid
#: nDCG@10 +0.004 to +0.006 over b 0.75 with every fusion tried; k and avg_len moved
#: little). Snowball stemming and English stop words: off, lexical nDCG@10 fell 0.035.
DEFAULT_PARAMS = Bm25Params(k=1.2, b=0.3, avg_len=256.0)


def _engine_version() -> str:
    try:
        return metadata.version("qdrant-edge-py")
    except metadata.PackageNotFoundError:  # an unusual install: the module's own file
        return "unknown"


class LexicalEncoder:
    """BM25 sparse vectors for documents (TF-saturated weights) and queries (1 per term).

    Safe to share between threads: the engine's model holds no state between calls.
    """

    def __init__(self, params: Bm25Params = DEFAULT_PARAMS) -> None:
        self.params = params
        self._model = qe.Bm25(params.config())
        self.identity = f"bm25:edge-{_engine_version()}:w{_WRAPPER_VERSION}:{params.describe()}"
        """Names the engine version and every parameter: the cache key of sparse vectors."""

    def with_params(self, **changes: Any) -> LexicalEncoder:
        """Another encoder with some parameters changed (``k=0.9``...)."""
        return LexicalEncoder(replace(self.params, **changes))

    def embed_documents(self, texts: Sequence[str]) -> list[SparseVec]:
        """One vector per text, in order: term ids ascending, saturated TF weights."""
        return [_sparse(self._model.embed_document(t)) for t in texts]

    def embed_query(self, text: str) -> SparseVec:
        """The query's distinct terms, each with weight 1 (the engine applies the IDF)."""
        return _sparse(self._model.embed_query(text))

    def __repr__(self) -> str:
        return f"LexicalEncoder({self.identity!r})"


def _sparse(vec: Any) -> SparseVec:
    """The engine's vector as a SparseVec: ids ascending and distinct (a hash collision
    of two tokens keeps the larger weight)."""
    pairs: dict[int, float] = {}
    for i, v in zip(vec.indices, vec.values, strict=True):
        if v > pairs.get(i, float("-inf")):
            pairs[i] = float(v)
    order = sorted(pairs)
    return SparseVec(order, [pairs[i] for i in order])


@cache
def default_encoder() -> LexicalEncoder:
    """The encoder with the tuned settings, built once per process."""
    return LexicalEncoder(DEFAULT_PARAMS)
