"""Metrics of every stage, written to one JSONL file and to TensorBoard event files.

Layout under the work directory:
  metrics.jsonl            one JSON object per line:
                           {"stage": "sft", "step": 10, "time": 1.7e9, "metrics": {"sft/loss": 2.1}}
                           where time is seconds since the epoch and metrics are floats.
  tensorboard/<stage>/     event files written by tensorboardX (no TensorFlow needed), one run
                           per stage.

JSON has no NaN or infinity, so those values are written as the strings "NaN", "Infinity" and
"-Infinity" (the spellings Python's `float` parses), and `read_metrics` turns them back into
floats.

Only process 0 writes: on other processes `MetricsWriter` is a no-op. Each record is flushed to
the operating system when written, so a killed process keeps every record it logged, and at most
the last line is cut short; `read_metrics` skips a cut last line. Records reach the disk itself
only at `close` (fsync). One writer at a time may append to the file.

Resuming: a stage restarted from a checkpoint opens its writer with `start_step` set to the
first step it will log again. The writer first drops that stage's records with step >=
start_step, which were logged after the checkpoint, and TensorBoard hides them with
`purge_step`. Which step that is depends on how records are numbered: if the record of step s
is logged before the checkpoint at step s is saved (records numbered by the steps completed),
pass s + 1, so that the record at s is kept. If records are numbered by the step about to run,
pass s.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import stat
import time
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import tensorboardX
from absl import logging

from llama2_jax import _atomic, distributed

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"

_NON_FINITE_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class MetricsRecord(NamedTuple):
  """One logged line: a stage's metrics at one step."""

  stage: str
  step: int
  time: float
  metrics: dict[str, float]


