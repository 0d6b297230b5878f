"""The training loop shared by every stage: resume, log, checkpoint, stop on NaN or SIGTERM.

A stage's loop restores its latest checkpoint when there is one (state and data position), so a
killed run that is started again continues where it stopped and reaches the same numbers. SIGTERM
(preemption) makes the loop save a checkpoint after the current step and exit with status 143. A
non-finite loss stops the run with `NonFiniteLossError` naming the stage, step and metric; the
step's result is not saved, so the last checkpoint is the last good state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import jax
import numpy as np
import tqdm

from llama2_jax import distributed
from llama2_jax.checkpoint import CheckpointConfig, Checkpointer
from llama2_jax.metrics_log import MetricsWriter


class NonFiniteLossError(FloatingPointError):
  """A loss metric became NaN or infinite."""


class Preempted(SystemExit):
  """SIGTERM arrived; the state was checkpointed. Exits with status 143 (128 + SIGTERM)."""

  def __init__(self, stage: str, step: int):
    super().__init__(143)
    self.stage, self.step = stage, step

  def __str__(self) -> str:
    return (f"Preempted by SIGTERM in stage {self.stage!r} at step {self.step}; a checkpoint was "
            "saved. Run the same command again to resume.")


class _TerminationFlag:
  """Records SIGTERM instead of dying, so the loop can checkpoint first."""

  def __init__(self):
    self.raised = False

  @contextlib.contextmanager
  def installed(self):
    try:
      previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: signals cannot be caught here.
      yield self
      return
    try:
      yield self
    finally:
      signal.signal(signal.SIGTERM, previous)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received; saving a checkpoint after this step.")
    self.raised = True


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """Settings of one stage's loop, besides the step function."""

  stage: str
  num_steps: int
  workdir: str
  checkpoint_dir: str
  checkpoint_every: int
  keep_checkpoints: int
  log_every: int
  loss_keys: tuple[str, ...]


def check_finite(stage: str, step: int, metrics: Mapping[str, float],
                 keys: tuple[str, ...]) -> None:
  """Raises `NonFiniteLossError` if any of `keys` in `metrics` is NaN or infinite."""
  for key in keys:
    if key in metrics and not math.isfinite(metrics[key]):
      raise NonFiniteLossError(
          f"Stage {stage!r} stopped at step {step}: metric {key} is {metrics[key]}. The last good "
          "checkpoint is kept; lower the learning rate or check the data, then run again.")


def run_loop(settings: LoopSettings, *, create_state: Callable[[], Any], abstract_state: Any,
             step_fn: Callable[[Any, Any], tuple[Any, dict]],
             batches: Iterator[Any], get_data_state: Callable[[], dict[str, int]],
             set_data_state: Callable[[dict[str, int]], None],
             metadata: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, float]]:
  """Runs `step_fn(state, batch)` until `settings.num_steps`, resuming from a checkpoint.

  Args:
    settings: the stage's loop settings.
    create_state: makes the initial state, called only when there is no checkpoint; the
      state's `step` counts the loop's steps.
    abstract_state: the state's `ShapeDtypeStruct`s with shardings, the restore target.
    step_fn: the jitted step; it may donate the state.
    batches: yields one batch per step.
    get_data_state: returns the data position (a dict of ints) after the batches consumed so far.
    set_data_state: moves the data source to a restored position.
    metadata: JSON-serialisable data saved with each checkpoint.

  Returns:
    (final state, metrics of the last step as floats).
  """
  checkpoint_config = CheckpointConfig(
      directory=settings.checkpoint_dir, keep_last=settings.keep_checkpoints,
      save_interval_steps=settings.checkpoint_every, async_save=False)
  last_metrics: dict[str, float] = {}
  with Checkpointer(checkpoint_config) as checkpointer, _TerminationFlag().installed() as flag:
    start = checkpointer.latest_step()
    if start is not None:
      state = checkpointer.restore(abstract_state)
      set_data_state(checkpointer.read_metadata()["data_state"])
      if distributed.is_main_process():
        tqdm.tqdm.write(f"{settings.stage}: resuming from its checkpoint at step {start}")
    else:
      state = create_state()
    start = start or 0

    def save(state, force):
      checkpointer.save(state.with_data_state(get_data_state()), metadata=metadata, force=force)

    # Records are numbered by completed steps: keep the checkpoint's own record (step `start`).
    with MetricsWriter(settings.workdir, stage=settings.stage, start_step=start + 1) as writer:
      progress = tqdm.tqdm(range(start, settings.num_steps), desc=settings.stage,
                           initial=start, total=settings.num_steps,
                           disable=not distributed.is_main_process(), dynamic_ncols=True)
      for step in progress:
        state, metrics = step_fn(state, next(batches))
        # Checked every step, so no later checkpoint can hold a state trained on a NaN.
        losses = {key: float(metrics[key]) for key in settings.loss_keys if key in metrics}
        check_finite(settings.stage, step + 1, losses, settings.loss_keys)
        if step % settings.log_every == 0 or step + 1 == settings.num_steps or flag.raised:
          last_metrics = metrics_as_floats(metrics)
          writer.write(step + 1, last_metrics)
          progress.set_postfix({key.split("/")[-1]: f"{last_metrics[key]:.4g}"
                                for key in settings.loss_keys if key in last_metrics})
        if flag.raised:
          save(state, force=True)
          checkpointer.wait_until_finished()
          raise Preempted(settings.stage, step + 1)
        if (step + 1) % settings.checkpoint_every == 0:
          save(state, force=False)
      progress.close()
    if checkpointer.latest_step() != settings.num_steps:
      save(state, force=True)
    checkpointer.wait_until_finished()
  if not last_metrics:
    logging.info("Stage %s was already at step %d.", settings.stage, settings.num_steps)
  return state, last_metrics


def metrics_as_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Converts device metrics to Python floats."""
  return {key: float(np.asarray(value)) for key, value in jax.device_get(dict(metrics)).items()}
