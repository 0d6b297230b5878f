"""The sections of report.md, rendered from `report_schema.Results` and the metrics log.

Numbers are printed with four significant digits; a value that was not measured prints as
"missing". Text that comes from the run (sampled prompts and answers, names) is escaped with
`escape_markdown`. Image links are the paths given in `plots`, relative to report.md.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from llama2_jax.evaluation_reward import RATING_NAMES
from llama2_jax.metrics_log import MetricsRecord
from llama2_jax.report_schema import Results

# Characters that CommonMark lets a backslash escape and that could start markup inline or in a
# table cell.
_MARKDOWN_SPECIAL = frozenset("\\`*_[]<>|~#!&")


def escape_markdown(text: str) -> str:
  """Escapes text for one line of markdown, such as a table cell, keeping it readable.

  Markup characters are backslash-escaped, carriage returns dropped and newlines replaced by
  <br>, so a sampled answer cannot add headings, links, HTML or table columns.
  """
  escaped = "".join(f"\\{char}" if char in _MARKDOWN_SPECIAL else char for char in text)
  return escaped.replace("\r", "").replace("\n", "<br>")


def format_number(value: float | None, digits: int = 4) -> str:
  """Formats a measured number with `digits` significant digits, or "missing" for None."""
  return "missing" if value is None else f"{value:.{digits}g}"


def render_markdown(results: Results, *, records: Sequence[MetricsRecord],
                    curve_keys: Mapping[str, Sequence[str]], plots: Mapping[str, str],
                    title: str) -> str:
  """Returns the text of report.md; `plots` maps plot names to paths relative to report.md."""
  sections = [
      f"# {escape_markdown(title)}\n\nEvery number below was measured by the run that wrote "
      "this report; \"missing\" marks a value that was not measured.\n",
      training_section(records, curve_keys, plots),
      reward_model_section(results, plots),
      best_of_k_section(results, plots),
      policy_section(results, plots),
      win_rate_section(results),
      diversity_section(results, plots),
      samples_section(results),
  ]
  return "\n".join(sections)


def training_section(records: Sequence[MetricsRecord], curve_keys: Mapping[str, Sequence[str]],
                     plots: Mapping[str, str]) -> str:
  lines = ["## Training curves\n"]
  if not records:
    lines.append("The metrics log was not given or has no records, so the training curves are "
                 "missing.\n")
  for stage, keys in curve_keys.items():
    stage_records = [record for record in records if record.stage == stage]
    lines.append(f"### {escape_markdown(stage)}\n")
    lines.append(f"{len(stage_records)} records, steps {stage_records[0].step} to "
                 f"{stage_records[-1].step}.\n")
    if f"training_{stage}" in plots:
      lines.append(f"![{escape_markdown(stage)} training curves]({plots[f'training_{stage}']})\n")
    rows = []
    for key in keys:
      last = [record for record in stage_records if key in record.metrics][-1]
      rows.append([f"`{key}`", format_number(last.metrics[key]), str(last.step)])
    lines.append(_table(["metric", "last value", "at step"], rows))
  return "\n".join(lines)


def reward_model_section(results: Results, plots: Mapping[str, str]) -> str:
  models = results.reward_models
  header = ["rating"] + [f"{escape_markdown(name)}: accuracy (pairs)" for name in models]
  rows = [["overall"] + [f"{format_number(m.accuracy)} ({m.pairs})" for m in models.values()]]
  for rating in RATING_NAMES:
    rows.append([rating.replace("_", " ")] + [
        f"{format_number(m.rating_accuracy(rating))} ({m.pairs_by_rating[rating]})"
        for m in models.values()])
  return "\n".join([
      "## Reward models\n",
      "Accuracy on held-out preference pairs: the fraction where the chosen response scores "
      "strictly higher than the rejected one. A rating without pairs is missing.\n",
      f"![Reward-model accuracy]({plots['reward_model_accuracy']})\n",
      _table(header, rows)])


def best_of_k_section(results: Results, plots: Mapping[str, str]) -> str:
  curve = results.best_of_k
  rows = [[str(k), format_number(high), format_number(median)]
          for k, high, median in zip(curve.k, curve.max_reward, curve.median_reward)]
  return "\n".join([
      "## Best-of-K\n",
      f"Maximum and median combined reward among the first K samples of each of "
      f"{curve.prompts} held-out prompts, averaged over prompts. The samples come from the SFT "
      "policy, as in a rejection-sampling round.\n",
      f"![Best-of-K reward]({plots['best_of_k']})\n",
      _table(["K", "max reward", "median reward"], rows)])


def policy_section(results: Results, plots: Mapping[str, str]) -> str:
  rows = []
  for name, policy in results.policies.items():
    refusals, violations = policy.refusals, policy.safety_violations
    rows.append([
        escape_markdown(name), str(policy.prompts), format_number(policy.combined_reward),
        format_number(policy.helpfulness_reward), format_number(policy.safety_reward),
        format_number(policy.kl_to_reference),
        format_number(None if refusals is None else refusals.false_refusal_rate),
        format_number(None if refusals is None else refusals.unsafe_refusal_rate),
        "missing" if violations is None else
        f"{format_number(violations.rate)} (threshold {violations.threshold:g})"])
  header = ["policy", "prompts", "combined reward", "helpfulness reward", "safety reward",
            "KL to reference", "false-refusal rate", "unsafe refusal rate",
            "safety-violation proxy"]
  return "\n".join([
      "## Policies\n",
      "Means over held-out prompts. The combined reward is the reward that PPO optimises: "
      "each reward model's score whitened with the mean and standard deviation it had on its "
      "own training pairs, so it is not centred on the policies' responses. Helpfulness and "
      "safety are the raw reward-model scores.\n",
      "KL to reference estimates KL(policy || SFT policy) per response, in nats: the mean over "
      "the policy's own samples of the summed log-probability ratio. It is a sample estimate, "
      "so it can be slightly negative when the true value is near 0.\n",
      "The false-refusal rate is the fraction of XSTest's safe prompts whose response a "
      "string-matching heuristic classifies as a refusal, and the unsafe refusal rate is the "
      "same fraction on its unsafe prompts; both come from greedy decoding. The "
      "safety-violation proxy is the fraction of responses to the held-out safety prompts "
      "whose safety reward-model probability is below the threshold, a stand-in for human "
      "safety ratings.\n",
      f"![Rewards per policy]({plots['policy_rewards']})\n",
      _table(header, rows)])


def win_rate_section(results: Results) -> str:
  if not results.win_rates:
    return "## Win rates\n\nNo win rates were measured.\n"
  rows = [[escape_markdown(name), format_number(result.win_rate),
           f"[{format_number(result.lower)}, {format_number(result.upper)}]",
           f"{result.confidence:g} ({result.interval})",
           f"{result.wins} / {result.ties} / {result.losses}"]
          for name, result in results.win_rates.items()]
  return "\n".join([
      "## Win rates\n",
      "Win rate of the first policy over the second by reward score on the same prompts, ties "
      "counted as half a win.\n",
      _table(["comparison", "win rate", "interval", "confidence", "wins / ties / losses"],
             rows)])


def diversity_section(results: Results, plots: Mapping[str, str]) -> str:
  policies = results.policies
  temperatures = sorted({t for policy in policies.values() for t in policy.self_bleu})
  if not temperatures:
    return "## Diversity\n\nSelf-BLEU is missing: no policy was sampled for it.\n"
  rows = [[f"{t:g}"] + [format_number(policy.self_bleu.get(t)) for policy in policies.values()]
          for t in temperatures]
  return "\n".join([
      "## Diversity\n",
      "Self-BLEU (BLEU-4 of each sample against the others; lower is more diverse) against "
      "the sampling temperature.\n",
      f"![Self-BLEU against temperature]({plots['self_bleu']})\n",
      _table(["temperature"] + [escape_markdown(name) for name in policies], rows)])


def samples_section(results: Results) -> str:
  lines = ["## Sampled answers\n"]
  for name, policy in results.policies.items():
    lines.append(f"### {escape_markdown(name)}\n")
    if not policy.samples:
      lines.append("No sampled answers were given.\n")
      continue
    rows = [[escape_markdown(sample.prompt), escape_markdown(sample.response)]
            for sample in policy.samples]
    lines.append(_table(["prompt", "response"], rows))
  return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines) + "\n"
