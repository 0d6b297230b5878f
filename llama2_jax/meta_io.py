"""Reading Meta's Llama 2 checkpoints: `params.json` plus `consolidated.NN.pth`.

A Meta checkpoint directory (such as `llama-2-13b/`) contains:
  params.json: the architecture, e.g. {"dim": 5120, "multiple_of": 256, "n_heads": 40,
    "n_layers": 40, "norm_eps": 1e-05, "vocab_size": -1}. A vocab_size of -1 means the vocabulary
    is that of the tokenizer, so it is read from the embedding's shape here.
  consolidated.00.pth, consolidated.01.pth, ...: one torch state dict per model-parallel rank
    (1 file for 7B, 2 for 13B, 8 for 70B).

Meta's reference `llama/model.py` builds the layers with fairscale's model-parallel modules. Each
rank stores a slice of every tensor except the norms, split as follows:
  ColumnParallelLinear (wq, wk, wv, w1, w3, output) splits its output features, which are dim 0
    of the torch weight [out, in];
  RowParallelLinear (wo, w2) splits its input features, dim 1;
  ParallelEmbedding (tok_embeddings) splits the embedding width, dim 1 of [vocab, dim];
  RMSNorm weights are replicated, so rank 0's copy is used.
The full tensor is the concatenation of the ranks' slices in rank order along that axis. Names
outside the model, such as the `rope.freqs` buffer some checkpoints contain, are never read.

Shards are opened with `torch.load(mmap=True)`, so a tensor is read from disk only when it is
converted, and the whole checkpoint is never held twice in memory.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from llama2_jax import param_layout
from llama2_jax.config import ModelConfig

PARAMS_FILE = "params.json"

# Meta's ModelArgs fields that params.json may contain, mapped to ModelConfig fields.
_META_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len")

_SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")

_DIM0_SUFFIXES = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                  "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
_DIM1_SUFFIXES = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")


def import_torch():
  """Imports torch, which reading `.pth` files needs, or raises an ImportError saying how."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "Reading Meta checkpoints (consolidated.NN.pth) needs PyTorch, which is not installed. "
        "Install the CPU build with `pip install 'llama2_jax[meta]'` or "
        "`pip install torch --index-url https://download.pytorch.org/whl/cpu`.") from error
  return torch


def shard_axis(name: str) -> int | None:
  """Returns the axis along which Meta's ranks split tensor `name`, or None if replicated."""
  if name.endswith(_DIM0_SUFFIXES):
    return 0
  if name.endswith(_DIM1_SUFFIXES):
    return 1
  return None


def config_from_meta_params(params: Mapping[str, Any],
                            vocab_size: int | None = None) -> ModelConfig:
  """Builds a ModelConfig from the contents of a Meta `params.json`.

  Args:
    params: the parsed params.json.
    vocab_size: used when params.json gives a vocab_size of -1 (all Llama 2 releases do).

  Raises:
    ValueError: for a field this model does not implement (such as Llama 3.1's
      use_scaled_rope), or when the vocabulary size is unknown.
  """
  params = dict(params)
  if params.pop("use_scaled_rope", False):
    raise ValueError(
        "params.json sets use_scaled_rope (Llama 3.1 rotary scaling), which this model does not "
        "implement.")
  unknown = sorted(set(params) - set(_META_FIELDS))
  if unknown:
    raise ValueError(
        f"params.json has fields {unknown} that this model does not implement; known fields: "
        f"{list(_META_FIELDS)}.")
  if params.get("vocab_size", -1) <= 0:
    if vocab_size is None:
      raise ValueError(
          "params.json gives no vocabulary size (vocab_size is missing or -1); pass vocab_size, "
          "the number of rows of tok_embeddings.weight.")
    params["vocab_size"] = vocab_size
  return ModelConfig(**params)


