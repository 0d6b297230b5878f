"""Saving and restoring `TrainState`s with orbax-checkpoint, onto any mesh.

Each checkpoint is a step directory under `CheckpointConfig.directory` with two items:
  state/: the `TrainState` arrays (parameters, optimizer state, step, key, data position), in
    orbax's array format, which stores each array whole, whatever its sharding when saved.
  metadata/: JSON with the step, the data position as ints and the caller's extra metadata (the
    model config, say), readable without JAX devices.

Writes are atomic: orbax writes a step to `<step>.orbax-checkpoint-tmp` and renames it to
`<step>` once every array is written, so a job killed mid-save leaves the earlier checkpoints
intact. A `Checkpointer` that opens the directory deletes leftover temporary directories in the
background, finishing before its first save.

Retention keeps the newest `keep_last` checkpoints plus the `keep_best` best ones by a metric.

Restoring takes the target shardings, not the saved ones, so a checkpoint written on 8 devices
restores on 1 or on 4 and one written on 1 restores on 8.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from absl import logging
import jax
import orbax.checkpoint as ocp

from llama2_jax.train_state import TrainState

_STATE_ITEM = "state"
_METADATA_ITEM = "metadata"
_BEST_MODES = ("min", "max")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Where and how often training states are saved, and which are kept.

  Attributes:
    directory: root directory of the step directories; a local path or a URL orbax supports
      (gs://...).
    keep_last: number of newest checkpoints kept.
    best_metric: name of the metric that ranks checkpoints (e.g. "eval/loss"); None keeps only the
      newest.
    best_mode: "min" or "max", which end of `best_metric` is best.
    keep_best: number of best checkpoints kept beside the newest; used when `best_metric` is set.
    save_interval_steps: `save` writes at steps that are multiples of this, and the first save
      in an empty directory; `force=True` writes at any step.
    async_save: write arrays in a background thread, so training continues during the write.
  """

  directory: str
  keep_last: int = 3
  best_metric: str | None = None
  best_mode: str = "min"
  keep_best: int = 1
  save_interval_steps: int = 1000
  async_save: bool = True

  def __post_init__(self):
    if not self.directory:
      raise ValueError("CheckpointConfig.directory must be a non-empty path.")
    for name in ("keep_last", "keep_best", "save_interval_steps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"CheckpointConfig.{name} must be a positive integer, got {value!r}.")
    if self.best_mode not in _BEST_MODES:
      raise ValueError(
          f"CheckpointConfig.best_mode is {self.best_mode!r}; expected one of {_BEST_MODES}.")


def _preservation_policy(config: CheckpointConfig):
  keep_newest = ocp.checkpoint_managers.LatestN(n=config.keep_last)
  if config.best_metric is None:
    return keep_newest
  keep_best = ocp.checkpoint_managers.BestN(
      get_metric_fn=lambda metrics: metrics[config.best_metric],
      # BestN keeps the end of an ascending sort; reversing it keeps the lowest.
      reverse=config.best_mode == "min",
      n=config.keep_best,
      keep_checkpoints_without_metrics=False)
  return ocp.checkpoint_managers.AnyPreservationPolicy([keep_newest, keep_best])


def _absolute(directory: str) -> str:
  return directory if "://" in directory else os.path.abspath(directory)


class Checkpointer:
  """Saves and restores `TrainState`s in one directory, through an `ocp.CheckpointManager`.

  Use as a context manager, or call `close` so that pending asynchronous writes finish.
  """

  def __init__(self, config: CheckpointConfig):
    self.config = config
    best_fn = None
    if config.best_metric is not None:
      best_fn = lambda metrics: metrics[config.best_metric]
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.save_interval_steps,
        preservation_policy=_preservation_policy(config),
        # best_fn makes orbax store the metrics and lets `best_step` rank by them; the
        # preservation policy above alone decides what is deleted.
        best_fn=best_fn,
        best_mode=config.best_mode,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=config.async_save)
    self._manager = ocp.CheckpointManager(
        _absolute(config.directory), options=options,
        item_handlers={_STATE_ITEM: ocp.StandardCheckpointHandler(),
                       _METADATA_ITEM: ocp.JsonCheckpointHandler()})

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.close()

  def wait_until_finished(self) -> None:
    """Blocks until every started save is written and committed."""
    self._manager.wait_until_finished()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """Returns the step with the best `best_metric` (the latest step when there is no metric)."""
    return self._manager.best_step()

  def save(self, state: TrainState, *, metrics: Mapping[str, float] | None = None,
           metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts saving `state` at step `state.step`; returns whether a save was started.

    Args:
      state: the state; its arrays may be sharded over any mesh.
      metrics: values for ranking checkpoints; must contain `best_metric` when one is set. A
        checkpoint saved without metrics is kept only while it is among the newest.
      metadata: JSON-serialisable extra data saved beside the arrays (the config, say).
      force: save even if the step is not a multiple of `save_interval_steps`.
    """
    step = int(jax.device_get(state.step))
    if metrics is not None:
      metrics = {name: float(value) for name, value in metrics.items()}
      if self.config.best_metric is not None and self.config.best_metric not in metrics:
        raise ValueError(
            f"Metrics {sorted(metrics)} lack the best_metric {self.config.best_metric!r} that "
            "ranks checkpoints.")
    json_metadata = {"step": step, "data_state": state.data_state_ints(),
                     "extra": dict(metadata or {})}
    try:
      json.dumps(json_metadata)
    except TypeError as error:
      raise ValueError(f"Checkpoint metadata must be JSON-serialisable: {error}.") from error

    saved = self._manager.save(
        step,
        args=ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardSave(state),
                                   _METADATA_ITEM: ocp.args.JsonSave(json_metadata)}),
        metrics=metrics, force=force)
    if saved:
      logging.info("Saving checkpoint of step %d to %s.", step, self.config.directory)
    return saved

  def _resolve_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"No checkpoint found in {self.config.directory}.")
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(
          f"No checkpoint of step {step} in {self.config.directory}; saved steps: {steps}.")
    return step

  def read_metadata(self, step: int | None = None) -> dict[str, Any]:
    """Returns the JSON metadata of a step (default: the latest): step, data_state, extra."""
    step = self._resolve_step(step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{_METADATA_ITEM: ocp.args.JsonRestore()}))
    return restored[_METADATA_ITEM]

  def saved_shapes(self, step: int | None = None) -> dict[str, Any]:
    """Returns the saved arrays as a nested dict of `jax.ShapeDtypeStruct`s without shardings.

    Reads only metadata files, so it works on any number of devices, including none of the
    original ones.
    """
    step = self._resolve_step(step)
    tree = self._manager.item_metadata(step)[_STATE_ITEM].tree
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), tree,
                        is_leaf=lambda leaf: hasattr(leaf, "shape") and hasattr(leaf, "dtype"))

  def restore(self, target: TrainState, step: int | None = None) -> TrainState:
    """Restores a step (default: the latest) with the shapes, dtypes and shardings of `target`.

    Args:
      target: a `TrainState` of `jax.ShapeDtypeStruct`s with shardings, e.g.
        `sharding.with_shardings(jax.eval_shape(make_state), state_shardings(...))`.
      step: the step to restore.

    Raises:
      FileNotFoundError: if the step is not saved.
      ValueError: if a target leaf lacks a sharding or has another shape than the saved array.
    """
    step = self._resolve_step(step)
    self._check_target(target, step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardRestore(target)}))
    logging.info("Restored checkpoint of step %d from %s.", step, self.config.directory)
    return restored[_STATE_ITEM]

  def _check_target(self, target: TrainState, step: int) -> None:
    saved = jax.tree_util.tree_flatten_with_path(self.saved_shapes(step))[0]
    saved_by_path = {_path_name(path): leaf for path, leaf in saved}
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
      name = _path_name(path)
      if getattr(leaf, "sharding", None) is None:
        raise ValueError(
            f"Restore target {name} has no sharding; attach shardings with "
            "llama2_jax.sharding.with_shardings.")
      if name not in saved_by_path:
        raise ValueError(f"Restore target {name} is not in the checkpoint of step {step}.")
      saved_shape = saved_by_path[name].shape
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        # Keys are saved as their uint32 key data, with one more trailing dimension.
        saved_shape = saved_shape[:len(leaf.shape)]
      if tuple(saved_shape) != tuple(leaf.shape):
        raise ValueError(
            f"Restore target {name} has shape {leaf.shape}, but the checkpoint of step {step} "
            f"holds shape {tuple(saved_shape)}.")



def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")
