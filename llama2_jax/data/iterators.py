"""Deterministic, resumable batch iterators over a random-access source of records.

Order: epoch e visits the records in the permutation drawn by `np.random.default_rng([seed, e])`
(or in stored order when shuffle is off). With several processes, process i of n takes the
positions i, i + n, i + 2n, ... of each epoch's order, so the processes read disjoint records.
A batch may hold the end of one epoch and the start of the next.

State: the position of the next unread record, as a dict of ints that fits in a training-state
checkpoint: {"seed", "num_examples", "epoch", "index", "skipped"}. `index` counts this process's
positions within the epoch and `skipped` the over-long or bad records left out so far. A batch
consumes only the records it contains. A record that does not fit (in a packed row, or in a full
batch) stays unread for the next batch. Restoring a state therefore yields exactly the batches
that would have followed, with no record repeated or skipped. Restoring checks that the seed
and the data size match.

NOTE: with `num_epochs` set, processes can yield different numbers of batches, because shards
differ in size by up to one record and skipped records and packing change the count. A multi-host
loop must agree across processes on when to stop.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence

import numpy as np
from absl import logging

from llama2_jax.data.config import BatchConfig
from llama2_jax.data.errors import BadRecordHandler, DataError

STATE_KEYS = ("seed", "num_examples", "epoch", "index", "skipped")


class Batcher(Protocol):
  """Turns records into examples and rows of examples into a batch (see `batchers`)."""

  packing: bool

  def encode(self, record: Any) -> Any:
    ...

  def build(self, rows: Sequence[Sequence[Any]]) -> dict[str, np.ndarray]:
    ...


class BatchIterator(Iterator[dict[str, np.ndarray]]):
  """Yields fixed-shape numpy batches from `source` in a seeded order that can be resumed.

  Args:
    source: random-access records, such as `llama2_jax.data.builders.load(...)`.
    batcher: one of `llama2_jax.data.batchers`.
    config: batch size, length, seed, epochs, packing, error policy and sharding.
    state: a dict from `get_state()` to resume from; None starts at the beginning.
  """

  def __init__(self, source: Sequence[Any], batcher: Batcher, config: BatchConfig,
               state: dict[str, int] | None = None):
    if config.packing and not batcher.packing:
      raise ValueError(f"BatchConfig.packing is True, but {type(batcher).__name__} cannot pack.")
    self._source = source
    self._batcher = batcher
    self._config = config
    self._num_examples = len(source)
    if self._num_examples == 0:
      raise ValueError("The record source is empty; there is nothing to iterate over.")
    self._handler = BadRecordHandler(config.on_error)
    self._epoch, self._index, self._skipped = 0, 0, 0
    self._order_epoch, self._order = -1, np.zeros(0, np.int64)
    self._pending = None  # The encoded example at `_index`, read but not yet consumed.
    if state is not None:
      self.set_state(state)

  def get_state(self) -> dict[str, int]:
    """Returns the position of the next unread record (see the module docstring)."""
    return {"seed": self._config.seed, "num_examples": self._num_examples, "epoch": self._epoch,
            "index": self._index, "skipped": self._skipped}

  def set_state(self, state: dict[str, int]) -> None:
    """Moves to a position returned by `get_state`, checking that it belongs to this data."""
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
      raise ValueError(f"Iterator state {state} lacks keys {missing}; expected {STATE_KEYS}.")
    if int(state["seed"]) != self._config.seed or int(state["num_examples"]) != self._num_examples:
      raise ValueError(
          f"Iterator state was saved for seed {state['seed']} and {state['num_examples']} "
          f"records, but this iterator has seed {self._config.seed} and {self._num_examples} "
          "records. Restore with the same data and BatchConfig.seed.")
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
    self._skipped = int(state["skipped"])
    self._pending = None

  def _positions(self, epoch: int) -> np.ndarray:
    if epoch != self._order_epoch:
      if self._config.shuffle:
        order = np.random.default_rng([self._config.seed, epoch]).permutation(self._num_examples)
      else:
        order = np.arange(self._num_examples)
      self._order = order[self._config.shard_index::self._config.shard_count]
      self._order_epoch = epoch
    return self._order

  def _finished(self) -> bool:
    epochs = self._config.num_epochs
    return epochs is not None and self._epoch >= epochs

  def _peek(self) -> Any | None:
    """Returns the next encodable example without consuming it, or None at the end."""
    while self._pending is None:
      if self._finished():
        return None
      positions = self._positions(self._epoch)
      if self._index >= len(positions):
        self._epoch, self._index = self._epoch + 1, 0
        continue
      record = self._source[int(positions[self._index])]
      try:
        self._pending = self._batcher.encode(record)
      except DataError as error:
        self._handler.handle(error)
        self._index += 1
        self._skipped += 1
    return self._pending

  def _consume(self) -> None:
    self._pending = None
    self._index += 1

  def __next__(self) -> dict[str, np.ndarray]:
    rows: list[list[Any]] = []
    lengths: list[int] = []
    config = self._config
    while config.packing or len(rows) < config.batch_size:
      example = self._peek()
      if example is None:
        break
      length = len(example) if config.packing else 0
      if config.packing and rows and lengths[-1] + length <= config.max_length:
        rows[-1].append(example)
        lengths[-1] += length
      elif len(rows) < config.batch_size:
        rows.append([example])
        lengths.append(length)
      else:
        break
      self._consume()
    if not rows:
      logging.info("Batch iterator finished after %d epochs; %d records skipped.", self._epoch,
                   self._skipped)
      raise StopIteration
    return self._batcher.build(rows)

  def __iter__(self) -> "BatchIterator":
    return self
