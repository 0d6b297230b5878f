"""Frozen, self-validating configuration of datasets and batches.

The experiment configs (ml_collections) convert into these at the entry point. Every check
raises a ValueError that names the field, its value and the rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from llama2_jax.data.errors import validate_on_error
from llama2_jax.data.sources import DATASET_KINDS, READERS, SourceFile, default_sources


def _check_int(owner: str, name: str, value, minimum: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{owner}.{name} is {value!r}; it must be an integer >= {minimum}.")


def _check_fraction(owner: str, name: str, value) -> None:
  if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
    raise ValueError(f"{owner}.{name} is {value!r}; it must be a number in [0, 1).")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """Source files, split settings and output directory of one dataset.

  Attributes:
    name: a dataset of `DATASET_KINDS`: "sft_dialogues", "helpfulness_pairs", "safety_pairs",
      "rl_prompts", "xstest" or "truthfulqa".
    data_dir: directory where tfds writes the prepared dataset.
    sources: input files; empty means the shipped defaults of `default_sources`.
    split_seed: seed of the train/validation/test assignment.
    validation_fraction: share of prompt groups in the validation split.
    test_fraction: share of prompt groups in the test split. Evaluation-only datasets (xstest,
      truthfulqa) put everything in "test" and ignore both fractions.
    on_error: "raise" stops at the first bad record with its file, line and field; "skip"
      counts and logs bad records and leaves them out.
  """

  name: str
  data_dir: str
  sources: tuple[SourceFile, ...] = ()
  split_seed: int = 0
  validation_fraction: float = 0.05
  test_fraction: float = 0.05
  on_error: str = "raise"

  def __post_init__(self):
    owner = "DatasetConfig"
    if self.name not in DATASET_KINDS:
      raise ValueError(f"{owner}.name is {self.name!r}; expected one of {sorted(DATASET_KINDS)}.")
    if not isinstance(self.data_dir, str) or not self.data_dir:
      raise ValueError(f"{owner}.data_dir is {self.data_dir!r}; it must be a non-empty path.")
    object.__setattr__(self, "sources", tuple(self.sources))
    formats = READERS[self.kind]
    for index, source in enumerate(self.sources):
      if not isinstance(source, SourceFile):
        raise ValueError(f"{owner}.sources[{index}] is {source!r}; it must be a SourceFile.")
      if source.format not in formats:
        raise ValueError(
            f"{owner}.sources[{index}].format is {source.format!r}, which a {self.name!r} "
            f"dataset cannot read; expected one of {sorted(formats)}.")
    _check_int(owner, "split_seed", self.split_seed, 0)
    _check_fraction(owner, "validation_fraction", self.validation_fraction)
    _check_fraction(owner, "test_fraction", self.test_fraction)
    if self.validation_fraction + self.test_fraction >= 1.0:
      raise ValueError(
          f"{owner}.validation_fraction + test_fraction is "
          f"{self.validation_fraction + self.test_fraction}; it must be below 1 to leave a "
          "train split.")
    validate_on_error(self.on_error, owner)

  @property
  def kind(self) -> str:
    return DATASET_KINDS[self.name]

  def resolved_sources(self) -> tuple[SourceFile, ...]:
    return self.sources or default_sources(self.name)

  def fingerprint(self) -> str:
    """Hashes everything that changes the prepared data, so a changed config rebuilds it.

    Covers the sources (paths, sizes and modification times, not contents), the split settings
    and the error policy.
    """
    files = []
    for source in self.resolved_sources():
      stat = os.stat(source.path) if os.path.exists(source.path) else None
      files.append([dataclasses.asdict(source), stat and [stat.st_size, stat.st_mtime_ns]])
    settings = [self.name, files, self.split_seed, self.validation_fraction, self.test_fraction,
                self.on_error]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class BatchConfig:
  """Shape, order and sharding of the batches an iterator yields.

  Attributes:
    batch_size: rows per batch on this process.
    max_length: tokens per row: the full sequence for SFT and reward batches, the prompt for RL
      and context-distillation batches.
    seed: seed of the example order; epoch e is a permutation drawn from (seed, e).
    shuffle: False keeps the stored order (evaluation).
    num_epochs: passes over the data; None repeats forever. After the last pass the final batch
      is padded with empty rows (their masks and `example_mask` are 0) and iteration stops.
    packing: SFT only: put several examples in one row, with segment ids.
    on_error: what to do with an example longer than max_length: "raise" names its file and
      line, "skip" counts it in the iterator state and logs it.
    shard_index: this process's index among shard_count readers of the same data.
    shard_count: number of processes that split each epoch's order between them.
  """

  batch_size: int
  max_length: int
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  packing: bool = False
  on_error: str = "raise"
  shard_index: int = 0
  shard_count: int = 1

  def __post_init__(self):
    owner = "BatchConfig"
    _check_int(owner, "batch_size", self.batch_size, 1)
    _check_int(owner, "max_length", self.max_length, 2)
    _check_int(owner, "seed", self.seed, 0)
    if self.num_epochs is not None:
      _check_int(owner, "num_epochs", self.num_epochs, 1)
    _check_int(owner, "shard_count", self.shard_count, 1)
    _check_int(owner, "shard_index", self.shard_index, 0)
    if self.shard_index >= self.shard_count:
      raise ValueError(f"{owner}.shard_index is {self.shard_index}; it must be below "
                       f"shard_count ({self.shard_count}).")
    validate_on_error(self.on_error, owner)
