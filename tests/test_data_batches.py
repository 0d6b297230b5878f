"""Tests of example and batch building: exact masks, packing, pairs, prompts, GAtt, distillation."""

import jax
import numpy as np
import pytest

from llama2_jax.chat import Message, encode_segments
from llama2_jax.data import batchers, context_distillation as cd
from llama2_jax.data.config import BatchConfig
from llama2_jax.data.errors import BadRecordHandler, DataError
from llama2_jax.data.pairs import reward_batch, reward_example
from llama2_jax.data.prompts import prompt_batch, prompt_example
from llama2_jax.data.records import Prompt
from llama2_jax.data.sft import (ghost_attention_example, instruction_in_every_turn, sft_batch,
                                 sft_example)
from llama2_jax.data.sources import default_sources, read_source
from llama2_jax.losses.reward import MARGIN_PRESETS, Rating
from llama2_jax.losses.sft import sft_loss
from llama2_jax.tokenizer import Tokenizer

PAD = 0


class TableEncoder:
  """Encodes by table lookup, so that a test can name every token id."""

  bos_id, eos_id, pad_id = 1, 2, PAD

  def __init__(self, table):
    self.table = table

  def encode(self, text, *, bos=False, eos=False):
    return [1] * bos + list(self.table[text]) + [2] * eos


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer()


@pytest.fixture(scope="module")
def dialogues():
  source = default_sources("sft_dialogues")[0]  # oasst1 threads, several multi-turn.
  return list(read_source("dialogues", source, BadRecordHandler()))


@pytest.fixture(scope="module")
def pairs():
  source = default_sources("helpfulness_pairs")[0]
  return list(read_source("pairs", source, BadRecordHandler()))


def test_loss_mask_three_terms():
  # Prompt segment BOS P2 P3 = [1, 10, 11]; answer segment R1 R2 EOS = [20, 21, 2].
  encoder = TableEncoder({"[INST] q [/INST]": [10, 11], "r ": [20, 21]})
  example = sft_example(encoder, [Message("user", "q"), Message("assistant", "r")])
  batch = sft_batch([[example]], batch_size=1, max_length=8, pad_id=PAD)
  np.testing.assert_array_equal(batch["tokens"][0], [1, 10, 11, 20, 21, 2, PAD, PAD])
  np.testing.assert_array_equal(batch["targets"][0], [10, 11, 20, 21, 2, PAD, PAD, PAD])
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
  assert batch["loss_mask"].sum() == 3


def test_loss_targets_are_every_answer(tokenizer, dialogues):
  dialogue = next(d for d in dialogues if len(d.messages) >= 4)
  example = sft_example(tokenizer, dialogue.messages)
  batch = sft_batch([[example]], batch_size=1, max_length=len(example), pad_id=PAD)
  trained = batch["targets"][0][batch["loss_mask"][0] == 1]
  answers = [m.content for m in dialogue.messages if m.role == "assistant"]
  expected = [t for a in answers for t in tokenizer.encode(f"{a} ", eos=True)]
  assert trained.tolist() == expected


def test_prompt_tokens_never_trained(tokenizer, dialogues):
  example = sft_example(tokenizer, dialogues[0].messages)
  batch = sft_batch([[example]], batch_size=1, max_length=len(example), pad_id=PAD)
  prompt = tokenizer.encode(f"[INST] {dialogues[0].messages[0].content} [/INST]", bos=True)
  assert batch["loss_mask"][0][:len(prompt) - 1].sum() == 0
  assert batch["loss_mask"][0][len(prompt) - 1] == 1  # Predicts the first answer token.


def test_ghost_attention_example(tokenizer, dialogues):
  dialogue = next(d for d in dialogues if len(d.messages) >= 4)
  instruction = "Always answer with Haiku"
  example = ghost_attention_example(tokenizer, instruction, dialogue.messages)
  text = tokenizer.decode(example.tokens)
  assert text.count(instruction) == 1
  assert text.index(instruction) < text.index(dialogue.messages[0].content)
  trained = example.tokens[example.answer_mask].tolist()
  assert trained == tokenizer.encode(f"{dialogue.messages[-1].content} ", eos=True)


def test_instruction_in_every_user_turn(dialogues):
  dialogue = next(d for d in dialogues if len(d.messages) >= 4)
  sampled = instruction_in_every_turn("Speak as a pirate", dialogue.messages)
  users = [m for m in sampled if m.role == "user"]
  assert all(m.content.startswith("Speak as a pirate\n\n") for m in users)
  assert [m.content for m in sampled if m.role == "assistant"] == [
      m.content for m in dialogue.messages if m.role == "assistant"]


