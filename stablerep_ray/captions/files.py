"""Caption sources -> a lazy Ray Dataset of caption rows, read in small chunks.

A source (files in sorted order) is cut into chunks without reading it: byte ranges of text/jsonl
files (a line belongs to the chunk it starts in), parquet row groups, whole csv/tsv files. The stream
is the chunk sequence repeated pass after pass; chunk ``seq`` of the stream is read by one small Ray
Data task, so Ray Data's backpressure keeps only a few chunks in flight: sources larger than memory
are never loaded whole, neither in the driver nor in the object store.

Row columns:
* ``caption_id``: the caption's identity, a 63-bit hash of its normalised text (``normalise_caption``):
  the same text anywhere in the source has the same id, so its images are positives of each other.
* ``position``: where the row sits in the source, ``file_index << 40 | byte offset (or row index)``;
  it seeds the row's images, so a rerun renders the same images and a repeated text adds new ones.
* ``source_pass``: the pass over the source the row is from; from the second pass on it is mixed into
  the images' seed too (``generation.backends.image_keys``), so each pass renders new images.
* ``chunk``/``row``/``chunk_rows``: where the row sits in the stream. Checkpoints record the first
  chunk not fully consumed; a resumed run restarts there, so no caption range is ever skipped.
  A chunk with no caption yields one marker row (``caption_id == -1``) that is never rendered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..config import SYNTH_SOURCE, CaptionsConfig, ConfigError
from ..storage import open_filesystem

logger = logging.getLogger(__name__)

EXTENSIONS = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}

CHUNK_BYTES = 1 << 20  # ~10k captions per chunk of a text file
FILE_ID_SHIFT = 40
EMPTY_CHUNK_ID = -1  # caption_id of the one marker row an all-blank chunk yields


@dataclass(frozen=True)
class CaptionFile:
    path: str
    format: str


@dataclass(frozen=True)
class Chunk:
    file_index: int
    path: str
    format: str
    start: int  # byte offset (txt/jsonl), row group (parquet), 0 (csv/tsv)
    stop: int


def list_caption_files(cfg: CaptionsConfig) -> tuple[pafs.FileSystem, list[CaptionFile]]:
    """Resolve ``captions.source`` (file or directory) to its caption files, in a stable order."""
    fs, path = open_filesystem(cfg.source, "captions.source")
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"captions.source: {cfg.source} does not exist; check the path")
    if info.type == pafs.FileType.Directory:
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        paths = sorted(e.path for e in entries if e.type == pafs.FileType.File)
    else:
        paths = [path]
    files = []
    for p in paths:
        fmt = cfg.format if cfg.format != "auto" else EXTENSIONS.get("." + p.rsplit(".", 1)[-1].lower())
        if fmt:
            files.append(CaptionFile(p, fmt))
    if not files:
        raise ConfigError(
            f"captions.source: no caption files in {cfg.source} (expected {', '.join(EXTENSIONS)}); "
            f"set captions.format if the extension differs"
        )
    return fs, files


def _column_error(path: str, column: str, available) -> ConfigError:
    return ConfigError(
        f"captions.column: {path} has no column {column!r} (columns: {sorted(available)}); "
        f"set captions.column"
    )


def _one_line(err: Exception, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)


def _parquet_groups(fs: pafs.FileSystem, path: str, column: str) -> int:
    """Row groups of a parquet caption file whose ``column`` holds text (footer only)."""
    try:
        with fs.open_input_file(path) as raw:
            parquet = pq.ParquetFile(raw)
            schema, groups = parquet.schema_arrow, parquet.num_row_groups
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(
            f"captions.source: {path} is not a readable parquet file ({_one_line(err)}); re-export it "
            f"or remove it from the source"
        ) from None
    if column not in schema.names:
        raise _column_error(path, column, schema.names)
    if not _is_text(schema.field(column).type):
        raise ConfigError(
            f"captions.column: {path} column {column!r} holds {schema.field(column).type}, not text; "
            f"set captions.column to the caption text column"
        )
    return groups


def plan_chunks(cfg: CaptionsConfig, chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Cut one pass over the source into chunks, from file sizes and parquet footers only."""
    fs, files = list_caption_files(cfg)
    chunks = []
    for index, file in enumerate(files):
        if file.format in ("txt", "jsonl"):
            size = fs.get_file_info(file.path).size
            chunks += [Chunk(index, file.path, file.format, a, min(a + chunk_bytes, size))
                       for a in range(0, size, chunk_bytes)]
        elif file.format == "parquet":
            groups = _parquet_groups(fs, file.path, cfg.column)
            chunks += [Chunk(index, file.path, file.format, g, g + 1) for g in range(groups)]
        else:
            chunks.append(Chunk(index, file.path, file.format, 0, 0))
    return chunks


