"""Trains the shipped 4,096-piece SentencePiece model on the train split of the shipped data.

  python -m llama2_jax.data.train_tokenizer --output llama2_jax/assets/tokenizer/llama2_jax_spm_4096.model

The training text is every message of the default SFT dialogues, helpfulness and safety pairs
and RL prompts whose prompt group falls in the train split (split seed 0, 5% validation, 5%
test). Each distinct line of text is one input sentence. Validation and test text never
reaches the tokenizer.

The trainer settings copy those stored in Meta's Llama 2 `tokenizer.model` (BPE, byte fallback,
digits split, whitespace-only pieces allowed, no whitespace normalisation, identity
normalisation, unk 0, BOS 1, EOS 2, no padding piece), except for the vocabulary size. One
thread, no sampling and no shuffling make the model file identical between runs on the same
SentencePiece version (0.2.x here).
"""

from __future__ import annotations

import argparse
import io
import os
from typing import Iterable, Iterator

import sentencepiece as spm

from llama2_jax.data.config import DatasetConfig
from llama2_jax.data.errors import BadRecordHandler
from llama2_jax.data.records import Dialogue, PreferencePair, Prompt
from llama2_jax.data.sources import read_source
from llama2_jax.data.splits import assign_split

VOCAB_SIZE = 4096
TRAINING_DATASETS = ("sft_dialogues", "helpfulness_pairs", "safety_pairs", "rl_prompts")


def _record_texts(record) -> Iterator[str]:
  if isinstance(record, Dialogue):
    yield record.system
    yield from (m.content for m in record.messages)
  elif isinstance(record, PreferencePair):
    yield from (m.content for m in record.context)
    yield record.chosen
    yield record.rejected
  elif isinstance(record, Prompt):
    yield record.text


def training_lines() -> list[str]:
  """Returns the deduplicated lines of train-split text of the shipped datasets, in order."""
  seen, lines = set(), []
  for name in TRAINING_DATASETS:
    # Only the default sources and split settings are used; nothing is written.
    config = DatasetConfig(name=name, data_dir=os.devnull)
    for source in config.resolved_sources():
      for record in read_source(config.kind, source, BadRecordHandler("raise")):
        split = assign_split(record.group, seed=config.split_seed,
                             validation_fraction=config.validation_fraction,
                             test_fraction=config.test_fraction)
        if split != "train":
          continue
        for text in _record_texts(record):
          for line in text.splitlines():
            if line.strip() and line not in seen:
              seen.add(line)
              lines.append(line)
  return lines


def train(lines: Iterable[str], output_path: str, vocab_size: int = VOCAB_SIZE) -> str:
  """Trains a Llama-2-style BPE model on the lines, writes it and returns its path.

  The lines go to the trainer through an iterator and the model comes back through a writer,
  so no temporary file name ends up in the model's stored trainer settings.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
      vocab_size=vocab_size, character_coverage=0.99995, byte_fallback=True, split_digits=True,
      allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
      normalization_rule_name="identity", add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
      max_sentence_length=16384, max_sentencepiece_length=16, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  with open(output_path, "wb") as f:
    f.write(model.getvalue())
  return output_path


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True, help="path of the .model file to write")
  parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE, help="number of pieces")
  args = parser.parse_args(argv)
  lines = training_lines()
  print(f"Training on {len(lines)} lines.")
  print(train(lines, args.output, args.vocab_size))


if __name__ == "__main__":
  main()
