"""Loading and saving model parameters in Meta, Hugging Face and this project's orbax format.

Formats, each a directory:
  meta: params.json and consolidated.NN.pth, Meta's release format; read only (`meta_io`).
  hf: a Hugging Face `LlamaForCausalLM` checkpoint, config.json plus safetensors (`hf_io`).
  orbax: model_config.json (the `ModelConfig` fields) plus params/, the parameter tree saved
    with orbax-checkpoint's `StandardCheckpointer`. It contains parameters only. Training states
    (optimizer state, step, data position) have their own checkpoints.

Loaded parameters are trees of host numpy arrays, {"params": {...}}, as `Llama.apply` takes them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llama2_jax import _atomic
from llama2_jax import hf_io
from llama2_jax import meta_io
from llama2_jax import param_layout
from llama2_jax.config import ModelConfig
from llama2_jax.model import Llama

FORMATS = ("meta", "hf", "orbax")
WRITABLE_FORMATS = ("hf", "orbax")
MODEL_CONFIG_FILE = "model_config.json"
ORBAX_PARAMS_DIR = "params"

# The file that marks a directory of each format.
_MARKER_FILES = {
    "meta": meta_io.PARAMS_FILE, "hf": hf_io.CONFIG_FILE, "orbax": MODEL_CONFIG_FILE}


def detect_format(directory: str | pathlib.Path) -> str:
  """Returns the format of a checkpoint directory, from the config file it contains."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"Checkpoint directory {directory} not found.")
  found = [fmt for fmt, marker in _MARKER_FILES.items() if (directory / marker).is_file()]
  if len(found) != 1:
    expected = ", ".join(f"{marker} ({fmt})" for fmt, marker in _MARKER_FILES.items())
    raise ValueError(
        f"Cannot tell the format of {directory}: it should contain exactly one of {expected}, "
        f"found {len(found)}. Pass the format explicitly.")
  return found[0]


def _expected_shapes(config: ModelConfig, head: str) -> dict[str, tuple[int, ...]]:
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  abstract = nn.unbox(
      jax.eval_shape(lambda: Llama(config, head=head).init(jax.random.key(0), tokens)))
  return {jax.tree_util.keystr(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


def _check_tree(params: Mapping, config: ModelConfig, source: pathlib.Path) -> None:
  """Raises ValueError unless `params` has the names and shapes that `config` implies."""
  head = "lm" if "output" in params["params"] else "reward"
  expected = _expected_shapes(config, head)
  found = {jax.tree_util.keystr(path): tuple(np.shape(leaf))
           for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  for name in sorted(set(expected) | set(found)):
    if name not in found:
      raise param_layout.MissingTensorError(f"Parameter {name} is missing from {source}.")
    if name not in expected:
      raise ValueError(f"{source} has parameter {name}, which the model config does not define.")
    if found[name] != expected[name]:
      raise ValueError(
          f"Parameter {name} in {source} has shape {found[name]} but {MODEL_CONFIG_FILE} "
          f"implies {expected[name]}.")


def save_orbax(params: Mapping, config: ModelConfig, directory: str | pathlib.Path, *,
               overwrite: bool = False) -> None:
  """Saves parameters and their config in this project's orbax format, atomically.

  The saved config's param_dtype is the dtype of the arrays.

  NOTE: written for one process. On several hosts every host would write the same directory.
  """
  if "params" not in params:
    params = {"params": params}
  tree = params["params"]
  config = config.replace(param_dtype=param_layout.dtype_name(tree["tok_embeddings"].dtype))
  with _atomic.atomic_directory(directory, overwrite) as temporary:
    fields = dataclasses.asdict(config)
    (temporary / MODEL_CONFIG_FILE).write_text(json.dumps(fields, indent=2) + "\n")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(temporary / ORBAX_PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    checkpointer.close()


def load_orbax(directory: str | pathlib.Path,
               param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """Loads parameters saved by `save_orbax` as numpy arrays, cast to `param_dtype` if given."""
  directory = pathlib.Path(directory).absolute()
  config_path = directory / MODEL_CONFIG_FILE
  params_path = directory / ORBAX_PARAMS_DIR
  for path in (config_path, params_path):
    if not path.exists():
      raise FileNotFoundError(
          f"{path} not found; a checkpoint in orbax format contains {MODEL_CONFIG_FILE} and the "
          f"orbax checkpoint {ORBAX_PARAMS_DIR}/.")
  config = ModelConfig(**json.loads(config_path.read_text()))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(params_path)
  _check_tree(params, config, directory)
  if param_dtype is not None:
    dtype = param_layout.numpy_dtype(param_dtype)
    params = jax.tree.map(lambda leaf: np.asarray(leaf).astype(dtype, copy=False), params)
    config = config.replace(param_dtype=param_dtype)
  return config, params


def load_checkpoint(directory: str | pathlib.Path, fmt: str | None = None,
                    param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """Loads a checkpoint of any format in `FORMATS` (detected when `fmt` is None).

  Returns:
    (config, {"params": tree of numpy arrays}), in `param_dtype`, or in the checkpoint's dtype
    when it is None; `config.param_dtype` is set to that dtype.
  """
  fmt = fmt or detect_format(directory)
  if fmt == "meta":
    return meta_io.load_meta(directory, param_dtype)
  if fmt == "hf":
    return hf_io.load_hf(directory, param_dtype)
  if fmt == "orbax":
    return load_orbax(directory, param_dtype)
  raise ValueError(f"Unknown checkpoint format {fmt!r}; expected one of {FORMATS}.")


def save_checkpoint(params: Mapping, config: ModelConfig, directory: str | pathlib.Path,
                    fmt: str, *, overwrite: bool = False) -> None:
  """Saves parameters in a format of `WRITABLE_FORMATS`, keeping their dtype."""
  if fmt == "hf":
    hf_io.save_hf(params, config, directory, overwrite=overwrite)
  elif fmt == "orbax":
    save_orbax(params, config, directory, overwrite=overwrite)
  else:
    raise ValueError(f"Cannot save in format {fmt!r}; expected one of {WRITABLE_FORMATS}.")
