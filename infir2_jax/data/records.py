"""Random-access record sources: JSONL, Parquet, ArrayRecord, synthetic (prepared token
shards: data/prepared.py).

Every source is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`) whose items are
`Record(where, value)`: `where` names the file and line/row so that a bad record deep inside a
pipeline (possibly in a worker process) still produces an error a person can act on.
Sources hold no open file handles across pickling, so grain can ship them to worker processes.
"""

from __future__ import annotations

import glob
import json
import os
import typing
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PREPARED_INFO = "prepared.json"  # written by `python -m infir2_jax.prepare`
MAX_RECORD_BYTES = 64 * 2**20  # `data.max_document_bytes`'s default


class DataError(ValueError):
    """Bad input data; the message names the file (and line or row)."""


class Record(typing.NamedTuple):
    where: str  # "file:line", "file:row N", "shard#N": where the record came from
    value: typing.Any  # a JSON object (dict), or a token array for prepared/synthetic data


def expand_paths(path: str | None, suffixes: Sequence[str], key: str = "data.path") -> list[Path]:
    """A file, a directory (its files with one of `suffixes`, sorted) or a glob pattern."""
    if path is None:
        raise DataError(f"{key}: required for this data source")
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(tuple(suffixes)))
    elif p.is_file():
        files = [p]
    else:
        files = [Path(f) for f in sorted(glob.glob(path)) if Path(f).is_file()]
        if not files:
            raise DataError(f"{key}: {path}: data file not found")
    if not files:
        raise DataError(f"{key}: {path}: no {'/'.join(suffixes)} files in this directory")
    return files


class JsonlSource:
    """One JSON object per line over one or more files. Opening indexes the byte offset of
    every non-empty line and checks that it parses and holds `field`, so a malformed line is
    reported (file:line) before training starts, not hours in."""

    def __init__(self, files: Sequence[Path], field: str, max_bytes: int = MAX_RECORD_BYTES):
        self.files, self.field = [str(f) for f in files], field
        file_index, offsets, sizes, lines = [], [], [], []
        for i, path in enumerate(self.files):
            offset = 0
            with open(path, "rb") as f:
                # readline with a bound: memory stays bounded whatever the file holds.
                for number, line in enumerate(iter(lambda: f.readline(max_bytes + 1), b""), 1):
                    where = f"{path}:{number}"
                    _check_size(len(line.rstrip(b"\r\n")), max_bytes, where)
                    if line.strip():
                        _parse_json_record(line, where, field)
                        file_index.append(i)
                        offsets.append(offset)
                        sizes.append(len(line))
                        lines.append(number)
                    offset += len(line)
        if not offsets:
            raise DataError(f"{', '.join(self.files)}: no documents")
        self._file = np.asarray(file_index, np.int32)
        self._offset = np.asarray(offsets, np.int64)
        self._size = np.asarray(sizes, np.int64)
        self._line = np.asarray(lines, np.int64)
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._offset)

    def __getitem__(self, index: int) -> Record:
        i = int(self._file[index])
        if i not in self._fds:  # one descriptor per file and process, shared by grain's threads
            self._fds.setdefault(i, os.open(self.files[i], os.O_RDONLY))
        # pread: positional, so concurrent reads from grain's thread pool do not race on a seek.
        line = os.pread(self._fds[i], int(self._size[index]), int(self._offset[index]))
        where = f"{self.files[i]}:{int(self._line[index])}"
        return Record(where, _parse_json_record(line, where, self.field))

    def __getstate__(self):
        return {**self.__dict__, "_fds": {}}


