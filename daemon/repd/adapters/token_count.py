"""Token counts for the chunker, remembered per word where the tokenizer allows it.

The chunker counts every document about three times over (whole blocks, the pieces of
oversized ones, the final chunk texts) and the indexer once more to sort a group by
length: on SciFact through OpenVINO that was 10 % of `repd index` (4.9 s of 50 s for
1,500 documents), all of it the tokenizer re-reading words it had already read.

For a WordPiece tokenizer whose normalizer works one character at a time and whose
pre-tokenizer splits at whitespace (BERT's, as in MiniLM, BGE, E5, GTE), a space, tab,
newline or carriage return always ends a word and never yields a token, so the tokens
of a text are the tokens of its space-separated parts, one after another: its count
is the sum of theirs. :class:`TokenCounter` then counts each distinct part once and
remembers it. Any other tokenizer (byte-level BPE, SentencePiece, whose tokens carry
the space before them) is counted whole, every time, as before: the counts are the
tokenizer's in both cases, so chunks and their identity do not change.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from itertools import chain
from typing import Any

#: The tokenizer parts under which a text's count is the sum of its parts' counts when
#: it is split at ASCII whitespace (each works per character, or splits at whitespace).
_NORMALIZERS = frozenset({"BertNormalizer", "Lowercase", "StripAccents", "NFD"})
_PRE_TOKENIZERS = frozenset({"BertPreTokenizer", "Whitespace", "WhitespaceSplit"})
_MODELS = frozenset({"WordPiece"})
#: Only these split a text into parts. Not every whitespace character: BERT's
#: normalizer deletes control characters such as a vertical tab before it looks for
#: whitespace, so "a\x0bb" is one word there.
_SPACES = ("\t", "\n", "\r")
#: Remembered parts before the memory is emptied (a corpus's vocabulary fits; a stream
#: of unique strings, such as hashes, does not grow it without bound).
MAX_REMEMBERED = 200_000
#: Parts longer than this are counted every time, not remembered (a minified line, a
#: base64 blob: rarely seen twice, and costly to keep).
MAX_REMEMBERED_CHARS = 64


def additive(tokenizer: Any) -> bool:
    """Whether ``tokenizer``'s count of a text is the sum over its space-separated parts.

    Read from the tokenizer's own serialized pipeline: a WordPiece model, a normalizer
    of per-character steps (or none), a pre-tokenizer that splits at whitespace, and
    no added token with whitespace inside (an added token is matched in the raw text,
    so one spanning a space would be cut by the split).
    """
    try:
        spec = json.loads(tokenizer.to_str())
    except (AttributeError, TypeError, ValueError):
        return False
    return (
        _kind(spec.get("model")) <= _MODELS
        and _kind(spec.get("normalizer")) <= _NORMALIZERS
        and bool(_kind(spec.get("pre_tokenizer")))
        and _kind(spec.get("pre_tokenizer")) <= _PRE_TOKENIZERS
        and not any(ch.isspace() for tok in spec.get("added_tokens") or []
                    for ch in str(tok.get("content", "")))
    )


def _kind(part: Any) -> set[str]:
    """The step types of a tokenizer part (a ``Sequence``'s members); "?" if unknown."""
    if part is None:
        return set()
    if not isinstance(part, dict):
        return {"?"}
    if part.get("type") == "Sequence":
        members = part.get("normalizers") or part.get("pretokenizers") or []
        kinds: set[str] = set()
        for m in members:
            kinds |= _kind(m)
        return kinds or {"?"}
    return {str(part.get("type"))}


class TokenCounter:
    """Tokens per text without special tokens or truncation, by ``tokenizer`` (a
    ``tokenizers.Tokenizer`` set up without truncation or padding).

    With an :func:`additive` tokenizer each distinct space-separated part is counted
    once and remembered; otherwise every text is counted whole. Thread-safe.
    """

    def __init__(self, tokenizer: Any) -> None:
        """Count with ``tokenizer``, remembering parts when it is additive."""
        self._tokenizer = tokenizer
        self._encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self.remembers = additive(tokenizer)
        self._known: dict[str, int] = {"": 0}
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str]) -> list[int]:
        """The token count of each text."""
        if not self.remembers:
            return self._count(list(texts))
        split = [_parts(t) for t in texts]
        with self._lock:
            known = self._known
            new = set(chain.from_iterable(split)).difference(known)
            if new:
                if len(known) + len(new) > MAX_REMEMBERED:
                    # Start afresh; this call's own parts are all counted again.
                    known.clear()
                    known[""] = 0
                    new = set(chain.from_iterable(split)).difference(known)
                fresh = list(new)
                long: dict[str, int] = {}
                for part, n in zip(fresh, self._count(fresh), strict=True):
                    if len(part) > MAX_REMEMBERED_CHARS:
                        long[part] = n
                    else:
                        known[part] = n
                if long:
                    return [sum(known[p] if p in known else long[p] for p in parts)
                            for parts in split]
            return [sum(map(known.__getitem__, parts)) for parts in split]

    def _count(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._encode(texts, add_special_tokens=False)]


def _parts(text: str) -> list[str]:
    """``text`` split at each space, tab, newline and carriage return (empty parts kept)."""
    for ch in _SPACES:  # str.replace is ~12x faster than str.translate here
        text = text.replace(ch, " ")
    return text.split(" ")
