"""Tests of the PPO rewards, advantages, whitening and clipped losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax import losses

# Jitted once per shape: compiling a whole function is faster on CPU than dispatching op by op.
kl_penalized_rewards = jax.jit(losses.kl_penalized_rewards, static_argnames=("kl_estimator",))
discounted_returns = jax.jit(losses.discounted_returns)
gae_advantages = jax.jit(losses.gae_advantages)
masked_whiten = jax.jit(losses.masked_whiten)
ppo_policy_loss = jax.jit(losses.ppo_policy_loss)
ppo_value_loss = jax.jit(losses.ppo_value_loss, static_argnames=("value_clip_epsilon",))
masked_entropy = jax.jit(losses.masked_entropy)
token_entropy = jax.jit(losses.token_entropy)


def _normal(seed, shape, scale=1.0):
  """Returns float32 normal noise drawn with numpy, which compiles nothing."""
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _pad(array, *, extra_rows=1, extra_columns=2, seed=0):
  """Appends rows and columns of large random values (or zeros, for an integer mask)."""
  array = np.asarray(array)
  rows, columns = array.shape[:2]
  shape = (rows + extra_rows, columns + extra_columns) + array.shape[2:]
  if np.issubdtype(array.dtype, np.integer):
    padded = np.zeros(shape, array.dtype)
  else:
    padded = np.array(_normal(seed, shape, scale=1e4))
  padded[:rows, :columns] = array
  return jnp.asarray(padded)


def _assert_same_metrics(metrics, padded_metrics):
  assert padded_metrics.keys() == metrics.keys()
  for key, value in metrics.items():
    assert padded_metrics[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key


def test_gae_ignores_padded_value():
  # The last real token bootstraps from 0, not from the padded value 100:
  # A[1] = 1 + 0 - 0 = 1 and A[0] = (0 + V[1] - V[0]) + 0.95 * A[1] = 0.95.
  advantages, _ = gae_advantages(
      rewards_BxT=jnp.asarray([[0.0, 1.0, 0.0]]), values_BxT=jnp.asarray([[0.0, 0.0, 100.0]]),
      mask_BxT=jnp.asarray([[1, 1, 0]]), gamma=1.0, lam=0.95)
  np.testing.assert_allclose(advantages, [[0.95, 1.0, 0.0]], rtol=1e-6)


def test_returns_ignore_padded_rewards():
  # G[1] = 1.0 and G[0] = 1.5 + G[1] = 2.5; padded rewards 2.0 are never read.
  returns = discounted_returns(
      rewards_BxT=jnp.asarray([[1.5, 1.0, 2.0, 2.0]]), mask_BxT=jnp.asarray([[1, 1, 0, 0]]),
      gamma=1.0)
  np.testing.assert_allclose(returns, [[2.5, 1.0, 0.0, 0.0]], rtol=1e-6)


def test_discounted_returns_hand_computed():
  # gamma 0.5: G[2] = 4, G[1] = 2 + 0.5 * 4 = 4, G[0] = 1 + 0.5 * 4 = 3.
  returns = discounted_returns(
      rewards_BxT=jnp.asarray([[1.0, 2.0, 4.0]]), mask_BxT=jnp.ones((1, 3)), gamma=0.5)
  np.testing.assert_allclose(returns, [[3.0, 4.0, 4.0]], rtol=1e-6)


def test_gae_hand_computed():
  # gamma 0.9, lam 0.8, so gamma * lam = 0.72.
  # delta[2] = 2 + 0 - 1.5 = 0.5; delta[1] = 0 + 0.9 * 1.5 - 1.0 = 0.35;
  # delta[0] = 1 + 0.9 * 1.0 - 0.5 = 1.4.
  # A[2] = 0.5; A[1] = 0.35 + 0.72 * 0.5 = 0.71; A[0] = 1.4 + 0.72 * 0.71 = 1.9112.
  # Targets A + V = [2.4112, 1.71, 2.0].
  advantages, targets = gae_advantages(
      rewards_BxT=jnp.asarray([[1.0, 0.0, 2.0]]), values_BxT=jnp.asarray([[0.5, 1.0, 1.5]]),
      mask_BxT=jnp.ones((1, 3)), gamma=0.9, lam=0.8)
  np.testing.assert_allclose(advantages, [[1.9112, 0.71, 0.5]], rtol=1e-6)
  np.testing.assert_allclose(targets, [[2.4112, 1.71, 2.0]], rtol=1e-6)


def test_gae_lambda_one_is_return_minus_value():
  rewards = _normal(0, (2, 5))
  values = _normal(1, (2, 5))
  mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
  advantages, _ = gae_advantages(
      rewards_BxT=rewards, values_BxT=values, mask_BxT=mask, gamma=0.9, lam=1.0)
  returns = discounted_returns(rewards_BxT=rewards, mask_BxT=mask, gamma=0.9)
  np.testing.assert_allclose(advantages, (returns - values) * mask, rtol=1e-5, atol=1e-6)


def test_gae_lambda_zero_is_td_error():
  # delta[0] = 1 + 0.5 * 2 - 1 = 1; delta[1] = 3 + 0 - 2 = 1.
  advantages, _ = gae_advantages(
      rewards_BxT=jnp.asarray([[1.0, 3.0]]), values_BxT=jnp.asarray([[1.0, 2.0]]),
      mask_BxT=jnp.ones((1, 2)), gamma=0.5, lam=0.0)
  np.testing.assert_allclose(advantages, [[1.0, 1.0]], rtol=1e-6)


def test_gae_skips_left_padded_prompt():
  rewards = jnp.asarray([[1.0, 0.0, 2.0]])
  values = jnp.asarray([[0.5, 1.0, 1.5]])
  expected, _ = gae_advantages(
      rewards_BxT=rewards, values_BxT=values, mask_BxT=jnp.ones((1, 3)), gamma=0.9, lam=0.8)
  # Two padding and two prompt positions with large values, then the response, then padding.
  garbage = jnp.asarray([[7e3, -3e3, 5e3, 1e4]])
  advantages, _ = gae_advantages(
      rewards_BxT=jnp.concatenate([garbage, rewards, garbage[:, :1]], axis=1),
      values_BxT=jnp.concatenate([-garbage, values, garbage[:, :1]], axis=1),
      mask_BxT=jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 0]]), gamma=0.9, lam=0.8)
  np.testing.assert_allclose(advantages[:, 4:7], expected, rtol=1e-6)
  np.testing.assert_array_equal(advantages[:, :4], 0.0)
  np.testing.assert_array_equal(advantages[:, 7], 0.0)


def test_gae_padding_changes_nothing():
  rewards = _normal(2, (2, 4))
  values = _normal(3, (2, 4))
  mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]])
  advantages, targets = gae_advantages(
      rewards_BxT=rewards, values_BxT=values, mask_BxT=mask, gamma=1.0, lam=0.95)
  padded_advantages, padded_targets = gae_advantages(
      rewards_BxT=_pad(rewards, seed=2), values_BxT=_pad(values, seed=3), mask_BxT=_pad(mask),
      gamma=1.0, lam=0.95)
  np.testing.assert_allclose(padded_advantages[:2, :4], advantages, rtol=1e-6)
  np.testing.assert_allclose(padded_targets[:2, :4], targets, rtol=1e-6)
  assert np.all(padded_advantages * (1 - _pad(mask)) == 0.0)


def _kl_inputs():
  # Row 0: two response tokens then padding. Row 1: a prompt token, then one response token.
  return dict(
      scores_B=jnp.asarray([3.0, -1.0]),
      logprobs_BxT=jnp.asarray([[-1.0, -2.0, -5.0], [-9.0, -0.5, -7.0]]),
      ref_logprobs_BxT=jnp.asarray([[-1.5, -1.0, -3.0], [-2.0, -0.5, -1.0]]),
      response_mask_BxT=jnp.asarray([[1, 1, 0], [0, 1, 0]]))


def test_k1_rewards_hand_computed():
  # k1 = logprob - ref_logprob: row 0 gives [0.5, -1.0], row 1 gives 0 at its one token.
  # Rewards are -0.1 * k1, plus the score at the last response token.
  rewards, metrics = kl_penalized_rewards(**_kl_inputs(), kl_coef=0.1)
  np.testing.assert_allclose(rewards, [[-0.05, 0.1 + 3.0, 0.0], [0.0, -1.0, 0.0]], rtol=1e-6)
  assert metrics["ppo/kl_sum"] == pytest.approx(-0.5)
  assert metrics["ppo/rollout_tokens"] == 3
  assert metrics["ppo/rollout_responses"] == 2
  assert metrics["ppo/kl_per_response"] == pytest.approx(-0.25)
  assert metrics["ppo/score"] == pytest.approx(1.0)


def test_k3_rewards_hand_computed():
  # log_r = ref_logprob - logprob = [-0.5, 1.0] in row 0, and k3 = (e^log_r - 1) - log_r:
  # (e^-0.5 - 1) + 0.5 = 0.1065307 and (e - 1) - 1 = 0.7182818. Row 1 has log_r = 0, so k3 = 0.
  rewards, metrics = kl_penalized_rewards(**_kl_inputs(), kl_coef=0.1, kl_estimator="k3")
  k3 = [math.exp(-0.5) - 0.5, math.e - 2.0]
  np.testing.assert_allclose(
      rewards, [[-0.1 * k3[0], -0.1 * k3[1] + 3.0, 0.0], [0.0, -1.0, 0.0]], rtol=1e-6)
  assert metrics["ppo/kl_sum"] == pytest.approx(sum(k3), rel=1e-6)


def test_k3_is_never_negative():
  _, metrics = kl_penalized_rewards(
      scores_B=jnp.zeros(4), logprobs_BxT=_normal(4, (4, 6)),
      ref_logprobs_BxT=_normal(5, (4, 6)), response_mask_BxT=jnp.ones((4, 6)),
      kl_coef=1.0, kl_estimator="k3")
  assert metrics["ppo/kl_sum"] >= 0.0


def test_empty_response_drops_score():
  inputs = _kl_inputs()
  inputs["response_mask_BxT"] = jnp.asarray([[1, 1, 0], [0, 0, 0]])
  rewards, metrics = kl_penalized_rewards(**inputs, kl_coef=0.1)
  np.testing.assert_array_equal(rewards[1], 0.0)
  assert metrics["ppo/rollout_responses"] == 1
  assert metrics["ppo/score"] == pytest.approx(3.0)


def test_kl_rewards_padding_changes_nothing():
  inputs = _kl_inputs()
  rewards, metrics = kl_penalized_rewards(**inputs, kl_coef=0.1, kl_estimator="k3")
  padded = dict(
      scores_B=jnp.concatenate([inputs["scores_B"], jnp.asarray([1e4])]),
      logprobs_BxT=_pad(inputs["logprobs_BxT"], seed=5),
      ref_logprobs_BxT=_pad(inputs["ref_logprobs_BxT"], seed=6),
      response_mask_BxT=_pad(inputs["response_mask_BxT"]))
  padded_rewards, padded_metrics = kl_penalized_rewards(**padded, kl_coef=0.1, kl_estimator="k3")
  np.testing.assert_allclose(padded_rewards[:2, :3], rewards, rtol=1e-6)
  assert np.all(padded_rewards * (1 - padded["response_mask_BxT"]) == 0.0)
  _assert_same_metrics(metrics, padded_metrics)


def test_unknown_kl_estimator_raises():
  with pytest.raises(ValueError, match="'k2'.*'k1', 'k3'"):
    losses.kl_penalized_rewards(**_kl_inputs(), kl_coef=0.1, kl_estimator="k2")


def test_whiten_hand_computed():
  # Real values [1, 2, 3]: mean 2, population variance 2 / 3, so the output is
  # [-1, 0, 1] / sqrt(2 / 3) = [-1.2247449, 0, 1.2247449], and the padded 100 becomes 0.
  whitened = masked_whiten(jnp.asarray([[1.0, 2.0, 3.0, 100.0]]), jnp.asarray([[1, 1, 1, 0]]))
  np.testing.assert_allclose(whitened, [[-1.2247449, 0.0, 1.2247449, 0.0]], rtol=1e-5)


def test_whiten_padding_changes_nothing():
  values = _normal(7, (2, 4))
  mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1]])
  whitened = masked_whiten(values, mask)
  padded = masked_whiten(_pad(values, seed=8), _pad(mask))
  np.testing.assert_allclose(padded[:2, :4], whitened, rtol=1e-5, atol=1e-6)
  assert np.all(padded * (1 - _pad(mask)) == 0.0)


def test_whiten_constant_input_is_zero():
  whitened = masked_whiten(jnp.full((1, 3), 5.0), jnp.ones((1, 3)))
  np.testing.assert_array_equal(whitened, 0.0)


def _policy_inputs():
  # Ratios 1.5, 0.5 and 1.1 with advantages 1, -1 and 1.
  return dict(
      logprobs_BxT=jnp.log(jnp.asarray([[1.5, 0.5, 1.1]])),
      old_logprobs_BxT=jnp.zeros((1, 3)),
      advantages_BxT=jnp.asarray([[1.0, -1.0, 1.0]]),
      response_mask_BxT=jnp.ones((1, 3)))


def test_policy_loss_hand_computed():
  # Per token max(-A * r, -A * clip(r, 0.8, 1.2)):
  # r = 1.5, A = 1: max(-1.5, -1.2) = -1.2.  r = 0.5, A = -1: max(0.5, 0.8) = 0.8.
  # r = 1.1, A = 1: max(-1.1, -1.1) = -1.1.  Mean (-1.2 + 0.8 - 1.1) / 3 = -0.5.
  loss, metrics = ppo_policy_loss(**_policy_inputs())
  assert loss == pytest.approx(-0.5, rel=1e-6)
  assert metrics["ppo/clip_fraction"] == pytest.approx(2 / 3)


def test_approx_kl_hand_computed():
  # k3 = (r - 1) - log r: 0.5 - log 1.5 = 0.0945349, -0.5 + log 2 = 0.1931472,
  # 0.1 - log 1.1 = 0.0046898.
  _, metrics = ppo_policy_loss(**_policy_inputs())
  expected = (0.5 - math.log(1.5)) + (-0.5 + math.log(2.0)) + (0.1 - math.log(1.1))
  assert metrics["ppo/approx_kl_sum"] == pytest.approx(expected, rel=1e-5)


def test_policy_gradient_stops_when_clipped():
  # The first two tokens take the clipped term, whose gradient is 0. The third has
  # d(-A * r) / d logprob = -A * r = -1.1, divided by 3 tokens.
  inputs = _policy_inputs()

  def loss_of_logprobs(logprobs):
    return ppo_policy_loss(**dict(inputs, logprobs_BxT=logprobs))[0]

  grad = jax.grad(loss_of_logprobs)(inputs["logprobs_BxT"])
  np.testing.assert_allclose(grad, [[0.0, 0.0, -1.1 / 3]], rtol=1e-6, atol=1e-7)


def test_unit_ratio_gives_zero_kl():
  logprobs = _normal(9, (3, 5))
  advantages = _normal(10, (3, 5))
  mask = jnp.asarray([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
  loss, metrics = ppo_policy_loss(
      logprobs_BxT=logprobs, old_logprobs_BxT=logprobs, advantages_BxT=advantages,
      response_mask_BxT=mask)
  assert metrics["ppo/approx_kl_sum"] == 0.0
  assert metrics["ppo/clipped_sum"] == 0.0
  assert metrics["ppo/ratio"] == 1.0
  # With ratio 1 the loss is minus the mean advantage over real tokens.
  assert loss == pytest.approx(-float((advantages * mask).sum() / mask.sum()), rel=1e-5)


def test_policy_loss_padding_changes_nothing():
  inputs = dict(_policy_inputs(), response_mask_BxT=jnp.asarray([[1, 1, 1]], jnp.int32))
  loss, metrics = ppo_policy_loss(**inputs)
  padded = {key: _pad(value, seed=11 + i) for i, (key, value) in enumerate(inputs.items())}
  padded_loss, padded_metrics = ppo_policy_loss(**padded)
  assert padded_loss == pytest.approx(float(loss), rel=1e-6)
  _assert_same_metrics(metrics, padded_metrics)

  def loss_of_logprobs(logprobs):
    return ppo_policy_loss(**dict(padded, logprobs_BxT=logprobs))[0]

  grad = jax.grad(loss_of_logprobs)(padded["logprobs_BxT"])
  assert np.all(grad * (1 - padded["response_mask_BxT"]) == 0.0)


def _value_inputs():
  return dict(
      values_BxT=jnp.asarray([[1.5, 1.1]]),
      old_values_BxT=jnp.asarray([[1.0, 1.0]]),
      returns_BxT=jnp.asarray([[2.0, 1.0]]),
      response_mask_BxT=jnp.asarray([[1, 1]], jnp.int32))


def test_value_loss_hand_computed():
  # Token 0: V = 1.5 is clipped to 1.0 + 0.2 = 1.2; max((1.5 - 2)^2, (1.2 - 2)^2) = 0.64.
  # Token 1: V = 1.1 is within the range; (1.1 - 1)^2 = 0.01.
  # Loss 0.5 * (0.64 + 0.01) / 2 = 0.1625; unclipped squared errors sum to 0.25 + 0.01.
  loss, metrics = ppo_value_loss(**_value_inputs())
  assert loss == pytest.approx(0.1625, rel=1e-5)
  assert metrics["ppo/value_error_sum"] == pytest.approx(0.26, rel=1e-5)
  assert metrics["ppo/value_clipped_sum"] == 1


def test_value_loss_without_clipping():
  # 0.5 * (0.25 + 0.01) / 2 = 0.065.
  loss, _ = ppo_value_loss(**_value_inputs(), value_clip_epsilon=None)
  assert loss == pytest.approx(0.065, rel=1e-5)


def test_value_gradient_hand_computed():
  # Token 0 takes the clipped term, which is constant in V beyond the clip range: gradient 0.
  # Token 1: d 0.5 (V - G)^2 / dV = V - G = 0.1, divided by 2 tokens.
  inputs = _value_inputs()

  def loss_of_values(values):
    return ppo_value_loss(**dict(inputs, values_BxT=values))[0]

  grad = jax.grad(loss_of_values)(inputs["values_BxT"])
  np.testing.assert_allclose(grad, [[0.0, 0.05]], rtol=1e-5, atol=1e-7)


def test_value_loss_padding_changes_nothing():
  inputs = _value_inputs()
  loss, metrics = ppo_value_loss(**inputs)
  padded = {key: _pad(value, seed=20 + i) for i, (key, value) in enumerate(inputs.items())}
  padded_loss, padded_metrics = ppo_value_loss(**padded)
  assert padded_loss == pytest.approx(float(loss), rel=1e-6)
  _assert_same_metrics(metrics, padded_metrics)


def test_entropy_of_uniform_is_log_vocab():
  entropy, metrics = masked_entropy(
      logits_BxTxV=jnp.zeros((1, 2, 8), jnp.bfloat16), response_mask_BxT=jnp.ones((1, 2)))
  assert entropy == pytest.approx(math.log(8.0), rel=1e-6)
  assert metrics["ppo/entropy_sum"] == pytest.approx(2 * math.log(8.0), rel=1e-6)


def test_entropy_matches_definition():
  logits = _normal(12, (2, 3, 5))
  probs = jax.nn.softmax(logits)
  expected = -(probs * jnp.log(probs)).sum(-1)
  np.testing.assert_allclose(token_entropy(logits), expected, rtol=1e-5)


def test_entropy_padding_changes_nothing():
  logits = _normal(13, (2, 3, 5))
  mask = jnp.asarray([[1, 1, 0], [1, 1, 1]])
  entropy, metrics = masked_entropy(logits_BxTxV=logits, response_mask_BxT=mask)
  padded_entropy, padded_metrics = masked_entropy(
      logits_BxTxV=_pad(logits, seed=14), response_mask_BxT=_pad(mask))
  assert padded_entropy == pytest.approx(float(entropy), rel=1e-6)
  _assert_same_metrics(metrics, padded_metrics)
