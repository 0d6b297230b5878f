"""Line-numbered readers of JSONL and CSV files, and checks of the fields they contain.

Every problem becomes a `DataError` that names the file, the 1-based line and the field, and that
the caller's `BadRecordHandler` raises or skips. A file ending in ".gz" is decompressed. Text must
be UTF-8: a line that is not gets its own error instead of being decoded with replacement
characters.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from typing import Any, Iterator, Mapping

from llama2_jax.data.errors import BadRecordHandler, DataError

SKIP_HINT = "Fix the record, or set on_error='skip' in the data config to skip bad records."


def check_file(path: str) -> None:
  """Raises a `DataError` if the path is not an existing file."""
  if not os.path.exists(path):
    raise DataError(
        "file not found.", path=path,
        fix="Check the source path in the data config; the shipped files are listed in "
        "llama2_jax/assets/README.md.")
  if not os.path.isfile(path):
    raise DataError("is not a regular file.", path=path,
                    fix="Point the data config at a file, not a directory.")


def _read_bytes(path: str) -> bytes:
  check_file(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    return f.read()


def iter_jsonl(path: str, handler: BadRecordHandler) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (line number, JSON object) for each non-blank line of a JSONL file."""
  lines = _read_bytes(path).split(b"\n")
  for number, raw in enumerate(lines, start=1):
    if not raw.strip():
      continue
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      handler.handle(DataError(
          f"is not valid UTF-8 (byte {e.start} of the line).", path=path, line=number,
          fix="Re-encode the file as UTF-8, or set on_error='skip'."))
      continue
    try:
      record = json.loads(text)
    except json.JSONDecodeError as e:
      handler.handle(DataError(f"malformed JSON ({e.msg} at column {e.colno}).", path=path,
                               line=number, fix=SKIP_HINT))
      continue
    if not isinstance(record, dict):
      handler.handle(DataError(f"expected a JSON object, got {type(record).__name__}.",
                               path=path, line=number, fix=SKIP_HINT))
      continue
    yield number, record


def iter_csv(path: str, handler: BadRecordHandler) -> Iterator[tuple[int, dict[str, str]]]:
  """Yields (line number of the row's first line, row) for each row of a CSV file with a header.

  The whole file must be UTF-8, because a quoted field may span lines. For a file that is not,
  the handler gets one `DataError` with the line of the first invalid byte, and a skip policy
  skips the whole file.
  """
  data = _read_bytes(path)
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    handler.handle(DataError("is not valid UTF-8.", path=path, line=line,
                             fix="Re-encode the file as UTF-8."))
    return
  reader = csv.DictReader(io.StringIO(text, newline=""))
  if not reader.fieldnames:
    handler.handle(DataError("has no header row.", path=path, line=1,
                             fix="Add a header row naming the columns."))
    return
  start = reader.line_num + 1
  for row in reader:
    if None in row:
      handler.handle(DataError(
          f"has {len(reader.fieldnames) + len(row[None])} columns, the header has "
          f"{len(reader.fieldnames)}.", path=path, line=start, fix=SKIP_HINT))
    else:
      yield start, row
    start = reader.line_num + 1


def iter_records(path: str, handler: BadRecordHandler) -> Iterator[tuple[int, Mapping[str, Any]]]:
  """Reads a CSV file (".csv", ".csv.gz") or else a JSONL file, as (line number, record)."""
  if path.endswith((".csv", ".csv.gz")):
    return iter_csv(path, handler)
  return iter_jsonl(path, handler)


def text_field(record: Mapping[str, Any], field: str, path: str, line: int, *,
               allow_empty: bool = False) -> str:
  """Returns a string field, raising a `DataError` if it is missing, not a string or empty."""
  if field not in record or record[field] is None:
    raise DataError("is missing.", path=path, line=line, field=field, fix=SKIP_HINT)
  value = record[field]
  if not isinstance(value, str):
    raise DataError(f"must be a string, got {type(value).__name__}.", path=path, line=line,
                    field=field, fix=SKIP_HINT)
  if not allow_empty and not value.strip():
    raise DataError("is empty.", path=path, line=line, field=field, fix=SKIP_HINT)
  return value


def list_field(record: Mapping[str, Any], field: str, path: str, line: int) -> list[Any]:
  """Returns a non-empty list field, raising a `DataError` otherwise."""
  value = record.get(field)
  if value is None:
    raise DataError("is missing.", path=path, line=line, field=field, fix=SKIP_HINT)
  if not isinstance(value, list):
    raise DataError(f"must be a list, got {type(value).__name__}.", path=path, line=line,
                    field=field, fix=SKIP_HINT)
  if not value:
    raise DataError("is an empty list.", path=path, line=line, field=field, fix=SKIP_HINT)
  return value


def read_valid(path: str, handler: BadRecordHandler, parse) -> Iterator[Any]:
  """Applies `parse(line, record)` to each record, passing its `DataError`s to the handler.

  `parse` returns one output, or None to drop the record without counting it as bad.
  """
  for line, record in iter_records(path, handler):
    try:
      output = parse(line, record)
    except DataError as error:
      handler.handle(error)
      continue
    if output is not None:
      yield output
