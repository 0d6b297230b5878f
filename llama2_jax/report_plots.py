"""Figures of the report, drawn with matplotlib's object API and saved by `report.py`.

Figures are built as `matplotlib.figure.Figure` objects without pyplot, so no global backend is
switched and nothing is shown; `Figure.savefig` renders PNG with the Agg backend. Each function
draws only the values it is given, and a value that was not measured is left out of the plot
(the report's tables mark it as missing).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from llama2_jax.evaluation_reward import RATING_NAMES, RewardAccuracy
from llama2_jax.metrics_log import MetricsRecord, metric_series
from llama2_jax.report_schema import BestOfKCurve, PolicyResults

_PANEL_INCHES = (4.0, 2.8)


def plot_training_curves(records: Sequence[MetricsRecord], *, stage: str,
                         keys: Sequence[str]) -> Figure:
  """Draws one panel per metric key of `stage` against the step; non-finite points are skipped."""
  columns = min(3, len(keys))
  rows = math.ceil(len(keys) / columns)
  figure = Figure(figsize=(_PANEL_INCHES[0] * columns, _PANEL_INCHES[1] * rows),
                  layout="constrained")
  figure.suptitle(f"Training curves: {stage}")
  for index, key in enumerate(keys):
    axes = figure.add_subplot(rows, columns, index + 1)
    steps, values = metric_series(records, stage=stage, key=key)
    finite = np.isfinite(values)
    axes.plot(steps[finite], values[finite], marker="." if finite.sum() < 30 else None)
    axes.set_title(key, fontsize=9)
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
  return figure


def plot_reward_model_accuracy(reward_models: Mapping[str, RewardAccuracy]) -> Figure:
  """Draws grouped bars of accuracy, overall and per rating, one colour per reward model."""
  groups = ("overall",) + RATING_NAMES
  figure = Figure(figsize=(9.0, 3.6), layout="constrained")
  axes = figure.add_subplot()
  width = 0.8 / max(len(reward_models), 1)
  for index, (name, result) in enumerate(reward_models.items()):
    accuracies = [result.accuracy] + [result.rating_accuracy(rating) for rating in RATING_NAMES]
    positions = [group + (index - (len(reward_models) - 1) / 2) * width
                 for group, accuracy in enumerate(accuracies) if accuracy is not None]
    heights = [accuracy for accuracy in accuracies if accuracy is not None]
    axes.bar(positions, heights, width=width, label=name)
  axes.set_xticks(range(len(groups)), [group.replace("_", "\n") for group in groups], fontsize=8)
  axes.set_ylim(0.0, 1.0)
  axes.set_ylabel("accuracy on held-out pairs")
  axes.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
  axes.legend()
  axes.set_title("Reward-model accuracy (bars absent where a rating has no pairs)")
  return figure


def plot_best_of_k(curve: BestOfKCurve) -> Figure:
  """Draws the maximum and the median reward among K samples against K."""
  figure = Figure(figsize=(5.0, 3.6), layout="constrained")
  axes = figure.add_subplot()
  axes.plot(curve.k, curve.max_reward, marker="o", label="max over K samples")
  axes.plot(curve.k, curve.median_reward, marker="o", label="median over K samples")
  axes.set_xlabel("K (samples per prompt)")
  axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  axes.set_ylabel("reward, mean over prompts")
  axes.set_title(f"Best-of-K reward ({curve.prompts} prompts)")
  axes.grid(alpha=0.3)
  axes.legend()
  return figure


def plot_policy_rewards(policies: Mapping[str, PolicyResults]) -> Figure:
  """Draws the mean combined, helpfulness and safety rewards per policy, one panel each.

  Separate panels give each reward its own scale: the whitened combined reward and the raw
  reward-model scores can differ by orders of magnitude.
  """
  kinds = ("combined_reward", "helpfulness_reward", "safety_reward")
  figure = Figure(figsize=(10.0, 3.4), layout="constrained")
  figure.suptitle("Rewards of each policy, mean over held-out prompts")
  names = list(policies)
  for index, kind in enumerate(kinds):
    axes = figure.add_subplot(1, len(kinds), index + 1)
    axes.bar(range(len(names)), [getattr(policies[name], kind) for name in names],
             color=[f"C{i}" for i in range(len(names))])
    axes.set_xticks(range(len(names)), [name.replace("_", "\n") for name in names],
                    fontsize=8)
    axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.set_title(kind.replace("_", " "), fontsize=9)
  return figure


def plot_self_bleu(policies: Mapping[str, PolicyResults]) -> Figure | None:
  """Draws Self-BLEU against temperature per policy, or returns None if none was measured."""
  measured = {name: policy.self_bleu for name, policy in policies.items() if policy.self_bleu}
  if not measured:
    return None
  figure = Figure(figsize=(5.0, 3.6), layout="constrained")
  axes = figure.add_subplot()
  for name, curve in measured.items():
    temperatures = sorted(curve)
    axes.plot(temperatures, [curve[t] for t in temperatures], marker="o", label=name)
  axes.set_xlabel("sampling temperature")
  axes.set_ylabel("Self-BLEU (lower is more diverse)")
  axes.set_title("Diversity against temperature")
  axes.grid(alpha=0.3)
  axes.legend()
  return figure
