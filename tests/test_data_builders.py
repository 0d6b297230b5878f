"""Tests of the tfds builders and the splits: round trip, no network, no partial output."""

import gzip
import importlib.abc
import json
import logging
import os
import socket
import sys

import pytest
from tensorflow_datasets.core.utils import gcs_utils

from llama2_jax.data import builders, hh_rlhf
from llama2_jax.data.config import DatasetConfig
from llama2_jax.data.errors import DataError
from llama2_jax.data.sources import SourceFile, asset_path
from llama2_jax.data.splits import SPLITS, assign_split
from llama2_jax.losses.reward import Rating

HELPFUL = asset_path("hh_rlhf/helpful-base.test.jsonl.gz")


@pytest.fixture
def hh_file(tmp_path):
  """The first 40 real helpful-base records as a plain JSONL file."""
  with gzip.open(HELPFUL, "rb") as f:
    lines = [next(f) for _ in range(40)]
  path = tmp_path / "hh.jsonl"
  path.write_bytes(b"".join(lines))
  return path


def tiny_config(tmp_path, path, **overrides):
  settings = dict(name="sft_dialogues", data_dir=str(tmp_path / "tfds"),
                  sources=(SourceFile("hh_rlhf", str(path)),), validation_fraction=0.2,
                  test_fraction=0.2)
  settings.update(overrides)
  return DatasetConfig(**settings)


