"""Reading and writing Hugging Face `LlamaForCausalLM` checkpoints in safetensors format.

A Hugging Face checkpoint directory contains:
  config.json: `model_type` "llama" and the architecture (hidden_size, intermediate_size, ...).
  model.safetensors, or shards `model-00001-of-0000N.safetensors` listed in
    model.safetensors.index.json, whose "weight_map" maps each tensor name to its shard file.
Checkpoints saved only as `pytorch_model.bin` (pickle) are not read.

Tensors are read one at a time through safetensors' memory-mapped `safe_open`. Export writes
config.json and shards of at most `max_shard_bytes` (one tensor larger than that gets a shard of
its own) into a temporary directory that is renamed to the destination once complete. Only the
current shard's tensors are held in converted form.

Hugging Face permutes the rows of the query and key projections within each head
(`param_layout.meta_rows_to_hf`); the conversion undoes and redoes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Any, Iterable, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llama2_jax import _atomic
from llama2_jax import param_layout
from llama2_jax.config import ModelConfig

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# safetensors' dtype codes of the dtypes in `config.DTYPES`.
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

# config.json fields without a usable default; the rest default as in transformers' LlamaConfig.
_REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "vocab_size")


def _rope_theta(hf_config: Mapping[str, Any]) -> float:
  # transformers >= 5 stores rotary settings in `rope_parameters`; 4.x used top-level
  # `rope_theta` plus an optional `rope_scaling` dict.
  rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ValueError(
        f"config.json requests rotary scaling of type {rope_type!r}; this model implements only "
        "the default (unscaled) rotary embedding of Llama 2.")
  return float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
  """Builds a ModelConfig from the contents of a Hugging Face Llama `config.json`.

  Raises:
    ValueError: `model_type` is not "llama", the architecture is not LlamaForCausalLM, a
      required field is missing, or the config requests a variant this model does not
      implement (another activation, biases, rotary scaling).
  """
  model_type = hf_config.get("model_type")
  if model_type != "llama":
    raise ValueError(
        f"Unsupported model_type {model_type!r} in config.json; only Llama checkpoints "
        "(model_type 'llama', LlamaForCausalLM) can be imported.")
  architectures = hf_config.get("architectures") or ["LlamaForCausalLM"]
  if "LlamaForCausalLM" not in architectures:
    raise ValueError(
        f"config.json lists architectures {architectures}; only LlamaForCausalLM checkpoints, "
        "which have the language-model head lm_head.weight, can be imported.")
  missing = [name for name in _REQUIRED_FIELDS if name not in hf_config]
  if missing:
    raise ValueError(f"config.json is missing the fields {missing}.")
  unsupported = {
      "hidden_act": (hf_config.get("hidden_act", "silu"), "silu"),
      "attention_bias": (hf_config.get("attention_bias", False), False),
      "mlp_bias": (hf_config.get("mlp_bias", False), False),
  }
  for name, (value, supported) in unsupported.items():
    if value != supported:
      raise ValueError(
          f"config.json sets {name}={value!r}; this model implements only {name}={supported!r}.")

  n_heads = hf_config["num_attention_heads"]
  n_kv_heads = hf_config.get("num_key_value_heads") or n_heads
  head_dim = hf_config.get("head_dim")
  if head_dim is not None and head_dim != hf_config["hidden_size"] // n_heads:
    raise ValueError(
        f"config.json sets head_dim={head_dim}, but this model requires hidden_size / "
        f"num_attention_heads = {hf_config['hidden_size'] // n_heads}.")
  return ModelConfig(
      dim=hf_config["hidden_size"],
      n_layers=hf_config["num_hidden_layers"],
      n_heads=n_heads,
      n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads,
      vocab_size=hf_config["vocab_size"],
      ffn_hidden_dim=hf_config["intermediate_size"],
      norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
      rope_theta=_rope_theta(hf_config),
      max_seq_len=hf_config.get("max_position_embeddings", 2048))


def config_to_hf(config: ModelConfig, dtype: str) -> dict[str, Any]:
  """Returns the config.json of `LlamaForCausalLM` for `config`, with tensors in `dtype`."""
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "hidden_size": config.dim,
      "intermediate_size": config.hidden_dim,
      "num_hidden_layers": config.n_layers,
      "num_attention_heads": config.n_heads,
      "num_key_value_heads": config.kv_heads,
      "head_dim": config.head_dim,
      "vocab_size": config.vocab_size,
      "max_position_embeddings": config.max_seq_len,
      "rms_norm_eps": config.norm_eps,
      "hidden_act": "silu",
      "attention_bias": False,
      "mlp_bias": False,
      "tie_word_embeddings": False,
      # transformers 4.x reads rope_theta, 5.x reads rope_parameters.
      "rope_theta": config.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
      # Token ids of sentencepiece's defaults, which Llama 2's tokenizer uses.
      "bos_token_id": 1,
      "eos_token_id": 2,
      # transformers 4.x reads torch_dtype, 5.x reads dtype.
      "torch_dtype": dtype,
      "dtype": dtype,
  }


class _SafetensorsReader(contextlib.ExitStack):
  """Reads tensors by name from a directory's safetensors files, memory-mapped."""

  def __init__(self, directory: pathlib.Path):
    super().__init__()
    self.directory = directory
    index_path = directory / INDEX_FILE
    if index_path.is_file():
      self.weight_map = json.loads(index_path.read_text())["weight_map"]
      files = sorted(set(self.weight_map.values()))
      for file in files:
        if not (directory / file).is_file():
          raise FileNotFoundError(f"{directory / file}, listed in {index_path}, not found.")
    elif (directory / SINGLE_FILE).is_file():
      self.weight_map = None
      files = [SINGLE_FILE]
    else:
      pickles = sorted(path.name for path in directory.glob("*.bin"))
      hint = (f" It contains {pickles}, which are pickles; load them in transformers and save "
              "again with save_pretrained, which writes safetensors." if pickles else "")
      raise FileNotFoundError(
          f"Neither {SINGLE_FILE} nor {INDEX_FILE} found in {directory}.{hint}")
    self.handles = {file: safe_open(directory / file, framework="numpy") for file in files}
    for handle in self.handles.values():
      self.enter_context(handle)
    if self.weight_map is None:
      self.weight_map = {name: SINGLE_FILE for name in self.handles[SINGLE_FILE].keys()}

  def __call__(self, name: str) -> np.ndarray:
    file = self.weight_map.get(name)
    if file is None:
      raise param_layout.MissingTensorError(
          f"Tensor {name!r} not found in {self.directory} ({len(self.weight_map)} tensors). "
          "Check that config.json (num_hidden_layers) belongs to these weights.")
    return self.handles[file].get_tensor(name)

  def dtype_name(self, name: str) -> str:
    """Returns the dtype of tensor `name` as a name in `config.DTYPES`, without reading it."""
    if name not in self.weight_map:
      self(name)  # Raises MissingTensorError.
    stored = self.handles[self.weight_map[name]].get_slice(name).get_dtype()
    if stored not in _SAFETENSORS_DTYPES:
      raise ValueError(
          f"Tensor {name!r} in {self.directory} has dtype {stored}; expected one of "
          f"{sorted(_SAFETENSORS_DTYPES)}.")
    return _SAFETENSORS_DTYPES[stored]


