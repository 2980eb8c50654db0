"""Extraction: read a file's bytes safely and turn them into a Document (or SkipFile)."""

from __future__ import annotations

import codecs
import errno
import io
import os
import stat
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path, PurePath

from repd.core.secrets import SecretPolicy
from repd.core.types import Document, SkipFile
from repd.errors import TransientError, is_transient

_SNIFF = 8192

# Extensions whose content is never text worth indexing; skipped without a look.
_BINARY_EXT = frozenset(
    """png jpg jpeg gif bmp ico icns webp tif tiff psd heic heif avif raw cr2 nef xcf
    zip tar gz tgz bz2 xz lz lzma 7z rar zst lz4 jar war ear apk ipa aar deb rpm dmg iso img
    whl egg exe dll so dylib a o obj lib bin elf class pyc pyo pyd wasm dex
    sqlite sqlite3 db mdb accdb parquet feather arrow orc avro npy npz pkl pickle joblib
    h5 hdf5 nc onnx pt pth ckpt safetensors tflite pb gguf
    mp3 wav flac ogg oga opus m4a aac wma mid midi mp4 m4v mkv avi mov webm wmv flv mpg mpeg
    ttf otf woff woff2 eot doc docx xls xlsx ppt pptx odt ods odp epub
    swf blend fbx glb stl dwg pcap lockb""".split()
)
# Leading bytes of common binary formats, for files with a misleading or no extension.
_MAGIC = (
    b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"PK\x03\x04", b"\x1f\x8b",
    b"\x7fELF", b"\xca\xfe\xba\xbe", b"\xcf\xfa\xed\xfe", b"SQLite format 3\x00",
    b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"\x00asm",
    b"OggS", b"fLaC", b"ID3", b"RIFF", b"\x00\x00\x01\x00",
)  # fmt: skip
_MARKDOWN_EXT = frozenset({"md", "markdown", "mdx", "mdown", "mkd", "mkdn"})
_HTML_EXT = frozenset({"html", "htm", "xhtml", "shtml"})
_CODE_EXT: dict[str, str] = {
    **dict.fromkeys(("py", "pyi", "pyw", "pyx"), "python"),
    **dict.fromkeys(("js", "mjs", "cjs"), "javascript"),
    **dict.fromkeys(("ts", "mts", "cts"), "typescript"),
    "tsx": "tsx", "jsx": "jsx", "go": "go", "rs": "rust", "c": "c", "h": "c",
    **dict.fromkeys(("cc", "cpp", "cxx", "c++", "hpp", "hh", "hxx", "h++", "ipp"), "cpp"),
    "java": "java", "kt": "kotlin", "kts": "kotlin", "scala": "scala", "sc": "scala",
    "swift": "swift", "rb": "ruby", "rake": "ruby", "gemspec": "ruby", "php": "php",
    "cs": "csharp", "fs": "fsharp", "vb": "vbnet", "m": "objc", "mm": "objc",
    **dict.fromkeys(("sh", "bash", "zsh", "ksh", "fish"), "shell"),
    "ps1": "powershell", "bat": "batch", "cmd": "batch", "lua": "lua", "r": "r",
    "jl": "julia", "pl": "perl", "pm": "perl", "sql": "sql", "css": "css", "scss": "scss",
    "sass": "sass", "less": "less", "yaml": "yaml", "yml": "yaml", "toml": "toml",
    "json": "json", "jsonc": "json", "json5": "json", "ipynb": "json", "ini": "ini",
    "cfg": "ini", "conf": "ini", "properties": "ini", "xml": "xml", "xsd": "xml",
    "svg": "xml", "plist": "xml", "vue": "vue", "svelte": "svelte", "dart": "dart",
    "ex": "elixir", "exs": "elixir", "erl": "erlang", "hrl": "erlang", "hs": "haskell",
    "ml": "ocaml", "mli": "ocaml", "clj": "clojure", "cljs": "clojure", "el": "elisp",
    "lisp": "lisp", "scm": "scheme", "groovy": "groovy", "gradle": "groovy", "tf": "hcl",
    "hcl": "hcl", "proto": "protobuf", "graphql": "graphql", "gql": "graphql",
    "cmake": "cmake", "mk": "make", "nix": "nix", "zig": "zig", "nim": "nim",
    "f90": "fortran", "f": "fortran", "asm": "assembly", "s": "assembly", "vim": "vim",
    "tex": "latex", "sty": "latex", "bzl": "starlark", "star": "starlark",
    "dockerfile": "dockerfile", "cu": "cuda", "cuh": "cuda", "sol": "solidity",
}  # fmt: skip
_CODE_NAMES: dict[str, str] = {
    "makefile": "make", "gnumakefile": "make", "dockerfile": "dockerfile",
    "containerfile": "dockerfile", "cmakelists.txt": "cmake", "jenkinsfile": "groovy",
    "gemfile": "ruby", "rakefile": "ruby", "vagrantfile": "ruby", "podfile": "ruby",
    "build": "starlark", "workspace": "starlark", "justfile": "just", ".bashrc": "shell",
    ".zshrc": "shell", ".profile": "shell", ".bash_profile": "shell",
}  # fmt: skip
_SHEBANGS = {"python": "python", "node": "javascript", "ruby": "ruby", "perl": "perl",
             "bash": "shell", "sh": "shell", "zsh": "shell", "lua": "lua"}  # fmt: skip
