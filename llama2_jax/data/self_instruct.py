"""Reader of the human-written Self-Instruct tasks (Wang et al., 2023, yizhongw/self-instruct).

Both `data/seed_tasks.jsonl` and `human_eval/user_oriented_instructions.jsonl` hold one task per
line with an `instruction` and a list of `instances`, each an `input` (often empty) and an
`output`. Each instance becomes a one-turn dialogue whose user message is the instruction,
followed by a blank line and the input when there is one, and whose answer is the output. This
layout is this project's choice; the split group is the instruction, so all instances of a task
share a split.
"""

from __future__ import annotations

from typing import Iterator

from llama2_jax.chat import Message
from llama2_jax.data.errors import BadRecordHandler, DataError
from llama2_jax.data.readers import SKIP_HINT, list_field, read_valid, text_field
from llama2_jax.data.records import Dialogue, Prompt, group_key


def _user_message(instruction: str, task_input: str) -> str:
  instruction, task_input = instruction.strip(), task_input.strip()
  return f"{instruction}\n\n{task_input}" if task_input else instruction


def _instances(path, line, record):
  instances = list_field(record, "instances", path, line)
  for index, instance in enumerate(instances):
    field = f"instances[{index}]"
    if not isinstance(instance, dict):
      raise DataError(f"must be an object, got {type(instance).__name__}.", path=path,
                      line=line, field=field, fix=SKIP_HINT)
    task_input = text_field(instance, "input", path, line, allow_empty=True)
    try:
      output = text_field(instance, "output", path, line)
    except DataError as error:
      raise DataError(error.problem, path=path, line=line, field=f"{field}.output",
                      fix=SKIP_HINT) from None
    yield index, task_input, output


def read_dialogues(path: str, handler: BadRecordHandler, *, source: str,
                   is_safety: bool) -> Iterator[Dialogue]:
  """Yields one dialogue per task instance."""
  del is_safety

  def parse(line, record):
    instruction = text_field(record, "instruction", path, line)
    dialogues = []
    for index, task_input, output in _instances(path, line, record):
      messages = (Message("user", _user_message(instruction, task_input)),
                  Message("assistant", output.strip()))
      dialogues.append(Dialogue(id=f"{source}:{line}:{index}", origin=f"{path}:{line}",
                                source=source, group=group_key(instruction), messages=messages))
    return dialogues

  for dialogues in read_valid(path, handler, parse):
    yield from dialogues


def read_prompts(path: str, handler: BadRecordHandler, *, source: str,
                 is_safety: bool) -> Iterator[Prompt]:
  """Yields the user message of each task's first instance."""

  def parse(line, record):
    instruction = text_field(record, "instruction", path, line)
    _, task_input, _ = next(_instances(path, line, record))
    return Prompt(id=f"{source}:{line}", origin=f"{path}:{line}", source=source,
                  group=group_key(instruction), text=_user_message(instruction, task_input),
                  is_safety=is_safety)

  yield from read_valid(path, handler, parse)
