"""Tests of the metrics log: JSONL records, resuming, cut lines and TensorBoard event files."""

import json
import math
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from llama2_jax import metrics_log
from llama2_jax.metrics_log import MetricsWriter, read_metrics


def _write_steps(workdir, stage, steps, start_step=0):
  with MetricsWriter(workdir, stage=stage, start_step=start_step, is_writer=True) as writer:
    for step in steps:
      writer.write(step, {f"{stage}/loss": float(step), f"{stage}/step_sq": step * step})


def _read_events(path):
  """Parses a TensorBoard event file: records of length (u64), its CRC, data and the data CRC."""
  events, data, offset = [], path.read_bytes(), 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    event = event_pb2.Event()
    event.ParseFromString(data[offset + 12:offset + 12 + length])
    events.append(event)
    offset += 12 + length + 4
  return events


def _scalars(event_dir):
  """Returns [(file name, step, tag, value)] of every scalar in the event files of a run."""
  scalars = []
  for path in sorted(event_dir.glob("events.out.tfevents.*")):
    for event in _read_events(path):
      for value in event.summary.value:
        scalars.append((path.name, event.step, value.tag, value.simple_value))
  return scalars


def test_write_and_read_round_trip(tmp_path):
  with MetricsWriter(tmp_path, stage="sft", is_writer=True) as writer:
    writer.write(1, {"sft/loss": 2.5, "sft/tokens": np.int32(7), "sft/ok": np.bool_(True)})
    writer.write(2, {"sft/loss": np.float32(1.25)})

  records = read_metrics(tmp_path / metrics_log.METRICS_FILENAME)
  assert [(record.stage, record.step) for record in records] == [("sft", 1), ("sft", 2)]
  assert records[0].metrics == {"sft/loss": 2.5, "sft/tokens": 7.0, "sft/ok": 1.0}
  assert records[1].metrics == {"sft/loss": 1.25}
  assert all(isinstance(record.time, float) for record in records)
  assert read_metrics(tmp_path) == records  # The work directory works as well as the file.


def test_non_finite_values_round_trip(tmp_path):
  with MetricsWriter(tmp_path, stage="ppo", is_writer=True) as writer:
    writer.write(0, {"ppo/a": math.nan, "ppo/b": math.inf, "ppo/c": -math.inf})

  # Each line must be strict JSON: Python's json would otherwise accept bare NaN.
  def reject_constant(name):
    raise AssertionError(f"metrics.jsonl contains the non-JSON constant {name}")

  line = (tmp_path / metrics_log.METRICS_FILENAME).read_text().strip()
  assert json.loads(line, parse_constant=reject_constant)["metrics"] == {
      "ppo/a": "NaN", "ppo/b": "Infinity", "ppo/c": "-Infinity"}

  (record,) = read_metrics(tmp_path)
  assert math.isnan(record.metrics["ppo/a"])
  assert record.metrics["ppo/b"] == math.inf
  assert record.metrics["ppo/c"] == -math.inf


def test_read_metrics_filters_by_stage(tmp_path):
  _write_steps(tmp_path, "sft", [1, 2])
  _write_steps(tmp_path, "reward", [1])
  assert [record.step for record in read_metrics(tmp_path, stage="sft")] == [1, 2]
  assert [record.stage for record in read_metrics(tmp_path)] == ["sft", "sft", "reward"]
  with pytest.raises(FileNotFoundError):
    read_metrics(tmp_path / "missing.jsonl")


def test_resume_drops_later_records_of_stage(tmp_path):
  _write_steps(tmp_path, "sft", range(10))
  _write_steps(tmp_path, "reward", range(5))

  # Resume sft from a checkpoint at step 5: its records 5..9 go, reward's records stay.
  _write_steps(tmp_path, "sft", range(5, 8), start_step=5)

  sft_steps = [record.step for record in read_metrics(tmp_path, stage="sft")]
  assert sft_steps == [0, 1, 2, 3, 4, 5, 6, 7]
  reward_steps = [record.step for record in read_metrics(tmp_path, stage="reward")]
  assert reward_steps == [0, 1, 2, 3, 4]
  steps, values = metrics_log.metric_series(read_metrics(tmp_path), stage="sft", key="sft/loss")
  np.testing.assert_array_equal(steps, np.arange(8))
  np.testing.assert_array_equal(values, np.arange(8.0))


def test_start_step_zero_drops_whole_stage(tmp_path):
  _write_steps(tmp_path, "sft", range(4))
  _write_steps(tmp_path, "reward", range(2))
  _write_steps(tmp_path, "sft", [0, 1])
  assert [record.step for record in read_metrics(tmp_path, stage="sft")] == [0, 1]
  assert len(read_metrics(tmp_path, stage="reward")) == 2


def test_resume_keeps_file_permissions(tmp_path):
  _write_steps(tmp_path, "sft", range(4))
  path = tmp_path / metrics_log.METRICS_FILENAME
  path.chmod(0o640)
  _write_steps(tmp_path, "sft", [2], start_step=2)
  assert path.stat().st_mode & 0o777 == 0o640


def test_write_rejects_decreasing_steps(tmp_path):
  with MetricsWriter(tmp_path, stage="sft", start_step=5, is_writer=True) as writer:
    with pytest.raises(ValueError, match="then got step 4"):
      writer.write(4, {"sft/loss": 1.0})
    writer.write(6, {"sft/loss": 1.0})
    writer.write(6, {"sft/accuracy": 0.5})  # Several calls may log the same step.
    with pytest.raises(ValueError, match="logged step 6 .* then got step 5"):
      writer.write(5, {"sft/loss": 1.0})
  assert [record.step for record in read_metrics(tmp_path)] == [6, 6]


