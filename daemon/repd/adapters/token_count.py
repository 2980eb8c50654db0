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
from dataclasses import dataclass
from itertools import accumulate, chain
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
#: Remembered parts before the memory is emptied (a corpus's vocabulary fits: SciFact's
#: 5,183 documents have 96,200 distinct parts, ~15 MiB remembered; a stream of unique
#: strings, such as hashes, does not grow it without bound).
MAX_REMEMBERED = 100_000
#: Parts longer than this are counted every time, not remembered (a minified line, a
#: base64 blob: rarely seen twice, and costly to keep).
MAX_REMEMBERED_CHARS = 64
#: New parts up to this many are read in one tokenizer call over the parts joined by
#: spaces, not as a batch: a batch call hands its texts to the tokenizer's thread pool.
#: A first-time question's dozen new words: ~0.2 ms in the daemon as a batch, ~0.15 in one
#: call (74 against 36 us in a quiet process).
#: Larger sets (an indexing batch's new words) keep the batch and its parallelism.
ONE_CALL_PARTS = 64


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
    ``tokenizers.Tokenizer`` set up without truncation or padding), and, given
    ``embed_tokenizer`` (the same tokenizer with the model's truncation), the model's
    input ids.

    With an :func:`additive` tokenizer the ids of each distinct space-separated part
    are read once and remembered, and a text's are its parts' one after another;
    otherwise every text is counted whole and :meth:`encode` returns None. Thread-safe.
    """

    def __init__(self, tokenizer: Any, embed_tokenizer: Any = None) -> None:
        """Count with ``tokenizer``, remembering parts when it is additive."""
        self._tokenizer = tokenizer
        self._encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self.remembers = additive(tokenizer)
        self._known: dict[str, tuple[int, ...]] = {"": ()}
        # One int object per vocabulary entry, shared by every remembered part: ids
        # from the tokenizer are fresh objects of 28 bytes each (a third of the memory).
        size = getattr(tokenizer, "get_vocab_size", lambda **_: 0)(with_added_tokens=True)
        self._ints = list(range(size)) if self.remembers else []
        self._lock = threading.Lock()
        # Checked, not assumed: the one call must split into exactly the batch's ids.
        self._one_call = self.remembers and self._one_call_agrees()
        self._frame = (Frame.of(embed_tokenizer, self)
                       if self.remembers and embed_tokenizer is not None else None)

    def __call__(self, texts: Sequence[str]) -> list[int]:
        """The token count of each text."""
        if not self.remembers:
            return [len(e.ids) for e in self._whole(texts)]
        return [sum(map(len, parts)) for parts in self._part_ids(texts)]

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The token ids of each text, without special tokens or truncation."""
        if not self.remembers:
            return [list(e.ids) for e in self._whole(texts)]
        return [list(chain.from_iterable(parts)) for parts in self._part_ids(texts)]

    def encode(self, texts: Sequence[str], type_ids: bool,
               ) -> tuple[list[list[int]], list[list[int]] | None] | None:
        """The model's input ids (and token type ids when ``type_ids``) for each text,
        exactly as ``embed_tokenizer`` makes them; None when that cannot be done from
        remembered parts (then tokenize with it)."""
        frame = self._frame
        if frame is None:
            return None
        framed = [frame.ids(body) for body in self.ids(texts)]
        return framed, [frame.type_ids(len(ids)) for ids in framed] if type_ids else None

    def _part_ids(self, texts: Sequence[str]) -> list[list[tuple[int, ...]]]:
        split = [_parts(t) for t in texts]
        with self._lock:
            known = self._known
            new = set(chain.from_iterable(split)).difference(known)
            if not new:
                return [list(map(known.__getitem__, parts)) for parts in split]
            if len(known) + len(new) > MAX_REMEMBERED:
                # Start afresh; this call's own parts are all read again.
                known.clear()
                known[""] = ()
                new = set(chain.from_iterable(split)).difference(known)
            fresh = list(new)
            local = dict(zip(fresh, self._read(fresh), strict=True))
            for part, ids in local.items():
                if len(part) <= MAX_REMEMBERED_CHARS:
                    known[part] = ids
            return [[known[p] if p in known else local[p] for p in parts] for parts in split]

    def _whole(self, texts: Sequence[str]) -> list[Any]:
        """The tokenizer's encodings of whole texts (nothing remembered)."""
        return list(self._encode(list(texts), add_special_tokens=False))

    def _read(self, texts: list[str]) -> list[tuple[int, ...]]:
        """Parts' ids to remember, as tuples of the shared int objects."""
        ints = self._ints
        split = (self._split_one_call(texts)
                 if self._one_call and len(texts) <= ONE_CALL_PARTS else None)
        if split is None:
            split = [e.ids for e in self._whole(texts)]
        return [tuple([ints[i] if i < len(ints) else i for i in ids]) for ids in split]

    def _split_one_call(self, parts: Sequence[str]) -> list[list[int]] | None:
        """The ids of each part (none holds a space) from one tokenizer call over the
        parts joined by spaces, each token given to the part its offsets lie in; None
        if a token's offsets cross a part's end. Exact for an :func:`additive`
        tokenizer, whose tokens never span a space."""
        enc = self._tokenizer.encode(" ".join(parts), add_special_tokens=False)
        ends = list(accumulate(len(p) + 1 for p in parts))  # each part's end, plus its space
        out: list[list[int]] = [[] for _ in parts]
        j = 0
        for token, (start, end) in zip(enc.ids, enc.offsets, strict=True):
            while j < len(ends) and start >= ends[j]:
                j += 1
            if j == len(ends) or end >= ends[j]:
                return None
            out[j].append(token)
        return out

    def _one_call_agrees(self) -> bool:
        """Whether one call splits :data:`_SPLIT_CHECKS` into the batch's very ids."""
        try:
            want = [list(e.ids) for e in self._whole(_SPLIT_CHECKS)]
            return self._split_one_call(_SPLIT_CHECKS) == want
        except (AttributeError, TypeError, ValueError):
            return False


@dataclass(frozen=True, slots=True)
class Frame:
    """What a tokenizer adds around a text's ids for the model: special tokens before
    and after, and the truncation of the text's own ids to fit the model's limit."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    prefix_types: tuple[int, ...]
    body_type: int
    suffix_types: tuple[int, ...]
    #: Body ids kept (None: no truncation); from the end when ``left``.
    limit: int | None
    left: bool

    @classmethod
    def of(cls, embed_tokenizer: Any, counter: TokenCounter) -> Frame | None:
        """``embed_tokenizer``'s frame, read from its own output and then checked against
        it on texts short, long (truncated) and odd; None if anything differs."""
        try:
            whole = embed_tokenizer.encode(_FRAME_PROBE, add_special_tokens=True)
            body = counter.ids([_FRAME_PROBE])[0]
            ids = list(whole.ids)
            at = next(i for i in range(len(ids) - len(body) + 1)
                      if ids[i:i + len(body)] == body)
            types = list(whole.type_ids)
            body_types = set(types[at:at + len(body)])
            if len(body_types) != 1:
                return None
            trunc = embed_tokenizer.truncation
            specials = len(ids) - len(body)
            frame = cls(
                prefix=tuple(ids[:at]), suffix=tuple(ids[at + len(body):]),
                prefix_types=tuple(types[:at]), body_type=body_types.pop(),
                suffix_types=tuple(types[at + len(body):]),
                limit=None if trunc is None else max(0, int(trunc["max_length"]) - specials),
                left=trunc is not None and trunc.get("direction") == "left")
            checks = [_FRAME_PROBE, "", *_FRAME_CHECKS]
            want = embed_tokenizer.encode_batch(checks, add_special_tokens=True)
            for text, enc in zip(checks, want, strict=True):
                got = frame.ids(counter.ids([text])[0])
                if got != list(enc.ids) or frame.type_ids(len(got)) != list(enc.type_ids):
                    return None
            return frame
        except (StopIteration, AttributeError, TypeError, KeyError, ValueError):
            return None

    def ids(self, body: list[int]) -> list[int]:
        """``body`` truncated and framed with the special tokens."""
        if self.limit is not None and len(body) > self.limit:
            body = body[len(body) - self.limit:] if self.left else body[:self.limit]
        return [*self.prefix, *body, *self.suffix]

    def type_ids(self, n: int) -> list[int]:
        """The token type ids of framed ids ``n`` long."""
        inner = n - len(self.prefix) - len(self.suffix)
        return [*self.prefix_types, *[self.body_type] * inner, *self.suffix_types]


#: Texts a frame is read from and checked on: a plain sentence, one far over any
#: model's limit (truncation), and odd characters.
_FRAME_PROBE = "repd frames this sentence"
_FRAME_CHECKS = ("word " * 2000, "Ünïcödé 中文 e\u0301 [MASK] x" * 3, "tab\there\nnew line")
#: Parts (no space inside) the one-call split is checked on: words, punctuation inside
#: and around them, accents, CJK, control and zero-width characters, an unknown symbol.
_SPLIT_CHECKS = ["repd", "counts,", "(each)", "rotate_keys.sh", "Ünïcödé", "中文字",
                 "e\u0301", "[MASK]", "x\x0by", "\u200b", "a\u00a0b", "☃︎", "...", "GPT-4o's"]


def _parts(text: str) -> list[str]:
    """``text`` split at each space, tab, newline and carriage return (empty parts kept)."""
    for ch in _SPACES:  # str.replace is ~12x faster than str.translate here
        text = text.replace(ch, " ")
    return text.split(" ")
