"""Readers of this project's own JSONL formats, for a user's dialogues, pairs and prompts.

One JSON object per line. Optional keys: `id` (default: the line number) and `group` (the split
key; default: the first user message). Messages are objects `{"role": "user" | "assistant",
"content": "..."}` that alternate, starting with the user.

  dialogues: {"messages": [...ending with an assistant message], "system": "optional"}
  pairs:     {"context": [...ending with a user message]} or {"prompt": "one user message"},
             plus {"chosen": "...", "rejected": "...", "rating": "better"} where rating is a
             name of `llama2_jax.data.records.RATING_NAMES` or its id 0..4 (default "unknown")
  prompts:   {"prompt": "...", "is_safety": true, "risk_category": "optional"}; is_safety
             defaults to the source's setting in the data config.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from llama2_jax.chat import Message
from llama2_jax.data.errors import BadRecordHandler, DataError
from llama2_jax.data.readers import SKIP_HINT, list_field, read_valid, text_field
from llama2_jax.data.records import RATING_NAMES, Dialogue, PreferencePair, Prompt, group_key


def _messages(record: Mapping[str, Any], field: str, path: str, line: int,
              last_role: str) -> tuple[Message, ...]:
  messages = []
  for index, item in enumerate(list_field(record, field, path, line)):
    where = f"{field}[{index}]"
    expected = "user" if index % 2 == 0 else "assistant"
    if not isinstance(item, dict) or item.get("role") != expected:
      raise DataError(f"must be an object with role {expected!r} (roles alternate user, "
                      "assistant, ...).", path=path, line=line, field=where, fix=SKIP_HINT)
    try:
      content = text_field(item, "content", path, line)
    except DataError as error:
      raise DataError(error.problem, path=path, line=line, field=f"{where}.content",
                      fix=SKIP_HINT) from None
    messages.append(Message(expected, content.strip()))
  if messages[-1].role != last_role:
    raise DataError(f"must end with a {last_role} message.", path=path, line=line, field=field,
                    fix=SKIP_HINT)
  return tuple(messages)


def _id_and_group(record, source, path, line, first_user: str) -> dict[str, str]:
  record_id = record.get("id", line)
  group = record.get("group")
  if group is not None and not isinstance(group, str):
    raise DataError(f"must be a string, got {type(group).__name__}.", path=path, line=line,
                    field="group", fix=SKIP_HINT)
  return dict(id=f"{source}:{record_id}", origin=f"{path}:{line}", source=source,
              group=group_key(group if group else first_user))


def _rating(record, path, line) -> int:
  rating = record.get("rating", "unknown")
  if isinstance(rating, str) and rating in RATING_NAMES:
    return RATING_NAMES.index(rating)
  if isinstance(rating, int) and not isinstance(rating, bool) and 0 <= rating < len(RATING_NAMES):
    return rating
  raise DataError(f"is {rating!r}; expected one of {RATING_NAMES} or an id 0..4.", path=path,
                  line=line, field="rating", fix=SKIP_HINT)


def read_dialogues(path: str, handler: BadRecordHandler, *, source: str,
                   is_safety: bool) -> Iterator[Dialogue]:
  """Yields the dialogue of each valid line."""
  del is_safety

  def parse(line, record):
    messages = _messages(record, "messages", path, line, last_role="assistant")
    system = record.get("system", "")
    if not isinstance(system, str):
      raise DataError(f"must be a string, got {type(system).__name__}.", path=path, line=line,
                      field="system", fix=SKIP_HINT)
    return Dialogue(messages=messages, system=system.strip(),
                    **_id_and_group(record, source, path, line, messages[0].content))

  yield from read_valid(path, handler, parse)


def read_pairs(path: str, handler: BadRecordHandler, *, source: str,
               is_safety: bool) -> Iterator[PreferencePair]:
  """Yields the preference pair of each valid line."""
  del is_safety

  def parse(line, record):
    if "context" in record:
      context = _messages(record, "context", path, line, last_role="user")
    else:
      context = (Message("user", text_field(record, "prompt", path, line).strip()),)
    chosen = text_field(record, "chosen", path, line).strip()
    rejected = text_field(record, "rejected", path, line).strip()
    if chosen == rejected:
      raise DataError("equals 'chosen', so the pair states no preference.", path=path,
                      line=line, field="rejected", fix=SKIP_HINT)
    return PreferencePair(context=context, chosen=chosen, rejected=rejected,
                          rating=_rating(record, path, line),
                          **_id_and_group(record, source, path, line, context[0].content))

  yield from read_valid(path, handler, parse)


def read_prompts(path: str, handler: BadRecordHandler, *, source: str,
                 is_safety: bool) -> Iterator[Prompt]:
  """Yields the prompt of each valid line."""

  def parse(line, record):
    text = text_field(record, "prompt", path, line).strip()
    flag = record.get("is_safety", is_safety)
    if not isinstance(flag, bool):
      raise DataError(f"must be true or false, got {flag!r}.", path=path, line=line,
                      field="is_safety", fix=SKIP_HINT)
    category = record.get("risk_category", "")
    if not isinstance(category, str):
      raise DataError(f"must be a string, got {type(category).__name__}.", path=path,
                      line=line, field="risk_category", fix=SKIP_HINT)
    return Prompt(text=text, is_safety=flag, risk_category=category,
                  **_id_and_group(record, source, path, line, text))

  yield from read_valid(path, handler, parse)
