"""PPO for language models: per-token rewards, advantages and the clipped losses.

Axis letters: B is the batch of responses, T the token position and V the vocabulary. Token
tensors are aligned so that position t contains the log-probability, value or reward of token t of
the sequence. `response_mask_BxT` (or `mask_BxT`) is nonzero on generated response tokens and zero
on prompt tokens and padding, so left-padded prompts of different lengths need no special case.
Values at masked positions never reach a result: padding filled with any finite numbers changes
no reward, advantage, loss, metric or gradient.

The KL penalty enters the per-token reward, not the loss. Llama 2 maximises
R(g | p) = R~_c(g | p) - beta * KL(pi_theta(g | p) || pi_0(g | p)) (Touvron et al., 2023, eq. 4,
following Stiennon et al., 2020), where R~_c is the whitened score of
`combine_safety_and_helpfulness_rewards`. `kl_penalized_rewards` spreads the KL over tokens and
adds the sequence score at the last response token. `gae_advantages` turns those rewards into
advantages, and `ppo_policy_loss` and `ppo_value_loss` are the clipped PPO objectives. A step
usually minimises policy_loss - entropy_coef * entropy for the policy and the value loss for the
separate value model.

Every function computes in float32 and leaves its metrics as sums (keys ending in `_sum`) with
their counts (such as `ppo/tokens`), so that accumulation over minibatches averages exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

KL_ESTIMATORS = ("k1", "k3")


def kl_penalized_rewards(
    *,
    scores_B: ArrayLike,
    logprobs_BxT: ArrayLike,
    ref_logprobs_BxT: ArrayLike,
    response_mask_BxT: ArrayLike,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Builds per-token rewards: minus beta times a KL estimate, plus the score at the last token.

  reward[b, t] = -kl_coef * kl[b, t] on response tokens, and scores[b] is added at the last
  response token of row b. With log_r = ref_logprob - logprob (r = pi_ref / pi on a token sampled
  from pi), the per-token KL estimates are (Schulman, 2020, "Approximating KL Divergence"):
    k1 = -log_r, unbiased but negative on some tokens, and
    k3 = (r - 1) - log_r, unbiased and never negative.
  Their sum over a response estimates KL(pi || pi_ref) of the whole response. Llama 2 uses
  beta = 0.01 for 7B and 13B and 0.005 for 34B and 70B (Touvron et al., 2023, section 3.2.3).

  Args:
    scores_B: sequence score of each response, e.g. from
      `combine_safety_and_helpfulness_rewards`.
    logprobs_BxT: log-probabilities of the sampled tokens under the policy at rollout time.
    ref_logprobs_BxT: log-probabilities of the same tokens under the frozen reference policy.
    response_mask_BxT: nonzero on response tokens. A row without response tokens gets zero reward
      everywhere, and its score is dropped.
    kl_coef: beta, the weight of the KL penalty.
    kl_estimator: "k1" or "k3".

  Returns:
    (rewards_BxT, metrics). rewards_BxT is float32 and zero off the response. Metrics:
    `ppo/kl_sum` (the chosen estimator), `ppo/score_sum`, `ppo/rollout_tokens`,
    `ppo/rollout_responses` (rows with at least one response token), and the means `ppo/kl`
    (per token), `ppo/kl_per_response` and `ppo/score`.

  Raises:
    ValueError: if kl_estimator is unknown.
  """
  if kl_estimator not in KL_ESTIMATORS:
    raise ValueError(f"Invalid kl_estimator {kl_estimator!r}. Expected one of {KL_ESTIMATORS}.")
  mask_BxT = jnp.asarray(response_mask_BxT) != 0
  log_r_BxT = jnp.where(
      mask_BxT,
      jnp.asarray(ref_logprobs_BxT, jnp.float32) - jnp.asarray(logprobs_BxT, jnp.float32),
      0.0)
  if kl_estimator == "k1":
    kl_BxT = -log_r_BxT
  else:
    kl_BxT = jnp.expm1(log_r_BxT) - log_r_BxT

  # Position of the last response token of each row, or -1 for a row without one. one_hot of -1
  # is all zeros, so such a row receives no score.
  positions_BxT = jnp.broadcast_to(jnp.arange(mask_BxT.shape[1]), mask_BxT.shape)
  last_B = jnp.max(jnp.where(mask_BxT, positions_BxT, -1), axis=1)
  is_last_BxT = jax.nn.one_hot(last_B, mask_BxT.shape[1], dtype=bool)
  has_response_B = last_B >= 0
  scores_B = jnp.where(has_response_B, jnp.asarray(scores_B, jnp.float32).reshape(-1), 0.0)

  rewards_BxT = -kl_coef * kl_BxT + jnp.where(is_last_BxT, scores_B[:, None], 0.0)

  kl_sum = kl_BxT.sum()
  tokens = mask_BxT.sum().astype(jnp.float32)
  responses = has_response_B.sum().astype(jnp.float32)
  score_sum = scores_B.sum()
  metrics = {
      "ppo/kl_sum": kl_sum,
      "ppo/score_sum": score_sum,
      "ppo/rollout_tokens": tokens,
      "ppo/rollout_responses": responses,
      "ppo/kl": kl_sum / jnp.maximum(tokens, 1.0),
      "ppo/kl_per_response": kl_sum / jnp.maximum(responses, 1.0),
      "ppo/score": score_sum / jnp.maximum(responses, 1.0),
  }
  return rewards_BxT, metrics


