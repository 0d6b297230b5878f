"""The Llama 2 chat format, as Meta's reference `Llama.chat_completion` builds it.

A dialogue is a list of messages with roles "system" (optional, first), "user" and "assistant",
alternating user, assistant, user, ... Meta's reference (meta-llama/llama, `llama/generation.py`)
turns it into token ids like this:

  * A system message is merged into the first user message as
    `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}`.
  * Each completed exchange is BOS + encode(f"[INST] {user} [/INST] {answer} ") + EOS, with user
    and answer stripped of surrounding whitespace.
  * A final user message is BOS + encode(f"[INST] {user} [/INST]"), the prompt for generation.
  * Each of those pieces is encoded on its own and the ids are concatenated.

For training, `encode_segments` splits each exchange once more, into the prompt
BOS + encode(f"[INST] {user} [/INST]") and the answer encode(f"{answer} ") + EOS. The answer's
SentencePiece dummy prefix stands for the space after `[/INST]`, and SentencePiece never merges
pieces across a space, so the two halves concatenate to the same ids as the whole exchange
(tests check this with Meta's tokenizer). The answer mask comes from that split, never from
searching for template ids in encoded text.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol, Sequence, Union

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")

ROLES = ("system", "user", "assistant")


class TextEncoder(Protocol):
  """The part of `llama2_jax.tokenizer.Tokenizer` that this module needs."""

  eos_id: int

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    ...


@dataclasses.dataclass(frozen=True)
class Message:
  """One turn of a dialogue: role is "system", "user" or "assistant"."""

  role: str
  content: str


MessageLike = Union[Message, Mapping[str, str]]


@dataclasses.dataclass(frozen=True)
class Segment:
  """Token ids of one separately encoded piece of a dialogue.

  Attributes:
    tokens: the ids.
    is_answer: True for an assistant answer (its text, trailing space and EOS), which is what
      supervised fine-tuning trains on.
    turn: index of the exchange the segment belongs to (0 for the first user message).
  """

  tokens: tuple[int, ...]
  is_answer: bool
  turn: int


class ChatFormatError(ValueError):
  """A dialogue that the Llama 2 chat format cannot encode."""


def as_message(message: MessageLike) -> Message:
  """Converts a `{"role": ..., "content": ...}` mapping (Meta's format) into a `Message`."""
  if isinstance(message, Message):
    return message
  return Message(role=message["role"], content=message["content"])


def merge_system_message(dialog: Sequence[MessageLike]) -> list[Message]:
  """Validates a dialogue and merges a leading system message into the first user message.

  Raises:
    ChatFormatError: if a role is unknown, the roles do not alternate user, assistant, ...
      after the optional system message, a content is not a string, or a content contains one
      of `SPECIAL_TAGS` (Meta's reference rejects those too, because they would let a user
      inject instructions).
  """
  messages = [as_message(m) for m in dialog]
  for index, message in enumerate(messages):
    if message.role not in ROLES:
      raise ChatFormatError(f"Message {index} has role {message.role!r}; expected one of {ROLES}.")
    if not isinstance(message.content, str):
      raise ChatFormatError(
          f"Message {index} content must be a string, got {type(message.content).__name__}.")
    for tag in SPECIAL_TAGS:
      if tag in message.content:
        raise ChatFormatError(
            f"Message {index} ({message.role}) contains the special tag {tag!r}, which the Llama 2 "
            "chat format reserves. Remove it from the text.")

  if messages and messages[0].role == "system":
    if len(messages) < 2:
      raise ChatFormatError("A system message must be followed by a user message.")
    first_user = messages[1]
    merged = B_SYS + messages[0].content + E_SYS + first_user.content
    messages = [Message(first_user.role, merged)] + messages[2:]

  if not messages:
    raise ChatFormatError("The dialogue has no user message.")
  for index, message in enumerate(messages):
    expected = "user" if index % 2 == 0 else "assistant"
    if message.role != expected:
      raise ChatFormatError(
          f"Message {index} (after merging the system message) has role {message.role!r}, "
          f"expected {expected!r}: roles must alternate user, assistant, user, ...")
  return messages


def _prompt_text(user: Message) -> str:
  return f"{B_INST} {user.content.strip()} {E_INST}"


def encode_dialog_prompt(tokenizer: TextEncoder, dialog: Sequence[MessageLike]) -> list[int]:
  """Encodes a dialogue that ends with a user message, exactly as Meta's `chat_completion`.

  Returns:
    The prompt ids for generation: one BOS ... EOS piece per completed exchange, then
    BOS + encode("[INST] {user} [/INST]").

  Raises:
    ChatFormatError: for the reasons of `merge_system_message`, or if the last message is not
      from the user.
  """
  messages = merge_system_message(dialog)
  if messages[-1].role != "user":
    raise ChatFormatError(
        f"The last message must be from the user to build a prompt, got {messages[-1].role!r}.")

  tokens: list[int] = []
  for user, answer in zip(messages[:-1:2], messages[1::2]):
    text = f"{_prompt_text(user)} {answer.content.strip()} "
    tokens += tokenizer.encode(text, bos=True, eos=True)
  tokens += tokenizer.encode(_prompt_text(messages[-1]), bos=True, eos=False)
  return tokens


def encode_segments(tokenizer: TextEncoder, dialog: Sequence[MessageLike]) -> list[Segment]:
  """Encodes a dialogue into alternating prompt and answer segments for training.

  A dialogue that ends with an assistant message yields prompt, answer, prompt, answer, ...;
  one that ends with a user message ends with that prompt segment. The concatenated ids equal
  Meta's encoding of the same exchanges.

  Raises:
    ChatFormatError: for the reasons of `merge_system_message`, or if an answer is empty
      after stripping.
  """
  messages = merge_system_message(dialog)
  segments = []
  for index, message in enumerate(messages):
    turn = index // 2
    if message.role == "user":
      tokens = tokenizer.encode(_prompt_text(message), bos=True, eos=False)
      segments.append(Segment(tuple(tokens), is_answer=False, turn=turn))
      continue
    answer = message.content.strip()
    if not answer:
      raise ChatFormatError(f"Message {index} (assistant) is empty.")
    tokens = tokenizer.encode(f"{answer} ", bos=False, eos=True)
    segments.append(Segment(tuple(tokens), is_answer=True, turn=turn))
  return segments
