"""Resources shared by every stage of the pipeline: settings, mesh, tokenizer, data, outputs.

Work directory layout:

  config.json                  the resolved experiment config
  metrics.jsonl, tensorboard/  every logged metric (`llama2_jax.metrics_log`)
  data/                        tfds datasets prepared from the shipped or configured files
  stages/<stage>/checkpoints/  orbax checkpoints of the stage's training state (resumable)
  stages/<stage>/final/        the stage's final parameters (`checkpoint_io.save_orbax`)
  stages/<stage>/done.json     written last: the stage's summary and results; its presence
                               means the stage is finished and is skipped on a rerun
  report/                      report.md, report.json and plots/
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import pathlib
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from llama2_jax import _atomic, checkpoint_io, distributed, sharding
from llama2_jax.data import BatchConfig, DatasetConfig, load, prepare
from llama2_jax.data.builders import RecordSource
from llama2_jax.model import Llama, param_axes
from llama2_jax.pipeline.loop import LoopSettings
from llama2_jax.pipeline.settings import PipelineSettings
from llama2_jax.tokenizer import Tokenizer
from llama2_jax.train_state import TrainState, state_shardings

DONE_FILENAME = "done.json"


@dataclasses.dataclass
class RunContext:
  """The run's settings and shared resources, built once by `llama2_jax.pipeline.run`.

  Attributes:
    settings: the validated pipeline settings.
    workdir: the work directory (layout in the module docstring).
    mesh: the device mesh of every stage.
    tokenizer: the sentencepiece tokenizer.
    resolved_config: the experiment config as a JSON-ready dict, saved with each checkpoint.
  """

  settings: PipelineSettings
  workdir: pathlib.Path
  mesh: Mesh
  tokenizer: Tokenizer
  resolved_config: Mapping[str, Any]
  _prepared: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def data_dir(self) -> str:
    return self.settings.data_dir or str(self.workdir / "data")

  @functools.cached_property
  def policy_model(self) -> Llama:
    return Llama(self.settings.model, head="lm")

  @functools.cached_property
  def reward_model(self) -> Llama:
    return Llama(self.settings.model, head="reward")

  @functools.cached_property
  def value_model(self) -> Llama:
    return Llama(self.settings.model, head="value")

  def stage_dir(self, stage: str) -> pathlib.Path:
    return self.workdir / "stages" / stage

  def records(self, dataset: str, split: str) -> RecordSource:
    """Returns the records of a split, preparing the tfds dataset on first use."""
    if dataset not in self._prepared:
      config = DatasetConfig(name=dataset, data_dir=self.data_dir, split_seed=self.settings.seed,
                             sources=self.settings.data_sources.get(dataset, ()))
      # tfds prints "Downloading and preparing" although nothing is downloaded, so print one
      # line of our own instead.
      with contextlib.redirect_stdout(io.StringIO()):
        builder = prepare(config)
      if distributed.is_main_process():
        print(f"data: {dataset} ready in {builder.data_dir}", flush=True)
      self._prepared[dataset] = config
    return load(self._prepared[dataset], split)

  def batch_config(self, global_batch_size: int, max_length: int, *, seed_offset: int,
                   packing: bool = False, shuffle: bool = True, num_epochs: int | None = None,
                   per_host: bool = True) -> BatchConfig:
    """Builds this host's `BatchConfig`: its share of the global batch and of each epoch.

    Examples longer than `max_length` are skipped and counted, not fatal: the shipped dialogues
    vary in length and the tiny configs use short rows. With `per_host` False every host reads
    the whole global batch (for inputs passed to JAX as replicated numpy arrays).
    """
    count = jax.process_count() if per_host else 1
    if global_batch_size % count:
      raise ValueError(f"A global batch of {global_batch_size} rows cannot be split over "
                       f"{count} processes; use a multiple of {count}.")
    return BatchConfig(batch_size=global_batch_size // count, max_length=max_length,
                       seed=self.settings.seed + seed_offset, shuffle=shuffle,
                       num_epochs=num_epochs, packing=packing, on_error="skip",
                       shard_index=jax.process_index() if per_host else 0,
                       shard_count=count)

  def loop_settings(self, stage: str, num_steps: int, loss_keys: tuple[str, ...],
                    checkpoint_every: int | None = None) -> LoopSettings:
    settings = self.settings
    return LoopSettings(
        stage=stage, num_steps=num_steps, workdir=str(self.workdir),
        checkpoint_dir=str(self.stage_dir(stage) / "checkpoints"),
        checkpoint_every=checkpoint_every or settings.checkpoint_every,
        keep_checkpoints=settings.keep_checkpoints, log_every=settings.log_every,
        loss_keys=loss_keys)

  # Stage outputs.

  def is_done(self, stage: str) -> bool:
    return (self.stage_dir(stage) / DONE_FILENAME).exists()

  def read_done(self, stage: str) -> dict[str, Any]:
    path = self.stage_dir(stage) / DONE_FILENAME
    if not path.exists():
      raise FileNotFoundError(f"Stage {stage!r} has not finished: {path} does not exist.")
    return json.loads(path.read_text())

  def finish_stage(self, stage: str, params: Any, results: Mapping[str, Any]) -> None:
    """Saves the stage's final parameters, then marks it done with `results` (JSON data)."""
    # NOTE: device_get gathers the parameters on one host, which works only while every array is
    # addressable by this process (one host). Multi-host runs need a sharded save here.
    if params is not None:
      host_params = jax.device_get(params)
      if distributed.is_main_process():
        checkpoint_io.save_orbax(host_params, self.settings.model,
                                 self.stage_dir(stage) / "final", overwrite=True)
    if distributed.is_main_process():
      write_json_atomically(self.stage_dir(stage) / DONE_FILENAME, dict(results))

  def final_params(self, stage: str, model: Llama) -> Any:
    """Loads a finished stage's parameters, placed with `model`'s shardings on the mesh."""
    _, params = checkpoint_io.load_orbax(self.stage_dir(stage) / "final",
                                         self.settings.model.param_dtype)
    return place_params(params, model, self.mesh)


