"""Readers of prompt collections: red-team prompts, AdvBench, XSTest and TruthfulQA.

Each reads the CSV columns of the original release, from a ".csv" file or from a JSONL file
whose objects have the same keys (the shipped subsets are JSONL, because the package ships no
CSV files).
  * Anthropic red-team first prompts (`prompt`, `task_description`): safety prompts.
  * AdvBench harmful behaviours (Zou et al., 2023; `goal`, `target`): safety prompts.
  * XSTest (Röttger et al., 2024; `id, prompt, type, label, focus, note`).
  * TruthfulQA (Lin et al., 2022; `Type, Category, Question, Best Answer, Correct Answers,
    Incorrect Answers, ...`, answer lists joined by "; ").
"""

from __future__ import annotations

from typing import Iterator

from llama2_jax.data.errors import BadRecordHandler, DataError
from llama2_jax.data.readers import SKIP_HINT, read_valid, text_field
from llama2_jax.data.records import Prompt, TruthfulQAQuestion, XSTestPrompt, group_key

XSTEST_LABELS = ("safe", "unsafe")


def _read_prompt_column(path, handler, *, source, is_safety, column) -> Iterator[Prompt]:
  seen = set()

  def parse(line, record):
    text = text_field(record, column, path, line).strip()
    key = group_key(text)
    if key in seen:
      return None
    seen.add(key)
    return Prompt(id=f"{source}:{line}", origin=f"{path}:{line}", source=source, group=key,
                  text=text, is_safety=is_safety)

  yield from read_valid(path, handler, parse)


def read_red_team_prompts(path: str, handler: BadRecordHandler, *, source: str,
                          is_safety: bool) -> Iterator[Prompt]:
  """Yields each distinct `prompt` (a red-teamer's first message)."""
  yield from _read_prompt_column(path, handler, source=source, is_safety=is_safety,
                                 column="prompt")


def read_advbench_prompts(path: str, handler: BadRecordHandler, *, source: str,
                          is_safety: bool) -> Iterator[Prompt]:
  """Yields each distinct `goal` (a harmful request)."""
  yield from _read_prompt_column(path, handler, source=source, is_safety=is_safety,
                                 column="goal")


def read_xstest(path: str, handler: BadRecordHandler, *, source: str,
                is_safety: bool) -> Iterator[XSTestPrompt]:
  """Yields every XSTest prompt with its type and safe/unsafe label."""
  del is_safety

  def parse(line, record):
    label = text_field(record, "label", path, line)
    if label not in XSTEST_LABELS:
      raise DataError(f"is {label!r}; expected one of {XSTEST_LABELS}.", path=path, line=line,
                      field="label", fix=SKIP_HINT)
    text = text_field(record, "prompt", path, line).strip()
    return XSTestPrompt(
        id=f"{source}:{text_field(record, 'id', path, line)}", origin=f"{path}:{line}",
        source=source, group=group_key(text), text=text,
        type=text_field(record, "type", path, line), label=label,
        focus=text_field(record, "focus", path, line, allow_empty=True),
        note=text_field(record, "note", path, line, allow_empty=True))

  yield from read_valid(path, handler, parse)


def _answers(record, field, path, line) -> tuple[str, ...]:
  joined = text_field(record, field, path, line)
  return tuple(answer.strip() for answer in joined.split("; ") if answer.strip())


def read_truthfulqa(path: str, handler: BadRecordHandler, *, source: str,
                    is_safety: bool) -> Iterator[TruthfulQAQuestion]:
  """Yields every TruthfulQA question with its true and false reference answers."""
  del is_safety

  def parse(line, record):
    question = text_field(record, "Question", path, line).strip()
    return TruthfulQAQuestion(
        id=f"{source}:{line}", origin=f"{path}:{line}", source=source,
        group=group_key(question), question=question,
        best_answer=text_field(record, "Best Answer", path, line).strip(),
        correct_answers=_answers(record, "Correct Answers", path, line),
        incorrect_answers=_answers(record, "Incorrect Answers", path, line),
        category=text_field(record, "Category", path, line),
        type=text_field(record, "Type", path, line))

  yield from read_valid(path, handler, parse)
