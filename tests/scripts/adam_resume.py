"""Runs Adam on f(w) = w^2 from w = 1, saving after step 2 or resuming from that save.

Run by tests/test_checkpoint.py with JAX_ENABLE_X64=1, because the expected values have 9 decimal
places and float32 Adam already differs from them in the 7th (0.900000691 after one step).

Usage:
  adam_resume.py first DIRECTORY   prints w after steps 1 and 2, then saves the state.
  adam_resume.py resume DIRECTORY  restores, runs step 3 and prints w and the step count, plus
                                   what step 3 gives with a fresh optimizer state or a reset count.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import optax

from llama2_jax import sharding as sharding_lib
from llama2_jax.checkpoint import CheckpointConfig, Checkpointer
from llama2_jax.train_state import TrainState, state_shardings

TX = optax.adam(0.1, b1=0.9, b2=0.999, eps=1e-8)


def make_state() -> TrainState:
  return TrainState.create(params={"w": jnp.array(1.0, jnp.float64)}, tx=TX,
                           rng=jax.random.key(0), data_state={"batches_read": 0})


def square_step(state: TrainState, batch):
  del batch  # f(w) = w^2 reads no data.
  grads = jax.grad(lambda params: params["w"] ** 2)(state.params)
  return state.apply_gradients(grads), {"w": state.params["w"]}


def setup():
  mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(), devices=jax.devices()[:1])
  abstract = jax.eval_shape(make_state)
  shardings = state_shardings(abstract, {"w": None}, mesh)
  step = sharding_lib.jit_sharded_step(square_step, mesh=mesh, state_shardings=shardings,
                                       batch_shardings={})
  return abstract, shardings, step


def first(directory: str) -> None:
  _, shardings, step = setup()
  state = sharding_lib.create_sharded(make_state, shardings)
  values = []
  for _ in range(2):
    state, _ = step(state, {})
    state = state.with_data_state({"batches_read": int(state.step)})
    values.append(float(state.params["w"]))
  with Checkpointer(CheckpointConfig(directory, save_interval_steps=1)) as checkpointer:
    checkpointer.save(state)
  print(json.dumps({"w": values}))


def resume(directory: str) -> None:
  abstract, shardings, step = setup()
  with Checkpointer(CheckpointConfig(directory, save_interval_steps=1)) as checkpointer:
    state = checkpointer.restore(sharding_lib.with_shardings(abstract, shardings))

  # The wrong resumptions, for contrast; plain jit, since `step` donates its input state.
  plain_step = jax.jit(square_step)
  fresh, _ = plain_step(state.replace(opt_state=TX.init(state.params)), {})
  adam_state = state.opt_state[0]
  reset_count = state.replace(opt_state=(adam_state._replace(count=jnp.zeros_like(
      adam_state.count)), *state.opt_state[1:]))
  reset, _ = plain_step(reset_count, {})

  data_state = state.data_state_ints()
  state, _ = step(state, {})
  print(json.dumps({
      "w": float(state.params["w"]),
      "step": int(state.step),
      "data_state": data_state,
      "fresh_optimizer": float(fresh.params["w"]),
      "reset_count": float(reset.params["w"]),
  }))


if __name__ == "__main__":
  assert jax.config.jax_enable_x64, "Run with JAX_ENABLE_X64=1."
  {"first": first, "resume": resume}[sys.argv[1]](sys.argv[2])
