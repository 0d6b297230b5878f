"""Tests of the SFT, reward-model and PPO train steps on tiny models.

Compilation dominates the run time on CPU, so every jitted step is built once at module level and
parameters come from module-scoped fixtures. Tests that share a step also share its optimizer
object, because `TrainState.tx` is static and a new optimizer object means a new compilation.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama2_jax import get_model_config, sharding
from llama2_jax.losses.reward import RewardStatistics
from llama2_jax.model import Llama, init_params, param_axes
from llama2_jax.optim import make_optimizer, ppo_optimizer_config
from llama2_jax.rollout import RolloutConfig, score_rollout
from llama2_jax.sampling import sample
from llama2_jax.steps import PPOState, ppo_step, reward_scores, reward_step, sft_step
from llama2_jax.train_state import TrainState, state_shardings

CONFIG = get_model_config("test_gqa")
POLICY_MODEL = Llama(CONFIG)
REWARD_MODEL = Llama(CONFIG, head="reward")
VALUE_MODEL = Llama(CONFIG, head="value")

# Plain SGD, so a parameter difference is the learning rate times a gradient difference.
SGD = optax.sgd(0.1)
PPO_ZERO = make_optimizer(ppo_optimizer_config(learning_rate=0.0))
PPO_ADAMW = make_optimizer(ppo_optimizer_config(learning_rate=1e-3))

policy_logits = jax.jit(POLICY_MODEL.apply)
score_pairs = jax.jit(functools.partial(reward_scores, REWARD_MODEL))
sft_full = jax.jit(functools.partial(sft_step, model=POLICY_MODEL))
reward_full = jax.jit(functools.partial(reward_step, model=REWARD_MODEL))
reward_micro = jax.jit(functools.partial(reward_step, model=REWARD_MODEL, num_microbatches=2))
ppo_full = jax.jit(functools.partial(ppo_step, policy_model=POLICY_MODEL,
                                     value_model=VALUE_MODEL))
ppo_micro = jax.jit(functools.partial(ppo_step, policy_model=POLICY_MODEL,
                                      value_model=VALUE_MODEL, num_microbatches=2))

PPO_KEYS = ("tokens", "attention_mask", "response_mask", "old_logprobs", "old_values",
            "advantages", "returns")
RNG = jax.random.key(0)


@pytest.fixture(scope="module")
def policy_params():
  return init_params(POLICY_MODEL, jax.random.key(0))


@pytest.fixture(scope="module")
def scalar_head_params():
  """Parameters for the "reward" head, whose tree the "value" head shares."""
  return init_params(REWARD_MODEL, jax.random.key(1))


def _state(params, tx):
  return TrainState.create(params=params, tx=tx, rng=RNG)


def _assert_trees_close(actual, expected, rtol=1e-5, atol=1e-7):
  expected_leaves = jax.tree.leaves(expected)
  for (path, leaf), expected_leaf in zip(jax.tree_util.tree_leaves_with_path(actual),
                                         expected_leaves, strict=True):
    np.testing.assert_allclose(leaf, expected_leaf, rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def _assert_metrics_close(actual, expected, rtol=1e-5, atol=1e-6):
  assert actual.keys() == expected.keys()
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=rtol, atol=atol, err_msg=key)


def _sft_batch():
  # Row 0: 3 answer tokens; row 1: 1 answer token. Targets are the next tokens.
  tokens = jnp.array([[1, 10, 11, 12, 13, 2, 0, 0], [1, 20, 21, 2, 0, 0, 0, 0]], jnp.int32)
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((2, 1), jnp.int32)], axis=1)
  loss_mask = jnp.array([[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]], jnp.int32)
  attention_mask = (jnp.arange(8)[None] < jnp.array([[6], [4]])).astype(jnp.int32)
  return dict(tokens=tokens, targets=targets, loss_mask=loss_mask,
              attention_mask=attention_mask, segment_ids=attention_mask)


@pytest.fixture(scope="module")
def sharded_sft(policy_params):
  """Returns (step, new_state): the SFT step as training runs it, and a maker of its state.

  The step takes 2 micro-batches and is jitted with the mesh shardings and a donated state, so
  each call of `new_state` builds fresh buffers under jit.
  """
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  make_state = lambda: TrainState.create(params=policy_params, tx=SGD, rng=jax.random.key(0))
  shardings = state_shardings(jax.eval_shape(make_state), param_axes(POLICY_MODEL), mesh)

  def train_step(state, batch):
    return sft_step(state, batch, state.step_rng(), model=POLICY_MODEL, num_microbatches=2)

  step = sharding.jit_sharded_step(train_step, mesh=mesh, state_shardings=shardings,
                                   batch_shardings=sharding.batch_shardings(_sft_batch(), mesh))
  return step, jax.jit(make_state, out_shardings=shardings)


def test_sft_accumulation_matches_full_batch(policy_params, sharded_sft):
  # Two micro-batches of one row each, with 3 and 1 answer tokens, against one batch of 2.
  micro_step, new_state = sharded_sft
  batch = _sft_batch()

  full_state, full_metrics = sft_full(_state(policy_params, SGD), batch, RNG)
  micro_state, micro_metrics = micro_step(new_state(), batch)

  assert float(full_metrics["sft/tokens"]) == 4.0
  assert float(micro_metrics["sft/tokens"]) == 4.0
  np.testing.assert_allclose(micro_metrics["sft/loss"], full_metrics["sft/loss"], rtol=1e-6)
  np.testing.assert_allclose(micro_metrics["sft/grad_norm"], full_metrics["sft/grad_norm"],
                             rtol=1e-5)
  _assert_trees_close(micro_state.params, full_state.params)


def test_sft_loss_is_token_average(policy_params):
  state = _state(policy_params, SGD)
  batch = _sft_batch()
  _, metrics = sft_full(state, batch, RNG)

  logits = policy_logits(state.params, batch["tokens"], batch["attention_mask"])
  logprobs = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logprobs, batch["targets"][..., None], -1)[..., 0]
  # 3 answer tokens in row 0 and 1 in row 1: the sum over all 4 divided by 4, not the mean of
  # the two row means.
  expected = float(jnp.sum(nll * batch["loss_mask"]) / 4)
  np.testing.assert_allclose(float(metrics["sft/loss"]), expected, rtol=1e-5)


def test_sft_padding_values_change_nothing(policy_params):
  state = _state(policy_params, SGD)
  batch = _sft_batch()
  noise = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(2, 2, 8))
  padded = dict(batch)
  padded["tokens"] = jnp.where(batch["attention_mask"] != 0, batch["tokens"], noise[0])
  padded["targets"] = jnp.where(batch["loss_mask"] != 0, batch["targets"], noise[1])

  base_state, base_metrics = sft_full(state, batch, RNG)
  padded_state, padded_metrics = sft_full(state, padded, RNG)

  _assert_metrics_close(padded_metrics, base_metrics)
  _assert_trees_close(padded_state.params, base_state.params)


def test_sft_step_lowers_loss(policy_params, sharded_sft):
  step, new_state = sharded_sft
  batch = _sft_batch()
  state = new_state()

  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics["sft/loss"]))

  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 8
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(policy_params))


def _reward_batch():
  chosen = jnp.array([[1, 30, 31, 32, 2, 0], [0, 1, 40, 41, 42, 2], [1, 50, 51, 2, 0, 0]])
  rejected = jnp.array([[1, 30, 31, 60, 2, 0], [0, 1, 40, 41, 61, 2], [1, 50, 62, 2, 0, 0]])
  chosen_mask = (chosen != 0).astype(jnp.int32)
  rejected_mask = (rejected != 0).astype(jnp.int32)
  return dict(chosen_tokens=chosen, chosen_mask=chosen_mask, rejected_tokens=rejected,
              rejected_mask=rejected_mask, margin=jnp.array([1.0, 0.0, 1 / 3]),
              rating=jnp.array([0, 4, 2], jnp.int32))


def _padded_reward_batch():
  """The batch of `_reward_batch` plus a fourth pair of arbitrary tokens with all-zero masks."""
  batch = _reward_batch()
  padded = {key: jnp.concatenate([value, jnp.zeros_like(value[:1]) + 7])
            for key, value in batch.items()}
  padded["chosen_mask"] = padded["chosen_mask"].at[-1].set(0)
  padded["rejected_mask"] = padded["rejected_mask"].at[-1].set(0)
  return padded


def test_reward_step_learns_preferences(scalar_head_params):
  # The batch ends with a padding pair, which must not count as a pair or stop the learning.
  state = _state(scalar_head_params, SGD)
  batch = _padded_reward_batch()

  history = []
  for _ in range(12):
    state, metrics = reward_full(state, batch, RNG)
    history.append(float(metrics["reward/loss"]))

  assert history[-1] < 0.5 * history[0], history
  assert float(metrics["reward/accuracy"]) == 1.0
  assert float(metrics["reward/pairs"]) == 3.0


def test_reward_loss_matches_scores(scalar_head_params):
  state = _state(scalar_head_params, SGD)
  batch = _reward_batch()
  _, metrics = reward_full(state, batch, RNG)

  scores = score_pairs(state.params,
                       jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]]),
                       jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]]))
  chosen, rejected = jnp.split(scores, 2)
  # -log sigmoid(r_c - r_r - m) = softplus(r_r - r_c + m), averaged over the 3 pairs.
  expected = jnp.mean(jax.nn.softplus(rejected - chosen + batch["margin"]))
  np.testing.assert_allclose(metrics["reward/loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["reward/chosen_mean"], jnp.mean(chosen), rtol=1e-5)
  np.testing.assert_allclose(metrics["reward/rejected_mean"], jnp.mean(rejected), rtol=1e-5)


def test_reward_padding_pair_changes_nothing(scalar_head_params):
  state = _state(scalar_head_params, SGD)

  base_state, base_metrics = reward_full(state, _reward_batch(), RNG)
  padded_state, padded_metrics = reward_full(state, _padded_reward_batch(), RNG)

  _assert_metrics_close(padded_metrics, base_metrics, rtol=1e-6)
  _assert_trees_close(padded_state.params, base_state.params)


def test_reward_accumulation_matches_full_batch(scalar_head_params):
  # Micro-batch 0 contains pairs 0 and 2 and micro-batch 1 contains pair 1 and the padding pair,
  # so the two have 2 and 1 real pairs.
  state = _state(scalar_head_params, SGD)
  batch = _padded_reward_batch()

  full_state, full_metrics = reward_full(state, batch, RNG)
  micro_state, micro_metrics = reward_micro(state, batch, RNG)

  _assert_metrics_close(micro_metrics, full_metrics)
  _assert_trees_close(micro_state.params, full_state.params)


class Rollout(NamedTuple):
  """A scored rollout and the parameters that produced it."""

  batch: dict[str, jax.Array]  # Only the keys that `ppo_step` reads.
  scored: dict[str, jax.Array]  # Everything `score_rollout` returned.
  metrics: dict[str, jax.Array]
  sample: Any  # The `SampleOutput`, after the responses were cut short.
  policy_params: Any
  value_params: Any


@pytest.fixture(scope="module")
def rollout(policy_params, scalar_head_params):
  """Samples and scores 4 left-padded prompts of different lengths, with the policy as reference.
  """
  # One reward model serves as both the helpfulness and the safety model. The value model starts
  # from it, as Llama 2's value model starts from its reward model.
  value_params = scalar_head_params
  prompt_lengths = jnp.array([2, 5, 3, 4])
  prompt_mask = (jnp.arange(5)[None] >= 5 - prompt_lengths[:, None]).astype(jnp.int32)
  prompt_tokens = jnp.where(prompt_mask, 10 + jnp.arange(20).reshape(4, 5), 0)
  out = sample(POLICY_MODEL, policy_params, prompt_tokens, prompt_mask, jax.random.key(5),
               max_new_tokens=6, temperature=1.0, eos_id=3)
  # Cut responses short as if the rows had stopped after 6, 2, 4 and 1 tokens, so the rows are
  # also right-padded by different amounts.
  response_mask = (jnp.arange(6)[None] < jnp.array([[6], [2], [4], [1]])).astype(jnp.int32)
  response_mask = response_mask * out.mask_BxT
  out = out._replace(tokens_BxT=jnp.where(response_mask != 0, out.tokens_BxT, 0),
                     mask_BxT=response_mask, lengths_B=response_mask.sum(axis=1))

  statistics = RewardStatistics(mean=0.0, std=1.0)
  scored, metrics = score_rollout(
      policy_model=POLICY_MODEL, value_model=VALUE_MODEL, reward_model=REWARD_MODEL,
      policy_params=policy_params, ref_params=policy_params, value_params=value_params,
      helpfulness_params=scalar_head_params, safety_params=scalar_head_params,
      helpfulness_statistics=statistics, safety_statistics=statistics,
      prompt_tokens_BxP=prompt_tokens, prompt_mask_BxP=prompt_mask,
      is_safety_B=jnp.array([0, 1, 0, 0]), sample=out, config=RolloutConfig())
  return Rollout(batch={key: scored[key] for key in PPO_KEYS}, scored=scored, metrics=metrics,
                 sample=out, policy_params=policy_params, value_params=value_params)


def test_rollout_logprobs_match_sampler(rollout):
  # The teacher-forced log-probabilities must equal the ones the sampler computed token by token
  # from its KV cache. An off-by-one in the response slice breaks this.
  mask = rollout.sample.mask_BxT != 0
  np.testing.assert_allclose(np.where(mask, rollout.batch["old_logprobs"], 0.0),
                             np.where(mask, rollout.sample.logprobs_BxT, 0.0), atol=1e-4)


def test_rollout_against_itself_has_zero_kl(rollout):
  # The policy is its own reference, so every per-token KL estimate is exactly 0.
  assert float(rollout.metrics["ppo/kl_sum"]) == 0.0
  assert float(rollout.metrics["ppo/rollout_tokens"]) == float(jnp.sum(rollout.sample.mask_BxT))
  assert float(rollout.metrics["ppo/rollout_responses"]) == 4.0


def test_rollout_whitens_advantages_over_response(rollout):
  mask = np.asarray(rollout.batch["response_mask"]) != 0
  advantages = np.asarray(rollout.batch["advantages"])
  np.testing.assert_allclose(advantages[mask].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(advantages[mask].std(), 1.0, rtol=1e-4)
  np.testing.assert_array_equal(advantages[~mask], 0.0)
  np.testing.assert_array_equal(np.asarray(rollout.batch["returns"])[~mask], 0.0)


@pytest.mark.parametrize("field, value", [("kl_coef", -0.1), ("kl_estimator", "k2"),
                                          ("gamma", 1.5), ("lam", -0.5),
                                          ("safety_threshold", 1.0)])
def test_rollout_config_rejects_invalid(field, value):
  with pytest.raises(ValueError, match=f"RolloutConfig.{field} is {value!r}"):
    RolloutConfig(**{field: value})


def _ppo_state(policy_params, value_params, tx):
  return PPOState(policy=_state(policy_params, tx), value=_state(value_params, tx),
                  ref_params=policy_params)


@pytest.mark.parametrize("minibatch_size", [4, 2, 1])
def test_ppo_learning_rate_zero_ratio_exactly_one(rollout, minibatch_size):
  batch = rollout.batch
  state = _ppo_state(rollout.policy_params, rollout.value_params, PPO_ZERO)

  for start in range(0, 4, minibatch_size):
    minibatch = {key: value[start:start + minibatch_size] for key, value in batch.items()}
    state, metrics = ppo_full(state, minibatch, RNG)

    assert float(metrics["ppo/ratio"]) == 1.0, (start, float(metrics["ppo/ratio"]))
    assert float(metrics["ppo/approx_kl"]) == 0.0, start
    assert float(metrics["ppo/clip_fraction"]) == 0.0, start
  assert int(state.step) == 4 // minibatch_size


def _pad_ppo_row(row, rng):
  """Returns a one-row minibatch with arbitrary values where it is masked, plus a padding row."""
  length, response_length = row["tokens"].shape[1], row["response_mask"].shape[1]

  def noise(shape):
    return 1e4 * rng.normal(size=shape)

  filled = dict(row, tokens=jnp.where(row["attention_mask"] != 0, row["tokens"],
                                      rng.integers(0, CONFIG.vocab_size, (1, length))))
  for key in ("old_logprobs", "old_values", "advantages", "returns"):
    filled[key] = jnp.where(row["response_mask"] != 0, row[key], noise((1, response_length)))

  padding_row = {
      "tokens": rng.integers(0, CONFIG.vocab_size, (1, length)),
      "attention_mask": rng.integers(0, 2, (1, length)),
      "response_mask": np.zeros((1, response_length)),
  }
  for key in ("old_logprobs", "old_values", "advantages", "returns"):
    padding_row[key] = noise((1, response_length))
  return {key: jnp.concatenate([filled[key], jnp.asarray(padding_row[key], row[key].dtype)])
          for key in row}


def test_ppo_padding_changes_nothing(rollout):
  batch = rollout.batch
  state = _ppo_state(rollout.policy_params, rollout.value_params, PPO_ZERO)
  row = {key: value[:1] for key, value in batch.items()}
  padded = _pad_ppo_row(row, np.random.default_rng(0))

  _, row_metrics = ppo_full(state, row, RNG)
  _, padded_metrics = ppo_full(state, padded, RNG)

  assert float(row_metrics["ppo/tokens"]) == float(jnp.sum(row["response_mask"]))
  _assert_metrics_close(padded_metrics, row_metrics)


def test_ppo_accumulation_matches_full_minibatch(rollout):
  # A step computes its metrics and gradient norms before its update, so they do not depend on
  # the optimizer, which is all that differs between the two states.
  batch = rollout.batch
  full_state = _ppo_state(rollout.policy_params, rollout.value_params, PPO_ZERO)
  micro_state = _ppo_state(rollout.policy_params, rollout.value_params, PPO_ADAMW)

  _, full_metrics = ppo_full(full_state, batch, RNG)
  _, micro_metrics = ppo_micro(micro_state, batch, RNG)

  assert float(micro_metrics["ppo/ratio"]) == 1.0
  assert float(micro_metrics["ppo/approx_kl"]) == 0.0
  assert float(micro_metrics["ppo/clip_fraction"]) == 0.0
  _assert_metrics_close(micro_metrics, full_metrics)


def test_ppo_step_improves_surrogate(rollout):
  # Two micro-batches per step, as a minibatch too large for memory would take.
  batch = rollout.batch
  state = _ppo_state(rollout.policy_params, rollout.value_params, PPO_ADAMW)

  history = []
  for _ in range(6):
    state, metrics = ppo_micro(state, batch, RNG)
    history.append({key: float(value) for key, value in metrics.items()})

  assert history[-1]["ppo/policy_loss"] < history[0]["ppo/policy_loss"]
  assert history[-1]["ppo/value_loss"] < history[0]["ppo/value_loss"]
  assert history[0]["ppo/ratio"] == 1.0
  assert history[-1]["ppo/ratio"] != 1.0
