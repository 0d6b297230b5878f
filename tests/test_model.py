"""Behavioural tests of the Llama model: reference parity, masking, packing, caching, numerics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax import get_model_config
from llama2_jax.model import (Attention, Llama, RMSNorm, init_cache, init_params, param_axes,
                              positions_from_mask)
from llama2_jax.param_layout import params_from_hf


class _JittedModel:
  """A `Llama` whose `apply` is jitted, so each test compiles once per shape."""

  def __init__(self, model):
    self.config = model.config
    self.apply = jax.jit(model.apply, static_argnames=("last_position_only",))


def _model_and_params(preset="test_gqa", seed=0, **overrides):
  config = get_model_config(preset, **overrides)
  model = Llama(config)
  return _JittedModel(model), init_params(model, jax.random.key(seed))


def _random_tokens(shape, vocab, seed=1):
  return jnp.asarray(np.random.RandomState(seed).randint(3, vocab, shape), jnp.int32)


@pytest.mark.parametrize("preset", ["test_mha", "test_gqa"])
def test_logits_match_transformers(preset):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = get_model_config(preset)
  hf_config = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.dim,
      intermediate_size=config.hidden_dim, num_hidden_layers=config.n_layers,
      num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads,
      rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
      max_position_embeddings=config.max_seq_len, tie_word_embeddings=False)
  torch.manual_seed(0)
  reference = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():
    for weight in reference.parameters():  # Larger than the default init, so errors show.
      weight.normal_(0.0, 0.5)
  state = {name: value.numpy() for name, value in reference.state_dict().items()}
  params = params_from_hf(state.__getitem__, config)
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 11))

  with torch.no_grad():
    expected = reference(torch.tensor(tokens)).logits.numpy()
  logits = np.asarray(Llama(config).apply(params, jnp.asarray(tokens)))

  scale = np.abs(expected).max()
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * scale)


def test_causality_by_gradients():
  model, params = _model_and_params()
  tokens_1xL = jnp.arange(10, 16, dtype=jnp.int32)[None]  # Distinct ids: one embedding row each.
  length = tokens_1xL.shape[1]

  def logit_sums_L(embedding_VxD):
    patched = {"params": {**params["params"], "tok_embeddings": embedding_VxD}}
    return model.apply(patched, tokens_1xL)[0].sum(axis=-1)

  jacobian_LxVxD = jax.jacrev(logit_sums_L)(params["params"]["tok_embeddings"])
  # influence[t, s]: how much the logits at position t move with the token at position s.
  rows_LxLxD = np.asarray(jacobian_LxVxD)[:, np.asarray(tokens_1xL[0])]
  influence = np.abs(rows_LxLxD).sum(axis=-1)

  for t in range(length):
    assert np.all(influence[t, t + 1:] == 0), f"position {t} reads later tokens: {influence[t]}"
    assert np.all(influence[t, :t + 1] > 0), f"position {t} ignores earlier tokens: {influence[t]}"


def test_left_padding_matches_unpadded_rows():
  model, params = _model_and_params()
  rows = [_random_tokens((1, n), model.config.vocab_size, seed=n) for n in (3, 7, 5)]
  width = 7
  tokens = jnp.concatenate([jnp.pad(r, ((0, 0), (width - r.shape[1], 0))) for r in rows])
  mask = jnp.concatenate(
      [jnp.pad(jnp.ones_like(r), ((0, 0), (width - r.shape[1], 0))) for r in rows])

  batched = model.apply(params, tokens, mask)

  for i, row in enumerate(rows):
    alone = model.apply(params, row)
    np.testing.assert_allclose(batched[i, width - row.shape[1]:], alone[0], rtol=1e-5, atol=1e-5)


def test_packed_matches_separate_documents():
  model, params = _model_and_params()
  first = _random_tokens((1, 4), model.config.vocab_size, seed=4)
  second = _random_tokens((1, 3), model.config.vocab_size, seed=5)
  # Two documents and one padding slot in one row.
  packed = jnp.concatenate([first, second, jnp.zeros((1, 1), jnp.int32)], axis=1)
  segment_ids = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]])
  mask = segment_ids > 0

  logits = model.apply(params, packed, mask, segment_ids_BxL=segment_ids)

  np.testing.assert_allclose(logits[0, :4], model.apply(params, first)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[0, 4:7], model.apply(params, second)[0], rtol=1e-5,
                             atol=1e-5)


def test_positions_restart_per_segment():
  mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 0]])
  segments = jnp.array([[0, 0, 1, 1, 2, 2, 2, 0]])

  positions = positions_from_mask(mask, segments)

  np.testing.assert_array_equal(positions, [[0, 0, 0, 1, 0, 1, 2, 0]])


def test_positions_ignore_left_padding():
  positions = positions_from_mask(jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))

  np.testing.assert_array_equal(positions, [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


@pytest.mark.parametrize("chunks", [(2, 3), (1, 4), (4, 1)])
def test_cached_prefill_matches_full_forward(chunks):
  model, params = _model_and_params()
  tokens = _random_tokens((2, 5), model.config.vocab_size)
  mask = jnp.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
  full = model.apply(params, tokens, mask)

  cache = init_cache(model.config, batch_size=2, max_length=8)
  pieces, start = [], 0
  for size in chunks:
    logits, cache = model.apply(params, tokens[:, start:start + size],
                                mask[:, start:start + size], cache=cache)
    pieces.append(logits)
    start += size
  cached = jnp.concatenate(pieces, axis=1)

  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], rtol=1e-5,
                             atol=1e-5)


def test_decoding_one_token_matches_full_forward():
  model, params = _model_and_params()
  tokens = _random_tokens((2, 6), model.config.vocab_size)
  mask = jnp.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
  full = model.apply(params, tokens, mask)

  cache = init_cache(model.config, batch_size=2, max_length=6)
  _, cache = model.apply(params, tokens[:, :4], mask[:, :4], cache=cache)
  step_logits = []
  for t in (4, 5):
    logits, cache = model.apply(params, tokens[:, t:t + 1], mask[:, t:t + 1], cache=cache)
    step_logits.append(logits[:, 0])

  np.testing.assert_allclose(jnp.stack(step_logits, 1), full[:, 4:], rtol=1e-5, atol=1e-5)


def test_rmsnorm_float16_does_not_overflow():
  config = get_model_config("test_gqa", dtype="float16", param_dtype="float16")
  norm = RMSNorm(config)
  x = jnp.full((1, 1, 4), 300.0, jnp.float16)
  params = {"params": {"scale": jnp.ones((4,), jnp.float16)}}

  out = norm.apply(params, x)

  np.testing.assert_array_equal(np.asarray(out, np.float32), [[[1.0, 1.0, 1.0, 1.0]]])


def test_grouped_query_heads_read_their_kv_head():
  # 4 query heads share 2 key/value heads: heads 0 and 1 read KV head 0, heads 2 and 3 read
  # KV head 1. With one key the softmax is 1, so each head outputs its KV head's value.
  config = get_model_config("test_gqa", dim=8, n_heads=4, n_kv_heads=2)
  D, H, K, Dh = 8, 4, 2, 2
  x = jnp.ones((1, 1, D))
  wv = np.zeros((D, K, Dh), np.float32)
  wv[:, 0, :] = 10.0 / D
  wv[:, 1, :] = 20.0 / D
  wo = np.eye(H * Dh, dtype=np.float32).reshape(H, Dh, D)  # Concatenates the head outputs.
  params = {"params": {"wq": jnp.ones((D, H, Dh)), "wk": jnp.ones((D, K, Dh)),
                       "wv": jnp.asarray(wv), "wo": jnp.asarray(wo)}}
  cos, sin = jnp.ones((1, 1, Dh // 2)), jnp.zeros((1, 1, Dh // 2))

  out, _ = Attention(config).apply(params, x, cos, sin, jnp.ones((1, 1, 1), bool), None, None,
                                   None)

  per_head = np.asarray(out).reshape(H, Dh)[:, 0]
  np.testing.assert_allclose(per_head, [10.0, 10.0, 20.0, 20.0], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_left_padding_logits_finite(dtype):
  model, params = _model_and_params(dtype=dtype, param_dtype=dtype)
  tokens = _random_tokens((2, 5), model.config.vocab_size)
  mask = jnp.array([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])  # The second row is all padding.

  logits = model.apply(params, tokens, mask)

  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("head", ["reward", "value"])
def test_score_heads_finite_on_padding(head):
  config = get_model_config("test_gqa", dtype="float16", param_dtype="float16")
  model = Llama(config, head=head)
  params = init_params(model, jax.random.key(0))
  tokens = _random_tokens((2, 5), config.vocab_size)

  scores = model.apply(params, tokens, jnp.array([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]))

  assert np.all(np.isfinite(np.asarray(scores)))


def test_reward_read_at_last_real_token():
  # Pad id equals EOS id (2): the last real token is found from the mask, position 5.
  config = get_model_config("test_gqa")
  reward_model = Llama(config, head="reward")
  value_model = Llama(config, head="value")
  params = init_params(reward_model, jax.random.key(0))
  tokens = jnp.array([[1, 10, 2, 20, 30, 2, 2]])
  mask = jnp.array([[1, 1, 1, 1, 1, 1, 0]])

  reward = reward_model.apply(params, tokens, mask)
  values = value_model.apply(params, tokens, mask)

  np.testing.assert_allclose(reward, values[:, 5], rtol=1e-6)
  assert not np.allclose(reward, values[:, 6])


def test_reward_ignores_padding_contents():
  config = get_model_config("test_gqa")
  model = Llama(config, head="reward")
  params = init_params(model, jax.random.key(0))
  mask = jnp.array([[1, 1, 1, 1, 0, 0]])
  tokens = jnp.array([[1, 10, 11, 2, 2, 2]])
  other_padding = jnp.array([[1, 10, 11, 2, 77, 99]])

  np.testing.assert_allclose(model.apply(params, tokens, mask),
                             model.apply(params, other_padding, mask), rtol=1e-6)


def test_param_axes_cover_every_param():
  model = Llama(get_model_config("test_gqa"))
  params = init_params(model, jax.random.key(0))
  axes = param_axes(model)

  leaves = jax.tree.leaves(params)
  specs = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(leaves) == len(specs)
  for leaf, spec in zip(leaves, specs):
    assert len(spec) == leaf.ndim, f"{spec} does not name every axis of shape {leaf.shape}"
