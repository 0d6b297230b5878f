"""Tests of multi-host start-up and of each host's share of a global batch."""

from __future__ import annotations

import json
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax import distributed
from llama2_jax import sharding
from tests import multidevice


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def test_two_processes_assemble_one_global_batch():
  port = _free_port()
  runs = [multidevice.ScriptRun("two_process_batch.py", process_id, port, device_count=4)
          for process_id in (0, 1)]
  results = [json.loads(run.finish().strip().splitlines()[-1]) for run in runs]

  assert [result["rows"] for result in results] == [[0, 8], [8, 16]]
  expected = int(np.sum(np.arange(48) ** 2))
  assert [result["sum_of_squares"] for result in results] == [expected, expected]
  assert [result["devices"] for result in results] == [8, 8]
  assert [result["main"] for result in results] == [True, False]


def test_single_process_holds_every_row():
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  shardings = sharding.batch_shardings({"tokens": jax.ShapeDtypeStruct((4, 3), jnp.int32)}, mesh)
  assert distributed.host_batch_rows((4, 3), shardings["tokens"]) == slice(0, 4)
  tokens = np.arange(12, dtype=np.int32).reshape(4, 3)
  batch = distributed.make_global_batch({"tokens": tokens}, shardings, 4)
  np.testing.assert_array_equal(batch["tokens"], tokens)
  assert distributed.is_main_process()


def test_make_global_batch_rejects_wrong_row_count():
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  shardings = sharding.batch_shardings({"tokens": jax.ShapeDtypeStruct((4, 3), jnp.int32)}, mesh)
  with pytest.raises(ValueError, match=r"must supply rows 0:4 of the global batch of 4 \(4 rows\), "
                                       r"got 2"):
    distributed.make_global_batch({"tokens": np.zeros((2, 3), np.int32)}, shardings, 4)


def test_initialize_disabled_does_nothing():
  distributed.initialize(distributed.DistributedConfig())
  assert jax.process_count() == 1


@pytest.mark.parametrize("fields, message", [
    (dict(enabled=False, num_processes=2), r"enabled is False"),
    (dict(enabled=True, process_id=0), r"process_id is set, so num_processes must be too"),
    (dict(enabled=True, num_processes=2, process_id=2), r"in \[0, num_processes=2\), got 2"),
    (dict(enabled=True, num_processes=0), r"num_processes must be a positive integer"),
])
def test_distributed_config_rejects_invalid_fields(fields, message):
  with pytest.raises(ValueError, match=message):
    distributed.DistributedConfig(**fields)
