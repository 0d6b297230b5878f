"""Reader of Anthropic's HH-RLHF preference data (Bai et al., 2022, github.com/anthropics/hh-rlhf).

Each JSONL record has fields `chosen` and `rejected`, two whole dialogues written as
"\\n\\nHuman: ...\\n\\nAssistant: ..." that share all turns but the last Assistant turn. The
preference is binary, so every pair gets the rating UNKNOWN. From one file the reader yields the
preference pairs, the chosen dialogues (for supervised fine-tuning) or the first Human turns (as
prompts). The caller marks prompts from a safety file (harmless-base) with `is_safety`.

A record is invalid, and goes to the `BadRecordHandler`, in two cases. Either a dialogue has text
before its first turn, turns that do not alternate Human, Assistant, ..., an empty turn, or a
last turn that is not from the Assistant. Or the two dialogues differ before their last turn,
or not at all.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

from llama2_jax.chat import Message
from llama2_jax.data.errors import BadRecordHandler, DataError
from llama2_jax.data.readers import SKIP_HINT, read_valid, text_field
from llama2_jax.data.records import Dialogue, PreferencePair, Prompt, group_key
from llama2_jax.losses.reward import Rating

_TURN = re.compile(r"\n\n(Human|Assistant): ")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_dialogue(text: str, path: str, line: int, field: str) -> tuple[Message, ...]:
  """Splits an HH-RLHF dialogue into messages, raising a `DataError` naming the field."""
  parts = _TURN.split(text)
  if parts[0].strip():
    raise DataError("has text before the first '\\n\\nHuman: ' turn.", path=path, line=line,
                    field=field, fix=SKIP_HINT)
  messages = []
  for index, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2])):
    role = _ROLES[speaker]
    expected = "user" if index % 2 == 0 else "assistant"
    if role != expected:
      raise DataError(f"turn {index} is from {speaker}; turns must alternate Human, Assistant.",
                      path=path, line=line, field=field, fix=SKIP_HINT)
    if not content.strip():
      raise DataError(f"turn {index} ({speaker}) is empty.", path=path, line=line, field=field,
                      fix=SKIP_HINT)
    messages.append(Message(role, content.strip()))
  if not messages or messages[-1].role != "assistant":
    raise DataError("does not end with an Assistant turn.", path=path, line=line, field=field,
                    fix=SKIP_HINT)
  return tuple(messages)


def parse_pair(path: str, line: int, record: Mapping[str, Any]):
  """Parses both dialogues of a record and checks that they form a preference pair."""
  chosen = parse_dialogue(text_field(record, "chosen", path, line), path, line, "chosen")
  rejected = parse_dialogue(text_field(record, "rejected", path, line), path, line, "rejected")
  if chosen[:-1] != rejected[:-1]:
    raise DataError("differs from 'chosen' before the last Assistant turn; a preference pair "
                    "must share its context.", path=path, line=line, field="rejected",
                    fix=SKIP_HINT)
  if chosen[-1] == rejected[-1]:
    raise DataError("has the same last turn as 'chosen', so the pair states no preference.",
                    path=path, line=line, field="rejected", fix=SKIP_HINT)
  return chosen, rejected


def read_pairs(path: str, handler: BadRecordHandler, *, source: str,
               is_safety: bool) -> Iterator[PreferencePair]:
  """Yields one rating-UNKNOWN preference pair per valid record."""
  del is_safety  # The dataset (helpfulness or safety pairs) is chosen by the caller.

  def parse(line, record):
    chosen, rejected = parse_pair(path, line, record)
    return PreferencePair(
        id=f"{source}:{line}", origin=f"{path}:{line}", source=source,
        group=group_key(chosen[0].content), context=chosen[:-1], chosen=chosen[-1].content,
        rejected=rejected[-1].content, rating=int(Rating.UNKNOWN))

  yield from read_valid(path, handler, parse)


def read_dialogues(path: str, handler: BadRecordHandler, *, source: str,
                   is_safety: bool) -> Iterator[Dialogue]:
  """Yields the chosen dialogue of each valid record, for supervised fine-tuning."""
  del is_safety

  def parse(line, record):
    chosen, _ = parse_pair(path, line, record)
    return Dialogue(id=f"{source}:{line}", origin=f"{path}:{line}", source=source,
                    group=group_key(chosen[0].content), messages=chosen)

  yield from read_valid(path, handler, parse)


def read_prompts(path: str, handler: BadRecordHandler, *, source: str,
                 is_safety: bool) -> Iterator[Prompt]:
  """Yields the first Human turn of each valid record, once per distinct prompt."""
  seen = set()

  def parse(line, record):
    chosen, _ = parse_pair(path, line, record)
    text = chosen[0].content
    key = group_key(text)
    if key in seen:
      return None
    seen.add(key)
    return Prompt(id=f"{source}:{line}", origin=f"{path}:{line}", source=source, group=key,
                  text=text, is_safety=is_safety)

  yield from read_valid(path, handler, parse)
