"""Rebuilds the real data subsets shipped in `llama2_jax/assets/` from the full source files.

  python -m llama2_jax.data.make_subsets --source_dir ../shared/data --output_dir llama2_jax/assets

`--source_dir` contains the upstream files in one folder per data set: hh_rlhf/, oasst1/,
self_instruct/, anthropic_red_team_prompts/, xstest/ and truthfulqa/, with the file names used
below. Each ATTRIBUTION.md in the assets names the upstream repository, commit and file. The
output is deterministic: records keep their source order, samples use `random.Random(0)`, and
gzip headers carry no time stamp.
LICENSE and ATTRIBUTION.md files are written by hand, not by this script.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
from typing import Iterable

from llama2_jax.data import hh_rlhf
from llama2_jax.data.errors import BadRecordHandler, DataError
from llama2_jax.data.readers import iter_csv

# Fields kept from each oasst1 message; the others (user ids, detoxify scores, emoji counts,
# model names) are not used by the readers.
OASST_FIELDS = ("message_id", "parent_id", "message_tree_id", "created_date", "role", "lang",
                "text", "rank", "deleted", "review_result", "labels")
RED_TEAM_SAMPLE = 2000


def _write_gzip_lines(path: str, lines: Iterable[bytes]) -> int:
  count = 0
  with open(path, "wb") as raw:
    # mtime=0 and no file name keep the bytes identical between runs.
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
      for line in lines:
        f.write(line.rstrip(b"\n") + b"\n")
        count += 1
  return count


def _json_line(record: dict) -> bytes:
  return json.dumps(record, ensure_ascii=False).encode("utf-8")


def valid_hh_lines(path: str) -> tuple[list[bytes], list[str]]:
  """Returns the original lines of valid HH-RLHF pairs and the errors of the others."""
  with gzip.open(path, "rb") as f:
    raw_lines = f.read().split(b"\n")
  valid, dropped = [], []
  for number, raw in enumerate(raw_lines, start=1):
    if not raw.strip():
      continue
    try:
      record = json.loads(raw.decode("utf-8"))
      hh_rlhf.parse_pair(path, number, record)
    except (DataError, ValueError) as error:
      dropped.append(str(error))
      continue
    valid.append(raw)
  return valid, dropped


def _csv_rows(path: str) -> list[dict[str, str]]:
  return [row for _, row in iter_csv(path, BadRecordHandler("raise"))]


def make_subsets(source_dir: str, output_dir: str) -> dict[str, int]:
  """Writes every subset and returns the number of records in each output file."""
  counts = {}

  def output(relative: str) -> str:
    path = os.path.join(output_dir, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path

  for name in ("helpful-base.test.jsonl.gz", "harmless-base.test.jsonl.gz"):
    valid, dropped = valid_hh_lines(os.path.join(source_dir, "hh_rlhf", name))
    counts[f"hh_rlhf/{name}"] = _write_gzip_lines(output(f"hh_rlhf/{name}"), valid)
    counts[f"hh_rlhf/{name} (dropped)"] = len(dropped)

  oasst_path = os.path.join(source_dir, "oasst1", "oasst1_validation_en_messages.jsonl")
  with open(oasst_path, "rb") as f:
    messages = [json.loads(line) for line in f if line.strip()]
  trimmed = (_json_line({k: m.get(k) for k in OASST_FIELDS}) for m in messages)
  counts["oasst1"] = _write_gzip_lines(
      output("oasst1/oasst1_validation_en_messages.jsonl.gz"), trimmed)

  for name in ("seed_tasks.jsonl", "user_oriented_instructions.jsonl"):
    shutil.copyfile(os.path.join(source_dir, "self_instruct", name),
                    output(f"self_instruct/{name}"))

  red_team = _csv_rows(os.path.join(source_dir, "anthropic_red_team_prompts",
                                    "red_team_first_prompts_10k.csv"))
  sample = sorted(random.Random(0).sample(range(len(red_team)), RED_TEAM_SAMPLE))
  counts["anthropic_red_team"] = _write_gzip_lines(
      output("anthropic_red_team/red_team_first_prompts_2k.jsonl.gz"),
      (_json_line(red_team[i]) for i in sample))

  xstest = _csv_rows(os.path.join(source_dir, "xstest", "xstest_prompts.csv"))
  with open(output("xstest/xstest_prompts.jsonl"), "wb") as f:
    f.writelines(_json_line(row) + b"\n" for row in xstest)
  counts["xstest"] = len(xstest)

  truthfulqa = _csv_rows(os.path.join(source_dir, "truthfulqa", "TruthfulQA.csv"))
  counts["truthfulqa"] = _write_gzip_lines(output("truthfulqa/truthfulqa.jsonl.gz"),
                                           (_json_line(row) for row in truthfulqa))
  return counts


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source_dir", required=True, help="folder with the full source files")
  parser.add_argument("--output_dir", required=True, help="assets folder to write into")
  args = parser.parse_args(argv)
  counts = make_subsets(args.source_dir, args.output_dir)
  for name, count in counts.items():
    print(f"{name}: {count}")


if __name__ == "__main__":
  main()
