"""Reward-model step: the binary ranking loss with a rating-dependent margin."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from llama2_jax.losses.reward import ranking_loss
from llama2_jax.model import Llama
from llama2_jax.optim import accumulate_gradients
from llama2_jax.steps.common import gradient_metrics, reduce_microbatch_metrics
from llama2_jax.train_state import TrainState

REWARD_MEANS = {
    "reward/loss": ("reward/loss_sum", "reward/pairs"),
    "reward/accuracy": ("reward/correct_sum", "reward/pairs"),
    "reward/chosen_mean": ("reward/chosen_sum", "reward/pairs"),
    "reward/rejected_mean": ("reward/rejected_sum", "reward/pairs"),
}


def reward_scores(model: Llama, params, tokens_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """Scores sequences with a reward model: float32 [B], read at each row's last real token."""
  return model.apply(params, tokens_BxL, mask_BxL)


def reward_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                model: Llama, num_microbatches: int = 1) -> tuple[TrainState, dict]:
  """Takes one optimizer step on the ranking loss of a batch of preference pairs.

  The chosen and rejected responses of a pair stay in the same micro-batch: they are scored in
  one forward pass over a stacked [2B, L] batch, the pair axis first.

  Args:
    state: the reward model's training state.
    batch: `chosen_tokens`, `chosen_mask`, `rejected_tokens`, `rejected_mask` (int32 [B, L]),
      `margin` (float32 [B]) and `rating` (int32 [B], `llama2_jax.losses.Rating` ids). A pair
      whose two masks are all zero is padding and changes nothing.
    rng: unused (no dropout).
    model: the `Llama` with the "reward" head.
    num_microbatches: gradient accumulation, normalised by the pair count of the whole batch.

  Returns:
    (new_state, metrics): `reward/loss`, `reward/accuracy`, mean chosen and rejected rewards,
    per-rating sums and counts, and `reward/grad_norm`.
  """
  del rng
  pair_mask_B = (jnp.sum(batch["chosen_mask"], axis=1) > 0) & \
      (jnp.sum(batch["rejected_mask"], axis=1) > 0)
  normalizer = jnp.maximum(jnp.sum(pair_mask_B).astype(jnp.float32), 1.0)

  def loss_fn(params, micro):
    tokens_2BxL = jnp.concatenate([micro["chosen_tokens"], micro["rejected_tokens"]])
    mask_2BxL = jnp.concatenate([micro["chosen_mask"], micro["rejected_mask"]])
    scores_2B = reward_scores(model, params, tokens_2BxL, mask_2BxL)
    chosen_B, rejected_B = jnp.split(scores_2B, 2)
    return ranking_loss(chosen_rewards_B=chosen_B, rejected_rewards_B=rejected_B,
                        margins_B=micro["margin"], ratings_B=micro["rating"],
                        pair_mask_B=micro["pair_mask"], normalizer=normalizer)

  inputs = {key: batch[key] for key in ("chosen_tokens", "chosen_mask", "rejected_tokens",
                                         "rejected_mask", "margin", "rating")}
  inputs["pair_mask"] = pair_mask_B
  _, grads, stacked = accumulate_gradients(loss_fn, state.params, inputs,
                                           num_microbatches=num_microbatches)
  metrics = reduce_microbatch_metrics(stacked, REWARD_MEANS)
  metrics.update(gradient_metrics("reward", grads))
  return state.apply_gradients(grads), metrics
