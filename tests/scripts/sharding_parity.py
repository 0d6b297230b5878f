"""Compares a forward pass and one AdamW step on sharded meshes with one device.

It also checks that the sharded step donates the state's parameters and optimizer state.

Run by tests/test_sharding.py in a process with 8 CPU devices. Exits non-zero on the first
mismatch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import optax

from llama2_jax import sharding as sharding_lib
from llama2_jax.config import get_model_config
from llama2_jax.model import Llama, init_params, param_axes
from llama2_jax.train_state import TrainState, state_shardings

MESH_SHAPES = ((8, 1, 1), (2, 2, 2), (1, 2, 4))
INITIALISED_MESH = (1, 2, 4)
BATCH, LENGTH = 8, 16
TOLERANCE = 1e-5


def expected_param_specs(tensor_size: int) -> dict[str, tuple]:
  """The mesh axes each parameter of test_gqa must get, written out from the rules table."""
  # test_gqa has 2 key/value heads: sharded when the tensor axis divides 2, else replicated.
  kv = "tensor" if 2 % tensor_size == 0 else None
  return {
      "params/tok_embeddings": ("tensor", "fsdp"),
      "params/output": ("fsdp", "tensor"),
      "params/norm/scale": ("fsdp",),
      "params/layers/attention_norm/scale": (None, "fsdp"),
      "params/layers/ffn_norm/scale": (None, "fsdp"),
      "params/layers/attention/wq": (None, "fsdp", "tensor", None),
      "params/layers/attention/wk": (None, "fsdp", kv, None),
      "params/layers/attention/wv": (None, "fsdp", kv, None),
      "params/layers/attention/wo": (None, "tensor", None, "fsdp"),
      "params/layers/feed_forward/w1": (None, "fsdp", "tensor"),
      "params/layers/feed_forward/w3": (None, "fsdp", "tensor"),
      "params/layers/feed_forward/w2": (None, "tensor", "fsdp"),
  }


def next_token_loss(params, model, batch):
  logits_BxLxV = model.apply(params, batch["tokens"], batch["mask"])
  targets_BxL = jnp.roll(batch["tokens"], -1, axis=1)
  weights_BxL = batch["mask"].at[:, -1].set(0).astype(jnp.float32)
  losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  return jnp.sum(losses_BxL * weights_BxL) / jnp.sum(weights_BxL)


def train_step(state, batch, model):
  loss, grads = jax.value_and_grad(next_token_loss)(state.params, model, batch)
  return state.apply_gradients(grads), {"loss": loss}


def run_on_mesh(mesh, model, batch, initial_params=None):
  """Returns the initial parameters, the logits and the state and metrics after one step.

  The parameters are initialised on `mesh`, or copied there from `initial_params` (which saves
  compiling the initialisation for every mesh).
  """
  key = jax.random.key(0)
  # eps 1e-6 instead of optax's 1e-8: a first Adam step moves each weight by lr * g / (|g| + eps),
  # which for the few gradients near 1e-9 magnifies float32 rounding differences in g (the
  # summation order changes with the sharding) beyond the tolerance.
  tx = optax.adamw(1e-3, eps=1e-6, weight_decay=0.1)
  make_state = lambda params: TrainState.create(params=params, tx=tx, rng=key)
  initialise = lambda: make_state(init_params(model, key))
  shardings = state_shardings(jax.eval_shape(initialise), param_axes(model), mesh)
  if initial_params is None:
    state = sharding_lib.create_sharded(initialise, shardings)
    # Copies, because on CPU `device_get` returns views of the device buffers, and JAX silently
    # skips donating a buffer that a numpy view still references.
    initial_params = jax.tree.map(np.array, jax.device_get(state.params))
  else:
    state = jax.device_put(make_state(initial_params), shardings)

  batch_shardings = sharding_lib.batch_shardings(batch, mesh)
  batch = jax.device_put(batch, batch_shardings)
  logits_sharding = sharding_lib.batch_shardings(
      jax.ShapeDtypeStruct((BATCH, LENGTH, model.config.vocab_size), jnp.float32), mesh)
  forward = jax.jit(lambda params, b: model.apply(params, b["tokens"], b["mask"]),
                    in_shardings=(shardings.params, batch_shardings),
                    out_shardings=logits_sharding)
  logits = forward(state.params, batch)

  step = sharding_lib.jit_sharded_step(
      functools.partial(train_step, model=model), mesh=mesh, state_shardings=shardings,
      batch_shardings=batch_shardings)
  donated_arrays = jax.tree.leaves((state.params, state.opt_state))
  state, metrics = step(state, batch)
  not_donated = [array.shape for array in donated_arrays if not array.is_deleted()]
  assert not not_donated, f"The sharded step did not donate state arrays of shapes {not_donated}."
  return initial_params, logits, state, shardings, metrics


def assert_close(name, actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  error = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
  assert error <= TOLERANCE, f"{name}: relative error {error:.2e} exceeds {TOLERANCE}."


def check_shardings(state, shardings, mesh, tensor_size):
  expected = expected_param_specs(tensor_size)
  paths = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    paths[jax.tree_util.keystr(path, simple=True, separator="/")] = leaf
  assert set(paths) == set(expected), f"Parameters {sorted(paths)} != table {sorted(expected)}."
  for name, leaf in paths.items():
    want = NamedSharding(mesh, PartitionSpec(*expected[name]))
    assert leaf.sharding == want, f"{name}: sharding {leaf.sharding} != {want}."

  # Adam's moments follow the parameters; its step count is replicated.
  adam_state = state.opt_state[0]
  for moments in (adam_state.mu, adam_state.nu):
    for moment, param in zip(jax.tree.leaves(moments), jax.tree.leaves(state.params)):
      assert moment.sharding == param.sharding, f"{moment.sharding} != {param.sharding}."
  assert adam_state.count.sharding.is_fully_replicated
  assert state.step.sharding.is_fully_replicated
  assert jax.tree.leaves(shardings.params)[0].mesh == mesh


def check_indivisible_batch_raises(mesh):
  try:
    sharding_lib.batch_shardings(jax.ShapeDtypeStruct((3, LENGTH), jnp.int32), mesh)
  except ValueError as error:
    assert "not divisible" in str(error), str(error)
  else:
    raise AssertionError("A batch of 3 rows on 8 data shards did not raise.")


def main():
  assert jax.device_count() == 8, f"Expected 8 devices, got {jax.device_count()}."
  model = Llama(get_model_config("test_gqa"))
  tokens = jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, model.config.vocab_size)
  # Right padding of varying length, so masking runs through the sharded path too.
  lengths = jnp.arange(BATCH) % 4 + LENGTH - 3
  mask = (jnp.arange(LENGTH)[None, :] < lengths[:, None]).astype(jnp.int32)
  batch = {"tokens": np.asarray(tokens), "mask": np.asarray(mask)}

  single = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  ref_initial, ref_logits, ref_state, _, ref_metrics = run_on_mesh(single, model, batch)

  for data, fsdp, tensor in MESH_SHAPES:
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    label = f"mesh ({data}, {fsdp}, {tensor})"
    # Initialisation on the mesh is checked on one mesh; the others reuse its parameters.
    initialise_here = (data, fsdp, tensor) == INITIALISED_MESH
    initial, logits, state, shardings, metrics = run_on_mesh(
        mesh, model, batch, None if initialise_here else ref_initial)
    for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(ref_initial)):
      np.testing.assert_array_equal(a, b, err_msg=f"{label}: sharded initialisation differs.")
    assert_close(f"{label} logits", logits, ref_logits)
    assert_close(f"{label} loss", metrics["loss"], ref_metrics["loss"])
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    for (path, param), ref_param in zip(flat, jax.tree.leaves(ref_state.params)):
      assert_close(f"{label} {jax.tree_util.keystr(path)} after one step", param, ref_param)
    check_shardings(state, shardings, mesh, tensor)
    print(f"{label}: forward and AdamW step match one device.")

  check_indivisible_batch_raises(
      sharding_lib.make_mesh(sharding_lib.MeshConfig(data=8, fsdp=1, tensor=1)))


if __name__ == "__main__":
  main()
