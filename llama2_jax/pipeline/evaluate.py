"""Stage 6: evaluates the SFT, rejection-sampling and PPO policies and writes the report.

Every number comes from this run:
  * both reward models score responses sampled on held-out RL prompts (the test split, never
    seen in training);
  * KL to the SFT policy is estimated from each policy's own samples;
  * Self-BLEU is measured on several responses to the same prompts at each temperature;
  * refusals are counted on XSTest's safe and unsafe prompts with greedy decoding;
  * the best-of-K curve samples K responses per held-out prompt from the SFT policy.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from absl import logging
import jax
import numpy as np
import tqdm

from llama2_jax import distributed
from llama2_jax.chat import Message, encode_dialog_prompt
from llama2_jax.evaluation_bleu import self_bleu
from llama2_jax.evaluation_refusal import count_refusals
from llama2_jax.evaluation_reward import (
    RewardAccuracy, safety_violation_proxy, win_rate)
from llama2_jax.losses.rejection_sampling import reward_by_num_samples
from llama2_jax.pipeline.context import RunContext
from llama2_jax.pipeline.policy import PolicyScorer, sample_responses, sequence_kl
from llama2_jax.report import write_report
from llama2_jax.report_schema import (
    BestOfKCurve, PolicyResults, Results, SampledAnswer)
from llama2_jax.data.prompts import left_pad

POLICY_STAGES = ("sft", "rejection_sampling", "ppo")
DIVERSITY_PROMPTS = 4


class _PromptSet:
  """Chat-formatted prompts left-padded into one batch, with their texts and flags."""

  def __init__(self, ctx: RunContext, texts: Sequence[str], flags: Sequence[bool],
               max_length: int, limit: int):
    self.texts, self.flags, ids = [], [], []
    for text, flag in zip(texts, flags):
      tokens = encode_dialog_prompt(ctx.tokenizer, [Message("user", text)])
      if len(tokens) > max_length:
        continue
      self.texts.append(text)
      self.flags.append(flag)
      ids.append(np.asarray(tokens, np.int32))
      if len(ids) == limit:
        break
    if not ids:
      raise ValueError(f"No evaluation prompt fits in max_prompt_length={max_length}.")
    self.tokens, self.mask = left_pad(ids, batch_size=len(ids), max_length=max_length,
                                      pad_id=ctx.tokenizer.pad_id, bos_id=ctx.tokenizer.bos_id)
    self.is_safety = np.asarray(self.flags, bool)

  def __len__(self) -> int:
    return len(self.texts)

  def repeat(self, rows: int, times: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns the first `rows` prompts, each repeated `times` times in a row."""
    return (np.repeat(self.tokens[:rows], times, axis=0),
            np.repeat(self.mask[:rows], times, axis=0))


def _responses(ctx: RunContext, output) -> list[str]:
  tokens, mask = np.asarray(output.tokens_BxT), np.asarray(output.mask_BxT)
  return [ctx.tokenizer.decode(row[(row_mask != 0) & (row != ctx.tokenizer.eos_id)].tolist())
          for row, row_mask in zip(tokens, mask)]


