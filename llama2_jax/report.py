"""Writes report.md, report.json and PNG plots from measured results and the metrics log.

The report shows only what it is given: the `report_schema.Results` of the evaluation and the
training records of `metrics_log`. A value that was not measured is shown as "missing" in
report.md and as null in report.json, so report.json contains no NaN or infinity.

Output directory layout:
  report.md        tables and relative links to the plots
  report.json      {"results": Results.to_dict(), "summary": derived rates,
                    "training": last logged value of each metric per stage, "plots": paths}
  plots/*.png

Every file is written under a temporary name in the same directory and then renamed into
place (`_atomic.atomic_file`), so a reader finds the old file or the whole new one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Sequence

from absl import logging
from matplotlib.figure import Figure

from llama2_jax import _atomic, report_plots
from llama2_jax.evaluation_reward import RATING_NAMES
from llama2_jax.metrics_log import MetricsRecord, read_metrics
from llama2_jax.report_markdown import render_markdown
from llama2_jax.report_schema import Results

PLOTS_DIRNAME = "plots"
MAX_CURVES_PER_STAGE = 9
# The metrics a reader looks for first in each stage's curves.
PRIORITY_KEYS = ("sft/loss", "sft/accuracy", "reward/loss", "reward/accuracy",
                 "reward/chosen_mean", "reward/rejected_mean", "ppo/score", "ppo/kl",
                 "ppo/value_loss", "ppo/policy_loss", "ppo/helpfulness_reward",
                 "ppo/safety_reward", "ppo/clip_fraction", "ppo/approx_kl", "ppo/entropy")


@dataclasses.dataclass(frozen=True)
class ReportFiles:
  """Paths of the written report."""

  markdown: pathlib.Path
  json: pathlib.Path
  plots: tuple[pathlib.Path, ...]


def write_report(results: Results, output_dir: str | os.PathLike, *,
                 metrics_path: str | os.PathLike | None = None,
                 title: str = "Llama 2-Chat pipeline report") -> ReportFiles:
  """Writes the report of `results` and of the training log at `metrics_path` to `output_dir`.

  Args:
    results: validated results, e.g. from `Results.from_dict`.
    output_dir: directory for report.md, report.json and plots/; created if missing.
    metrics_path: the `metrics.jsonl` of the run (or its directory). None leaves the training
      curves out, and the report states that they are missing.
    title: first heading of report.md.

  Returns:
    The paths written.
  """
  output_dir = pathlib.Path(output_dir)
  (output_dir / PLOTS_DIRNAME).mkdir(parents=True, exist_ok=True)
  records = read_metrics(metrics_path) if metrics_path is not None else []
  stages = list(dict.fromkeys(record.stage for record in records))
  curve_keys = {stage: select_curve_keys(records, stage) for stage in stages}

  figures = {f"training_{stage}": report_plots.plot_training_curves(
      records, stage=stage, keys=keys) for stage, keys in curve_keys.items() if keys}
  figures["reward_model_accuracy"] = report_plots.plot_reward_model_accuracy(
      results.reward_models)
  figures["best_of_k"] = report_plots.plot_best_of_k(results.best_of_k)
  figures["policy_rewards"] = report_plots.plot_policy_rewards(results.policies)
  self_bleu_figure = report_plots.plot_self_bleu(results.policies)
  if self_bleu_figure is not None:
    figures["self_bleu"] = self_bleu_figure
  plots = {name: f"{PLOTS_DIRNAME}/{name}.png" for name in figures}
  for name, figure in figures.items():
    _save_figure(figure, output_dir / plots[name])

  markdown = render_markdown(results, records=records, curve_keys=curve_keys, plots=plots,
                             title=title)
  report = {"results": results.to_dict(), "summary": summarize(results),
            "training": summarize_training(records), "plots": plots}
  markdown_path, json_path = output_dir / "report.md", output_dir / "report.json"
  _write_text(markdown_path, markdown)
  _write_text(json_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
  logging.info("Wrote %s, %s and %d plots.", markdown_path, json_path, len(plots))
  return ReportFiles(markdown=markdown_path, json=json_path,
                     plots=tuple(output_dir / path for path in plots.values()))


def select_curve_keys(records: Sequence[MetricsRecord], stage: str,
                      max_keys: int = MAX_CURVES_PER_STAGE) -> list[str]:
  """Picks the metric keys of `stage` to plot: the objectives first, then other means.

  Keys of `PRIORITY_KEYS` come first, in that order, and other keys follow in first-logged
  order. Keys whose last path part ends in "_sum", or that contain "_sum/" or "/pairs", are sums
  and denominators kept for exact averaging. They are plotted only when a stage logs nothing
  else.
  """
  keys = list(dict.fromkeys(
      key for record in records if record.stage == stage for key in record.metrics))
  is_sum = lambda key: key.endswith("_sum") or "_sum/" in key or "/pairs" in key
  means = [key for key in keys if not is_sum(key)]
  ordered = ([key for key in PRIORITY_KEYS if key in means]
             + [key for key in means if key not in PRIORITY_KEYS])
  ordered = ordered or keys
  if len(ordered) > max_keys:
    logging.info("Stage %r: plotting %d of %d metrics, leaving out %s.", stage, max_keys,
                 len(ordered), ordered[max_keys:])
  return ordered[:max_keys]


def summarize(results: Results) -> dict[str, Any]:
  """Returns the rates derived from the counts in `results`, None where undefined."""
  reward_models = {
      name: {"accuracy": result.accuracy,
             "accuracy_by_rating": {r: result.rating_accuracy(r) for r in RATING_NAMES}}
      for name, result in results.reward_models.items()}
  policies = {}
  for name, policy in results.policies.items():
    refusals, violations = policy.refusals, policy.safety_violations
    policies[name] = {
        "false_refusal_rate": None if refusals is None else refusals.false_refusal_rate,
        "unsafe_refusal_rate": None if refusals is None else refusals.unsafe_refusal_rate,
        "safety_violation_proxy_rate": None if violations is None else violations.rate,
    }
  return {"reward_models": reward_models, "policies": policies}


def summarize_training(records: Sequence[MetricsRecord]) -> dict[str, Any]:
  """Returns per stage the step range and the last logged value of each metric.

  A last value that is NaN or infinite is written as null and its key listed under "non_finite".
  """
  summary = {}
  for record in records:
    stage = summary.setdefault(
        record.stage, {"records": 0, "first_step": record.step, "last": {}, "non_finite": []})
    stage["records"] += 1
    stage["last_step"] = record.step
    stage["last"].update(record.metrics)
  for stage in summary.values():
    stage["non_finite"] = sorted(k for k, v in stage["last"].items() if not math.isfinite(v))
    stage["last"] = {k: (v if math.isfinite(v) else None) for k, v in stage["last"].items()}
  return summary


def _save_figure(figure: Figure, path: pathlib.Path) -> None:
  with _atomic.atomic_file(path, binary=True) as file:
    figure.savefig(file, format="png", dpi=100)


def _write_text(path: pathlib.Path, text: str) -> None:
  with _atomic.atomic_file(path) as file:
    file.write(text)
