"""Sampling from a policy and scoring its responses with both reward models."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama2_jax.losses.reward import RewardStatistics, combine_safety_and_helpfulness_rewards
from llama2_jax.model import Llama
from llama2_jax.pipeline.context import RunContext
from llama2_jax.pipeline.settings import SamplingSettings
from llama2_jax.rollout import concatenate_prompt_and_response
from llama2_jax.sampling import SampleOutput, sample
from llama2_jax.steps.ppo import response_logprobs
from llama2_jax.steps.reward import reward_scores


def sample_responses(ctx: RunContext, params: Any, prompt_tokens_BxP, prompt_mask_BxP,
                     rng: jax.Array, sampling: SamplingSettings, *,
                     temperature: float | None = None) -> SampleOutput:
  """Samples one response per left-padded prompt with the policy model."""
  return sample(ctx.policy_model, params, jnp.asarray(prompt_tokens_BxP),
                jnp.asarray(prompt_mask_BxP), rng, max_new_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature if temperature is None else temperature,
                top_p=sampling.top_p, eos_id=ctx.tokenizer.eos_id, pad_id=ctx.tokenizer.pad_id)


# Reward-model scores [B] of whole rows, compiled once per model and shape.
score_sequences = jax.jit(reward_scores, static_argnums=0)


@functools.partial(jax.jit, static_argnames=("model", "response_length"))
def _sequence_kl(model: Llama, params, ref_params, tokens_BxL, mask_BxL, response_mask_BxT,
                 response_length: int):
  """Sum over response tokens of log pi(y_t) - log pi_ref(y_t): a sample of KL(pi || pi_ref)."""
  logprobs = response_logprobs(model, params, tokens_BxL, mask_BxL, response_length)
  ref_logprobs = response_logprobs(model, ref_params, tokens_BxL, mask_BxL, response_length)
  return jnp.sum(jnp.where(response_mask_BxT != 0, logprobs - ref_logprobs, 0.0), axis=1)


@dataclasses.dataclass
class PolicyScorer:
  """Scores prompt + response rows with the helpfulness and safety reward models.

  Attributes:
    ctx: the run.
    helpfulness_params, safety_params: the reward models' parameters.
    helpfulness_statistics, safety_statistics: their score statistics on their training data.
    safety_threshold: Llama 2's threshold of the combined reward (0.15).
  """

  ctx: RunContext
  helpfulness_params: Any
  safety_params: Any
  helpfulness_statistics: RewardStatistics
  safety_statistics: RewardStatistics
  safety_threshold: float

  def score(self, prompt_tokens_BxP, prompt_mask_BxP, output: SampleOutput,
            is_safety_B) -> dict[str, np.ndarray]:
    """Returns numpy [B] arrays: raw `helpfulness` and `safety` scores and the `combined` reward.

    The combined reward is the one PPO optimises: the safety score for safety prompts or unsafe
    responses, the helpfulness score otherwise, each whitened with its model's statistics.
    """
    tokens, mask = concatenate_prompt_and_response(
        jnp.asarray(prompt_tokens_BxP), jnp.asarray(prompt_mask_BxP), output)
    model = self.ctx.reward_model
    helpfulness_B = score_sequences(model, self.helpfulness_params, tokens, mask)
    safety_B = score_sequences(model, self.safety_params, tokens, mask)
    combined_B, _ = combine_safety_and_helpfulness_rewards(
        helpfulness_scores_B=helpfulness_B, safety_scores_B=safety_B,
        is_safety_prompt_B=jnp.asarray(is_safety_B),
        helpfulness_statistics=self.helpfulness_statistics,
        safety_statistics=self.safety_statistics, safety_threshold=self.safety_threshold)
    return {"helpfulness": np.asarray(helpfulness_B), "safety": np.asarray(safety_B),
            "combined": np.asarray(combined_B)}


def sequence_kl(ctx: RunContext, params: Any, ref_params: Any, prompt_tokens_BxP,
                prompt_mask_BxP, output: SampleOutput) -> np.ndarray:
  """Per-response estimate of KL(policy || reference) in nats, from the policy's own samples."""
  tokens, mask = concatenate_prompt_and_response(
      jnp.asarray(prompt_tokens_BxP), jnp.asarray(prompt_mask_BxP), output)
  return np.asarray(_sequence_kl(ctx.policy_model, params, ref_params, tokens, mask,
                                 output.mask_BxT, output.mask_BxT.shape[1]))


def load_scorer(ctx: RunContext) -> PolicyScorer:
  """Loads both finished reward models and their statistics from the work directory."""
  models = {}
  for name in ("helpfulness", "safety"):
    stage = f"reward_{name}"
    statistics = ctx.read_done(stage)["statistics"]
    models[name] = (ctx.final_params(stage, ctx.reward_model),
                    RewardStatistics(mean=statistics["mean"], std=statistics["std"]))
  return PolicyScorer(ctx=ctx, helpfulness_params=models["helpfulness"][0],
                      safety_params=models["safety"][0],
                      helpfulness_statistics=models["helpfulness"][1],
                      safety_statistics=models["safety"][1],
                      safety_threshold=ctx.settings.ppo.safety_threshold)
