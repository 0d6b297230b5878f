"""Tests of the row permutation that Hugging Face applies to the query and key projections."""

import numpy as np

from llama2_jax import param_layout
from llama2_jax.config import get_model_config


def _hf_row_order(n_heads: int, head_dim: int) -> list[int]:
  """Meta row indices in Hugging Face's order: even rows, then odd rows, within each head."""
  order = []
  for head in range(n_heads):
    rows = range(head * head_dim, (head + 1) * head_dim)
    order += [row for row in rows if row % 2 == 0] + [row for row in rows if row % 2 == 1]
  return order


def test_meta_rows_to_hf_even_then_odd_rows():
  # Two heads of head_dim 4. Each row contains its Meta row index.
  weight = np.repeat(np.arange(8, dtype=np.float32)[:, None], 3, axis=1)

  hf = param_layout.meta_rows_to_hf(weight, n_heads=2)

  assert hf[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
  np.testing.assert_array_equal(param_layout.hf_rows_to_meta(hf, n_heads=2), weight)


def _meta_tensors_with_row_indices(config):
  """Returns Meta tensors of `config` in which every row of wq and wk contains its row index."""
  D, F, V = config.dim, config.hidden_dim, config.vocab_size
  q_rows, kv_rows = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
  shapes = {"attention.wq.weight": (q_rows, D), "attention.wk.weight": (kv_rows, D),
            "attention.wv.weight": (kv_rows, D), "attention.wo.weight": (D, q_rows),
            "feed_forward.w1.weight": (F, D), "feed_forward.w2.weight": (D, F),
            "feed_forward.w3.weight": (F, D), "attention_norm.weight": (D,),
            "ffn_norm.weight": (D,)}
  tensors = {"tok_embeddings.weight": np.zeros((V, D), np.float32),
             "norm.weight": np.ones(D, np.float32), "output.weight": np.zeros((V, D), np.float32)}
  for layer in range(config.n_layers):
    for name, shape in shapes.items():
      tensors[f"layers.{layer}.{name}"] = np.zeros(shape, np.float32)
    for name, rows in (("attention.wq.weight", q_rows), ("attention.wk.weight", kv_rows)):
      tensors[f"layers.{layer}.{name}"] = np.repeat(
          np.arange(rows, dtype=np.float32)[:, None], D, axis=1)
  return tensors


def test_hf_export_permutes_keys_by_kv_heads():
  config = get_model_config("test_gqa")  # 4 query heads, 2 key/value heads, head_dim 16.
  params = param_layout.params_from_meta(_meta_tensors_with_row_indices(config).__getitem__,
                                         config)

  hf = dict(param_layout.iter_hf_tensors(params, config))

  q_rows = hf["model.layers.0.self_attn.q_proj.weight"][:, 0]
  k_rows = hf["model.layers.0.self_attn.k_proj.weight"][:, 0]
  assert q_rows.tolist() == _hf_row_order(config.n_heads, config.head_dim)
  assert k_rows.tolist() == _hf_row_order(config.kv_heads, config.head_dim)
  # Permuting the keys with the query head count would interleave rows of different heads.
  assert k_rows.tolist() != _hf_row_order(config.n_heads, config.head_dim // 2)


def test_hf_import_undoes_permutation():
  config = get_model_config("test_gqa")
  tensors = _meta_tensors_with_row_indices(config)
  params = param_layout.params_from_meta(tensors.__getitem__, config)
  hf = dict(param_layout.iter_hf_tensors(params, config))

  reimported = param_layout.params_from_hf(hf.__getitem__, config)

  meta = dict(param_layout.iter_meta_tensors(reimported, config))
  for name in ("layers.1.attention.wq.weight", "layers.1.attention.wk.weight"):
    np.testing.assert_array_equal(meta[name], tensors[name], err_msg=name)
