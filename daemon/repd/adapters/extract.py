"""Extraction: raw bytes of a file -> a Document (text, kind), or SkipFile with a reason."""

from __future__ import annotations

import codecs
import errno
import html
import io
import os
import re
import stat
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

from repd.core.types import Document, SkipFile

_MARKDOWN = {".md", ".markdown", ".mdx", ".mkd"}
_RST = {".rst", ".rest"}
_HTML = {".html", ".htm", ".xhtml"}
_CODE = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript",
    ".cjs": "javascript", ".jsx": "javascript", ".ts": "typescript", ".tsx": "typescript",
    ".go": "go", ".rs": "rust", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp",
    ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp", ".java": "java", ".kt": "kotlin",
    ".kts": "kotlin", ".scala": "scala", ".swift": "swift", ".rb": "ruby", ".php": "php",
    ".cs": "csharp", ".sh": "shell", ".bash": "shell", ".zsh": "shell", ".fish": "shell",
    ".lua": "lua", ".r": "r", ".sql": "sql", ".css": "css", ".scss": "css", ".less": "css",
    ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json", ".ini": "ini",
    ".cfg": "ini", ".vue": "vue", ".svelte": "svelte", ".ex": "elixir", ".exs": "elixir",
    ".erl": "erlang", ".hs": "haskell", ".ml": "ocaml", ".clj": "clojure", ".el": "lisp",
    ".pl": "perl", ".pm": "perl", ".dart": "dart", ".zig": "zig", ".nim": "nim",
    ".proto": "protobuf", ".tf": "terraform", ".gradle": "groovy", ".groovy": "groovy",
}
_CODE_NAMES = {"Makefile": "make", "Dockerfile": "docker", "CMakeLists.txt": "cmake",
               "Justfile": "make", "Rakefile": "ruby", "Gemfile": "ruby"}
_BINARY_EXT = {
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ico", ".webp", ".tif", ".tiff", ".heic",
    ".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".tar", ".jar", ".war",
    ".exe", ".dll", ".so", ".dylib", ".o", ".a", ".lib", ".bin", ".class", ".pyc", ".pyo",
    ".wasm", ".mp3", ".mp4", ".m4a", ".wav", ".flac", ".ogg", ".mkv", ".mov", ".avi",
    ".webm", ".ttf", ".otf", ".woff", ".woff2", ".eot", ".sqlite", ".sqlite3", ".db",
    ".parquet", ".npy", ".npz", ".pt", ".pth", ".safetensors", ".onnx", ".pkl", ".iso",
    ".dmg", ".deb", ".rpm", ".doc", ".xls", ".ppt", ".odt", ".ods",
}
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
_CONTROL = set(range(0, 32)) - {9, 10, 12, 13, 27}


def read_file(path: Path, max_bytes: int) -> bytes:
    """The raw bytes of a regular file, or SkipFile saying why not."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SkipFile("vanished", "the file disappeared before it could be read") from None
    except OSError as exc:
        raise SkipFile("unreadable", _oserror(exc)) from None
    if not stat.S_ISREG(st.st_mode):
        raise SkipFile("not_a_file", "not a regular file")
    if st.st_size > max_bytes:
        raise SkipFile("too_large", f"{st.st_size} bytes, over the limit of {max_bytes}")
    try:
        # O_NONBLOCK: a FIFO swapped in after the stat must not hang the indexer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SkipFile("vanished", "the file disappeared before it could be read") from None
    except OSError as exc:
        raise SkipFile("unreadable", _oserror(exc)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SkipFile("not_a_file", "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise SkipFile("unreadable", _oserror(exc)) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise SkipFile("too_large", f"grew past the limit of {max_bytes} bytes while read")
    return data


def _oserror(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    return exc.strerror or str(exc)


def extract_bytes(data: bytes, filename: str) -> Document:
    """Decode and extract the text of one file, choosing the kind by its name."""
    name = filename.rsplit("/", 1)[-1]
    ext = Path(name).suffix.lower()
    if ext in _BINARY_EXT:
        raise SkipFile("binary", f"{ext} files hold no text")
    if ext == ".pdf":
        return _pdf(data)
    text, encoding = decode(data)
    if not text.strip():
        raise SkipFile("empty", "no text")
    if ext in _MARKDOWN:
        return Document(text, "markdown", None, encoding)
    if ext in _RST:
        return Document(text, "rst", None, encoding)
    if ext in _HTML:
        visible = html_text(text)
        if not visible.strip():
            raise SkipFile("empty", "no visible text")
        return Document(visible, "html", None, encoding)
    lang = _CODE.get(ext) or _CODE_NAMES.get(name)
    if lang:
        return Document(text, "code", lang, encoding)
    return Document(text, "text", None, encoding)


def decode(data: bytes) -> tuple[str, str]:
    """Text and the encoding used: BOMs first, then UTF-8, then a careful fallback."""
    for bom, enc in _BOMS:
        if data.startswith(bom):
            try:
                return _norm(data.decode(enc)), enc
            except UnicodeDecodeError as exc:
                raise SkipFile("decode_error", f"{enc} with BOM, but {exc.reason}") from None
    head = data[:8192]
    if b"\x00" in head:
        raise SkipFile("binary", "NUL bytes in the first 8 KiB")
    if head and sum(b in _CONTROL for b in head) / len(head) > 0.10:
        raise SkipFile("binary", "too many control characters")
    try:
        return _norm(data.decode("utf-8")), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        from charset_normalizer import from_bytes

        best = from_bytes(data).best()
        if best is not None and best.encoding:
            return _norm(str(best)), str(best.encoding)
    except ImportError:
        pass
    # cp1252 maps almost every byte; what it cannot map is replaced rather than lost.
    return _norm(data.decode("cp1252", errors="replace")), "cp1252"


def _norm(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


class _Visible(HTMLParser):
    _HIDDEN: ClassVar[set[str]] = {"script", "style", "head", "noscript", "template", "svg",
                                   "iframe"}
    _BLOCK: ClassVar[set[str]] = {
        "p", "div", "section", "article", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5",
        "h6", "tr", "table", "pre", "blockquote", "header", "footer", "main", "nav", "aside",
        "dd", "dt", "figure", "figcaption", "hr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def html_text(markup: str) -> str:
    """The visible text of an HTML page, blocks separated by blank lines."""
    parser = _Visible()
    parser.feed(markup)
    parser.close()
    text = html.unescape("".join(parser.parts))
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _pdf(data: bytes) -> Document:
    try:
        from pypdf import PdfReader

        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise SkipFile("extract_error", "encrypted PDF")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except SkipFile:
        raise
    except Exception as exc:
        raise SkipFile("extract_error", f"unreadable PDF: {type(exc).__name__}: {exc}") from None
    text = _norm("\n\n".join(p for p in pages if p))
    if not text.strip():
        raise SkipFile("empty", "the PDF has no extractable text (scanned?)")
    return Document(text + "\n", "pdf", None, "pdf")