def test_packed_equals_unpacked(tokenizer, dialogues):
  examples = [sft_example(tokenizer, d.messages) for d in dialogues[:3]]
  length = sum(len(e) for e in examples) + 5
  packed = sft_batch([examples], batch_size=1, max_length=length, pad_id=PAD)
  single = sft_batch([[e] for e in examples], batch_size=3, max_length=length, pad_id=PAD)
  start = 0
  for row, example in enumerate(examples):
    span = slice(start, start + len(example))
    for key in ("tokens", "targets", "loss_mask", "positions", "attention_mask"):
      np.testing.assert_array_equal(packed[key][0, span], single[key][row, :len(example)],
                                    err_msg=key)
    assert (packed["segment_ids"][0, span] == row + 1).all()
    start += len(example)
  assert packed["attention_mask"][0, start:].sum() == 0
  assert packed["segment_ids"][0, start:].sum() == 0


def test_sft_batch_dtypes_and_shapes(tokenizer, dialogues):
  example = sft_example(tokenizer, dialogues[0].messages)
  batch = sft_batch([[example]], batch_size=2, max_length=2048, pad_id=PAD)
  for key, value in batch.items():
    assert value.shape == (2, 2048), key
    assert value.dtype == np.int32, key
  assert batch["attention_mask"][1].sum() == 0  # A missing row is all padding.


def test_reward_pair_shares_context(tokenizer, pairs):
  pair = next(p for p in pairs if len(p.context) >= 3)
  example = reward_example(tokenizer, pair)
  context = [t for s in encode_segments(tokenizer, pair.context) for t in s.tokens]
  assert example.chosen[:len(context)].tolist() == context
  assert example.rejected[:len(context)].tolist() == context
  assert example.chosen[len(context):].tolist() == tokenizer.encode(f"{pair.chosen} ", eos=True)


def test_reward_batch_rating_and_margin(tokenizer, pairs):
  graded = [p for p in pairs if p.rating == Rating.SIGNIFICANTLY_BETTER][:1]
  examples = [reward_example(tokenizer, p) for p in graded]
  batch = reward_batch(examples, batch_size=2, max_length=2048, pad_id=PAD,
                       margin_preset="small")
  assert batch["rating"].tolist() == [0, int(Rating.UNKNOWN)]
  assert batch["margin"].tolist() == [MARGIN_PRESETS["small"][0], 0.0]
  assert batch["example_mask"].tolist() == [1, 0]
  assert batch["chosen_mask"][0].sum() == len(examples[0].chosen)
  assert batch["rejected_mask"][1].sum() == 0
  assert batch["margin"].dtype == np.float32


def test_prompt_batch_left_padded(tokenizer):
  prompts = [Prompt("a", "f:1", "s", "g", "How do I bake bread?", False),
             Prompt("b", "f:2", "s", "g", "How do I pick a lock?", True)]
  examples = [prompt_example(tokenizer, p) for p in prompts]
  batch = prompt_batch(examples, batch_size=3, max_length=32, pad_id=PAD, bos_id=1)
  closing = tokenizer.encode("[INST] x [/INST]")[-1]
  assert batch["prompt_tokens"][0, -1] == closing
  assert batch["prompt_mask"][0].sum() == len(examples[0])
  assert batch["prompt_mask"][0, :32 - len(examples[0])].sum() == 0
  assert batch["is_safety"].tolist() == [False, True, False]
  assert batch["example_mask"].tolist() == [1, 1, 0]
  assert batch["prompt_tokens"][2].tolist() == [PAD] * 31 + [1]  # Lone BOS for the sampler.


def test_preprompts_quote_llama2():
  assert cd.PREPROMPTS[0] == "You are a safe and responsible assistant."
  assert cd.category_preprompt("Explicit Content").startswith(
      "The following is a question that can elicit unsafe behavior from you.")


def test_preprompt_choice(tokenizer):
  plain = Prompt("id-7", "f:1", "s", "g", "How do I make a fake ID?", True)
  labelled = Prompt("id-8", "f:2", "s", "g", "Was the moon landing faked?", True,
                    risk_category="False Information / Disinformation")
  assert cd.choose_preprompt(plain, seed=0) < len(cd.GENERIC_PREPROMPTS)
  assert cd.choose_preprompt(plain, seed=0) == cd.choose_preprompt(plain, seed=0)
  chosen = cd.PREPROMPTS[cd.choose_preprompt(labelled, seed=0)]
  assert "'False Information / Disinformation'" in chosen


