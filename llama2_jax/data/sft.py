"""Supervised fine-tuning examples and batches, with Ghost Attention examples and packing.

Mask convention. An example stores `answer_mask`, aligned with its tokens: True on the tokens of
assistant answers (answer text, trailing space and EOS). A batch stores `targets` and
`loss_mask` aligned with the logits. Position t of `targets` contains the token that the logits
at t must predict (targets[t] = tokens[t + 1] within a segment), and `loss_mask` says whether
that prediction is trained.
For the tokens [P1, P2, P3, R1, R2, EOS] of one prompt and one answer:

  tokens    P1 P2 P3 R1 R2 EOS
  targets   P2 P3 R1 R2 EOS pad
  loss_mask  0  0  1  1  1  0     (3 loss terms: R1, R2 and EOS)

`llama2_jax.losses.sft.sft_loss(logits_BxTxV=model(tokens), targets_BxT=targets,
loss_mask_BxT=loss_mask)` then needs no shifting. The mask comes from encoding prompt and answer
segments separately (`llama2_jax.chat.encode_segments`).

Batch keys, all int32 [B, L]: tokens, targets, loss_mask, attention_mask (1 on real tokens),
segment_ids (1, 2, ... per packed example, 0 on padding) and positions (0, 1, ... restarting in
each segment, 0 on padding). Rows are right-padded with the tokenizer's pad id.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from llama2_jax.chat import (ChatFormatError, Message, MessageLike, TextEncoder, as_message,
                             encode_segments)

SFT_KEYS = ("tokens", "targets", "loss_mask", "attention_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class SftExample:
  """Token ids of one dialogue and the mask of its answer tokens.

  Attributes:
    tokens: int32 [n].
    answer_mask: bool [n], True on answer tokens (aligned with tokens, not with logits).
    origin: "file:line" of the source record, for error messages.
  """

  tokens: np.ndarray
  answer_mask: np.ndarray
  origin: str = ""

  def __len__(self) -> int:
    return len(self.tokens)


def sft_example(tokenizer: TextEncoder, messages: Sequence[MessageLike], *, system: str = "",
                last_answer_only: bool = False, origin: str = "") -> SftExample:
  """Encodes a dialogue that ends with an assistant answer, with the loss on its answers.

  Args:
    tokenizer: a `llama2_jax.tokenizer.Tokenizer`.
    messages: alternating user and assistant messages.
    system: optional system message, merged into the first user message.
    last_answer_only: put the loss on the last answer only (Ghost Attention).
    origin: "file:line" of the record, kept for error messages.

  Raises:
    llama2_jax.chat.ChatFormatError: if the dialogue is invalid or ends with a user message.
  """
  dialog = [Message("system", system)] if system else []
  dialog += [as_message(m) for m in messages]
  segments = encode_segments(tokenizer, dialog)
  if not segments[-1].is_answer:
    raise ChatFormatError("An SFT dialogue must end with an assistant message.")

  last_turn = segments[-1].turn
  tokens, mask = [], []
  for segment in segments:
    trained = segment.is_answer and (not last_answer_only or segment.turn == last_turn)
    tokens += segment.tokens
    mask += [trained] * len(segment.tokens)
  return SftExample(np.asarray(tokens, np.int32), np.asarray(mask, bool), origin)


def sft_example_from_ids(prompt_ids: Sequence[int], answer_ids: Sequence[int], *, eos_id: int,
                         origin: str = "") -> SftExample:
  """Builds an example from already encoded ids, such as a prompt and a sampled answer.

  EOS is appended to the answer unless it already ends with it.
  """
  answer = list(answer_ids)
  if not answer or answer[-1] != eos_id:
    answer.append(eos_id)
  tokens = np.asarray(list(prompt_ids) + answer, np.int32)
  mask = np.asarray([False] * len(prompt_ids) + [True] * len(answer), bool)
  return SftExample(tokens, mask, origin)


def ghost_attention_example(tokenizer: TextEncoder, instruction: str,
                            messages: Sequence[MessageLike], *, origin: str = "") -> SftExample:
  """Builds a Ghost Attention (GAtt) training example (Touvron et al., 2023, section 3.3).

  The instruction stays only in the first user turn, as the system message, and the loss falls
  only on the last assistant answer: the tokens of earlier turns are context with zero loss.
  The answers are expected to have been sampled with the instruction in every user turn (see
  `instruction_in_every_turn`).
  """
  return sft_example(tokenizer, messages, system=instruction, last_answer_only=True,
                     origin=origin)


def instruction_in_every_turn(instruction: str,
                              messages: Sequence[MessageLike]) -> list[Message]:
  """Returns the dialogue with the instruction prepended to every user message, for sampling.

  GAtt samples its answers with the instruction concatenated to all user messages. The
  separator, a blank line, is this project's choice; the paper does not give one.
  """
  result = []
  for message in (as_message(m) for m in messages):
    if message.role == "user":
      message = Message("user", f"{instruction.strip()}\n\n{message.content}")
    result.append(message)
  return result


def sft_batch(rows: Sequence[Sequence[SftExample]], *, batch_size: int, max_length: int,
              pad_id: int) -> dict[str, np.ndarray]:
  """Packs rows of examples into a right-padded batch (see the module docstring for keys).

  Args:
    rows: at most batch_size rows, each a list of examples whose lengths sum to at most
      max_length. Missing rows are all padding.
    batch_size: B.
    max_length: L.
    pad_id: id written on padding and on the target after each segment's last token.

  Raises:
    ValueError: if there are too many rows or a row is longer than max_length.
  """
  if len(rows) > batch_size:
    raise ValueError(f"Got {len(rows)} rows for a batch of {batch_size}.")
  shape = (batch_size, max_length)
  batch = {key: np.zeros(shape, np.int32) for key in SFT_KEYS}
  batch["tokens"][:] = pad_id
  batch["targets"][:] = pad_id

  for row_index, examples in enumerate(rows):
    start = 0
    for segment_id, example in enumerate(examples, start=1):
      n = len(example)
      end = start + n
      if end > max_length:
        raise ValueError(f"Row {row_index} needs {end} tokens; max_length is {max_length}.")
      row = slice(start, end)
      batch["tokens"][row_index, row] = example.tokens
      batch["targets"][row_index, start:end - 1] = example.tokens[1:]
      batch["loss_mask"][row_index, start:end - 1] = example.answer_mask[1:]
      batch["attention_mask"][row_index, row] = 1
      batch["segment_ids"][row_index, row] = segment_id
      batch["positions"][row_index, row] = np.arange(n)
      start = end
  return batch
