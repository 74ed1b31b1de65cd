"""Reading JSON Lines documents (plain, gzip or zstd; a local path or any fsspec URL) with explicit bad input.

The compression is detected from the file's first bytes, not its name. Every problem is reported as
``<file>:<line>: <reason>: <detail>`` (see :mod:`data_tools.records`). Blank lines carry no data and are ignored.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from data_tools.records import (
    DEFAULT_FIELDS,
    INVALID_JSON,
    INVALID_UTF8,
    UNREADABLE_FILE,
    Fields,
    InputError,
    OnError,
    Record,
    SkipLog,
    handle,
    make_record,
)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CORRUPT = (OSError, EOFError, zlib.error)


class ZstdFrames(io.RawIOBase):
    """Decompresses a stream of zstd frames and raises ``EOFError`` when the input stops inside a frame.

    Written here because ``zstandard``'s ``stream_reader`` ends silently at a truncated frame (it returns the
    bytes decoded so far, then EOF), which would drop the rest of the file without a word.
    """

    def __init__(self, raw: IO[bytes], chunk: int = 1 << 16) -> None:
        import zstandard  # only where a file needs it

        super().__init__()
        self.raw, self.chunk = raw, chunk
        self._dctx = zstandard.ZstdDecompressor()
        self._error = zstandard.ZstdError
        self._frame: Any = None  # the zstandard.ZstdDecompressionObj of the frame being decoded
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not self._out:
            data = self.raw.read(self.chunk)
            if not data:
                if self._frame is not None:
                    raise EOFError("zstd stream ended inside a frame (truncated file)")
                return 0
            decoded = []
            while data:
                if self._frame is None:
                    self._frame = self._dctx.decompressobj()
                try:
                    decoded.append(self._frame.decompress(data))
                except self._error as err:
                    raise OSError(f"zstd: {err}") from err
                if self._frame.eof:  # the frame is complete; what follows is the next frame
                    data, self._frame = self._frame.unused_data, None
                else:
                    data = b""
            self._out = memoryview(b"".join(decoded))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def decompressed(raw: IO[bytes]) -> IO[bytes]:
    """``raw`` (seekable, at its start) decompressed according to its magic bytes."""
    magic = raw.read(4)
    raw.seek(0)
    if magic[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic == ZSTD_MAGIC:
        return io.BufferedReader(ZstdFrames(raw), buffer_size=1 << 16)
    return raw


def parse_line(
    raw: bytes, path: str, line: int, fields: Fields = DEFAULT_FIELDS, file_domain: str | None = None
) -> Record | None:
    """Validate one raw line; ``None`` for a blank line. Raises :class:`InputError`."""
    try:
        text_line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(path, line, INVALID_UTF8, f"undecodable byte at column {err.start + 1}") from None
    if not text_line.strip():
        return None
    try:
        obj = json.loads(text_line)
    except json.JSONDecodeError as err:
        raise InputError(path, line, INVALID_JSON, f"{err.msg} at column {err.colno}") from None
    return make_record(obj, path, line, fields, file_domain)


def iter_lines(
    raw: IO[bytes],
    path: str,
    on_error: OnError,
    skips: SkipLog,
    progress: Callable[[int], None] | None = None,
    fields: Fields = DEFAULT_FIELDS,
    file_domain: str | None = None,
) -> Iterator[Record]:
    """The valid records of an open JSON Lines file (``raw``: the compressed bytes, seekable)."""
    line = 0
    with decompressed(raw) as f:
        while True:
            try:
                data = f.readline()
            except _CORRUPT as err:
                # A truncated or corrupt compressed stream: the rest of the file cannot be read.
                handle(InputError(path, line + 1, UNREADABLE_FILE, f"corrupt file: {err}"), on_error, skips)
                return
            if not data:
                return
            line += 1
            if progress is not None and line % 256 == 0:
                progress(raw.tell())
            try:
                record = parse_line(data, path, line, fields, file_domain)
            except InputError as err:
                handle(err, on_error, skips)
                continue
            if record is not None:
                yield record


def iter_records(
    path: str | Path,
    on_error: OnError,
    skips: SkipLog,
    progress: Callable[[int], None] | None = None,
    fields: Fields = DEFAULT_FIELDS,
) -> Iterator[Record]:
    """Yield the valid records of one local JSON Lines file (plain, gzip or zstd)."""
    name = str(path)
    try:
        raw = open(path, "rb")  # noqa: SIM115 (closed by iter_lines)
    except OSError as err:
        raise InputError(name, 0, UNREADABLE_FILE, str(err)) from None
    with raw:
        yield from iter_lines(raw, name, on_error, skips, progress, fields, fields.path_domain(name))
