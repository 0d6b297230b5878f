"""Reward-model ranking loss, rating-based margins and the reward that PPO optimises.

Axis letter B is the batch of preference pairs (or of responses, for the PPO reward). Chosen and
rejected rewards are separate arguments with the same shape, [B] or [B, 1].

Sources: Touvron et al., 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models". Section
3.2.2 gives the binary ranking loss (eq. 1) and its margin m(r) for the annotators' preference
rating (eq. 2). Its appendix lists the two margin variants in `MARGIN_PRESETS`. Section 3.2.3
defines the piecewise combination of the safety and helpfulness rewards and its whitening.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


class Rating(enum.IntEnum):
  """Annotator's rating of how much better the chosen response is, with its integer id.

  The first four are the Llama 2 annotation levels. UNKNOWN is for pairs from datasets without a
  rating, and its margin is 0 in every preset.
  """

  SIGNIFICANTLY_BETTER = 0
  BETTER = 1
  SLIGHTLY_BETTER = 2
  NEGLIGIBLY_BETTER_OR_UNSURE = 3
  UNKNOWN = 4


# Margin m(rating) per preset, indexed by Rating id.
MARGIN_PRESETS: Mapping[str, tuple[float, ...]] = {
    "none": (0.0, 0.0, 0.0, 0.0, 0.0),
    "small": (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0),
    "large": (3.0, 2.0, 1.0, 0.0, 0.0),
}


def rating_margins(ratings_B: ArrayLike, *, preset: str) -> jax.Array:
  """Looks up the margin of each pair's rating in a preset of `MARGIN_PRESETS`.

  Args:
    ratings_B: integer `Rating` ids, shape [B] or [B, 1].
    preset: "none", "small" or "large".

  Returns:
    margins_B in float32. An id outside the `Rating` range gives NaN, so a corrupt rating makes
    the loss NaN instead of silently taking another class's margin.

  Raises:
    ValueError: if the preset is unknown.
  """
  if preset not in MARGIN_PRESETS:
    raise ValueError(
        f"Invalid margin preset {preset!r}. Expected one of {sorted(MARGIN_PRESETS)}.")
  table = jnp.asarray(MARGIN_PRESETS[preset], jnp.float32)
  ratings_B = _as_vector(ratings_B, "ratings_B", dtype=jnp.int32)
  known_B = (ratings_B >= 0) & (ratings_B < len(Rating))
  return jnp.where(known_B, table[jnp.clip(ratings_B, 0, len(Rating) - 1)], jnp.nan)


def ranking_loss(
    *,
    chosen_rewards_B: ArrayLike,
    rejected_rewards_B: ArrayLike,
    margins_B: ArrayLike | None = None,
    ratings_B: ArrayLike | None = None,
    pair_mask_B: ArrayLike | None = None,
    normalizer: ArrayLike | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Computes the binary ranking loss with margin of a reward model, in float32.

  loss_b = -log(sigmoid(r_chosen - r_rejected - m)) = softplus(-(r_chosen - r_rejected - m))
  (Touvron et al., 2023, eq. 2, of which eq. 1 is the case m = 0). The softplus form stays finite
  for any gap: a gap of -100 gives 100, not inf. The loss is the sum over real pairs divided by
  `normalizer`.

  Args:
    chosen_rewards_B: scalar reward of each chosen response, shape [B] or [B, 1].
    rejected_rewards_B: scalar reward of each rejected response, same shape.
    margins_B: margin m of each pair, shape [B] or [B, 1], e.g. from `rating_margins`. None
      means 0.
    ratings_B: integer `Rating` id of each pair. Used only for the per-rating accuracy metrics,
      which are left out when it is None.
    pair_mask_B: nonzero for real pairs. Padding pairs change no loss, metric or gradient.
      None means every pair is real.
    normalizer: scalar denominator of the average. None means the number of real pairs in this
      call, or 1 when there are none. When accumulating gradients over micro-batches, pass the
      pair count of the whole batch.

  Returns:
    (loss, metrics). Sums with their denominators: `reward/loss_sum`, `reward/correct_sum` (pairs
    with r_chosen > r_rejected, so ties count as wrong whatever the margin), `reward/chosen_sum`,
    `reward/rejected_sum`, `reward/pairs`, and per rating name (e.g. `better`)
    `reward/correct_sum/<name>` and `reward/pairs/<name>`. Means of this call: `reward/loss`,
    `reward/accuracy`, `reward/chosen_mean`, `reward/rejected_mean`.
  """
  chosen_B = _as_vector(chosen_rewards_B, "chosen_rewards_B")
  rejected_B = _as_vector(rejected_rewards_B, "rejected_rewards_B")
  if chosen_B.shape != rejected_B.shape:
    raise ValueError(
        f"chosen_rewards_B has {chosen_B.shape[0]} pairs but rejected_rewards_B has "
        f"{rejected_B.shape[0]}. Pass one rejected reward per chosen reward.")
  margin_B = jnp.zeros_like(chosen_B) if margins_B is None else _as_vector(margins_B, "margins_B")
  real_B = jnp.ones(chosen_B.shape, bool)
  if pair_mask_B is not None:
    real_B = _as_vector(pair_mask_B, "pair_mask_B", dtype=None) != 0

  # Padding pairs are replaced by zeros before any arithmetic, so no NaN or inf reaches a sum or
  # a gradient.
  chosen_B = jnp.where(real_B, chosen_B, 0.0)
  rejected_B = jnp.where(real_B, rejected_B, 0.0)
  margin_B = jnp.where(real_B, margin_B, 0.0)
  loss_B = jnp.where(real_B, jax.nn.softplus(-(chosen_B - rejected_B - margin_B)), 0.0)

  pairs = real_B.sum().astype(jnp.float32)
  loss_sum = loss_B.sum()
  if normalizer is None:
    normalizer = jnp.maximum(pairs, 1.0)
  loss = loss_sum / jnp.asarray(normalizer, jnp.float32)

  correct_B = real_B & (chosen_B > rejected_B)
  metrics = {
      "reward/loss_sum": loss_sum,
      "reward/correct_sum": correct_B.sum().astype(jnp.float32),
      "reward/chosen_sum": chosen_B.sum(),
      "reward/rejected_sum": rejected_B.sum(),
      "reward/pairs": pairs,
  }
  if ratings_B is not None:
    ratings_B = _as_vector(ratings_B, "ratings_B", dtype=jnp.int32)
    for rating in Rating:
      in_class_B = real_B & (ratings_B == rating.value)
      name = rating.name.lower()
      metrics[f"reward/correct_sum/{name}"] = (correct_B & in_class_B).sum().astype(jnp.float32)
      metrics[f"reward/pairs/{name}"] = in_class_B.sum().astype(jnp.float32)

  metrics = jax.lax.stop_gradient(metrics)
  denominator = jnp.maximum(pairs, 1.0)
  metrics["reward/loss"] = metrics["reward/loss_sum"] / denominator
  metrics["reward/accuracy"] = metrics["reward/correct_sum"] / denominator
  metrics["reward/chosen_mean"] = metrics["reward/chosen_sum"] / denominator
  metrics["reward/rejected_mean"] = metrics["reward/rejected_sum"] / denominator
  return loss, metrics


