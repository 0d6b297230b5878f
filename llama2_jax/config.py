"""Model configuration and the table of Llama 2 sizes.

Field names follow Meta's `params.json` (dim, n_layers, n_heads, n_kv_heads, vocab_size,
multiple_of, ffn_dim_multiplier, norm_eps) so that a Meta checkpoint's config loads without
renaming. The feed-forward width is derived from them as in Meta's reference `model.py`:
`multiple_of * ceil(ffn_dim_multiplier * int(8 * dim / 3) / multiple_of)`. Hugging Face configs
state the width directly; `ffn_hidden_dim` overrides the derivation for them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}

REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of one Llama 2 model.

  Attributes:
    dim: width of the residual stream.
    n_layers: number of transformer blocks.
    n_heads: number of query heads.
    n_kv_heads: number of key/value heads; None means n_heads (multi-head attention).
      Query head h reads key/value head h // (n_heads // n_kv_heads).
    vocab_size: number of token ids.
    multiple_of: the feed-forward width is rounded up to a multiple of this.
    ffn_dim_multiplier: optional factor on the feed-forward width (1.3 for 70B).
    ffn_hidden_dim: explicit feed-forward width; None derives it as Meta does.
    norm_eps: epsilon of RMSNorm (1e-5 in Llama 2).
    rope_theta: base of the rotary angles (10000 in Llama 2).
    max_seq_len: context length the model was trained for (4096 in Llama 2).
    param_dtype: dtype of stored parameters.
    dtype: dtype of activations and matmuls. Norm statistics, softmax and logits are
      always float32.
    remat: activation rematerialisation per block: "none", "full" (recompute the whole block
      in the backward pass) or "dots" (save matmul outputs, recompute the rest).
    scan_unroll: blocks per iteration of the layer scan. The blocks' parameters are always
      stacked on a leading `layers` axis and run with `jax.lax.scan`, so compile time does not
      grow with depth; unrolling trades compile time for speed on small models.
  """

  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int | None = None
  vocab_size: int = 32000
  multiple_of: int = 256
  ffn_dim_multiplier: float | None = None
  ffn_hidden_dim: int | None = None
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_seq_len: int = 4096
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"
  scan_unroll: int = 1

  def __post_init__(self):
    positive = ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}.")
    if self.dim % self.n_heads:
      raise ValueError(
          f"ModelConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}).")
    if (self.dim // self.n_heads) % 2:
      raise ValueError(
          f"ModelConfig head dimension dim / n_heads = {self.dim // self.n_heads} must be even "
          "for rotary embeddings.")
    if self.n_heads % self.kv_heads:
      raise ValueError(
          f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
          f"({self.kv_heads}).")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(
            f"ModelConfig.{name} is {getattr(self, name)!r}; expected one of {sorted(DTYPES)}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat is {self.remat!r}; expected one of {REMAT_POLICIES}.")
    if not isinstance(self.scan_unroll, int) or not 1 <= self.scan_unroll <= self.n_layers:
      raise ValueError(
          f"ModelConfig.scan_unroll must be an integer in [1, n_layers={self.n_layers}], "
          f"got {self.scan_unroll!r}.")
    if self.norm_eps <= 0:
      raise ValueError(f"ModelConfig.norm_eps must be positive, got {self.norm_eps}.")

  @property
  def kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @property
  def hidden_dim(self) -> int:
    """Width of the SwiGLU feed-forward layer."""
    if self.ffn_hidden_dim is not None:
      return self.ffn_hidden_dim
    hidden = int(2 * 4 * self.dim / 3)
    if self.ffn_dim_multiplier is not None:
      hidden = int(self.ffn_dim_multiplier * hidden)
    return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self, include_output: bool = True) -> int:
    """Counts the parameters of the language model (embedding and output included)."""
    hd, kv = self.head_dim, self.kv_heads
    attention = self.dim * hd * (2 * self.n_heads + 2 * kv)
    feed_forward = 3 * self.dim * self.hidden_dim
    per_layer = attention + feed_forward + 2 * self.dim
    total = self.n_layers * per_layer + self.vocab_size * self.dim + self.dim
    if include_output:
      total += self.dim * self.vocab_size
    return total

  def flops_per_token(self, seq_len: int) -> float:
    """Estimates forward-pass FLOPs per token: 2 per matmul weight plus attention scores.

    Attention counts QK^T and AV over the full (causal-unmasked) length, 4 * n_layers * seq_len
    * dim, the convention of the PaLM paper (Chowdhery et al., 2022, appendix B). Training is 3x
    this (forward plus a backward of twice the cost).
    """
    matmul_params = self.num_params() - self.vocab_size * self.dim  # The embedding is a gather.
    matmul_params -= (2 * self.n_layers + 1) * self.dim  # Norm scales are not matmuls.
    return 2.0 * matmul_params + 4.0 * self.n_layers * seq_len * self.dim


# Keys match Meta's params.json. 34B follows Code Llama 34B's shape, the only public 34B Llama 2
# architecture, but with Llama 2's rope_theta and vocabulary.
PRESETS: Mapping[str, Mapping[str, Any]] = {
    "llama2_7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, multiple_of=256),
    "llama2_13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=None, multiple_of=256),
    "llama2_34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, multiple_of=256,
                       ffn_dim_multiplier=1.0),
    "llama2_70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                       ffn_dim_multiplier=1.3),
    # Benchmark size: dim 512, 8 layers, FFN 1536.
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=None, multiple_of=256),
    # CPU default of the pipeline; the vocabulary is set by the tokenizer it trains with.
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=64, vocab_size=4096,
                 max_seq_len=512),
    # Test sizes: multi-head and grouped-query.
    "test_mha": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=None, multiple_of=32,
                     vocab_size=128, max_seq_len=128),
    "test_gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                     vocab_size=128, max_seq_len=128),
}


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
  """Builds the config of a preset in `PRESETS`, with fields replaced by `overrides`."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; expected one of {sorted(PRESETS)}.")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"Unknown ModelConfig fields {unknown}; valid fields: {sorted(fields)}.")
  return ModelConfig(**{**PRESETS[name], **overrides})
