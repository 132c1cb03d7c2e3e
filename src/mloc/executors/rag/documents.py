"""Read a RAG task's documents (inline text, files, globs) as LangChain ``Document`` objects.

``DocumentLoader`` is a LangChain document loader over MLOC's own readers: they confine files to
the worker's document roots and name the file and the fix when one cannot be read. Text, Markdown
and HTML need only the standard library; PDF needs ``pypdf``, and a task that names a PDF where it
is missing fails with the file and the package to install.
"""

from __future__ import annotations

import glob as globbing
import hashlib
import os
from collections.abc import Iterator, Sequence
from html.parser import HTMLParser
from pathlib import Path

from langchain_core.document_loaders import BaseLoader
from langchain_core.documents import Document

from mloc.errors import ExecutionError
from mloc.spec.rag import DocumentSource

# Any UTF-8 text is read as it is, whatever its suffix (source code, logs, a README without one), but for
# these: text too, their markup would be indexed as words.
MARKUP_SUFFIXES = {".rtf": "RTF"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
MAX_FILES = 10_000
MAX_FILE_BYTES = 64 * 1024 * 1024
# Where worker files may be read from: a path list like PATH. Unset means anywhere the worker can read.
DOCUMENT_ROOTS_ENV = "MLOC_DOCUMENT_ROOTS"


class DocumentLoader(BaseLoader):
    """Every document a task names, in order; an unreadable one fails the task with its name.

    Each ``Document`` carries ``metadata["source"]``, its id in a collection: the file's absolute
    path, or for inline text ``metadata.source`` when given, else ``inline:`` and a digest of the text.
    """

    def __init__(self, sources: Sequence[DocumentSource], *, base_dir: Path | None = None) -> None:
        self.sources = sources
        self.base = base_dir or Path.cwd()

    def lazy_load(self) -> Iterator[Document]:
        roots = _allowed_roots()
        for position, source in enumerate(self.sources):
            where = f"spec.documents[{position}]"
            if source.text is not None:
                name = source.metadata.get("source") or inline_id(source.text)
                yield Document(page_content=source.text, metadata={**source.metadata, "source": name})
                continue
            for path in _paths(source, self.base, where, roots):
                yield Document(page_content=read_file(path), metadata={**source.metadata, "source": str(path)})


def load_documents(sources: Sequence[DocumentSource], *, base_dir: Path | None = None) -> list[Document]:
    return DocumentLoader(sources, base_dir=base_dir).load()


def inline_id(text: str) -> str:
    """An inline document's id from its text: the same text keeps its chunks whatever its position."""
    return "inline:" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _paths(source: DocumentSource, base: Path, where: str, roots: list[Path]) -> list[Path]:
    """The files a source names. Where the worker limits the folders it reads (``roots``), what the
    source names is checked against them before anything is looked up, and a refusal names only what
    the task wrote: whether a file exists outside them is not the task's to learn."""
    if source.path is not None:
        path = _resolve(source.path, base)
        _check_allowed(path, roots, where, shown=repr(source.path))
        if not path.exists():
            shown = repr(source.path) if str(path) == source.path else f"{source.path!r} ({path})"
            raise ExecutionError(f"{where}: document file {shown} does not exist")
        if path.is_dir():
            raise ExecutionError(
                f"{where}: {source.path!r} is a folder; name its files with a glob such as "
                f"'{source.path.rstrip('/')}/**/*.md'"
            )
        return [path]
    assert source.glob is not None
    pattern = source.glob if os.path.isabs(source.glob) else str(base / source.glob)
    shown = f"the glob {source.glob!r}"
    start = _resolve(_fixed_part(pattern), base)
    if roots and not any(start.is_relative_to(root) or root.is_relative_to(start) for root in roots):
        _check_allowed(start, roots, where, shown=shown)
    paths = sorted(Path(match) for match in globbing.glob(pattern, recursive=True))
    # Only what lies in the allowed folders counts as matched (a '..' after a wildcard, or a link, can
    # lead out of them), whether or not anything matches outside: so a glob tells nothing of the rest.
    paths = [path for path in paths if path.is_file() and _inside(path, roots)]
    if not paths:
        inside = " inside the folders this worker reads documents from" if roots else ""
        raise ExecutionError(f"{where}: {shown} matched no files{inside} (searched {pattern})")
    if len(paths) > MAX_FILES:
        raise ExecutionError(f"{where}: {shown} matched {len(paths)} files; the limit is {MAX_FILES}")
    return paths


def _fixed_part(pattern: str) -> str:
    """The folder a glob pattern starts in: its leading components that hold no wildcard."""
    fixed: list[str] = []
    for part in Path(pattern).parts:
        if globbing.has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def read_file(path: Path) -> str:
    """The text of one file, by its suffix; binary files and missing readers are clear errors."""
    suffix = path.suffix.lower()
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ExecutionError(f"cannot read document {path}: {exc.strerror or exc}") from exc
    if size > MAX_FILE_BYTES:
        raise ExecutionError(f"document {path} is {size} bytes; the limit is {MAX_FILE_BYTES} per file")
    if suffix in PDF_SUFFIXES:
        return _read_pdf(path)
    if suffix in MARKUP_SUFFIXES:
        raise ExecutionError(
            f"document {path} is {MARKUP_SUFFIXES[suffix]}, whose markup would be indexed as text; save it as "
            "text, Markdown, HTML or PDF"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ExecutionError(f"cannot read document {path}: {exc.strerror or exc}") from exc
    if b"\0" in raw[:8192]:
        raise ExecutionError(f"document {path} is a binary file; supported formats are text, Markdown, HTML and PDF")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ExecutionError(f"document {path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from exc
    if suffix in HTML_SUFFIXES:
        return html_to_text(text)
    return text


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError as exc:
        raise ExecutionError(
            f"document {path} is a PDF and reading PDFs needs the 'pypdf' package on the worker: "
            "pip install pypdf (or convert the file to text)"
        ) from exc
    try:
        reader = PdfReader(str(path))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PdfReadError, OSError, ValueError) as exc:
        raise ExecutionError(f"cannot read PDF document {path}: {exc}") from exc


class _TextExtractor(HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "head"}
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page, one block per paragraph."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    paragraphs: list[str] = []
    for line in lines:
        if line:
            paragraphs.append(line)
    return "\n\n".join(paragraphs)


def _resolve(path: str, base: Path) -> Path:
    candidate = Path(path).expanduser()
    return (candidate if candidate.is_absolute() else base / candidate).resolve()


def _allowed_roots() -> list[Path]:
    from mloc.settings import Settings

    return Settings().document_root_paths


def _inside(path: Path, roots: list[Path]) -> bool:
    if not roots:
        return True
    resolved = path.resolve()
    return any(resolved.is_relative_to(root) for root in roots)


def _check_allowed(path: Path, roots: list[Path], where: str, *, shown: str) -> None:
    if not _inside(path, roots):
        allowed = ", ".join(str(root) for root in roots)
        raise ExecutionError(
            f"{where}: {shown} is outside the folders this worker reads documents from ({allowed}); "
            f"put the files there or send their text inline"
        )
