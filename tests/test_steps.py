"""Tests of the SFT, reward-model and PPO train steps on tiny models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama2_jax import get_model_config
from llama2_jax.losses.reward import RewardStatistics
from llama2_jax.model import Llama, init_params
from llama2_jax.optim import make_optimizer, ppo_optimizer_config, sft_optimizer_config
from llama2_jax.rollout import RolloutConfig, score_rollout
from llama2_jax.sampling import sample
from llama2_jax.steps import PPOState, ppo_step, reward_step, sft_step
from llama2_jax.train_state import TrainState

CONFIG = get_model_config("test_gqa")


def _state(head="lm", tx=None, seed=0):
  model = Llama(CONFIG, head=head)
  params = init_params(model, jax.random.key(seed))
  tx = tx or optax.sgd(0.1)
  return model, TrainState.create(params=params, tx=tx, rng=jax.random.key(seed))


def _sft_batch():
  # Row 0: 3 answer tokens; row 1: 1 answer token. Targets are the next tokens.
  tokens = jnp.array([[1, 10, 11, 12, 13, 2, 0, 0], [1, 20, 21, 2, 0, 0, 0, 0]], jnp.int32)
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((2, 1), jnp.int32)], axis=1)
  loss_mask = jnp.array([[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]], jnp.int32)
  attention_mask = (jnp.arange(8)[None] < jnp.array([[6], [4]])).astype(jnp.int32)
  return dict(tokens=tokens, targets=targets, loss_mask=loss_mask,
              attention_mask=attention_mask, segment_ids=attention_mask)


def test_sft_accumulation_matches_full_batch():
  model, state = _state()
  batch = _sft_batch()
  full_step = jax.jit(functools.partial(sft_step, model=model, num_microbatches=1))
  micro_step = jax.jit(functools.partial(sft_step, model=model, num_microbatches=2))

  full_state, full_metrics = full_step(state, batch, jax.random.key(0))
  micro_state, micro_metrics = micro_step(state, batch, jax.random.key(0))

  assert float(full_metrics["sft/tokens"]) == 4.0
  np.testing.assert_allclose(micro_metrics["sft/loss"], full_metrics["sft/loss"], rtol=1e-6)
  for full, micro in zip(jax.tree.leaves(full_state.params), jax.tree.leaves(micro_state.params)):
    np.testing.assert_allclose(micro, full, rtol=1e-5, atol=1e-7)


def test_sft_loss_is_token_average():
  model, state = _state()
  batch = _sft_batch()
  _, metrics = jax.jit(functools.partial(sft_step, model=model))(state, batch, jax.random.key(0))

  logits = model.apply(state.params, batch["tokens"], batch["attention_mask"])
  logprobs = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logprobs, batch["targets"][..., None], -1)[..., 0]
  expected = float(jnp.sum(nll * batch["loss_mask"]) / 4)
  np.testing.assert_allclose(float(metrics["sft/loss"]), expected, rtol=1e-5)


def test_sft_step_lowers_loss():
  tx = make_optimizer(sft_optimizer_config(total_steps=20, learning_rate=3e-3, warmup_steps=1))
  model, state = _state(tx=tx)
  step = jax.jit(functools.partial(sft_step, model=model), donate_argnums=0)
  batch = _sft_batch()

  losses = []
  for _ in range(15):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics["sft/loss"]))

  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 15


def _reward_batch():
  chosen = jnp.array([[1, 30, 31, 32, 2, 0], [0, 1, 40, 41, 42, 2], [1, 50, 51, 2, 0, 0]])
  rejected = jnp.array([[1, 30, 31, 60, 2, 0], [0, 1, 40, 41, 61, 2], [1, 50, 62, 2, 0, 0]])
  chosen_mask = (chosen != 0).astype(jnp.int32)
  rejected_mask = (rejected != 0).astype(jnp.int32)
  return dict(chosen_tokens=chosen, chosen_mask=chosen_mask, rejected_tokens=rejected,
              rejected_mask=rejected_mask, margin=jnp.array([1.0, 0.0, 1 / 3]),
              rating=jnp.array([0, 4, 2], jnp.int32))


def test_reward_step_learns_preferences():
  tx = optax.adam(3e-3)
  model, state = _state(head="reward", tx=tx)
  step = jax.jit(functools.partial(reward_step, model=model), donate_argnums=0)
  batch = _reward_batch()

  first = None
  for _ in range(15):
    state, metrics = step(state, batch, jax.random.key(0))
    first = first or float(metrics["reward/loss"])

  assert float(metrics["reward/loss"]) < 0.5 * first
  assert float(metrics["reward/accuracy"]) == 1.0
  assert float(metrics["reward/pairs"]) == 3.0


def test_reward_padding_pair_changes_nothing():
  model, state = _state(head="reward")
  batch = _reward_batch()
  padded = {key: jnp.concatenate([value, jnp.zeros_like(value[:1]) + 7]) for key, value
            in batch.items()}
  padded["chosen_mask"] = padded["chosen_mask"].at[-1].set(0)
  padded["rejected_mask"] = padded["rejected_mask"].at[-1].set(0)
  step = jax.jit(functools.partial(reward_step, model=model))

  base_state, base_metrics = step(state, batch, jax.random.key(0))
  padded_state, padded_metrics = step(state, padded, jax.random.key(0))

  np.testing.assert_allclose(padded_metrics["reward/loss"], base_metrics["reward/loss"],
                             rtol=1e-6)
  for a, b in zip(jax.tree.leaves(base_state.params), jax.tree.leaves(padded_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _rollout(learning_rate, seed=0):
  """Samples and scores a rollout of 4 left-padded prompts of different lengths."""
  policy_model = Llama(CONFIG)
  value_model = Llama(CONFIG, head="value")
  reward_model = Llama(CONFIG, head="reward")
  policy_params = init_params(policy_model, jax.random.key(seed))
  value_params = init_params(value_model, jax.random.key(seed + 1))
  helpfulness = init_params(reward_model, jax.random.key(seed + 2))
  safety = init_params(reward_model, jax.random.key(seed + 3))

  lengths = jnp.array([2, 5, 3, 4])
  prompt_mask = (jnp.arange(5)[None] >= 5 - lengths[:, None]).astype(jnp.int32)
  prompt_tokens = jnp.where(prompt_mask, 10 + jnp.arange(20).reshape(4, 5), 0)
  out = sample(policy_model, policy_params, prompt_tokens, prompt_mask, jax.random.key(5),
               max_new_tokens=6, temperature=1.0, eos_id=3)
  stats = RewardStatistics(mean=0.0, std=1.0)
  batch, _ = score_rollout(
      policy_model=policy_model, value_model=value_model, reward_model=reward_model,
      policy_params=policy_params, ref_params=policy_params, value_params=value_params,
      helpfulness_params=helpfulness, safety_params=safety, helpfulness_statistics=stats,
      safety_statistics=stats, prompt_tokens_BxP=prompt_tokens, prompt_mask_BxP=prompt_mask,
      is_safety_B=jnp.array([0, 1, 0, 0]), sample=out, config=RolloutConfig())
  tx = make_optimizer(ppo_optimizer_config(learning_rate=learning_rate))
  state = PPOState(
      policy=TrainState.create(params=policy_params, tx=tx, rng=jax.random.key(0)),
      value=TrainState.create(params=value_params, tx=tx, rng=jax.random.key(1)),
      ref_params=policy_params)
  return policy_model, value_model, state, batch


@pytest.mark.parametrize("minibatch_size", [4, 2, 1])
def test_ppo_learning_rate_zero_ratio_exactly_one(minibatch_size):
  policy_model, value_model, state, batch = _rollout(learning_rate=0.0)
  step = jax.jit(functools.partial(ppo_step, policy_model=policy_model,
                                   value_model=value_model))
  train_keys = ("tokens", "attention_mask", "response_mask", "old_logprobs", "old_values",
                "advantages", "returns")

  for start in range(0, 4, minibatch_size):
    minibatch = {key: batch[key][start:start + minibatch_size] for key in train_keys}
    state, metrics = step(state, minibatch, jax.random.key(0))

    assert float(metrics["ppo/ratio"]) == 1.0, (start, float(metrics["ppo/ratio"]))
    assert float(metrics["ppo/approx_kl"]) == 0.0
    assert float(metrics["ppo/clip_fraction"]) == 0.0


def test_ppo_step_improves_surrogate():
  policy_model, value_model, state, batch = _rollout(learning_rate=1e-3)
  step = jax.jit(functools.partial(ppo_step, policy_model=policy_model,
                                   value_model=value_model))
  train_keys = ("tokens", "attention_mask", "response_mask", "old_logprobs", "old_values",
                "advantages", "returns")
  minibatch = {key: batch[key] for key in train_keys}

  history = []
  for _ in range(6):
    state, metrics = step(state, minibatch, jax.random.key(0))
    history.append({key: float(value) for key, value in metrics.items()})

  assert history[-1]["ppo/policy_loss"] < history[0]["ppo/policy_loss"]
  assert history[-1]["ppo/value_loss"] < history[0]["ppo/value_loss"]
  assert history[0]["ppo/ratio"] == 1.0
  assert history[-1]["ppo/ratio"] != 1.0
