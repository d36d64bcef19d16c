"""Read training records from JSONL / JSON / Parquet files, ``datasets`` folders, or folders of those.

Every record is a dict with one of the supported shapes:

* ``{"text": str}`` — plain language modelling / pretraining;
* ``{"messages": [...], "tools"?: [...]}`` — a chat conversation;
* ``{"prompt": str | [...], "completion": str | [...]}`` — prompt-completion (plain or chat).

:func:`read_records` yields :class:`Record` (the dict plus where it came from), so every later
error can name the file and line. Problems raise :class:`~qwenkit.errors.DataError`.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenkit.errors import DataError

__all__ = ["RECORD_FORMATS", "Record", "read_records", "record_format"]

logger = logging.getLogger(__name__)

#: The record shapes, in the order they are recognised.
RECORD_FORMATS = ("messages", "prompt_completion", "text")
_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


@dataclass(frozen=True)
class Record:
    """One record and its provenance: ``line`` is 1-based (a JSONL line, a JSON list item, a
    Parquet / ``datasets`` row); ``unit`` says which."""

    data: dict[str, Any]
    file: str
    line: int
    unit: str = "line"

    @property
    def where(self) -> str:
        return f"{self.file} {self.unit} {self.line}"

    def error(self, what: str) -> DataError:
        """A :class:`DataError` naming this record's file and line."""
        return DataError(f"{self.where}: {what}")


def record_format(record: Record, text_field: str = "text") -> str:
    """Which of :data:`RECORD_FORMATS` a record has; raises :class:`DataError` naming the fields it has."""
    d = record.data
    if "messages" in d:
        if not isinstance(d["messages"], list) or not d["messages"]:
            raise record.error("'messages' must be a non-empty list of message dicts")
        return "messages"
    if "prompt" in d and "completion" in d:
        return "prompt_completion"
    if text_field in d:
        if not isinstance(d[text_field], str):
            raise record.error(f"{text_field!r} must be a string, got {type(d[text_field]).__name__}")
        return "text"
    raise record.error(
        f"the record has none of the fields a training example needs ('{text_field}', 'messages', or "
        f"'prompt' + 'completion'); it has {sorted(d)}"
    )


def read_records(path: str | os.PathLike[str], *, split: str = "train", text_field: str = "text",
                 check: bool = True) -> Iterator[Record]:  # fmt: skip
    """Yield the records of a file, a ``datasets`` ``save_to_disk`` folder, or a folder of files.

    Files: ``.jsonl`` / ``.jsonl.gz`` (one object per line; blank lines skipped), ``.json`` /
    ``.json.gz`` (a list of objects, or JSON lines), ``.parquet``. A folder is read as a
    ``datasets`` folder when it has ``dataset_info.json``/``state.json``/``dataset_dict.json``
    (``split`` picks the split of a ``DatasetDict``), else every supported file under it is read
    in sorted path order.

    With ``check`` each record must have one of :data:`RECORD_FORMATS` (see :func:`record_format`).
    Raises :class:`DataError` for malformed JSON (file + line), a record that is not an object,
    a missing field (file + line + the fields it has), or a dataset with no records.
    """
    root = Path(path)
    count = 0
    for rec in _read_any(root, split):
        if check:
            record_format(rec, text_field)
        count += 1
        yield rec
    if count == 0:
        raise DataError(f"{root}: the dataset has no records")


def _read_any(root: Path, split: str) -> Iterator[Record]:
    if root.is_dir():
        if any((root / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
            yield from _read_hf_folder(root, split)
            return
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(_FILE_SUFFIXES))
        if not files:
            raise DataError(f"{root}: no data files ({', '.join(_FILE_SUFFIXES)}) in the folder")
        for f in files:
            yield from _read_file(f)
    elif root.is_file():
        yield from _read_file(root)
    else:
        raise DataError(f"{root}: no such file or folder")


def _read_file(path: Path) -> Iterator[Record]:
    name = path.name
    if name.endswith(".parquet"):
        yield from _read_parquet(path)
    elif name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        yield from _read_json(path)
    else:
        raise DataError(f"{path}: unsupported file type (expected one of {', '.join(_FILE_SUFFIXES)})")


def _open_text(path: Path) -> Any:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _as_record(obj: Any, path: Path, line: int, unit: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{path} {unit} {line}: expected a JSON object, got {type(obj).__name__}")
    return Record(obj, str(path), line, unit)


def _read_json(path: Path) -> Iterator[Record]:
    try:
        with _open_text(path) as f:
            if path.name.endswith((".json", ".json.gz")):
                # a .json file is either one list of objects or JSON lines
                text = f.read()
                if text.lstrip()[:1] == "[":
                    try:
                        items = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
                    for i, obj in enumerate(items, start=1):
                        yield _as_record(obj, path, i, "item")
                    return
                lines: Iterator[str] = iter(text.split("\n"))  # not splitlines: U+2028 may sit in strings
            else:
                lines = f
            for lineno, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield _as_record(obj, path, lineno, "line")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except (OSError, EOFError) as e:  # gzip: truncated or not gzip
        raise DataError(f"{path}: cannot read ({e})") from None


def _read_parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install 'qwenkit[train]')") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            row += 1
            yield Record(obj, str(path), row, "row")


def _read_hf_folder(path: Path, split: str) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a `datasets` folder needs the datasets package "
                        "(pip install datasets)") from None  # fmt: skip
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot load the `datasets` folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    for row, obj in enumerate(ds, start=1):
        yield Record(dict(obj), str(path), row, "row")
