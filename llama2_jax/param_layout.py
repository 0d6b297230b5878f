"""Mapping between this project's parameter tree and Meta's and Hugging Face's tensor layouts.

Works on numpy arrays one tensor at a time: callers pass a function that reads one named tensor
(lazily, from a file), so a large checkpoint is never held twice in memory. File formats
(`consolidated.NN.pth`, safetensors) are read elsewhere.

Layouts of one layer's query projection, as an example:
  Meta `layers.{i}.attention.wq.weight`: [H * Dh, D], torch Linear (out, in), rotary pairs are
    adjacent rows (2j, 2j + 1) within each head.
  Hugging Face `model.layers.{i}.self_attn.q_proj.weight`: [H * Dh, D], the rows of each head
    permuted so that the first elements of all pairs come first, then the second elements (the
    layout of `rotate_half`), as done by transformers' `convert_llama_weights_to_hf.py`. Key
    projections are permuted the same way with the key/value head count.
  Here `params["layers"]["attention"]["wq"]`: [N, D, H, Dh], stacked over layers, Meta's pair
    order.
"""

from __future__ import annotations

from typing import Callable, Mapping

import ml_dtypes
import numpy as np

from llama2_jax.config import ModelConfig

TensorReader = Callable[[str], np.ndarray]

# numpy dtypes of the names in `config.DTYPES`; numpy has no bfloat16, ml_dtypes provides it.
NUMPY_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


class MissingTensorError(KeyError):
  """A tensor that the model config requires is not in the checkpoint."""

  def __str__(self) -> str:
    # KeyError's own __str__ quotes its message as a repr.
    return str(self.args[0]) if self.args else ""


def dtype_name(dtype) -> str:
  """Returns the name in `NUMPY_DTYPES` of a numpy dtype, or raises ValueError."""
  for name, candidate in NUMPY_DTYPES.items():
    if np.dtype(dtype) == candidate:
      return name
  raise ValueError(
      f"Tensors of dtype {np.dtype(dtype).name} are not supported; expected one of "
      f"{sorted(NUMPY_DTYPES)}.")


def numpy_dtype(name: str) -> np.dtype:
  """Returns the numpy dtype of a dtype name such as "bfloat16"."""
  if name not in NUMPY_DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; expected one of {sorted(NUMPY_DTYPES)}.")
  return NUMPY_DTYPES[name]


