"""Read a RAG task's documents (inline text, files, globs) and cut them into chunks.

Text, Markdown and HTML need only the standard library; PDF needs ``pypdf``, and a task that names
a PDF where it is missing fails with the file and the package to install.
"""

from __future__ import annotations

import glob as globbing
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from mloc.errors import ExecutionError
from mloc.spec.rag import DocumentSource

TEXT_SUFFIXES = {
    ".txt",
    ".md",
    ".markdown",
    ".rst",
    ".csv",
    ".tsv",
    ".json",
    ".jsonl",
    ".log",
    ".yaml",
    ".yml",
}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
MAX_FILES = 10_000
MAX_FILE_BYTES = 64 * 1024 * 1024
# Separators tried in order: paragraphs, lines, sentences, words, then characters.
SEPARATORS = ("\n\n", "\n", ". ", " ", "")
# Where worker files may be read from: a path list like PATH. Unset means anywhere the worker can read.
DOCUMENT_ROOTS_ENV = "MLOC_DOCUMENT_ROOTS"


@dataclass(frozen=True)
class SourceText:
    """The text of one document and where it came from."""

    source: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    id: str
    text: str
    source: str
    index: int
    metadata: dict[str, str] = field(default_factory=dict)


def load_documents(sources: Sequence[DocumentSource], *, base_dir: Path | None = None) -> list[SourceText]:
    """Read every document the task names; an unreadable one fails the task with its name."""
    base = base_dir or Path.cwd()
    roots = _allowed_roots()
    documents: list[SourceText] = []
    for position, source in enumerate(sources):
        where = f"spec.documents[{position}]"
        if source.text is not None:
            name = source.metadata.get("source") or f"inline:{position}"
            documents.append(SourceText(name, source.text, dict(source.metadata)))
            continue
        if source.path is not None:
            path = _resolve(source.path, base)
            if not path.exists():
                raise ExecutionError(f"{where}: document file {source.path!r} ({path}) does not exist")
            if path.is_dir():
                raise ExecutionError(
                    f"{where}: {source.path!r} is a folder; name its files with a glob such as "
                    f"'{source.path.rstrip('/')}/**/*.md'"
                )
            paths = [path]
        else:
            assert source.glob is not None
            pattern = source.glob if os.path.isabs(source.glob) else str(base / source.glob)
            paths = sorted(Path(match) for match in globbing.glob(pattern, recursive=True))
            paths = [path for path in paths if path.is_file()]
            if not paths:
                raise ExecutionError(f"{where}: the glob {source.glob!r} matched no files (searched {pattern})")
            if len(paths) > MAX_FILES:
                raise ExecutionError(
                    f"{where}: the glob {source.glob!r} matched {len(paths)} files; the limit is {MAX_FILES}"
                )
        for path in paths:
            _check_allowed(path, roots, where)
            documents.append(SourceText(str(path), read_file(path), dict(source.metadata)))
    return documents


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


def split_text(text: str, size: int, overlap: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``size`` characters at the largest natural boundary,
    repeating up to ``overlap`` characters of the previous piece at the start of the next."""
    atoms = _atoms(text, size, SEPARATORS)
    chunks: list[str] = []
    current: list[str] = []
    length = 0
    for atom in atoms:
        if current and length + len(atom) > size:
            chunks.append("".join(current).strip())
            # Carry whole trailing atoms into the next chunk, up to the overlap.
            carried: list[str] = []
            carried_length = 0
            for previous in reversed(current):
                if carried_length + len(previous) > overlap or carried_length + len(previous) + len(atom) > size:
                    break
                carried.insert(0, previous)
                carried_length += len(previous)
            current, length = carried, carried_length
        current.append(atom)
        length += len(atom)
    if current:
        chunks.append("".join(current).strip())
    return [chunk for chunk in chunks if chunk]


def _atoms(text: str, size: int, separators: Sequence[str]) -> list[str]:
    if len(text) <= size:
        return [text]
    separator, rest = separators[0], separators[1:]
    if separator == "":
        return [text[start : start + size] for start in range(0, len(text), size)]
    pieces = text.split(separator)
    atoms: list[str] = []
    for position, piece in enumerate(pieces):
        # Keep the separator with the piece before it so joined chunks read as the original.
        piece = piece + separator if position < len(pieces) - 1 else piece
        if not piece:
            continue
        atoms.extend(_atoms(piece, size, rest) if len(piece) > size else [piece])
    return atoms


def chunk_documents(documents: Iterable[SourceText], size: int, overlap: int) -> list[Chunk]:
    """Chunks with ids derived from their source and text, so re-indexing the same text is a no-op."""
    chunks: list[Chunk] = []
    for document in documents:
        for index, text in enumerate(split_text(document.text, size, overlap)):
            digest = hashlib.sha256(f"{document.source}\0{index}\0{text}".encode()).hexdigest()[:32]
            chunks.append(Chunk(digest, text, document.source, index, document.metadata))
    return chunks


def _resolve(path: str, base: Path) -> Path:
    candidate = Path(path).expanduser()
    return (candidate if candidate.is_absolute() else base / candidate).resolve()


def _allowed_roots() -> list[Path]:
    from mloc.settings import Settings

    return Settings().document_root_paths


def _check_allowed(path: Path, roots: list[Path], where: str) -> None:
    if not roots:
        return
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise ExecutionError(
            f"{where}: {path} is outside the folders this worker reads documents from ({allowed}); "
            f"put the file there or send its text inline"
        )
