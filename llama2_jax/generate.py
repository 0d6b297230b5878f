"""Samples text from a checkpoint in Meta, Hugging Face or this project's orbax format.

  python -m llama2_jax.generate --checkpoint llama-2-7b-chat --chat \\
      --prompt "Name three rivers in Africa." --temperature 0.7 --max_new_tokens 64

Each --prompt is one row of the batch. With --chat, a prompt is wrapped in Llama 2's chat format
(`[INST] ... [/INST]`, with --system merged in as Meta's reference does); otherwise it is encoded
as plain text after BOS. The tokenizer is --tokenizer, or else the `tokenizer.model` found in the
checkpoint directory or its parent (where Meta's download puts it), or else this project's
shipped tokenizer.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

from absl import flags
from absl import logging
import jax
import numpy as np

from llama2_jax import chat
from llama2_jax import checkpoint_io
from llama2_jax import param_layout
from llama2_jax import sampling
from llama2_jax import tokenizer as tokenizer_lib
from llama2_jax.config import DTYPES, ModelConfig
from llama2_jax.model import Llama

TOKENIZER_FILE = "tokenizer.model"


def find_tokenizer(checkpoint: str | pathlib.Path) -> str:
  """Returns the tokenizer model beside a checkpoint, or the shipped one if there is none."""
  checkpoint = pathlib.Path(checkpoint)
  for candidate in (checkpoint / TOKENIZER_FILE, checkpoint.parent / TOKENIZER_FILE):
    if candidate.is_file():
      return str(candidate)
  logging.warning("No %s in %s or its parent; using this project's shipped tokenizer, which "
                  "suits only models trained with it. Pass --tokenizer otherwise.",
                  TOKENIZER_FILE, checkpoint)
  return tokenizer_lib.default_model_path()


def encode_prompts(tokenizer: tokenizer_lib.Tokenizer, prompts: Sequence[str], *,
                   use_chat: bool, system: str | None) -> list[list[int]]:
  """Encodes each prompt after BOS, wrapped in the Llama 2 chat format if `use_chat`."""
  if system is not None and not use_chat:
    raise ValueError("A system prompt needs the chat format (--chat).")
  rows = []
  for prompt in prompts:
    if use_chat:
      dialog = [chat.Message("user", prompt)]
      if system is not None:
        dialog.insert(0, chat.Message("system", system))
      rows.append(chat.encode_dialog_prompt(tokenizer, dialog))
    else:
      rows.append(tokenizer.encode(prompt, bos=True))
  return rows


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (tokens, mask), each [B, P] int32, with the rows left-padded to the longest."""
  length = max(len(row) for row in rows)
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for index, row in enumerate(rows):
    if row:
      tokens[index, length - len(row):] = row
      mask[index, length - len(row):] = 1
  return tokens, mask


def trim_vocabulary(config: ModelConfig, params, vocab_size: int):
  """Drops embedding rows and output columns past `vocab_size`; returns (config, params).

  Some checkpoints have more embedding rows than the tokenizer has pieces. The tokenizer never
  produces those ids, and dropping their output columns gives them zero probability, so
  sampling cannot return ids the tokenizer cannot decode.
  """
  if vocab_size == config.vocab_size:
    return config, params
  tree = dict(params["params"])
  tree["tok_embeddings"] = tree["tok_embeddings"][:vocab_size]
  tree["output"] = tree["output"][:, :vocab_size]
  return config.replace(vocab_size=vocab_size), {"params": tree}


def generate(config: ModelConfig, params, tokenizer: tokenizer_lib.Tokenizer,
             prompts: Sequence[str], *, use_chat: bool = False, system: str | None = None,
             max_new_tokens: int = 64, temperature: float = 0.7, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0) -> list[str]:
  """Samples one continuation per prompt and returns the decoded texts, without EOS.

  The model computes in the dtype of its parameters (`config.param_dtype`).
  """
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(
        f"The tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model only "
        f"{config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer).")
  config, params = trim_vocabulary(config, params, tokenizer.vocab_size)
  rows = encode_prompts(tokenizer, prompts, use_chat=use_chat, system=system)
  tokens_BxP, mask_BxP = left_pad(rows, tokenizer.pad_id)
  total = tokens_BxP.shape[1] + max_new_tokens
  if total > config.max_seq_len:
    raise ValueError(
        f"The longest prompt has {tokens_BxP.shape[1]} tokens; with max_new_tokens="
        f"{max_new_tokens} that is {total}, which exceeds the model's maximum sequence length "
        f"(max_seq_len={config.max_seq_len}). Shorten the prompt or lower max_new_tokens.")

  model = Llama(config.replace(dtype=config.param_dtype))
  output = sampling.sample(
      model, jax.device_put(params), tokens_BxP, mask_BxP, jax.random.key(seed),
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  tokens_BxT = np.asarray(output.tokens_BxT)
  lengths_B = np.asarray(output.lengths_B)
  texts = []
  for row, length in zip(tokens_BxT, lengths_B):
    ids = [int(token) for token in row[:length] if token != tokenizer.eos_id]
    texts.append(tokenizer.decode(ids))
  return texts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m llama2_jax.generate",
                                   description="Sample text from a Llama 2 checkpoint.")
  parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
  parser.add_argument("--format", choices=checkpoint_io.FORMATS, default=None,
                      help="format of --checkpoint (default: detected from its config file)")
  parser.add_argument("--tokenizer", default=None, help="SentencePiece .model file")
  parser.add_argument("--prompt", action="append", required=True,
                      help="text to continue; repeat the flag to sample a batch")
  parser.add_argument("--chat", action="store_true", help="wrap prompts in the chat format")
  parser.add_argument("--system", default=None, help="system prompt (with --chat)")
  parser.add_argument("--max_new_tokens", type=int, default=64,
                      help="maximum number of generated tokens per prompt")
  parser.add_argument("--temperature", type=float, default=0.7,
                      help="softmax temperature; 0 picks the most likely token (greedy)")
  parser.add_argument("--top_k", type=int, default=0,
                      help="sample from the k most likely tokens; 0 disables")
  parser.add_argument("--top_p", type=float, default=1.0,
                      help="nucleus sampling probability mass in (0, 1]; 1 disables")
  parser.add_argument("--seed", type=int, default=0, help="seed of the sampling PRNG key")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                      help="dtype of parameters and compute (default: the checkpoint's dtype)")
  args = parser.parse_args(argv)
  if args.system is not None and not args.chat:
    parser.error("--system needs --chat.")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  flags.FLAGS(sys.argv[:1])  # absl logging warns until its flags are parsed; none are used.
  logging.use_absl_handler()
  logging.set_verbosity(logging.WARNING)
  try:
    config, params = checkpoint_io.load_checkpoint(args.checkpoint, args.format, args.dtype)
    if "output" not in params["params"]:
      raise ValueError(
          f"{args.checkpoint} has no language-model head (params['output']), so it cannot "
          f"generate text; its parameters are {sorted(params['params'])}. A reward or value "
          "model scores text; pass a policy checkpoint instead.")
    tokenizer = tokenizer_lib.Tokenizer(args.tokenizer or find_tokenizer(args.checkpoint))
    logging.info("Loaded %s with %s.", config, tokenizer)
    texts = generate(config, params, tokenizer, args.prompt, use_chat=args.chat,
                     system=args.system, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     seed=args.seed)
  except (OSError, ValueError, ImportError, param_layout.MissingTensorError) as error:
    sys.exit(f"error: {error}")
  for prompt, text in zip(args.prompt, texts):
    if len(args.prompt) > 1:
      print(f"=== {prompt}")
    print(text)


if __name__ == "__main__":
  main()