@dataclasses.dataclass(frozen=True)
class RewardStatistics:
  """Mean and standard deviation of a reward model's scores on its own training data.

  Stored with the reward-model checkpoint, so that PPO can whiten scores without measuring them
  again.

  Attributes:
    mean: mean of the raw (pre-sigmoid) scores.
    std: standard deviation of the raw scores, positive.
  """

  mean: float
  std: float

  def __post_init__(self):
    if not math.isfinite(self.mean):
      raise ValueError(f"RewardStatistics.mean must be finite, got {self.mean!r}.")
    if not (math.isfinite(self.std) and self.std > 0):
      raise ValueError(f"RewardStatistics.std must be positive and finite, got {self.std!r}.")

  @classmethod
  def measure(cls, scores: ArrayLike) -> RewardStatistics:
    """Measures the mean and the population standard deviation of raw scores of any shape."""
    scores = np.asarray(scores, np.float64)
    return cls(mean=float(scores.mean()), std=float(scores.std()))


def combine_safety_and_helpfulness_rewards(
    *,
    helpfulness_scores_B: ArrayLike,
    safety_scores_B: ArrayLike,
    is_safety_prompt_B: ArrayLike,
    helpfulness_statistics: RewardStatistics,
    safety_statistics: RewardStatistics,
    safety_threshold: float = 0.15,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Combines the two reward models' scores into the whitened reward used by PPO.

  With s_h = sigmoid(helpfulness score) and s_s = sigmoid(safety score), Llama 2 uses s_s when the
  prompt is tagged as a safety prompt or s_s < safety_threshold, and s_h otherwise. It then takes
  the logit of the chosen value and whitens it (Touvron et al., 2023, section 3.2.3).

  Because logit(sigmoid(x)) = x, the logit of the chosen value is the chosen raw score, which is
  used directly: in float32 sigmoid(x) rounds to 1 above x of about 17, and its logit would be
  inf. The threshold test s_s < t is likewise done as safety score < logit(t). Each score is
  whitened with the statistics of the model that produced it, (score - mean) / std.

  Args:
    helpfulness_scores_B: raw scores of the helpfulness reward model, shape [B] or [B, 1].
    safety_scores_B: raw scores of the safety reward model, same shape.
    is_safety_prompt_B: nonzero where the prompt is tagged as possibly eliciting unsafe answers.
    helpfulness_statistics: statistics stored with the helpfulness reward model.
    safety_statistics: statistics stored with the safety reward model.
    safety_threshold: probability in (0, 1) under which the safety score overrides helpfulness.
      Llama 2 uses 0.15, for a precision of 0.89 and a recall of 0.55 on its safety test set.

  Returns:
    (rewards_B, metrics): the whitened rewards in float32, and `ppo/safety_selected_sum` (how
    many rewards came from the safety model) with its denominator `ppo/scored_responses`.

  Raises:
    ValueError: if safety_threshold is not in (0, 1).
  """
  if not 0.0 < safety_threshold < 1.0:
    raise ValueError(f"safety_threshold must be in (0, 1), got {safety_threshold!r}.")
  helpfulness_B = _as_vector(helpfulness_scores_B, "helpfulness_scores_B")
  safety_B = _as_vector(safety_scores_B, "safety_scores_B")
  is_safety_B = _as_vector(is_safety_prompt_B, "is_safety_prompt_B", dtype=None) != 0

  threshold_logit = math.log(safety_threshold / (1.0 - safety_threshold))
  use_safety_B = is_safety_B | (safety_B < threshold_logit)
  whitened_helpfulness_B = (
      (helpfulness_B - helpfulness_statistics.mean) / helpfulness_statistics.std)
  whitened_safety_B = (safety_B - safety_statistics.mean) / safety_statistics.std
  rewards_B = jnp.where(use_safety_B, whitened_safety_B, whitened_helpfulness_B)

  metrics = {
      "ppo/safety_selected_sum": use_safety_B.sum().astype(jnp.float32),
      "ppo/scored_responses": jnp.asarray(use_safety_B.shape[0], jnp.float32),
  }
  return rewards_B, metrics


def _as_vector(values, name: str, dtype=jnp.float32) -> jax.Array:
  """Converts `values` of shape [B] or [B, 1] to shape [B], raising on any other shape."""
  values = jnp.asarray(values, dtype)
  if values.ndim == 2 and values.shape[1] == 1:
    values = values[:, 0]
  if values.ndim != 1:
    raise ValueError(f"{name} must have shape [B] or [B, 1], got {values.shape}.")
  return values
