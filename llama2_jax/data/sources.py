"""Source files, their formats, and the shipped default sources of each dataset.

A dataset of a given kind ("dialogues", "pairs", "prompts", "xstest", "truthfulqa") reads its
records from one or more `SourceFile`s; the file's `format` picks the reader. The defaults point
at the real data subsets in `llama2_jax/assets/`, which its README lists. A data config can name
other files of the same formats instead, such as the full HH-RLHF train split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import importlib_resources

from llama2_jax.data import hh_rlhf, jsonl_formats, oasst, prompt_sets, self_instruct
from llama2_jax.data.errors import BadRecordHandler

Reader = Callable[..., Iterator[Any]]

# kind -> format -> reader(path, handler, *, source, is_safety).
READERS: Mapping[str, Mapping[str, Reader]] = {
    "dialogues": {
        "oasst1": oasst.read_dialogues,
        "hh_rlhf": hh_rlhf.read_dialogues,
        "self_instruct": self_instruct.read_dialogues,
        "jsonl": jsonl_formats.read_dialogues,
    },
    "pairs": {
        "oasst1": oasst.read_pairs,
        "hh_rlhf": hh_rlhf.read_pairs,
        "jsonl": jsonl_formats.read_pairs,
    },
    "prompts": {
        "oasst1": oasst.read_prompts,
        "hh_rlhf": hh_rlhf.read_prompts,
        "self_instruct": self_instruct.read_prompts,
        "red_team": prompt_sets.read_red_team_prompts,
        "advbench": prompt_sets.read_advbench_prompts,
        "jsonl": jsonl_formats.read_prompts,
    },
    "xstest": {"xstest": prompt_sets.read_xstest},
    "truthfulqa": {"truthfulqa": prompt_sets.read_truthfulqa},
}

# Dataset name -> kind of record it holds.
DATASET_KINDS: Mapping[str, str] = {
    "sft_dialogues": "dialogues",
    "helpfulness_pairs": "pairs",
    "safety_pairs": "pairs",
    "rl_prompts": "prompts",
    "xstest": "xstest",
    "truthfulqa": "truthfulqa",
}

# Datasets that are evaluation sets only: all their records go to the "test" split.
EVAL_ONLY = ("xstest", "truthfulqa")


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One input file of a dataset.

  Attributes:
    format: a format of `READERS` for the dataset's kind, such as "hh_rlhf" or "jsonl".
    path: the file (".gz" is decompressed).
    name: the source name stored in each record; empty means the format.
    is_safety: marks prompts from this file as safety prompts (for formats whose records do not
      say so themselves).
  """

  format: str
  path: str
  name: str = ""
  is_safety: bool = False

  def __post_init__(self):
    formats = sorted({f for table in READERS.values() for f in table})
    if self.format not in formats:
      raise ValueError(f"SourceFile.format is {self.format!r}; expected one of {formats}.")
    if not isinstance(self.path, str) or not self.path:
      raise ValueError(f"SourceFile.path must be a non-empty string, got {self.path!r}.")

  @property
  def source_name(self) -> str:
    return self.name or self.format


def asset_path(relative: str) -> str:
  """Returns the path of a file in `llama2_jax/assets/`."""
  return str(importlib_resources.files("llama2_jax") / "assets" / relative)


def default_sources(dataset: str) -> tuple[SourceFile, ...]:
  """Returns the shipped sources of a dataset in `DATASET_KINDS`."""
  helpful = asset_path("hh_rlhf/helpful-base.test.jsonl.gz")
  harmless = asset_path("hh_rlhf/harmless-base.test.jsonl.gz")
  oasst1 = asset_path("oasst1/oasst1_validation_en_messages.jsonl.gz")
  red_team = asset_path("anthropic_red_team/red_team_first_prompts_2k.jsonl.gz")
  table = {
      "sft_dialogues": (
          SourceFile("oasst1", oasst1),
          SourceFile("hh_rlhf", helpful, name="hh_rlhf_helpful"),
          SourceFile("self_instruct", asset_path("self_instruct/seed_tasks.jsonl")),
          SourceFile("self_instruct", asset_path("self_instruct/user_oriented_instructions.jsonl")),
      ),
      "helpfulness_pairs": (
          SourceFile("oasst1", oasst1),
          SourceFile("hh_rlhf", helpful, name="hh_rlhf_helpful"),
      ),
      "safety_pairs": (SourceFile("hh_rlhf", harmless, name="hh_rlhf_harmless", is_safety=True),),
      "rl_prompts": (
          SourceFile("oasst1", oasst1),
          SourceFile("hh_rlhf", helpful, name="hh_rlhf_helpful"),
          SourceFile("hh_rlhf", harmless, name="hh_rlhf_harmless", is_safety=True),
          SourceFile("red_team", red_team, is_safety=True),
      ),
      "xstest": (SourceFile("xstest", asset_path("xstest/xstest_prompts.jsonl")),),
      "truthfulqa": (SourceFile("truthfulqa", asset_path("truthfulqa/truthfulqa.jsonl.gz")),),
  }
  return table[dataset]


def read_source(kind: str, source: SourceFile, handler: BadRecordHandler) -> Iterator[Any]:
  """Yields the records of one source file for a dataset of the given kind."""
  reader = READERS[kind][source.format]
  return reader(source.path, handler, source=source.source_name, is_safety=source.is_safety)
