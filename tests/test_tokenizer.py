"""Tests of the SentencePiece wrapper: special ids, byte fallback and the shipped model."""

import os

import pytest
import sentencepiece as spm

from llama2_jax.data import train_tokenizer
from llama2_jax.tokenizer import Tokenizer, default_model_path

LLAMA2_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                "llama2_tokenizer", "tokenizer.model")
needs_llama2_tokenizer = pytest.mark.skipif(
    not os.path.exists(LLAMA2_TOKENIZER),
    reason="Meta's Llama 2 tokenizer is not at ../shared/data/llama2_tokenizer/tokenizer.model")


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer()


def test_shipped_special_ids(tokenizer):
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 4096)
  assert tokenizer.id_to_piece(0) == "<unk>"
  assert tokenizer.id_to_piece(1) == "<s>"
  assert tokenizer.id_to_piece(2) == "</s>"


def test_encode_adds_bos_eos_on_request(tokenizer):
  plain = tokenizer.encode("Hello world")
  assert tokenizer.encode("Hello world", bos=True) == [1] + plain
  assert tokenizer.encode("Hello world", eos=True) == plain + [2]
  assert 1 not in plain
  assert 2 not in plain


def test_byte_fallback_round_trip(tokenizer):
  text = "Grüße, 日本語 and 🙂 survive."
  ids = tokenizer.encode(text)
  assert 0 not in ids  # No <unk>: unseen characters become byte pieces.
  assert tokenizer.decode(ids) == text
  assert any(tokenizer.id_to_piece(i).startswith("<0x") for i in ids)


def test_missing_model_names_path(tmp_path):
  path = tmp_path / "absent.model"
  with pytest.raises(FileNotFoundError, match="absent.model"):
    Tokenizer(path)


@pytest.mark.parametrize("ids, message", [
    (dict(unk_id=0, bos_id=-1, eos_id=1), "bos_id=1"),
    (dict(unk_id=0, bos_id=1, eos_id=2), "byte_fallback=true"),
])
def test_rejects_model_unlike_llama(tmp_path, ids, message):
  text = tmp_path / "text.txt"
  text.write_text("\n".join(f"line number {i} of some text" for i in range(200)))
  prefix = str(tmp_path / "other")
  spm.SentencePieceTrainer.train(input=str(text), model_prefix=prefix, vocab_size=40,
                                 minloglevel=2, **ids)
  with pytest.raises(ValueError, match=message):
    Tokenizer(prefix + ".model")


def test_shipped_model_is_reproducible(tmp_path):
  rebuilt = train_tokenizer.train(train_tokenizer.training_lines(), str(tmp_path / "t.model"))
  with open(rebuilt, "rb") as f, open(default_model_path(), "rb") as g:
    assert f.read() == g.read(), (
        "The shipped tokenizer differs from a rebuild; rerun python -m "
        "llama2_jax.data.train_tokenizer if the shipped training text changed on purpose.")


@needs_llama2_tokenizer
def test_llama2_tokenizer_ids():
  tokenizer = Tokenizer(LLAMA2_TOKENIZER)
  assert tokenizer.vocab_size == 32000
  assert tokenizer.encode("Hello", bos=True) == [1, 15043]
  assert tokenizer.pad_id == 0
