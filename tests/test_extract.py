"""Reading files safely and extracting text: encodings, binaries, odd files, HTML, PDF."""

from __future__ import annotations

import builtins
import errno
import io
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from repd.adapters.extract import extract_bytes, html_to_text, read_file
from repd.core.types import Document, SkipFile
from repd.errors import TransientError

PROSE = "Glaciers carve valleys as they move, grinding rock beneath tons of ice."


def skip_reason(fn: Any, *args: Any) -> SkipFile:
    with pytest.raises(SkipFile) as info:
        fn(*args)
    return info.value


def extract_file(path: Path, max_bytes: int = 1_000_000) -> Document:
    return extract_bytes(read_file(path, max_bytes), path.name)


def minimal_pdf(pages: list[str]) -> bytes:
    """A valid PDF written by hand: one Helvetica text line per page."""
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>"
        % (" ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages))).encode(), len(pages)),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, text in enumerate(pages):
        content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objs.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (5 + 2 * i)
        )
        objs.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def encrypted_pdf(user_password: str) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(minimal_pdf(["Secret launch codes"]))))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


# --- read_file ------------------------------------------------------------------------


def test_reads_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"hello\n")
    assert read_file(path, 100) == b"hello\n"
    assert read_file(path, 6) == b"hello\n"  # exactly at the limit is fine


def test_too_large_names_both_sizes(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * 101)
    skip = skip_reason(read_file, path, 100)
    assert skip.reason == "too_large"
    assert "101" in skip.detail and "100" in skip.detail


def test_vanished_file(tmp_path: Path) -> None:
    skip = skip_reason(read_file, tmp_path / "gone.txt", 100)
    assert skip.reason == "vanished"


