"""PPO rollouts: score sampled responses and turn the scores into advantages.

`score_rollout` is the bridge between sampling and `llama2_jax.steps.ppo.ppo_step`. It scores
each prompt + response with the helpfulness and safety reward models, combines the two scores as
Llama 2 does, adds the per-token KL penalty to the frozen reference policy, and computes GAE
advantages (whitened over the real response tokens of the whole rollout) and value targets.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from llama2_jax.losses.ppo import gae_advantages, kl_penalized_rewards, masked_whiten
from llama2_jax.losses.reward import RewardStatistics, combine_safety_and_helpfulness_rewards
from llama2_jax.model import Llama
from llama2_jax.sampling import SampleOutput
from llama2_jax.steps.ppo import response_logprobs, response_values


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Settings of PPO's rollout scoring.

  Attributes:
    kl_coef: beta of the per-token KL penalty (Llama 2: 0.01 for 7B and 13B, 0.005 for 34B and
      70B).
    kl_estimator: "k1" or "k3".
    gamma: discount factor (1 for language-model rewards).
    lam: GAE lambda.
    safety_threshold: safety probability under which the safety score is used (0.15).
    whiten_advantages: whiten the advantages over the rollout's response tokens.
  """

  kl_coef: float = 0.01
  kl_estimator: str = "k1"
  gamma: float = 1.0
  lam: float = 0.95
  safety_threshold: float = 0.15
  whiten_advantages: bool = True

  def __post_init__(self):
    checks = (("kl_coef", self.kl_coef >= 0, ">= 0"),
              ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
              ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
              ("safety_threshold", 0 < self.safety_threshold < 1, "in (0, 1)"),
              ("kl_estimator", self.kl_estimator in ("k1", "k3"), 'one of "k1", "k3"'))
    for name, valid, rule in checks:
      if not valid:
        raise ValueError(f"RolloutConfig.{name} is {getattr(self, name)!r}; it must be {rule}.")


def concatenate_prompt_and_response(prompt_tokens_BxP, prompt_mask_BxP, sample: SampleOutput):
  """Returns (tokens [B, P + T], attention mask [B, P + T]) of prompts followed by responses."""
  tokens = jnp.concatenate([prompt_tokens_BxP, sample.tokens_BxT], axis=1)
  mask = jnp.concatenate([prompt_mask_BxP.astype(jnp.int32), sample.mask_BxT], axis=1)
  return tokens, mask


@functools.partial(jax.jit, static_argnames=("policy_model", "value_model", "reward_model",
                                             "config", "helpfulness_statistics",
                                             "safety_statistics"))
def score_rollout(*, policy_model: Llama, value_model: Llama, reward_model: Llama,
                  policy_params, ref_params, value_params, helpfulness_params, safety_params,
                  helpfulness_statistics: RewardStatistics, safety_statistics: RewardStatistics,
                  prompt_tokens_BxP, prompt_mask_BxP, is_safety_B, sample: SampleOutput,
                  config: RolloutConfig):
  """Scores a batch of sampled responses and builds the `ppo_step` batch.

  The old log-probabilities are recomputed with a teacher-forced forward pass of the same function
  that `ppo_step` uses, rather than taken from the sampler, so a step with learning rate 0 sees a
  ratio of 1.

  Returns:
    (batch, metrics): the batch keys that `ppo_step` reads, plus `scores` [B] (the whitened
    combined reward) and the raw `helpfulness_scores` and `safety_scores`; the metrics of the KL
    penalty and of the reward selection.
  """
  tokens, mask = concatenate_prompt_and_response(prompt_tokens_BxP, prompt_mask_BxP, sample)
  response_mask = sample.mask_BxT
  length = response_mask.shape[1]

  helpfulness_B = reward_model.apply(helpfulness_params, tokens, mask)
  safety_B = reward_model.apply(safety_params, tokens, mask)
  scores_B, selection_metrics = combine_safety_and_helpfulness_rewards(
      helpfulness_scores_B=helpfulness_B, safety_scores_B=safety_B,
      is_safety_prompt_B=is_safety_B, helpfulness_statistics=helpfulness_statistics,
      safety_statistics=safety_statistics, safety_threshold=config.safety_threshold)

  old_logprobs = response_logprobs(policy_model, policy_params, tokens, mask, length)
  ref_logprobs = response_logprobs(policy_model, ref_params, tokens, mask, length)
  old_values = response_values(value_model, value_params, tokens, mask, length)
  rewards, kl_metrics = kl_penalized_rewards(
      scores_B=scores_B, logprobs_BxT=old_logprobs, ref_logprobs_BxT=ref_logprobs,
      response_mask_BxT=response_mask, kl_coef=config.kl_coef,
      kl_estimator=config.kl_estimator)
  advantages, returns = gae_advantages(rewards_BxT=rewards, values_BxT=old_values,
                                       mask_BxT=response_mask, gamma=config.gamma,
                                       lam=config.lam)
  if config.whiten_advantages:
    advantages = masked_whiten(advantages, response_mask)

  batch = dict(tokens=tokens, attention_mask=mask, response_mask=response_mask,
               old_logprobs=old_logprobs, old_values=old_values, advantages=advantages,
               returns=returns, scores=scores_B, helpfulness_scores=helpfulness_B,
               safety_scores=safety_B)
  return batch, {**kl_metrics, **selection_metrics}
