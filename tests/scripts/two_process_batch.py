"""One of two processes of a local multi-host job; each feeds its own rows of a global batch.

Run twice by tests/test_distributed.py, with 4 CPU devices per process:
  two_process_batch.py PROCESS_ID PORT
Prints a JSON line with this process's rows and the sum of squares of the global batch, which
needs both processes' rows.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from llama2_jax import distributed
from llama2_jax import sharding

# CPU devices of different processes talk through gloo; TPU and GPU jobs need no such setting.
jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, port: int) -> None:
  distributed.initialize(distributed.DistributedConfig(
      enabled=True, coordinator_address=f"localhost:{port}", num_processes=2,
      process_id=process_id))

  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=-1, tensor=1))
  global_tokens = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
  shardings = sharding.batch_shardings(
      {"tokens": jax.ShapeDtypeStruct(global_tokens.shape, jnp.int32)}, mesh)
  rows = distributed.host_batch_rows(global_tokens.shape, shardings["tokens"])
  batch = distributed.make_global_batch({"tokens": global_tokens[rows]}, shardings, 16)

  sum_of_squares = jax.jit(lambda tokens: jnp.sum(tokens * tokens),
                           out_shardings=NamedSharding(mesh, PartitionSpec()))(batch["tokens"])
  print(json.dumps({
      "rows": [rows.start, rows.stop],
      "sum_of_squares": int(sum_of_squares),
      "devices": jax.device_count(),
      "main": distributed.is_main_process(),
  }), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))
