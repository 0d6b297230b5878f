"""Multi-host start-up and each host's share of a global batch.

On a pod every host runs the same program. `initialize` must run first, before any JAX call that
touches devices, because `jax.distributed.initialize` raises once a backend exists. After it,
`jax.devices()` lists the devices of all hosts and a mesh spans them. Each host feeds only its own
devices: it reads the rows that `host_batch_rows` returns and passes them to `make_global_batch`.
See docs/pod.md for the launch command.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import logging
import jax
from jax.sharding import Sharding
import numpy as np


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Connection settings of the processes of a multi-host job.

  Attributes:
    enabled: call `jax.distributed.initialize`; leave False on a single host.
    coordinator_address: "host:port" of process 0. None lets JAX detect it, which works on Cloud
      TPU and under SLURM or Open MPI; elsewhere set it and the two fields below.
    num_processes: number of processes in the job; None to detect.
    process_id: index of this process in [0, num_processes); None to detect.
  """

  enabled: bool = False
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    if self.num_processes is not None and (
        not isinstance(self.num_processes, int) or self.num_processes < 1):
      raise ValueError(
          f"DistributedConfig.num_processes must be a positive integer or None, got "
          f"{self.num_processes!r}.")
    if self.process_id is not None:
      if self.num_processes is None:
        raise ValueError("DistributedConfig.process_id is set, so num_processes must be too.")
      if not isinstance(self.process_id, int) or not 0 <= self.process_id < self.num_processes:
        raise ValueError(
            f"DistributedConfig.process_id must be an integer in [0, num_processes="
            f"{self.num_processes}), got {self.process_id!r}.")
    if not self.enabled and (self.coordinator_address or self.num_processes or
                             self.process_id is not None):
      raise ValueError(
          "DistributedConfig sets coordinator_address, num_processes or process_id but "
          "enabled is False; set enabled=True to start a multi-host job.")


def initialize(config: DistributedConfig) -> None:
  """Connects this process to the others when `config.enabled`; does nothing otherwise.

  Call it first thing in the entry point. Processes other than 0 then log only warnings and
  errors, so that the job's log is written once.
  """
  if not config.enabled:
    return
  jax.distributed.initialize(
      coordinator_address=config.coordinator_address,
      num_processes=config.num_processes,
      process_id=config.process_id)
  if not is_main_process():
    logging.set_verbosity(logging.WARNING)
  logging.info("Process %d of %d started; %d local and %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def is_main_process() -> bool:
  """Returns whether this is process 0, the one that writes logs, metrics and summaries."""
  return jax.process_index() == 0


def host_batch_rows(global_shape: Sequence[int], sharding: Sharding) -> slice:
  """Returns the rows of a global batch that this host's devices hold under `sharding`.

  The data loader of each host reads only these rows (its share of the global batch).

  Raises:
    ValueError: if this host's rows are not one contiguous block, which `make_global_batch`
      cannot assemble.
  """
  index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
  blocks = sorted({index[0].indices(global_shape[0])[:2] for index in index_map.values()})
  start, stop = blocks[0][0], blocks[0][1]
  for block_start, block_stop in blocks[1:]:
    if block_start != stop:
      raise ValueError(
          f"Process {jax.process_index()} has rows {blocks} of the global batch, which are not "
          "contiguous; order the mesh devices so that each host's devices are adjacent on the "
          "batch axes.")
    stop = block_stop
  return slice(start, stop)


def make_global_batch(local_batch: Any, shardings: Any, global_batch_size: int) -> Any:
  """Assembles global arrays from each host's rows (`host_batch_rows`) of a batch.

  Args:
    local_batch: tree of numpy arrays, this host's rows of each batch array.
    shardings: tree of shardings of the global arrays, e.g. from `sharding.batch_shardings`.
    global_batch_size: number of rows of the global batch.

  Returns:
    A tree of `jax.Array`s of leading size `global_batch_size`, each spanning all hosts.
  """
  def assemble(local, sharding):
    local = np.asarray(local)
    global_shape = (global_batch_size, *local.shape[1:])
    expected = host_batch_rows(global_shape, sharding)
    if local.shape[0] != expected.stop - expected.start:
      raise ValueError(
          f"This host must supply rows {expected.start}:{expected.stop} of the global batch of "
          f"{global_batch_size} ({expected.stop - expected.start} rows), got {local.shape[0]}.")
    return jax.make_array_from_process_local_data(sharding, local, global_shape)

  return jax.tree.map(assemble, local_batch, shardings)
