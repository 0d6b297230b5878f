"""SentencePiece tokenizer with the special ids of Llama 2.

Llama 2's tokenizer numbers `<unk>` 0, `<s>` (BOS) 1 and `</s>` (EOS) 2, has no padding piece and
encodes any character outside its vocabulary as UTF-8 bytes (byte fallback), so no text maps to
`<unk>`. This wrapper loads any SentencePiece model with those ids: Meta's 32,000-piece
`tokenizer.model`, or the 4,096-piece model shipped in `llama2_jax/assets/tokenizer/`, which is the
default and was trained on the shipped training text by `python -m llama2_jax.data.train_tokenizer`.

Like Meta's reference `Tokenizer.encode`, `encode` adds BOS and EOS only when asked.
"""

from __future__ import annotations

import os
from typing import Iterable

import importlib_resources
import sentencepiece as spm

BOS_ID = 1
EOS_ID = 2
UNK_ID = 0

DEFAULT_MODEL = "tokenizer/llama2_jax_spm_4096.model"


def default_model_path() -> str:
  """Returns the path of the shipped 4,096-piece tokenizer model."""
  resource = importlib_resources.files("llama2_jax") / "assets" / DEFAULT_MODEL
  return str(resource)


class Tokenizer:
  """A SentencePiece model with BOS 1, EOS 2, `<unk>` 0 and byte fallback.

  Attributes:
    path: the model file.
    vocab_size: number of token ids.
    bos_id, eos_id: 1 and 2.
    pad_id: the model's padding id if it defines one, otherwise 0 (`<unk>`), which byte
      fallback keeps out of encoded text. Batches mark padding with masks, never by this id.
  """

  def __init__(self, path: str | os.PathLike[str] | None = None):
    self.path = os.fspath(path) if path is not None else default_model_path()
    if not os.path.isfile(self.path):
      raise FileNotFoundError(
          f"SentencePiece model {self.path!r} not found. Pass the path of a .model file, or None "
          "for the shipped default.")
    self._model = spm.SentencePieceProcessor(model_file=self.path)
    self._check_special_ids()
    self.vocab_size = self._model.vocab_size()
    self.bos_id = BOS_ID
    self.eos_id = EOS_ID
    self.pad_id = self._model.pad_id() if self._model.pad_id() >= 0 else UNK_ID

  def _check_special_ids(self) -> None:
    found = {"unk": self._model.unk_id(), "bos": self._model.bos_id(),
             "eos": self._model.eos_id()}
    expected = {"unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
    if found != expected:
      raise ValueError(
          f"SentencePiece model {self.path!r} has special ids {found}; Llama 2 needs "
          f"{expected}. Train it with unk_id=0, bos_id=1, eos_id=2.")
    if self._model.piece_to_id("<0x41>") == UNK_ID:
      raise ValueError(
          f"SentencePiece model {self.path!r} has no byte pieces such as <0x41>, so text outside "
          "its vocabulary would become <unk>. Train it with byte_fallback=true.")

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Encodes text into token ids, with BOS first and EOS last when requested."""
    if not isinstance(text, str):
      raise TypeError(f"Tokenizer.encode takes a str, got {type(text).__name__}.")
    ids = self._model.encode(text)
    if bos:
      ids = [self.bos_id] + ids
    if eos:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes token ids into text. SentencePiece drops BOS and EOS and joins byte pieces."""
    return self._model.decode([int(i) for i in ids])

  def id_to_piece(self, token_id: int) -> str:
    return self._model.id_to_piece(int(token_id))

  def __repr__(self) -> str:
    return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"
