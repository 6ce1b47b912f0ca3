"""Documents from every supported source, as one stream of `Document`s.

`read_documents(config)` is the single entry point used by `prepare` (tokenize
and pack) and by clustering (embed and build the tree), so both see exactly
the same documents in the same order. Sources:

- 'embedded': the synthetic encyclopedia of `encyclopedia.py` (no files needed);
- 'jsonl': one JSON object per line with a `text` field and an optional `id`;
  `path` may be one file, a folder of `*.jsonl` files (recursively) or a
  pattern (`corpus/part-*.jsonl.zst`, `**` across folders), read in sorted order;
- 'text_dir': every `*.txt` file below the folder `path`, recursively (or the
  files a pattern matches), one document each;
- 'seqio': the `seqio_feature` of a seqio Task or Mixture named by `path`.

Files may be local or on an object store (`gs://`, `s3://`, through
hmem_jax.paths), and gzip (`.gz`) or zstandard (`.zst`) compressed, as
corpora like DCLM ship: they are decompressed while read, never staged whole.

Bad input never crashes a long prepare run. Each problem is repaired or the
document is skipped, and counted in a `SourceStats` that the caller reports
(and `prepare` writes into the manifest):

- empty or whitespace-only documents are skipped;
- bytes that are not UTF-8 are replaced by U+FFFD (the document is kept);
- malformed jsonl lines (not JSON, no string `text`) are skipped;
- documents longer than `max_document_chars` are split into pieces of at most
  that size, cut at whitespace where possible, with ids `ID#1`, `ID#2`, ...
  Text files are read in bounded chunks, so a huge file never sits whole in RAM.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import gzip
import importlib
import io
import json
import os
import posixpath
from collections.abc import Callable, Iterator, Sequence
from typing import IO

from hmem_jax import paths
from hmem_jax.config import DataConfig, check_given
from hmem_jax.data.document import Document
from hmem_jax.errors import SourceError

_COMPRESSED_SUFFIXES = (".gz", ".zst")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
_TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
_READ_CHUNK_BYTES = 1 << 20


@dataclasses.dataclass
class SourceStats:
    """What reading the source found; filled in while documents are yielded."""

    documents: int = 0
    characters: int = 0
    empty_skipped: int = 0
    non_utf8_replaced: int = 0
    malformed_skipped: int = 0
    huge_split: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def problems(self) -> str:
        """A one-line summary of the repairs, empty when the source was clean."""
        parts = [
            f"{name}={value}"
            for name, value in self.as_dict().items()
            if name not in ("documents", "characters") and value
        ]
        return ", ".join(parts)


def describe_source(config: DataConfig) -> dict[str, object]:
    """The fields that identify a source; recorded in the manifest and compared on reuse."""
    description: dict[str, object] = {
        "kind": config.source,
        "max_document_chars": config.max_document_chars,
    }
    if config.source == "embedded":
        description.update(entities=config.embedded_entities, seed=config.embedded_seed)
    else:
        description["path"] = (
            config.path if config.source == "seqio" else paths.absolute(config.path)
        )
    if config.source == "seqio":
        description.update(
            split=config.seqio_split, feature=config.seqio_feature, module=config.seqio_module
        )
    return description


def read_documents(
    config: DataConfig,
    stats: SourceStats | None = None,
    units: Sequence[str] | None = None,
    unit_done: Callable[[], None] | None = None,
) -> Iterator[Document]:
    """Yields the source's documents in a deterministic order, repaired as described above.

    `stats`, when given, is updated as documents are produced, so after the
    iterator is exhausted it counts everything that was skipped or repaired.
    `units`: the source's `source_units`, when the caller has listed them already;
    `unit_done` is called after each unit's last document (progress reports).
    """
    stats = stats if stats is not None else SourceStats()
    for unit in source_units(config) if units is None else units:
        yield from read_unit(config, unit, stats)
        if unit_done is not None:
            unit_done()


def source_units(config: DataConfig) -> list[str]:
    """The source's independent parts, in reading order: one per file of a jsonl or text_dir
    source, one for the embedded corpus or a seqio Task. `read_documents` reads them in turn;
    a distributed preparation (data/beam_prepare.py) reads them on many workers, and the
    documents of unit u in order are those `read_documents` yields between u-1 and u+1."""
    check_given(config)  # a paper gin's %gin.REQUIRED corpus, not given
    if config.source == "jsonl":
        return _corpus_files(
            config.path,
            _JSONL_SUFFIXES,
            "a .jsonl file (one JSON object with a 'text' field per line)",
        )
    if config.source == "text_dir":
        return _corpus_files(config.path, _TEXT_SUFFIXES, "a .txt file")
    return [""]


def read_unit(config: DataConfig, unit: str, stats: SourceStats) -> Iterator[Document]:
    """The documents of one unit of `source_units`, repaired and split as described above."""
    readers = {
        "embedded": lambda: _read_embedded(config, stats),
        "jsonl": lambda: _read_jsonl_file(unit, stats),
        "text_dir": lambda: _read_text_file(config, unit, stats),
        "seqio": lambda: _read_seqio(config, stats),
    }
    for document in readers[config.source]():
        yield from _finish(document, config.max_document_chars, stats)


def _finish(document: Document, max_chars: int, stats: SourceStats) -> Iterator[Document]:
    """Skips empty documents, splits huge ones, and counts what is yielded."""
    if not document.text.strip():
        stats.empty_skipped += 1
        return
    pieces = (
        [document.text] if len(document.text) <= max_chars else split_text(document.text, max_chars)
    )
    if len(pieces) > 1:
        stats.huge_split += 1
    for number, piece in enumerate(pieces, start=1):
        if not piece.strip():
            continue
        stats.documents += 1
        stats.characters += len(piece)
        yield Document(
            id=document.id if len(pieces) == 1 else f"{document.id}#{number}", text=piece
        )


def split_text(text: str, max_chars: int) -> list[str]:
    """Cuts `text` into pieces of at most `max_chars`, preferring the last whitespace.

    A cut falls at whitespace in the second half of the window when there is
    some; otherwise (one enormous word) it falls at exactly `max_chars`.
    Concatenating the pieces gives back `text`.
    """
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        window_end = start + max_chars
        cut = max(
            text.rfind(" ", start + max_chars // 2, window_end),
            text.rfind("\n", start + max_chars // 2, window_end),
        )
        cut = window_end if cut <= start else cut + 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class _CountingDecoder:
    """UTF-8 decoding that replaces bad bytes and remembers whether it had to.

    Incremental, so a file can be decoded chunk by chunk without splitting a
    multi-byte character at a chunk boundary.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self.replaced = False

    def decode(self, data: bytes, final: bool = False) -> str:
        try:
            return self._decoder.decode(data, final)
        except UnicodeDecodeError:
            # Redo this chunk leniently; the strict decoder's state is discarded with it.
            self.replaced = True
            pending = self._decoder.getstate()[0]
            self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            return self._decoder.decode(pending + data, final)


