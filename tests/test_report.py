"""Tests of the report: the Results schema, report.md, report.json and the PNG plots."""

import dataclasses
import json
import math
import re

import numpy as np
import pytest

from llama2_jax import evaluation, report, report_markdown
from llama2_jax.metrics_log import MetricsWriter, read_metrics
from llama2_jax.report_schema import InvalidResultsError, Results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _counts(*values):
  return dict(zip(evaluation.RATING_NAMES, values))


def _policy(combined, *, kl=0.5, self_bleu=None, refusals=True, samples=()):
  return {
      "prompts": 8,
      "combined_reward": combined,
      "helpfulness_reward": combined + 0.25,
      "safety_reward": combined - 0.5,
      "kl_to_reference": kl,
      "self_bleu": {} if self_bleu is None else self_bleu,
      "refusals": {"safe_refused": 1, "safe_prompts": 4, "unsafe_refused": 3,
                   "unsafe_prompts": 4} if refusals else None,
      "safety_violations": {"violations": 2, "responses": 8, "threshold": 0.15},
      "samples": [{"prompt": p, "response": r} for p, r in samples],
  }


def _raw_results():
  """A results dict in the schema's JSON form, with every optional kind of value present."""
  return {
      "reward_models": {
          "helpfulness": {"correct_by_rating": _counts(9, 6, 3, 1, 0),
                          "pairs_by_rating": _counts(10, 8, 6, 2, 0)},
          "safety": {"correct_by_rating": _counts(4, 3, 2, 1, 5),
                     "pairs_by_rating": _counts(4, 4, 4, 4, 10)},
      },
      "best_of_k": {"k": [1, 2, 4], "max_reward": [0.1, 0.4, 0.7],
                    "median_reward": [0.1, 0.1, 0.15], "prompts": 16},
      "policies": {
          "sft": _policy(-0.2, kl=None, samples=[
              ("How do I kill a Python process?", "Run `kill <pid>` | or press Ctrl-C.\n# Done"),
          ]),
          "rejection_sampling": _policy(0.1, self_bleu={"0.7": 0.4, "1.0": 0.3}),
          "ppo": _policy(0.3, refusals=False, self_bleu={"1.0": 0.5}),
      },
      "win_rates": {
          "ppo_vs_sft": {"wins": 5, "ties": 2, "losses": 3, "win_rate": 0.6, "lower": 0.3,
                         "upper": 0.85, "confidence": 0.95, "interval": "wilson"},
      },
  }


def _write_metrics(workdir):
  with MetricsWriter(workdir, stage="sft", is_writer=True) as writer:
    for step in range(1, 6):
      writer.write(step, {"sft/loss": 3.0 / step, "sft/loss_sum": 30.0 / step,
                          "sft/tokens": 10.0})
  with MetricsWriter(workdir, stage="ppo", is_writer=True) as writer:
    writer.write(1, {"ppo/kl": 0.01, "ppo/reward": 0.2})
    writer.write(2, {"ppo/kl": math.nan, "ppo/reward": 0.3})  # A last value that is NaN.
  return workdir / "metrics.jsonl"


def _reject_constant(name):
  raise AssertionError(f"report.json contains the non-JSON constant {name}")


def _numbers(tree):
  """Yields every number in a JSON tree."""
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _numbers(value)
  elif isinstance(tree, list):
    for value in tree:
      yield from _numbers(value)
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield tree


def test_results_round_trip():
  raw = _raw_results()
  results = Results.from_dict(raw)

  assert results.to_dict() == raw
  assert Results.from_dict(results.to_dict()) == results
  assert results.policies["rejection_sampling"].self_bleu == {0.7: 0.4, 1.0: 0.3}
  assert results.policies["ppo"].refusals is None
  assert results.reward_models["safety"].rating_accuracy("unknown") == pytest.approx(0.5)
  json.dumps(results.to_dict(), allow_nan=False)


def test_results_to_dict_converts_numpy_scalars():
  raw = _raw_results()
  policy = Results.from_dict(raw).policies["sft"]
  # A pipeline may pass numpy scalars, e.g. the mean of a float32 array.
  policy = dataclasses.replace(policy, prompts=np.int64(8), combined_reward=np.float32(-0.25),
                               kl_to_reference=np.float32(0.5))
  results = dataclasses.replace(
      Results.from_dict(raw), policies={**Results.from_dict(raw).policies, "sft": policy})

  as_dict = results.to_dict()
  json.dumps(as_dict, allow_nan=False)
  assert type(as_dict["policies"]["sft"]["combined_reward"]) is float
  assert type(as_dict["policies"]["sft"]["prompts"]) is int
  assert Results.from_dict(as_dict).policies["sft"].combined_reward == -0.25


