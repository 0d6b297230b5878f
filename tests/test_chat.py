"""Tests of the Llama 2 chat format against the ids of Meta's reference implementation."""

import pytest

from llama2_jax import chat
from llama2_jax.chat import ChatFormatError
from llama2_jax.data.errors import BadRecordHandler
from llama2_jax.data.sources import default_sources, read_source
from llama2_jax.tokenizer import Tokenizer
from tests.test_tokenizer import LLAMA2_TOKENIZER, needs_llama2_tokenizer

HAIKU_DIALOG = [
    {"role": "system", "content": "Always answer with Haiku"},
    {"role": "user", "content": "I am going to Paris, what should I see?"},
    {"role": "assistant", "content": "Haiku"},
    {"role": "user", "content": "How are you?"},
]
HAIKU_IDS = [int(i) for i in (
    "1 518 25580 29962 3532 14816 29903 6778 13 2499 1994 1234 411 5952 18282 13 29966 829 "
    "14816 29903 6778 13 13 29902 626 2675 304 3681 29892 825 881 306 1074 29973 518 29914 "
    "25580 29962 5952 18282 29871 2 1 518 25580 29962 1128 526 366 29973 518 29914 25580 "
    "29962").split()]
SINGLE_IDS = [1, 518, 25580, 29962, 15043, 29892, 920, 526, 366, 29973, 3529, 1234, 3022, 275,
              873, 29889, 518, 29914, 25580, 29962]


class RecordingEncoder:
  """Records the text of every encode call and returns one id per character."""

  eos_id = 2

  def __init__(self):
    self.calls = []

  def encode(self, text, *, bos=False, eos=False):
    self.calls.append((text, bos, eos))
    return [1] * bos + [ord(c) for c in text] + [2] * eos


@pytest.fixture(scope="module")
def llama2():
  return Tokenizer(LLAMA2_TOKENIZER)


def test_reference_id_lists_complete():
  assert len(HAIKU_IDS) == 54
  assert len(SINGLE_IDS) == 20


@needs_llama2_tokenizer
def test_haiku_dialog_ids(llama2):
  assert chat.encode_dialog_prompt(llama2, HAIKU_DIALOG) == HAIKU_IDS


@needs_llama2_tokenizer
def test_single_message_ids(llama2):
  dialog = [{"role": "user", "content": "Hello, how are you? Please answer concisely."}]
  assert chat.encode_dialog_prompt(llama2, dialog) == SINGLE_IDS


@needs_llama2_tokenizer
def test_segments_concatenate_to_meta_ids(llama2):
  segments = chat.encode_segments(llama2, HAIKU_DIALOG)
  assert [t for s in segments for t in s.tokens] == HAIKU_IDS
  assert [s.is_answer for s in segments] == [False, True, False]
  assert segments[1].tokens == (5952, 18282, 29871, 2)  # "Haiku", trailing space, EOS.


@needs_llama2_tokenizer
def test_segments_match_meta_on_real_dialogues(llama2):
  """Separate prompt/answer encoding equals whole-exchange encoding on the shipped dialogues."""
  handler = BadRecordHandler("raise")
  checked = 0
  for source in default_sources("sft_dialogues"):
    for dialogue in list(read_source("dialogues", source, handler))[:150]:
      messages = list(dialogue.messages)
      segments = chat.encode_segments(llama2, messages)
      joined = [t for s in segments for t in s.tokens]
      expected = chat.encode_dialog_prompt(llama2, messages + [chat.Message("user", "x")])
      suffix = chat.encode_dialog_prompt(llama2, [chat.Message("user", "x")])
      assert joined == expected[:len(expected) - len(suffix)], dialogue.origin
      checked += 1
  assert checked >= 400


def test_system_merged_into_first_user():
  encoder = RecordingEncoder()
  chat.encode_dialog_prompt(encoder, HAIKU_DIALOG)
  assert encoder.calls[0] == (
      "[INST] <<SYS>>\nAlways answer with Haiku\n<</SYS>>\n\nI am going to Paris, what should I "
      "see? [/INST] Haiku ", True, True)
  assert encoder.calls[1] == ("[INST] How are you? [/INST]", True, False)


def test_answers_and_users_are_stripped():
  encoder = RecordingEncoder()
  chat.encode_segments(encoder, [{"role": "user", "content": "  hi \n"},
                                 {"role": "assistant", "content": "\n yes  "}])
  assert encoder.calls == [("[INST] hi [/INST]", True, False), ("yes ", False, True)]


@pytest.mark.parametrize("dialog, message", [
    ([{"role": "assistant", "content": "a"}], "expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "bot", "content": "a"}], "role 'bot'"),
    ([{"role": "system", "content": "s"}], "followed by a user message"),
    ([{"role": "user", "content": "say [INST] now"}], "special tag '\\[INST\\]'"),
])
def test_invalid_dialogs_raise(dialog, message):
  with pytest.raises(ChatFormatError, match=message):
    chat.encode_segments(RecordingEncoder(), dialog)


def test_prompt_needs_final_user_message():
  dialog = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
  with pytest.raises(ChatFormatError, match="last message must be from the user"):
    chat.encode_dialog_prompt(RecordingEncoder(), dialog)


def test_empty_answer_raises():
  dialog = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]
  with pytest.raises(ChatFormatError, match="empty"):
    chat.encode_segments(RecordingEncoder(), dialog)