def discounted_returns(
    *, rewards_BxT: ArrayLike, mask_BxT: ArrayLike, gamma: float) -> jax.Array:
  """Computes the reward-to-go G[t] = r[t] + gamma * G[t + 1] over real tokens, in float32.

  Each maximal run of real tokens is one episode that ends after its last token, so G of the last
  real token is its own reward. Masked positions are never read and get G = 0: rewards
  [1.5, 1.0, 2.0, 2.0] with mask [1, 1, 0, 0] and gamma 1 give [2.5, 1.0, 0.0, 0.0].

  Args:
    rewards_BxT: per-token rewards.
    mask_BxT: nonzero on real tokens.
    gamma: discount factor.

  Returns:
    returns_BxT.
  """
  mask_BxT = jnp.asarray(mask_BxT) != 0
  rewards_BxT = jnp.where(mask_BxT, jnp.asarray(rewards_BxT, jnp.float32), 0.0)

  def step(next_return_B, inputs):
    reward_B, real_B = inputs
    return_B = jnp.where(real_B, reward_B + gamma * next_return_B, 0.0)
    return return_B, return_B

  initial_B = jnp.zeros(rewards_BxT.shape[:1], jnp.float32)
  _, returns_TxB = jax.lax.scan(step, initial_B, (rewards_BxT.T, mask_BxT.T), reverse=True)
  return returns_TxB.T