class MetricsWriter:
  """Appends each step's metrics of one stage to `metrics.jsonl` and to TensorBoard.

  Use as a context manager, or call `close` at the end of the stage.
  """

  def __init__(self, workdir: str | os.PathLike, *, stage: str, start_step: int = 0,
               is_writer: bool | None = None):
    """Opens the log of `stage`, dropping its records with step >= start_step.

    Args:
      workdir: directory of `metrics.jsonl` and `tensorboard/`; created if missing.
      stage: stage name, e.g. "sft"; also the TensorBoard run name.
      start_step: first step this writer will log. Records of the stage with step >=
        start_step are dropped. 0 for a stage started from scratch, which drops every earlier
        record of the stage. When resuming, see the module docstring for s versus s + 1.
      is_writer: whether this process writes. None means `jax.process_index() == 0`.
    """
    if not stage or "/" in stage:
      raise ValueError(f"stage must be a non-empty name without '/', got {stage!r}.")
    if start_step < 0:
      raise ValueError(f"start_step must be at least 0, got {start_step}.")
    self.stage = stage
    self.path = pathlib.Path(workdir) / METRICS_FILENAME
    self._last_step = start_step
    self._start_step = start_step
    self._file = None
    self._summary_writer = None
    self._closed = False
    if is_writer is None:
      is_writer = distributed.is_main_process()
    if not is_writer:
      return

    self.path.parent.mkdir(parents=True, exist_ok=True)
    dropped = _drop_records(self.path, stage=stage, min_step=start_step)
    if dropped:
      logging.info("Dropped %d records of stage %r with step >= %d from %s before resuming.",
                   dropped, stage, start_step, self.path)
    self._file = open(self.path, "a", encoding="utf-8")
    # tensorboardX 2.6 names an event file by the second and the host only and opens it with
    # "wb", so a writer reopened within the same second would truncate the previous file. The
    # nanosecond suffix keeps the files apart, and TensorBoard, which reads a run's files in name
    # order, still reads them in the order they were written and applies the purge after them.
    self._summary_writer = tensorboardX.SummaryWriter(
        logdir=str(self.path.parent / TENSORBOARD_DIRNAME / stage),
        purge_step=start_step, filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs scalar metrics at `step` and flushes both outputs.

    Args:
      step: training step, at least start_step and at least the last step written. Several
        calls may log the same step.
      metrics: key -> scalar (Python or numpy number, or 0-d array).

    Raises:
      ValueError: on a step before the last one, a value that is not a scalar number, or a
        closed writer.
    """
    if self._closed:
      raise ValueError(f"The metrics writer of stage {self.stage!r} is closed. Open a new one.")
    step = int(step)
    if step < self._last_step:
      raise ValueError(
          f"Stage {self.stage!r} logged step {self._last_step} (or started there), then got "
          f"step {step}; steps must not decrease.")
    values = {key: _to_float(key, value) for key, value in metrics.items()}
    self._last_step = step
    if self._file is None:
      return

    record = {"stage": self.stage, "step": step, "time": time.time(),
              "metrics": {key: _encode_float(value) for key, value in values.items()}}
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    for key, value in values.items():
      self._summary_writer.add_scalar(key, value, global_step=step)
    self._summary_writer.flush()

  def close(self) -> None:
    """Syncs the JSONL file to disk and closes both outputs; later calls do nothing."""
    self._closed = True
    if self._file is not None:
      os.fsync(self._file.fileno())
      self._file.close()
      self._file = None
    if self._summary_writer is not None:
      self._summary_writer.close()
      self._summary_writer = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_metrics(path: str | os.PathLike, *, stage: str | None = None) -> list[MetricsRecord]:
  """Reads the records of a metrics file, in file order.

  Args:
    path: a `metrics.jsonl` file, or the work directory that contains it.
    stage: if given, only that stage's records.

  Returns:
    The records, with "NaN" and "Infinity" strings decoded to floats. A last line cut short by
    a killed process is skipped with a warning.

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: on an invalid line other than the last.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / METRICS_FILENAME
  records, _ = _parse_file(path)
  return [record for _, record in records if stage is None or record.stage == stage]


def metric_series(records: Sequence[MetricsRecord], *, stage: str, key: str
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Returns (steps, values) of one metric of one stage, in logged order, as numpy arrays."""
  points = [(record.step, record.metrics[key]) for record in records
            if record.stage == stage and key in record.metrics]
  steps = np.asarray([step for step, _ in points], np.int64)
  values = np.asarray([value for _, value in points], np.float64)
  return steps, values


def _to_float(key: str, value: Any) -> float:
  array = np.asarray(value)
  is_real = np.issubdtype(array.dtype, np.number) and not np.issubdtype(
      array.dtype, np.complexfloating)
  if array.ndim != 0 or not (is_real or array.dtype == bool):
    raise ValueError(
        f"Metric {key!r} must be a scalar number, got {type(value).__name__} with shape "
        f"{array.shape} and dtype {array.dtype}.")
  return float(array)


def _encode_float(value: float) -> float | str:
  if math.isnan(value):
    return "NaN"
  if math.isinf(value):
    return "Infinity" if value > 0 else "-Infinity"
  return value


def _decode_float(value: float | int | str) -> float:
  if isinstance(value, str):
    return _NON_FINITE_STRINGS[value]
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TypeError(f"metric value {value!r} is not a number")
  return float(value)


def _decode_record(line: str) -> MetricsRecord:
  raw = json.loads(line)
  return MetricsRecord(
      stage=str(raw["stage"]), step=int(raw["step"]), time=float(raw["time"]),
      metrics={key: _decode_float(value) for key, value in raw["metrics"].items()})


def _parse_file(path: pathlib.Path) -> tuple[list[tuple[str, MetricsRecord]], bool]:
  """Returns each valid line with its record, and whether the file needs repair.

  The file needs repair when its last line is cut short or lacks its newline, because a record
  appended to it would then join that line.
  """
  text = path.read_text(encoding="utf-8")
  lines = text.splitlines()
  needs_repair = bool(text) and not text.endswith("\n")
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append((line, _decode_record(line)))
    except (ValueError, KeyError, TypeError) as error:
      if number < len(lines):
        raise ValueError(f"{path}:{number} is not a valid metrics record: {error}") from error
      logging.warning("Skipping the cut last line %d of %s: %s", number, path, error)
      needs_repair = True
  return records, needs_repair


def _drop_records(path: pathlib.Path, *, stage: str, min_step: int) -> int:
  """Rewrites `path` without `stage`'s records with step >= min_step; returns how many went.

  A cut last line is removed as well. The file is replaced atomically, so a crash here leaves
  either the old or the new file.
  """
  if not path.exists():
    return 0
  records, needs_repair = _parse_file(path)
  kept = [line + "\n" for line, record in records
          if record.stage != stage or record.step < min_step]
  dropped = len(records) - len(kept)
  if dropped or needs_repair:
    _replace_file(path, "".join(kept))
  return dropped


def _replace_file(path: pathlib.Path, text: str) -> None:
  with _atomic.atomic_file(path, permissions=stat.S_IMODE(path.stat().st_mode)) as file:
    file.write(text)