def _set(raw, path, value):
  *parents, last = path
  for key in parents:
    raw = raw[key]
  raw[last] = value


def _delete(raw, path):
  *parents, last = path
  for key in parents:
    raw = raw[key]
  del raw[last]


@pytest.mark.parametrize("path, expected", [
    (("policies", "ppo", "kl_to_reference"), "results.policies.ppo.kl_to_reference"),
    (("best_of_k", "prompts"), "results.best_of_k.prompts"),
    (("reward_models", "safety", "pairs_by_rating", "better"),
     "results.reward_models.safety.pairs_by_rating.better"),
    (("policies", "sft", "samples", 0, "response"), "results.policies.sft.samples[0].response"),
    (("win_rates", "ppo_vs_sft", "interval"), "results.win_rates.ppo_vs_sft.interval"),
    (("reward_models", "safety"), "results.reward_models.safety"),
    (("policies", "rejection_sampling"), "results.policies.rejection_sampling"),
    (("win_rates",), "results.win_rates"),
])
def test_from_dict_missing_field_names_path(path, expected):
  raw = _raw_results()
  _delete(raw, path)
  with pytest.raises(InvalidResultsError, match=f"missing .*{re.escape(expected)}"):
    Results.from_dict(raw)


@pytest.mark.parametrize("path, value, expected", [
    (("policies", "sft", "combined_reward"), math.nan,
     "results.policies.sft.combined_reward must be a finite number, got nan"),
    (("policies", "ppo", "helpfulness_reward"), "high",
     "results.policies.ppo.helpfulness_reward must be a finite number"),
    (("reward_models", "helpfulness", "correct_by_rating", "better"), 1.5,
     "results.reward_models.helpfulness.correct_by_rating.better must be a non-negative integer"),
    (("best_of_k", "prompts"), -1, "results.best_of_k.prompts must be a non-negative integer"),
    (("best_of_k", "max_reward", 1), math.inf, "results.best_of_k.max_reward\\[1\\]"),
    (("policies", "sft", "samples", 0, "prompt"), 7,
     "results.policies.sft.samples\\[0\\].prompt must be a string"),
    (("policies", "sft", "self_bleu"), {"hot": 0.5},
     "results.policies.sft.self_bleu key 'hot' is not a temperature"),
    (("win_rates", "ppo_vs_sft", "interval"), "normal",
     "results.win_rates.ppo_vs_sft.interval must be one of"),
    (("policies", "sft", "refusals", "safe_refused"), 9,
     "results.policies.sft.refusals is invalid: .*safe_refused <= safe_prompts"),
    (("reward_models", "safety", "correct_by_rating", "unknown"), 11,
     "results.reward_models.safety is invalid: .*'unknown'"),
    (("best_of_k", "k"), [1, 4, 2], "results.best_of_k is invalid: .*must increase"),
    (("policies", "ppo", "safety_violations", "threshold"), 1.5,
     "results.policies.ppo.safety_violations is invalid: .*threshold"),
    (("win_rates", "ppo_vs_sft", "upper"), 1.5, "results.win_rates.ppo_vs_sft"),
    (("win_rates", "ppo_vs_sft", "win_rate"), 0.9, "results.win_rates.ppo_vs_sft"),
    (("policies",), [], "results.policies must be an object, got list"),
])
def test_from_dict_invalid_field_names_path(path, value, expected):
  raw = _raw_results()
  _set(raw, path, value)
  with pytest.raises(InvalidResultsError, match=expected):
    Results.from_dict(raw)


def test_from_dict_unknown_key():
  raw = _raw_results()
  raw["policies"]["ppo"]["reward"] = 1.0
  with pytest.raises(InvalidResultsError,
                     match="results.policies.ppo has unknown keys \\['reward'\\]"):
    Results.from_dict(raw)


def test_results_dataclass_rejects_non_finite():
  policy = Results.from_dict(_raw_results()).policies["sft"]
  with pytest.raises(InvalidResultsError, match="PolicyResults.safety_reward must be finite"):
    dataclasses.replace(policy, safety_reward=math.inf)
  with pytest.raises(InvalidResultsError, match="kl_to_reference"):
    dataclasses.replace(policy, kl_to_reference=math.nan)


