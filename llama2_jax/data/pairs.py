"""Reward-model batches of preference pairs.

Each side of a pair is the whole conversation in the Llama 2 chat format, as `encode_segments`
builds it: the context exchanges, the final user prompt, then the answer with its EOS. The
reward model reads its score at the answer's last token. Rows are right-padded.

Batch keys:
  chosen_tokens, rejected_tokens: int32 [B, L], padded with the tokenizer's pad id.
  chosen_mask, rejected_mask: int32 [B, L], 1 on real tokens.
  rating: int32 [B], a `llama2_jax.losses.reward.Rating` id (0 significantly better ... 3
    negligibly better or unsure, 4 unknown).
  margin: float32 [B], the margin m(rating) of the configured preset of
    `llama2_jax.losses.reward.MARGIN_PRESETS` (Touvron et al., 2023, eq. 2 and table 27).
  example_mask: int32 [B], 0 on padding rows of a final partial batch.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from llama2_jax.chat import Message, TextEncoder, encode_segments
from llama2_jax.data.records import PreferencePair
from llama2_jax.losses.reward import MARGIN_PRESETS, Rating

REWARD_KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask", "rating",
               "margin", "example_mask")


@dataclasses.dataclass(frozen=True)
class RewardExample:
  """Token ids of both sides of a preference pair.

  Attributes:
    chosen: int32 [n] ids of context plus chosen answer.
    rejected: int32 [m] ids of context plus rejected answer.
    rating: `Rating` id.
    origin: "file:line" of the source record.
  """

  chosen: np.ndarray
  rejected: np.ndarray
  rating: int
  origin: str = ""

  def __len__(self) -> int:
    return max(len(self.chosen), len(self.rejected))


def _side(tokenizer: TextEncoder, context, answer: str) -> np.ndarray:
  segments = encode_segments(tokenizer, list(context) + [Message("assistant", answer)])
  return np.asarray([t for segment in segments for t in segment.tokens], np.int32)


def reward_example(tokenizer: TextEncoder, pair: PreferencePair) -> RewardExample:
  """Encodes both sides of a pair.

  Raises:
    llama2_jax.chat.ChatFormatError: if the context or an answer cannot be encoded.
  """
  return RewardExample(chosen=_side(tokenizer, pair.context, pair.chosen),
                       rejected=_side(tokenizer, pair.context, pair.rejected),
                       rating=int(pair.rating), origin=pair.origin)


def reward_batch(examples: Sequence[RewardExample], *, batch_size: int, max_length: int,
                 pad_id: int, margin_preset: str) -> dict[str, np.ndarray]:
  """Stacks up to batch_size pairs into a right-padded batch (keys in the module docstring).

  Raises:
    ValueError: for too many examples, a side longer than max_length, or an unknown preset.
  """
  if margin_preset not in MARGIN_PRESETS:
    raise ValueError(
        f"Unknown margin preset {margin_preset!r}; expected one of {sorted(MARGIN_PRESETS)}.")
  if len(examples) > batch_size:
    raise ValueError(f"Got {len(examples)} examples for a batch of {batch_size}.")
  margins = MARGIN_PRESETS[margin_preset]
  shape = (batch_size, max_length)
  batch = {
      "chosen_tokens": np.full(shape, pad_id, np.int32),
      "chosen_mask": np.zeros(shape, np.int32),
      "rejected_tokens": np.full(shape, pad_id, np.int32),
      "rejected_mask": np.zeros(shape, np.int32),
      "rating": np.full((batch_size,), int(Rating.UNKNOWN), np.int32),
      "margin": np.zeros((batch_size,), np.float32),
      "example_mask": np.zeros((batch_size,), np.int32),
  }
  for row, example in enumerate(examples):
    for side, tokens in (("chosen", example.chosen), ("rejected", example.rejected)):
      if len(tokens) > max_length:
        raise ValueError(f"Row {row} {side} has {len(tokens)} tokens; max_length is "
                         f"{max_length}.")
      batch[f"{side}_tokens"][row, :len(tokens)] = tokens
      batch[f"{side}_mask"][row, :len(tokens)] = 1
    batch["rating"][row] = example.rating
    batch["margin"][row] = margins[example.rating]
    batch["example_mask"][row] = 1
  return batch
