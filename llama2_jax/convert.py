"""Converts a checkpoint between Meta, Hugging Face and this project's orbax format.

  python -m llama2_jax.convert --from meta --to hf llama-2-7b llama-2-7b-hf
  python -m llama2_jax.convert --from hf --to orbax llama-2-7b-hf llama-2-7b-orbax
  python -m llama2_jax.convert --from orbax --to hf --dtype bfloat16 sft-final sft-final-hf

The formats are described in `llama2_jax.checkpoint_io`; Meta's format can be read but not
written. The source is read tensor by tensor into one host copy of the parameters, in --dtype
(by default the source's dtype). That copy is then written to a temporary directory, which is
renamed to the destination once complete.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from absl import flags
from absl import logging

from llama2_jax import checkpoint_io
from llama2_jax import param_layout
from llama2_jax.config import DTYPES, ModelConfig


def convert(source: str | pathlib.Path, destination: str | pathlib.Path, *, source_format: str,
            target_format: str, param_dtype: str | None = None,
            overwrite: bool = False) -> ModelConfig:
  """Reads the checkpoint at `source` and writes it to `destination`; returns its config."""
  start = time.perf_counter()
  config, params = checkpoint_io.load_checkpoint(source, source_format, param_dtype)
  logging.info("Read %s checkpoint %s in %.1f s: %s, %s parameters.", source_format, source,
               time.perf_counter() - start, config, f"{config.num_params():,}")

  start = time.perf_counter()
  checkpoint_io.save_checkpoint(params, config, destination, target_format, overwrite=overwrite)
  logging.info("Wrote %s checkpoint %s in %.1f s.", target_format, destination,
               time.perf_counter() - start)
  return config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m llama2_jax.convert",
      description="Convert a Llama 2 checkpoint directory between formats.")
  parser.add_argument("--from", dest="source_format", required=True,
                      choices=checkpoint_io.FORMATS, help="format of SOURCE")
  parser.add_argument("--to", dest="target_format", required=True,
                      choices=checkpoint_io.WRITABLE_FORMATS, help="format to write DESTINATION in")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                      help="dtype of the written tensors (default: the dtype of SOURCE)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace DESTINATION if it exists")
  parser.add_argument("source", metavar="SOURCE", help="checkpoint directory to read")
  parser.add_argument("destination", metavar="DESTINATION", help="directory to create")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  flags.FLAGS(sys.argv[:1])  # absl logging warns until its flags are parsed; none are used.
  logging.use_absl_handler()
  logging.set_verbosity(logging.WARNING)
  try:
    convert(args.source, args.destination, source_format=args.source_format,
            target_format=args.target_format, param_dtype=args.dtype, overwrite=args.overwrite)
  except (OSError, ValueError, ImportError, param_layout.MissingTensorError) as error:
    sys.exit(f"error: {error}")
  print(f"Wrote {args.destination} ({args.target_format}).")


if __name__ == "__main__":
  main()