def test_dangling_symlink_is_vanished(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    skip = skip_reason(read_file, tmp_path / "link", 100)
    assert (skip.reason, skip.detail) == ("vanished", "dangling symlink")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    skip = skip_reason(read_file, tmp_path, 100)
    assert (skip.reason, skip.detail) == ("not_a_file", "directory")


def test_fifo_is_not_a_file_and_never_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    # Opening a FIFO for reading blocks until a writer appears; run it aside so a
    # regression fails this test instead of hanging the suite.
    worker = threading.Thread(target=lambda: result.append(skip_reason(read_file, fifo, 100)))
    worker.daemon = True
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "read_file blocked on a FIFO"
    assert isinstance(result[0], SkipFile)
    assert (result[0].reason, result[0].detail) == ("not_a_file", "FIFO")


def test_symlink_loop_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    skip = skip_reason(read_file, tmp_path / "a", 100)
    assert skip.reason == "unreadable" and "loop" in skip.detail


def test_permission_denied_is_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("cannot be read")
    if os.geteuid() == 0:
        # chmod 000 does not stop root: make the open itself fail the way it would.
        real_open = os.open

        def denied(p: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if str(p) == str(path):
                raise PermissionError(errno.EACCES, "Permission denied", str(p))
            return real_open(p, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", denied)
        monkeypatch.setattr(builtins, "open", lambda *a, **k: denied(a[0], 0))
    else:
        path.chmod(0)
    skip = skip_reason(read_file, path, 100)
    assert skip.reason == "unreadable" and "denied" in skip.detail


def test_other_os_errors_are_unreadable_with_their_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "flaky.txt"
    path.write_text(PROSE)

    def broken(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.ENXIO, "No such device or address")

    monkeypatch.setattr(os, "open", broken)
    skip = skip_reason(read_file, path, 1000)
    assert skip.reason == "unreadable" and "No such device" in skip.detail


@pytest.mark.parametrize("code", [errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM])
def test_transient_os_errors_are_not_recorded_against_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    # Out of descriptors or an I/O hiccup says nothing about the file: it must be
    # retried later, never recorded as unreadable (which dropped its points).
    path = tmp_path / "flaky.txt"
    path.write_text(PROSE)

    def broken(*args: Any, **kwargs: Any) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "open", broken)
    with pytest.raises(TransientError, match=r"flaky\.txt"):
        read_file(path, 1000)


@pytest.mark.parametrize("name", ["with spaces.md", "new\nline.md", "ñandú ü 日本.md"])
def test_odd_file_names(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(PROSE + "\n", encoding="utf-8")
    doc = extract_file(path)
    assert doc.kind == "markdown" and doc.text == PROSE + "\n"


# --- encodings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        (PROSE.encode("utf-8"), "utf-8"),
        (b"\xef\xbb\xbf" + PROSE.encode("utf-8"), "utf-8-sig"),
        (b"\xff\xfe" + PROSE.encode("utf-16-le"), "utf-16-le"),
        (b"\xfe\xff" + PROSE.encode("utf-16-be"), "utf-16-be"),
        (b"\xff\xfe\x00\x00" + PROSE.encode("utf-32-le"), "utf-32-le"),
        (b"\x00\x00\xfe\xff" + PROSE.encode("utf-32-be"), "utf-32-be"),
    ],
)
def test_unicode_encodings_and_boms(tmp_path: Path, data: bytes, encoding: str) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(data)
    doc = extract_file(path)
    assert (doc.text, doc.encoding, doc.kind) == (PROSE, encoding, "text")


def test_cp1252_text(tmp_path: Path) -> None:
    text = "Café crème brûlée à la française – “quoted” for 5 €."
    path = tmp_path / "latin.txt"
    path.write_bytes(text.encode("cp1252"))
    doc = extract_file(path)
    assert (doc.text, doc.encoding) == (text, "cp1252")


def test_invalid_utf8_falls_back_to_a_legacy_codec(tmp_path: Path) -> None:
    path = tmp_path / "broken.txt"
    path.write_bytes(b"valid start \xff\xfe\xfa then more text here")
    doc = extract_file(path)
    assert doc.encoding == "cp1252"
    assert doc.text == "valid start ÿþú then more text here"


def test_mostly_utf8_with_a_stray_byte_stays_utf8(tmp_path: Path) -> None:
    path = tmp_path / "mixed.txt"
    path.write_bytes("naïve café déjà vu, señor — ".encode() * 3 + b"stray \xff byte")
    doc = extract_file(path)
    assert doc.encoding == "utf-8 (invalid bytes replaced)"
    assert doc.text.startswith("naïve café") and "\ufffd" in doc.text


def test_cyrillic_legacy_text_is_detected(tmp_path: Path) -> None:
    text = "Съешь же ещё этих мягких французских булок, да выпей чаю. " * 3
    path = tmp_path / "ru.txt"
    path.write_bytes(text.encode("cp1251"))
    doc = extract_file(path)
    assert doc.text == text.replace("\r", "")


def test_newlines_are_normalized(tmp_path: Path) -> None:
    path = tmp_path / "crlf.md"
    path.write_bytes(b"one\r\ntwo\rthree\n")
    assert extract_file(path).text == "one\ntwo\nthree\n"


def test_invalid_utf16_after_bom_is_a_decode_error() -> None:
    skip = skip_reason(extract_bytes, b"\xff\xfe" + b"\x00\xd8" + b"a\x00", "odd.txt")
    assert skip.reason == "decode_error"


# --- binary, empty --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("image.png", b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + os.urandom(64)),
        ("image.dat", b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + os.urandom(64)),
        ("header-only", b"\x89PNG\r\n\x1a\n"),
        ("random.bin.txt", bytes(range(256)) * 8),
        ("nul.txt", b"text with a \x00 NUL in it"),
        ("controls.txt", b"\x01\x02\x03\x04\x05\x06\x07\x08 some text" * 10),
        ("utf16-no-bom.txt", PROSE.encode("utf-16-le")),
        ("archive.tar.gz", PROSE.encode()),  # known binary extension: never looked at
        ("module.pyc", PROSE.encode()),
        ("data.sqlite", PROSE.encode()),
    ],
)
def test_binary_files_are_skipped(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    skip = skip_reason(extract_file, path)
    assert skip.reason == "binary" and skip.detail


@pytest.mark.parametrize(("data", "detail"), [(b"", "zero bytes"), (b" \n\t\r\n  \n", "no text")])
def test_empty_and_whitespace_only(tmp_path: Path, data: bytes, detail: str) -> None:
    path = tmp_path / "blank.md"
    path.write_bytes(data)
    skip = skip_reason(extract_file, path)
    assert (skip.reason, skip.detail) == ("empty", detail)


# --- kinds ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "language"),
    [
        ("README.md", "markdown", None),
        ("notes.markdown", "markdown", None),
        ("page.mdx", "markdown", None),
        ("index.rst", "rst", None),
        ("main.py", "code", "python"),
        ("app.tsx", "code", "tsx"),
        ("lib.rs", "code", "rust"),
        ("x.h", "code", "c"),
        ("x.hpp", "code", "cpp"),
        ("Main.kt", "code", "kotlin"),
        ("run.sh", "code", "shell"),
        ("conf.yaml", "code", "yaml"),
        ("Cargo.toml", "code", "toml"),
        ("Makefile", "code", "make"),
        ("Dockerfile", "code", "dockerfile"),
        ("Dockerfile.dev", "code", "dockerfile"),
        ("CMakeLists.txt", "code", "cmake"),
        ("notes.txt", "text", None),
        ("server.log", "text", None),
        ("table.csv", "text", None),
        ("LICENSE", "text", None),
        ("weird.xyz", "text", None),
    ],
)
def test_kind_by_name(name: str, kind: str, language: str | None) -> None:
    doc = extract_bytes(b"some content\n", name)
    assert (doc.kind, doc.language) == (kind, language)


