"""Left-padded prompt batches for sampling: RL (PPO, rejection sampling) and evaluation.

A prompt is encoded as Meta's `chat_completion` encodes a one-message dialogue (optionally with a
system message): BOS + encode("[INST] {prompt} [/INST]"). Rows are left-padded so that every
prompt ends in the last column, where generation continues.

Batch keys:
  prompt_tokens: int32 [B, P], left-padded with the tokenizer's pad id.
  prompt_mask: int32 [B, P], 1 on real tokens.
  is_safety: bool [B], True for adversarial (safety) prompts.
  example_mask: int32 [B], 0 on padding rows of a final partial batch. Those rows hold a lone
    BOS in the last column, because the sampler needs one real token in every row.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from llama2_jax.chat import Message, TextEncoder, encode_dialog_prompt
from llama2_jax.data.records import Prompt

PROMPT_KEYS = ("prompt_tokens", "prompt_mask", "is_safety", "example_mask")


@dataclasses.dataclass(frozen=True)
class PromptExample:
  """Token ids of one chat-formatted prompt.

  Attributes:
    tokens: int32 [n].
    is_safety: True for adversarial prompts.
    origin: "file:line" of the source record.
  """

  tokens: np.ndarray
  is_safety: bool
  origin: str = ""

  def __len__(self) -> int:
    return len(self.tokens)


def prompt_example(tokenizer: TextEncoder, prompt: Prompt, *, system: str = "") -> PromptExample:
  """Encodes a prompt (and an optional system message) for generation."""
  dialog = ([Message("system", system)] if system else []) + [Message("user", prompt.text)]
  tokens = encode_dialog_prompt(tokenizer, dialog)
  return PromptExample(np.asarray(tokens, np.int32), prompt.is_safety, prompt.origin)


def left_pad(sequences: Sequence[np.ndarray], *, batch_size: int, max_length: int, pad_id: int,
             bos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads id sequences into [batch_size, max_length] tokens and a mask of real tokens.

  Missing rows get a lone BOS in the last column, so that every row has a real token.

  Raises:
    ValueError: for too many sequences or one longer than max_length.
  """
  if len(sequences) > batch_size:
    raise ValueError(f"Got {len(sequences)} prompts for a batch of {batch_size}.")
  tokens = np.full((batch_size, max_length), pad_id, np.int32)
  mask = np.zeros((batch_size, max_length), np.int32)
  tokens[len(sequences):, -1] = bos_id
  mask[len(sequences):, -1] = 1
  for row, sequence in enumerate(sequences):
    n = len(sequence)
    if n > max_length:
      raise ValueError(f"Row {row} has {n} tokens; max_length is {max_length}.")
    tokens[row, max_length - n:] = sequence
    mask[row, max_length - n:] = 1
  return tokens, mask


def prompt_batch(examples: Sequence[PromptExample], *, batch_size: int, max_length: int,
                 pad_id: int, bos_id: int) -> dict[str, np.ndarray]:
  """Stacks up to batch_size prompts into a left-padded batch (keys in the module docstring)."""
  tokens, mask = left_pad([e.tokens for e in examples], batch_size=batch_size,
                          max_length=max_length, pad_id=pad_id, bos_id=bos_id)
  is_safety = np.zeros((batch_size,), bool)
  example_mask = np.zeros((batch_size,), np.int32)
  for row, example in enumerate(examples):
    is_safety[row] = example.is_safety
    example_mask[row] = 1
  return {"prompt_tokens": tokens, "prompt_mask": mask, "is_safety": is_safety,
          "example_mask": example_mask}