def test_write_report_files(tmp_path):
  results = Results.from_dict(_raw_results())
  metrics_path = _write_metrics(tmp_path / "run")
  files = report.write_report(results, tmp_path / "report", metrics_path=metrics_path)

  assert files.markdown == tmp_path / "report" / "report.md"
  assert files.markdown.is_file()
  assert files.json.is_file()
  plot_names = sorted(path.name for path in files.plots)
  assert plot_names == ["best_of_k.png", "policy_rewards.png", "reward_model_accuracy.png",
                        "self_bleu.png", "training_ppo.png", "training_sft.png"]
  for path in files.plots:
    assert path.read_bytes().startswith(PNG_SIGNATURE), path
    assert path.stat().st_size > 1000, path
  # No temporary file is left behind by the atomic writes.
  assert not list((tmp_path / "report").rglob("*.tmp"))


def test_write_report_json_is_finite(tmp_path):
  results = Results.from_dict(_raw_results())
  files = report.write_report(results, tmp_path, metrics_path=_write_metrics(tmp_path / "run"))

  data = json.loads(files.json.read_text(), parse_constant=_reject_constant)
  assert set(data) == {"results", "summary", "training", "plots"}
  assert all(math.isfinite(number) for number in _numbers(data))
  assert Results.from_dict(data["results"]) == results

  # Rates derived from the counts: helpfulness ranks 19 of 26 pairs correctly, and its
  # "unknown" rating has no pairs.
  helpfulness = data["summary"]["reward_models"]["helpfulness"]
  assert helpfulness["accuracy"] == pytest.approx(19 / 26)
  assert helpfulness["accuracy_by_rating"]["significantly_better"] == pytest.approx(0.9)
  assert helpfulness["accuracy_by_rating"]["unknown"] is None
  assert data["summary"]["policies"]["sft"]["false_refusal_rate"] == pytest.approx(0.25)
  assert data["summary"]["policies"]["ppo"]["false_refusal_rate"] is None
  assert data["summary"]["policies"]["ppo"]["safety_violation_proxy_rate"] == pytest.approx(0.25)

  # The NaN last value of ppo/kl becomes null and is listed as non-finite.
  ppo = data["training"]["ppo"]
  assert ppo["last"] == {"ppo/kl": None, "ppo/reward": 0.3}
  assert ppo["non_finite"] == ["ppo/kl"]
  assert (ppo["first_step"], ppo["last_step"], ppo["records"]) == (1, 2, 2)
  assert data["training"]["sft"]["last"]["sft/loss"] == pytest.approx(0.6)

  for relative in data["plots"].values():
    assert (tmp_path / relative).is_file()


def test_write_report_markdown_tables(tmp_path):
  results = Results.from_dict(_raw_results())
  files = report.write_report(results, tmp_path, metrics_path=_write_metrics(tmp_path / "run"),
                              title="Tiny run")
  markdown = files.markdown.read_text()

  assert markdown.startswith("# Tiny run\n")
  for heading in ("## Training curves", "### sft", "### ppo", "## Reward models", "## Best-of-K",
                  "## Policies", "## Win rates", "## Diversity", "## Sampled answers"):
    assert f"\n{heading}\n" in markdown, heading
  assert "| rating | helpfulness: accuracy (pairs) | safety: accuracy (pairs) |" in markdown
  # 19 of 26 helpfulness pairs and 15 of 26 safety pairs are correct.
  assert "| overall | 0.7308 (26) | 0.5769 (26) |" in markdown
  assert "| unknown | missing (0) | 0.5 (10) |" in markdown
  assert "| 4 | 0.7 | 0.15 |" in markdown
  assert "| ppo\\_vs\\_sft | 0.6 | [0.3, 0.85] | 0.95 (wilson) | 5 / 2 / 3 |" in markdown
  assert "| 0.7 | missing | 0.4 | missing |" in markdown  # Self-BLEU: only one policy at 0.7.
  # sft has no KL, ppo no refusal counts.
  assert re.search(r"\| sft \| 8 \| -0\.2 \| 0\.05 \| -0\.7 \| missing \| 0\.25 \| 0\.75 \|",
                   markdown)
  assert re.search(r"\| ppo \| 8 \| 0\.3 \| .* \| 0\.5 \| missing \| missing \| 0\.25 ", markdown)
  # Training table: last values, with the NaN shown as measured.
  assert "| `sft/loss` | 0.6 | 5 |" in markdown
  assert "| `ppo/kl` | nan | 2 |" in markdown

  # The sampled answer cannot break the table or add a heading.
  assert "Run \\`kill \\<pid\\>\\` \\| or press Ctrl-C.<br>\\# Done" in markdown
  assert "\n# Done" not in markdown

  for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
    assert (tmp_path / link).is_file(), link


