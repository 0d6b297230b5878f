"""Rejection sampling: best-of-K selection, a pool of the best samples, and reward against K.

Llama 2-Chat's rejection-sampling fine-tuning samples K responses per prompt, scores them with
the reward model and fine-tunes on the best one of each prompt. From its third RLHF round on, the
candidates also include the best samples of all earlier rounds, which `update_pool` keeps. The
gain from sampling more is read off the maximum and median reward among the first K samples as
K grows (Touvron et al., 2023, section 3.2.3 and its figure 7).

Axis letters: P is the prompt and K the sample of a prompt. Metric keys start with `rs/`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


class BestOfK(NamedTuple):
  """Best sample of each prompt.

  Attributes:
    index_P: int32 index of the best sample in [0, K), or -1 for a prompt without a valid sample.
    reward_P: float32 reward of that sample, or -inf for a prompt without a valid sample.
  """

  index_P: jax.Array
  reward_P: jax.Array


class SamplePool(NamedTuple):
  """Best sample found so far for each prompt, over all rounds of rejection sampling.

  Attributes:
    reward_P: float32 reward of the pooled sample, -inf where no round had a valid sample. The
      reward is the one recorded in the sample's round, so rescore the pool when the reward
      model changes between rounds.
    round_P: int32 round in which the pooled sample was drawn, -1 where the pool is empty.
    samples_P: pytree whose leaves have shape [P, ...], e.g. token ids [P, L]. Empty entries are
      zeros.
  """

  reward_P: jax.Array
  round_P: jax.Array
  samples_P: Any


def select_best_of_k(
    *,
    rewards_PxK: ArrayLike,
    sample_mask_PxK: ArrayLike | None = None,
) -> tuple[BestOfK, dict[str, jax.Array]]:
  """Selects the sample with the highest reward for each prompt.

  Ties go to the lowest sample index.

  Args:
    rewards_PxK: reward of each sample.
    sample_mask_PxK: nonzero for samples that may be selected. The others (failed generations,
      a ragged K) are ignored whatever their reward. None means every sample is valid.

  Returns:
    (best, metrics). Metrics: `rs/best_reward_sum` and its denominator `rs/prompts` (prompts with
    a valid sample), and their mean `rs/best_reward`.
  """
  rewards_PxK = jnp.asarray(rewards_PxK, jnp.float32)
  if rewards_PxK.ndim != 2:
    raise ValueError(f"rewards_PxK must have shape [P, K], got {rewards_PxK.shape}.")
  valid_PxK = jnp.ones(rewards_PxK.shape, bool)
  if sample_mask_PxK is not None:
    valid_PxK = jnp.asarray(sample_mask_PxK) != 0

  candidates_PxK = jnp.where(valid_PxK, rewards_PxK, -jnp.inf)
  has_sample_P = valid_PxK.any(axis=1)
  index_P = jnp.where(has_sample_P, jnp.argmax(candidates_PxK, axis=1), -1).astype(jnp.int32)
  reward_P = jnp.where(has_sample_P, candidates_PxK.max(axis=1), -jnp.inf)

  prompts = has_sample_P.sum().astype(jnp.float32)
  best_reward_sum = jnp.where(has_sample_P, reward_P, 0.0).sum()
  metrics = {
      "rs/best_reward_sum": best_reward_sum,
      "rs/prompts": prompts,
      "rs/best_reward": best_reward_sum / jnp.maximum(prompts, 1.0),
  }
  return BestOfK(index_P=index_P, reward_P=reward_P), metrics


def update_pool(
    pool: SamplePool | None,
    *,
    rewards_PxK: ArrayLike,
    samples_PxK: Any,
    round_index: int,
    sample_mask_PxK: ArrayLike | None = None,
) -> tuple[SamplePool, dict[str, jax.Array]]:
  """Merges one round's best samples into the pool of best samples of earlier rounds.

  A prompt's pooled sample is replaced only by a strictly better one, so on a tie the earlier
  round's sample stays.

  Args:
    pool: the pool after earlier rounds, or None before the first round.
    rewards_PxK: reward of each sample of this round.
    samples_PxK: pytree of this round's samples with leaves of shape [P, K, ...].
    round_index: number of this round, stored with the samples it contributes.
    sample_mask_PxK: nonzero for valid samples, as in `select_best_of_k`.

  Returns:
    (pool, metrics). Metrics: `rs/pool_reward_sum` over prompts with a pooled sample,
    `rs/pool_prompts` (that count), `rs/pool_replaced_sum` (prompts whose pooled sample now comes
    from this round) and the mean `rs/pool_reward`.
  """
  best, _ = select_best_of_k(rewards_PxK=rewards_PxK, sample_mask_PxK=sample_mask_PxK)
  has_sample_P = best.index_P >= 0
  gather_index_P = jnp.maximum(best.index_P, 0)

  def take_best(leaf_PxKx):
    leaf_PxKx = jnp.asarray(leaf_PxKx)
    rows = jnp.arange(leaf_PxKx.shape[0])
    best_leaf = leaf_PxKx[rows, gather_index_P]
    return jnp.where(_expand_like(has_sample_P, best_leaf), best_leaf, 0)

  round_best = SamplePool(
      reward_P=best.reward_P,
      round_P=jnp.where(has_sample_P, round_index, -1).astype(jnp.int32),
      samples_P=jax.tree.map(take_best, samples_PxK))

  if pool is None:
    new_pool = round_best
    replaced_P = has_sample_P
  else:
    replaced_P = round_best.reward_P > pool.reward_P
    new_pool = jax.tree.map(
        lambda new, old: jnp.where(_expand_like(replaced_P, new), new, old), round_best, pool)

  pooled_P = new_pool.round_P >= 0
  pool_prompts = pooled_P.sum().astype(jnp.float32)
  pool_reward_sum = jnp.where(pooled_P, new_pool.reward_P, 0.0).sum()
  metrics = {
      "rs/pool_reward_sum": pool_reward_sum,
      "rs/pool_prompts": pool_prompts,
      "rs/pool_replaced_sum": replaced_P.sum().astype(jnp.float32),
      "rs/pool_reward": pool_reward_sum / jnp.maximum(pool_prompts, 1.0),
  }
  return new_pool, metrics


class RewardByK(NamedTuple):
  """Maximum and median reward among the first k samples, averaged over prompts.

  Attributes:
    k: int numpy array of the sample counts, shape [N].
    max_reward: float32, shape [N].
    median_reward: float32, shape [N]. For even k the median is the mean of the two middle values.
  """

  k: np.ndarray
  max_reward: jax.Array
  median_reward: jax.Array


def reward_by_num_samples(
    *, rewards_PxK: ArrayLike, ks: Sequence[int] | None = None) -> RewardByK:
  """Measures how the best and the typical reward grow with the number of samples per prompt.

  For each k, takes the first k samples of every prompt, computes their maximum and median
  reward, and averages both over prompts. Samples of a prompt are drawn independently, so the
  first k are a random draw of k. Every sample must be scored: there is no sample mask.

  Args:
    rewards_PxK: reward of each sample.
    ks: sample counts in [1, K]. None means 1, 2, ..., K.

  Returns:
    The curves as a `RewardByK`.

  Raises:
    ValueError: if rewards_PxK is not 2-D or a k is outside [1, K].
  """
  rewards_PxK = jnp.asarray(rewards_PxK, jnp.float32)
  if rewards_PxK.ndim != 2:
    raise ValueError(f"rewards_PxK must have shape [P, K], got {rewards_PxK.shape}.")
  num_samples = rewards_PxK.shape[1]
  ks = np.arange(1, num_samples + 1) if ks is None else np.asarray(ks, int)
  invalid = [int(k) for k in ks if not 1 <= k <= num_samples]
  if invalid:
    raise ValueError(f"ks must lie in [1, K] = [1, {num_samples}], got {invalid}.")

  running_max_PxK = jax.lax.cummax(rewards_PxK, axis=1)
  max_reward_N = running_max_PxK[:, ks - 1].mean(axis=0)
  median_reward_N = jnp.stack(
      [jnp.median(rewards_PxK[:, :k], axis=1).mean() for k in ks.tolist()])
  return RewardByK(k=ks, max_reward=max_reward_N, median_reward=median_reward_N)


def _expand_like(mask_P: jax.Array, leaf: jax.Array) -> jax.Array:
  """Reshapes a [P] mask to broadcast against a leaf of shape [P, ...]."""
  return mask_P.reshape(mask_P.shape + (1,) * (jnp.ndim(leaf) - 1))