def load_hf(directory: str | pathlib.Path,
            param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """Reads a Hugging Face Llama checkpoint directory into this project's parameter tree.

  Args:
    directory: contains config.json and model.safetensors (or shards plus their index).
    param_dtype: dtype of the returned arrays, a name in `config.DTYPES`; None keeps the
      dtype of the checkpoint's embedding.

  Returns:
    (config, {"params": tree of numpy arrays}), with `config.param_dtype` set to `param_dtype`.
    With `tie_word_embeddings`, the output projection is a copy of the embedding.

  Raises:
    FileNotFoundError: the directory, config.json or the safetensors files are missing.
    ValueError: an unsupported model type or variant, or config.json does not match the
      tensors; the message names the tensor and both shapes.
    MissingTensorError: a tensor the config requires is not in the checkpoint.
  """
  directory = pathlib.Path(directory)
  config_path = directory / CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(
        f"{config_path} not found; a Hugging Face checkpoint directory contains config.json and "
        f"{SINGLE_FILE} (or sharded safetensors files with {INDEX_FILE}).")
  hf_config = json.loads(config_path.read_text())
  config = config_from_hf(hf_config)

  with _SafetensorsReader(directory) as reader:
    if param_dtype is None:
      param_dtype = reader.dtype_name("model.embed_tokens.weight")
    config = config.replace(param_dtype=param_dtype)
    dtype = param_layout.numpy_dtype(param_dtype)
    read = reader
    if hf_config.get("tie_word_embeddings", False):
      read = lambda name: reader("model.embed_tokens.weight" if name == "lm_head.weight" else name)
    params = param_layout.params_from_hf(read, config, dtype)
  return config, params


def _write_shards(tensors: Iterable[tuple[str, np.ndarray]], directory: pathlib.Path,
                  max_shard_bytes: int) -> tuple[dict[str, str], int]:
  """Writes tensors in order into shards; returns (weight map, total bytes)."""
  shards: list[list[str]] = []
  weight_map: dict[str, str] = {}
  pending: dict[str, np.ndarray] = {}
  pending_bytes = total_bytes = 0

  def flush():
    shards.append(list(pending))
    save_file(pending, str(directory / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
    pending.clear()

  for name, tensor in tensors:
    if pending and pending_bytes + tensor.nbytes > max_shard_bytes:
      flush()
      pending_bytes = 0
    pending[name] = tensor
    pending_bytes += tensor.nbytes
    total_bytes += tensor.nbytes
  flush()

  for number, names in enumerate(shards, start=1):
    file = SINGLE_FILE if len(shards) == 1 else (
        f"model-{number:05d}-of-{len(shards):05d}.safetensors")
    os.rename(directory / f"shard-{number}.tmp", directory / file)
    weight_map.update({name: file for name in names})
  return weight_map, total_bytes


def save_hf(params: Mapping, config: ModelConfig, directory: str | pathlib.Path, *,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> None:
  """Writes `params` as a Hugging Face `LlamaForCausalLM` checkpoint, tensor by tensor.

  The tensors keep the dtype of the arrays in `params`. The directory appears complete or not
  at all (see `_atomic.atomic_directory`).

  Raises:
    FileExistsError: `directory` exists and `overwrite` is False.
    ValueError: `params` has no language-model head (a reward or value model).
  """
  tree = params["params"] if "params" in params else params
  if "output" not in tree:
    raise ValueError(
        "Hugging Face export writes LlamaForCausalLM and needs the language-model head "
        f"(params['output']); these parameters have {sorted(tree)}.")
  dtype = np.dtype(tree["tok_embeddings"].dtype).name
  with _atomic.atomic_directory(directory, overwrite) as temporary:
    weight_map, total_bytes = _write_shards(
        param_layout.iter_hf_tensors(params, config), temporary, max_shard_bytes)
    if len(set(weight_map.values())) > 1:
      index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
      (temporary / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (temporary / CONFIG_FILE).write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")