WHOLE_FILE_WARN_BYTES = 256 << 20


def whole_file_warnings(cfg: CaptionsConfig, limit: int = WHOLE_FILE_WARN_BYTES) -> list[str]:
    """One line for each csv/tsv file above ``limit`` bytes. Those are one chunk each (a quoted caption
    may span lines, so they are not cut into byte ranges): one task reads the whole file, and a restart
    serves it again from its first row."""
    fs, files = list_caption_files(cfg)
    warnings = []
    for file in files:
        if file.format in ("csv", "tsv") and (size := fs.get_file_info(file.path).size) > limit:
            warnings.append(
                f"captions.source: {file.path} ({size / 2**20:,.0f} MiB) is read whole by one task, and a "
                f"restart serves it again from its first row; split it into smaller files, or convert it to "
                f"jsonl or parquet (read in byte ranges and row groups)"
            )
    return warnings


UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # also the start of the UTF-32 marks
REENCODE = "re-encode the caption file as UTF-8"


MAX_LINE_BYTES = 16 << 20


def _split_lines(reader, offset: int, path: str, block_bytes: int = 1 << 16,
                 max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line without its end) from ``offset`` on; '\\n', '\\r\\n' and a lone '\\r' end
    a line, so Unix, Windows and old Mac files split alike. A line over ``max_line`` bytes is refused
    before more of it is read: a file without line ends is not a caption file."""
    pending = b""
    while True:
        block = reader.read(max(block_bytes, len(pending)))  # doubling: a long line stays linear
        lines = (pending + block).splitlines(keepends=True)
        # the last line may go on in the next block (or end in the CR of a CRLF): hold it back
        pending = lines.pop() if block and lines else b""
        if len(pending) > max_line:
            raise ConfigError(
                f"{path}: byte {offset + sum(map(len, lines))}: a line of more than {max_line >> 20} MiB, so "
                f"this is not one caption or JSON object per line; check captions.source and captions.format"
            )
        for line in lines:
            yield offset, line.rstrip(b"\r\n")
            offset += len(line)
        if not block:
            return


def check_text_bytes(path: str, offset: int, data: bytes) -> None:
    """Refuse UTF-16/32 and binary data (NUL bytes) in a text caption file, naming the byte."""
    if offset == 0 and data.startswith(UTF16_BOMS):
        raise ConfigError(
            f"{path}: starts with a UTF-16/32 byte-order mark; {REENCODE} "
            f"(e.g. iconv -f UTF-16 -t UTF-8)"
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ConfigError(
            f"{path}: byte {offset + nul}: a NUL byte, so this is binary or UTF-16/32, not UTF-8 text; "
            f"{REENCODE} or remove it from captions.source"
        )


def _decode(path: str, offset: int, line: bytes) -> str:
    check_text_bytes(path, offset, line)
    if offset == 0:
        line = line.removeprefix(UTF8_BOM)
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: byte {offset + err.start}: not valid UTF-8 ({err.reason}); {REENCODE}"
        ) from None


def _chunk_lines(fs: pafs.FileSystem, chunk: Chunk) -> Iterator[tuple[int, str]]:
    """(byte offset, decoded line) for the lines that start in [start, stop)."""
    with fs.open_input_file(chunk.path) as raw:
        first = max(chunk.start - 1, 0)
        raw.seek(first)
        lines = _split_lines(raw, first, chunk.path)
        if chunk.start:
            next(lines, None)  # the end of the line the previous chunk owns ('' if it ended there)
        for offset, line in lines:
            if offset >= chunk.stop:
                return
            yield offset, _decode(chunk.path, offset, line)


def _json_caption(line: str, path: str, offset: int, column: str) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path}: byte {offset}: invalid JSON ({err.msg}); fix or remove that line "
            f"(one JSON object per line)"
        ) from None
    if not isinstance(record, dict) or column not in record:
        raise _column_error(path, column, record if isinstance(record, dict) else [])
    value = record[column]
    if value is not None and not isinstance(value, str):
        raise ConfigError(
            f"captions.column: {path}: byte {offset}: {column!r} holds {json.dumps(value)[:40]}, "
            f"not text; set captions.column to the caption text field"
        )
    return value


def _csv_cells(fs: pafs.FileSystem, chunk: Chunk, column: str) -> Iterator[str | None]:
    parse = pacsv.ParseOptions(delimiter="\t" if chunk.format == "tsv" else ",")
    convert = pacsv.ConvertOptions(column_types={column: pa.string()})
    with fs.open_input_stream(chunk.path) as raw:
        check_text_bytes(chunk.path, 0, raw.read(1 << 16))
    with fs.open_input_stream(chunk.path) as raw:
        try:
            reader = pacsv.open_csv(raw, parse_options=parse, convert_options=convert)
        except pa.ArrowInvalid as err:
            raise ConfigError(
                f"{chunk.path}: cannot parse as {chunk.format} ({_one_line(err)}); it needs a header "
                f"row naming captions.column, then one row per caption"
            ) from None
        if column not in reader.schema.names:
            raise _column_error(chunk.path, column, reader.schema.names)
        try:
            for batch in reader:
                yield from batch.column(column).to_pylist()
        except (pa.ArrowInvalid, UnicodeDecodeError) as err:
            raise ConfigError(f"{chunk.path}: {_one_line(err)}; {REENCODE}") from None


def _chunk_cells(fs: pafs.FileSystem, chunk: Chunk, column: str) -> Iterator[tuple[int, str | None]]:
    """(key within the file, raw caption or None) for one chunk."""
    if chunk.format == "txt":
        yield from _chunk_lines(fs, chunk)
    elif chunk.format == "jsonl":
        for offset, line in _chunk_lines(fs, chunk):
            yield offset, _json_caption(line, chunk.path, offset, column)
    elif chunk.format == "parquet":
        with fs.open_input_file(chunk.path) as raw:
            parquet = pq.ParquetFile(raw)
            first = sum(parquet.metadata.row_group(g).num_rows for g in range(chunk.start))
            values = parquet.read_row_group(chunk.start, columns=[column]).column(0).to_pylist()
        yield from enumerate(values, start=first)
    else:
        yield from enumerate(_csv_cells(fs, chunk, column))


_SPACE = re.compile(r"\s+")


def normalise_caption(text: str) -> str:
    """One spelling per caption: Unicode NFC, no byte-order mark, single spaces, no outer space."""
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text).replace("\ufeff", "")).strip()


def caption_id(text: str) -> int:
    """The 63-bit identity of a normalised caption text (never ``EMPTY_CHUNK_ID``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def _clean(text, cfg: CaptionsConfig, chunk: Chunk) -> str:
    """The normalised caption ('' for a blank); over-long captions are an error, not a truncation."""
    text = normalise_caption(str(text)) if text is not None else ""
    if len(text) > cfg.max_chars:
        raise ConfigError(
            f"{chunk.path}: a caption of {len(text)} characters (> captions.max_chars="
            f"{cfg.max_chars}), while Stable Diffusion's text encoder reads at most 77 tokens (~300 "
            f"characters); check captions.column, shorten the captions or raise captions.max_chars"
        )
    return text


def read_chunk(cfg: CaptionsConfig, chunk: Chunk) -> tuple[list[int], list[str], int]:
    """Source positions and texts of one chunk's captions (blanks skipped), and how many blanks."""
    fs, _ = open_filesystem(cfg.source, "captions.source")
    ids, texts, blanks = [], [], 0
    for key, raw in _chunk_cells(fs, chunk, cfg.column):
        text = _clean(raw, cfg, chunk)
        if not text:
            blanks += 1
            continue
        ids.append(chunk.file_index << FILE_ID_SHIFT | key)
        texts.append(text)
    return ids, texts, blanks


@dataclass
class CaptionStats:
    captions: int
    blanks: int
    complete: bool  # False when only a prefix was inspected


def inspect_captions(cfg: CaptionsConfig, max_rows: int = 200_000) -> CaptionStats:
    """Fail fast on bad sources: reads up to ``max_rows`` rows in the driver (streamed) and checks them.

    Runs before Ray starts, so a missing file, a wrong column, non-UTF-8 bytes or over-long lines are
    reported in one line instead of inside a Ray task after GPUs were reserved.
    """
    fs, _ = open_filesystem(cfg.source, "captions.source")
    captions = blanks = 0
    for chunk in plan_chunks(cfg):
        for _, raw in _chunk_cells(fs, chunk, cfg.column):
            text = _clean(raw, cfg, chunk)
            captions += bool(text)
            blanks += not text
            if captions + blanks >= max_rows:
                return CaptionStats(captions, blanks, complete=False)
    if not captions:
        raise ConfigError(
            f"captions.source: {cfg.source} holds no captions"
            + (f" ({blanks} blank rows)" if blanks else "")
            + "; point it at a non-empty caption file"
        )
    return CaptionStats(captions, blanks, complete=True)


def count_captions_per_pass(cfg: CaptionsConfig) -> int:
    """Captions in one pass over the source (a lower bound past ``inspect_captions``' row limit); 0 for
    ``synth``, an endless stream of prompt indices. ``read_captions`` sizes its passes by it: guessed
    low, it plans passes the run never uses and Ray Data reads ahead into them."""
    return 0 if cfg.source == SYNTH_SOURCE else inspect_captions(cfg).captions


def read_chunks(batch: dict, cfg: CaptionsConfig, chunks: list[Chunk]) -> Iterator[pa.Table]:
    """Ray Data map_batches fn: stream chunk numbers -> caption rows, one table per chunk."""
    for seq in batch["chunk"]:
        ids, texts, blanks = read_chunk(cfg, chunks[int(seq) % len(chunks)])
        if blanks:
            logger.info("captions: chunk %d: skipped %d blank captions", seq, blanks)
        yield pa.table(caption_rows(int(seq), ids, texts, source_pass=int(seq) // len(chunks)))


def caption_rows(seq: int, positions: list[int], texts: list[str], source_pass: int = 0) -> dict[str, np.ndarray]:
    """The stream's caption columns for one chunk (``read_chunk``'s output) as numpy arrays.

    A chunk without captions gives one marker row (``caption_id == EMPTY_CHUNK_ID``), so consumers
    can see the chunk is done.
    """
    if not positions:
        positions, texts, ids = [EMPTY_CHUNK_ID], [""], [EMPTY_CHUNK_ID]
    else:
        ids = [caption_id(text) for text in texts]
    n = len(positions)
    return {
        "chunk": np.full(n, seq, dtype=np.int64),
        "row": np.arange(n, dtype=np.int32),
        "chunk_rows": np.full(n, n, dtype=np.int32),
        "caption_id": np.asarray(ids, dtype=np.int64),
        "position": np.asarray(positions, dtype=np.int64),
        "source_pass": np.full(n, source_pass, dtype=np.int32),
        "caption": np.asarray(texts, dtype=object),
    }


def stream_chunks(num_chunks: int, start_chunk: int, num_captions: int, captions_per_pass: int) -> range:
    """Stream chunk numbers from ``start_chunk`` to the end of the pass that holds ``num_captions``
    more captions, with at least ``captions_per_pass`` in a pass (unknown, 0: one a chunk)."""
    passes = start_chunk // num_chunks + 1
    if num_captions:
        passes += -(-num_captions // max(captions_per_pass, num_chunks))
    return range(start_chunk, passes * num_chunks)


def read_captions(cfg: CaptionsConfig, start_chunk: int = 0, num_captions: int = 0,
                  captions_per_pass: int = 0):
    """A lazy Ray Dataset of caption rows from stream chunk ``start_chunk`` on.

    The stream holds enough passes for ``num_captions`` more captions (one pass unless
    ``captions.repeat``); ``captions_per_pass`` is a lower bound on captions in one pass.
    """
    import ray.data

    chunks = plan_chunks(cfg)
    seqs = [{"chunk": s} for s in stream_chunks(len(chunks), start_chunk, num_captions if cfg.repeat else 0,
                                                captions_per_pass)]
    return ray.data.from_items(seqs, override_num_blocks=min(len(seqs), 200)).map_batches(
        read_chunks,
        fn_kwargs={"cfg": cfg, "chunks": chunks},
        batch_size=1,
        num_cpus=0.25,
    )
