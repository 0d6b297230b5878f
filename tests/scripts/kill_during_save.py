"""Saves step 1, starts saving step 2, and kills itself with SIGKILL before step 2 is committed.

Run by tests/test_checkpoint.py. Step 1 holds w = 1 and step 2 holds w = 2, a 16 MiB array,
so the background write of step 2 is still running when the process dies. Just before the kill it
prints the checkpoint directory's entries as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import optax

from llama2_jax.checkpoint import CheckpointConfig, Checkpointer
from llama2_jax.train_state import TrainState


def state_at(step: int) -> TrainState:
  params = {"w": jnp.full((2048, 2048), float(step), jnp.float32)}
  state = TrainState.create(params=params, tx=optax.sgd(0.1), rng=jax.random.key(0))
  return state.replace(step=jnp.array(step, jnp.int32))


def main(directory: str) -> None:
  checkpointer = Checkpointer(CheckpointConfig(directory, save_interval_steps=1, async_save=True))
  checkpointer.save(state_at(1))
  checkpointer.wait_until_finished()

  checkpointer.save(state_at(2))
  print(json.dumps(sorted(os.listdir(directory))), flush=True)
  os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
  main(sys.argv[1])
