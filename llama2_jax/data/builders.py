"""tfds builders that prepare each dataset as array_record files and read it back without TF.

`prepare(config)` reads the configured source files, assigns every record to train, validation
or test by its group (see `splits`), and writes the splits with `file_format="array_record"`
under `config.data_dir/<builder name>/<config fingerprint>/<version>`. `load(config, split)`
returns a random-access source of decoded records through `as_data_source`, so neither step
needs TensorFlow, and nothing is downloaded: the builders only read local files.

tfds writes into a temporary "incomplete" directory and renames it when every split is written,
so an error half way (a bad record with on_error="raise") leaves no partial dataset behind.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from llama2_jax.chat import Message
from llama2_jax.data import records as rec
from llama2_jax.data.config import DatasetConfig
from llama2_jax.data.errors import BadRecordHandler
from llama2_jax.data.sources import EVAL_ONLY, read_source
from llama2_jax.data.splits import SPLITS, assign_split

_Text = tfds.features.Text


def _Texts() -> tfds.features.Sequence:  # pylint: disable=invalid-name
  return tfds.features.Sequence(tfds.features.Text())


_COMMON = {"id": _Text(), "origin": _Text(), "source": _Text(), "group": _Text()}

_FEATURES = {
    "dialogues": dict(_COMMON, system=_Text(), roles=_Texts(), contents=_Texts()),
    "pairs": dict(_COMMON, context_roles=_Texts(), context_contents=_Texts(), chosen=_Text(),
                  rejected=_Text(), rating=np.int32),
    "prompts": dict(_COMMON, text=_Text(), is_safety=np.bool_, risk_category=_Text()),
    "xstest": dict(_COMMON, text=_Text(), type=_Text(), label=_Text(), focus=_Text(),
                   note=_Text()),
    "truthfulqa": dict(_COMMON, question=_Text(), best_answer=_Text(), correct_answers=_Texts(),
                       incorrect_answers=_Texts(), category=_Text(), type=_Text()),
}
_RECORD_TYPES = {"dialogues": rec.Dialogue, "pairs": rec.PreferencePair, "prompts": rec.Prompt,
                 "xstest": rec.XSTestPrompt, "truthfulqa": rec.TruthfulQAQuestion}


def _encode(kind: str, record: Any) -> dict[str, Any]:
  """Converts a record dataclass into a tfds example."""
  example = {name: getattr(record, name) for name in _COMMON}
  if kind == "dialogues":
    example.update(system=record.system, roles=[m.role for m in record.messages],
                   contents=[m.content for m in record.messages])
  elif kind == "pairs":
    example.update(context_roles=[m.role for m in record.context],
                   context_contents=[m.content for m in record.context], chosen=record.chosen,
                   rejected=record.rejected, rating=record.rating)
  elif kind == "prompts":
    example.update(text=record.text, is_safety=record.is_safety,
                   risk_category=record.risk_category)
  elif kind == "xstest":
    example.update(text=record.text, type=record.type, label=record.label, focus=record.focus,
                   note=record.note)
  else:
    example.update(question=record.question, best_answer=record.best_answer,
                   correct_answers=list(record.correct_answers),
                   incorrect_answers=list(record.incorrect_answers), category=record.category,
                   type=record.type)
  return example


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(values: Any) -> tuple[str, ...]:
  return tuple(_text(v) for v in values)


def _messages(roles: Any, contents: Any) -> tuple[Message, ...]:
  return tuple(Message(r, c) for r, c in zip(_texts(roles), _texts(contents)))


def decode_example(kind: str, example: dict[str, Any]) -> Any:
  """Converts a tfds example (bytes and numpy values) back into a record dataclass."""
  fields = {name: _text(example[name]) for name in _COMMON}
  if kind == "dialogues":
    fields.update(system=_text(example["system"]),
                  messages=_messages(example["roles"], example["contents"]))
  elif kind == "pairs":
    fields.update(context=_messages(example["context_roles"], example["context_contents"]),
                  chosen=_text(example["chosen"]), rejected=_text(example["rejected"]),
                  rating=int(example["rating"]))
  elif kind == "prompts":
    fields.update(text=_text(example["text"]), is_safety=bool(example["is_safety"]),
                  risk_category=_text(example["risk_category"]))
  elif kind == "xstest":
    fields.update({name: _text(example[name])
                   for name in ("text", "type", "label", "focus", "note")})
  else:
    fields.update(question=_text(example["question"]), best_answer=_text(example["best_answer"]),
                  correct_answers=_texts(example["correct_answers"]),
                  incorrect_answers=_texts(example["incorrect_answers"]),
                  category=_text(example["category"]), type=_text(example["type"]))
  return _RECORD_TYPES[kind](**fields)


def read_split_records(config: DatasetConfig) -> dict[str, list[Any]]:
  """Reads every source of a dataset and groups its records by split (without tfds)."""
  handler = BadRecordHandler(config.on_error)
  by_split: dict[str, list[Any]] = {split: [] for split in SPLITS}
  for source in config.resolved_sources():
    for record in read_source(config.kind, source, handler):
      if config.name in EVAL_ONLY:
        split = "test"
      else:
        split = assign_split(record.group, seed=config.split_seed,
                             validation_fraction=config.validation_fraction,
                             test_fraction=config.test_fraction)
      by_split[split].append(record)
  handler.log_summary(config.name)
  return by_split


class _RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the records of one `DatasetConfig` as array_record splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}

  def __init__(self, config: DatasetConfig):
    self._data_config = config
    sources = len(config.resolved_sources())
    builder_config = tfds.core.BuilderConfig(
        name=config.fingerprint(), description=f"{config.name} from {sources} source files")
    super().__init__(data_dir=config.data_dir, config=builder_config,
                     file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=f"llama2_jax {self._data_config.name} records.",
        features=tfds.features.FeaturesDict(_FEATURES[self._data_config.kind]))

  def _split_generators(self, dl_manager):
    del dl_manager  # Every source is a local file.
    by_split = read_split_records(self._data_config)
    return {split: self._generate_examples(records)
            for split, records in by_split.items() if records}

  def _generate_examples(self, records: Sequence[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for index, record in enumerate(records):
      # The index keeps keys unique even if a user's file repeats an id.
      yield f"{index}:{record.id}", _encode(self._data_config.kind, record)


def _builder_class(dataset_name: str) -> type[_RecordBuilder]:
  return type(f"Llama2Jax_{dataset_name}", (_RecordBuilder,),
              {"name": f"llama2_jax_{dataset_name}", "__module__": __name__},
              skip_registration=True)


BUILDERS = {name: _builder_class(name) for name in
            ("sft_dialogues", "helpfulness_pairs", "safety_pairs", "rl_prompts", "xstest",
             "truthfulqa")}


def prepare(config: DatasetConfig) -> _RecordBuilder:
  """Prepares the dataset if its fingerprinted directory does not exist yet, and returns it."""
  builder = BUILDERS[config.name](config)
  builder.download_and_prepare()
  logging.info("Dataset %s ready in %s: %s", config.name, builder.data_dir,
               {split: info.num_examples for split, info in builder.info.splits.items()})
  return builder


class RecordSource(Sequence[Any]):
  """Random access to the decoded records of one prepared split."""

  def __init__(self, data_source: Any, kind: str):
    self._data_source = data_source
    self._kind = kind

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> Any:
    if not -len(self) <= index < len(self):
      raise IndexError(f"Record index {index} is out of range for {len(self)} records.")
    return decode_example(self._kind, self._data_source[index % len(self)])

  def __iter__(self) -> Iterator[Any]:
    return (self[i] for i in range(len(self)))


def load(config: DatasetConfig, split: str) -> RecordSource:
  """Prepares the dataset if needed and returns one split as a `RecordSource`.

  A split with no records (possible for tiny inputs) is an empty source.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  builder = prepare(config)
  if split not in builder.info.splits:
    return RecordSource([], config.kind)
  return RecordSource(builder.as_data_source(split=split), config.kind)