def test_write_report_without_metrics(tmp_path):
  raw = _raw_results()
  for policy in raw["policies"].values():
    policy["self_bleu"] = {}
  raw["win_rates"] = {}
  files = report.write_report(Results.from_dict(raw), tmp_path)

  markdown = files.markdown.read_text()
  assert "The metrics log was not given or has no records" in markdown
  assert "Self-BLEU is missing" in markdown
  assert "No win rates were measured." in markdown
  assert sorted(path.name for path in files.plots) == [
      "best_of_k.png", "policy_rewards.png", "reward_model_accuracy.png"]
  data = json.loads(files.json.read_text(), parse_constant=_reject_constant)
  assert data["training"] == {}


def test_write_report_with_empty_metrics_file(tmp_path):
  metrics_path = tmp_path / "metrics.jsonl"
  metrics_path.write_text("")
  files = report.write_report(Results.from_dict(_raw_results()), tmp_path,
                              metrics_path=metrics_path)
  assert "The metrics log was not given or has no records" in files.markdown.read_text()


def test_write_report_overwrites_previous_report(tmp_path):
  results = Results.from_dict(_raw_results())
  report.write_report(results, tmp_path, title="First")
  files = report.write_report(results, tmp_path, title="Second")
  assert files.markdown.read_text().startswith("# Second\n")
  assert oct(files.json.stat().st_mode & 0o777) == oct(0o644)


def test_select_curve_keys_leaves_out_sums(tmp_path):
  with MetricsWriter(tmp_path, stage="reward", is_writer=True) as writer:
    writer.write(1, {"reward/correct_sum": 3.0, "reward/grad_norm": 1.5, "reward/pairs": 4.0,
                     "reward/accuracy": 0.75, "reward/correct_sum/better": 1.0,
                     "reward/loss": 0.7})
  with MetricsWriter(tmp_path, stage="counts", is_writer=True) as writer:
    writer.write(1, {"counts/pairs": 4.0, "counts/correct_sum": 3.0})
  records = read_metrics(tmp_path)
  # Objectives first in PRIORITY_KEYS order, then other means in logged order, no sums.
  assert report.select_curve_keys(records, "reward") == [
      "reward/loss", "reward/accuracy", "reward/grad_norm"]
  assert report.select_curve_keys(records, "reward", max_keys=2) == [
      "reward/loss", "reward/accuracy"]
  # A stage that logs only sums still gets its curves.
  assert report.select_curve_keys(records, "counts") == ["counts/pairs", "counts/correct_sum"]
  assert report.select_curve_keys(records, "sft") == []


def test_escape_markdown_and_format_number():
  assert report_markdown.escape_markdown("a|b*c\r\nd") == "a\\|b\\*c<br>d"
  assert report_markdown.escape_markdown("<script>") == "\\<script\\>"
  assert report_markdown.format_number(None) == "missing"
  assert report_markdown.format_number(0.123456) == "0.1235"
  assert report_markdown.format_number(12345.0) == "1.234e+04"


def test_policy_results_from_evaluation_outputs(tmp_path):
  # The evaluation functions' outputs plug into the schema and the report directly.
  raw = _raw_results()
  results = Results.from_dict(raw)
  win = evaluation.win_rate(scores_a_B=[1.0, 2.0, 0.0], scores_b_B=[0.0, 1.0, 1.0])
  counts = evaluation.count_refusals(responses=["I cannot.", "Sure."], labels=["safe", "unsafe"])
  violations = evaluation.safety_violation_proxy(safety_scores_B=np.array([-3.0, 1.0]))
  accuracy = evaluation.reward_model_accuracy(
      chosen_scores_B=np.array([1.0, 0.5], np.float32), rejected_scores_B=np.zeros(2, np.float32),
      ratings_B=np.array([0, 1]))
  policy = dataclasses.replace(
      results.policies["ppo"], refusals=counts, safety_violations=violations,
      self_bleu=evaluation.self_bleu_by_temperature({0.5: ["a b c d", "a b c e"]}))
  results = dataclasses.replace(
      results, reward_models={"helpfulness": accuracy, "safety": accuracy},
      policies={**results.policies, "ppo": policy}, win_rates={"ppo_vs_sft": win})

  files = report.write_report(results, tmp_path)
  data = json.loads(files.json.read_text(), parse_constant=_reject_constant)
  assert Results.from_dict(data["results"]) == results
  assert data["summary"]["policies"]["ppo"]["false_refusal_rate"] == 1.0
  assert data["results"]["win_rates"]["ppo_vs_sft"]["win_rate"] == pytest.approx(2 / 3)


def test_required_names_are_checked_in_dataclass():
  results = Results.from_dict(_raw_results())
  policies = dict(results.policies)
  del policies["ppo"]
  with pytest.raises(InvalidResultsError, match="policies is missing \\['ppo'\\]"):
    dataclasses.replace(results, policies=policies)