@pytest.fixture
def no_network(monkeypatch):
  def fail_on_connect(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")
  monkeypatch.setattr(socket.socket, "connect", fail_on_connect)
  monkeypatch.setattr(socket, "getaddrinfo", fail_on_connect)
  monkeypatch.setattr(socket, "create_connection", fail_on_connect)


def test_round_trip_without_network(tmp_path, hh_file, no_network):
  config = tiny_config(tmp_path, hh_file)
  expected = builders.read_split_records(config)
  for split, records in expected.items():
    loaded = builders.load(config, split)
    assert len(loaded) == len(records), split
    assert sorted(loaded, key=lambda r: r.id) == sorted(records, key=lambda r: r.id), split


def test_tfds_gcs_access_disabled():
  assert gcs_utils._is_gcs_disabled  # pylint: disable=protected-access


def test_array_record_files_written(tmp_path, hh_file):
  builder = builders.prepare(tiny_config(tmp_path, hh_file))
  names = os.listdir(builder.data_dir)
  assert any(".array_record-" in name for name in names)
  assert "dataset_info.json" in names


def test_bad_record_leaves_no_dataset(tmp_path, hh_file):
  with open(hh_file, "ab") as f:
    f.write(b'{"chosen": "unterminated\n')
  config = tiny_config(tmp_path, hh_file)
  with pytest.raises(DataError, match=r"hh\.jsonl:41: malformed JSON"):
    builders.prepare(config)
  written = [os.path.join(root, name) for root, dirs, files in os.walk(config.data_dir)
             for name in dirs + files]
  assert not any("incomplete" in path or path.endswith("1.0.0") for path in written), written


def test_skip_policy_builds_the_rest(tmp_path, hh_file):
  with open(hh_file, "ab") as f:
    f.write(b'{"chosen": "unterminated\n')
  config = tiny_config(tmp_path, hh_file, on_error="skip")
  total = sum(len(builders.load(config, split)) for split in ("train", "validation", "test"))
  assert total == 40


def test_changed_seed_gets_new_directory(tmp_path, hh_file):
  first = builders.prepare(tiny_config(tmp_path, hh_file, split_seed=0))
  second = builders.prepare(tiny_config(tmp_path, hh_file, split_seed=1))
  assert first.data_dir != second.data_dir


def test_pairs_and_prompts_round_trip(tmp_path, hh_file):
  for name, format_ in (("helpfulness_pairs", "hh_rlhf"), ("rl_prompts", "hh_rlhf")):
    config = tiny_config(tmp_path, hh_file, name=name,
                         sources=(SourceFile(format_, str(hh_file), is_safety=True),))
    records = builders.load(config, "train")
    assert len(records) > 0, name
    first = records[0]
    assert first == next(r for r in builders.read_split_records(config)["train"]
                         if r.id == first.id), name


def test_eval_set_only_in_test(tmp_path):
  config = DatasetConfig(name="xstest", data_dir=str(tmp_path))
  by_split = builders.read_split_records(config)
  assert len(by_split["test"]) == 450
  assert not by_split["train"]
  assert not by_split["validation"]


def test_shipped_splits_disjoint_by_prompt(tmp_path):
  """No prompt group lands in two splits, within or across the shipped datasets."""
  split_of_group = {}
  for name in ("sft_dialogues", "helpfulness_pairs", "safety_pairs", "rl_prompts"):
    by_split = builders.read_split_records(DatasetConfig(name=name, data_dir=str(tmp_path)))
    assert all(by_split[split] for split in by_split), name
    for split, records in by_split.items():
      for record in records:
        assert split_of_group.setdefault(record.group, split) == split, (name, record.origin)


def test_split_assignment_is_seeded():
  groups = [f"prompt {i}" for i in range(2000)]
  first = [assign_split(g, seed=0, validation_fraction=0.1, test_fraction=0.1) for g in groups]
  again = [assign_split(g, seed=0, validation_fraction=0.1, test_fraction=0.1) for g in groups]
  other = [assign_split(g, seed=1, validation_fraction=0.1, test_fraction=0.1) for g in groups]
  assert first == again
  assert first != other
  assert 150 < first.count("test") < 250  # About 10% of 2000.


@pytest.mark.parametrize("overrides, message", [
    (dict(name="sft"), "DatasetConfig.name is 'sft'; expected one of"),
    (dict(test_fraction=1.5), r"test_fraction is 1.5; it must be a number in \[0, 1\)"),
    (dict(validation_fraction=0.6, test_fraction=0.5), "must be below 1"),
    (dict(on_error="ignore"), "DatasetConfig.on_error is 'ignore'"),
    (dict(sources=(SourceFile("xstest", "x.csv"),)), r"sources\[0\].format is 'xstest'"),
    (dict(split_seed=-1), "DatasetConfig.split_seed is -1; it must be an integer >= 0"),
])
def test_dataset_config_validation(tmp_path, overrides, message):
  settings = dict(name="sft_dialogues", data_dir=str(tmp_path))
  settings.update(overrides)
  with pytest.raises(ValueError, match=message):
    DatasetConfig(**settings)


def user_jsonl_files(tmp_path, hh_file):
  """Writes the real HH-RLHF records of `hh_file` in the three user JSONL formats."""
  records = [json.loads(line) for line in hh_file.read_text().splitlines()]
  dialogues, pairs, prompts = [], [], []
  for line, record in enumerate(records, start=1):
    chosen, rejected = hh_rlhf.parse_pair(str(hh_file), line, record)
    messages = [{"role": m.role, "content": m.content} for m in chosen]
    dialogues.append({"id": f"d{line}", "messages": messages})
    pairs.append({"id": f"p{line}", "context": messages[:-1], "chosen": chosen[-1].content,
                  "rejected": rejected[-1].content, "rating": "slightly_better"})
    prompts.append({"id": f"q{line}", "prompt": chosen[0].content, "is_safety": line % 2 == 0})
  paths = {}
  for name, rows in (("dialogues", dialogues), ("pairs", pairs), ("prompts", prompts)):
    paths[name] = tmp_path / f"user_{name}.jsonl"
    paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
  return paths, len(records)


@pytest.mark.parametrize("name, kind", [("sft_dialogues", "dialogues"),
                                        ("helpfulness_pairs", "pairs"),
                                        ("rl_prompts", "prompts")])
def test_user_jsonl_by_path(tmp_path, hh_file, name, kind):
  paths, count = user_jsonl_files(tmp_path, hh_file)
  config = tiny_config(tmp_path, hh_file, name=name,
                       sources=(SourceFile("jsonl", str(paths[kind]), name="mine"),))
  loaded = [r for split in SPLITS for r in builders.load(config, split)]
  assert len(loaded) == count
  assert {r.source for r in loaded} == {"mine"}
  assert all(r.origin.startswith(str(paths[kind]) + ":") for r in loaded)
  if kind == "pairs":
    assert {r.rating for r in loaded} == {int(Rating.SLIGHTLY_BETTER)}
  if kind == "prompts":
    assert sum(r.is_safety for r in loaded) == count // 2


def test_rl_prompt_safety_by_source(tmp_path):
  by_split = builders.read_split_records(DatasetConfig(name="rl_prompts", data_dir=str(tmp_path)))
  safety = {}
  for record in (r for records in by_split.values() for r in records):
    safety.setdefault(record.source, set()).add(record.is_safety)
  assert safety == {"oasst1": {False}, "hh_rlhf_helpful": {False},
                    "hh_rlhf_harmless": {True}, "red_team": {True}}


def test_missing_source_leaves_no_dataset(tmp_path, hh_file):
  config = tiny_config(tmp_path, hh_file,
                       sources=(SourceFile("hh_rlhf", str(tmp_path / "absent.jsonl")),))
  with pytest.raises(DataError, match=r"absent\.jsonl: file not found"):
    builders.prepare(config)
  written = [name for _, dirs, files in os.walk(config.data_dir) for name in dirs + files]
  assert not any("incomplete" in name or name == "1.0.0" for name in written), written


def test_skip_policy_logs_count(tmp_path, hh_file, caplog):
  with open(hh_file, "ab") as f:
    f.write(b'{"chosen": "unterminated\n')
  config = tiny_config(tmp_path, hh_file, on_error="skip")
  with caplog.at_level(logging.WARNING, logger="absl"):
    builders.read_split_records(config)
  messages = [r.getMessage() for r in caplog.records]
  assert any("hh.jsonl:41: malformed JSON" in m for m in messages)
  assert any(m.startswith("Skipped 1 bad records of") for m in messages)


class _BlockTensorFlow(importlib.abc.MetaPathFinder):
  """Makes `import tensorflow` fail as it does where TensorFlow is not installed."""

  def find_spec(self, name, path=None, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return None


def test_prepare_and_load_without_tensorflow(tmp_path, hh_file, monkeypatch):
  monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
  monkeypatch.setattr(sys, "meta_path", [_BlockTensorFlow()] + sys.meta_path)
  config = tiny_config(tmp_path, hh_file)
  records = builders.load(config, "train")
  assert len(records) > 0
  assert records[0].messages[-1].role == "assistant"
  assert "tensorflow" not in sys.modules
