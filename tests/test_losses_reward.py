"""Tests of the reward-model ranking loss, the rating margins and the PPO reward combination."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax import losses
from llama2_jax.losses import Rating, RewardStatistics

# Jitted once per shape: compiling a whole function is faster on CPU than dispatching op by op.
ranking_loss = jax.jit(losses.ranking_loss)
combine = jax.jit(
    losses.combine_safety_and_helpfulness_rewards,
    static_argnames=("helpfulness_statistics", "safety_statistics", "safety_threshold"))


def _loss_of_chosen(chosen, rejected, margins=None):
  return ranking_loss(
      chosen_rewards_B=chosen, rejected_rewards_B=rejected, margins_B=margins)[0]


@pytest.mark.parametrize("shape", [(2,), (2, 1)])
def test_per_pair_margins(shape):
  # Gaps minus margins are 2 - 1 - 0.5 = 0.5 and 0 - 1 - 0 = -1, so the per-pair losses are
  # softplus(-0.5) = log(1 + e^-0.5) = 0.474077 and softplus(1) = log(1 + e) = 1.313262, and
  # their mean is 0.893669.
  loss, metrics = ranking_loss(
      chosen_rewards_B=jnp.asarray([2.0, 0.0]).reshape(shape),
      rejected_rewards_B=jnp.asarray([1.0, 1.0]).reshape(shape),
      margins_B=jnp.asarray([0.5, 0.0]).reshape(shape))
  assert loss == pytest.approx(0.893669, abs=1e-6)
  assert metrics["reward/loss_sum"] == pytest.approx(0.474077 + 1.313262, abs=1e-6)


def test_large_negative_gap_is_finite():
  # softplus(100) = 100 + log(1 + e^-100), which is 100 in float32.
  loss = _loss_of_chosen(jnp.asarray([0.0]), jnp.asarray([100.0]))
  assert loss == pytest.approx(100.0)


def test_saturated_gap_has_unit_gradient():
  # d softplus(r_r - r_c) / d r_c = -sigmoid(r_r - r_c) = -sigmoid(100), which is -1.
  chosen, rejected = jnp.asarray([-50.0]), jnp.asarray([50.0])
  assert _loss_of_chosen(chosen, rejected) == pytest.approx(100.0)
  assert jax.grad(_loss_of_chosen)(chosen, rejected)[0] == pytest.approx(-1.0)
  assert jax.grad(_loss_of_chosen, argnums=1)(chosen, rejected)[0] == pytest.approx(1.0)


def test_equal_rewards_give_log_two():
  # softplus(0) = log 2, and a tie is not counted as correct.
  loss, metrics = ranking_loss(
      chosen_rewards_B=jnp.asarray([0.3]), rejected_rewards_B=jnp.asarray([0.3]))
  assert loss == pytest.approx(math.log(2.0))
  assert metrics["reward/accuracy"] == 0.0


def test_gap_equal_to_margin_gives_log_two():
  # At the margin boundary r_c - r_r = m the sigmoid's argument is 0.
  loss = _loss_of_chosen(jnp.asarray([3.0]), jnp.asarray([1.0]), jnp.asarray([2.0]))
  assert loss == pytest.approx(math.log(2.0))


def test_gradient_matches_finite_differences():
  chosen = jnp.asarray([0.7, -1.2, 2.0])
  rejected = jnp.asarray([0.1, 0.4, -0.5])
  margins = jnp.asarray([1.0, 0.0, 1.0 / 3.0])
  grad = jax.grad(_loss_of_chosen)(chosen, rejected, margins)
  step = 1e-2
  for i in range(3):
    bump = jnp.asarray(np.eye(3)[i] * step, jnp.float32)
    numeric = (_loss_of_chosen(chosen + bump, rejected, margins)
               - _loss_of_chosen(chosen - bump, rejected, margins)) / (2 * step)
    assert grad[i] == pytest.approx(float(numeric), abs=1e-3), i


def test_gradient_matches_analytic():
  chosen = jnp.asarray([0.7, -1.2])
  rejected = jnp.asarray([0.1, 0.4])
  margins = jnp.asarray([1.0, 0.0])
  # d/dr_c of mean_b softplus(-(r_c - r_r - m)) is -sigmoid(-(r_c - r_r - m)) / B.
  expected = -jax.nn.sigmoid(-(chosen - rejected - margins)) / 2
  np.testing.assert_allclose(jax.grad(_loss_of_chosen)(chosen, rejected, margins), expected,
                             rtol=1e-6)


def test_masked_pairs_change_nothing():
  chosen, rejected = jnp.asarray([2.0, 0.0]), jnp.asarray([1.0, 1.0])
  ratings = jnp.asarray([Rating.BETTER, Rating.UNKNOWN])
  loss, metrics = ranking_loss(
      chosen_rewards_B=chosen, rejected_rewards_B=rejected, ratings_B=ratings)

  noise = jnp.asarray(1e6 * np.random.default_rng(0).normal(size=(3, 3)), jnp.float32)
  padded_loss, padded_metrics = ranking_loss(
      chosen_rewards_B=jnp.concatenate([chosen, noise[0]]),
      rejected_rewards_B=jnp.concatenate([rejected, noise[1]]),
      margins_B=jnp.concatenate([jnp.zeros(2), noise[2]]),
      ratings_B=jnp.concatenate([ratings, jnp.asarray([0, 1, 99])]),
      pair_mask_B=jnp.asarray([1, 1, 0, 0, 0]))

  assert padded_loss == pytest.approx(float(loss), rel=1e-6)
  assert padded_metrics.keys() == metrics.keys()
  for key, value in metrics.items():
    assert padded_metrics[key] == pytest.approx(float(value), rel=1e-6), key


def test_all_masked_pairs_give_zero():
  loss, metrics = ranking_loss(
      chosen_rewards_B=jnp.asarray([1.0]), rejected_rewards_B=jnp.asarray([2.0]),
      pair_mask_B=jnp.asarray([0]))
  assert loss == 0.0
  assert metrics["reward/pairs"] == 0
  assert metrics["reward/accuracy"] == 0.0


def test_normalizer_splits_batch_exactly():
  chosen, rejected = jnp.asarray([2.0, 0.0, 1.0]), jnp.asarray([1.0, 1.0, -3.0])
  full = _loss_of_chosen(chosen, rejected)
  split = [
      ranking_loss(chosen_rewards_B=chosen[rows], rejected_rewards_B=rejected[rows],
                   normalizer=3.0)[0]
      for rows in (slice(0, 1), slice(1, 3))]
  assert sum(split) == pytest.approx(float(full), rel=1e-6)


def test_accuracy_per_rating():
  # Pair 0 (better) is right, pair 1 (better) wrong, pair 2 (unknown) right.
  _, metrics = ranking_loss(
      chosen_rewards_B=jnp.asarray([2.0, 0.0, 5.0]),
      rejected_rewards_B=jnp.asarray([1.0, 1.0, 4.0]),
      ratings_B=jnp.asarray([Rating.BETTER, Rating.BETTER, Rating.UNKNOWN]))
  assert metrics["reward/correct_sum"] == 2
  assert metrics["reward/accuracy"] == pytest.approx(2 / 3)
  assert metrics["reward/correct_sum/better"] == 1
  assert metrics["reward/pairs/better"] == 2
  assert metrics["reward/correct_sum/unknown"] == 1
  assert metrics["reward/pairs/unknown"] == 1
  assert metrics["reward/pairs/significantly_better"] == 0


def test_mean_chosen_and_rejected():
  _, metrics = ranking_loss(
      chosen_rewards_B=jnp.asarray([2.0, 0.0]), rejected_rewards_B=jnp.asarray([1.0, -3.0]))
  assert metrics["reward/chosen_mean"] == pytest.approx(1.0)
  assert metrics["reward/rejected_mean"] == pytest.approx(-1.0)


def test_rating_ids_are_stable():
  assert [rating.value for rating in Rating] == [0, 1, 2, 3, 4]
  assert Rating.NEGLIGIBLY_BETTER_OR_UNSURE == 3


@pytest.mark.parametrize("preset, expected", [
    ("small", [1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0]),
    ("large", [3.0, 2.0, 1.0, 0.0, 0.0]),
    ("none", [0.0, 0.0, 0.0, 0.0, 0.0]),
])
def test_margin_presets(preset, expected):
  ratings = jnp.asarray([rating.value for rating in Rating])
  np.testing.assert_allclose(losses.rating_margins(ratings, preset=preset), expected, rtol=1e-6)


def test_margins_accept_column_shape():
  margins = losses.rating_margins(jnp.asarray([[0], [2]]), preset="large")
  np.testing.assert_array_equal(margins, [3.0, 1.0])


def test_invalid_rating_gives_nan_margin():
  margins = losses.rating_margins(jnp.asarray([1, 7, -1]), preset="small")
  assert margins[0] == pytest.approx(2.0 / 3.0)
  assert np.isnan(margins[1])
  assert np.isnan(margins[2])


def test_unknown_preset_raises():
  with pytest.raises(ValueError, match="'medium'.*'large', 'none', 'small'"):
    losses.rating_margins(jnp.asarray([0]), preset="medium")


def test_mismatched_pairs_raise():
  with pytest.raises(ValueError, match="2 pairs.*3"):
    losses.ranking_loss(chosen_rewards_B=jnp.zeros(2), rejected_rewards_B=jnp.zeros(3))


def test_matrix_rewards_raise():
  with pytest.raises(ValueError, match=r"chosen_rewards_B must have shape \[B\] or \[B, 1\]"):
    losses.ranking_loss(chosen_rewards_B=jnp.zeros((2, 2)), rejected_rewards_B=jnp.zeros(2))


HELPFULNESS_STATISTICS = RewardStatistics(mean=0.5, std=2.0)
SAFETY_STATISTICS = RewardStatistics(mean=-0.5, std=0.5)


def test_combination_picks_and_whitens():
  # logit(0.15) = log(0.15 / 0.85) = -1.7346.
  # Row 0 is a safety prompt: safety score -1.0 whitens to (-1.0 + 0.5) / 0.5 = -1.
  # Row 1 has safety score -3.0 < -1.7346: (-3.0 + 0.5) / 0.5 = -5.
  # Row 2 has safety score 1.0 and no tag: helpfulness (2.0 - 0.5) / 2.0 = 0.75.
  rewards, metrics = combine(
      helpfulness_scores_B=jnp.asarray([2.0, 2.0, 2.0]),
      safety_scores_B=jnp.asarray([-1.0, -3.0, 1.0]),
      is_safety_prompt_B=jnp.asarray([True, False, False]),
      helpfulness_statistics=HELPFULNESS_STATISTICS,
      safety_statistics=SAFETY_STATISTICS)
  np.testing.assert_allclose(rewards, [-1.0, -5.0, 0.75], rtol=1e-6)
  assert metrics["ppo/safety_selected_sum"] == 2
  assert metrics["ppo/scored_responses"] == 3


def test_combination_threshold_is_configurable():
  # logit(0.5) = 0, so a safety score of -0.1 now overrides helpfulness.
  rewards, _ = combine(
      helpfulness_scores_B=jnp.asarray([2.0]), safety_scores_B=jnp.asarray([-0.1]),
      is_safety_prompt_B=jnp.asarray([False]), helpfulness_statistics=HELPFULNESS_STATISTICS,
      safety_statistics=SAFETY_STATISTICS, safety_threshold=0.5)
  assert rewards[0] == pytest.approx((-0.1 + 0.5) / 0.5)


def test_combination_finite_for_saturated_scores():
  # sigmoid(30) is 1.0 in float32, and logit(1.0) would be inf.
  rewards, _ = combine(
      helpfulness_scores_B=jnp.asarray([30.0]), safety_scores_B=jnp.asarray([30.0]),
      is_safety_prompt_B=jnp.asarray([False]), helpfulness_statistics=HELPFULNESS_STATISTICS,
      safety_statistics=SAFETY_STATISTICS)
  assert rewards[0] == pytest.approx((30.0 - 0.5) / 2.0)


def test_measured_statistics_whiten_training_scores():
  # Training scores [0.5, 2, -1, 3.5] have mean 1.25 and population variance
  # (0.75^2 + 0.75^2 + 2.25^2 + 2.25^2) / 4 = 2.8125, so std 1.6770510, and they whiten to
  # [-0.75, 0.75, -2.25, 2.25] / 1.6770510. A safety score of 5 is above logit(0.15) = -1.73,
  # so the helpfulness score is used everywhere.
  scores = jnp.asarray([0.5, 2.0, -1.0, 3.5])
  statistics = RewardStatistics.measure(scores)
  rewards, metrics = combine(
      helpfulness_scores_B=scores, safety_scores_B=jnp.full(4, 5.0),
      is_safety_prompt_B=jnp.zeros(4), helpfulness_statistics=statistics,
      safety_statistics=SAFETY_STATISTICS)
  np.testing.assert_allclose(rewards, [-0.4472136, 0.4472136, -1.3416408, 1.3416408], rtol=1e-5)
  assert metrics["ppo/safety_selected_sum"] == 0


def test_combination_rejects_bad_threshold():
  with pytest.raises(ValueError, match="safety_threshold must be in \\(0, 1\\), got 1.5"):
    losses.combine_safety_and_helpfulness_rewards(
        helpfulness_scores_B=jnp.zeros(1), safety_scores_B=jnp.zeros(1),
        is_safety_prompt_B=jnp.zeros(1), helpfulness_statistics=HELPFULNESS_STATISTICS,
        safety_statistics=SAFETY_STATISTICS, safety_threshold=1.5)


def test_statistics_measure_scores():
  statistics = RewardStatistics.measure(np.asarray([1.0, 3.0]))
  assert statistics.mean == pytest.approx(2.0)
  assert statistics.std == pytest.approx(1.0)


@pytest.mark.parametrize("std", [0.0, -1.0, float("nan")])
def test_statistics_reject_bad_std(std):
  with pytest.raises(ValueError, match="RewardStatistics.std must be positive"):
    RewardStatistics(mean=0.0, std=std)