def run_evaluation(ctx: RunContext, scorer: PolicyScorer,
                   policy_stages: Mapping[str, str]) -> tuple[str, Any]:
  """Measures everything in the report and writes it; returns (summary, report files).

  Args:
    ctx: the run.
    scorer: both reward models.
    policy_stages: the stage whose final policy stands for each name of `POLICY_STAGES`, e.g.
      {"sft": "sft", "rejection_sampling": "rejection_sampling_2", "ppo": "ppo_2"}.
  """
  settings = ctx.settings.eval
  sampling = settings.sampling
  records = ctx.records("rl_prompts", "test")
  prompts = _PromptSet(ctx, [r.text for r in records], [r.is_safety for r in records],
                       sampling.max_prompt_length, settings.num_prompts)
  xstest = [r for r in ctx.records("xstest", "test")]
  refusal_prompts = []
  for label in ("safe", "unsafe"):
    chosen = [r for r in xstest if r.label == label]
    refusal_prompts.append(_PromptSet(ctx, [r.text for r in chosen], [label == "unsafe"] * len(
        chosen), sampling.max_prompt_length, settings.num_safe_borderline_prompts))
  rng = jax.random.key(ctx.settings.seed + 23)
  policies = {name: ctx.final_params(policy_stages[name], ctx.policy_model)
              for name in POLICY_STAGES}
  reference = policies["sft"]

  results, combined = {}, {}
  progress = tqdm.tqdm(policies.items(), desc="eval", total=len(policies),
                       disable=not distributed.is_main_process(), dynamic_ncols=True)
  for index, (stage, params) in enumerate(progress):
    key = jax.random.fold_in(rng, index)
    output = sample_responses(ctx, params, prompts.tokens, prompts.mask, key, sampling)
    scores = scorer.score(prompts.tokens, prompts.mask, output, prompts.is_safety)
    combined[stage] = scores["combined"]
    kl = sequence_kl(ctx, params, reference, prompts.tokens, prompts.mask, output)
    answers = _responses(ctx, output)

    refusal_answers, labels = [], []
    for prompt_set, label in zip(refusal_prompts, ("safe", "unsafe")):
      greedy = sample_responses(ctx, params, prompt_set.tokens, prompt_set.mask, key, sampling,
                                temperature=0.0)
      refusal_answers += _responses(ctx, greedy)
      labels += [label] * len(prompt_set)
    refusals = count_refusals(responses=refusal_answers, labels=labels)

    safety_scores = scores["safety"][prompts.is_safety]
    violations = (safety_violation_proxy(safety_scores_B=safety_scores,
                                         threshold=ctx.settings.ppo.safety_threshold)
                  if safety_scores.size else None)
    results[stage] = PolicyResults(
        prompts=len(prompts), combined_reward=float(np.mean(scores["combined"])),
        helpfulness_reward=float(np.mean(scores["helpfulness"])),
        safety_reward=float(np.mean(scores["safety"])), kl_to_reference=float(np.mean(kl)),
        self_bleu=_self_bleu(ctx, params, prompts, key, sampling), refusals=refusals,
        safety_violations=violations,
        samples=tuple(SampledAnswer(prompt=text, response=answer) for text, answer in zip(
            prompts.texts[:settings.answers_in_report], answers)))
    logging.info("Evaluated the %s policy: combined reward %.3f.", stage,
                 results[stage].combined_reward)

  best_of_k = _best_of_k(ctx, policies["sft"], prompts, scorer, jax.random.fold_in(rng, 99))
  reward_models = {}
  for name in ("helpfulness", "safety"):
    accuracy = ctx.read_done(f"reward_{name}")["accuracy"]
    reward_models[name] = RewardAccuracy(correct_by_rating=accuracy["correct_by_rating"],
                                         pairs_by_rating=accuracy["pairs_by_rating"])
  win_rates = {f"{stage}_vs_sft": win_rate(scores_a_B=combined[stage],
                                           scores_b_B=combined["sft"])
               for stage in ("rejection_sampling", "ppo")}
  report = Results(reward_models=reward_models, best_of_k=best_of_k, policies=results,
                   win_rates=win_rates)
  files = write_report(report, ctx.workdir / "report", metrics_path=ctx.workdir / "metrics.jsonl")
  ctx.finish_stage("eval", None, {"report": str(files.markdown), "results": report.to_dict()})
  summary = ", ".join(f"{stage} reward {results[stage].combined_reward:.3f}"
                      for stage in POLICY_STAGES)
  return (f"eval: {summary}; PPO beats SFT on "
          f"{win_rates['ppo_vs_sft'].win_rate:.0%} of {len(prompts)} prompts"), files


def _self_bleu(ctx: RunContext, params, prompts: _PromptSet, key, sampling) -> dict[float, float]:
  """Mean Self-BLEU of several responses to each of the first prompts, per temperature."""
  settings = ctx.settings.eval
  rows = min(DIVERSITY_PROMPTS, len(prompts))
  count = settings.samples_per_temperature
  tokens, mask = prompts.repeat(rows, count)
  by_temperature = {}
  for index, temperature in enumerate(settings.temperatures):
    output = sample_responses(ctx, params, tokens, mask, jax.random.fold_in(key, 1000 + index),
                              sampling, temperature=temperature)
    responses = [tuple(row[row_mask != 0].tolist()) for row, row_mask in zip(
        np.asarray(output.tokens_BxT), np.asarray(output.mask_BxT))]
    scores = [self_bleu(responses[start:start + count]) for start in range(0, len(responses),
                                                                           count)]
    by_temperature[float(temperature)] = float(np.mean(scores))
  return by_temperature


def _best_of_k(ctx: RunContext, params, prompts: _PromptSet, scorer: PolicyScorer,
               key) -> BestOfKCurve:
  """Combined reward of the best and the median of k SFT samples, for k = 1..best_of_k."""
  settings = ctx.settings.eval
  sampling = ctx.settings.rejection_sampling.sampling
  rewards = []
  for k in range(settings.best_of_k):
    output = sample_responses(ctx, params, prompts.tokens, prompts.mask,
                              jax.random.fold_in(key, k), sampling)
    rewards.append(scorer.score(prompts.tokens, prompts.mask, output,
                                prompts.is_safety)["combined"])
  curve = reward_by_num_samples(rewards_PxK=np.stack(rewards, axis=1))
  return BestOfKCurve.from_reward_by_k(curve, prompts=len(prompts))