def shard_paths(directory: str | pathlib.Path) -> list[pathlib.Path]:
  """Returns the `consolidated.NN.pth` files of a Meta checkpoint in rank order.

  Raises:
    FileNotFoundError: when there are none, or the ranks are not 00, 01, ... without gaps.
  """
  directory = pathlib.Path(directory)
  ranks = {}
  for path in directory.iterdir():
    match = _SHARD_PATTERN.fullmatch(path.name)
    if match:
      ranks[int(match.group(1))] = path
  if not ranks:
    raise FileNotFoundError(
        f"No consolidated.NN.pth files in {directory}; a Meta checkpoint directory contains "
        "params.json and consolidated.00.pth (plus .01, .02, ... for 13B and 70B).")
  missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
  if missing:
    raise FileNotFoundError(
        f"Meta checkpoint {directory} lacks the shards of ranks {missing}; found "
        f"{sorted(p.name for p in ranks.values())}.")
  return [ranks[rank] for rank in sorted(ranks)]


def _to_numpy(tensor) -> np.ndarray:
  """Converts a CPU torch tensor to numpy without copying, bfloat16 included."""
  torch = import_torch()
  if tensor.dtype == torch.bfloat16:
    # numpy has no bfloat16: reinterpret the bits as ml_dtypes' bfloat16.
    return tensor.view(torch.int16).numpy().view(param_layout.NUMPY_DTYPES["bfloat16"])
  return tensor.numpy()


class _ShardedReader:
  """Reads Meta tensors by name, concatenating the model-parallel slices of each."""

  def __init__(self, paths: list[pathlib.Path]):
    torch = import_torch()
    self.paths = paths
    self.shards = [torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                   for path in paths]

  def __call__(self, name: str) -> np.ndarray:
    for path, shard in zip(self.paths, self.shards):
      if name not in shard:
        raise param_layout.MissingTensorError(
            f"Tensor {name!r} is missing from {path}, which has {len(shard)} tensors. Check that "
            "params.json (n_layers) belongs to this checkpoint.")
    pieces = [_to_numpy(shard[name]) for shard in self.shards]
    axis = shard_axis(name)
    if axis is None or len(pieces) == 1:
      return pieces[0]
    try:
      return np.concatenate(pieces, axis=axis)
    except ValueError as error:
      shapes = [tuple(piece.shape) for piece in pieces]
      raise ValueError(
          f"The shards' slices of {name!r} have shapes {shapes}, which do not concatenate along "
          f"axis {axis}.") from error

  def embedding_slice(self):
    """Returns rank 0's slice of the embedding, whose rows are the whole vocabulary."""
    name = "tok_embeddings.weight"
    if name not in self.shards[0]:
      raise param_layout.MissingTensorError(f"Tensor {name!r} is missing from {self.paths[0]}.")
    return self.shards[0][name]


def load_meta(directory: str | pathlib.Path,
              param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """Reads a Meta checkpoint directory into this project's parameter tree.

  Args:
    directory: contains params.json and consolidated.NN.pth.
    param_dtype: dtype of the returned arrays, a name in `config.DTYPES`; None keeps the
      checkpoint's dtype (bfloat16 for Meta's releases). The tensors are converted one at a time.

  Returns:
    (config, {"params": tree of numpy arrays}), with `config.param_dtype` set to `param_dtype`.

  Raises:
    FileNotFoundError: the directory, params.json or the shards are missing.
    ValueError: params.json does not match the tensors; the message names the tensor and both
      shapes.
    MissingTensorError: a tensor the config requires is not in the checkpoint.
    ImportError: torch is not installed.
  """
  directory = pathlib.Path(directory)
  params_path = directory / PARAMS_FILE
  if not params_path.is_file():
    raise FileNotFoundError(
        f"{params_path} not found; a Meta checkpoint directory contains params.json and "
        "consolidated.NN.pth files.")
  meta_params = json.loads(params_path.read_text())
  reader = _ShardedReader(shard_paths(directory))
  embedding = reader.embedding_slice()
  if param_dtype is None:
    param_dtype = param_layout.dtype_name(_to_numpy(embedding).dtype)
  vocab_size = int(embedding.shape[0]) if meta_params.get("vocab_size", -1) <= 0 else None
  config = config_from_meta_params(meta_params, vocab_size).replace(param_dtype=param_dtype)
  params = param_layout.params_from_meta(reader, config, param_layout.numpy_dtype(param_dtype))
  return config, params