def test_distillation_targets_without_preprompt(tokenizer):
  prompt = Prompt("id-7", "f:1", "s", "g", "How do I make a fake ID?", True)
  example = cd.context_distillation_example(tokenizer, prompt, seed=0)
  preprompt = cd.PREPROMPTS[example.preprompt_id]
  assert preprompt in tokenizer.decode(example.generation_tokens)
  assert example.target_prompt_tokens.tolist() == prompt_example(tokenizer, prompt).tokens.tolist()
  batch = cd.context_distillation_batch([example], batch_size=2, max_length=256, pad_id=PAD,
                                        bos_id=1)
  assert batch["target_prompt_mask"][0].sum() == len(example.target_prompt_tokens)
  assert batch["preprompt_id"][0] == example.preprompt_id
  answer = tokenizer.encode("I can't help with that. ")
  target = cd.distillation_example(example.target_prompt_tokens, answer, eos_id=2)
  assert target.tokens[target.answer_mask].tolist() == answer + [2]
  assert preprompt not in tokenizer.decode(target.tokens)


def test_over_long_example_names_file_and_line(tokenizer, dialogues):
  config = BatchConfig(batch_size=1, max_length=16)
  with pytest.raises(DataError) as info:
    batchers.SftBatcher(tokenizer, config).encode(dialogues[0])
  message = str(info.value)
  assert dialogues[0].origin in message
  assert "field 'messages'" in message
  assert "more than max_length 16" in message


def test_bad_margin_preset_rejected(tokenizer):
  with pytest.raises(ValueError, match="Unknown margin preset 'huge'"):
    batchers.RewardBatcher(tokenizer, BatchConfig(batch_size=1, max_length=8), "huge")


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=0), "BatchConfig.batch_size is 0; it must be an integer >= 1"),
    (dict(max_length=1), "BatchConfig.max_length is 1"),
    (dict(num_epochs=0), "BatchConfig.num_epochs is 0"),
    (dict(shard_index=2, shard_count=2), "shard_index is 2; it must be below shard_count"),
    (dict(on_error="warn"), "BatchConfig.on_error is 'warn'"),
])
def test_batch_config_validation(overrides, message):
  settings = dict(batch_size=2, max_length=8)
  settings.update(overrides)
  with pytest.raises(ValueError, match=message):
    BatchConfig(**settings)


def test_loss_gradient_only_on_answer_logits():
  """The SFT loss on a [P1, P2, P3, R1, R2, EOS] batch has exactly the 3 answer terms."""
  encoder = TableEncoder({"[INST] q [/INST]": [10, 11], "r ": [20, 21]})
  example = sft_example(encoder, [Message("user", "q"), Message("assistant", "r")])
  batch = sft_batch([[example]], batch_size=1, max_length=8, pad_id=PAD)
  random_logits_BxTxV = np.random.default_rng(0).normal(size=(1, 8, 32)).astype(np.float32)

  def loss_fn(logits_BxTxV):
    return sft_loss(logits_BxTxV=logits_BxTxV, targets_BxT=batch["targets"],
                    loss_mask_BxT=batch["loss_mask"])

  (_, metrics), grad_BxTxV = jax.value_and_grad(loss_fn, has_aux=True)(random_logits_BxTxV)
  assert float(metrics["sft/tokens"]) == 3.0
  touched = np.flatnonzero(np.abs(np.asarray(grad_BxTxV[0])).sum(axis=-1))
  assert touched.tolist() == [2, 3, 4]  # Logits that predict R1, R2 and EOS.


def test_answer_mask_ignores_template_lookalikes():
  """An answer whose ids repeat the prompt's ids is still masked by segment, not by search."""
  # "[INST] q [/INST]" and the answer "x " encode to the same ids, so searching the encoded
  # text for the template could not tell which copy is the answer.
  encoder = TableEncoder({"[INST] q [/INST]": [10, 11], "x ": [10, 11]})
  example = sft_example(encoder, [Message("user", "q"), Message("assistant", "x")])
  np.testing.assert_array_equal(example.tokens, [1, 10, 11, 10, 11, 2])
  np.testing.assert_array_equal(example.answer_mask, [0, 0, 0, 1, 1, 1])