def test_shebang_names_the_language_of_a_bare_script() -> None:
    doc = extract_bytes(b"#!/usr/bin/env python3\nprint('hi')\n", "tool")
    assert (doc.kind, doc.language) == ("code", "python")
    assert extract_bytes(b"#!/bin/bash\necho hi\n", "deploy").language == "shell"


def test_html_keeps_visible_text_only(tmp_path: Path) -> None:
    markup = """<!DOCTYPE html><html><head><title>Head title</title>
    <style>body { color: red }</style><script>var hidden = 1;</script></head>
    <body><noscript>enable js</noscript><template><p>template text</p></template>
    <h1>Fish &amp; Chips</h1>
    <p>First   paragraph
       spans lines &lt;really&gt;.</p>
    <div>Second<br>line two</div>
    <ul><li>apples</li><li>pears</li></ul>
    <script type="module">alert("no")</script>
    <pre>def f():
    return 1</pre>
    <table><tr><td>a</td><td>b</td></tr></table>
    </body></html>"""
    path = tmp_path / "page.html"
    path.write_text(markup)
    doc = extract_file(path)
    assert doc.kind == "html"
    assert doc.text == (
        "Fish & Chips\n\nFirst paragraph spans lines <really>.\n\nSecond\nline two\n\n"
        "apples\npears\n\ndef f():\n    return 1\n\na | b"
    )
    for hidden in ("Head title", "color", "hidden", "enable js", "template text", "alert"):
        assert hidden not in doc.text


def test_html_without_visible_text_is_empty() -> None:
    skip = skip_reason(extract_bytes, b"<html><script>x()</script></html>", "a.htm")
    assert skip.reason == "empty"
    assert html_to_text("<p>a</p><p>b</p>") == "a\n\nb"


# --- PDF ------------------------------------------------------------------------------


def test_pdf_pages_are_extracted(tmp_path: Path) -> None:
    path = tmp_path / "paper.pdf"
    path.write_bytes(minimal_pdf(["Hello PDF world", "Second page here"]))
    doc = extract_file(path)
    assert (doc.kind, doc.encoding) == ("pdf", "pdf")
    assert doc.text == "Hello PDF world\n\f\nSecond page here"


def test_corrupt_pdf_is_an_extract_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 9 0 R >> garbage")
    skip = skip_reason(extract_file, path)
    assert skip.reason == "extract_error" and "PDF" in skip.detail


def test_password_protected_pdf_is_an_extract_error() -> None:
    skip = skip_reason(extract_bytes, encrypted_pdf("secret"), "locked.pdf")
    assert (skip.reason, skip.detail) == ("extract_error", "encrypted PDF")


def test_pdf_encrypted_with_an_empty_user_password_opens() -> None:
    # Such PDFs open in any viewer without a prompt; only their permissions are locked.
    doc = extract_bytes(encrypted_pdf(""), "permissions-only.pdf")
    assert doc.text == "Secret launch codes"


def test_pdf_without_text_is_empty() -> None:
    skip = skip_reason(extract_bytes, minimal_pdf([""]), "scan.pdf")
    assert skip.reason == "empty"
