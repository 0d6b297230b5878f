"""The measured results that `report.write_report` turns into report.md and report.json.

`Results` is a tree of frozen dataclasses; `Results.from_dict` builds it from the JSON-style dict
below and `Results.to_dict` writes that dict back. Every key is required: a value that was not
measured is written as null (or an empty object or list where the schema allows it), so a
forgotten field fails with its path instead of vanishing from the report. Numbers must be
finite. Counts are non-negative integers, and rates are derived from them, except the stored
win rate, which must equal (wins + ties / 2) / (wins + ties + losses).

  {
    "reward_models": {                   # both "helpfulness" and "safety"
      "helpfulness": {
        "correct_by_rating": {"significantly_better": int, "better": int,
                              "slightly_better": int, "negligibly_better_or_unsure": int,
                              "unknown": int},
        "pairs_by_rating": {...same five keys...}},
      "safety": {...}},
    "best_of_k": {"k": [int], "max_reward": [float], "median_reward": [float], "prompts": int},
    "policies": {                        # at least "sft", "rejection_sampling" and "ppo"
      "sft": {
        "prompts": int,                  # held-out prompts scored
        "combined_reward": float,        # mean whitened combined reward (as PPO optimises)
        "helpfulness_reward": float,     # mean raw helpfulness reward-model score
        "safety_reward": float,          # mean raw safety reward-model score
        "kl_to_reference": float | null, # mean KL(policy || reference) per response, in nats
        "self_bleu": {"<temperature>": float},   # may be empty
        "refusals": {"safe_refused": int, "safe_prompts": int, "unsafe_refused": int,
                     "unsafe_prompts": int} | null,
        "safety_violations": {"violations": int, "responses": int, "threshold": float} | null,
        "samples": [{"prompt": str, "response": str}]},
      ...},
    "win_rates": {                       # may be empty; key e.g. "ppo_vs_sft"
      "ppo_vs_sft": {"wins": int, "ties": int, "losses": int, "win_rate": float,
                     "lower": float, "upper": float, "confidence": float,
                     "interval": "wilson" | "bootstrap"}}
  }
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

from llama2_jax.evaluation_refusal import RefusalCounts
from llama2_jax.evaluation_reward import (
    RATING_NAMES, WIN_RATE_INTERVALS, RewardAccuracy, SafetyViolations, WinRate)
from llama2_jax.losses.rejection_sampling import RewardByK

REWARD_MODEL_NAMES = ("helpfulness", "safety")
POLICY_NAMES = ("sft", "rejection_sampling", "ppo")


class InvalidResultsError(ValueError):
  """A results dict or dataclass with a missing field or an invalid value."""


@dataclasses.dataclass(frozen=True)
class SampledAnswer:
  """One held-out prompt and a policy's response to it."""

  prompt: str
  response: str


@dataclasses.dataclass(frozen=True)
class BestOfKCurve:
  """Maximum and median reward among the first k samples per prompt, averaged over prompts."""

  k: tuple[int, ...]
  max_reward: tuple[float, ...]
  median_reward: tuple[float, ...]
  prompts: int

  def __post_init__(self):
    if not self.k or not len(self.k) == len(self.max_reward) == len(self.median_reward):
      raise InvalidResultsError(
          f"best_of_k needs k, max_reward and median_reward of one equal, non-zero length; got "
          f"{len(self.k)}, {len(self.max_reward)} and {len(self.median_reward)}.")
    if any(k < 1 for k in self.k) or list(self.k) != sorted(set(self.k)):
      raise InvalidResultsError(f"best_of_k.k must increase from at least 1, got {self.k}.")
    _check_finite(self.max_reward, "best_of_k.max_reward")
    _check_finite(self.median_reward, "best_of_k.median_reward")

  @classmethod
  def from_reward_by_k(cls, curve: RewardByK, *, prompts: int) -> BestOfKCurve:
    """Converts the output of `losses.reward_by_num_samples` over `prompts` prompts."""
    return cls(k=tuple(int(k) for k in curve.k),
               max_reward=tuple(float(x) for x in curve.max_reward),
               median_reward=tuple(float(x) for x in curve.median_reward), prompts=prompts)


@dataclasses.dataclass(frozen=True)
class PolicyResults:
  """Evaluation of one policy on held-out prompts; the fields are described in the module."""

  prompts: int
  combined_reward: float
  helpfulness_reward: float
  safety_reward: float
  kl_to_reference: float | None
  self_bleu: Mapping[float, float]
  refusals: RefusalCounts | None
  safety_violations: SafetyViolations | None
  samples: tuple[SampledAnswer, ...]

  def __post_init__(self):
    for name in ("combined_reward", "helpfulness_reward", "safety_reward"):
      _check_finite([getattr(self, name)], f"PolicyResults.{name}")
    if self.kl_to_reference is not None:
      _check_finite([self.kl_to_reference], "PolicyResults.kl_to_reference")
    _check_finite(list(self.self_bleu) + list(self.self_bleu.values()), "PolicyResults.self_bleu")


