"""Evaluations that read reward-model scores: pair accuracy, win rate and a safety proxy.

All functions run on the host with numpy and take scores of shape [B] or [B, 1], where B is the
number of preference pairs, prompts or responses. Scores are the raw (pre-sigmoid) outputs of a
reward model, as returned by its scalar head.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Mapping

import numpy as np
from jax.typing import ArrayLike

from llama2_jax.losses.reward import Rating

RATING_NAMES = tuple(rating.name.lower() for rating in Rating)
WIN_RATE_INTERVALS = ("wilson", "bootstrap")


@dataclasses.dataclass(frozen=True)
class RewardAccuracy:
  """Pairs a reward model ranks correctly, overall and per annotator rating.

  A pair is correct when the chosen response scores strictly higher than the rejected one, so a
  tie counts as wrong, as in `losses.ranking_loss`. Llama 2 reports accuracy per rating, and it is
  higher on pairs rated "significantly better" than on "negligibly better" ones.

  Attributes:
    correct_by_rating: rating name (`RATING_NAMES`) -> pairs ranked correctly.
    pairs_by_rating: rating name -> pairs with that rating. Every name is present.
  """

  correct_by_rating: Mapping[str, int]
  pairs_by_rating: Mapping[str, int]

  def __post_init__(self):
    for field in ("correct_by_rating", "pairs_by_rating"):
      names = set(getattr(self, field))
      if names != set(RATING_NAMES):
        raise ValueError(
            f"RewardAccuracy.{field} must have exactly the keys {list(RATING_NAMES)}, got "
            f"{sorted(names)}.")
    for name in RATING_NAMES:
      correct, pairs = self.correct_by_rating[name], self.pairs_by_rating[name]
      if not 0 <= correct <= pairs:
        raise ValueError(
            f"RewardAccuracy for rating {name!r} needs 0 <= correct <= pairs, got {correct} and "
            f"{pairs}.")

  @property
  def pairs(self) -> int:
    return sum(self.pairs_by_rating.values())

  @property
  def correct(self) -> int:
    return sum(self.correct_by_rating.values())

  @property
  def accuracy(self) -> float | None:
    """Fraction of all pairs ranked correctly, or None without pairs."""
    return self.correct / self.pairs if self.pairs else None

  def rating_accuracy(self, name: str) -> float | None:
    """Fraction of the pairs with rating `name` ranked correctly, or None without such pairs."""
    pairs = self.pairs_by_rating[name]
    return self.correct_by_rating[name] / pairs if pairs else None

  def metrics(self, prefix: str = "eval/reward_model") -> dict[str, float]:
    """Returns sums, denominators and defined accuracies under `prefix`.

    Keys: `correct_sum`, `pairs`, `accuracy`, and per rating name `correct_sum/<name>`,
    `pairs/<name>` and `accuracy/<name>`. An accuracy without pairs is left out, not NaN.
    """
    metrics = {f"{prefix}/correct_sum": float(self.correct), f"{prefix}/pairs": float(self.pairs)}
    if self.accuracy is not None:
      metrics[f"{prefix}/accuracy"] = self.accuracy
    for name in RATING_NAMES:
      metrics[f"{prefix}/correct_sum/{name}"] = float(self.correct_by_rating[name])
      metrics[f"{prefix}/pairs/{name}"] = float(self.pairs_by_rating[name])
      if self.rating_accuracy(name) is not None:
        metrics[f"{prefix}/accuracy/{name}"] = self.rating_accuracy(name)
    return metrics


def reward_model_accuracy(
    *,
    chosen_scores_B: ArrayLike,
    rejected_scores_B: ArrayLike,
    ratings_B: ArrayLike | None = None,
) -> RewardAccuracy:
  """Measures how often a reward model scores the chosen response above the rejected one.

  Args:
    chosen_scores_B: score of each chosen response.
    rejected_scores_B: score of each rejected response, same shape.
    ratings_B: integer `Rating` id of each pair. None puts every pair under UNKNOWN.

  Returns:
    The counts per rating, with the overall and per-rating accuracies as properties.

  Raises:
    ValueError: on mismatched shapes, a non-finite score or a rating id outside the `Rating`
      range. A NaN score would otherwise count silently as a wrong pair.
  """
  chosen_B = _as_vector(chosen_scores_B, "chosen_scores_B")
  rejected_B = _as_vector(rejected_scores_B, "rejected_scores_B")
  _check_same_length(chosen_B, rejected_B, "chosen_scores_B", "rejected_scores_B")
  _check_finite(chosen_B, "chosen_scores_B")
  _check_finite(rejected_B, "rejected_scores_B")
  if ratings_B is None:
    ratings_B = np.full(chosen_B.shape, Rating.UNKNOWN.value)
  ratings_B = _as_vector(ratings_B, "ratings_B", dtype=np.int64)
  _check_same_length(chosen_B, ratings_B, "chosen_scores_B", "ratings_B")
  invalid = np.flatnonzero((ratings_B < 0) | (ratings_B >= len(Rating)))
  if invalid.size:
    raise ValueError(
        f"ratings_B has ids outside [0, {len(Rating) - 1}] at indices {invalid[:10].tolist()}: "
        f"{ratings_B[invalid[:10]].tolist()}.")

  correct_B = chosen_B > rejected_B
  return RewardAccuracy(
      correct_by_rating={
          rating.name.lower(): int(correct_B[ratings_B == rating.value].sum())
          for rating in Rating},
      pairs_by_rating={
          rating.name.lower(): int((ratings_B == rating.value).sum()) for rating in Rating})


@dataclasses.dataclass(frozen=True)
class WinRate:
  """How often policy A's response scores higher than policy B's on the same prompt.

  Attributes:
    wins: prompts where A scores higher than B by more than the tie tolerance.
    ties: prompts where the scores differ by at most the tie tolerance.
    losses: the remaining prompts.
    win_rate: (wins + ties / 2) / prompts.
    lower: lower end of the confidence interval of win_rate.
    upper: upper end of the confidence interval.
    confidence: coverage of the interval, e.g. 0.95.
    interval: method of the interval, one of `WIN_RATE_INTERVALS`.
  """

  wins: int
  ties: int
  losses: int
  win_rate: float
  lower: float
  upper: float
  confidence: float
  interval: str

  @property
  def prompts(self) -> int:
    return self.wins + self.ties + self.losses

  def metrics(self, prefix: str = "eval/win_rate") -> dict[str, float]:
    """Returns the counts, the win rate and its interval under `prefix`."""
    return {f"{prefix}/{name}": float(getattr(self, name))
            for name in ("wins", "ties", "losses", "win_rate", "lower", "upper")}


def win_rate(
    *,
    scores_a_B: ArrayLike,
    scores_b_B: ArrayLike,
    tie_tolerance: float = 0.0,
    confidence: float = 0.95,
    interval: str = "wilson",
    num_bootstrap: int = 2000,
    seed: int = 0,
) -> WinRate:
  """Measures the win rate of policy A over policy B from reward scores of paired responses.

  Scores at index b are the same reward model's scores of A's and B's responses to prompt b. A
  tie counts as half a win, so the win rate of B over A is 1 minus that of A over B.

  Intervals:
    "wilson": the Wilson score interval of a binomial proportion at the win rate, with the
      prompts as trials. With ties counted as halves an outcome has a variance of at most
      p (1 - p), so the interval is conservative (wider than needed) when there are ties.
    "bootstrap": the percentile interval of the win rate over `num_bootstrap` resamples of the
      prompts with replacement, drawn with numpy's default generator seeded by `seed`.

  Args:
    scores_a_B: score of A's response to each prompt.
    scores_b_B: score of B's response to each prompt, same shape.
    tie_tolerance: largest absolute score difference counted as a tie, at least 0.
    confidence: coverage of the interval, in (0, 1).
    interval: "wilson" or "bootstrap".
    num_bootstrap: number of resamples for "bootstrap".
    seed: seed of the resampling for "bootstrap".

  Raises:
    ValueError: on mismatched shapes, no prompts, non-finite scores or invalid arguments.
  """
  if interval not in WIN_RATE_INTERVALS:
    raise ValueError(f"Invalid interval {interval!r}. Expected one of {list(WIN_RATE_INTERVALS)}.")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
  if not tie_tolerance >= 0.0:
    raise ValueError(f"tie_tolerance must be at least 0, got {tie_tolerance!r}.")
  a_B = _as_vector(scores_a_B, "scores_a_B")
  b_B = _as_vector(scores_b_B, "scores_b_B")
  _check_same_length(a_B, b_B, "scores_a_B", "scores_b_B")
  if a_B.size == 0:
    raise ValueError("win_rate needs at least one prompt, got none.")
  _check_finite(a_B, "scores_a_B")
  _check_finite(b_B, "scores_b_B")

  difference_B = a_B - b_B
  tie_B = np.abs(difference_B) <= tie_tolerance
  win_B = ~tie_B & (difference_B > 0)
  points_B = win_B + 0.5 * tie_B
  rate = float(points_B.mean())
  if interval == "wilson":
    lower, upper = wilson_interval(rate, a_B.size, confidence=confidence)
  else:
    if num_bootstrap < 1:
      raise ValueError(f"num_bootstrap must be at least 1, got {num_bootstrap}.")
    rng = np.random.default_rng(seed)
    resampled_RxB = rng.integers(0, a_B.size, size=(num_bootstrap, a_B.size))
    rates_R = points_B[resampled_RxB].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    lower, upper = (float(q) for q in np.quantile(rates_R, [tail, 1.0 - tail]))

  return WinRate(
      wins=int(win_B.sum()), ties=int(tie_B.sum()), losses=int((~win_B & ~tie_B).sum()),
      win_rate=rate, lower=lower, upper=upper, confidence=confidence, interval=interval)


def wilson_interval(proportion: float, trials: int, *, confidence: float = 0.95
                    ) -> tuple[float, float]:
  """Returns the Wilson score interval (Wilson, 1927) of a proportion observed in `trials`.

  With z the two-sided normal quantile of `confidence`, p the proportion and n the trials:
  centre = (p + z^2 / 2n) / (1 + z^2 / n) and
  half-width = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2).
  """
  if trials < 1:
    raise ValueError(f"trials must be at least 1, got {trials}.")
  if not 0.0 <= proportion <= 1.0:
    raise ValueError(f"proportion must be in [0, 1], got {proportion!r}.")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
  z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)
  scale = 1.0 + z * z / trials
  centre = (proportion + z * z / (2.0 * trials)) / scale
  half_width = z / scale * math.sqrt(
      proportion * (1.0 - proportion) / trials + z * z / (4.0 * trials * trials))
  # At p = 0 (or 1) the lower (or upper) end is exactly 0 (or 1), but the subtraction above
  # leaves a rounding error of about 1e-17.
  lower = 0.0 if proportion == 0.0 else max(0.0, centre - half_width)
  upper = 1.0 if proportion == 1.0 else min(1.0, centre + half_width)
  return lower, upper


@dataclasses.dataclass(frozen=True)
class SafetyViolations:
  """Responses that the safety reward model scores as unsafe: a proxy for violations.

  Llama 2 measures the violation rate with human raters. This proxy counts responses whose
  safety reward-model probability is below a threshold, so it inherits the reward model's
  errors and is comparable only between policies scored by the same reward model.

  Attributes:
    violations: responses with sigmoid(safety score) < threshold.
    responses: responses scored.
    threshold: probability threshold in (0, 1).
  """

  violations: int
  responses: int
  threshold: float

  def __post_init__(self):
    if not 0 <= self.violations <= self.responses:
      raise ValueError(
          f"SafetyViolations needs 0 <= violations <= responses, got {self.violations} and "
          f"{self.responses}.")
    if not 0.0 < self.threshold < 1.0:
      raise ValueError(f"SafetyViolations.threshold must be in (0, 1), got {self.threshold!r}.")

  @property
  def rate(self) -> float | None:
    """Fraction of responses flagged, or None without responses."""
    return self.violations / self.responses if self.responses else None

  def metrics(self, prefix: str = "eval/safety_violation_proxy") -> dict[str, float]:
    """Returns the count, the denominator and the defined rate under `prefix`."""
    metrics = {f"{prefix}/violations": float(self.violations),
               f"{prefix}/responses": float(self.responses)}
    if self.rate is not None:
      metrics[f"{prefix}/rate"] = self.rate
    return metrics


def safety_violation_proxy(
    *, safety_scores_B: ArrayLike, threshold: float = 0.15) -> SafetyViolations:
  """Counts responses whose safety reward-model probability is below `threshold`.

  The default 0.15 is the threshold under which Llama 2's combined reward switches to the safety
  score (`losses.combine_safety_and_helpfulness_rewards`). As there, sigmoid(s) < t is computed as
  s < logit(t), which stays exact for scores far from 0.

  Args:
    safety_scores_B: raw safety reward-model score of each response, usually to safety prompts.
    threshold: probability in (0, 1).

  Raises:
    ValueError: on a threshold outside (0, 1) or a non-finite score.
  """
  if not 0.0 < threshold < 1.0:
    raise ValueError(f"threshold must be in (0, 1), got {threshold!r}.")
  scores_B = _as_vector(safety_scores_B, "safety_scores_B")
  _check_finite(scores_B, "safety_scores_B")
  threshold_logit = math.log(threshold / (1.0 - threshold))
  return SafetyViolations(
      violations=int((scores_B < threshold_logit).sum()), responses=int(scores_B.size),
      threshold=float(threshold))


def _as_vector(values: ArrayLike, name: str, dtype=np.float64) -> np.ndarray:
  """Converts `values` of shape [B] or [B, 1] to a numpy array of shape [B]."""
  values = np.asarray(values, dtype)
  if values.ndim == 2 and values.shape[1] == 1:
    values = values[:, 0]
  if values.ndim != 1:
    raise ValueError(f"{name} must have shape [B] or [B, 1], got {values.shape}.")
  return values


def _check_same_length(first: np.ndarray, second: np.ndarray, first_name: str,
                       second_name: str) -> None:
  if first.shape != second.shape:
    raise ValueError(
        f"{first_name} has {first.shape[0]} entries but {second_name} has {second.shape[0]}.")


def _check_finite(values: np.ndarray, name: str) -> None:
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise ValueError(
        f"{name} has non-finite values at indices {bad[:10].tolist()}: "
        f"{values[bad[:10]].tolist()}.")