def meta_rows_to_hf(weight: np.ndarray, n_heads: int) -> np.ndarray:
  """Reorders the rows of a Meta q or k projection [n_heads * Dh, D] into Hugging Face's order."""
  out_dim, in_dim = weight.shape
  head_dim = out_dim // n_heads
  pairs = weight.reshape(n_heads, head_dim // 2, 2, in_dim)
  return pairs.transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def hf_rows_to_meta(weight: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of `meta_rows_to_hf`."""
  out_dim, in_dim = weight.shape
  head_dim = out_dim // n_heads
  halves = weight.reshape(n_heads, 2, head_dim // 2, in_dim)
  return halves.transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


# Per-layer tensors: (path in params["layers"], Meta name, Hugging Face name).
_LAYER_TENSORS = (
    (("attention", "wq"), "attention.wq.weight", "self_attn.q_proj.weight"),
    (("attention", "wk"), "attention.wk.weight", "self_attn.k_proj.weight"),
    (("attention", "wv"), "attention.wv.weight", "self_attn.v_proj.weight"),
    (("attention", "wo"), "attention.wo.weight", "self_attn.o_proj.weight"),
    (("feed_forward", "w1"), "feed_forward.w1.weight", "mlp.gate_proj.weight"),
    (("feed_forward", "w2"), "feed_forward.w2.weight", "mlp.down_proj.weight"),
    (("feed_forward", "w3"), "feed_forward.w3.weight", "mlp.up_proj.weight"),
    (("attention_norm", "scale"), "attention_norm.weight", "input_layernorm.weight"),
    (("ffn_norm", "scale"), "ffn_norm.weight", "post_attention_layernorm.weight"),
)

# Top-level tensors: (key in params, Meta name, Hugging Face name).
_TOP_TENSORS = (
    (("tok_embeddings",), "tok_embeddings.weight", "model.embed_tokens.weight"),
    (("norm", "scale"), "norm.weight", "model.norm.weight"),
    (("output",), "output.weight", "lm_head.weight"),
)


def _expected_meta_shape(path: tuple[str, ...], config: ModelConfig) -> tuple[int, ...]:
  D, F, V = config.dim, config.hidden_dim, config.vocab_size
  q_rows, kv_rows = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
  return {
      ("attention", "wq"): (q_rows, D), ("attention", "wk"): (kv_rows, D),
      ("attention", "wv"): (kv_rows, D), ("attention", "wo"): (D, q_rows),
      ("feed_forward", "w1"): (F, D), ("feed_forward", "w2"): (D, F),
      ("feed_forward", "w3"): (F, D), ("attention_norm", "scale"): (D,),
      ("ffn_norm", "scale"): (D,), ("tok_embeddings",): (V, D), ("norm", "scale"): (D,),
      ("output",): (V, D),
  }[path]


def _meta_to_internal(path, weight: np.ndarray, config: ModelConfig) -> np.ndarray:
  """Converts one Meta tensor (torch Linear layout) to this project's layout."""
  D, H, K, Dh = config.dim, config.n_heads, config.kv_heads, config.head_dim
  if path == ("attention", "wq"):
    return weight.T.reshape(D, H, Dh)
  if path in (("attention", "wk"), ("attention", "wv")):
    return weight.T.reshape(D, K, Dh)
  if path == ("attention", "wo"):
    return weight.T.reshape(H, Dh, D)
  if path in (("feed_forward", "w1"), ("feed_forward", "w2"), ("feed_forward", "w3"),
              ("output",)):
    return weight.T
  return weight  # Norm scales and the embedding table have the same layout.


def _internal_to_meta(path, weight: np.ndarray, config: ModelConfig) -> np.ndarray:
  if path in (("attention", "wq"), ("attention", "wk"), ("attention", "wv")):
    return weight.reshape(config.dim, -1).T
  if path == ("attention", "wo"):
    return weight.reshape(-1, config.dim).T
  if path in (("feed_forward", "w1"), ("feed_forward", "w2"), ("feed_forward", "w3"),
              ("output",)):
    return weight.T
  return weight


def _check_shape(name: str, weight: np.ndarray, expected: tuple[int, ...], config: ModelConfig):
  if tuple(weight.shape) != tuple(expected):
    raise ValueError(
        f"Tensor {name!r} has shape {tuple(weight.shape)} but the model config expects "
        f"{tuple(expected)} (dim={config.dim}, n_heads={config.n_heads}, "
        f"n_kv_heads={config.kv_heads}, hidden_dim={config.hidden_dim}, "
        f"vocab_size={config.vocab_size}). Check that the config matches the checkpoint.")


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _read_params(read: TensorReader, config: ModelConfig, hf: bool, dtype) -> dict:
  params: dict = {}
  n_layers = config.n_layers
  for path, meta_name, hf_name in _LAYER_TENSORS:
    stacked = None
    for layer in range(n_layers):
      name = f"model.layers.{layer}.{hf_name}" if hf else f"layers.{layer}.{meta_name}"
      weight = np.asarray(read(name))
      _check_shape(name, weight, _expected_meta_shape(path, config), config)
      if hf and path == ("attention", "wq"):
        weight = hf_rows_to_meta(weight, config.n_heads)
      elif hf and path == ("attention", "wk"):
        weight = hf_rows_to_meta(weight, config.kv_heads)
      weight = _meta_to_internal(path, weight, config)
      if stacked is None:
        stacked = np.empty((n_layers, *weight.shape), dtype)
      stacked[layer] = weight
    _set(params, ("layers", *path), stacked)
  for path, meta_name, hf_name in _TOP_TENSORS:
    name = hf_name if hf else meta_name
    weight = np.asarray(read(name))
    _check_shape(name, weight, _expected_meta_shape(path, config), config)
    _set(params, path, _meta_to_internal(path, weight, config).astype(dtype))
  return {"params": params}


def params_from_meta(read: TensorReader, config: ModelConfig, dtype=np.float32) -> dict:
  """Builds the parameter tree from Meta-named tensors, e.g. `layers.0.attention.wq.weight`.

  `read(name)` returns one tensor as a numpy array (already concatenated across model-parallel
  shards) and raises KeyError (such as `MissingTensorError`) when it is missing. The tensors are
  cast to `dtype`.
  """
  return _read_params(read, config, hf=False, dtype=dtype)


def params_from_hf(read: TensorReader, config: ModelConfig, dtype=np.float32) -> dict:
  """Builds the parameter tree from Hugging Face `LlamaForCausalLM` tensors."""
  return _read_params(read, config, hf=True, dtype=dtype)


def _iter_tensors(params: Mapping, config: ModelConfig, hf: bool):
  tree = params["params"] if "params" in params else params
  for path, meta_name, hf_name in _LAYER_TENSORS:
    stacked = _get(tree["layers"], path)
    for layer in range(config.n_layers):
      weight = _internal_to_meta(path, np.asarray(stacked[layer]), config)
      if hf and path == ("attention", "wq"):
        weight = meta_rows_to_hf(weight, config.n_heads)
      elif hf and path == ("attention", "wk"):
        weight = meta_rows_to_hf(weight, config.kv_heads)
      name = f"model.layers.{layer}.{hf_name}" if hf else f"layers.{layer}.{meta_name}"
      yield name, np.ascontiguousarray(weight)
  for path, meta_name, hf_name in _TOP_TENSORS:
    weight = _internal_to_meta(path, np.asarray(_get(tree, path)), config)
    yield (hf_name if hf else meta_name), np.ascontiguousarray(weight)


def iter_meta_tensors(params: Mapping, config: ModelConfig):
  """Yields (Meta name, numpy tensor) pairs one at a time, for streaming export."""
  yield from _iter_tensors(params, config, hf=False)


def iter_hf_tensors(params: Mapping, config: ModelConfig):
  """Yields (Hugging Face name, numpy tensor) pairs one at a time, for streaming export."""
  yield from _iter_tensors(params, config, hf=True)