def decode_utf8(data: bytes) -> tuple[str, bool]:
    """(text, whether invalid UTF-8 had to be replaced)."""
    decoder = _CountingDecoder()
    text = decoder.decode(data, final=True)
    return text, decoder.replaced


def _read_embedded(config: DataConfig, stats: SourceStats) -> Iterator[Document]:
    from hmem_jax.data import encyclopedia  # local import: only this source needs it

    corpus = encyclopedia.cached_corpus(config.embedded_entities, config.embedded_seed)
    yield from corpus.documents


def _corpus_files(path: str, suffixes: tuple[str, ...], kind: str) -> list[str]:
    """The files of a file-based source, in reading order: a pattern's matching files, a
    folder's files with one of `suffixes` (recursively), or the one file `path` names; local
    or on an object store (gs://, s3://)."""
    if paths.has_glob(path):
        files = paths.glob_files(path)
        if not files:
            raise SourceError(
                f"DataConfig.path = {path!r} matches no files; fix the pattern "
                f"(e.g. 'corpus/*{suffixes[0]}', '**' matches across folders)."
            )
        return files
    if paths.isdir(path):
        files = [name for name in paths.find_files(path) if name.endswith(suffixes)]
        if not files:
            raise SourceError(
                f"DataConfig.path = {path!r} is a folder with no {' / '.join(suffixes)} files; "
                f"point it at a folder that holds some, or at {kind}."
            )
        return files
    if not paths.isfile(path):
        raise SourceError(
            f"DataConfig.path = {path!r} does not exist; expected {kind}, a folder of them or "
            "a pattern."
        )
    return [path]


