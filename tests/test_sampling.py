"""Tests of the KV-cache sampler and its token filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax import get_model_config
from llama2_jax.model import Llama, init_params
from llama2_jax.sampling import _sample_jit, choose_tokens, filter_logits, sample


@pytest.fixture(scope="module")
def model_and_params():
  model = Llama(get_model_config("test_gqa"))
  return model, init_params(model, jax.random.key(0))


def _prompts():
  tokens = jnp.array([[0, 0, 5, 6, 7], [11, 12, 13, 14, 15], [0, 0, 0, 0, 9]], jnp.int32)
  mask = (jnp.arange(5)[None, :] >= jnp.array([[2], [0], [4]])).astype(jnp.int32)
  return tokens, mask


def _filtered_probs(probs, **kwargs):
  logits = jnp.log(jnp.asarray([probs], jnp.float32))
  return np.asarray(jax.nn.softmax(filter_logits(logits, **kwargs)))[0]


def test_top_p_keeps_smallest_reaching_set():
  # Sorted: 0.5 (token 3), 0.25 (token 0). Their total 0.75 reaches p = 0.75, so {3, 0} stay
  # and renormalise to 0.5 / 0.75 = 2/3 and 0.25 / 0.75 = 1/3.
  probs = _filtered_probs([0.25, 0.125, 0.125, 0.5], temperature=1.0, top_k=0, top_p=0.75)

  np.testing.assert_allclose(probs, [1 / 3, 0, 0, 2 / 3], rtol=1e-6, atol=1e-7)


def test_top_p_half_keeps_only_first():
  # Token 0 alone has probability 0.5, which reaches p = 0.5.
  probs = _filtered_probs([0.5, 0.3, 0.15, 0.05], temperature=1.0, top_k=0, top_p=0.5)

  np.testing.assert_allclose(probs, [1, 0, 0, 0], atol=1e-7)


def test_top_k_keeps_k_largest():
  probs = _filtered_probs([0.1, 0.4, 0.2, 0.3], temperature=1.0, top_k=2, top_p=1.0)

  np.testing.assert_allclose(probs, [0, 4 / 7, 0, 3 / 7], rtol=1e-6, atol=1e-7)


def test_temperature_zero_is_argmax():
  logits = jnp.array([[1.0, 3.0, 2.0]])
  for seed in range(20):
    tokens, logprobs, sampling_logprobs = choose_tokens(
        logits, jax.random.key(seed), temperature=0.0, top_k=0, top_p=1.0)
    assert int(tokens[0]) == 1
    assert np.isfinite(float(logprobs[0]))
    assert float(sampling_logprobs[0]) == 0.0


def test_logprobs_match_teacher_forcing(model_and_params):
  model, params = model_and_params
  tokens, mask = _prompts()

  out = sample(model, params, tokens, mask, jax.random.key(3), max_new_tokens=6,
               temperature=0.8, top_p=0.9, top_k=50)
  full_tokens = jnp.concatenate([tokens, out.tokens_BxT], axis=1)
  full_mask = jnp.concatenate([mask, out.mask_BxT], axis=1)
  # Logits at column P - 1 + t predict generated token t.
  logits = model.apply(params, full_tokens, full_mask)[:, 4:-1]
  log_softmax = jax.nn.log_softmax(logits, axis=-1)
  forced = jnp.take_along_axis(log_softmax, out.tokens_BxT[..., None], axis=-1)[..., 0]
  filtered = jax.vmap(lambda row: filter_logits(row, temperature=0.8, top_k=50, top_p=0.9),
                      in_axes=1, out_axes=1)(logits)
  forced_sampling = jnp.take_along_axis(jax.nn.log_softmax(filtered, -1),
                                        out.tokens_BxT[..., None], axis=-1)[..., 0]

  generated = np.asarray(out.mask_BxT, bool)
  np.testing.assert_allclose(np.asarray(out.logprobs_BxT)[generated],
                             np.asarray(forced)[generated], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.sampling_logprobs_BxT)[generated],
                             np.asarray(forced_sampling)[generated], rtol=1e-5, atol=1e-5)


def test_greedy_matches_argmax_of_full_forward(model_and_params):
  model, params = model_and_params
  tokens, mask = _prompts()

  out = sample(model, params, tokens, mask, jax.random.key(0), max_new_tokens=5,
               temperature=0.0, eos_id=-1, prefill_chunk_size=2)

  full = model.apply(params, jnp.concatenate([tokens, out.tokens_BxT], 1),
                     jnp.concatenate([mask, out.mask_BxT], 1))
  np.testing.assert_array_equal(out.tokens_BxT, jnp.argmax(full[:, 4:-1], axis=-1))


def test_rows_stop_at_eos(model_and_params):
  model, params = model_and_params
  tokens, mask = _prompts()
  free = sample(model, params, tokens, mask, jax.random.key(0), max_new_tokens=6,
                temperature=0.0, eos_id=-1)
  # Pick as EOS the third greedy token of row 0 that did not appear before it in that row.
  row = [int(t) for t in free.tokens_BxT[0]]
  stop = next(i for i in range(2, 6) if row[i] not in row[:i])
  eos = row[stop]

  out = sample(model, params, tokens, mask, jax.random.key(0), max_new_tokens=6,
               temperature=0.0, eos_id=eos, pad_id=0)

  assert int(out.lengths_B[0]) == stop + 1
  np.testing.assert_array_equal(out.tokens_BxT[0, :stop + 1], row[:stop + 1])
  np.testing.assert_array_equal(out.tokens_BxT[0, stop + 1:], 0)
  np.testing.assert_array_equal(out.mask_BxT[0], [1] * (stop + 1) + [0] * (5 - stop))
  for other in (1, 2):
    expected_length = 6 if eos not in [int(t) for t in free.tokens_BxT[other]] else None
    if expected_length is not None:
      assert int(out.lengths_B[other]) == expected_length


def test_sampling_is_deterministic_per_key(model_and_params):
  model, params = model_and_params
  tokens, mask = _prompts()

  first = sample(model, params, tokens, mask, jax.random.key(7), max_new_tokens=4)
  second = sample(model, params, tokens, mask, jax.random.key(7), max_new_tokens=4)
  other = sample(model, params, tokens, mask, jax.random.key(8), max_new_tokens=4)

  np.testing.assert_array_equal(first.tokens_BxT, second.tokens_BxT)
  assert not np.array_equal(first.tokens_BxT, other.tokens_BxT)


def test_temperature_sweep_compiles_once(model_and_params):
  model, params = model_and_params
  tokens, mask = _prompts()
  sample(model, params, tokens, mask, jax.random.key(0), max_new_tokens=3, temperature=0.5)
  compiled = _sample_jit._cache_size()

  for temperature in (0.0, 0.7, 1.3):
    sample(model, params, tokens, mask, jax.random.key(0), max_new_tokens=3,
           temperature=temperature, top_p=0.9, top_k=5)

  assert _sample_jit._cache_size() == compiled


@pytest.mark.parametrize("settings", [dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0),
                                      dict(top_p=1.5)])
def test_invalid_settings_raise(model_and_params, settings):
  model, params = model_and_params
  tokens, mask = _prompts()

  with pytest.raises(ValueError, match=next(iter(settings))):
    sample(model, params, tokens, mask, jax.random.key(0), max_new_tokens=2, **settings)