@dataclasses.dataclass(frozen=True)
class Results:
  """Everything the report shows besides the training curves, which come from the metrics log."""

  reward_models: Mapping[str, RewardAccuracy]
  best_of_k: BestOfKCurve
  policies: Mapping[str, PolicyResults]
  win_rates: Mapping[str, WinRate]

  def __post_init__(self):
    for group, required in (("reward_models", REWARD_MODEL_NAMES), ("policies", POLICY_NAMES)):
      missing = [name for name in required if name not in getattr(self, group)]
      if missing:
        raise InvalidResultsError(f"Results.{group} is missing {missing}.")
    for name, result in self.win_rates.items():
      _check_win_rate(result, f"Results.win_rates[{name!r}]")

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any]) -> Results:
    """Builds and validates results from the dict described in the module docstring.

    Raises:
      InvalidResultsError: naming the path of the first missing, unknown or invalid field.
    """
    fields = _object(raw, "results", ("reward_models", "best_of_k", "policies", "win_rates"))
    _require_names(fields["reward_models"], "results.reward_models", REWARD_MODEL_NAMES)
    _require_names(fields["policies"], "results.policies", POLICY_NAMES)
    return cls(
        reward_models={
            name: _reward_accuracy(value, f"results.reward_models.{name}")
            for name, value in _object(fields["reward_models"], "results.reward_models").items()},
        best_of_k=_best_of_k(fields["best_of_k"], "results.best_of_k"),
        policies={
            name: _policy(value, f"results.policies.{name}")
            for name, value in _object(fields["policies"], "results.policies").items()},
        win_rates={
            name: _win_rate(value, f"results.win_rates.{name}")
            for name, value in _object(fields["win_rates"], "results.win_rates").items()})

  def to_dict(self) -> dict[str, Any]:
    """Returns the JSON-ready dict that `from_dict` reads.

    Numpy scalars, such as a float32 mean that a caller stored without converting it, become
    Python numbers, which `json` can write.
    """
    return _to_python({
        "reward_models": {name: {"correct_by_rating": dict(result.correct_by_rating),
                                 "pairs_by_rating": dict(result.pairs_by_rating)}
                          for name, result in self.reward_models.items()},
        "best_of_k": {"k": list(self.best_of_k.k),
                      "max_reward": list(self.best_of_k.max_reward),
                      "median_reward": list(self.best_of_k.median_reward),
                      "prompts": self.best_of_k.prompts},
        "policies": {name: _policy_to_dict(policy) for name, policy in self.policies.items()},
        "win_rates": {name: dataclasses.asdict(result) for name, result in self.win_rates.items()},
    })


def _to_python(tree: Any) -> Any:
  """Converts numpy scalars and 0-d arrays in nested dicts and lists to Python numbers."""
  if isinstance(tree, Mapping):
    return {key: _to_python(value) for key, value in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_to_python(value) for value in tree]
  if isinstance(tree, (np.generic, np.ndarray)) and np.ndim(tree) == 0:
    return tree.item()
  return tree


def _check_win_rate(result: WinRate, name: str) -> None:
  """Checks that a win rate is finite, in [0, 1], and agrees with its counts."""
  _check_finite([result.win_rate, result.lower, result.upper, result.confidence], name)
  prompts = result.wins + result.ties + result.losses
  if prompts < 1:
    raise InvalidResultsError(f"{name} has no prompts: wins, ties and losses are all 0.")
  if not 0.0 <= result.lower <= result.upper <= 1.0:
    raise InvalidResultsError(
        f"{name} needs 0 <= lower <= upper <= 1, got lower {result.lower} and upper "
        f"{result.upper}.")
  if not 0.0 < result.confidence < 1.0:
    raise InvalidResultsError(f"{name}.confidence must be in (0, 1), got {result.confidence}.")
  expected = (result.wins + result.ties / 2) / prompts
  if not math.isclose(result.win_rate, expected, rel_tol=1e-9, abs_tol=1e-12):
    raise InvalidResultsError(
        f"{name}.win_rate is {result.win_rate}, but its counts give (wins + ties / 2) / prompts "
        f"= ({result.wins} + {result.ties} / 2) / {prompts} = {expected}.")


def _policy_to_dict(policy: PolicyResults) -> dict[str, Any]:
  as_dict = {field.name: getattr(policy, field.name) for field in dataclasses.fields(policy)}
  as_dict["self_bleu"] = {repr(float(t)): value for t, value in policy.self_bleu.items()}
  for name in ("refusals", "safety_violations"):
    if as_dict[name] is not None:
      as_dict[name] = dataclasses.asdict(as_dict[name])
  as_dict["samples"] = [dataclasses.asdict(sample) for sample in policy.samples]
  return as_dict


def _check_finite(values, name: str) -> None:
  bad = [value for value in values if not math.isfinite(value)]
  if bad:
    raise InvalidResultsError(
        f"{name} must be finite, got {bad}. Pass None where a value was not measured.")