def place_params(params: Any, model: Llama, mesh: Mesh) -> Any:
  """Puts a parameter tree on the mesh with the shardings of the rules table."""
  shardings = sharding.tree_shardings(params, param_axes(model), mesh)
  return jax.device_put(params, shardings)


def write_json_atomically(path: pathlib.Path, data: Mapping[str, Any]) -> None:
  """Writes `data` as JSON to `path`, all or nothing."""
  with _atomic.atomic_file(path) as file:
    json.dump(data, file, indent=2, allow_nan=False)
    file.write("\n")


def save_arrays_atomically(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes `arrays` as an .npz file to `path`, all or nothing."""
  with _atomic.atomic_file(path, binary=True) as file:
    np.savez(file, **arrays)


class DeviceBatches(Iterator[Any]):
  """Turns this host's numpy batches into global arrays sharded over the mesh's batch axes.

  Args:
    iterator: a `BatchIterator` (anything with `get_state`/`set_state` that yields dicts).
    mesh: the mesh.
    global_batch_size: rows of the global batch.
    transform: applied to each numpy batch first (e.g. choosing the keys a step reads).
  """

  def __init__(self, iterator, mesh: Mesh, global_batch_size: int,
               transform: Callable[[dict], dict] | None = None):
    self.iterator = iterator
    self.mesh = mesh
    self.global_batch_size = global_batch_size
    self.transform = transform or (lambda batch: batch)
    self.shardings = None

  def __next__(self):
    batch = self.transform(next(self.iterator))
    if self.shardings is None:
      abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
          (self.global_batch_size, *leaf.shape[1:]), leaf.dtype), batch)
      self.shardings = sharding.batch_shardings(abstract, self.mesh)
    return distributed.make_global_batch(batch, self.shardings, self.global_batch_size)

  def peek_shardings(self) -> Any:
    """Returns the batch shardings, reading one batch ahead if none was read yet."""
    if self.shardings is None:
      state = self.iterator.get_state()
      next(self)
      self.iterator.set_state(state)
    return self.shardings

  def get_state(self) -> dict[str, int]:
    return self.iterator.get_state()

  def set_state(self, state: Mapping[str, int]) -> None:
    self.iterator.set_state(dict(state))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def make_train_state(ctx: RunContext, model: Llama, params: Any, tx,
                     data_state: Mapping[str, int]) -> tuple[Callable[[], TrainState],
                                                           TrainState, TrainState]:
  """Builds what a training stage needs to create or restore its state on the mesh.

  Args:
    ctx: the run.
    model: the model whose parameters the state holds.
    params: initial parameters (any placement), read only if the state is created.
    tx: the optax transformation.
    data_state: the data iterator's initial position.

  Returns:
    (create, abstract_state, shardings): `create()` makes the sharded initial state;
    `abstract_state` is the restore target (shapes with shardings).
  """
  seed = ctx.settings.seed

  def build(initial_params):
    return TrainState.create(params=initial_params, tx=tx, rng=jax.random.key(seed),
                             data_state=data_state)

  abstract = jax.eval_shape(build, params)
  shardings = state_shardings(abstract, param_axes(model), ctx.mesh)

  def create():
    logging.info("Creating the initial training state.")
    return sharding.create_sharded(build, shardings, params)

  return create, sharding.with_shardings(abstract, shardings), shardings