class ParquetSource:
    """Rows of Parquet files; only the needed column is read (kept as Arrow buffers)."""

    def __init__(self, files: Sequence[Path], field: str, max_bytes: int = MAX_RECORD_BYTES):
        import pyarrow.parquet as pq

        self.files, self.field, self.max_bytes = [str(f) for f in files], field, max_bytes
        columns, starts = [], [0]
        for path in self.files:
            try:
                schema = pq.read_schema(path)
            except Exception as e:  # pyarrow raises several types for a bad file
                raise DataError(f"{path}: not a readable Parquet file ({e})") from None
            if field not in schema.names:
                raise DataError(f"{path}: missing field {field!r} (columns: {schema.names})")
            column = pq.read_table(path, columns=[field]).column(field)
            columns.append(column)
            starts.append(starts[-1] + len(column))
        if starts[-1] == 0:
            raise DataError(f"{', '.join(self.files)}: no documents")
        self._columns, self._starts = columns, np.asarray(starts)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> Record:
        i = int(np.searchsorted(self._starts, index, side="right") - 1)
        row = int(index - self._starts[i])
        where = f"{self.files[i]}:row {row}"
        value = self._columns[i][row].as_py()
        if isinstance(value, str):  # Arrow holds it whole already; the tokenizer must not
            _check_size(len(value.encode("utf-8")), self.max_bytes, where)
        return Record(where, {self.field: value})


class ArrayRecordJsonSource:
    """ArrayRecord files whose records are UTF-8 JSON objects (one JSONL line per record)."""

    def __init__(self, files: Sequence[Path], field: str, max_bytes: int = MAX_RECORD_BYTES):
        import grain

        self.files, self.field, self.max_bytes = [str(f) for f in files], field, max_bytes
        try:
            self._source = grain.sources.ArrayRecordDataSource(self.files)
        except Exception as e:  # array_record raises RuntimeError/ValueError for bad files
            raise DataError(f"{', '.join(self.files)}: not readable as ArrayRecord ({e})") from None
        if len(self._source) == 0:
            raise DataError(f"{', '.join(self.files)}: no documents")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        where = f"{','.join(self.files)}#{index}"
        record = self._source[index]
        _check_size(len(record), self.max_bytes, where)
        return Record(where, _parse_json_record(record, where, self.field))


class InMemorySource:
    """Token arrays held in memory (the synthetic corpus, tests)."""

    def __init__(self, documents: Sequence[np.ndarray], name: str = "memory"):
        if not documents:
            raise DataError(f"{name}: no documents")
        self._documents, self._name = list(documents), name

    def __len__(self) -> int:
        return len(self._documents)

    def __getitem__(self, index: int) -> Record:
        return Record(f"{self._name}#{index}", self._documents[index])


def _parse_json_record(line: bytes | str, where: str, field: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}:{e.colno}: invalid JSON: {_json_reason(e)}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: invalid JSON: not UTF-8 ({e})") from None
    if not isinstance(record, dict) or field not in record:
        raise DataError(f"{where}: missing field {field!r}")
    _check_text(record[field], where, field)
    return record


def _check_size(size: int, limit: int, where: str) -> None:
    if size > limit:
        raise DataError(
            f"{where}: a record of more than {limit:,} bytes (data.max_document_bytes); split "
            "the document or raise the limit"
        )


def _check_text(value, where: str, field: str) -> None:
    """Every string under `field` encodes as UTF-8: JSON's escapes can carry a lone surrogate
    (`"\\ud800"`) that would otherwise crash the tokenizer mid-run."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = repr(value[e.start : e.end])
            raise DataError(
                f"{where}: field {field!r} holds invalid Unicode ({bad} at character "
                f"{e.start}, a lone surrogate)"
            ) from None
    elif isinstance(value, dict):
        for item in value.values():
            _check_text(item, where, field)
    elif isinstance(value, list):
        for item in value:
            _check_text(item, where, field)


def _json_reason(e: json.JSONDecodeError) -> str:
    """json's reason as a whole sentence: some messages end in "at", expecting a position."""
    reason = f"{e.msg} column {e.colno}" if e.msg.endswith(" at") else e.msg
    found = repr(e.doc[e.pos]) if e.pos < len(e.doc) else "the end of the record"
    return f"{reason} (found {found})"