def test_write_rejects_non_scalar_values(tmp_path):
  with MetricsWriter(tmp_path, stage="sft", is_writer=True) as writer:
    with pytest.raises(ValueError, match="'sft/loss' must be a scalar number.*shape \\(2,\\)"):
      writer.write(0, {"sft/loss": np.zeros(2)})
    with pytest.raises(ValueError, match="'sft/name' must be a scalar number"):
      writer.write(0, {"sft/name": "abc"})
    with pytest.raises(ValueError, match="'sft/z' must be a scalar number"):
      writer.write(0, {"sft/z": 1 + 2j})
  assert read_metrics(tmp_path) == []


def test_invalid_writer_arguments(tmp_path):
  with pytest.raises(ValueError, match="stage must be a non-empty name"):
    MetricsWriter(tmp_path, stage="a/b", is_writer=True)
  with pytest.raises(ValueError, match="stage must be a non-empty name"):
    MetricsWriter(tmp_path, stage="", is_writer=True)
  with pytest.raises(ValueError, match="start_step must be at least 0, got -1"):
    MetricsWriter(tmp_path, stage="sft", start_step=-1, is_writer=True)


def test_non_writer_process_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with MetricsWriter(workdir, stage="sft", is_writer=False) as writer:
    writer.write(0, {"sft/loss": 1.0})
    with pytest.raises(ValueError, match="must be a scalar number"):
      writer.write(1, {"sft/loss": [1.0, 2.0]})  # Other processes still check their input.
  assert not workdir.exists()


def test_cut_last_line_is_skipped_and_repaired(tmp_path):
  _write_steps(tmp_path, "sft", range(3))
  path = tmp_path / metrics_log.METRICS_FILENAME
  with open(path, "a", encoding="utf-8") as file:
    file.write('{"stage": "sft", "step": 3, "ti')  # A process killed mid-line.

  assert [record.step for record in read_metrics(tmp_path)] == [0, 1, 2]

  # A writer opened later removes the cut line before appending, so every line parses.
  _write_steps(tmp_path, "reward", [0], start_step=0)
  lines = path.read_text().splitlines()
  assert len(lines) == 4
  assert [json.loads(line)["stage"] for line in lines] == ["sft", "sft", "sft", "reward"]


def test_invalid_line_before_last_raises(tmp_path):
  path = tmp_path / metrics_log.METRICS_FILENAME
  path.write_text('{"stage": "sft", "step": 0, "time": 1.0, "metrics": {}}\n'
                  'not json\n'
                  '{"stage": "sft", "step": 1, "time": 2.0, "metrics": {}}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2 is not a valid metrics record"):
    read_metrics(path)


def test_tensorboard_event_file_has_scalars(tmp_path):
  _write_steps(tmp_path, "sft", [1, 2])
  event_dir = tmp_path / metrics_log.TENSORBOARD_DIRNAME / "sft"
  assert list(event_dir.glob("events.out.tfevents.*"))

  scalars = [(step, tag, value) for _, step, tag, value in _scalars(event_dir)]
  assert (1, "sft/loss", 1.0) in scalars
  assert (2, "sft/loss", 2.0) in scalars
  assert (2, "sft/step_sq", 4.0) in scalars

  # A stage started from scratch purges at step 0, hiding the events of any earlier attempt.
  (path,) = event_dir.glob("events.out.tfevents.*")
  assert [event.step for event in _read_events(path) if event.HasField("session_log")] == [0]


def test_tensorboard_resume_keeps_earlier_event_file(tmp_path):
  # Both writers open within the same second. tensorboardX names event files by the second and
  # the host, so without a unique suffix the second writer would truncate the first file.
  _write_steps(tmp_path, "sft", range(6))
  _write_steps(tmp_path, "sft", range(3, 5), start_step=3)

  event_dir = tmp_path / metrics_log.TENSORBOARD_DIRNAME / "sft"
  files = sorted(event_dir.glob("events.out.tfevents.*"))
  assert len(files) == 2
  loss_steps = sorted(step for _, step, tag, _ in _scalars(event_dir) if tag == "sft/loss")
  # Steps 0..5 come from the first run and 3..4 again from the resumed one. TensorBoard hides
  # the first run's 3..5 because the resumed file starts with a purge at step 3.
  assert loss_steps == [0, 1, 2, 3, 3, 4, 4, 5]

  # TensorBoard reads a run's files in name order, so the resumed file must sort last.
  first_steps = {step for name, step, _, _ in _scalars(event_dir) if name == files[0].name}
  assert first_steps == {0, 1, 2, 3, 4, 5}
  purge_steps = [event.step for event in _read_events(files[1]) if event.HasField("session_log")]
  assert purge_steps == [3]


def test_close_is_idempotent(tmp_path):
  writer = MetricsWriter(tmp_path, stage="sft", is_writer=True)
  writer.write(0, {"sft/loss": 1.0})
  writer.close()
  writer.close()
  assert len(read_metrics(tmp_path)) == 1


def test_write_after_close_raises(tmp_path):
  for is_writer in (True, False):
    writer = MetricsWriter(tmp_path, stage="sft", is_writer=is_writer)
    writer.close()
    with pytest.raises(ValueError, match="metrics writer of stage 'sft' is closed"):
      writer.write(0, {"sft/loss": 1.0})
