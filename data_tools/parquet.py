"""Reading parquet documents (FineWeb, The Stack...) with ``pyarrow``, with the bad-input policy of JSON Lines.

Only the columns the :class:`~data_tools.records.Fields` name are read, in record batches; each row becomes a
dict (nested structs become dicts, so dotted paths such as ``metadata.source`` work) and goes through the same
validation as a JSON object. Problems name the 1-based row: ``<file>:<row>: <reason>: <detail>``. A file that
cannot be decoded (truncated, a corrupt page) is ``unreadable_file``: the rest of that file is lost and counted
once under ``--on-error skip``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import IO

from data_tools.records import (
    DEFAULT_FIELDS,
    UNREADABLE_FILE,
    Fields,
    InputError,
    OnError,
    Record,
    SkipLog,
    handle,
    make_record,
)

PARQUET_MAGIC = b"PAR1"
BATCH_ROWS = 1024


def columns(fields: Fields, names: list[str]) -> list[str]:
    """The file's columns the fields need: a column named like the whole path, else its first part."""
    wanted = [fields.text, fields.id] + ([fields.domain] if fields.domain_from_path is None else [])
    out = []
    for path in wanted:
        name = path if path in names else path.split(".")[0]
        if name in names and name not in out:
            out.append(name)
    return out


def iter_rows(
    raw: IO[bytes],
    path: str,
    on_error: OnError,
    skips: SkipLog,
    progress: Callable[[int], None] | None = None,
    fields: Fields = DEFAULT_FIELDS,
    file_domain: str | None = None,
    size: int = 0,
) -> Iterator[Record]:
    """The valid records of an open parquet file (``raw`` seekable; ``size`` its bytes, for ``progress``)."""
    import pyarrow as pa  # only where a file needs it
    import pyarrow.parquet as pq

    row = 0
    try:
        pf = pq.ParquetFile(raw)
        total = max(pf.metadata.num_rows, 1)
        batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=columns(fields, pf.schema_arrow.names))
        for batch in batches:
            for obj in batch.to_pylist():
                row += 1
                try:
                    record = make_record(obj, path, row, fields, file_domain)
                except InputError as err:
                    handle(err, on_error, skips)
                    continue
                yield record
            if progress is not None:
                progress(size * row // total)
    except (pa.ArrowException, OSError, EOFError) as err:
        detail = " ".join(str(err).split())
        handle(InputError(path, row + 1, UNREADABLE_FILE, f"corrupt file: {detail}"), on_error, skips)
