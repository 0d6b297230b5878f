"""PPO step: clipped policy and value updates on a scored rollout batch.

The KL penalty to the frozen reference policy is not in the loss: it enters the per-token rewards
when the rollout is scored (`llama2_jax.rollout.score_rollout`), and so reaches the policy through
the advantages.

Rollout batches concatenate a left-padded prompt [B, P] and a right-padded response [B, T] into
one row of P + T tokens. The logits at column P + t - 1 predict response token t, and the value
head's output there is the value of the state before that token, so every response-aligned
tensor here is [B, T].
"""

from __future__ import annotations

from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp

from llama2_jax.losses.ppo import masked_entropy, ppo_policy_loss, ppo_value_loss
from llama2_jax.losses.sft import token_logprobs
from llama2_jax.model import Llama
from llama2_jax.optim import accumulate_gradients
from llama2_jax.steps.common import gradient_metrics, reduce_microbatch_metrics
from llama2_jax.train_state import TrainState

PPO_MEANS = {
    "ppo/policy_loss": ("ppo/policy_loss_sum", "ppo/tokens"),
    "ppo/clip_fraction": ("ppo/clipped_sum", "ppo/tokens"),
    "ppo/approx_kl": ("ppo/approx_kl_sum", "ppo/tokens"),
    "ppo/ratio": ("ppo/ratio_sum", "ppo/tokens"),
    "ppo/value_loss": ("ppo/value_loss_sum", "ppo/tokens"),
    "ppo/value_error": ("ppo/value_error_sum", "ppo/tokens"),
    "ppo/value_clip_fraction": ("ppo/value_clipped_sum", "ppo/tokens"),
    "ppo/entropy": ("ppo/entropy_sum", "ppo/tokens"),
}


@flax.struct.dataclass
class PPOState:
  """Everything a PPO update reads and writes.

  Attributes:
    policy: the policy's training state (parameters, optimizer state, step, RNG).
    value: the value model's training state.
    ref_params: parameters of the frozen reference policy, for the KL penalty at rollout time.
  """

  policy: TrainState
  value: TrainState
  ref_params: Any

  @property
  def step(self) -> jax.Array:
    return self.policy.step


def _response_logits(model: Llama, params, tokens_BxL, mask_BxL, response_length: int):
  prompt_length = tokens_BxL.shape[1] - response_length
  logits_BxLxV = model.apply(params, tokens_BxL, mask_BxL)
  return logits_BxLxV[:, prompt_length - 1:-1]


def response_logprobs(model: Llama, params, tokens_BxL: jax.Array, mask_BxL: jax.Array,
                      response_length: int) -> jax.Array:
  """Log-probabilities [B, T] of the last `response_length` tokens of each row, in float32."""
  logits_BxTxV = _response_logits(model, params, tokens_BxL, mask_BxL, response_length)
  return token_logprobs(logits_BxTxV, tokens_BxL[:, -response_length:])


def response_values(model: Llama, params, tokens_BxL: jax.Array, mask_BxL: jax.Array,
                    response_length: int) -> jax.Array:
  """Values [B, T] of the states before each response token, from a "value"-head model."""
  prompt_length = tokens_BxL.shape[1] - response_length
  return model.apply(params, tokens_BxL, mask_BxL)[:, prompt_length - 1:-1]


def ppo_step(state: PPOState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
             policy_model: Llama, value_model: Llama, clip_epsilon: float = 0.2,
             value_clip_epsilon: float | None = 0.2, entropy_coef: float = 0.0,
             num_microbatches: int = 1) -> tuple[PPOState, dict]:
  """Takes one PPO update of the policy and the value model on a minibatch of a rollout.

  Args:
    state: policy, value model and frozen reference.
    batch: from `llama2_jax.rollout.score_rollout`: `tokens` and `attention_mask` [B, P + T];
      `response_mask`, `old_logprobs`, `old_values`, `advantages` (already whitened) and
      `returns` [B, T].
    rng: unused (no dropout).
    policy_model: the `Llama` with the "lm" head.
    value_model: the `Llama` with the "value" head.
    clip_epsilon: PPO's ratio clipping range (0.2 in Llama 2).
    value_clip_epsilon: clipping range of the value update, or None.
    entropy_coef: weight of the entropy bonus.
    num_microbatches: gradient accumulation, normalised by the minibatch's response tokens.

  Returns:
    (new_state, metrics) with the `ppo/` losses, ratio, clip fraction, approximate KL, value
    error and entropy, all averaged over response tokens only, and both gradient norms.
  """
  del rng
  response_length = batch["response_mask"].shape[1]
  normalizer = jnp.maximum(jnp.sum(batch["response_mask"] != 0).astype(jnp.float32), 1.0)

  def loss_fn(params, micro):
    policy_params, value_params = params
    logits_BxTxV = _response_logits(policy_model, policy_params, micro["tokens"],
                                    micro["attention_mask"], response_length)
    logprobs_BxT = token_logprobs(logits_BxTxV, micro["tokens"][:, -response_length:])
    policy_loss, metrics = ppo_policy_loss(
        logprobs_BxT=logprobs_BxT, old_logprobs_BxT=micro["old_logprobs"],
        advantages_BxT=micro["advantages"], response_mask_BxT=micro["response_mask"],
        clip_epsilon=clip_epsilon, normalizer=normalizer)
    entropy, entropy_metrics = masked_entropy(
        logits_BxTxV=logits_BxTxV, response_mask_BxT=micro["response_mask"],
        normalizer=normalizer)
    values_BxT = response_values(value_model, value_params, micro["tokens"],
                                 micro["attention_mask"], response_length)
    value_loss, value_metrics = ppo_value_loss(
        values_BxT=values_BxT, old_values_BxT=micro["old_values"],
        returns_BxT=micro["returns"], response_mask_BxT=micro["response_mask"],
        value_clip_epsilon=value_clip_epsilon, normalizer=normalizer)
    # The two models share no parameters, so one sum gives each its own gradient.
    total = policy_loss - entropy_coef * entropy + value_loss
    return total, {**metrics, **entropy_metrics, **value_metrics}

  inputs = {key: batch[key] for key in ("tokens", "attention_mask", "response_mask",
                                         "old_logprobs", "old_values", "advantages", "returns")}
  _, (policy_grads, value_grads), stacked = accumulate_gradients(
      loss_fn, (state.policy.params, state.value.params), inputs,
      num_microbatches=num_microbatches)
  metrics = reduce_microbatch_metrics(stacked, PPO_MEANS)
  metrics.update(gradient_metrics("ppo/policy", policy_grads))
  metrics.update(gradient_metrics("ppo/value", value_grads))
  new_state = state.replace(policy=state.policy.apply_gradients(policy_grads),
                            value=state.value.apply_gradients(value_grads))
  return new_state, metrics
