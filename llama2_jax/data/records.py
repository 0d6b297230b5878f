"""Source-independent records that the readers produce and the tfds builders store.

Every record carries `origin`, the "file:line" it came from, so that later errors (an example
longer than the maximum length) can name the line to fix, and `group`, the key that decides its
split: records with equal groups always land in the same split. Readers set the group to the
normalised text of the first user prompt (or of the instruction), so the same prompt never ends
up in two splits, whichever dataset and source it comes from.
"""

from __future__ import annotations

import dataclasses
import re

from llama2_jax.chat import Message
from llama2_jax.losses.reward import Rating

RATING_NAMES = tuple(rating.name.lower() for rating in Rating)


@dataclasses.dataclass(frozen=True)
class Dialogue:
  """A conversation for supervised fine-tuning.

  Attributes:
    id: unique within its source.
    origin: "file:line" of the record (of its last message, for threads built from many lines).
    source: short name of the source data set, such as "oasst1".
    group: split key.
    messages: alternating user and assistant messages, ending with an assistant answer.
    system: optional system message, merged into the first user message by the chat format.
  """

  id: str
  origin: str
  source: str
  group: str
  messages: tuple[Message, ...]
  system: str = ""


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """Two answers to the same conversation, one preferred by a human.

  Attributes:
    id, origin, source, group: as in `Dialogue`.
    context: alternating user and assistant messages ending with the user message that both
      answers reply to.
    chosen: the preferred answer.
    rejected: the other answer.
    rating: a `llama2_jax.losses.reward.Rating` id, 0 (significantly better) to 4 (unknown).
  """

  id: str
  origin: str
  source: str
  group: str
  context: tuple[Message, ...]
  chosen: str
  rejected: str
  rating: int


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A user prompt for sampling (RL, rejection sampling, context distillation, evaluation).

  Attributes:
    id, origin, source, group: as in `Dialogue`.
    text: the user message.
    is_safety: True for adversarial (red-team or harmlessness) prompts.
    risk_category: the prompt's risk category when a source labels it, else "".
  """

  id: str
  origin: str
  source: str
  group: str
  text: str
  is_safety: bool
  risk_category: str = ""


@dataclasses.dataclass(frozen=True)
class XSTestPrompt:
  """One XSTest prompt (Röttger et al., 2024): safe prompts should be answered, unsafe refused.

  Attributes:
    id, origin, source, group: as in `Dialogue`.
    text: the prompt.
    type: one of XSTest's 18 prompt types, such as "homonyms" or "contrast_homonyms".
    label: "safe" or "unsafe".
    focus: the word or topic that makes the prompt look unsafe.
    note: XSTest's free-text note (may be empty).
  """

  id: str
  origin: str
  source: str
  group: str
  text: str
  type: str
  label: str
  focus: str
  note: str


@dataclasses.dataclass(frozen=True)
class TruthfulQAQuestion:
  """One TruthfulQA question (Lin et al., 2022) with its reference answers.

  Attributes:
    id, origin, source, group: as in `Dialogue`.
    question: the question.
    best_answer: the best true answer.
    correct_answers: true answers.
    incorrect_answers: false answers.
    category: one of TruthfulQA's categories, such as "Misconceptions".
    type: "Adversarial" or "Non-Adversarial".
  """

  id: str
  origin: str
  source: str
  group: str
  question: str
  best_answer: str
  correct_answers: tuple[str, ...]
  incorrect_answers: tuple[str, ...]
  category: str
  type: str


def group_key(text: str) -> str:
  """Normalises a prompt for split grouping: case-folded, whitespace collapsed."""
  return re.sub(r"\s+", " ", text).strip().casefold()
