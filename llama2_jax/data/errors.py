"""Errors for unusable source records, and the policy that raises them or skips them."""

from __future__ import annotations

import collections

from absl import logging

ON_ERROR_CHOICES = ("raise", "skip")

# How many skipped records per file are logged one by one; later ones are only counted.
_MAX_LOGGED_PER_FILE = 5


class DataError(ValueError):
  """A record that cannot be used, with its file, line and field and what to do about it.

  Attributes:
    path: the source file, or None.
    line: 1-based line number in that file, or None when the problem is the whole file.
    field: the record field at fault, or None when the whole line is at fault.
    problem: what is wrong, without the location.
  """

  def __init__(self, problem: str, *, path: str | None = None, line: int | None = None,
               field: str | None = None, fix: str | None = None):
    self.path = path
    self.line = line
    self.field = field
    self.problem = problem
    self.fix = fix
    parts = []
    if path is not None:
      parts.append(f"{path}:{line}" if line is not None else str(path))
    if field is not None:
      parts.append(f"field {field!r}")
    location = ", ".join(parts)
    self.location = location
    message = f"{location}: {problem}" if location else problem
    if fix:
      message = f"{message} {fix}"
    super().__init__(message)


def validate_on_error(value: str, owner: str) -> None:
  if value not in ON_ERROR_CHOICES:
    raise ValueError(f"{owner}.on_error is {value!r}; expected one of {ON_ERROR_CHOICES}.")


class BadRecordHandler:
  """Raises a `DataError` (on_error="raise") or counts and logs it (on_error="skip").

  Attributes:
    on_error: "raise" or "skip".
    skipped: number of records skipped so far.
    skipped_by_file: the same count per source file.
  """

  def __init__(self, on_error: str = "raise"):
    validate_on_error(on_error, "BadRecordHandler")
    self.on_error = on_error
    self.skipped = 0
    self.skipped_by_file: collections.Counter[str] = collections.Counter()

  def handle(self, error: DataError) -> None:
    """Raises the error, or counts it and logs the first few per file."""
    if self.on_error == "raise":
      raise error
    key = str(error.path)
    self.skipped += 1
    self.skipped_by_file[key] += 1
    count = self.skipped_by_file[key]
    if count <= _MAX_LOGGED_PER_FILE:
      # The fix is left out: skipping is already what the caller chose.
      logging.warning("Skipped record %s: %s", error.location or "(no location)", error.problem)
    if count == _MAX_LOGGED_PER_FILE:
      logging.warning("Further skipped records of %s are counted but not logged.", key)

  def log_summary(self, dataset_name: str) -> None:
    """Logs how many records were skipped in each file, if any."""
    for path, count in sorted(self.skipped_by_file.items()):
      logging.warning("Skipped %d bad records of %s while reading %s.", count, path,
                      dataset_name)