def _require_names(raw: Any, path: str, names: tuple[str, ...]) -> None:
  """Checks that the mapping `raw` has every key in `names`, and allows other keys."""
  missing = [name for name in names if name not in _object(raw, path)]
  if missing:
    raise InvalidResultsError(
        f"{path} is missing {', '.join(f'{path}.{name}' for name in missing)}.")


def _object(raw: Any, path: str, keys: tuple[str, ...] | None = None) -> Mapping[str, Any]:
  """Checks that `raw` is a mapping and, when `keys` is given, that it has exactly those keys."""
  if not isinstance(raw, Mapping):
    raise InvalidResultsError(f"{path} must be an object, got {type(raw).__name__}.")
  if keys is not None:
    missing = [key for key in keys if key not in raw]
    if missing:
      raise InvalidResultsError(f"{path} is missing {', '.join(f'{path}.{k}' for k in missing)}.")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
      raise InvalidResultsError(f"{path} has unknown keys {unknown}; valid keys: {list(keys)}.")
  return raw


def _number(raw: Any, path: str) -> float:
  if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
    raise InvalidResultsError(
        f"{path} must be a finite number, got {raw!r}. Use null where a value was not measured.")
  return float(raw)


def _count(raw: Any, path: str) -> int:
  if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
    raise InvalidResultsError(f"{path} must be a non-negative integer, got {raw!r}.")
  return raw


def _string(raw: Any, path: str) -> str:
  if not isinstance(raw, str):
    raise InvalidResultsError(f"{path} must be a string, got {type(raw).__name__}.")
  return raw


def _optional(convert: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
  return lambda raw, path: None if raw is None else convert(raw, path)


def _list(raw: Any, path: str, convert: Callable[[Any, str], Any]) -> tuple:
  if not isinstance(raw, (list, tuple)):
    raise InvalidResultsError(f"{path} must be a list, got {type(raw).__name__}.")
  return tuple(convert(item, f"{path}[{index}]") for index, item in enumerate(raw))


def _build(cls, raw: Any, path: str, converters: Mapping[str, Callable[[Any, str], Any]]):
  """Checks the keys of `raw`, converts each field with its converter and constructs `cls`."""
  fields = _object(raw, path, tuple(converters))
  values = {name: convert(fields[name], f"{path}.{name}") for name, convert in converters.items()}
  try:
    return cls(**values)
  except ValueError as error:
    raise InvalidResultsError(f"{path} is invalid: {error}") from error


def _reward_accuracy(raw: Any, path: str) -> RewardAccuracy:
  def counts_by_rating(value, field_path):
    fields = _object(value, field_path, RATING_NAMES)
    return {name: _count(fields[name], f"{field_path}.{name}") for name in RATING_NAMES}

  return _build(RewardAccuracy, raw, path,
                {"correct_by_rating": counts_by_rating, "pairs_by_rating": counts_by_rating})


def _best_of_k(raw: Any, path: str) -> BestOfKCurve:
  return _build(BestOfKCurve, raw, path, {
      "k": lambda value, p: _list(value, p, _count),
      "max_reward": lambda value, p: _list(value, p, _number),
      "median_reward": lambda value, p: _list(value, p, _number),
      "prompts": _count})


def _self_bleu(raw: Any, path: str) -> dict[float, float]:
  curve = {}
  for key, value in _object(raw, path).items():
    try:
      temperature = float(key)
    except ValueError as error:
      raise InvalidResultsError(f"{path} key {key!r} is not a temperature.") from error
    curve[_number(temperature, f"{path} key")] = _number(value, f"{path}.{key}")
  return dict(sorted(curve.items()))


def _policy(raw: Any, path: str) -> PolicyResults:
  return _build(PolicyResults, raw, path, {
      "prompts": _count,
      "combined_reward": _number,
      "helpfulness_reward": _number,
      "safety_reward": _number,
      "kl_to_reference": _optional(_number),
      "self_bleu": _self_bleu,
      "refusals": _optional(lambda value, p: _build(RefusalCounts, value, p, {
          name: _count for name in ("safe_refused", "safe_prompts", "unsafe_refused",
                                    "unsafe_prompts")})),
      "safety_violations": _optional(lambda value, p: _build(SafetyViolations, value, p, {
          "violations": _count, "responses": _count, "threshold": _number})),
      "samples": lambda value, p: _list(value, p, lambda item, item_path: _build(
          SampledAnswer, item, item_path, {"prompt": _string, "response": _string})),
  })


def _interval_name(raw: Any, path: str) -> str:
  if raw not in WIN_RATE_INTERVALS:
    raise InvalidResultsError(f"{path} must be one of {list(WIN_RATE_INTERVALS)}, got {raw!r}.")
  return raw


def _win_rate(raw: Any, path: str) -> WinRate:
  converters = {name: _count for name in ("wins", "ties", "losses")}
  converters.update({name: _number for name in ("win_rate", "lower", "upper", "confidence")})
  converters["interval"] = _interval_name
  result = _build(WinRate, raw, path, converters)
  _check_win_rate(result, path)
  return result
