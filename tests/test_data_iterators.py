"""Tests of the resumable iterators: seeded order, exact resume, epochs, shards, skips."""

import numpy as np
import pytest

from llama2_jax.data.batchers import PromptBatcher, SftBatcher
from llama2_jax.data.config import BatchConfig
from llama2_jax.data.errors import BadRecordHandler, DataError
from llama2_jax.data.iterators import BatchIterator
from llama2_jax.data.sources import default_sources, read_source
from llama2_jax.tokenizer import Tokenizer


class IdBatcher:
  """Batches integer records as they are, so a test can see which records a batch holds."""

  packing = False

  def __init__(self, batch_size, too_long=()):
    self.batch_size = batch_size
    self.too_long = set(too_long)

  def encode(self, record):
    if record in self.too_long:
      raise DataError("is too long.", path="ids.jsonl", line=record + 1)
    return record

  def build(self, rows):
    ids = [row[0] for row in rows] + [-1] * (self.batch_size - len(rows))
    return {"ids": np.asarray(ids)}


def take_ids(iterator, count):
  return [int(i) for _ in range(count) for i in next(iterator)["ids"]]


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer()


@pytest.fixture(scope="module")
def dialogues():
  source = default_sources("sft_dialogues")[0]
  return list(read_source("dialogues", source, BadRecordHandler()))


def test_same_seed_same_order():
  config = BatchConfig(batch_size=4, max_length=8, seed=3)
  first = take_ids(BatchIterator(list(range(50)), IdBatcher(4), config), 10)
  again = take_ids(BatchIterator(list(range(50)), IdBatcher(4), config), 10)
  other = take_ids(BatchIterator(list(range(50)), IdBatcher(4), BatchConfig(
      batch_size=4, max_length=8, seed=4)), 10)
  assert first == again
  assert first != other


def test_each_epoch_is_a_permutation():
  config = BatchConfig(batch_size=5, max_length=8)
  ids = take_ids(BatchIterator(list(range(20)), IdBatcher(5), config), 12)  # 3 epochs.
  for epoch in range(3):
    assert sorted(ids[20 * epoch:20 * (epoch + 1)]) == list(range(20)), epoch
  assert ids[:20] != ids[20:40]


@pytest.mark.parametrize("stop_after", [1, 3, 4, 7])
def test_resume_repeats_and_skips_nothing(stop_after):
  config = BatchConfig(batch_size=6, max_length=8)
  reference = take_ids(BatchIterator(list(range(22)), IdBatcher(6), config), 10)
  first = BatchIterator(list(range(22)), IdBatcher(6), config)
  head = take_ids(first, stop_after)
  state = first.get_state()
  assert all(isinstance(v, int) for v in state.values())
  resumed = BatchIterator(list(range(22)), IdBatcher(6), config, state=dict(state))
  assert head + take_ids(resumed, 10 - stop_after) == reference


def test_packed_resume_matches(tokenizer, dialogues):
  config = BatchConfig(batch_size=2, max_length=1024, packing=True, on_error="skip")
  reference = BatchIterator(dialogues, SftBatcher(tokenizer, config), config)
  expected = [next(reference) for _ in range(6)]
  first = BatchIterator(dialogues, SftBatcher(tokenizer, config), config)
  for _ in range(2):
    next(first)
  resumed = BatchIterator(dialogues, SftBatcher(tokenizer, config), config,
                          state=first.get_state())
  for step in range(2, 6):
    batch = next(resumed)
    for key, value in expected[step].items():
      np.testing.assert_array_equal(batch[key], value, err_msg=f"step {step} {key}")


def test_packed_rows_hold_whole_examples(tokenizer, dialogues):
  config = BatchConfig(batch_size=4, max_length=1024, packing=True, on_error="skip")
  batch = next(BatchIterator(dialogues, SftBatcher(tokenizer, config), config))
  assert batch["segment_ids"].max() > 1  # Some row packs several examples.
  for row in range(4):
    segments = batch["segment_ids"][row]
    for segment in set(segments[segments > 0].tolist()):
      tokens = batch["tokens"][row][segments == segment]
      assert tokens[0] == tokenizer.bos_id
      assert tokens[-1] == tokenizer.eos_id