@contextlib.contextmanager
def _open_decompressed(file_path: str) -> Iterator[IO[bytes]]:
    """A file's bytes, decompressed when its name says it is compressed (.gz, .zst)."""
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(paths.open_file(file_path, "rb"))
        if file_path.endswith(".gz"):
            yield stack.enter_context(io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb")))
        elif file_path.endswith(".zst"):
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            yield stack.enter_context(io.BufferedReader(reader, _READ_CHUNK_BYTES))
        else:
            yield raw


def _stem(file_path: str) -> str:
    """A file's name without its folder, compression suffix and extension ('a.jsonl.zst': 'a')."""
    name = (
        posixpath.basename(file_path) if paths.is_remote(file_path) else os.path.basename(file_path)
    )
    for suffix in _COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    return os.path.splitext(name)[0]


def _read_jsonl_file(file_path: str, stats: SourceStats) -> Iterator[Document]:
    stem = _stem(file_path)
    with _open_decompressed(file_path) as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            if not raw_line.strip():
                continue
            line, replaced = decode_utf8(raw_line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                stats.malformed_skipped += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                stats.malformed_skipped += 1
                continue
            if replaced or _has_lone_surrogates(record["text"]):
                stats.non_utf8_replaced += 1
            text = _strip_surrogates(record["text"])
            doc_id = record.get("id")
            doc_id = str(doc_id) if doc_id is not None else f"{stem}:{line_number}"
            yield Document(id=doc_id, text=text)


def _has_lone_surrogates(text: str) -> bool:
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def _strip_surrogates(text: str) -> str:
    """JSON escapes can smuggle lone surrogates (`"\\ud800"`) that no encoder accepts."""
    if not _has_lone_surrogates(text):
        return text
    return "".join("\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char for char in text)


def _read_text_file(config: DataConfig, file_path: str, stats: SourceStats) -> Iterator[Document]:
    root = paths.glob_root(config.path) if paths.has_glob(config.path) else config.path
    relative = posixpath.relpath if paths.is_remote(file_path) else os.path.relpath
    doc_id = relative(file_path, root)
    # A UTF-8 character is at most 4 bytes: a file that ends within this many bytes is read
    # whole (and split by `_finish` if needed); a longer one is certainly huge and is streamed.
    whole_limit = 4 * config.max_document_chars
    with _open_decompressed(file_path) as handle:
        head = _read_up_to(handle, whole_limit + 1)
        if len(head) <= whole_limit:
            text, replaced = decode_utf8(head)
            stats.non_utf8_replaced += int(replaced)
            yield Document(id=doc_id, text=text)
        else:
            yield from _stream_pieces(head, handle, doc_id, config.max_document_chars, stats)


def _read_up_to(handle: IO[bytes], size: int) -> bytes:
    """`size` bytes, or all that is left (a decompressing reader may return less per read)."""
    chunks, left = [], size
    while left > 0:
        data = handle.read(min(left, _READ_CHUNK_BYTES))
        if not data:
            break
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def _stream_pieces(
    head: bytes, handle: IO[bytes], doc_id: str, max_chars: int, stats: SourceStats
) -> Iterator[Document]:
    """Streams a file too big for one document as pieces, never holding it whole (`head`: its
    bytes read so far)."""
    decoder = _CountingDecoder()
    buffer = ""
    piece_number = 0
    stats.huge_split += 1
    data = head
    while True:
        buffer += decoder.decode(data, final=not data)
        ready = split_text(buffer, max_chars)
        keep_last = bool(data)  # the tail may still grow with the next chunk
        for piece in ready[:-1] if keep_last else ready:
            if piece.strip():
                piece_number += 1
                yield Document(id=f"{doc_id}#{piece_number}", text=piece)
        buffer = ready[-1] if keep_last else ""
        if not data:
            break
        data = handle.read(_READ_CHUNK_BYTES)
    stats.non_utf8_replaced += int(decoder.replaced)


def _read_seqio(config: DataConfig, stats: SourceStats) -> Iterator[Document]:
    """Adapts a seqio Task/Mixture: each example's text feature becomes one document."""
    try:
        import seqio  # optional extra `hmem_jax[seqio]`
    except ImportError as error:
        raise SourceError(
            "DataConfig.source = 'seqio' needs the seqio package; install it "
            "with `pip install 'hmem_jax[seqio]'`."
        ) from error
    if config.seqio_module:
        importlib.import_module(config.seqio_module)
    try:
        provider = seqio.get_mixture_or_task(config.path)
    except ValueError as error:
        raise SourceError(
            f"No seqio Task or Mixture named {config.path!r} is registered; set "
            "DataConfig.seqio_module to the module that registers it."
        ) from error
    dataset = provider.get_dataset(
        sequence_length=None, split=config.seqio_split, shuffle=False, num_epochs=1
    )
    for example_number, example in enumerate(dataset.as_numpy_iterator()):
        if config.seqio_feature not in example:
            raise SourceError(
                f"seqio Task {config.path!r} has no feature "
                f"{config.seqio_feature!r}; it has {sorted(example)}. Set "
                "DataConfig.seqio_feature."
            )
        value = example[config.seqio_feature]
        if isinstance(value, bytes):
            text, replaced = decode_utf8(value)
            stats.non_utf8_replaced += int(replaced)
        elif isinstance(value, str):
            text = value
        else:
            stats.malformed_skipped += 1  # e.g. a token-id feature: not text
            continue
        yield Document(id=f"{config.path}:{config.seqio_split}:{example_number}", text=text)
