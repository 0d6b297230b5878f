"""Batchers: how an iterator turns records of one kind into examples and batches.

A batcher has `encode(record) -> example`, which raises a `DataError` naming the record's file
and line when the record cannot be encoded or is longer than `BatchConfig.max_length`, and
`build(rows) -> dict of numpy arrays` with fixed shapes. `packing` is True when a row may contain
several examples (SFT only).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from llama2_jax.chat import ChatFormatError, TextEncoder
from llama2_jax.data.config import BatchConfig
from llama2_jax.data.context_distillation import (context_distillation_batch,
                                                  context_distillation_example)
from llama2_jax.data.errors import DataError
from llama2_jax.data.pairs import reward_batch, reward_example
from llama2_jax.data.prompts import prompt_batch, prompt_example
from llama2_jax.data.records import Dialogue, PreferencePair, Prompt
from llama2_jax.data.sft import sft_batch, sft_example


def _location(origin: str) -> dict[str, Any]:
  path, _, line = origin.rpartition(":")
  if path and line.isdigit():
    return {"path": path, "line": int(line)}
  return {"path": origin or None}


def _check_length(length: int, config: BatchConfig, origin: str, field: str) -> None:
  if length > config.max_length:
    raise DataError(
        f"encodes to {length} tokens, more than max_length {config.max_length}.",
        field=field, fix="Raise BatchConfig.max_length, shorten the text, or set "
        "BatchConfig.on_error='skip' to leave such examples out.", **_location(origin))


def _encode_or_raise(encode, origin: str, field: str):
  try:
    return encode()
  except ChatFormatError as error:
    raise DataError(str(error), field=field, fix="Fix the record, or set on_error='skip'.",
                    **_location(origin)) from None


class SftBatcher:
  """Dialogues into SFT batches (see `llama2_jax.data.sft`), optionally packed."""

  def __init__(self, tokenizer: TextEncoder, config: BatchConfig):
    self.tokenizer = tokenizer
    self.config = config
    self.packing = config.packing

  def encode(self, record: Dialogue):
    example = _encode_or_raise(
        lambda: sft_example(self.tokenizer, record.messages, system=record.system,
                            origin=record.origin), record.origin, "messages")
    _check_length(len(example), self.config, record.origin, "messages")
    return example

  def build(self, rows: Sequence[Sequence[Any]]) -> dict[str, np.ndarray]:
    return sft_batch(rows, batch_size=self.config.batch_size, max_length=self.config.max_length,
                     pad_id=self.tokenizer.pad_id)


class RewardBatcher:
  """Preference pairs into reward-model batches (see `llama2_jax.data.pairs`)."""

  packing = False

  def __init__(self, tokenizer: TextEncoder, config: BatchConfig, margin_preset: str = "small"):
    self.tokenizer = tokenizer
    self.config = config
    self.margin_preset = margin_preset
    reward_batch([], batch_size=1, max_length=1, pad_id=0, margin_preset=margin_preset)

  def encode(self, record: PreferencePair):
    example = _encode_or_raise(lambda: reward_example(self.tokenizer, record), record.origin,
                               "context")
    longer = "chosen" if len(example.chosen) >= len(example.rejected) else "rejected"
    _check_length(len(example), self.config, record.origin, longer)
    return example

  def build(self, rows: Sequence[Sequence[Any]]) -> dict[str, np.ndarray]:
    return reward_batch([row[0] for row in rows], batch_size=self.config.batch_size,
                        max_length=self.config.max_length, pad_id=self.tokenizer.pad_id,
                        margin_preset=self.margin_preset)


class PromptBatcher:
  """Prompts into left-padded sampling batches (see `llama2_jax.data.prompts`)."""

  packing = False

  def __init__(self, tokenizer: TextEncoder, config: BatchConfig, system: str = ""):
    self.tokenizer = tokenizer
    self.config = config
    self.system = system

  def encode(self, record: Prompt):
    example = _encode_or_raise(
        lambda: prompt_example(self.tokenizer, record, system=self.system), record.origin, "text")
    _check_length(len(example), self.config, record.origin, "text")
    return example

  def build(self, rows: Sequence[Sequence[Any]]) -> dict[str, np.ndarray]:
    return prompt_batch([row[0] for row in rows], batch_size=self.config.batch_size,
                        max_length=self.config.max_length, pad_id=self.tokenizer.pad_id,
                        bos_id=self.tokenizer.bos_id)


class ContextDistillationBatcher:
  """Prompts into generation batches with safety preprompts (`context_distillation`)."""

  packing = False

  def __init__(self, tokenizer: TextEncoder, config: BatchConfig, preprompt_seed: int = 0):
    self.tokenizer = tokenizer
    self.config = config
    self.preprompt_seed = preprompt_seed

  def encode(self, record: Prompt):
    example = _encode_or_raise(
        lambda: context_distillation_example(self.tokenizer, record, seed=self.preprompt_seed),
        record.origin, "text")
    _check_length(len(example), self.config, record.origin, "text")
    return example

  def build(self, rows: Sequence[Sequence[Any]]) -> dict[str, np.ndarray]:
    return context_distillation_batch(
        [row[0] for row in rows], batch_size=self.config.batch_size,
        max_length=self.config.max_length, pad_id=self.tokenizer.pad_id,
        bos_id=self.tokenizer.bos_id)
