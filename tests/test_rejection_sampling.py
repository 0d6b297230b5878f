"""Tests of best-of-K selection, the pool of best samples and the reward-against-K curves."""

import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.losses import reward_by_num_samples, select_best_of_k, update_pool

REWARDS_PxK = jnp.asarray([[0.1, 0.9, 0.4], [2.0, -1.0, 2.0]])


def test_best_of_k_picks_maximum():
  # Prompt 1 has a tie between samples 0 and 2, which the lower index wins.
  best, metrics = select_best_of_k(rewards_PxK=REWARDS_PxK)
  np.testing.assert_array_equal(best.index_P, [1, 0])
  np.testing.assert_allclose(best.reward_P, [0.9, 2.0])
  assert metrics["rs/best_reward_sum"] == pytest.approx(2.9)
  assert metrics["rs/prompts"] == 2


def test_best_of_k_skips_masked_samples():
  best, _ = select_best_of_k(
      rewards_PxK=REWARDS_PxK, sample_mask_PxK=jnp.asarray([[1, 0, 1], [0, 1, 1]]))
  np.testing.assert_array_equal(best.index_P, [2, 2])
  np.testing.assert_allclose(best.reward_P, [0.4, 2.0])


def test_prompt_without_samples_is_marked():
  best, metrics = select_best_of_k(
      rewards_PxK=REWARDS_PxK, sample_mask_PxK=jnp.asarray([[0, 0, 0], [1, 1, 1]]))
  assert best.index_P[0] == -1
  assert best.reward_P[0] == -np.inf
  assert metrics["rs/prompts"] == 1
  assert metrics["rs/best_reward"] == pytest.approx(2.0)


def test_first_round_fills_pool():
  tokens_PxKxL = jnp.arange(2 * 3 * 2).reshape(2, 3, 2)
  pool, metrics = update_pool(
      None, rewards_PxK=REWARDS_PxK, samples_PxK={"tokens": tokens_PxKxL}, round_index=0)
  np.testing.assert_array_equal(pool.samples_P["tokens"], [[2, 3], [6, 7]])
  np.testing.assert_array_equal(pool.round_P, [0, 0])
  assert metrics["rs/pool_replaced_sum"] == 2


def test_pool_keeps_best_across_rounds():
  tokens_PxKxL = jnp.arange(2 * 3 * 2).reshape(2, 3, 2)
  pool, _ = update_pool(
      None, rewards_PxK=REWARDS_PxK, samples_PxK={"tokens": tokens_PxKxL}, round_index=0)

  # Round 1 beats prompt 0 (1.5 > 0.9) with sample 2, and only ties prompt 1 (2.0).
  pool, metrics = update_pool(
      pool, rewards_PxK=jnp.asarray([[0.0, 0.2, 1.5], [2.0, 1.0, 0.0]]),
      samples_PxK={"tokens": 100 + tokens_PxKxL}, round_index=1)

  np.testing.assert_allclose(pool.reward_P, [1.5, 2.0])
  np.testing.assert_array_equal(pool.round_P, [1, 0])
  np.testing.assert_array_equal(pool.samples_P["tokens"], [[104, 105], [6, 7]])
  assert metrics["rs/pool_replaced_sum"] == 1
  assert metrics["rs/pool_reward"] == pytest.approx(1.75)


def test_empty_round_keeps_pool():
  pool, _ = update_pool(
      None, rewards_PxK=REWARDS_PxK, samples_PxK=jnp.ones((2, 3)), round_index=0)
  pool, metrics = update_pool(
      pool, rewards_PxK=jnp.full((2, 3), 99.0), samples_PxK=jnp.zeros((2, 3)), round_index=1,
      sample_mask_PxK=jnp.zeros((2, 3)))
  np.testing.assert_array_equal(pool.round_P, [0, 0])
  np.testing.assert_allclose(pool.reward_P, [0.9, 2.0])
  assert metrics["rs/pool_replaced_sum"] == 0


def test_empty_first_round_leaves_gap():
  pool, metrics = update_pool(
      None, rewards_PxK=REWARDS_PxK, samples_PxK=jnp.ones((2, 3)), round_index=0,
      sample_mask_PxK=jnp.asarray([[0, 0, 0], [1, 1, 1]]))
  assert pool.round_P[0] == -1
  assert pool.samples_P[0] == 0
  assert metrics["rs/pool_prompts"] == 1


def test_reward_curve_hand_computed():
  # Prompt 0 samples [3, 1, 2, 5]: maxima of the first k = [3, 3, 3, 5], medians [3, 2, 2, 2.5].
  # Prompt 1 samples [0, 4, 1, 1]: maxima [0, 4, 4, 4], medians [0, 2, 1, 1].
  curve = reward_by_num_samples(rewards_PxK=jnp.asarray([[3.0, 1.0, 2.0, 5.0],
                                                         [0.0, 4.0, 1.0, 1.0]]))
  np.testing.assert_array_equal(curve.k, [1, 2, 3, 4])
  np.testing.assert_allclose(curve.max_reward, [1.5, 3.5, 3.5, 4.5])
  np.testing.assert_allclose(curve.median_reward, [1.5, 2.0, 1.5, 1.75])


def test_reward_curve_selected_ks():
  curve = reward_by_num_samples(rewards_PxK=jnp.asarray([[3.0, 1.0, 2.0, 5.0]]), ks=[1, 4])
  np.testing.assert_allclose(curve.max_reward, [3.0, 5.0])
  np.testing.assert_allclose(curve.median_reward, [3.0, 2.5])


def test_max_reward_never_decreases():
  rewards = np.random.default_rng(0).normal(size=(8, 6))
  curve = reward_by_num_samples(rewards_PxK=rewards)
  assert np.all(np.diff(curve.max_reward) >= 0)


def test_reward_curve_rejects_large_k():
  with pytest.raises(ValueError, match=r"\[1, 4\], got \[5\]"):
    reward_by_num_samples(rewards_PxK=jnp.zeros((1, 4)), ks=[1, 5])