def test_finite_epochs_pad_last_batch():
  config = BatchConfig(batch_size=4, max_length=8, num_epochs=2, shuffle=False)
  batches = list(BatchIterator(list(range(5)), IdBatcher(4), config))
  ids = [int(i) for b in batches for i in b["ids"]]
  assert ids == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, -1, -1]


def test_shards_are_disjoint():
  ids = []
  for index in range(3):
    config = BatchConfig(batch_size=2, max_length=8, num_epochs=1, shard_index=index,
                         shard_count=3)
    shard = [int(i) for b in BatchIterator(list(range(12)), IdBatcher(2), config)
             for i in b["ids"]]
    ids += shard
  assert sorted(ids) == list(range(12))


def test_skipped_records_counted_in_state():
  config = BatchConfig(batch_size=4, max_length=8, num_epochs=1, shuffle=False,
                       on_error="skip")
  iterator = BatchIterator(list(range(8)), IdBatcher(4, too_long={2, 5}), config)
  ids = [int(i) for b in iterator for i in b["ids"]]
  assert ids == [0, 1, 3, 4, 6, 7, -1, -1]
  assert iterator.get_state()["skipped"] == 2


def test_over_long_raises_with_line():
  config = BatchConfig(batch_size=4, max_length=8, shuffle=False)
  iterator = BatchIterator(list(range(8)), IdBatcher(4, too_long={2}), config)
  with pytest.raises(DataError, match=r"ids\.jsonl:3"):
    next(iterator)


def test_restore_rejects_other_data():
  config = BatchConfig(batch_size=2, max_length=8)
  state = BatchIterator(list(range(10)), IdBatcher(2), config).get_state()
  with pytest.raises(ValueError, match="saved for seed 0 and 10 records"):
    BatchIterator(list(range(11)), IdBatcher(2), config, state=state)


def test_prompt_iterator_shapes_fixed(tokenizer):
  source = default_sources("rl_prompts")[3]  # Red-team prompts.
  prompts = list(read_source("prompts", source, BadRecordHandler()))[:10]
  config = BatchConfig(batch_size=4, max_length=128, num_epochs=1, shuffle=False,
                       on_error="skip")
  batches = list(BatchIterator(prompts, PromptBatcher(tokenizer, config), config))
  assert len(batches) == 3
  assert all(b["prompt_tokens"].shape == (4, 128) for b in batches)
  assert batches[-1]["example_mask"].tolist() == [1, 1, 0, 0]
  assert all(b["is_safety"][b["example_mask"] == 1].all() for b in batches)


@pytest.mark.parametrize("shard_index", [0, 1])
@pytest.mark.parametrize("stop_after", [1, 2, 5])
def test_resume_with_skips_and_shards(shard_index, stop_after):
  """Resuming mid-epoch or at an epoch boundary, with skipped records, loses nothing."""
  config = BatchConfig(batch_size=3, max_length=8, on_error="skip", shard_index=shard_index,
                       shard_count=2)
  batcher = IdBatcher(3, too_long={4, 9, 13})
  reference = take_ids(BatchIterator(list(range(17)), batcher, config), 8)
  first = BatchIterator(list(range(17)), batcher, config)
  head = take_ids(first, stop_after)
  # A checkpoint may hand the ints back as numpy scalars.
  state = {key: np.int64(value) for key, value in first.get_state().items()}
  resumed = BatchIterator(list(range(17)), batcher, config, state=state)
  assert head + take_ids(resumed, 8 - stop_after) == reference
  assert not {4, 9, 13} & set(reference)
  assert resumed.get_state()["skipped"] > 0
