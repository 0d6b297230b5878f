"""Saves a training state on one mesh, or restores one onto another, for tests/test_checkpoint.py.

Usage: checkpoint_reshard.py ACTION:DIRECTORY:DATA,FSDP,TENSOR ...
  save: fills a test_gqa AdamW state with random values on the mesh, saves it under
    DIRECTORY/checkpoints and writes every array's value to DIRECTORY/reference.npz.
  restore: reads the metadata, restores onto the mesh and checks that every value equals the
    reference and every array has the requested sharding.
The process's device count comes from XLA_FLAGS; the mesh may use fewer devices.
"""

from __future__ import annotations

import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llama2_jax import sharding as sharding_lib
from llama2_jax.checkpoint import CheckpointConfig, Checkpointer
from llama2_jax.config import get_model_config
from llama2_jax.model import Llama, init_params, param_axes
from llama2_jax.train_state import TrainState, state_shardings

DATA_STATE = {"epoch": 1, "record": 17}
EXTRA_METADATA = {"model": "test_gqa"}


def make_state() -> TrainState:
  key = jax.random.key(3)
  model = Llama(get_model_config("test_gqa"))
  return TrainState.create(params=init_params(model, key), tx=optax.adamw(1e-3), rng=key,
                           data_state=DATA_STATE)


def build_mesh(shape: tuple[int, int, int]):
  devices = jax.devices()[:math.prod(shape)]
  return sharding_lib.make_mesh(sharding_lib.MeshConfig(*shape), devices=devices)


def target_shardings(mesh) -> tuple[TrainState, TrainState]:
  abstract = jax.eval_shape(make_state)
  model = Llama(get_model_config("test_gqa"))
  return abstract, state_shardings(abstract, param_axes(model), mesh)


def host_values(state: TrainState) -> dict[str, np.ndarray]:
  state = state.replace(rng=jax.random.key_data(state.rng))
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf)) for path, leaf in flat}


def random_state(abstract: TrainState, shardings: TrainState) -> TrainState:
  """Fills every array of the state with random values, placed with `shardings`.

  Random moments and counts make a restore that mixes up or zeroes arrays fail, and host values
  need no compilation. The step and data position get the values the metadata check expects.
  """
  rng = np.random.default_rng(0)

  def fill(leaf, sharding):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.device_put(jax.random.key(3), sharding)
    if jnp.issubdtype(leaf.dtype, jnp.integer):
      return jax.device_put(rng.integers(0, 1000, leaf.shape).astype(leaf.dtype), sharding)
    return jax.device_put(rng.standard_normal(leaf.shape).astype(leaf.dtype), sharding)

  state = jax.tree.map(fill, abstract, shardings)
  state = state.replace(step=jax.device_put(np.int32(1), shardings.step))
  return state.with_data_state(DATA_STATE)


def save(directory: pathlib.Path, mesh) -> None:
  state = random_state(*target_shardings(mesh))
  np.savez(directory / "reference.npz", **host_values(state))
  config = CheckpointConfig(str(directory / "checkpoints"), save_interval_steps=1)
  with Checkpointer(config) as checkpointer:
    assert checkpointer.save(state, metadata=EXTRA_METADATA)


def restore(directory: pathlib.Path, mesh) -> None:
  config = CheckpointConfig(str(directory / "checkpoints"), save_interval_steps=1)
  abstract, shardings = target_shardings(mesh)
  with Checkpointer(config) as checkpointer:
    metadata = checkpointer.read_metadata()
    expected = {"step": 1, "data_state": DATA_STATE, "extra": EXTRA_METADATA}
    assert metadata == expected, f"Metadata {metadata} != {expected}."
    saved = checkpointer.saved_shapes()
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract.params)[0]:
      saved_leaf = saved["params"]
      for key in path:
        saved_leaf = saved_leaf[key.key]
      assert saved_leaf.shape == leaf.shape, f"{path}: {saved_leaf.shape} != {leaf.shape}."

    state = checkpointer.restore(sharding_lib.with_shardings(abstract, shardings))

  reference = np.load(directory / "reference.npz")
  restored = host_values(state)
  assert sorted(restored) == sorted(reference.files), f"{sorted(restored)} != {reference.files}."
  for name, value in restored.items():
    np.testing.assert_array_equal(value, reference[name], err_msg=f"{name} differs.")
  flat_shardings = jax.tree.leaves(shardings)
  flat_arrays = jax.tree.leaves(state)
  assert len(flat_arrays) == len(flat_shardings)
  for array, sharding in zip(flat_arrays, flat_shardings):
    assert array.sharding == sharding, f"Restored sharding {array.sharding} != {sharding}."
  assert state.data_state_ints() == DATA_STATE


def main(actions: list[str]) -> None:
  for action in actions:
    name, directory, mesh_shape = action.split(":")
    mesh = build_mesh(tuple(int(size) for size in mesh_shape.split(",")))
    {"save": save, "restore": restore}[name](pathlib.Path(directory), mesh)
    print(f"{name} {mesh_shape} on {jax.device_count()} devices: done.")


if __name__ == "__main__":
  main(sys.argv[1:])