def gae_advantages(
    *,
    rewards_BxT: ArrayLike,
    values_BxT: ArrayLike,
    mask_BxT: ArrayLike,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
  """Computes generalised advantage estimates and their value targets, in float32.

  delta[t] = r[t] + gamma * V[t + 1] - V[t] and A[t] = delta[t] + gamma * lam * A[t + 1]
  (Schulman et al., 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation", eq. 16). The value target is the lambda-return A[t] + V[t].

  Each maximal run of real tokens is one episode that ends after its last token, so V[t + 1] and
  A[t + 1] are 0 there, and no reward or value at a masked position is ever read. With mask
  [1, 1, 0], rewards [0, 1, 0], values [0, 0, 100], gamma 1 and lam 0.95 the advantages are
  [0.95, 1, 0]. Masked positions get advantage and target 0.

  Args:
    rewards_BxT: per-token rewards, e.g. from `kl_penalized_rewards`.
    values_BxT: value estimates of the states before each token, stored at rollout time.
    mask_BxT: nonzero on real tokens.
    gamma: discount factor.
    lam: GAE lambda. 1 gives the discounted return minus V, and 0 the one-step TD error.

  Returns:
    (advantages_BxT, returns_BxT).
  """
  mask_BxT = jnp.asarray(mask_BxT) != 0
  rewards_BxT = jnp.where(mask_BxT, jnp.asarray(rewards_BxT, jnp.float32), 0.0)
  values_BxT = jnp.where(mask_BxT, jnp.asarray(values_BxT, jnp.float32), 0.0)

  def step(carry, inputs):
    next_value_B, next_advantage_B = carry
    reward_B, value_B, real_B = inputs
    delta_B = reward_B + gamma * next_value_B - value_B
    advantage_B = jnp.where(real_B, delta_B + gamma * lam * next_advantage_B, 0.0)
    # value_B is already 0 at masked positions, which ends the episode for the token before.
    return (value_B, advantage_B), advantage_B

  zeros_B = jnp.zeros(rewards_BxT.shape[:1], jnp.float32)
  _, advantages_TxB = jax.lax.scan(
      step, (zeros_B, zeros_B), (rewards_BxT.T, values_BxT.T, mask_BxT.T), reverse=True)
  advantages_BxT = advantages_TxB.T
  return advantages_BxT, advantages_BxT + values_BxT


def masked_whiten(values_BxT: ArrayLike, mask_BxT: ArrayLike, *, eps: float = 1e-8) -> jax.Array:
  """Whitens values to mean 0 and variance 1 over real tokens only, in float32.

  (x - mean) / sqrt(var + eps) with the mean and the population variance taken over real tokens
  of the whole batch. Masked positions do not enter the statistics and are set to 0.

  Args:
    values_BxT: e.g. advantages.
    mask_BxT: nonzero on real tokens.
    eps: added to the variance, so that a constant input maps to 0 instead of NaN.

  Returns:
    whitened_BxT.
  """
  mask_BxT = jnp.asarray(mask_BxT) != 0
  values_BxT = jnp.where(mask_BxT, jnp.asarray(values_BxT, jnp.float32), 0.0)
  count = jnp.maximum(mask_BxT.sum(), 1).astype(jnp.float32)
  mean = values_BxT.sum() / count
  centered_BxT = jnp.where(mask_BxT, values_BxT - mean, 0.0)
  variance = jnp.square(centered_BxT).sum() / count
  return centered_BxT * jax.lax.rsqrt(variance + eps)


def ppo_policy_loss(
    *,
    logprobs_BxT: ArrayLike,
    old_logprobs_BxT: ArrayLike,
    advantages_BxT: ArrayLike,
    response_mask_BxT: ArrayLike,
    clip_epsilon: float = 0.2,
    normalizer: ArrayLike | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Computes PPO's clipped surrogate policy loss, averaged over response tokens, in float32.

  With ratio = exp(logprob - old_logprob), the per-token loss is
  max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), the negative of L^CLIP (Schulman et al.,
  2017, "Proximal Policy Optimization Algorithms", eq. 7). The KL penalty is not part of this
  loss because it is already in the rewards behind the advantages. Gradients flow through
  `logprobs_BxT` only, because old log-probabilities and advantages are constants here.

  Args:
    logprobs_BxT: log-probabilities of the sampled tokens under the policy being trained.
    old_logprobs_BxT: the same under the policy that sampled them, stored at rollout time.
    advantages_BxT: advantages, usually from `gae_advantages` and then `masked_whiten`.
    response_mask_BxT: nonzero on response tokens.
    clip_epsilon: eps, the clipping range of the ratio. Llama 2 uses 0.2.
    normalizer: scalar denominator of the average. None means the number of response tokens in
      this call, or 1 when there are none. When accumulating over micro-batches, pass the count
      of the whole minibatch.

  Returns:
    (loss, metrics). Sums with their denominator `ppo/tokens`: `ppo/policy_loss_sum`,
    `ppo/clipped_sum` (tokens with |ratio - 1| > eps), `ppo/approx_kl_sum` (the k3 estimate
    (ratio - 1) - log(ratio) of KL(pi_old || pi)), `ppo/ratio_sum`. Means of this call:
    `ppo/policy_loss`, `ppo/clip_fraction`, `ppo/approx_kl`, `ppo/ratio`. A ratio of exactly 1
    gives approximate KL 0 and clip fraction 0.
  """
  mask_BxT = jnp.asarray(response_mask_BxT) != 0
  old_logprobs_BxT = jax.lax.stop_gradient(jnp.asarray(old_logprobs_BxT, jnp.float32))
  advantages_BxT = jax.lax.stop_gradient(
      jnp.where(mask_BxT, jnp.asarray(advantages_BxT, jnp.float32), 0.0))

  log_ratio_BxT = jnp.where(
      mask_BxT, jnp.asarray(logprobs_BxT, jnp.float32) - old_logprobs_BxT, 0.0)
  ratio_BxT = jnp.exp(log_ratio_BxT)
  clipped_ratio_BxT = jnp.clip(ratio_BxT, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
  loss_BxT = jnp.maximum(-advantages_BxT * ratio_BxT, -advantages_BxT * clipped_ratio_BxT)
  loss_BxT = jnp.where(mask_BxT, loss_BxT, 0.0)

  loss, loss_sum, tokens = _normalized_sum(loss_BxT, mask_BxT, normalizer)

  ratio_BxT = jax.lax.stop_gradient(ratio_BxT)
  log_ratio_BxT = jax.lax.stop_gradient(log_ratio_BxT)
  clipped_BxT = mask_BxT & (jnp.abs(ratio_BxT - 1.0) > clip_epsilon)
  approx_kl_BxT = jnp.where(mask_BxT, (ratio_BxT - 1.0) - log_ratio_BxT, 0.0)
  sums = {
      "ppo/policy_loss_sum": jax.lax.stop_gradient(loss_sum),
      "ppo/clipped_sum": clipped_BxT.sum().astype(jnp.float32),
      "ppo/approx_kl_sum": approx_kl_BxT.sum(),
      "ppo/ratio_sum": jnp.where(mask_BxT, ratio_BxT, 0.0).sum(),
  }
  return loss, _with_token_means(sums, tokens, {
      "ppo/policy_loss": "ppo/policy_loss_sum",
      "ppo/clip_fraction": "ppo/clipped_sum",
      "ppo/approx_kl": "ppo/approx_kl_sum",
      "ppo/ratio": "ppo/ratio_sum",
  })


def ppo_value_loss(
    *,
    values_BxT: ArrayLike,
    old_values_BxT: ArrayLike,
    returns_BxT: ArrayLike,
    response_mask_BxT: ArrayLike,
    value_clip_epsilon: float | None = 0.2,
    normalizer: ArrayLike | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Computes the clipped value loss, averaged over response tokens, in float32.

  With V_clip = V_old + clip(V - V_old, -eps, eps), the per-token loss is
  0.5 * max((V - G)^2, (V_clip - G)^2), where G is the value target. This is the value clipping
  of OpenAI Baselines' PPO2, which keeps the value model within eps of the values it predicted at
  rollout time. The PPO paper itself uses the unclipped squared error (Schulman et al., 2017,
  eq. 9), which value_clip_epsilon=None gives.

  Args:
    values_BxT: predictions of the value model being trained.
    old_values_BxT: its predictions at rollout time, the ones `gae_advantages` used.
    returns_BxT: value targets, e.g. the lambda-returns from `gae_advantages`.
    response_mask_BxT: nonzero on response tokens.
    value_clip_epsilon: eps in the units of the rewards, or None for no clipping.
    normalizer: denominator of the average, as in `ppo_policy_loss`.

  Returns:
    (loss, metrics). Sums with their denominator `ppo/tokens`: `ppo/value_loss_sum`,
    `ppo/value_error_sum` (unclipped squared error (V - G)^2), `ppo/value_clipped_sum` (tokens
    where the clipped term is the larger). Means of this call: `ppo/value_loss`,
    `ppo/value_error`, `ppo/value_clip_fraction`.
  """
  mask_BxT = jnp.asarray(response_mask_BxT) != 0
  values_BxT = jnp.where(mask_BxT, jnp.asarray(values_BxT, jnp.float32), 0.0)
  old_values_BxT = jax.lax.stop_gradient(
      jnp.where(mask_BxT, jnp.asarray(old_values_BxT, jnp.float32), 0.0))
  returns_BxT = jax.lax.stop_gradient(
      jnp.where(mask_BxT, jnp.asarray(returns_BxT, jnp.float32), 0.0))

  squared_error_BxT = jnp.square(values_BxT - returns_BxT)
  if value_clip_epsilon is None:
    clipped_error_BxT = squared_error_BxT
  else:
    clipped_values_BxT = old_values_BxT + jnp.clip(
        values_BxT - old_values_BxT, -value_clip_epsilon, value_clip_epsilon)
    clipped_error_BxT = jnp.square(clipped_values_BxT - returns_BxT)
  loss_BxT = jnp.where(mask_BxT, 0.5 * jnp.maximum(squared_error_BxT, clipped_error_BxT), 0.0)

  loss, loss_sum, tokens = _normalized_sum(loss_BxT, mask_BxT, normalizer)

  squared_error_BxT = jax.lax.stop_gradient(squared_error_BxT)
  clipped_BxT = mask_BxT & (jax.lax.stop_gradient(clipped_error_BxT) > squared_error_BxT)
  sums = {
      "ppo/value_loss_sum": jax.lax.stop_gradient(loss_sum),
      "ppo/value_error_sum": jnp.where(mask_BxT, squared_error_BxT, 0.0).sum(),
      "ppo/value_clipped_sum": clipped_BxT.sum().astype(jnp.float32),
  }
  return loss, _with_token_means(sums, tokens, {
      "ppo/value_loss": "ppo/value_loss_sum",
      "ppo/value_error": "ppo/value_error_sum",
      "ppo/value_clip_fraction": "ppo/value_clipped_sum",
  })


def token_entropy(logits_BxTxV: ArrayLike) -> jax.Array:
  """Computes the entropy -sum_v p log p of each position's distribution, in float32.

  Uses H = logsumexp(l) - sum_v softmax(l)_v * l_v, which needs no log of a probability that
  rounds to 0.
  """
  logits_BxTxV = jnp.asarray(logits_BxTxV, jnp.float32)
  probs_BxTxV = jax.nn.softmax(logits_BxTxV, axis=-1)
  return jax.nn.logsumexp(logits_BxTxV, axis=-1) - (probs_BxTxV * logits_BxTxV).sum(axis=-1)


def masked_entropy(
    *,
    logits_BxTxV: ArrayLike,
    response_mask_BxT: ArrayLike,
    normalizer: ArrayLike | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Averages the policy's entropy over response tokens, in float32.

  PPO adds it to the objective as an exploration bonus (Schulman et al., 2017, eq. 9), so a step
  minimises policy_loss - entropy_coef * entropy.

  Args:
    logits_BxTxV: policy logits of any float dtype, upcast to float32.
    response_mask_BxT: nonzero on response tokens.
    normalizer: denominator of the average, as in `ppo_policy_loss`.

  Returns:
    (entropy, metrics): `ppo/entropy_sum` with its denominator `ppo/tokens`, and the mean
    `ppo/entropy` of this call.
  """
  mask_BxT = jnp.asarray(response_mask_BxT) != 0
  entropy_BxT = jnp.where(mask_BxT, token_entropy(logits_BxTxV), 0.0)
  entropy, entropy_sum, tokens = _normalized_sum(entropy_BxT, mask_BxT, normalizer)
  sums = {"ppo/entropy_sum": jax.lax.stop_gradient(entropy_sum)}
  metrics = _with_token_means(sums, tokens, {"ppo/entropy": "ppo/entropy_sum"})
  return entropy, metrics


def _normalized_sum(values_BxT: jax.Array, mask_BxT: jax.Array, normalizer):
  """Returns (sum / normalizer, sum, token count) of values already zeroed off the mask.

  A `normalizer` of None means the number of real tokens (at least 1).
  """
  tokens = mask_BxT.sum().astype(jnp.float32)
  if normalizer is None:
    normalizer = jnp.maximum(tokens, 1.0)
  total = values_BxT.sum()
  return total / jnp.asarray(normalizer, jnp.float32), total, tokens


def _with_token_means(
    sums: dict[str, jax.Array],
    tokens: jax.Array,
    means: dict[str, str],
) -> dict[str, jax.Array]:
  """Adds `ppo/tokens` and, for each `mean key: sum key` pair, the per-token mean."""
  metrics = {**sums, "ppo/tokens": tokens}
  denominator = jnp.maximum(tokens, 1.0)
  for mean_key, sum_key in means.items():
    metrics[mean_key] = sums[sum_key] / denominator
  return metrics