_CONTROL_BYTES = bytes([*range(0, 9), *range(14, 27), *range(28, 32), 127])
_CONTROL_CHARS = dict.fromkeys([*range(0, 9), *range(14, 27), *range(28, 32), *range(127, 160)])
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "utf-32"), (codecs.BOM_UTF32_BE, "utf-32-be", "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig", "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16-le", "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "utf-16"),
)  # fmt: skip


def read_file(path: Path, max_bytes: int, *, expect: os.stat_result | None = None,
              follow_symlinks: bool = True, within: Sequence[str] = ()) -> bytes:
    """Read a regular file's bytes, or raise SkipFile saying why it cannot be indexed.

    Never blocks on a FIFO or device: the type is checked with ``stat`` first and the
    file is opened non-blocking, then checked again on the open descriptor (the path
    may have been swapped in between).

    The check and the use must be about the same file (issue: a file swapped for a
    symlink between the scan and the read made repd index a file outside the roots):

    * ``follow_symlinks=False`` opens with ``O_NOFOLLOW``: a last component that is (now)
      a symlink is refused;
    * ``expect``, the stat the caller checked, must name the opened file (same device
      and inode), else SkipFile ``replaced`` (the caller checks again and retries);
    * ``within``, resolved folders: the opened file must really lie below one of them
      (checked on the descriptor through /proc, so a folder of the path swapped for a
      symlink is caught too), else SkipFile ``outside_roots``.

    Errors that say nothing about the file (EMFILE, ENOMEM, EIO...) raise TransientError:
    they must not be recorded against it.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        st = Path(path).stat() if follow_symlinks else Path(path).lstat()
        if not follow_symlinks and stat.S_ISLNK(st.st_mode):
            raise SkipFile("replaced" if expect is not None else "symlink",
                           "symlinks are not followed")
        _check_stat(st, max_bytes)
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SkipFile("vanished", _vanished_detail(path)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:  # O_NOFOLLOW met a symlink
            raise SkipFile("replaced" if expect is not None else "symlink",
                           "symlinks are not followed") from None
        raise _read_error(path, exc) from None
    try:
        fst = os.fstat(fd)
        if expect is not None and (fst.st_dev, fst.st_ino) != (expect.st_dev, expect.st_ino):
            raise SkipFile("replaced", "the file was replaced while being read")
        _check_stat(fst, max_bytes)
        if within:
            _check_within(fd, path, within)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise _read_error(path, exc) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise SkipFile("too_large", f"grew past {max_bytes} bytes while being read")
    return data


def _read_error(path: Path, exc: OSError) -> Exception:
    if is_transient(exc):
        return TransientError(f"cannot read {path}: {exc.strerror or exc}")
    return _unreadable(exc)


def _check_within(fd: int, path: Path, within: Sequence[str]) -> None:
    """Refuse an open file that does not really lie below one of ``within``."""
    try:
        real = str(Path(f"/proc/self/fd/{fd}").readlink())
    except OSError:  # no /proc: resolve the path instead (racy, but better than nothing)
        real = os.path.realpath(path)
    if real.endswith(" (deleted)") and not os.path.lexists(real):
        raise SkipFile("vanished", "no such file")
    if not any(real.startswith(base.rstrip("/") + "/") for base in within):
        raise SkipFile("outside_roots", "the file lies outside the indexed roots")


def _check_stat(st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = {stat.S_IFDIR: "directory", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket",
                stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}  # fmt: skip
        raise SkipFile("not_a_file", kind.get(stat.S_IFMT(st.st_mode), "not a regular file"))
    if st.st_size > max_bytes:
        raise SkipFile("too_large", f"{st.st_size} bytes > limit {max_bytes}")


def _vanished_detail(path: Path) -> str:
    return "dangling symlink" if Path(path).is_symlink() else "no such file"


def _unreadable(exc: OSError) -> SkipFile:
    if exc.errno == errno.ELOOP:
        return SkipFile("unreadable", "symlink loop (too many levels of symbolic links)")
    if isinstance(exc, PermissionError):
        return SkipFile("unreadable", "permission denied")
    return SkipFile("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}")


def extract_bytes(data: bytes, filename: str) -> Document:
    """Turn raw bytes into a Document, choosing the kind by the file's name and content.

    Raises SkipFile (``binary``, ``empty``, ``decode_error``, ``extract_error``) when
    there is nothing to index. Newlines become ``\\n``; ``encoding`` records the codec.
    """
    name = PurePath(filename).name.lower()
    ext = name.rpartition(".")[2] if "." in name.lstrip(".") else ""
    if ext in _BINARY_EXT:
        raise SkipFile("binary", f".{ext} file")
    if ext == "pdf" or (not ext and data.startswith(b"%PDF-")):
        return _pdf(data)
    if data.startswith(_MAGIC):
        raise SkipFile("binary", "binary file signature")
    text, encoding = _decode(data)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise SkipFile("empty", "no text" if text else "zero bytes")
    if ext in _MARKDOWN_EXT:
        return Document(text, "markdown", None, encoding)
    if ext in ("rst", "rest"):
        return Document(text, "rst", None, encoding)
    if ext in _HTML_EXT or (
        not ext and text.lstrip()[:15].lower().startswith(("<!doctype html", "<html"))
    ):
        visible = html_to_text(text)
        if not visible.strip():
            raise SkipFile("empty", "HTML without visible text")
        return Document(visible, "html", None, encoding)
    language = _CODE_NAMES.get(name) or _CODE_EXT.get(ext)
    if language is None and name.startswith("dockerfile"):
        language = "dockerfile"
    if language is None and not ext and text.startswith("#!"):
        first = text.split("\n", 1)[0].replace("/", " ").split()
        language = next((_SHEBANGS[w.rstrip("0123456789.")] for w in reversed(first)
                         if w.rstrip("0123456789.") in _SHEBANGS), None)  # fmt: skip
    if language is not None:
        return Document(text, "code", language, encoding)
    return Document(text, "text", None, encoding)


def _decode(data: bytes) -> tuple[str, str]:
    """Decode by BOM, then UTF-8, then a legacy codec when the bytes still look like text."""
    for bom, name, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec), name
            except UnicodeDecodeError as exc:
                raise SkipFile(
                    "decode_error", f"invalid {name} after its BOM: {exc.reason}"
                ) from None
    sample = data[:_SNIFF]
    if b"\x00" in sample:
        raise SkipFile("binary", "NUL bytes")
    if sample and len(sample) - len(sample.translate(None, _CONTROL_BYTES)) > len(sample) // 10:
        raise SkipFile("binary", "control characters")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    replaced = data.decode("utf-8", "replace")
    bad = replaced.count("\ufffd")
    good = len(replaced) - len(replaced.encode("ascii", "ignore")) - bad  # non-ASCII chars
    # Legacy single-byte text almost never forms valid UTF-8 sequences by chance, so
    # many valid ones around a few bad bytes mean UTF-8 with damage, not cp1252.
    if good >= 4 * bad:
        return replaced, "utf-8 (invalid bytes replaced)"
    text, encoding = _decode_legacy(data)
    if _control_share(text) > 0.05:
        raise SkipFile("binary", f"does not look like text as {encoding}")
    return text, encoding


def _control_share(text: str) -> float:
    sample = text[:_SNIFF]
    return (len(sample) - len(sample.translate(_CONTROL_CHARS))) / max(len(sample), 1)


def _decode_legacy(data: bytes) -> tuple[str, str]:
    """A single-byte Western codec for text with scattered accents; else ask a detector."""
    high = [i for i, b in enumerate(data[: 8 * _SNIFF]) if b > 127]
    isolated = sum(
        1 for k, i in enumerate(high)
        if (k == 0 or high[k - 1] != i - 1) and (k + 1 == len(high) or high[k + 1] != i + 1)
    )  # fmt: skip
    # Accented Latin text has lone high bytes among ASCII letters; Cyrillic, Greek or
    # CJK legacy encodings have runs of them, which cp1252 would turn into mojibake.
    # A detector needs a fair amount of such text: on a few stray bytes it guesses wildly.
    if len(high) >= 32 and isolated * 2 < len(high):
        detected = _detect(data)
        if detected is not None:
            return detected
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def _detect(data: bytes) -> tuple[str, str] | None:
    try:
        from charset_normalizer import from_bytes
    except ImportError:  # optional: a transitive dependency, not a declared one
        return None
    best = from_bytes(data[: 8 * _SNIFF]).best()
    if best is None or best.encoding is None:
        return None
    return data.decode(best.encoding, "replace"), best.encoding


def _pdf(data: bytes) -> Document:
    """Text of every page (pypdf), pages separated by a form feed on its own line."""
    try:
        from pypdf import PdfReader

        reader = PdfReader(io.BytesIO(data), strict=False)
        # An empty user password still opens many "encrypted" PDFs (permissions only).
        if reader.is_encrypted and not reader.decrypt(""):
            raise SkipFile("extract_error", "encrypted PDF")
        pages = [page.extract_text() or "" for page in reader.pages]
    except SkipFile:
        raise
    except Exception as exc:  # pypdf raises many types on damaged files
        raise SkipFile("extract_error", f"PDF: {type(exc).__name__}: {exc}") from None
    text = "\n\f\n".join(p.replace("\r\n", "\n").replace("\r", "\n").strip() for p in pages)
    if not text.replace("\f", "").strip():
        raise SkipFile("empty", "PDF without a text layer")
    return Document(text, "pdf", None, "pdf")


_SKIP_TAGS = frozenset({"script", "style", "head", "noscript", "template", "svg", "math"})
_BLOCK_TAGS = frozenset(
    """p div section article header footer nav aside main h1 h2 h3 h4 h5 h6 ul ol dl table
    blockquote pre hr form fieldset address figure figcaption details summary body
    caption thead tbody tfoot""".split()
)
_LINE_TAGS = frozenset({"br", "li", "dt", "dd", "tr", "option"})
_CELL_TAGS = frozenset({"td", "th"})


class _TextParser(HTMLParser):
    """Collects visible text, turning block elements into blank-line paragraphs."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.lines: list[str] = []
        self.words: list[str] = []
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self.skip = 0  # an unclosed <head> ends where the body starts
        if tag in _SKIP_TAGS:
            self.skip += 1
        self._boundary(tag)
        if tag == "pre":
            self.pre += 1
        if tag in _CELL_TAGS and self.words and not self.skip:
            self.words.append("|")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self.skip = max(0, self.skip - 1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        self._boundary(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._boundary(tag)

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.pre:
            *full, last = data.replace("\r\n", "\n").split("\n")
            for line in full:
                self.words.append(line.rstrip())
                self._end_line()
            self.words.append(last)
        else:
            self.words.extend(data.split())

    def _boundary(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self._end_paragraph()
        elif tag in _LINE_TAGS:
            self._end_line()

    def _end_line(self) -> None:
        line = ("".join(self.words) if self.pre else " ".join(self.words)).rstrip(" |")
        if line.strip():
            self.lines.append(line)
        self.words = []

    def _end_paragraph(self) -> None:
        self._end_line()
        if self.lines:
            self.paragraphs.append("\n".join(self.lines))
        self.lines = []


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page as blank-line separated paragraphs, entities decoded."""
    parser = _TextParser()
    parser.feed(markup)
    parser.close()
    parser._end_paragraph()
    return "\n\n".join(parser.paragraphs)


def refuse_secrets(policy: SecretPolicy, path: Path, relpath: str,
                   data: bytes | None = None) -> None:
    """Raise SkipFile ``secret`` when the file is a credential: by its name (``data`` None,
    before anything is read) or by its bytes. The detail names the kind of secret only."""
    if data is None:
        verdict = policy.name_verdict(os.path.abspath(path), relpath)
    else:
        verdict = policy.content_verdict(relpath, data)
    if verdict is not None:
        raise SkipFile("secret", verdict)
